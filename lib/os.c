/* The OS contract: the only file that calls mmap, munmap, madvise and
 * mremap.  Every function returns 0 or an errno value and leaves errno as
 * it found it, so free() never changes errno.  Every call is counted. */
#include "internal.h"
#include "probes.h"

#include <fcntl.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <unistd.h>

static void sm_mapped_only_add(size_t n) {
  uint64_t now = sm_gadd(bytes_mapped, n) + n;
  uint64_t peak = atomic_load_explicit(&sm_gstats.bytes_mapped_peak, memory_order_relaxed);
  while (now > peak &&
         !atomic_compare_exchange_weak_explicit(&sm_gstats.bytes_mapped_peak, &peak, now,
                                                memory_order_relaxed, memory_order_relaxed)) {
  }
}

static void sm_mapped_add(size_t n) {
  sm_mapped_only_add(n);
  sm_gadd(bytes_committed, n);
}

/* The four calls, each counted and traced (smalloc(7), TRACEPOINTS) in
 * one place. */
static void *sm_sys_mmap(void *hint, size_t size, int prot, int flags) {
  sm_gadd(os_mmap, 1);
  sm_prof_event(SM_PROF_OS_MMAP);
  void *p = mmap(hint, size, prot, MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0);
  SM_PROBE(os_mmap, p, size);
  if (p == MAP_FAILED && errno == ENOMEM) sm_os_limit_forget();
  return p;
}

static int sm_sys_munmap(void *p, size_t size) {
  sm_gadd(os_munmap, 1);
  sm_prof_event(SM_PROF_OS_MUNMAP);
  SM_PROBE(os_munmap, p, size);
  return munmap(p, size);
}

static int sm_sys_madvise(void *p, size_t size, int advice) {
  sm_gadd(os_madvise, 1);
  sm_prof_event(SM_PROF_OS_MADVISE);
  SM_PROBE(os_madvise, p, size, advice);
  return madvise(p, size, advice);
}

static void *sm_sys_mremap(void *p, size_t old_size, size_t new_size, int flags, void *to) {
  sm_gadd(os_mremap, 1);
  sm_prof_event(SM_PROF_OS_MREMAP);
  void *q = mremap(p, old_size, new_size, flags, to);
  SM_PROBE(os_mremap, p, q, new_size);
  if (q == MAP_FAILED && errno == ENOMEM) sm_os_limit_forget();
  return q;
}

/* ---- the segment map's storage (internal.h) ------------------------------ */
uintptr_t sm_segmap_base = SM_SEGMAP_NO_BASE;
_Atomic uint8_t sm_segmap_window[SM_SEGMAP_WINDOW];
uintptr_t sm_pagemap_base = SM_SEGMAP_NO_BASE;
sm_pagemap_t sm_pagemap __attribute__((aligned(64)));
_Atomic(sm_segmap_mid_t *) sm_segmap_root[SM_SEGMAP_ROOTS];

/* The table at *slot (a mid table or a leaf of size bytes), mapped and
 * installed if there is none yet; two threads racing keep the first.
 * NULL when it cannot be mapped. */
static void *sm_segmap_table(_Atomic(void *) *slot, size_t size) {
  void *t = atomic_load_explicit(slot, memory_order_acquire);
  if (t) return t;
  void *fresh = sm_sys_mmap(NULL, size, PROT_READ | PROT_WRITE, 0);
  if (fresh == MAP_FAILED) return NULL;
  if (atomic_compare_exchange_strong_explicit(slot, &t, fresh, memory_order_acq_rel, memory_order_acquire))
    return fresh;
  sm_sys_munmap(fresh, size);
  return t;
}

/* The base of a window size long, placed around at by the first caller
 * (in segments for the segment map, in bytes for the page map); two
 * threads racing keep the first. */
static uintptr_t sm_window_place(uintptr_t *base_var, uintptr_t at, uintptr_t size) {
  uintptr_t base = __atomic_load_n(base_var, __ATOMIC_RELAXED);
  if (base != SM_SEGMAP_NO_BASE) return base;
  uintptr_t want = at > size / 2 ? at - size / 2 : 0;
  if (__atomic_compare_exchange_n(base_var, &base, want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    return want;
  return base;   /* another thread placed it */
}

/* Every mapping that may hold a segment header (segment-aligned) gets a
 * place in the map for its first unit before it is handed out: the first
 * one places the window around itself; beyond the window, the mid table
 * and leaf for the unit are mapped.  False when the address is beyond the
 * map or a table cannot be mapped, and the caller then gives the mapping
 * back.  Tables stay for the life of the process. */
bool sm_segmap_prepare(uintptr_t seg) {
  uintptr_t unit = seg >> SM_SEGMENT_SHIFT;
  /* the page map's window starts at a segment: a segment is in it whole, or not at all */
  sm_window_place(&sm_pagemap_base, seg, SM_PAGEMAP_SLICES << SM_PAGEMAP_SHIFT);
  uintptr_t base = sm_window_place(&sm_segmap_base, unit, SM_SEGMAP_WINDOW);
  if (unit - base < SM_SEGMAP_WINDOW) return true;
  uintptr_t r = sm_segmap_root_of(unit);
  if (r >= SM_SEGMAP_ROOTS) return false;
  sm_segmap_mid_t *mid = sm_segmap_table((_Atomic(void *) *)&sm_segmap_root[r], sizeof(sm_segmap_mid_t));
  if (mid == NULL) return false;
  return sm_segmap_table((_Atomic(void *) *)&(*mid)[sm_segmap_mid_of(unit)], SM_SEGMAP_LEAF_SIZE) != NULL;
}

int sm_os_map(size_t size, void **out) {
  int saved = errno;
  void *p = sm_sys_mmap(NULL, size, PROT_READ | PROT_WRITE, 0);
  int err = (p == MAP_FAILED) ? errno : 0;
  errno = saved;
  if (err) return err;
  sm_mapped_add(size);
  *out = p;
  return 0;
}

/* Where the next aligned mapping is tried first: just past the last one,
 * which is aligned whenever the last one was. */
_Atomic uintptr_t sm_os_hint;

/* In a range of size + alignment bytes at raw: the place where a block of
 * size bytes has (place + pre) aligned. */
static uintptr_t sm_os_aligned_in(const uint8_t *raw, size_t alignment, size_t pre) {
  uintptr_t want = (((uintptr_t)raw + pre + alignment - 1) & ~(uintptr_t)(alignment - 1)) - pre;
  return want < (uintptr_t)raw ? want + alignment : want;
}

/* Unmap the range of total bytes at raw around the size bytes at want. */
static void sm_os_trim_around(uint8_t *raw, size_t total, uintptr_t want, size_t size) {
  size_t head = want - (uintptr_t)raw, tail = total - head - size;
  if (head) sm_sys_munmap(raw, head);
  if (tail) sm_sys_munmap((uint8_t *)want + size, tail);
}

/* Map exactly size bytes at an aligned hint; the kernel takes the hint
 * when that range is free, so most segments cost one mmap and no more
 * address space than their size (a program under RLIMIT_AS can use nearly
 * all of it).  Returns the mapping or NULL. */
static void *sm_os_map_at_hint(size_t size, size_t alignment, size_t pre) {
  uintptr_t hint = atomic_load_explicit(&sm_os_hint, memory_order_relaxed);
  if (hint == 0 || pre != 0 || ((hint + pre) & (alignment - 1)) != 0) return NULL;
  void *p = sm_sys_mmap((void *)hint, size, PROT_READ | PROT_WRITE, 0);
  if (p == MAP_FAILED) return NULL;
  if ((((uintptr_t)p + pre) & (alignment - 1)) != 0 ||
      (alignment >= SM_SEGMENT_SIZE && !sm_segmap_prepare((uintptr_t)p))) {
    sm_sys_munmap(p, size);
    return NULL;
  }
  return p;
}

/* Map size bytes such that (result + pre) is aligned to alignment: at the
 * hint, else by mapping size + alignment and trimming both ends. */
static int sm_os_map_aligned_once(size_t size, size_t alignment, size_t pre, void **out) {
  int saved = errno;
  void *at = sm_os_map_at_hint(size, alignment, pre);
  if (at != NULL) {
    errno = saved;
    atomic_store_explicit(&sm_os_hint, (uintptr_t)at + ((size + alignment - 1) & ~(alignment - 1)),
                          memory_order_relaxed);
    sm_mapped_add(size);
    *out = at;
    return 0;
  }
  size_t total = size + alignment;
  if (total < size) return ENOMEM;
  uint8_t *raw = sm_sys_mmap(NULL, total, PROT_READ | PROT_WRITE, 0);
  if (raw == MAP_FAILED) { int err = errno; errno = saved; return err; }
  uintptr_t want = sm_os_aligned_in(raw, alignment, pre);
  sm_os_trim_around(raw, total, want, size);
  if (alignment >= SM_SEGMENT_SIZE && !sm_segmap_prepare(want)) {
    sm_sys_munmap((void *)want, size);
    errno = saved;
    return ENOMEM;
  }
  errno = saved;
  if (pre == 0)
    atomic_store_explicit(&sm_os_hint, want + ((size + alignment - 1) & ~(alignment - 1)), memory_order_relaxed);
  sm_mapped_add(size);
  *out = (void *)want;
  return 0;
}

/* The same, tried again after a yield, up to SM_MAP_RETRIES times, when
 * it fails under an address-space limit: there it can fail for a moment
 * only, while another thread's aligned mapping holds size + alignment
 * before it trims it.  256 threads each mapping a block of 100,000 bytes,
 * under a limit 56 MiB above the 48 MiB they need, got NULL from malloc
 * in 2 runs of 10; none in 10 with the retries.  Every aligned mapping
 * comes here: segments, large and huge blocks. */
#define SM_MAP_RETRIES 3
int sm_os_map_aligned(size_t size, size_t alignment, size_t pre, void **out) {
  int err = sm_os_map_aligned_once(size, alignment, pre, out);
  for (int i = 0; err == ENOMEM && i < SM_MAP_RETRIES && sm_os_space_limited(); i++) {
    sched_yield();
    err = sm_os_map_aligned_once(size, alignment, pre, out);
  }
  return err;
}

/* The start of a small file (a /proc one) in buf, NUL-terminated, without
 * allocating: the bytes read, 0 when it could not be read. */
size_t sm_os_read_file(const char *path, char *buf, size_t cap) {
  int saved = errno;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  ssize_t n = fd < 0 ? -1 : read(fd, buf, cap - 1);
  if (fd >= 0) close(fd);
  errno = saved;
  buf[n > 0 ? n : 0] = '\0';
  return n > 0 ? (size_t)n : 0;
}

/* Bytes given back with sm_os_unmap so far (not the trims of an aligned
 * mapping, which another thread's malloc makes on the way to holding
 * more): whether any came back while an allocation failed. */
static _Atomic uint64_t sm_os_unmapped_bytes;

uint64_t sm_os_unmapped(void) { return atomic_load_explicit(&sm_os_unmapped_bytes, memory_order_relaxed); }

int sm_os_unmap(void *p, size_t size) {
  int saved = errno;
  int err = sm_sys_munmap(p, size) ? errno : 0;
  errno = saved;
  if (!err) {
    sm_gsub(bytes_mapped, size);
    atomic_fetch_add_explicit(&sm_os_unmapped_bytes, size, memory_order_relaxed);
  }
  return err;
}

/* madvise, errno kept: 0 or the error. */
static int sm_os_advise(void *p, size_t size, int advice) {
  int saved = errno;
  int err = sm_sys_madvise(p, size, advice) ? errno : 0;
  errno = saved;
  return err;
}

/* Give the memory back but keep the mapping: it reads as zero afterwards. */
int sm_os_purge(void *p, size_t size) {
  int err = sm_os_advise(p, size, MADV_DONTNEED);
  if (!err) sm_gadd(bytes_purged, size);
  return err;
}

/* Whether the process runs under an address-space limit (RLIMIT_AS),
 * where every byte of address space counts.  The limit is read again once
 * SM_LIMIT_TTL_MS have passed since the last reading, at once after the
 * OS refused a mapping (ENOMEM: the limit may be new, sm_sys_mmap) and in
 * the child of a fork: huge blocks ask on every call, and a getrlimit
 * each was the one system call of a program that replaces blocks of
 * 2 MiB and more (mimalloc-bench's malloc-large: 2,001 for its 2,000
 * allocations). */
#define SM_LIMIT_TTL_MS 100
static _Atomic uint64_t sm_os_limit_at;   /* sm_clock_ms() + 1 at the last reading; 0: none */
static _Atomic bool sm_os_limit_was;

bool sm_os_space_limited(void) {
  uint64_t now = sm_clock_ms() + 1;
  uint64_t at = atomic_load_explicit(&sm_os_limit_at, memory_order_acquire);
  if (at != 0 && now - at < SM_LIMIT_TTL_MS) return atomic_load_explicit(&sm_os_limit_was, memory_order_relaxed);
  int saved = errno;
  struct rlimit rl;
  bool limited = getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY;
  errno = saved;
  atomic_store_explicit(&sm_os_limit_was, limited, memory_order_relaxed);
  atomic_store_explicit(&sm_os_limit_at, now, memory_order_release);
  return limited;
}

/* The next sm_os_space_limited reads the limit. */
void sm_os_limit_forget(void) { atomic_store_explicit(&sm_os_limit_at, 0, memory_order_relaxed); }

/* Whether free pages inside segments give their address space back
 * (segment.c: holes), not only their memory: from the first allocation
 * the OS refused under an address-space limit on (sm_os_space_short).
 * A page given back with madvise stays mapped, and under the limit
 * mapped bytes are what runs out: 50 threads with 450 MiB live failed
 * under a 3 GiB limit with 1.1 GiB of such pages.  Not before: each hole
 * costs an mmap when its page is used again, and splits its mapping in
 * the kernel's count of them. */
static _Atomic bool sm_os_short;

bool sm_os_holes(void) { return atomic_load_explicit(&sm_os_short, memory_order_relaxed); }

void sm_os_space_short(void) {
  if (!atomic_load_explicit(&sm_os_short, memory_order_relaxed) && sm_os_space_limited())
    atomic_store_explicit(&sm_os_short, true, memory_order_relaxed);
}

/* Map exactly [p, p + size) again, where a hole was: 0, ENOMEM (the
 * limit), or EEXIST (another mapping took the range meanwhile; a kernel
 * before 4.17 takes MAP_FIXED_NOREPLACE for a hint and maps elsewhere:
 * undone, and EEXIST too).  Counted mapped, not committed. */
int sm_os_map_hole(void *p, size_t size) {
  int saved = errno;
  void *q = sm_sys_mmap(p, size, PROT_READ | PROT_WRITE, MAP_FIXED_NOREPLACE);
  int err = q == MAP_FAILED ? errno : 0;
  if (!err && q != p) {
    sm_sys_munmap(q, size);
    err = EEXIST;
  }
  errno = saved;
  if (err) return err == ENOMEM ? ENOMEM : EEXIST;
  sm_mapped_only_add(size);
  return 0;
}

/* Ask for transparent huge pages, unless SMALLOC_HUGEPAGES=0 (then
 * ENOTSUP: no advice was given). */
int sm_os_hugepage(void *p, size_t size) {
#ifdef MADV_HUGEPAGE
  return sm_opt(HUGEPAGES) ? sm_os_advise(p, size, MADV_HUGEPAGE) : ENOTSUP;
#else
  (void)p; (void)size;
  return ENOTSUP;
#endif
}

/* Whether the kernel backs anonymous memory with transparent huge pages
 * unasked (THP "always": /sys/kernel/mm/transparent_hugepage/enabled),
 * where a range that gives memory back needs the advice against them
 * as much as one advised for them.  Read once; not where it cannot be
 * read. */
bool sm_os_thp_always(void) {
  static _Atomic int known;   /* 0: not read yet, 1: no, 2: yes */
  int k = atomic_load_explicit(&known, memory_order_relaxed);
  if (k == 0) {
    int saved = errno;
    char buf[64] = {0};
    /* system calls of their own: an open() interposed by a preloaded
     * library may call malloc, which is where this is asked from */
    long fd = syscall(SYS_openat, AT_FDCWD, "/sys/kernel/mm/transparent_hugepage/enabled",
                      O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      if (syscall(SYS_read, fd, buf, sizeof buf - 1) < 0) buf[0] = 0;
      syscall(SYS_close, fd);
    }
    errno = saved;
    k = strstr(buf, "[always]") ? 2 : 1;
    atomic_store_explicit(&known, k, memory_order_relaxed);
  }
  return k == 2;
}

/* Withdraw that advice: the range gets no huge page from then on,
 * whatever the system's setting. */
int sm_os_nohugepage(void *p, size_t size) {
#ifdef MADV_NOHUGEPAGE
  return sm_os_advise(p, size, MADV_NOHUGEPAGE);
#else
  (void)p; (void)size;
  return ENOTSUP;
#endif
}

/* The move of sm_os_remap when the reservation does not fit, under an
 * address-space limit: the kernel moves the mapping where it likes, grown
 * by the alignment, which counts only that growth against the limit (a
 * reservation counts the whole new size while the old mapping still
 * stands, so a block could only grow to about half the limit); then the
 * bytes are shifted down to the aligned place inside it and the ends
 * trimmed.  The one path that copies, and only near the limit. */
static int sm_os_remap_shifted(void *p, size_t old_size, size_t new_size, size_t alignment, size_t pre,
                               void **out) {
  size_t total = new_size + alignment;
  if (total < new_size) return ENOMEM;
  uint8_t *raw = sm_sys_mremap(p, old_size, total, MREMAP_MAYMOVE, NULL);
  if (raw == MAP_FAILED) return errno;
  uintptr_t want = sm_os_aligned_in(raw, alignment, pre);
  if (alignment >= SM_SEGMENT_SIZE && !sm_segmap_prepare(want)) {
    /* the old place may be another mapping's by now: nowhere to go back */
    sm_message("cannot place a moved block in the segment map: out of address space");
    abort();
  }
  memmove((void *)want, raw, old_size);
  sm_os_trim_around(raw, total, want, new_size);
  sm_mapped_add(new_size - old_size);
  *out = (void *)want;
  return 0;
}

/* Resize a mapping without copying.  In place first; else move it with
 * MREMAP_FIXED onto a fresh reservation where (result + pre) is aligned;
 * else, when that reservation is refused, sm_os_remap_shifted. */
int sm_os_remap(void *p, size_t old_size, size_t new_size, size_t alignment, size_t pre, void **out) {
  int saved = errno;
  void *q = sm_sys_mremap(p, old_size, new_size, 0, NULL);
  if (q != MAP_FAILED) {
    errno = saved;
    if (new_size > old_size) sm_mapped_add(new_size - old_size);
    else { sm_gsub(bytes_mapped, old_size - new_size); sm_gsub(bytes_committed, old_size - new_size); }
    *out = q;
    return 0;
  }
  /* reserve an aligned range, then move the pages onto it */
  size_t total = new_size + alignment;
  uint8_t *raw = sm_sys_mmap(NULL, total, PROT_NONE, MAP_NORESERVE);
  if (raw == MAP_FAILED) {
    int err = errno == ENOMEM ? sm_os_remap_shifted(p, old_size, new_size, alignment, pre, out) : errno;
    errno = saved;
    return err;
  }
  uintptr_t want = sm_os_aligned_in(raw, alignment, pre);
  if (alignment >= SM_SEGMENT_SIZE && !sm_segmap_prepare(want)) {
    sm_sys_munmap(raw, total);
    errno = saved;
    return ENOMEM;
  }
  q = sm_sys_mremap(p, old_size, new_size, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)want);
  if (q == MAP_FAILED) {
    int err = errno;
    sm_sys_munmap(raw, total);
    errno = saved;
    return err;
  }
  sm_os_trim_around(raw, total, want, new_size);
  errno = saved;
  sm_mapped_add(new_size - old_size);
  *out = q;
  return 0;
}

int sm_os_protect(void *p, size_t size, bool accessible) {
  int saved = errno;
  int err = mprotect(p, size, accessible ? PROT_READ | PROT_WRITE : PROT_NONE) ? errno : 0;
  errno = saved;
  return err;
}

void sm_os_random(void *buf, size_t len) {
  int saved = errno;
  uint8_t *out = buf;
  long r = syscall(SYS_getrandom, buf, len, 0x0001 /* GRND_NONBLOCK */);
  if (r != (long)len) {
    /* the kernel's start-up randomness, mixed with addresses and time */
    const uint8_t *at = (const uint8_t *)getauxval(AT_RANDOM);
    uint64_t x = (uintptr_t)&r ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)buf;
    for (size_t i = 0; i < len; i++) {
      x ^= at ? at[i % 16] : 0;
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      out[i] = (uint8_t)(x >> 56);
    }
  }
  errno = saved;
}
