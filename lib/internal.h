/* smalloc internals: every structure and the inline fast-path helpers.
 *
 * Layout (see DESIGN.md): 4 MiB segments aligned to their size; a block
 * pointer maps to its segment with one mask and to its page with one shift.
 * Each page threads three free lists through its free blocks:
 *   free         popped by malloc (owner thread only)
 *   local_free   pushed by free on the owner thread
 *   thread_free  pushed atomically by free on any other thread
 */
#ifndef SM_INTERNAL_H
#define SM_INTERNAL_H

#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "smalloc.h"

/* Everything declared from here on is the library's own: with the
 * declarations hidden too (-fvisibility=hidden covers definitions only),
 * the compiler reaches globals directly, not through the GOT. */
#pragma GCC visibility push(hidden)

#define SM_EXPORT   __attribute__((visibility("default")))
/* The hot entry points (malloc, free, operator new and delete) start on
 * a 64-byte line.  Where they fall otherwise moves with any change to the
 * code before them, and their speed moves with it, either way: with
 * malloc and free 32 bytes off a line (the same instructions),
 * bench_churn b and e took 1.07 and 1.06 times as long, a and d 1.02
 * and 1.00, and mimalloc-bench's glibc-simple 0.95 times (medians of 7-9
 * interleaved runs, 2-core Xeon VM).  Fixed here, a change to the code
 * before them no longer moves them. */
#define SM_ENTRY    __attribute__((aligned(64)))
#define SM_COLD     __attribute__((cold, noinline))
#define SM_INLINE   static inline __attribute__((always_inline))
#define sm_likely(x)   __builtin_expect(!!(x), 1)
#define sm_unlikely(x) __builtin_expect(!!(x), 0)

#ifndef SM_STATS
#define SM_STATS 1
#endif

/* The checks of the fast paths, each named and each on unless configure
 * turns it off (--enable-checks=LIST, --disable-checks; smalloc(7),
 * DIAGNOSTICS).  Off, a fast path trusts what the check would have tested,
 * and the misuse it catches corrupts the heap silently; the slow paths
 * check as ever.  What each costs, malloc(32)+free under callgrind
 * (make bench-callgrind), is in NEWS and smalloc(7).
 *   free-list    malloc follows a free-list link only inside its page
 *   double-free  malloc hands out a block only if it is tagged free, and
 *                free takes one only if it is not (nor the block freed
 *                last into its page)
 *   block-start  free takes a pointer only at the start of a block */
#ifndef SM_CHECK_FREE_LIST
#define SM_CHECK_FREE_LIST 1
#endif
#ifndef SM_CHECK_DOUBLE_FREE
#define SM_CHECK_DOUBLE_FREE 1
#endif
#ifndef SM_CHECK_BLOCK_START
#define SM_CHECK_BLOCK_START 1
#endif

#if defined(__SANITIZE_THREAD__)
#define SM_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SM_TSAN 1
#endif
#endif

/* Counters written only by their owner thread are plain integers; other
 * threads read them while merging.  That race is benign on every target
 * we build for, but ThreadSanitizer builds make both sides relaxed
 * atomics so that a clean report means something. */
#ifdef SM_TSAN
#define sm_cnt_add(lv, n) \
  __atomic_store_n(&(lv), __atomic_load_n(&(lv), __ATOMIC_RELAXED) + (n), __ATOMIC_RELAXED)
#define sm_cnt_read(lv) __atomic_load_n(&(lv), __ATOMIC_RELAXED)
#define sm_cnt_sub_below0(lv, n) \
  ((int64_t)sm_cnt_set_ret(&(lv), __atomic_load_n(&(lv), __ATOMIC_RELAXED) - (n)) < 0)
#define sm_cnt_set_ret(p, v) __extension__({ __typeof__(*(p)) v_ = (v); __atomic_store_n((p), v_, __ATOMIC_RELAXED); v_; })
#else
#define sm_cnt_add(lv, n) ((lv) += (n))
#define sm_cnt_read(lv) (*(volatile __typeof__(lv) *)&(lv))
/* subtract n and tell whether the result went below zero (one sub, one js) */
#define sm_cnt_sub_below0(lv, n) ((int64_t)((lv) -= (n)) < 0)
#endif
/* A variable set once, before anything it governs reaches another
 * thread, read where a relaxed atomic load would cost an instruction
 * (gcc does not fold one into the instruction that uses it). */
#ifdef SM_TSAN
#define sm_once_read(v) __atomic_load_n(&(v), __ATOMIC_RELAXED)
#else
#define sm_once_read(v) (v)
#endif

/* ---- geometry ------------------------------------------------------- */
#define SM_SEGMENT_SHIFT   22
#define SM_SEGMENT_SIZE    ((uintptr_t)1 << SM_SEGMENT_SHIFT)
#define SM_SEGMENT_MASK    (SM_SEGMENT_SIZE - 1)
#define SM_SMALL_SHIFT     16                    /* 64 KiB pages */
#define SM_MEDIUM_SHIFT    19                    /* 512 KiB pages */
#define SM_SMALL_PAGES     (SM_SEGMENT_SIZE >> SM_SMALL_SHIFT)
#define SM_MEDIUM_PAGES    (SM_SEGMENT_SIZE >> SM_MEDIUM_SHIFT)
#define SM_SEGMENT_HDR     ((size_t)16 << 10)    /* header, before page 0 */
#define SM_OS_PAGE         ((size_t)4096)

#define SM_SMALL_MAX       ((size_t)8 << 10)     /* blocks served by the direct table */
#define SM_MEDIUM_MAX      ((size_t)256 << 10)   /* blocks in 512 KiB pages */
#define SM_DIRECT_MAX      SM_SMALL_MAX          /* served by heap->direct */
#define SM_DIRECT_COUNT    (SM_DIRECT_MAX / 16 + 1)
#define SM_BIN_COUNT       (SMALLOC_STATS_CLASSES + 1)  /* bins 1..96 */
#define SM_BIN_SMALL_LAST  32                    /* bin of 1 KiB: larger blocks use medium pages */
#define SM_BIN_FULL        0                     /* queue index of full pages */
/* Blocks above the size classes get a mapping of their own, about their
 * size (huge.c): "large" up to half a segment, "huge" beyond (the two are
 * counted apart). */
#define SM_LARGE_MAX       (SM_SEGMENT_SIZE / 2)
#define SM_MAX_REQUEST     ((size_t)PTRDIFF_MAX - 2 * SM_SEGMENT_SIZE)

/* A free block: the link (stored xor the page's key in the secure build,
 * plain otherwise: see sm_enc) and a tag word that
 * holds the key while the block is on one of its page's lists, and the
 * key with bit 0 flipped (SM_TAG_REMOTE) while it travels from the thread
 * that freed it to its owner, so free can tell a block that may be free
 * already with one compare of (tag ^ key) against 1.  Blocks are at least
 * 16 bytes. */
#define SM_TAG_REMOTE ((uintptr_t)1)
typedef struct sm_block_s {
  struct sm_block_s *next;
  uintptr_t tag;
} sm_block_t;

/* --enable-secure: a canary in the last 8 bytes of every small and medium
 * block, checked when it is freed; guard pages after every page and huge
 * block; random keys and a random order for fresh free lists. */
#ifdef SM_SECURE
#define SM_CANARY 8
#define SM_GUARD  SM_OS_PAGE
#else
#define SM_CANARY 0
#define SM_GUARD  0
#endif
/* Large and huge blocks (secure build): 16 bytes of canary right after
 * the usable bytes, then the guard page; so a write of up to 16 bytes
 * past the end is reported at free rather than faulting at once. */
#define SM_LARGE_CANARY (2 * SM_CANARY)
typedef struct sm_page_s sm_page_t;
typedef struct sm_segment_s sm_segment_t;
typedef struct sm_heap_s sm_heap_t;

/* page flags */
enum {
  SM_PAGE_IN_FULL     = 1,   /* on the heap's full list (other threads' frees notify) */
  SM_PAGE_HAS_ALIGNED = 2,   /* holds blocks returned at an aligned offset */
  SM_PAGE_TRACKED     = 4,   /* running under valgrind: every free goes out of line */
  SM_PAGE_CORRUPT     = 8,   /* a free list was found corrupted: used is not to be
                                trusted, the page is kept for good (sm_page_vacant) */
  SM_PAGE_SAMPLED     = 16,  /* holds blocks the profiler sampled (prof.c) */
  SM_PAGE_ORPHAN      = 32,  /* in the pool since its owner exited: the next free claims it (pool.c) */
  /* flags that send every free of the page to the out-of-line path */
  SM_PAGE_SLOW_FREE   = SM_PAGE_HAS_ALIGNED | SM_PAGE_TRACKED | SM_PAGE_CORRUPT | SM_PAGE_SAMPLED |
                        SM_PAGE_ORPHAN,
};

struct sm_page_s {
  /* line 1, written by the owner on every malloc and free */
  sm_block_t *free;
  sm_block_t *local_free;
  /* counted down by each of the owner's pushes onto free, as one onto
   * local_free counts down used: the two counts sit as far from their
   * lists, so that free takes one from the count of the list it pushed
   * on with no branch on which (sm_page_push_count, sm_free_owner_push) */
  uint32_t free_pushes;
  uint8_t in_use;                /* carved out of its segment */
  uint8_t retired;               /* empty, kept warm, on the heap's retired lists (heap->lock) */
  uint8_t xfreed;                /* other threads freed blocks of it (collected), since it was made
                                  * (or taken from the pool: sm_page_take_over) */
  uint8_t requeued;              /* sent to the back of its queue exhausted, not served since
                                  * (page.c: sm_page_exhausted) */
  /* blocks not on local_free: those handed out and not freed locally
   * (thread_free's count until collected) and those on the free list,
   * which malloc pops and the owner's frees push leaving used alone
   * (sm_page_live gives the blocks handed out); changed by anything but
   * a push onto local_free only through sm_page_used_set */
  uint32_t used;
  uint32_t capacity;             /* blocks built into lists so far */
  uint32_t reserved;             /* blocks that fit */
  /* used at the last stats fold, moved with it by everything but pushes
   * onto local_free: used_mark - used is how many there were since
   * (sm_page_local_frees) */
  uint32_t used_mark;
  /* the list the owner's frees go on, &free or &local_free (see
   * sm_page_free_list): a pointer, not which of the two, so that free
   * finds the list's head, and its count, in one load (page-queue.c
   * sets it) */
  sm_block_t **free_to;
  sm_page_t *next, *prev;        /* bin queue, full list, or retired queue of its bin */

  /* line 2, read by every free, owner's or not, and written only when the
   * page changes state: other threads' frees read it without pulling the
   * owner's line 1 away from it */
  /* the owner's id (sm_heap_owner_id), with bit 0 set while the page is
   * on the full list; SM_XTID_POOLED while it has no owner; 0 when a
   * SM_PAGE_SLOW_FREE flag is set: one compare in free decides "owner
   * thread, nothing special" */
  _Atomic uintptr_t xtid;
  uint8_t *start;
  uint64_t mul;                  /* block-start test, see sm_page_is_block */
  uint64_t limit;                /* block-start test; 0 sends every free out of line */
  uintptr_t key;                 /* free blocks' tag (and, secure build, their links xor key) */
  uint32_t block_size;
  _Atomic uint8_t flags;
  uint8_t bin;                   /* size class: read by other threads' frees (their counts) */
  _Atomic uint16_t sampled;      /* blocks the profiler sampled (prof.c) */
  /* the heap whose thread allocates from the page and owns its lists;
   * NULL while the page waits in the process's pool (pool.c): the one
   * record of a page's owner (xtid caches it for free) */
  _Atomic(sm_heap_t *) owner;
  /* the page's sampled blocks, up to four, as marks (sm_prof_mark), or
   * SM_PROF_MANY (prof.c): a free into a flagged page looks the block up
   * only when it may be a sample */
  _Atomic uint64_t prof_marks;

  /* line 3: pushed by other threads with a CAS, taken by the owner; bit 0
   * (SM_TF_FULL) set while the page is on the full list, so a pushing
   * thread learns in the same CAS that it must tell the owner; the top
   * 32 bits count the blocks on the list (see sm_tf_ptr) */
  _Atomic uintptr_t thread_free __attribute__((aligned(64)));
  /* touched only when the page retires or is reused, under heap->lock */
  sm_page_t *rnext, *rprev;      /* heap->retired_first..last, in expiry order */
  uint32_t retire_expire;        /* heap cycle after which it is released */
  int32_t used_folded;           /* live blocks at the last stats fold, less blocks collected since */
  /* while the page is retired or free in its segment (under heap->lock),
   * or waits in the pool (under the pool's lock) */
  uint64_t empty_since_ms;       /* when it retired, went back to its segment, or to the pool;
                                  * decommitted in its segment: its purge's stamp (sm_purge_stamp) */
  uint8_t decommitted;           /* its memory was given back (madvise, or unmapped) */
  uint8_t unmapped;              /* SM_HOLE_*: its range unmapped, under an address-space limit (segment.c) */
  /* its free blocks went back (pool.c: in the pool, or behind the first
   * of its class) since it was last in use */
  uint8_t free_scanned;
  /* SM_GATE_*: whether a thread other than the owner may give back the
   * free blocks of a page behind the first of its class (pool.c) */
  _Atomic uint8_t purge_gate;
  /* while it waits in the pool, its mark there (pool.c), else 0: written
   * under that pool's lock, so that a thread holding it knows */
  _Atomic uint32_t pooled;
  union {
    /* while a claim walks the notices it took (sm_heap_claim_full, under
     * the owner's lock): how many of them are this page's, then what is
     * left of them and the decision taken; 0 otherwise */
    _Atomic uint32_t claim_notices;
    /* while the page waits in the pool (no claim reaches it there): its
     * live blocks when its lists last changed, under the pool's lock;
     * read by the frees that push onto its thread_free (pool.c:
     * sm_pool_freed_into) */
    _Atomic uint32_t pool_live;
  };
  uint32_t free_purged;          /* bytes of its free blocks given back since then (pool.c) */
  /* behind the first of its class: local_free's head when its free
   * blocks went back (the blocks from there on went back) */
  sm_block_t *purged_to;
};
/* page->purge_gate: shut while the page is its owner's to allocate from
 * or change (first of its class, or off the class queues); open behind
 * the first; busy while a thread gives its free blocks back (pool.c) */
enum { SM_GATE_SHUT = 0, SM_GATE_OPEN = 1, SM_GATE_BUSY = 2 };
_Static_assert(sizeof(sm_page_t) == 192, "page descriptor is three cache lines");
/* The owner's frees into the page malloc takes blocks from go straight
 * back on its free list: last in, first out, so the next malloc hands out
 * a block still in the cache, and a burst that frees and allocates again
 * needs no slow path at all.  Into any other page they go on local_free,
 * which malloc takes whole when it comes to the page (step 1). */
enum { SM_FREE_TO_FREE = offsetof(sm_page_t, free), SM_FREE_TO_LOCAL = offsetof(sm_page_t, local_free) };
SM_INLINE void sm_page_set_free_to(sm_page_t *page, size_t to) {
  page->free_to = (sm_block_t **)((char *)page + to);
}
/* SM_FREE_TO_FREE or SM_FREE_TO_LOCAL, for a page set up by sm_page_init */
SM_INLINE size_t sm_page_free_to(const sm_page_t *page) {
  return (size_t)((const char *)page->free_to - (const char *)page);
}
SM_INLINE sm_block_t **sm_page_free_list(sm_page_t *page) { return page->free_to; }
/* Whether a block the owner pushes on list leaves used: one on
 * local_free does; one back on the free list stays counted (sm_page_t). */
SM_INLINE bool sm_page_push_counts(const sm_page_t *page, sm_block_t *const *list) {
  return list != &page->free;
}
/* The count a push onto list (free or local_free of its page) takes one
 * from: free_pushes or used, at the same distance from either list. */
#define SM_PUSH_COUNT_OFF (offsetof(sm_page_t, used) - offsetof(sm_page_t, local_free))
_Static_assert(offsetof(sm_page_t, free_pushes) - offsetof(sm_page_t, free) == SM_PUSH_COUNT_OFF,
               "free_pushes is as far from free as used from local_free");
SM_INLINE uint32_t *sm_page_push_count(sm_block_t **list) {
  return (uint32_t *)(void *)((char *)list + SM_PUSH_COUNT_OFF);
}
/* The owner's frees into the page since its last stats fold: those onto
 * free, counted down from 0, and those onto local_free, which took used
 * below used_mark.  Modulo 2^32, as the 32-bit count of frees before
 * them was: the slow path folds a page's counts before it refills the
 * page (page.c), and a statistics read folds every page of the thread. */
SM_INLINE uint32_t sm_page_local_frees(const sm_page_t *page) {
  return (0u - page->free_pushes) + (page->used_mark - page->used);
}
/* Set used other than by a push onto local_free (blocks built, moved
 * between lists, collected): used_mark moves with it. */
SM_INLINE void sm_page_used_set(sm_page_t *page, uint32_t used) {
  page->used_mark += used - page->used;
  page->used = used;
}
/* The page's frees counted from here on (sm_page_local_frees is 0):
 * at its start and at each stats fold. */
SM_INLINE void sm_page_frees_restart(sm_page_t *page) {
  page->free_pushes = 0;
  page->used_mark = page->used;
}
/* The owner pushed block b (linked, tagged) on one of its page's lists:
 * b becomes the head.  A release store, as plain as any on x86-64: the
 * local_free of a page behind the first of its class is read by the
 * thread that gives its free blocks back (pool.c), which walks from the
 * head it finds. */
SM_INLINE void sm_list_publish(sm_block_t **list, sm_block_t *b) {
  __atomic_store_n(list, b, __ATOMIC_RELEASE);
}
_Static_assert(offsetof(sm_page_t, xtid) == 64 && offsetof(sm_page_t, thread_free) == 128,
               "page descriptor lines");

/* Large blocks (up to SM_LARGE_MAX) share segments of 64 KiB units
 * (span.c), one block per run of units; where those are not used, large
 * and huge blocks are each in a mapping of their own (huge.c), whose kind
 * only says how they are counted.  From SM_SEG_SPAN on, a page descriptor
 * describes one block. */
enum { SM_SEG_SMALL = 0, SM_SEG_MEDIUM = 1, SM_SEG_SPAN = 2, SM_SEG_LARGE = 3, SM_SEG_HUGE = 4 };
/* page->unmapped (segment.c): a free page whose range is unmapped, and
 * one whose range another mapping took meanwhile (never used again) */
enum { SM_HOLE_NONE = 0, SM_HOLE = 1, SM_HOLE_LOST = 2 };

struct sm_segment_s {
  /* the segment's own address: first, so that the first word of the
   * block that holds a page descriptor names its segment, whether that
   * block is the header or a slot (sm_page_segment) */
  sm_segment_t *self;
  uintptr_t cookie;              /* address ^ sm_secret: a live header */
  uint8_t kind;
  uint8_t page_shift;
  uint16_t page_count;
  uint16_t used_pages;
  uint8_t purged;                /* cached and madvised away */
  uint8_t in_free_list;
  uint8_t span_samples;          /* span: holds profile samples (prof.c) only */
  uint8_t huge_pages;            /* small, span: halves huge pages may back since it was mapped (SM_HALF_*) */
  _Atomic uint8_t huge_withdrawn; /* small, span: halves advised against them since (segment.c) */
  _Atomic uint16_t open_pages;   /* pages whose purge_gate is open (pool.c) */
  size_t decommitted;            /* bytes of free pages given back (not counted committed) */
  size_t unmapped;               /* bytes of those unmapped (holes: SM_HOLE_*) */
  size_t mapped;                 /* bytes of the mapping, from the segment start */
  size_t block_offset;           /* large, huge: offset of the block */
  size_t block_size;             /* large, huge: usable bytes */
  /* the segment's holder: the heap whose lock guards its pages' in_use
   * and its place on a segment list (its pages may be owned by other
   * heaps, page->owner); NULL while abandoned (then on the abandoned list,
   * under its lock) and for a large or huge block */
  _Atomic(sm_heap_t *) heap;
  sm_segment_t *next, *prev;     /* heap's segments with free pages, cache, abandoned */
  uint64_t cached_at_ms;         /* cached (purged: its purge's stamp, sm_purge_stamp); span: its last free */
  /* span (span.c): units free, purged since they were free, and handed
   * out since the segment was mapped or they were purged */
  uint64_t span_free, span_purged, span_touched;
  /* its page descriptors: a slot of the descriptor area for a small or
   * medium segment (segment.c), else hdr_pages (sm_segment_hold_pages) */
  sm_page_t *pages;
  /* last, so that the header of a large or huge block (which uses only
   * hdr_pages[0]) ends a few hundred bytes in */
  sm_page_t hdr_pages[SM_SMALL_PAGES] __attribute__((aligned(64)));
};
_Static_assert(sizeof(sm_segment_t) <= SM_SEGMENT_HDR, "segment header too big");

/* Page descriptors sit in blocks of SM_DESC_ALIGN bytes, so aligned,
 * whose first word is their segment: a segment's header, or a slot of the
 * descriptor area (segment.c). */
#define SM_DESC_ALIGN ((uintptr_t)16 << 10)
_Static_assert(offsetof(sm_segment_t, self) == 0 && sizeof(sm_segment_t) <= SM_DESC_ALIGN &&
                   SM_SEGMENT_SIZE % SM_DESC_ALIGN == 0,
               "a header's descriptors are in its first block");
SM_INLINE sm_segment_t *sm_page_segment(const sm_page_t *page) {
  return *(sm_segment_t *const *)((uintptr_t)page & ~(SM_DESC_ALIGN - 1));
}
/* The segment's descriptors are pages (NULL: those in its header); it is
 * where it is (set again after it moved, huge.c). */
SM_INLINE void sm_segment_hold_pages(sm_segment_t *seg, sm_page_t *pages) {
  seg->self = seg;
  seg->pages = pages ? pages : seg->hdr_pages;
}

/* Where the block of a large or huge mapping starts (at least): after the
 * header fields and the one page descriptor it uses. */
#define SM_MAPPED_HDR ((offsetof(sm_segment_t, hdr_pages) + sizeof(sm_page_t) + 63) & ~(size_t)63)

/* The halves of a segment, each one huge page (2 MiB), as masks of
 * huge_pages and huge_withdrawn. */
enum { SM_HALF_LOWER = 1, SM_HALF_UPPER = 2, SM_HALF_BOTH = 3 };

/* Clear the header of a mapping that holds one block: the fields and its
 * first page descriptor. */
SM_INLINE void sm_segment_clear_mapped(sm_segment_t *seg) {
  memset(seg, 0, offsetof(sm_segment_t, hdr_pages) + sizeof seg->hdr_pages[0]);
  sm_segment_hold_pages(seg, NULL);
}

typedef struct sm_page_queue_s { sm_page_t *first, *last; } sm_page_queue_t;

/* Ask for p's cache line to be written (it is read first): a line that
 * another core wrote last comes over once, owned, where a read would
 * bring it shared and the write take it over again.  No fault, whatever
 * p is.  x86-64 processors that do not report PREFETCHW run it as a
 * no-op (valgrind too); gcc emits it only when told the CPU has it.
 * (malloc's prefetch of its next block as a write instead of a read:
 * bench_pipeline 0.98, bench_xchurn 16 1.01 of the time; left a read.) */
SM_INLINE void sm_prefetch_write(const void *p) {
#if defined(__x86_64__)
  __asm__ volatile("prefetchw %0" : : "m"(*(const char *)p));
#else
  __builtin_prefetch(p, 1);
#endif
}

/* A spin lock for the slow paths: one exchange to take it when free (the
 * owner's case), a yield while another thread holds it.  A heap's lock is
 * held across no other smalloc lock but the abandoned list's and the
 * segment cache's; a pool's across none (lock order: heaps, heap,
 * abandoned, cache). */
typedef struct sm_lock_s { _Atomic int held; } sm_lock_t;
SM_INLINE bool sm_trylock(sm_lock_t *l) {
  return atomic_load_explicit(&l->held, memory_order_relaxed) == 0 &&
         atomic_exchange_explicit(&l->held, 1, memory_order_acquire) == 0;
}
void sm_lock_wait(sm_lock_t *l);
SM_INLINE void sm_lock(sm_lock_t *l) {
  if (sm_unlikely(atomic_exchange_explicit(&l->held, 1, memory_order_acquire) != 0)) sm_lock_wait(l);
}
SM_INLINE void sm_unlock(sm_lock_t *l) { atomic_store_explicit(&l->held, 0, memory_order_release); }

/* Entry points counted per call (malloc and free are derived, see stats.c). */
enum sm_call {
  SM_CALL_CALLOC, SM_CALL_REALLOC, SM_CALL_REALLOCARRAY, SM_CALL_POSIX_MEMALIGN,
  SM_CALL_ALIGNED_ALLOC, SM_CALL_MEMALIGN, SM_CALL_VALLOC, SM_CALL_PVALLOC,
  SM_CALL_USABLE_SIZE, SM_CALL_FREE_SIZED, SM_CALL_FREE_ALIGNED_SIZED,
  SM_CALL_FREE_NULL, SM_CALL_FAILED, SM_CALL_MALLOC_FAILED,
  SM_CALL_COUNT
};

/* Per-thread counters: plain integers written by the owner only. */
typedef struct sm_tstats_s {
  uint64_t calls[SM_CALL_COUNT];
  /* bytes requested: requested - prof_left, where prof_left counts down
   * on every allocation to the profiler's next sample and requested is
   * credited with each distance drawn (prof.c); derived so, it costs
   * malloc nothing extra */
  uint64_t requested;
  uint64_t prof_left;
  uint64_t alloc_other;          /* blocks allocated by entry points other than malloc */
  uint64_t free_other;           /* blocks freed by realloc, not by a free call */
  uint64_t large_allocs, large_frees;
  uint64_t huge_allocs, huge_frees, huge_remaps;
  uint64_t pages_retired, pages_reused, pages_released, pages_full, pages_unfull;
  uint64_t pages_abandoned, pages_reclaimed, segments_reclaimed;
  uint64_t threads_started, threads_exited;
  uint64_t pages_claimed, oom_collects;
  /* last, the arrays, of which a thread writes the lines of the classes
   * it uses (sm_heap_t) */
  uint64_t class_allocs[SM_BIN_COUNT];
  uint64_t class_frees[SM_BIN_COUNT];
  uint64_t class_steps[SM_BIN_COUNT][SMALLOC_STEP_COUNT];
} sm_tstats_t;

/* A stack the profiler took (prof.c): where its frame was (sp, 0 for
 * none), its return addresses (ip) and the stack slots that held them
 * (slot, as offsets from sp). */
#define SM_PROF_MEMOS     4
#define SM_PROF_MEMO_MAX 24
typedef struct sm_prof_memo_s {
  uintptr_t sp;
  uint32_t n;
  /* the stack's number in the profiler's table + 1 (0: not looked up
   * yet), valid while gen is the table's generation */
  uint32_t stack, gen;
  uint32_t slot[SM_PROF_MEMO_MAX];
  uintptr_t ip[SM_PROF_MEMO_MAX];
} sm_prof_memo_t;

/* Remote frees waiting to be sent: a chain of blocks of one page, linked
 * with the page's key, as they will sit on its thread_free. */
#define SM_XBUF_SLOTS_LOG2 7
#define SM_XBUF_SLOTS (1u << SM_XBUF_SLOTS_LOG2)   /* by page, in pairs: a producer's current pages */
#define SM_XBUF_MAX   64
/* The owner's slow paths send its batches at every SM_XBUF_BEATS-th
 * entry (sm_heap_heartbeat), not at each: sent at each, a stage of
 * bench_pipeline sent 16 batches of 4 blocks at every slow path, 1.56
 * million batches begun and sent for 6 million remote frees; at 8, 0.47
 * million (callgrind, bench_pipeline: 1652 -> 1526 million instructions,
 * peak resident 8.8 -> 9.2 MB).  A batch still goes when it fills, when
 * its slot is wanted, when the thread collects or exits, and when it
 * idles (the purge thread sends it). */
#define SM_XBUF_BEATS 8
typedef struct sm_xbuf_s {
  sm_page_t *page;
  sm_block_t *head, *tail;
  uint32_t count;
  uint32_t key;                  /* the page's key when the batch began (its low bits) */
} sm_xbuf_t;

/* A thread heap.  The owner alone touches the direct table, the queues
 * and the counters.  What other threads may take (retired pages, the owned
 * segments' free pages) sits behind heap->lock, so memory the owner is
 * done with belongs to the process: see the opening comment of page.c. */
struct sm_heap_s {
  sm_page_t *direct[SM_DIRECT_COUNT];    /* first page for (n+15)/16, n <= 8 KiB */
  uint32_t cycle;                        /* slow-path entries (wraps; compared as a difference) */
  uint32_t next_sweep;                   /* cycle of the next sweep (page.c) */
  /* earliest retire_expire, or SM_NO_EXPIRY: written under heap->lock by
   * whoever changes the retired lists (the owner, trim, the purge
   * thread), read by the owner without it */
  _Atomic uint64_t next_expire;
  uint64_t rng;                          /* secure build: page keys, list order */
  /* SM_PUB_BYTES + the net bytes of its class changes not published
   * yet, and the bytes of folded changes to go before it publishes them
   * whatever their net (stats.c: sm_stats_class_changed); the owner's
   * alone, as class_unpub */
  int64_t pub_room, pub_due;
  /* whether the thread took a medium page of the shared segments
   * (page.c: sm_page_borrow; its first medium blocks take a small page
   * or a mapping of their own until then) */
  bool borrowed_medium;
  /* medium blocks served as large ones, each in a mapping of its own,
   * while the thread had no page of their class (sm_page_lends_large) */
  uint16_t lent;
  int64_t prof_events_left;              /* slow-path steps to the next churn sample (prof.c) */
  uint64_t prof_rng;                     /* the profiler's draws; 0 until the first (prof.c) */
  uint64_t serial;                       /* heaps set up before this one, this one included */
  sm_page_queue_t queues[SM_BIN_COUNT];  /* [0] is the full list */
  /* the head of the free list of the class's first page when the sweep
   * last looked (compared, never followed), SM_SWEPT_ACTIVE once the
   * class's slow path ran since (page.c, sm_heap_sweep) */
  const sm_block_t *swept_head[SM_BIN_COUNT];
  /* small pages of the shared segments the thread took for a medium
   * class, up to SM_BORROW_SMALL_MEDIUM (page.c: sm_page_borrow) */
  uint8_t borrowed_small[SM_BIN_COUNT];
  uint32_t bg_cycle;                     /* the purge thread's: cycle when last seen, */
  uint64_t bg_seen_ms;                   /* and when (under the heaps lock) */
  uint8_t bg_idle;                       /* the purge thread's: no slow path for a purge delay */
  sm_heap_t *all_next, *all_prev;        /* every live or waiting heap, under sm_heaps_lock */
  sm_heap_t *pool_next;                  /* the next heap waiting for a thread, or pooled */
  uint64_t parked_ms;                    /* since when it waits for a thread (heap.c), 0 if not */
  uint64_t pooled_ms;                    /* since when it is in the pool (heap.c), 0 if not */
  uint8_t struct_purged;                 /* pooled, the pages of its struct given back (heap.c) */
  uint8_t initialized;
  /* blocks other threads freed into pages on the full list: the first
   * such free of each page comes here instead of the page's thread_free,
   * so the owner finds the page without a scan; links are stored xor
   * sm_secret; SM_XDELAYED_CLOSED once the heap is abandoned */
  _Atomic(sm_block_t *) xdelayed __attribute__((aligned(64)));
  /* empty pages of this heap's segments that other heaps owned, sent home
   * to be given back to their segment under this heap's lock (pool.c),
   * linked through page->next; SM_XHOME_CLOSED once the heap is abandoned */
  _Atomic(sm_page_t *) xhome;
  /* blocks on xdelayed: past SM_BG_NOTICES, a purge thread is wanted, for
   * the owner may be idle and those pages' blocks freed (background.c) */
  _Atomic uint32_t xnotices;
  /* another thread claimed pages of the full list (sm_heap_claim_full)
   * since this heap last took its notices: every notice wants a purge
   * thread, whatever the count, for the owner may be idle; xkept counts
   * the notices that claim handed back, so xnotices above it shows that
   * one came since */
  _Atomic uint8_t xwatch;
  _Atomic uint32_t xkept;
  /* ---- under lock ---- (from xdelayed to the lock: what other threads
   * may touch after the heap's thread exited, heap.c: sm_heap_clear) */
  sm_lock_t lock __attribute__((aligned(64)));
  sm_page_t *retired_first, *retired_last;   /* retired pages by expiry */
  sm_page_queue_t retired[SM_BIN_COUNT];     /* retired pages by class, warmest first */
  sm_segment_t *free_segs[2];            /* owned segments with free pages, by kind */
  sm_segment_t *full_segs;               /* owned segments without */
  uint32_t segs_held[2];                 /* those of both lists, by kind (segment.c: sm_heap_holds) */
  /* ---- the owner's again ---- */
  /* bit i: xbuf[i] holds blocks; written by the owner alone (with
   * relaxed stores), read by the purge thread as a hint */
  _Atomic uint64_t xbuf_used[SM_XBUF_SLOTS / 64];
  /* the owner is at its batches / the purge thread sends them for it: the
   * hand-over of an idle thread's batches (free.c) */
  _Atomic uint8_t xbuf_busy, xbuf_steal;
  uint32_t xbuf_beats;                   /* slow-path entries, for SM_XBUF_BEATS */
  /* blocks in use by class counted here (folds, remote frees) and not
   * published to sm_gstats.class_live yet (stats.c); [0] and the last
   * three stay 0, read four at a time */
  int32_t class_unpub[SM_BIN_COUNT + 3] __attribute__((aligned(16)));
  /* its counts: the arrays last, of which a thread writes the lines of
   * the classes it uses */
  sm_tstats_t stats __attribute__((aligned(64)));
  /* Last, what a thread that frees no other thread's blocks and takes no
   * profile never writes: a new heap struct is left as the OS gave it
   * (heap.c: sm_heap_alloc_struct), so that those pages are never
   * touched.  Blocks this thread freed into other heaps' pages, batched
   * by page and pushed on its thread_free in one CAS (free.c): */
  sm_xbuf_t xbuf[SM_XBUF_SLOTS];
  /* the thread's last few sampled stacks, to check rather than unwind
   * again (prof.c) */
  sm_prof_memo_t prof_memo[SM_PROF_MEMOS];
  uint32_t prof_memo_next;               /* the memo to replace next */
};

/* Whether the heap holds batches of remote frees not sent yet. */
SM_INLINE bool sm_xbuf_pending(const sm_heap_t *heap) {
  uint64_t any = 0;
  for (unsigned w = 0; w < SM_XBUF_SLOTS / 64; w++)
    any |= atomic_load_explicit(&heap->xbuf_used[w], memory_order_relaxed);
  return any != 0;
}

#define SM_NO_EXPIRY UINT64_MAX

/* ---- globals ---------------------------------------------------------- */
extern sm_heap_t sm_heap_empty;
extern sm_heap_t sm_heap_exited;   /* a thread after its heap was abandoned */
/* The holder of the segments every thread takes its first fresh pages
 * from (page.c: sm_page_borrow): no thread, on no heap list; only its
 * lock, segment lists and xhome are used.  A child of fork whose lost
 * thread held its lock starts another (heap.c); NULL if it could not. */
extern sm_heap_t *sm_heap_shared;
extern pthread_mutex_t sm_shared_map_lock;   /* held while a shared segment is mapped (page.c) */
#define SM_XDELAYED_CLOSED ((sm_block_t *)1)
#define SM_XHOME_CLOSED ((sm_page_t *)1)
/* xtid of a page in the process's pool: not 0 (its frees take the batched
 * remote path) and no heap's id */
#define SM_XTID_POOLED ((uintptr_t)2)
extern sm_page_t sm_page_empty;
extern __thread sm_heap_t *sm_heap_tls __attribute__((tls_model("initial-exec")));
extern uintptr_t sm_secret;

/* Count into a thread's heap, or for a thread without one (it never
 * allocated, or it has exited) into the process-wide orphan counters. */
#define SM_COUNT(heap, field, n)                                              \
  do {                                                                        \
    if (sm_likely((heap)->initialized)) sm_cnt_add((heap)->stats.field, (n)); \
    else sm_stats_orphan_add(offsetof(sm_tstats_t, field), (n));              \
  } while (0)

/* Options, read once (options.c); index by smalloc_option_t. */
extern long sm_options[SMALLOC_OPTION_COUNT];
#define sm_opt(o) __atomic_load_n(&sm_options[SMALLOC_OPTION_##o], __ATOMIC_RELAXED)
/* SMALLOC_HUGEPAGES: 0 never, 1 where memory is mostly written (segment.c,
 * span.c), SM_HUGE_EAGER every segment of small or large blocks from the
 * first (segment.c: sm_segment_wants_huge; span.c) */
enum { SM_HUGE_EAGER = 2 };

/* Process-wide gauges and OS counters, atomics (slow paths only). */
typedef struct sm_gstats_s {
  _Atomic uint64_t os_mmap, os_munmap, os_madvise, os_mremap;
  _Atomic uint64_t bytes_mapped, bytes_mapped_peak, bytes_committed, bytes_purged;
  _Atomic uint64_t segments_in_use, segments_mapped, segments_cached, segments_cache_hits;
  _Atomic uint64_t segments_purged, segments_unmapped;
  _Atomic int64_t class_pages[SM_BIN_COUNT];
  _Atomic int64_t class_page_bytes[SM_BIN_COUNT];   /* theirs: 64 KiB or 512 KiB each */
  _Atomic uint64_t huge_bytes, huge_bytes_freed, huge_cache_hits, huge_cached;
  _Atomic uint64_t background_threads, pages_purged, errors_reported, heaps_purged;
  /* page bytes of every heap's retired pages: past SM_BG_THRESHOLD, a
   * purge thread is wanted (page.c) */
  _Atomic uint64_t retired_bytes;
  _Atomic uint64_t peak_in_use;
  _Atomic uint64_t class_peak[SM_BIN_COUNT];   /* blocks, raised with peak_in_use */
  /* the blocks in use of each class and their bytes, as the heaps
   * published them (stats.c: sm_stats_publish) */
  _Atomic int64_t class_live[SM_BIN_COUNT];
  _Atomic int64_t small_live;
} sm_gstats_t;
extern sm_gstats_t sm_gstats;
#define sm_gadd(f, n) atomic_fetch_add_explicit(&sm_gstats.f, (n), memory_order_relaxed)
#define sm_gsub(f, n) atomic_fetch_sub_explicit(&sm_gstats.f, (n), memory_order_relaxed)
/* the bytes of the live blocks above the size classes */
#define sm_huge_live() (atomic_load(&sm_gstats.huge_bytes) - atomic_load(&sm_gstats.huge_bytes_freed))

/* ---- size classes ------------------------------------------------------ */
/* Multiples of 16 up to 256 (bins 1..16), then 8 classes per power of two
 * (bins 17..96 up to 256 KiB): waste < max(16, n/8). */
SM_INLINE size_t sm_bin_of(size_t n) {
  if (n <= 256) return n <= 16 ? 1 : (n + 15) >> 4;
  size_t w = n - 1;
  unsigned b = 63u - (unsigned)__builtin_clzl(w);
  return 16 + (b - 8) * 8 + ((w >> (b - 3)) & 7) + 1;
}
SM_INLINE size_t sm_bin_size(size_t bin) {
  if (bin <= 16) return bin * 16;
  size_t k = bin - 17, b = 8 + k / 8, j = k % 8;
  return ((size_t)1 << b) + (j + 1) * ((size_t)1 << (b - 3));
}

/* cycle a is at or past cycle b (32-bit, wrap-safe) */
SM_INLINE bool sm_cycle_reached(uint32_t a, uint32_t b) { return (int32_t)(a - b) >= 0; }

/* ---- thread identity and the heap ------------------------------------- */
SM_INLINE uintptr_t sm_thread_id(void) {
  return (uintptr_t)__builtin_thread_pointer();
}
SM_INLINE sm_heap_t *sm_heap(void) { return sm_heap_tls; }
/* What a page's xtid holds for its owner: the owner heap's address, not
 * its thread's: a heap address is never reused while its pages might
 * still carry it (heaps of exited threads abandon their pages first, and
 * the heaps of threads that did not survive a fork are never reused), so
 * a thread of a forked child can never take another's page for its own. */
SM_INLINE uintptr_t sm_heap_owner_id(const sm_heap_t *heap) { return (uintptr_t)heap; }

/* ---- segment map: which 4 MiB units hold a segment header ------------- */
/* One byte per unit, the segment's page shift (0 where no segment is).
 * Where it is kept:
 *   - the window: 2^16 bytes in .bss for the 256 GiB of address space
 *     around the first segment (sm_segmap_base, set once by os.c), where
 *     the kernel places the mappings of nearly every process;
 *   - elsewhere, three levels: a root in .bss of 2^11 entries, mid tables
 *     of 2^10 entries and leaves of 2^14 units (16 KiB each, for 64 GiB
 *     of address space), which os.c maps when it first maps a segment in
 *     their range.  Together they cover 57-bit addresses: x86-64 with 4-
 *     and 5-level paging, arm64 with 48- and 52-bit VA.  An entry not
 *     mapped yet is NULL, and no segment is there.
 * 80 KiB of .bss in all, where a flat map would take 32 MiB of address
 * space from a program under RLIMIT_AS (and 2^35 bytes for 57 bits). */
#define SM_SEGMAP_BITS        57
#define SM_SEGMAP_WINDOW      ((uintptr_t)1 << 16)
#define SM_SEGMAP_NO_BASE     ((uintptr_t)1 << 63)   /* no segment yet: every unit is far */
#define SM_SEGMAP_LEAF_BITS   14
#define SM_SEGMAP_LEAF_SIZE   ((size_t)1 << SM_SEGMAP_LEAF_BITS)
#define SM_SEGMAP_MID_BITS    10
#define SM_SEGMAP_MID_SIZE    ((size_t)1 << SM_SEGMAP_MID_BITS)
#define SM_SEGMAP_ROOT_BITS   (SM_SEGMAP_BITS - SM_SEGMENT_SHIFT - SM_SEGMAP_MID_BITS - SM_SEGMAP_LEAF_BITS)
#define SM_SEGMAP_ROOTS       ((size_t)1 << SM_SEGMAP_ROOT_BITS)
typedef _Atomic(_Atomic uint8_t *) sm_segmap_mid_t[SM_SEGMAP_MID_SIZE];
/* Where unit (an address >> SM_SEGMENT_SHIFT) sits in the far levels:
 * its root entry (SM_SEGMAP_ROOTS or more: beyond the map), its entry in
 * that mid table, and its byte in that leaf. */
SM_INLINE uintptr_t sm_segmap_root_of(uintptr_t unit) {
  return unit >> (SM_SEGMAP_MID_BITS + SM_SEGMAP_LEAF_BITS);
}
SM_INLINE size_t sm_segmap_mid_of(uintptr_t unit) {
  return (unit >> SM_SEGMAP_LEAF_BITS) & (SM_SEGMAP_MID_SIZE - 1);
}
SM_INLINE size_t sm_segmap_leaf_of(uintptr_t unit) { return unit & (SM_SEGMAP_LEAF_SIZE - 1); }
extern uintptr_t sm_segmap_base;   /* set once, read with __atomic_load_n */
extern _Atomic uint8_t sm_segmap_window[SM_SEGMAP_WINDOW];
extern _Atomic(sm_segmap_mid_t *) sm_segmap_root[SM_SEGMAP_ROOTS];

/* ---- page map: free's way from a pointer to its page ------------------- */
/* Each 64 KiB slice of the 32 GiB around the first segment names the page
 * descriptor its blocks belong to, as its distance from the map's start:
 * free's fast path finds the page with one subtraction, one compare and
 * one add from memory.  The window's first segment is never recorded, so
 * its entries stay 0, and read as a page descriptor they hold no block
 * (none: its block test fails).  An entry of 0, where no segment is,
 * leads there, so free needs no test for it; a pointer outside the
 * window, or in none, goes the long way (segment map, cookie).
 * Written only by sm_segmap_set, from the segment's page shift: the page
 * map is the segment map's byte spelled out per slice.
 * 4 MiB of .bss, touched 4 KiB per 32 MiB of segments. */
#define SM_PAGEMAP_SHIFT   SM_SMALL_SHIFT
#define SM_PAGEMAP_SLICES  ((uintptr_t)1 << 19)
#define SM_PAGEMAP_UNIT    (SM_SEGMENT_SIZE >> SM_PAGEMAP_SHIFT)   /* slices per segment */
_Static_assert(SM_PAGEMAP_SLICES % SM_PAGEMAP_UNIT == 0, "the window holds whole segments");
typedef union sm_pagemap_u {
  sm_page_t none;                                /* the first segment's entries */
  _Atomic uintptr_t slice[SM_PAGEMAP_SLICES];   /* page - &none, 0 for none */
} sm_pagemap_t;
_Static_assert(sizeof(sm_page_t) <= SM_PAGEMAP_UNIT * sizeof(uintptr_t),
               "none lies in the entries of one segment");
/* The address where the window starts (a segment's), set once by os.c:
 * an address rather than a slice number, so that free subtracts it
 * straight from memory, one instruction fewer. */
extern uintptr_t sm_pagemap_base;
extern sm_pagemap_t sm_pagemap;
/* p's slice in the window: SM_PAGEMAP_SLICES or more outside it */
SM_INLINE uintptr_t sm_pagemap_index(const void *p) {
  return ((uintptr_t)p - sm_once_read(sm_pagemap_base)) >> SM_PAGEMAP_SHIFT;
}
SM_INLINE sm_page_t *sm_pagemap_at(uintptr_t i) {
  return (sm_page_t *)((uintptr_t)&sm_pagemap.none +
                       atomic_load_explicit(&sm_pagemap.slice[i], memory_order_relaxed));
}
/* What the entry for a slice in page holds (none: 0). */
SM_INLINE uintptr_t sm_pagemap_entry(const sm_page_t *page) {
  return page ? (uintptr_t)page - (uintptr_t)&sm_pagemap.none : 0;
}
/* The page p's slice names, NULL where none is (outside the window too). */
SM_INLINE sm_page_t *sm_pagemap_page(const void *p) {
  uintptr_t i = sm_pagemap_index(p);
  sm_page_t *page = i < SM_PAGEMAP_SLICES ? sm_pagemap_at(i) : &sm_pagemap.none;
  return page == &sm_pagemap.none ? NULL : page;
}

/* The byte of the unit at seg: where it is kept (NULL beyond the map). */
_Atomic uint8_t *sm_segmap_slot(uintptr_t seg);
unsigned sm_segmap_shift_far(uintptr_t seg);

/* In the window only, 0 elsewhere (sm_segmap_shift looks further). */
SM_INLINE unsigned sm_segmap_shift_near(uintptr_t seg) {
  uintptr_t i = (seg >> SM_SEGMENT_SHIFT) - __atomic_load_n(&sm_segmap_base, __ATOMIC_RELAXED);
  if (sm_likely(i < SM_SEGMAP_WINDOW)) return atomic_load_explicit(&sm_segmap_window[i], memory_order_relaxed);
  return 0;
}
SM_INLINE unsigned sm_segmap_shift(uintptr_t seg) {
  unsigned shift = sm_segmap_shift_near(seg);
  return shift ? shift : sm_segmap_shift_far(seg);
}
SM_INLINE bool sm_segmap_contains(uintptr_t seg) { return sm_segmap_shift(seg) != 0; }
void sm_segmap_set(uintptr_t seg, unsigned shift);
void sm_segmap_set_pages(uintptr_t seg, unsigned shift, sm_page_t *pages);
bool sm_segmap_prepare(uintptr_t seg);   /* os.c */

SM_INLINE sm_segment_t *sm_ptr_segment(const void *p) {
  return (sm_segment_t *)((uintptr_t)p & ~SM_SEGMENT_MASK);
}
SM_INLINE sm_page_t *sm_segment_page_of(sm_segment_t *seg, const void *p) {
  return &seg->pages[((uintptr_t)p - (uintptr_t)seg) >> seg->page_shift];
}

/* ---- block starts ----------------------------------------------------------- */
/* Whether p - start is k * block_size with k < reserved, in one multiply
 * and one compare.  With d = block_size, mul = floor((2^64-1)/d) + 2, so
 * that d * mul = 2^64 + e with d <= e < 2d, and limit = reserved * e:
 * for an offset k*d + j (0 <= j < d) the product mod 2^64 is k*e + j*mul.
 * It is below limit exactly when j == 0 and k < reserved: for j > 0 it is
 * at least mul > 2^64/d, far above limit, and for an offset below start
 * it wraps to near 2^64.  This holds for any offset within +-4 MiB and
 * d <= 256 KiB (page.c asserts both ends). */
SM_INLINE bool sm_page_is_block(const sm_page_t *page, const void *p) {
  return ((uintptr_t)p - (uintptr_t)page->start) * page->mul < page->limit;
}
/* Whether link b of one of the page's lists may be followed: it points
 * among the page's blocks, give or take (limit is at most twice their
 * bytes).  Not NULL, not the static empty page's (limit 0), not into a
 * page descriptor (in the descriptor area or a segment's header), where
 * a page's key sits: a link written into freed memory to point there
 * would pass the tag check. */
SM_INLINE bool sm_page_link_ok(const sm_page_t *page, const sm_block_t *b) {
  return (uintptr_t)b - (uintptr_t)page->start < page->limit;
}
/* The two constants for blocks of bsize bytes, reserved of them. */
SM_INLINE void sm_block_test_consts(size_t bsize, size_t reserved, uint64_t *mul, uint64_t *limit) {
  uint64_t m = UINT64_MAX / bsize + 2;
  uint64_t e = (uint64_t)bsize * m;   /* mod 2^64: in [bsize, 2 * bsize) */
  *mul = m;
  *limit = (uint64_t)reserved * e;
}
void sm_page_set_geometry(sm_page_t *page, size_t bsize, size_t reserved);

/* ---- thread_free word ----------------------------------------------------- */
/* The head's offset in its segment (bits 4..31: blocks are 16-byte
 * aligned and a segment is 4 MiB) | SM_TF_FULL (bit 0) | the block count
 * << 32: the owner takes the whole list and its length with one exchange,
 * without walking it.  No bit of an address is packed away, so the word
 * works at any address width. */
#define SM_TF_FULL        ((uintptr_t)1)
#define SM_TF_COUNT_SHIFT 32
#define SM_TF_COUNT_ONE   ((uintptr_t)1 << SM_TF_COUNT_SHIFT)
#define SM_TF_OFF_MASK    (SM_SEGMENT_MASK & ~(uintptr_t)15)
_Static_assert(SM_SEGMENT_SHIFT <= SM_TF_COUNT_SHIFT, "a segment offset fits below the count");
_Static_assert(((uintptr_t)1 << SM_MEDIUM_SHIFT) / 16 < ((uintptr_t)1 << (64 - SM_TF_COUNT_SHIFT)),
               "a page's blocks fit the count");
/* The head block of thread_free value v of page (NULL for none: offset 0
 * is the segment header, never a block).  The segment is its blocks'
 * (start's line is the one free reads). */
SM_INLINE sm_block_t *sm_tf_ptr(const sm_page_t *page, uintptr_t v) {
  uintptr_t off = v & SM_TF_OFF_MASK;
  return off ? (sm_block_t *)(((uintptr_t)page->start & ~SM_SEGMENT_MASK) + off) : NULL;
}
/* What the word holds for head block b (NULL: 0). */
SM_INLINE uintptr_t sm_tf_off(const sm_block_t *b) { return (uintptr_t)b & SM_TF_OFF_MASK; }
SM_INLINE uint32_t sm_tf_count(uintptr_t v) { return (uint32_t)(v >> SM_TF_COUNT_SHIFT); }
SM_INLINE sm_block_t *sm_tf_head(sm_page_t *page, memory_order mo) {
  return sm_tf_ptr(page, atomic_load_explicit(&page->thread_free, mo));
}

/* ---- free-list encoding ------------------------------------------------ */
/* The secure build stores links xor the page's key.  The default build
 * stores them plain: a forged or stale link cannot make malloc hand out
 * anything but a block of the page that is tagged free (malloc checks
 * both), and the tag is the secret; encoding cost an xor on every malloc
 * and every free. */
#ifdef SM_SECURE
#define SM_LINK_KEY(page) ((page)->key)
#else
#define SM_LINK_KEY(page) ((void)(page), (uintptr_t)0)
#endif
SM_INLINE sm_block_t *sm_dec(const sm_page_t *page, sm_block_t *stored) {
  return (sm_block_t *)((uintptr_t)stored ^ SM_LINK_KEY(page));
}
SM_INLINE sm_block_t *sm_enc(const sm_page_t *page, sm_block_t *b) {
  return (sm_block_t *)((uintptr_t)b ^ SM_LINK_KEY(page));
}

/* ---- canaries (secure build) --------------------------------------------- */
SM_INLINE uint64_t *sm_canary_at(const sm_page_t *page, const void *b) {
  return (uint64_t *)((uint8_t *)b + page->block_size - 8);
}
SM_INLINE uint64_t sm_canary_value(const sm_page_t *page, const void *b) {
  return ((uintptr_t)b ^ page->key) * 0x9E3779B97F4A7C15ull;
}
SM_INLINE void sm_canary_set(const sm_page_t *page, void *b) {
  if (SM_CANARY) *sm_canary_at(page, b) = sm_canary_value(page, b);
}
SM_INLINE bool sm_canary_ok(const sm_page_t *page, const void *b) {
  return !SM_CANARY || *sm_canary_at(page, b) == sm_canary_value(page, b);
}
/* Secure build: the two words of a free block after its link and tag
 * (bytes 16-31; 16-23 in blocks of 32 bytes, whose usable part ends
 * there) hold a pattern made from the key, written when the block is
 * freed (or built) and checked when malloc takes it again, so a write
 * through a dangling pointer into a block's first 32 bytes is reported at
 * its next allocation.  Two words, no loop: in churn-b the secure build
 * takes 1.13 times the default build's time without the pattern, 1.35
 * with these two words, 2.2 with 64 bytes in a loop.
 * Not under valgrind (memcheck reports such writes itself, and the
 * library's own would look like them). */
SM_INLINE uint64_t sm_poison_value(const sm_page_t *page, const void *b) {
  return ~sm_canary_value(page, b);
}
SM_INLINE void sm_poison_set(const sm_page_t *page, void *b) {
  if (!SM_CANARY) return;
  uint64_t v = sm_poison_value(page, b), *w = b;
  w[2] = v;
  if (page->block_size >= 48) w[3] = v;
}
SM_INLINE bool sm_poison_ok(const sm_page_t *page, const void *b) {
  if (!SM_CANARY) return true;
  uint64_t v = sm_poison_value(page, b);
  const uint64_t *w = b;
  return w[2] == v && (page->block_size < 48 || w[3] == v);
}

/* The two words after a large or huge block's usable bytes (seg->block_size). */
SM_INLINE uint64_t *sm_large_canary_at(const sm_segment_t *seg, const void *b) {
  return (uint64_t *)((uint8_t *)b + seg->block_size);
}
SM_INLINE void sm_large_canary_set(const sm_segment_t *seg, const void *b) {
  if (!SM_CANARY) return;
  uint64_t *c = sm_large_canary_at(seg, b), v = sm_canary_value(&seg->pages[0], b);
  c[0] = v;
  c[1] = ~v;
}
SM_INLINE bool sm_large_canary_ok(const sm_segment_t *seg, const void *b) {
  if (!SM_CANARY) return true;
  const uint64_t *c = sm_large_canary_at(seg, b);
  uint64_t v = sm_canary_value(&seg->pages[0], b);
  return c[0] == v && c[1] == ~v;
}

/* ---- assertions -------------------------------------------------------- */
#ifndef SM_DEBUG
#define SM_DEBUG 1
#endif
SM_COLD void sm_assert_fail(const char *expr, const char *file, int line);
/* A call that fails with err: counted in calls_failed and traced (alloc.c). */
SM_COLD void sm_call_failed(sm_heap_t *heap, int err);
#define sm_assert(x) ((SM_DEBUG >= 1 && sm_unlikely(!(x))) ? sm_assert_fail(#x, __FILE__, __LINE__) : (void)0)
#define sm_assert_expensive(x) ((SM_DEBUG >= 2 && sm_unlikely(!(x))) ? sm_assert_fail(#x, __FILE__, __LINE__) : (void)0)

/* ---- alloc.c --------------------------------------------------------- */
void *sm_malloc_generic(size_t n, sm_heap_t *heap);
void *sm_calloc(size_t count, size_t size);
void *sm_realloc(void *p, size_t n, enum sm_call who);
void *sm_malloc_aligned(size_t alignment, size_t n);
size_t sm_usable_size(const void *p, const char *who);

/* The bytes a request of n needs from its size class: the secure build
 * adds the canary and keeps at least 16 usable bytes. */
SM_INLINE size_t sm_class_size(size_t n) {
  if (!SM_CANARY) return n;
  return (n < 16 ? 16 : n) + SM_CANARY;
}

/* A block leaves the free lists: its tag goes (it would make free think
 * the block may be free already, and it is the key), and in the secure
 * build its link too (the page's key xor an address: with two blocks'
 * addresses it gives the key away, and with it forged links, tags and
 * canaries).  The default build's link is a plain address, as free as
 * anything else a recycled block holds. */
SM_INLINE void sm_block_clear(sm_block_t *b) {
#ifdef SM_SECURE
  b->next = NULL;
#endif
  b->tag = 0;
}

/* A pointer that aligned allocation returned inside a block (not at its
 * start) has a mark in the word before it, the pointer xor the page's
 * key: free and realloc accept such a pointer only with its mark, so
 * free(q + 16) of an ordinary block q in a page that also holds aligned
 * blocks is reported, not taken for an aligned block.  Free clears it. */
SM_INLINE void sm_aligned_mark_set(const sm_page_t *page, void *p) {
  ((uintptr_t *)p)[-1] = (uintptr_t)p ^ page->key;
}
SM_INLINE bool sm_aligned_mark_ok(const sm_page_t *page, const void *p) {
  return ((const uintptr_t *)p)[-1] == ((uintptr_t)p ^ page->key);
}
SM_INLINE void sm_aligned_mark_clear(void *p) { ((uintptr_t *)p)[-1] = 0; }

/* ---- prof.c -------------------------------------------------------------- */
/* churn events by call site: the slow-path steps (SMALLOC_STEP_*, the swap
 * aside), then the OS calls */
enum { SM_PROF_OS_MMAP = SMALLOC_STEP_COUNT, SM_PROF_OS_MUNMAP, SM_PROF_OS_MADVISE, SM_PROF_OS_MREMAP,
       SM_PROF_EVENTS };
extern _Atomic int sm_prof_active;
void sm_prof_event_slow(int kind);
/* One test of a flag while the profiler is off. */
SM_INLINE void sm_prof_event(int kind) {
  if (sm_unlikely(atomic_load_explicit(&sm_prof_active, memory_order_relaxed))) sm_prof_event_slow(kind);
}
#define SM_PROF_MANY UINT64_MAX
void *sm_prof_sampled(sm_heap_t *heap, sm_page_t *page, void *b, size_t n);
void sm_prof_forget(sm_page_t *page, const void *b);
/* A page's sampled blocks as marks (page->prof_marks, prof.c): a block's
 * offset in 16-byte units, plus one, in a 16-bit lane (0: a free lane; a
 * medium page's last block is 2^15 units in, and SM_PROF_MANY has
 * 0xffff in every lane). */
#define SM_PROF_MARKS 4
#define SM_PROF_LANES 0x0001000100010001ull
_Static_assert(((uintptr_t)1 << SM_MEDIUM_SHIFT) / 16 < 0xffff, "a mark fits its lane");
SM_INLINE uint64_t sm_prof_mark(const sm_page_t *page, const void *b) {
  return (((uintptr_t)b - (uintptr_t)page->start) >> 4) + 1;
}
/* Whether block b of a page flagged SM_PAGE_SAMPLED may be one of its
 * samples: its mark is in a lane (a lane of marks ^ (the mark in every
 * lane) is 0), or the page has too many to mark.  Most frees into a
 * flagged page are of other blocks than its samples: they stop here,
 * with a few instructions on the page's line 2, which free reads anyway. */
SM_INLINE bool sm_prof_may_be_sample(const sm_page_t *page, const void *b) {
  uint64_t marks = atomic_load_explicit(&page->prof_marks, memory_order_relaxed);
  uint64_t x = marks ^ (sm_prof_mark(page, b) * SM_PROF_LANES);
  return marks == SM_PROF_MANY || ((x - SM_PROF_LANES) & ~x & (SM_PROF_LANES << 15)) != 0;
}
void sm_prof_page_unflag(sm_heap_t *heap, sm_page_t *page);
/* The owner, freeing into a page or refilling one: a page flagged for
 * its samples whose samples were all freed (by other threads too) is
 * unflagged.  Inline: the slow paths call it each time, profiling on or
 * off (a call each was 0.45 % of bench_longlived 1e5's instructions). */
SM_INLINE void sm_prof_page_check(sm_heap_t *heap, sm_page_t *page) {
  uint8_t flags = atomic_load_explicit(&page->flags, memory_order_relaxed);
  if (sm_unlikely(flags & SM_PAGE_SAMPLED) && atomic_load_explicit(&page->sampled, memory_order_acquire) == 0)
    sm_prof_page_unflag(heap, page);
}
void sm_prof_fork_child(void);
void sm_prof_init(void);
void sm_prof_init_late(void);
/* Set while smalloc allocates for itself: what the profiler allocates
 * is neither sampled nor churn (SM_PROF_QUIET); what glibc allocates for
 * the purge thread is not sampled, and the slow work it takes is the
 * churn of the call that started the thread (SM_PROF_NO_SAMPLE). */
enum { SM_PROF_NO_SAMPLE = 1, SM_PROF_NO_EVENT = 2, SM_PROF_QUIET = 3 };
extern __thread int sm_prof_busy __attribute__((tls_model("initial-exec")));
/* Turn off what bits say until sm_prof_hush_end(the value returned). */
SM_INLINE int sm_prof_hush(int bits) {
  int was = sm_prof_busy;
  sm_prof_busy = was | bits;
  return was;
}
SM_INLINE void sm_prof_hush_end(int was) { sm_prof_busy = was; }
void sm_prof_at_exit(void);
#ifdef EOF   /* <stdio.h> */
void sm_prof_print_top(FILE *out);
#endif
extern _Atomic uint64_t sm_prof_live_n;
/* A block of n bytes at p (page NULL above the size classes) was just
 * handed out, by malloc's fast path or another: count it down. */
SM_INLINE void *sm_prof_count(sm_heap_t *heap, sm_page_t *page, void *p, size_t n) {
  if (sm_unlikely(sm_cnt_sub_below0(heap->stats.prof_left, n))) return sm_prof_sampled(heap, page, p, n);
  return p;
}

/* The fast path: malloc is 23 instructions to its ret on x86-64 (gcc 12,
 * -O2; one of them the tag cleared, 4 the tag checked, 1 the branch of
 * the profiler's count-down), three unlikely branches besides the size
 * test.  It counts nothing in the page: used counts the free list's
 * blocks too (sm_page_t), so a block leaving it changes nothing.  The
 * increment of used it made before, with the owner's free's decrement
 * of the same word, took 18 % of bench_churn a's time (the ping-pong)
 * and 7-8 % of b-e's on a 2-core Xeon VM (medians of 7 interleaved
 * runs), for 3 instructions of the pair.  The first branch (4
 * instructions, as many as the same-segment test it replaced) catches
 * an empty list, the static empty heap (its page's limit is 0) and a
 * free-list link out of the page (corruption: a link written into freed
 * memory, even one aimed at the copy of the page's key in the segment
 * header; its start and limit are on the descriptor's second line,
 * beside the key: bench_churn f took 1.05 and 1.07 times the time of the
 * same-segment test, medians of 31 and 21 interleaved runs whose spreads
 * were 2 and 4 times as wide); the second a block that is not tagged
 * free, so that none is handed out twice; the third a profile sample due
 * (prof.c).  The first two are the free-list and double-free checks:
 * with --disable-checks malloc is 17 instructions (a NULL test, 2, in
 * place of the first; no second), 52 the pair with free's 22, where
 * mimalloc 3.4.3's is 55.1. */
SM_INLINE void *sm_malloc_small(sm_heap_t *heap, size_t n) {
  sm_page_t *page = heap->direct[(sm_class_size(n) + 15) >> 4];
  sm_block_t *b = page->free;
  if (sm_unlikely(SM_CHECK_FREE_LIST ? !sm_page_link_ok(page, b) : b == NULL)) return sm_malloc_generic(n, heap);
  /* a block on a list is tagged free (the key, or the key ^ SM_TAG_REMOTE
   * after a free by another thread); one that is not was handed out
   * already and must not be again (a double free after a stale write), or
   * was written after its free: the slow path reports it */
  if (SM_CHECK_DOUBLE_FREE && sm_unlikely((b->tag ^ page->key) > SM_TAG_REMOTE))
    return sm_malloc_generic(n, heap);
  if (SM_CANARY && sm_unlikely(!sm_poison_ok(page, b))) return sm_malloc_generic(n, heap);
  sm_block_t *next = sm_dec(page, b->next);
  page->free = next;
  __builtin_prefetch(next);     /* the next malloc's block: often cold, or another core's */
  sm_block_clear(b);
  sm_canary_set(page, b);
  return sm_prof_count(heap, page, b, n);   /* also the bytes requested */
}

/* Undo the pop of block b, just handed out by its page's owner (the
 * default build's; the secure build's blocks hold more): b heads the
 * page's free list again, tagged free, as it was. */
SM_INLINE void sm_page_unpop(sm_page_t *page, sm_block_t *b) {
  sm_assert(!SM_CANARY);
  b->next = sm_enc(page, page->free);
  b->tag = page->key;
  page->free = b;
}

/* malloc: the fast path for sizes the direct table serves */
SM_INLINE void *sm_malloc(size_t n) {
  sm_heap_t *heap = sm_heap();
  if (sm_likely(n <= SM_DIRECT_MAX - SM_CANARY)) return sm_malloc_small(heap, n);
  return sm_malloc_generic(n, heap);
}

/* ---- free.c ------------------------------------------------------------ */
void sm_free_generic(void *p, const char *who);
void sm_free_local_slow(sm_page_t *page, sm_block_t *b, void *p);
void sm_free_emptied(sm_page_t *page);
bool sm_free_is_double(sm_page_t *page, sm_block_t *b);
bool sm_block_is_free(sm_page_t *page, sm_block_t *b);
bool sm_lookup(const void *p, sm_segment_t **segp, sm_page_t **pagep);
bool sm_free_block_xthread(sm_page_t *page, sm_block_t *b);
void sm_free_push_remote(sm_page_t *page, sm_block_t *b);
bool sm_heap_hand_over(sm_heap_t *heap, sm_block_t *head, sm_block_t *tail, uint32_t n);
void sm_free_flush_remote(sm_heap_t *heap);
/* the purge thread sends an idle heap's batches (free.c): begin, mark
 * each heap, one barrier, send each marked one */
bool sm_free_steal_begin(void);
bool sm_free_steal_mark(sm_heap_t *heap);
bool sm_free_steal_barrier(void);
bool sm_free_steal_send(sm_heap_t *heap, bool ok);
void sm_free_steal_fork_child(void);
void sm_free_xthread(sm_heap_t *heap, sm_page_t *page, sm_block_t *b);
void sm_free_pending(sm_heap_t *heap, uint64_t *frees);
void sm_free_flagged(sm_page_t *page, void *p);
void sm_free_full(sm_page_t *page, void *p);

/* The owner frees block start p of its page (not on the full list, its
 * canary checked): pushed on the page's free list if it is the current
 * page, else on local_free, and the page retired if that emptied it; the
 * slow path checks a block whose tag says it may be free already, or
 * that heads the list (freed just before, its tag overwritten since). */
SM_INLINE void sm_free_owner_push(sm_page_t *page, void *p) {
  sm_block_t *b = (sm_block_t *)p;
  uintptr_t key = page->key;
  sm_poison_set(page, b);
  sm_block_t **list = sm_page_free_list(page);
  sm_block_t *head = *list;
  if (SM_CHECK_DOUBLE_FREE && sm_unlikely((b->tag ^ key) <= SM_TAG_REMOTE || head == b)) {
    sm_free_local_slow(page, b, p);
    return;
  }
  b->next = sm_enc(page, head);
  b->tag = key;
  sm_list_publish(list, b);
  /* a block back on the free list counts down free_pushes and leaves
   * used as it is (sm_page_t); one on local_free counts down used, and
   * the page may have emptied: let the slow path decide whether it
   * retires (a page on the full list has bit 0 in xtid and came the long
   * way).  free_pushes reaches 0 only after 2^32 pushes with no fold, and
   * a page it just pushed on has a free list. */
  if (sm_unlikely(--*sm_page_push_count(list) == 0) && page->free == NULL)
    sm_free_emptied(page);
}

/* free_sized(p, size), sized operator delete: free p, reporting a size
 * larger than its block holds (alloc.c); size 0 is free(p). */
void sm_free_sized_general(void *p, size_t size, const char *who);
/* The out-of-line free of p (size as sm_free_sized_inline's). */
SM_INLINE void sm_free_out(void *p, size_t size, const char *who) {
  if (size != 0) sm_free_sized_general(p, size, who);
  else sm_free_generic(p, who);
}

/* Free on the owner thread: 33 instructions to its ret on x86-64 (gcc 12,
 * -O2; 8 of them find the page in the page map, 1 loads the list the
 * block goes on, 2 compare that list's head with the block, 2 count the
 * push down, on whichever list), as many onto free as onto local_free;
 * with malloc's 23 and the loop, a malloc(32)+free pair is 69.0 under
 * callgrind (make bench-callgrind: a ping-pong that never leaves the fast
 * path, the block going back on the free list it came from).  No branch
 * depends on which list: one did (a block back on the free list skipped
 * the count), and where frees fall on a class's pages at random it was
 * mispredicted about every other time; larson (mimalloc-bench, one
 * thread, 5000 blocks of 8-1000 bytes) ran at 40 million operations a
 * second with it and 60 million without, on a 2-core Xeon VM.
 * Checks (all cheap): the pointer is in a segment, it starts a block, its
 * tag word holds neither the page's key nor the remote tag, and it is not
 * the block freed last in its page (else: a full double-free check in the
 * slow path).  With the size the program gave (sized delete, free_sized;
 * 0 for none, the test then folds away), also that the block holds that
 * many bytes: a load and a compare more (new and sized delete of 32
 * bytes: 75 under callgrind, new and unsized delete 70).  The block test
 * is the block-start check and the tag and head tests the double-free
 * check (5 and 6 instructions): with --disable-checks free is 22
 * instructions, and a pointer into none goes the long way by its xtid
 * of 0. */
SM_INLINE void sm_free_sized_inline(void *p, size_t size, const char *who) {
  uintptr_t slice = sm_pagemap_index(p);
  if (sm_unlikely(slice >= SM_PAGEMAP_SLICES)) { sm_free_out(p, size, who); return; }
  sm_page_t *page = sm_pagemap_at(slice);   /* none fails the block test below; its xtid is 0 */
  uintptr_t xtid = atomic_load_explicit(&page->xtid, memory_order_relaxed);
  sm_heap_t *heap = sm_heap();
  uintptr_t self = sm_heap_owner_id(heap);
  /* a block start: inside the page's blocks (not its segment header or
   * unused tail) and at a multiple of the block size */
  if (sm_unlikely((SM_CHECK_BLOCK_START && !sm_page_is_block(page, p)) || size > page->block_size - SM_CANARY)) {
    sm_free_out(p, size, who);
    return;
  }
  if (sm_unlikely(xtid != self)) {
    /* one of ours on the full list: counted towards bringing it back;
     * another thread's page: pushed on its thread_free; anything else
     * (flagged, abandoned, not in use, single) goes the long way */
    if ((xtid ^ self) == 1) sm_free_full(page, p);
    else if (xtid != 0) sm_free_xthread(heap, page, (sm_block_t *)p);
    else sm_free_flagged(page, p);
    return;
  }
  if (SM_CANARY && sm_unlikely(!sm_canary_ok(page, (sm_block_t *)p))) { sm_free_generic(p, who); return; }
  sm_free_owner_push(page, p);
}
SM_INLINE void sm_free_inline(void *p) { sm_free_sized_inline(p, 0, "free"); }

/* ---- page.c / page-queue.c ------------------------------------------ */
sm_page_t *sm_page_find(sm_heap_t *heap, size_t bin);
bool sm_page_lends_large(sm_heap_t *heap, size_t bin);
void sm_heap_heartbeat(sm_heap_t *heap);
void sm_page_free_delayed(sm_heap_t *heap, sm_page_t *page, sm_block_t *b);
void sm_heap_collect_delayed(sm_heap_t *heap);
void sm_heap_close_delayed(sm_heap_t *heap);
void sm_heap_claim_retired(sm_heap_t *owner, sm_heap_t *self);
void sm_heap_release_stale(sm_heap_t *owner, sm_heap_t *self, uint64_t now, uint64_t delay);
void sm_heap_reclaim_all(sm_heap_t *heap);
bool sm_heap_has_retired(sm_heap_t *heap);
bool sm_heap_decommit(sm_heap_t *heap, bool all);
bool sm_heap_shared_tidy(bool all);
bool sm_page_has_free(sm_page_t *page);
void sm_page_corrupt(sm_page_t *page, const char *what, const void *b);
uint32_t sm_page_free_count(const sm_page_t *page, uint32_t most);
/* The blocks on the page's free list, counted by walking it
 * (sm_page_free_count; no walk when it is empty).  The first page of a
 * class has a free list, and a page behind it that took blocks other
 * threads sent as one (sm_page_collect_thread_free); the slow path finds
 * the first's empty, and the callers that know how long a list is do not
 * walk it. */
SM_INLINE uint32_t sm_page_on_free(const sm_page_t *page) {
  return page->free == NULL ? 0 : sm_page_free_count(page, page->used);
}
/* The blocks of the page handed out and not freed (those on its
 * thread_free count until collected): used less the free list's. */
SM_INLINE uint32_t sm_page_live(const sm_page_t *page) { return page->used - sm_page_on_free(page); }
/* Whether the page holds no live block, on_free blocks on its free
 * list, unless a corrupted free list was found in it (a block freed
 * twice, which used counted twice), after which it is never emptied,
 * retired or released. */
SM_INLINE bool sm_page_vacant_with(const sm_page_t *page, uint32_t on_free) {
  return page->used == on_free && !(atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_CORRUPT);
}
/* The same, the free list counted (sm_page_on_free). */
SM_INLINE bool sm_page_vacant(const sm_page_t *page) { return sm_page_vacant_with(page, sm_page_on_free(page)); }
bool sm_page_valid(const sm_page_t *page);
void sm_page_init(sm_heap_t *heap, sm_segment_t *seg, sm_page_t *page, size_t bin);
void sm_page_retire(sm_heap_t *heap, sm_page_t *page);
bool sm_page_release(sm_heap_t *heap, sm_page_t *page);
uint32_t sm_page_collect_thread_free(sm_page_t *page);
bool sm_page_collect_vacant(sm_page_t *page);
void sm_page_fold_stats(sm_heap_t *heap, sm_page_t *page);
bool sm_page_to_full(sm_heap_t *heap, sm_page_t *page);
void sm_page_unfull_locked(sm_heap_t *heap, sm_page_t *page);
void sm_page_owner_freed_locked(sm_heap_t *heap, sm_page_t *page);
void sm_heap_wake_full(sm_heap_t *heap);
uint64_t sm_heap_claim_full(sm_heap_t *owner, sm_heap_t *self);
void sm_heap_unfull_all(sm_heap_t *heap);
void sm_page_set_flags(sm_page_t *page, uint8_t flags, uintptr_t tid);
void sm_page_set_sampled(sm_page_t *page, sm_heap_t *heap, bool on);
void sm_page_set_owner(sm_page_t *page, sm_heap_t *heap);
void sm_page_donate(sm_heap_t *heap, sm_page_t *page, bool orphan);
bool sm_page_claim(sm_heap_t *heap, sm_page_t *page);
bool sm_page_clear(sm_page_t *page);   /* false: kept, corrupted (page.c) */
void sm_heap_collect_retired(sm_heap_t *heap, bool force);
void sm_pq_push_back(sm_heap_t *heap, size_t qi, sm_page_t *page);
void sm_pq_push_front(sm_heap_t *heap, size_t qi, sm_page_t *page);
void sm_page_free_to_local(sm_page_t *page);
void sm_pq_remove(sm_heap_t *heap, size_t qi, sm_page_t *page);
void sm_pq_update_direct(sm_heap_t *heap, size_t bin);
void sm_pq_first_refilled(sm_heap_t *heap, sm_page_t *page);
void sm_pq_reopen(sm_heap_t *heap, sm_page_t *page);

/* ---- segment.c ---------------------------------------------------------- */
sm_segment_t *sm_segment_map(void);
void sm_segment_unmap(sm_segment_t *seg);
unsigned sm_segment_advise(sm_segment_t *seg, unsigned halves);
void sm_segment_unadvise(sm_segment_t *seg, unsigned halves);
size_t sm_segment_page_len(const sm_segment_t *seg, const sm_page_t *page);
uint8_t *sm_segment_page_start(sm_segment_t *seg, const sm_page_t *page);
sm_page_t *sm_segment_page_alloc(sm_heap_t *heap, int kind, bool *new_segment);
void sm_segment_page_free_locked(sm_heap_t *heap, sm_segment_t *seg, sm_page_t *page);
bool sm_segment_decommit_free_locked(sm_heap_t *heap, uint64_t now, uint64_t delay);
bool sm_segment_decommit_abandoned(uint64_t now, uint64_t delay);
void sm_segment_abandon_heap(sm_heap_t *heap);
sm_segment_t *sm_segment_reclaim_one(sm_heap_t *heap, int kind);
bool sm_segment_page_free_abandoned(sm_segment_t *seg, sm_page_t *page);
void sm_segment_cache_collect(bool force);
void sm_segment_cache_purge_all(uint64_t stamp);
bool sm_segment_cache_pending(void);
bool sm_segment_cache_wants_purge(void);
void sm_segment_fork_child(void);
bool sm_segments_purge_open(bool all);
uint64_t sm_clock_ms(void);
extern uint64_t sm_start_ms;
uint64_t sm_heap_random(sm_heap_t *heap);

/* ---- pool.c: pages given to the process, and pages sent home ------------ */
void sm_pool_push(sm_page_t *page);
sm_page_t *sm_pool_pop(size_t bin, uint32_t min, uint32_t part);
void sm_pool_collect(sm_heap_t *self);
void sm_pool_emptied(sm_page_t *page, uint32_t mark);
/* A free pushed onto the thread_free of page, which made it v: a page
 * waiting in the pool whose live blocks are all there now moves to the
 * pool's front (pool.c: sm_pool_emptied).  Two relaxed loads of the line
 * the push wrote, no call, for any other page. */
SM_INLINE void sm_pool_freed_into(sm_page_t *page, uintptr_t v) {
  uint32_t mark = atomic_load_explicit(&page->pooled, memory_order_relaxed);
  if (sm_unlikely(mark != 0) && sm_tf_count(v) == atomic_load_explicit(&page->pool_live, memory_order_relaxed))
    sm_pool_emptied(page, mark);
}
bool sm_pool_take(sm_page_t *page);
bool sm_pool_purge(uint64_t now, uint64_t delay);
void sm_page_gate_open(sm_page_t *page);
void sm_page_unpurge(sm_page_t *page);
bool sm_page_purge_open(sm_page_t *page, bool all);
void sm_page_gate_fork_child(sm_heap_t *heap);
void sm_pool_fork_child(void);
void sm_page_send_home(sm_page_t *page);
void sm_heap_take_home(sm_heap_t *heap);
void sm_heap_close_home(sm_heap_t *heap);
extern _Atomic uint64_t sm_heaps_live;   /* heaps of live threads (heap.c) */

/* ---- span.c: large blocks in shared segments ------------------------- */
bool sm_span_serves(size_t n, size_t alignment);
void *sm_span_alloc(size_t n, bool *zeroed);
void *sm_span_alloc_sample(size_t n);
void sm_span_free(sm_segment_t *seg, sm_page_t *page);
bool sm_span_grow(sm_segment_t *seg, sm_page_t *page, size_t n);
void sm_span_collect(bool force);
size_t sm_span_unpurged(void);
void sm_span_fork_child(void);

/* ---- huge.c ----------------------------------------------------------- */
void *sm_huge_alloc(size_t n, size_t alignment, bool zero, bool *zeroed);
void sm_huge_free(sm_segment_t *seg);
void sm_huge_cache_collect(bool force);
size_t sm_huge_cache_unpurged(void);
void sm_huge_fork_child(void);
void *sm_huge_realloc(sm_segment_t *seg, void *p, size_t n);

/* ---- fork.c ---------------------------------------------------------------- */
void sm_fork_init(void);
bool sm_fork_mutex_was_held(pthread_mutex_t *m);
bool sm_fork_lock_was_held(sm_lock_t *l);

/* ---- heap.c -------------------------------------------------------------- */
sm_heap_t *sm_heap_init_thread(void);
void sm_heap_thread_done(void *arg);
void sm_process_init(void);
extern _Atomic int sm_process_ready;
void sm_heaps_lock(void);
void sm_heaps_unlock(void);
void sm_heaps_fork_child(void);
sm_heap_t *sm_heaps_first(void);
bool sm_heaps_watched_notices(void);
bool sm_collect_process(sm_heap_t *self);
bool sm_heaps_parked_expire(uint64_t now, bool all);
bool sm_heaps_pool_purge(uint64_t now, uint64_t delay);
bool sm_heaps_parked_any(void);
void sm_heaps_fold_parked(void);

/* ---- os.c: the only file that talks to the kernel about memory --------- */
/* Each returns 0 or an errno value, and leaves errno as it found it. */
int sm_os_map(size_t size, void **out);
int sm_os_map_aligned(size_t size, size_t alignment, size_t pre, void **out);
int sm_os_unmap(void *p, size_t size);
int sm_os_purge(void *p, size_t size);
int sm_os_hugepage(void *p, size_t size);
int sm_os_nohugepage(void *p, size_t size);
bool sm_os_space_limited(void);
void sm_os_limit_forget(void);
bool sm_os_holes(void);
uint64_t sm_os_unmapped(void);
size_t sm_os_read_file(const char *path, char *buf, size_t cap);
void sm_os_space_short(void);
int sm_os_map_hole(void *p, size_t size);
bool sm_os_thp_always(void);
int sm_os_protect(void *p, size_t size, bool accessible);
int sm_os_remap(void *p, size_t old_size, size_t new_size, size_t alignment, size_t pre, void **out);
void sm_os_random(void *buf, size_t len);
/* where the next segment-aligned mapping is tried first: just past the
 * last one (the kernel takes the hint when the range is free) */
extern _Atomic uintptr_t sm_os_hint;

/* ---- stats.c ------------------------------------------------------------ */
void sm_stats_fold_heap(sm_heap_t *heap);
void sm_stats_with(void (*fn)(const smalloc_stats_t *s, void *arg), void *arg);
void sm_stats_orphan_add(size_t offset, uint64_t n);
/* the smalloc command (tools/smalloc.c): a report's table from a filled
 * struct, sums, and a JSON report read back */
void sm_stats_format(const smalloc_stats_t *s, const char *who, uint64_t resident,
                     const char *resident_of, FILE *out);
void sm_stats_sum(smalloc_stats_t *dst, const smalloc_stats_t *src);
bool sm_stats_parse_json(const char *text, smalloc_stats_t *s, char *program, size_t cap,
                         uint64_t *resident);
/* The peaks follow counts that the heaps publish.  A heap adds each
 * change of its blocks in use (a page's counts folded, a batch of frees
 * of another thread's blocks sent) to its own per-class tally and to its
 * net bytes.  It adds the net bytes to the process-wide
 * sm_gstats.small_live whenever they come to SM_PUB_BYTES either way, and
 * its tally to class_live once SM_PUB_CHURN's worth of changes came
 * whatever their net, and at its exit.  A publication that raises a count
 * raises its peak, and a large or huge block raises bytes_in_use_peak as
 * it is allocated.  So the peaks miss no thread: the bytes they follow
 * may differ from the exact figure (a read's) by under SM_PUB_BYTES per
 * live thread, a class's blocks by SM_PUB_CHURN's worth, plus the blocks
 * each thread's pages handed out or took back since their counts were
 * last folded and the blocks of its batches not yet sent
 * (smalloc_stats(3) says when).  With the tally added at
 * every 64 KiB of changes (a scan of it and an atomic add per class),
 * publishing took 3.5 % of bench_server's time (perf samples), whose
 * threads free each other's blocks of 16 B-32 KiB in many classes; now
 * 1.3 %, 0.4 % of its instructions.
 * (Sampling every live heap's counters instead cost a sum over all
 * threads: sampled at every 8th growth of each heap, 4,000 threads that
 * each allocated one block in 60 classes ran 1.8 s, 0.90 s with no
 * samples; sampled less often, 64 threads that each held 2 MiB showed a
 * peak of 3.6 MiB.) */
#define SM_PUB_BYTES ((int64_t)64 << 10)
#define SM_PUB_CHURN ((int64_t)1 << 20)
void sm_stats_publish(sm_heap_t *heap);
void sm_stats_class_publish(size_t bin, int64_t blocks);
void sm_stats_peak_large(void);
/* A new heap has nothing to publish. */
SM_INLINE void sm_stats_pub_reset(sm_heap_t *heap) {
  heap->pub_room = SM_PUB_BYTES;
  heap->pub_due = SM_PUB_CHURN;
}
/* blocks more blocks of class bin (bsize bytes each) in use, fewer when
 * negative, folded from a page's counts into heap, or published at once
 * for a thread without one (its counts are the orphan totals) */
SM_INLINE void sm_stats_class_changed(sm_heap_t *heap, size_t bin, int64_t blocks, uint32_t bsize) {
  if (sm_unlikely(!heap->initialized)) {
    sm_stats_class_publish(bin, blocks);
    return;
  }
  int64_t bytes = blocks * (int64_t)bsize;
  heap->class_unpub[bin] += (int32_t)blocks;
  heap->pub_room += bytes;
  heap->pub_due -= bytes < 0 ? -bytes : bytes;
  if ((uint64_t)heap->pub_room > 2 * SM_PUB_BYTES || heap->pub_due < 0) sm_stats_publish(heap);
}
/* n blocks of class bin that a thread freed into pages it does not own,
 * counted as their batch is sent (free.c), by the thread that sends it
 * (heap: its own, or one not initialized: the orphan counts): once a
 * batch, not at each remote free, whose leaf then makes no call and
 * touches none of the heap's counters (bench_churn f: 0.82 of the time,
 * medians of 21 interleaved runs). */
SM_INLINE void sm_stats_free_remote(sm_heap_t *heap, size_t bin, uint32_t n) {
  SM_COUNT(heap, class_frees[bin], n);
  sm_stats_class_changed(heap, bin, -(int64_t)n, (uint32_t)sm_bin_size(bin));
}
void sm_stats_thread_exit(sm_heap_t *heap);
void sm_stats_publish_all(sm_heap_t *heap);
void sm_stats_at_exit(void);
void sm_stats_open_fd(void);
#define SM_STATS_FILE_MAX 256   /* SMALLOC_STATS_FILE, SMALLOC_PROF_DUMP, their NUL included */
void sm_stats_set_file(const char *path);   /* shorter than SM_STATS_FILE_MAX */
void sm_prof_set_dump(const char *path);    /* shorter than SM_STATS_FILE_MAX */
/* A path of SMALLOC_STATS_FILE or SMALLOC_PROF_DUMP with "%p" replaced by
 * the process id and "%%" by a percent sign, into out (diag.c). */
void sm_path_expand(const char *pattern, char *out, size_t cap);
void sm_stats_fork_child(void);

/* ---- background.c: the purge thread ------------------------------------ */
/* Bytes waiting to be given back above which a purge thread is started. */
#define SM_BG_THRESHOLD ((uint64_t)8 << 20)
/* Full pages of one heap that other threads have freed into and that it
 * has not taken back, above which a purge thread is wanted: 8 MiB of
 * small pages. */
#define SM_BG_NOTICES 128
void sm_background_wake(void);
void sm_background_want(void);
/* The purge delay in force at now (sm_clock_ms()): SMALLOC_PURGE_DELAY,
 * lengthened while memory given back is soon used again (background.c). */
uint64_t sm_purge_delay(uint64_t now);
/* Whether what became unused at `since` has been so for `delay` ms at
 * now (a `since` read after now is not). */
SM_INLINE bool sm_aged(uint64_t now, uint64_t since, uint64_t delay) {
  return now >= since && now - since >= delay;
}
/* The stamp of memory given back at now because it was unused for
 * `delay` ms: now, or 0 when the delay did not decide (trim, a delay of
 * 0), which sm_purge_reused ignores. */
SM_INLINE uint64_t sm_purge_stamp(uint64_t now, uint64_t delay) { return delay ? now : 0; }
/* Memory given back with that stamp comes into use again. */
void sm_purge_reused(uint64_t stamp);
void sm_purge_delay_reset(void);
/* the purge thread: none, awake (or being started), parked until woken,
 * parked for a purge delay, being stopped (background.c) */
enum { SM_BG_NONE = 0, SM_BG_AWAKE = 1, SM_BG_PARKED = 2, SM_BG_DOZING = 3, SM_BG_EXITING = 4 };
extern _Atomic int sm_bg_state;
/* Something the purge thread looks after while it is awake began (a batch
 * of remote frees: the thread that holds it may go idle), made visible
 * by the caller first: wake the thread if it is parked.  The work before
 * the look at the thread, as the thread looks for work after it parks
 * (sm_background_wake): else each could miss the other. */
SM_INLINE void sm_background_nudge(void) {
  atomic_thread_fence(memory_order_seq_cst);
  if (sm_unlikely(atomic_load_explicit(&sm_bg_state, memory_order_relaxed) == SM_BG_PARKED))
    sm_background_wake();
}
void sm_background_act(bool from_free);
void sm_background_last_thread(void);
void sm_background_fork_child(void);
long sm_background_aside(long nr, long a, long b);
bool sm_background_stop(void);
/* What the end of a malloc or free is asked to do, where the caller holds
 * no lock and no page state: start the purge thread, print a report */
#define SM_WANT_PURGE_THREAD 1
#define SM_WANT_REPORT 2
extern _Atomic int sm_bg_wanted;
void sm_stats_tick(void);
void sm_stats_periodic(void);
/* At the end of a malloc slow path (or a call such as smalloc_collect):
 * start the purge thread that was asked for meanwhile
 * (sm_background_wake), print the report that came due (sm_stats_tick). */
SM_INLINE void sm_background_poll(void) {
  if (sm_unlikely(atomic_load_explicit(&sm_bg_wanted, memory_order_relaxed) != 0)) sm_background_act(false);
}
/* The same at the end of a free slow path, which starts no thread in a
 * process that has had others (sm_background_act). */
SM_INLINE void sm_background_poll_free(void) {
  if (sm_unlikely(atomic_load_explicit(&sm_bg_wanted, memory_order_relaxed) != 0)) sm_background_act(true);
}

/* ---- options.c ---------------------------------------------------------- */
void sm_options_init(void);
void sm_options_print(void);
void sm_options_print_json(FILE *out);
size_t sm_retire_cycles_for(size_t block_size);

/* ---- diag.c: one printer, never allocates -------------------------------- */
void sm_message(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
SM_COLD void sm_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
bool sm_errors_seen(void);   /* a misuse was reported (and the process went on) */

#pragma GCC visibility pop

#endif /* SM_INTERNAL_H */
