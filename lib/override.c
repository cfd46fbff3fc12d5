/* The exported entry points: the smalloc_* names, and (unless configured
 * with --disable-override) the C library's names as aliases of them, all
 * in this one file so the override layer is easy to audit (C++'s operator
 * new and delete at its end).  The aliases
 * carry no symbol version, so they interpose on glibc's malloc@GLIBC_*. */
#include "internal.h"

#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>

SM_EXPORT SM_ENTRY void *smalloc_malloc(size_t n) {
  return sm_malloc(n);
}

SM_EXPORT SM_ENTRY void smalloc_free(void *p) {
  sm_free_inline(p);
}

SM_EXPORT void *smalloc_calloc(size_t count, size_t size) {
  return sm_calloc(count, size);
}

SM_EXPORT void *smalloc_realloc(void *p, size_t n) {
  return sm_realloc(p, n, SM_CALL_REALLOC);
}

SM_EXPORT void *smalloc_reallocarray(void *p, size_t count, size_t size) {
  size_t n;
  if (__builtin_mul_overflow(count, size, &n)) {
    sm_heap_t *heap = sm_heap();
    if (heap->initialized) sm_cnt_add(heap->stats.calls[SM_CALL_REALLOCARRAY], 1);
    sm_call_failed(heap, ENOMEM);
    errno = ENOMEM;
    return NULL;
  }
  return sm_realloc(p, n, SM_CALL_REALLOCARRAY);
}

static void sm_count_call(enum sm_call call) {
  sm_heap_t *heap = sm_heap();
  if (!heap->initialized) heap = sm_heap_init_thread();
  if (heap) sm_cnt_add(heap->stats.calls[call], 1);
}

static bool sm_is_pow2(size_t a) { return a != 0 && (a & (a - 1)) == 0; }

SM_EXPORT int smalloc_posix_memalign(void **out, size_t alignment, size_t n) {
  sm_count_call(SM_CALL_POSIX_MEMALIGN);
  if (!sm_is_pow2(alignment) || alignment % sizeof(void *) != 0) {
    sm_call_failed(sm_heap(), EINVAL);
    return EINVAL;
  }
  int *err = &errno, saved = *err;
  void *p = sm_malloc_aligned(alignment, n);
  if (p == NULL) return ENOMEM;   /* errno is ENOMEM too, as glibc leaves it */
  *err = saved;
  *out = p;
  return 0;
}

SM_EXPORT void *smalloc_aligned_alloc(size_t alignment, size_t n) {
  sm_count_call(SM_CALL_ALIGNED_ALLOC);
  if (!sm_is_pow2(alignment)) {
    sm_call_failed(sm_heap(), EINVAL);
    errno = EINVAL;
    return NULL;
  }
  return sm_malloc_aligned(alignment, n);
}

/* memalign as the GNU C library has it, for the programs written
 * against it: an alignment that is not a power of two is rounded up to
 * the next one (0 and 1 ask for malloc's 16), and only one above
 * SIZE_MAX / 2 + 1, which no power of two reaches, is EINVAL. */
SM_EXPORT void *smalloc_memalign(size_t alignment, size_t n) {
  sm_count_call(SM_CALL_MEMALIGN);
  if (alignment > SIZE_MAX / 2 + 1) {
    sm_call_failed(sm_heap(), EINVAL);
    errno = EINVAL;
    return NULL;
  }
  size_t a = alignment <= 16 ? 16 : (size_t)1 << (64 - __builtin_clzll((unsigned long long)alignment - 1));
  return sm_malloc_aligned(a, n);
}

SM_EXPORT void *smalloc_valloc(size_t n) {
  sm_count_call(SM_CALL_VALLOC);
  return sm_malloc_aligned(SM_OS_PAGE, n);
}

SM_EXPORT void *smalloc_pvalloc(size_t n) {
  sm_count_call(SM_CALL_PVALLOC);
  size_t rounded = (n + SM_OS_PAGE - 1) & ~(SM_OS_PAGE - 1);
  if (rounded < n) {
    sm_call_failed(sm_heap(), ENOMEM);
    errno = ENOMEM;
    return NULL;
  }
  return sm_malloc_aligned(SM_OS_PAGE, rounded ? rounded : SM_OS_PAGE);
}

SM_EXPORT size_t smalloc_malloc_usable_size(void *p) {
  sm_heap_t *heap = sm_heap();
  if (heap->initialized) sm_cnt_add(heap->stats.calls[SM_CALL_USABLE_SIZE], 1);
  return sm_usable_size(p, "malloc_usable_size");
}

SM_EXPORT void smalloc_free_sized(void *p, size_t size) {
  sm_count_call(SM_CALL_FREE_SIZED);
  sm_free_sized_inline(p, size, "free_sized");
}

SM_EXPORT void smalloc_free_aligned_sized(void *p, size_t alignment, size_t size) {
  (void)alignment;
  sm_count_call(SM_CALL_FREE_ALIGNED_SIZED);
  sm_free_sized_inline(p, size, "free_aligned_sized");
}

SM_EXPORT void smalloc_collect(bool force) {
  sm_heap_t *heap = sm_heap();
  if (force) {
    sm_collect_process(heap);
    sm_background_poll();
    return;
  }
  if (heap->initialized) {
    sm_free_flush_remote(heap);
    sm_heap_collect_delayed(heap);
    sm_heap_collect_retired(heap, false);
    sm_heap_decommit(heap, false);
  }
  sm_segment_cache_collect(false);
  sm_background_poll();
}

SM_EXPORT int smalloc_malloc_trim(size_t pad) {
  (void)pad;
  uint64_t before = atomic_load(&sm_gstats.bytes_mapped) + atomic_load(&sm_gstats.bytes_committed);
  smalloc_collect(true);
  uint64_t after = atomic_load(&sm_gstats.bytes_mapped) + atomic_load(&sm_gstats.bytes_committed);
  return after < before;
}

/* glibc's introspection calls read the statistics through sm_stats_with,
 * without a copy of them on the stack (10 KiB: a thread's stack may be
 * 16).  mallinfo2's figures from s, and the three more that malloc_info
 * and malloc_stats print. */
typedef struct sm_mallinfo_s {
  struct mallinfo2 mi;
  uint64_t committed, mapped, regions;
} sm_mallinfo_t;

static void sm_mallinfo_read(const smalloc_stats_t *s, void *arg) {
  sm_mallinfo_t *r = arg;
  struct mallinfo2 *mi = &r->mi;
  memset(mi, 0, sizeof *mi);
  uint64_t huge = sm_huge_live();
  mi->arena = s->bytes_mapped - huge;        /* segments */
  mi->ordblks = s->pages_in_use;
  mi->hblks = s->huge_allocs - s->huge_frees;
  mi->hblkhd = huge;
  mi->usmblks = s->bytes_mapped_peak;
  mi->uordblks = s->bytes_in_use;
  mi->fordblks = s->bytes_committed > s->bytes_in_use ? s->bytes_committed - s->bytes_in_use : 0;
  mi->keepcost = 0;
  r->committed = s->bytes_committed;
  r->mapped = s->bytes_mapped;
  r->regions = s->segments_in_use + s->huge_allocs - s->huge_frees;
}

static sm_mallinfo_t sm_mallinfo_get(void) {
  sm_mallinfo_t r;
  sm_stats_with(sm_mallinfo_read, &r);
  return r;
}

SM_EXPORT struct mallinfo2 smalloc_mallinfo2(void) { return sm_mallinfo_get().mi; }

/* The older mallinfo: the same figures in int fields, each at most
 * INT_MAX (glibc's wrap around instead). */
SM_EXPORT struct mallinfo smalloc_mallinfo(void) {
  struct mallinfo2 m = smalloc_mallinfo2();
  struct mallinfo mi;
#define SM_MI_INT(v) ((v) > (size_t)INT_MAX ? INT_MAX : (int)(v))
  mi.arena = SM_MI_INT(m.arena);
  mi.ordblks = SM_MI_INT(m.ordblks);
  mi.smblks = SM_MI_INT(m.smblks);
  mi.hblks = SM_MI_INT(m.hblks);
  mi.hblkhd = SM_MI_INT(m.hblkhd);
  mi.usmblks = SM_MI_INT(m.usmblks);
  mi.fsmblks = SM_MI_INT(m.fsmblks);
  mi.uordblks = SM_MI_INT(m.uordblks);
  mi.fordblks = SM_MI_INT(m.fordblks);
  mi.keepcost = SM_MI_INT(m.keepcost);
#undef SM_MI_INT
  return mi;
}

/* glibc's XML report, in its layout (what monitoring agents parse), from
 * smalloc's figures: one "heap" for the whole process; "rest" is the
 * committed memory that holds no live block, "mmap" the large and huge
 * blocks, "system current" the committed bytes and "max" the peak of the
 * mapped bytes.  The per-size list of free chunks glibc gives has no
 * counterpart (a free block is on its page's lists): it is empty. */
SM_EXPORT int smalloc_malloc_info(int options, FILE *fp) {
  if (options != 0 || fp == NULL) return EINVAL;
  sm_mallinfo_t r = sm_mallinfo_get();
  unsigned long long rest = r.mi.fordblks, cur = r.committed, max = r.mi.usmblks, total = r.mapped,
                     nmmap = r.mi.hblks, mmapped = r.mi.hblkhd, pages = r.mi.ordblks;
  fprintf(fp,
          "<malloc version=\"1\">\n<heap nr=\"0\">\n<sizes>\n</sizes>\n"
          "<total type=\"fast\" count=\"0\" size=\"0\"/>\n"
          "<total type=\"rest\" count=\"%llu\" size=\"%llu\"/>\n"
          "<system type=\"current\" size=\"%llu\"/>\n<system type=\"max\" size=\"%llu\"/>\n"
          "<aspace type=\"total\" size=\"%llu\"/>\n<aspace type=\"mprotect\" size=\"%llu\"/>\n"
          "</heap>\n"
          "<total type=\"fast\" count=\"0\" size=\"0\"/>\n"
          "<total type=\"rest\" count=\"%llu\" size=\"%llu\"/>\n"
          "<total type=\"mmap\" count=\"%llu\" size=\"%llu\"/>\n"
          "<system type=\"current\" size=\"%llu\"/>\n<system type=\"max\" size=\"%llu\"/>\n"
          "<aspace type=\"total\" size=\"%llu\"/>\n<aspace type=\"mprotect\" size=\"%llu\"/>\n"
          "</malloc>\n",
          pages, rest, cur, max, total, total, pages, rest, nmmap, mmapped, cur, max, total, total);
  return 0;
}

/* glibc's tuning knobs do not apply to smalloc (its own options are
 * smalloc_option_set and the SMALLOC_ variables): nothing is changed.
 * The answer is glibc's (2.36): 1 for every param, known or not, but 0
 * for M_MXFAST (1) above its largest fast size, 80 * sizeof(size_t) / 4;
 * programs that stop when mallopt returns 0 (LinuxCNC's real-time setup,
 * for one, after M_TRIM_THRESHOLD and M_MMAP_MAX) run as on glibc. */
SM_EXPORT int smalloc_mallopt(int param, int value) {
  if (param == 1) return (size_t)value <= 80 * sizeof(size_t) / 4;
  return 1;
}

SM_EXPORT void smalloc_malloc_stats(void) {
  sm_mallinfo_t r = sm_mallinfo_get();
  int cancel;
  pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &cancel);   /* the whole report, always */
  fprintf(stderr,
          "Arena 0:\nsystem bytes     = %10llu\nin use bytes     = %10llu\n"
          "Total (incl. mmap):\nsystem bytes     = %10llu\nin use bytes     = %10llu\n"
          "max mmap regions = %10llu\nmax mmap bytes   = %10llu\n",
          (unsigned long long)r.committed, (unsigned long long)r.mi.uordblks, (unsigned long long)r.mapped,
          (unsigned long long)r.mi.uordblks, (unsigned long long)r.regions, (unsigned long long)r.mi.usmblks);
  pthread_setcancelstate(cancel, NULL);
}

#if SM_OVERRIDE
#if defined(__GNUC__) && !defined(__clang__)
#define SM_ALIAS_COPY(target) , copy(target)
#else
#define SM_ALIAS_COPY(target)
#endif
#define SM_ALIAS(name, target) \
  extern __typeof__(target) name __attribute__((alias(#target), visibility("default") SM_ALIAS_COPY(target)));
SM_ALIAS(malloc, smalloc_malloc)
SM_ALIAS(free, smalloc_free)
SM_ALIAS(calloc, smalloc_calloc)
SM_ALIAS(realloc, smalloc_realloc)
SM_ALIAS(reallocarray, smalloc_reallocarray)
SM_ALIAS(posix_memalign, smalloc_posix_memalign)
SM_ALIAS(aligned_alloc, smalloc_aligned_alloc)
SM_ALIAS(memalign, smalloc_memalign)
SM_ALIAS(valloc, smalloc_valloc)
SM_ALIAS(pvalloc, smalloc_pvalloc)
SM_ALIAS(malloc_usable_size, smalloc_malloc_usable_size)
SM_ALIAS(free_sized, smalloc_free_sized)
SM_ALIAS(free_aligned_sized, smalloc_free_aligned_sized)
SM_ALIAS(malloc_trim, smalloc_malloc_trim)
SM_ALIAS(mallinfo2, smalloc_mallinfo2)
SM_ALIAS(mallinfo, smalloc_mallinfo)
SM_ALIAS(malloc_info, smalloc_malloc_info)
SM_ALIAS(mallopt, smalloc_mallopt)
SM_ALIAS(malloc_stats, smalloc_malloc_stats)
/* glibc's internal names, which a few programs and libraries call
 * directly, and cfree, which programs built against a glibc before 2.26
 * call (glibc keeps it for them): they must reach the same heap as
 * malloc/free. */
SM_ALIAS(__libc_malloc, smalloc_malloc)
SM_ALIAS(__libc_free, smalloc_free)
SM_ALIAS(__libc_calloc, smalloc_calloc)
SM_ALIAS(__libc_realloc, smalloc_realloc)
SM_ALIAS(__libc_memalign, smalloc_memalign)
SM_ALIAS(__libc_valloc, smalloc_valloc)
SM_ALIAS(__libc_pvalloc, smalloc_pvalloc)
SM_ALIAS(__libc_mallinfo, smalloc_mallinfo)
SM_ALIAS(__libc_mallopt, smalloc_mallopt)
SM_ALIAS(cfree, smalloc_free)

/* Calls the kernel makes only in a process of one thread: the purge
 * thread steps aside for them (background.c).  Made as system calls, as
 * the C library's wrappers make them. */
SM_EXPORT int unshare(int flags) {
  return (int)sm_background_aside(SYS_unshare, flags, 0);
}
SM_EXPORT int setns(int fd, int nstype) {
  return (int)sm_background_aside(SYS_setns, fd, nstype);
}

/* ---- C++ ------------------------------------------------------------------
 * The replaceable allocation functions, exported under their mangled
 * names (unless configured with --disable-override), so that new and
 * delete reach smalloc directly rather than through libstdc++'s
 * operator new and the PLT to malloc.
 *
 * Written in C, so the library does not link libstdc++: what C++ needs
 * on failure comes from the C++ runtime of the program, found through
 * weak references that stay null in a program without one.  A request
 * that cannot be served calls the program's new handler
 * (std::get_new_handler) and tries again, for as long as there is one;
 * without a handler the throwing forms throw std::bad_alloc (through
 * std::__throw_bad_alloc) and the nothrow forms return NULL.  The
 * nothrow forms call a handler too; one that throws, as the standard
 * allows, has its exception go to the caller (C cannot catch it), where
 * the standard's nothrow operator new would return NULL.
 *
 * size_t is 'm' (unsigned long) in the names: LP64 Linux.  The delete
 * forms that carry a size or an alignment ignore them: a block's page
 * knows both. */

typedef void (*sm_new_handler_t)(void);
/* std::get_new_handler() and std::__throw_bad_alloc() of libstdc++ */
extern sm_new_handler_t _ZSt15get_new_handlerv(void) __attribute__((weak));
extern void _ZSt17__throw_bad_allocv(void) __attribute__((weak, noreturn));

/* One try: plain below 16 bytes of alignment, aligned above. */
static void *sm_new_try(size_t n, size_t alignment) {
  return alignment <= 16 ? sm_malloc(n) : sm_malloc_aligned(alignment, n);
}

static SM_COLD void *sm_new_failed(size_t n, size_t alignment, bool nothrow) {
  for (;;) {
    sm_new_handler_t handler = _ZSt15get_new_handlerv ? _ZSt15get_new_handlerv() : NULL;
    if (handler == NULL) {
      if (nothrow) return NULL;
      if (_ZSt17__throw_bad_allocv) _ZSt17__throw_bad_allocv();
      sm_message("operator new(%zu): out of memory, and no C++ runtime to throw std::bad_alloc", n);
      abort();
    }
    handler();
    void *p = sm_new_try(n, alignment);
    if (p) return p;
  }
}

SM_INLINE void *sm_new(size_t n) {
  void *p = sm_malloc(n);
  return sm_likely(p != NULL) ? p : sm_new_failed(n, 16, false);
}
SM_INLINE void *sm_new_nothrow(size_t n) {
  void *p = sm_malloc(n);
  return sm_likely(p != NULL) ? p : sm_new_failed(n, 16, true);
}
/* std::align_val_t: a power of two (the compiler passes only those) */
SM_INLINE void *sm_new_aligned(size_t n, size_t alignment, bool nothrow) {
  if (alignment <= 16) return nothrow ? sm_new_nothrow(n) : sm_new(n);
  sm_count_call(SM_CALL_ALIGNED_ALLOC);   /* counted as aligned_alloc */
  void *p = sm_new_try(n, alignment);
  return sm_likely(p != NULL) ? p : sm_new_failed(n, alignment, nothrow);
}

#if __SIZEOF_SIZE_T__ == 8 && __SIZEOF_LONG__ == 8   /* the names below are LP64's */
#define SM_CXX SM_EXPORT __attribute__((used))
/* their prototypes (no header declares them in C) */
SM_CXX void *_Znwm(size_t n);
SM_CXX void *_Znam(size_t n);
SM_CXX void *_ZnwmRKSt9nothrow_t(size_t n, const void *tag);
SM_CXX void *_ZnamRKSt9nothrow_t(size_t n, const void *tag);
SM_CXX void *_ZnwmSt11align_val_t(size_t n, size_t a);
SM_CXX void *_ZnamSt11align_val_t(size_t n, size_t a);
SM_CXX void *_ZnwmSt11align_val_tRKSt9nothrow_t(size_t n, size_t a, const void *tag);
SM_CXX void *_ZnamSt11align_val_tRKSt9nothrow_t(size_t n, size_t a, const void *tag);
SM_CXX void _ZdlPv(void *p);
SM_CXX void _ZdaPv(void *p);
SM_CXX void _ZdlPvm(void *p, size_t n);
SM_CXX void _ZdaPvm(void *p, size_t n);
SM_CXX void _ZdlPvRKSt9nothrow_t(void *p, const void *tag);
SM_CXX void _ZdaPvRKSt9nothrow_t(void *p, const void *tag);
SM_CXX void _ZdlPvSt11align_val_t(void *p, size_t a);
SM_CXX void _ZdaPvSt11align_val_t(void *p, size_t a);
SM_CXX void _ZdlPvmSt11align_val_t(void *p, size_t n, size_t a);
SM_CXX void _ZdaPvmSt11align_val_t(void *p, size_t n, size_t a);
SM_CXX void _ZdlPvSt11align_val_tRKSt9nothrow_t(void *p, size_t a, const void *tag);
SM_CXX void _ZdaPvSt11align_val_tRKSt9nothrow_t(void *p, size_t a, const void *tag);

/* operator new, new[], and their nothrow forms */
SM_CXX SM_ENTRY void *_Znwm(size_t n) { return sm_new(n); }
SM_CXX SM_ENTRY void *_Znam(size_t n) { return sm_new(n); }
SM_CXX void *_ZnwmRKSt9nothrow_t(size_t n, const void *tag) { (void)tag; return sm_new_nothrow(n); }
SM_CXX void *_ZnamRKSt9nothrow_t(size_t n, const void *tag) { (void)tag; return sm_new_nothrow(n); }
/* aligned (C++17) */
SM_CXX void *_ZnwmSt11align_val_t(size_t n, size_t a) { return sm_new_aligned(n, a, false); }
SM_CXX void *_ZnamSt11align_val_t(size_t n, size_t a) { return sm_new_aligned(n, a, false); }
SM_CXX void *_ZnwmSt11align_val_tRKSt9nothrow_t(size_t n, size_t a, const void *tag) {
  (void)tag;
  return sm_new_aligned(n, a, true);
}
SM_CXX void *_ZnamSt11align_val_tRKSt9nothrow_t(size_t n, size_t a, const void *tag) {
  (void)tag;
  return sm_new_aligned(n, a, true);
}

/* operator delete, delete[]: plain, sized (C++14), nothrow, aligned */
SM_CXX SM_ENTRY void _ZdlPv(void *p) { sm_free_inline(p); }
SM_CXX SM_ENTRY void _ZdaPv(void *p) { sm_free_inline(p); }
SM_CXX SM_ENTRY void _ZdlPvm(void *p, size_t n) { sm_free_sized_inline(p, n, "operator delete"); }
SM_CXX SM_ENTRY void _ZdaPvm(void *p, size_t n) { sm_free_sized_inline(p, n, "operator delete[]"); }
SM_CXX void _ZdlPvRKSt9nothrow_t(void *p, const void *tag) { (void)tag; sm_free_inline(p); }
SM_CXX void _ZdaPvRKSt9nothrow_t(void *p, const void *tag) { (void)tag; sm_free_inline(p); }
SM_CXX void _ZdlPvSt11align_val_t(void *p, size_t a) { (void)a; sm_free_inline(p); }
SM_CXX void _ZdaPvSt11align_val_t(void *p, size_t a) { (void)a; sm_free_inline(p); }
SM_CXX void _ZdlPvmSt11align_val_t(void *p, size_t n, size_t a) {
  (void)a;
  sm_free_sized_inline(p, n, "operator delete");
}
SM_CXX void _ZdaPvmSt11align_val_t(void *p, size_t n, size_t a) {
  (void)a;
  sm_free_sized_inline(p, n, "operator delete[]");
}
SM_CXX void _ZdlPvSt11align_val_tRKSt9nothrow_t(void *p, size_t a, const void *tag) {
  (void)a;
  (void)tag;
  sm_free_inline(p);
}
SM_CXX void _ZdaPvSt11align_val_tRKSt9nothrow_t(void *p, size_t a, const void *tag) {
  (void)a;
  (void)tag;
  sm_free_inline(p);
}
#endif /* LP64 */
#endif
