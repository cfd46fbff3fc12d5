/* Statistics and options: exact counters after known call sequences (one
 * thread, several threads, exited threads), stats_reset, the JSON and
 * table printers, the size-versioned stats struct, and every option, set
 * in-process or read from the environment at start-up.
 *
 * Semantics relied on (stated in smalloc_stats(3), smalloc(7) and
 * include/smalloc.h):
 *   - Counters are exact for the calling thread and for threads that have
 *     exited.  A measured window below contains smalloc calls only: no
 *     libcheck call (a passing ck_assert allocates in fork mode, through
 *     smalloc when it replaces malloc), no stdio that could allocate.
 *   - calls_X counts every call of entry point X, failed ones too (and
 *     calls_failed counts those).  calls_free counts blocks freed through
 *     free, free_sized and free_aligned_sized (free_sized also counts in
 *     calls_free_sized); free(NULL) counts in calls_free_null only; a block
 *     freed by realloc(p, 0) or moved by realloc is no free call.
 *   - bytes_requested is the sum of the sizes asked for by calls that
 *     succeeded (calloc: count * size; realloc: the new size); a failed
 *     call asks for nothing that was given.
 *   - classes[i].allocs / frees count blocks of that class handed out and
 *     returned by any entry point, realloc's moves included.  A request of
 *     n <= 256 KiB with alignment <= 16 is served by the smallest class of
 *     at least n bytes (sm_test_class_size: the secure layout adds a
 *     canary; the class sizes named in comments below are the plain
 *     layout's).  blocks_in_use counts every live block (small, large and
 *     huge); bytes_in_use their block bytes.
 *   - Blocks above 256 KiB (the largest class) are large (large_allocs/
 *     frees), above 2 MiB huge (huge_allocs/frees; a huge realloc that
 *     stays huge counts huge_remaps, except in the secure layout, where it
 *     allocates a new huge block and frees the old one).
 *   - smalloc_stats_reset zeroes the event counters and keeps the gauges
 *     (*_in_use, bytes_mapped, bytes_committed); per-class blocks_in_use
 *     keeps counting the blocks live at the reset.
 *   - smalloc_stats_get fills no more than out->size bytes and returns
 *     EINVAL for NULL or a size below the size and version fields.
 *   - Options come from SMALLOC_* at start-up; a malformed value leaves the
 *     default and prints exactly one line
 *       smalloc: ignoring SMALLOC_X='value': <why>; using <default>
 *     Those start-up tests re-run this program (/proc/self/exe) with a
 *     marker argument and a clean environment plus the variable under test.
 */
#include "common.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/wait.h>

#define ST_CHILD_MARK "--smalloc-stats-child"
#define ST_KiB ((size_t)1 << 10)
#define ST_MiB ((size_t)1 << 20)

/* ---- the stats struct as a table of fields ------------------------------- */

enum st_kind { ST_EVENT, ST_GAUGE, ST_PEAK };

typedef struct st_field {
  const char *name;
  size_t off;
  enum st_kind kind;
} st_field_t;

#define ST_F(name, kind) {#name, offsetof(smalloc_stats_t, name), kind}
static const st_field_t st_fields[] = {
  ST_F(calls_malloc, ST_EVENT),        ST_F(calls_calloc, ST_EVENT),
  ST_F(calls_realloc, ST_EVENT),       ST_F(calls_reallocarray, ST_EVENT),
  ST_F(calls_free, ST_EVENT),          ST_F(calls_free_null, ST_EVENT),
  ST_F(calls_posix_memalign, ST_EVENT), ST_F(calls_aligned_alloc, ST_EVENT),
  ST_F(calls_memalign, ST_EVENT),      ST_F(calls_valloc, ST_EVENT),
  ST_F(calls_pvalloc, ST_EVENT),       ST_F(calls_usable_size, ST_EVENT),
  ST_F(calls_free_sized, ST_EVENT),    ST_F(calls_free_aligned_sized, ST_EVENT),
  ST_F(calls_failed, ST_EVENT),        ST_F(bytes_requested, ST_EVENT),
  ST_F(bytes_in_use, ST_GAUGE),        ST_F(bytes_in_use_peak, ST_PEAK),
  ST_F(blocks_in_use, ST_GAUGE),       ST_F(large_allocs, ST_EVENT),
  ST_F(large_frees, ST_EVENT),         ST_F(huge_allocs, ST_EVENT),
  ST_F(huge_frees, ST_EVENT),          ST_F(huge_remaps, ST_EVENT),
  ST_F(slow_path, ST_EVENT),           ST_F(pages_in_use, ST_GAUGE),
  ST_F(pages_retired, ST_EVENT),       ST_F(pages_reused, ST_EVENT),
  ST_F(pages_released, ST_EVENT),      ST_F(pages_full, ST_EVENT),
  ST_F(pages_unfull, ST_EVENT),        ST_F(segments_in_use, ST_GAUGE),
  ST_F(segments_mapped, ST_EVENT),     ST_F(segments_cached, ST_EVENT),
  ST_F(segments_cache_hits, ST_EVENT), ST_F(segments_purged, ST_EVENT),
  ST_F(segments_unmapped, ST_EVENT),   ST_F(os_mmap, ST_EVENT),
  ST_F(os_munmap, ST_EVENT),           ST_F(os_madvise, ST_EVENT),
  ST_F(os_mremap, ST_EVENT),           ST_F(bytes_mapped, ST_GAUGE),
  ST_F(bytes_mapped_peak, ST_PEAK),    ST_F(bytes_committed, ST_GAUGE),
  ST_F(bytes_purged, ST_EVENT),        ST_F(threads_started, ST_EVENT),
  ST_F(threads_exited, ST_EVENT),      ST_F(pages_abandoned, ST_EVENT),
  ST_F(pages_reclaimed, ST_EVENT),     ST_F(segments_reclaimed, ST_EVENT),
  ST_F(pages_claimed, ST_EVENT),       ST_F(oom_collects, ST_EVENT),
  ST_F(huge_cached, ST_EVENT),         ST_F(huge_cache_hits, ST_EVENT),
  ST_F(background_threads, ST_EVENT),  ST_F(pages_purged, ST_EVENT),
  ST_F(purge_delay, ST_GAUGE),        ST_F(heaps_purged, ST_EVENT),
};
#undef ST_F
#define ST_NFIELDS (sizeof st_fields / sizeof st_fields[0])

static uint64_t st_get(const smalloc_stats_t *s, const st_field_t *f)
{
  uint64_t v;
  memcpy(&v, (const char *)s + f->off, sizeof v);
  return v;
}

#define st_snap sm_test_snap
#define st_class sm_test_class_index

#define ST_D(a, b, f) ((b)->f - (a)->f)

#define ST_EXPECT(a, b, f, want)                                               \
  ck_assert_msg(ST_D(a, b, f) == (uint64_t)(want), "%s: delta %llu, want %llu", \
                #f, (unsigned long long)ST_D(a, b, f),                         \
                (unsigned long long)(uint64_t)(want))

/* Expected per-class deltas, by request size (entries whose requests share
 * a class add up). */
typedef struct st_class_want {
  size_t size;
  int64_t allocs, frees;
} st_class_want_t;

/* Every class's allocs/frees/blocks_in_use delta is the one wanted (zero
 * for classes not listed). */
static void st_expect_classes(const smalloc_stats_t *a, const smalloc_stats_t *b,
                              const st_class_want_t *want, size_t nwant)
{
  for (uint32_t i = 0; i < b->nclasses && i < SMALLOC_STATS_CLASSES; i++) {
    int64_t wa = 0, wf = 0;
    for (size_t k = 0; k < nwant; k++)
      if (st_class(b, want[k].size) == (int)i) {
        wa += want[k].allocs;
        wf += want[k].frees;
      }
    const smalloc_class_stats_t *x = &a->classes[i], *y = &b->classes[i];
    ck_assert_msg(y->allocs - x->allocs == (uint64_t)wa,
                  "class %llu: allocs delta %llu, want %lld",
                  (unsigned long long)y->block_size,
                  (unsigned long long)(y->allocs - x->allocs), (long long)wa);
    ck_assert_msg(y->frees - x->frees == (uint64_t)wf,
                  "class %llu: frees delta %llu, want %lld",
                  (unsigned long long)y->block_size,
                  (unsigned long long)(y->frees - x->frees), (long long)wf);
    ck_assert_msg(y->blocks_in_use - x->blocks_in_use == (uint64_t)(wa - wf),
                  "class %llu: blocks_in_use delta %lld, want %lld",
                  (unsigned long long)y->block_size,
                  (long long)(y->blocks_in_use - x->blocks_in_use),
                  (long long)(wa - wf));
  }
}

/* Sum over classes of block_size * blocks_in_use delta. */
static int64_t st_class_bytes_delta(const smalloc_stats_t *a, const smalloc_stats_t *b)
{
  int64_t sum = 0;
  for (uint32_t i = 0; i < b->nclasses && i < SMALLOC_STATS_CLASSES; i++)
    sum += (int64_t)b->classes[i].block_size *
           (int64_t)(b->classes[i].blocks_in_use - a->classes[i].blocks_in_use);
  return sum;
}

/* calls_* fields, in st_fields order, so a test can state all of them. */
typedef struct st_calls {
  uint64_t malloc_, calloc_, realloc_, reallocarray, free_, free_null,
      posix_memalign, aligned_alloc_, memalign_, valloc_, pvalloc_, usable_size,
      free_sized, free_aligned_sized, failed;
} st_calls_t;

static void st_expect_calls(const smalloc_stats_t *a, const smalloc_stats_t *b,
                            const st_calls_t *w)
{
  const uint64_t want[15] = {
    w->malloc_,       w->calloc_,         w->realloc_,   w->reallocarray,
    w->free_,         w->free_null,       w->posix_memalign, w->aligned_alloc_,
    w->memalign_,     w->valloc_,         w->pvalloc_,   w->usable_size,
    w->free_sized,    w->free_aligned_sized, w->failed,
  };
  for (size_t i = 0; i < 15; i++) {
    const st_field_t *f = &st_fields[i];
    ck_assert_msg(strncmp(f->name, "calls_", 6) == 0, "field table out of order");
    uint64_t d = st_get(b, f) - st_get(a, f);
    ck_assert_msg(d == want[i], "%s: delta %llu, want %llu", f->name,
                  (unsigned long long)d, (unsigned long long)want[i]);
  }
}

/* ============================================================================
 * counts_exact_one_thread: a known sequence of every allocating entry
 * point, then of every freeing one. */

START_TEST(counts_exact_one_thread)
{
  smalloc_stats_t s0, s1, s2;
  void *m[10], *c[5], *r1, *r2, *r2b, *ra, *pm = NULL, *aa, *ma;
  size_t us[3];
  int rc = 0, pmrc;

  rc |= st_snap(&s0);
  for (int i = 0; i < 10; i++)
    m[i] = smalloc_malloc(24);                 /* class 32 */
  for (int i = 0; i < 5; i++)
    c[i] = smalloc_calloc(3, 16);              /* 48 bytes, class 48 */
  r1 = smalloc_realloc(NULL, 40);              /* class 48 */
  r1 = smalloc_realloc(r1, 200);               /* moves: 200 + 1/8 headroom, class 240 */
  r2 = smalloc_realloc(NULL, 100);             /* class 112 */
  r2b = smalloc_realloc(r2, 100);              /* same size: may stay */
  ra = smalloc_reallocarray(NULL, 4, 8);       /* class 32 */
  ra = smalloc_reallocarray(ra, 10, 16);       /* moves: 160 + 1/8 headroom, class 192 */
  pmrc = smalloc_posix_memalign(&pm, 16, 48);  /* class 48 */
  aa = smalloc_aligned_alloc(16, 64);          /* class 64 */
  ma = smalloc_memalign(16, 80);               /* class 80 */
  for (int i = 0; i < 3; i++)
    us[i] = smalloc_malloc_usable_size(m[i]);
  smalloc_free(NULL);
  smalloc_free(NULL);
  rc |= st_snap(&s1);
  for (int i = 0; i < 5; i++)
    smalloc_free(m[i]);
  for (int i = 5; i < 10; i++)
    smalloc_free_sized(m[i], 24);
  for (int i = 0; i < 5; i++)
    smalloc_free(c[i]);
  smalloc_free_aligned_sized(pm, 16, 48);
  smalloc_free(r1);
  smalloc_free(r2b);
  smalloc_free(ra);
  smalloc_free(aa);
  smalloc_free(ma);
  rc |= st_snap(&s2);

  ck_assert_int_eq(rc, 0);
  ck_assert_int_eq(pmrc, 0);
  for (int i = 0; i < 10; i++)
    ck_assert_ptr_nonnull(m[i]);
  for (int i = 0; i < 5; i++)
    ck_assert_ptr_nonnull(c[i]);
  ck_assert_ptr_nonnull(r1);
  ck_assert_ptr_nonnull(r2b);
  ck_assert_ptr_nonnull(ra);
  ck_assert_ptr_nonnull(pm);
  ck_assert_ptr_nonnull(aa);
  ck_assert_ptr_nonnull(ma);
  for (int i = 0; i < 3; i++)
    ck_assert_uint_eq(us[i], sm_test_usable(24));
  int moved = r2b != r2; /* either is right; the counts must say which */

  /* allocation phase */
  st_expect_calls(&s0, &s1,
                  &(st_calls_t){.malloc_ = 10, .calloc_ = 5, .realloc_ = 4,
                                .reallocarray = 2, .free_null = 2,
                                .posix_memalign = 1, .aligned_alloc_ = 1,
                                .memalign_ = 1, .usable_size = 3});
  ST_EXPECT(&s0, &s1, bytes_requested,
            10 * 24 + 5 * 48 + 40 + 200 + 100 + 100 + 32 + 160 + 48 + 64 + 80);
  /* realloc moves grow the request by an eighth */
  const size_t r1_moved = 200 + 200 / 8, ra_moved = 160 + 160 / 8;
  const st_class_want_t alloc_want[] = {
    {24, 10, 0},           /* m[] */
    {32, 1, 1},            /* ra before it moved */
    {48, 5 + 1, 0},        /* c[], pm */
    {40, 1, 1},            /* r1 before it moved */
    {r1_moved, 1, 0},      /* r1 */
    {100, 1 + moved, moved}, /* r2, r2b */
    {ra_moved, 1, 0},      /* ra */
    {64, 1, 0},            /* aa */
    {80, 1, 0},            /* ma */
  };
  st_expect_classes(&s0, &s1, alloc_want, sizeof alloc_want / sizeof alloc_want[0]);
  ST_EXPECT(&s0, &s1, blocks_in_use, 10 + 5 + 1 + 1 + 1 + 1 + 1 + 1);
  ck_assert_int_eq((int64_t)ST_D(&s0, &s1, bytes_in_use), st_class_bytes_delta(&s0, &s1));
  ST_EXPECT(&s0, &s1, bytes_in_use,
            10 * sm_test_class_size(24) + 5 * sm_test_class_size(48) +
                sm_test_class_size(r1_moved) + sm_test_class_size(100) +
                sm_test_class_size(ra_moved) + sm_test_class_size(48) +
                sm_test_class_size(64) + sm_test_class_size(80));
  ST_EXPECT(&s0, &s1, large_allocs, 0);
  ST_EXPECT(&s0, &s1, huge_allocs, 0);

  /* free phase */
  st_expect_calls(&s1, &s2,
                  &(st_calls_t){.free_ = 5 + 5 + 5 + 1 + 5, .free_sized = 5,
                                .free_aligned_sized = 1});
  ST_EXPECT(&s1, &s2, bytes_requested, 0);
  const st_class_want_t free_want[] = {
    {24, 0, 10},      {48, 0, 5 + 1},   {r1_moved, 0, 1}, {100, 0, 1},
    {ra_moved, 0, 1}, {64, 0, 1},       {80, 0, 1},
  };
  st_expect_classes(&s1, &s2, free_want, sizeof free_want / sizeof free_want[0]);
  ck_assert_uint_eq(s2.blocks_in_use, s0.blocks_in_use);
  ck_assert_uint_eq(s2.bytes_in_use, s0.bytes_in_use);
}
END_TEST

/* ============================================================================
 * counts_failed_and_odd_calls: failed calls count as calls and in
 * calls_failed and request nothing; realloc(p, 0) frees without a free
 * call; valloc/pvalloc/over-aligned requests count what was asked for. */

START_TEST(counts_failed_and_odd_calls)
{
  smalloc_stats_t s0, s1, s2, s3, s4;
  void *f[7], *pm = (void *)&s0, *p0, *z, *v, *pv, *pa = NULL;
  int e[7], pmrc, parc, rc = 0;

  rc |= st_snap(&s0);
  errno = 0;
  f[0] = smalloc_malloc(SIZE_MAX);
  e[0] = errno;
  errno = 0;
  f[1] = smalloc_calloc(SIZE_MAX, 2);
  e[1] = errno;
  errno = 0;
  f[2] = smalloc_reallocarray(NULL, SIZE_MAX, 2);
  e[2] = errno;
  pmrc = smalloc_posix_memalign(&pm, 24, 16);
  errno = 0;
  f[3] = smalloc_aligned_alloc(3, 16);
  e[3] = errno;
  errno = 0;
  f[4] = smalloc_memalign(SIZE_MAX / 2 + 2, 16);   /* 24 is rounded up, as glibc does */
  e[4] = errno;
  errno = 0;
  f[5] = smalloc_realloc(NULL, SIZE_MAX);
  e[5] = errno;
  f[6] = NULL;
  e[6] = 0;
  rc |= st_snap(&s1);

  p0 = smalloc_malloc(64);
  z = smalloc_realloc(p0, 0);                  /* frees p0, returns NULL */
  rc |= st_snap(&s2);

  v = smalloc_valloc(4096);
  pv = smalloc_pvalloc(4096);
  parc = smalloc_posix_memalign(&pa, 64, 100); /* 100 is no multiple of 64 */
  rc |= st_snap(&s3);
  smalloc_free(v);
  smalloc_free(pv);
  smalloc_free(pa);
  rc |= st_snap(&s4);

  ck_assert_int_eq(rc, 0);
  for (int i = 0; i < 6; i++)
    ck_assert_msg(f[i] == NULL, "failing call %d returned %p", i, f[i]);
  ck_assert_int_eq(e[0], ENOMEM);
  ck_assert_int_eq(e[1], ENOMEM);
  ck_assert_int_eq(e[2], ENOMEM);
  ck_assert_int_eq(pmrc, EINVAL);
  ck_assert_ptr_eq(pm, (void *)&s0);
  ck_assert_int_eq(e[3], EINVAL);
  ck_assert_int_eq(e[4], EINVAL);
  ck_assert_int_eq(e[5], ENOMEM);
  st_expect_calls(&s0, &s1,
                  &(st_calls_t){.malloc_ = 1, .calloc_ = 1, .realloc_ = 1,
                                .reallocarray = 1, .posix_memalign = 1,
                                .aligned_alloc_ = 1, .memalign_ = 1, .failed = 7});
  ST_EXPECT(&s0, &s1, bytes_requested, 0);
  ST_EXPECT(&s0, &s1, blocks_in_use, 0);
  st_expect_classes(&s0, &s1, NULL, 0);

  /* realloc(p, 0) */
  ck_assert_ptr_nonnull(p0);
  ck_assert_ptr_null(z);
  st_expect_calls(&s1, &s2, &(st_calls_t){.malloc_ = 1, .realloc_ = 1});
  ST_EXPECT(&s1, &s2, bytes_requested, 64);
  st_expect_classes(&s1, &s2, &(st_class_want_t){64, 1, 1}, 1);
  ST_EXPECT(&s1, &s2, blocks_in_use, 0);

  /* page-aligned and over-aligned requests: the class is the allocator's
   * choice, the counts are not */
  ck_assert_ptr_nonnull(v);
  ck_assert_ptr_nonnull(pv);
  ck_assert_int_eq(parc, 0);
  ck_assert_uint_eq((uintptr_t)v % 4096, 0);
  ck_assert_uint_eq((uintptr_t)pv % 4096, 0);
  ck_assert_uint_eq((uintptr_t)pa % 64, 0);
  st_expect_calls(&s2, &s3,
                  &(st_calls_t){.valloc_ = 1, .pvalloc_ = 1, .posix_memalign = 1});
  ST_EXPECT(&s2, &s3, blocks_in_use, 3);
  uint64_t allocs = ST_D(&s2, &s3, large_allocs) + ST_D(&s2, &s3, huge_allocs);
  for (int i = 0; i < SMALLOC_STATS_CLASSES; i++)
    allocs += s3.classes[i].allocs - s2.classes[i].allocs;
  ck_assert_uint_eq(allocs, 3);
  st_expect_calls(&s3, &s4, &(st_calls_t){.free_ = 3});
  ck_assert_uint_eq(s4.blocks_in_use, s2.blocks_in_use);
  ck_assert_uint_eq(s4.bytes_in_use, s2.bytes_in_use);
  /* what was asked for, not the padding an aligned placement needed */
  ST_EXPECT(&s2, &s3, bytes_requested, 4096 + 4096 + 100);
}
END_TEST

/* ============================================================================
 * counts_large_and_huge: blocks above the classes. */

START_TEST(counts_large_and_huge)
{
  smalloc_stats_t s0, s1, s2;
  int rc = 0;

  rc |= st_snap(&s0);
  void *l1 = smalloc_malloc(300 * ST_KiB);          /* large */
  void *l2 = smalloc_calloc(1, ST_MiB);             /* large, zeroed */
  void *h = smalloc_malloc(3 * ST_MiB);             /* huge */
  void *h2 = smalloc_realloc(h, 6 * ST_MiB);        /* huge remap (or copy) */
  rc |= st_snap(&s1);
  smalloc_free(l1);
  smalloc_free(l2);
  smalloc_free(h2);
  rc |= st_snap(&s2);

  ck_assert_int_eq(rc, 0);
  ck_assert_ptr_nonnull(l1);
  ck_assert_ptr_nonnull(l2);
  ck_assert_ptr_nonnull(h2);
  st_expect_calls(&s0, &s1, &(st_calls_t){.malloc_ = 2, .calloc_ = 1, .realloc_ = 1});
  ST_EXPECT(&s0, &s1, bytes_requested, 300 * ST_KiB + ST_MiB + 3 * ST_MiB + 6 * ST_MiB);
  ST_EXPECT(&s0, &s1, large_allocs, 2);
  const bool remaps = sm_test_huge_realloc_remaps();
  ST_EXPECT(&s0, &s1, huge_allocs, remaps ? 1 : 2);
  ST_EXPECT(&s0, &s1, huge_frees, remaps ? 0 : 1);
  ST_EXPECT(&s0, &s1, huge_remaps, remaps ? 1 : 0);
  ST_EXPECT(&s0, &s1, blocks_in_use, 3);
  ck_assert_msg(ST_D(&s0, &s1, bytes_in_use) >= 300 * ST_KiB + ST_MiB + 6 * ST_MiB,
                "bytes_in_use grew by %llu",
                (unsigned long long)ST_D(&s0, &s1, bytes_in_use));
  st_expect_classes(&s0, &s1, NULL, 0);

  st_expect_calls(&s1, &s2, &(st_calls_t){.free_ = 3});
  ST_EXPECT(&s1, &s2, large_frees, 2);
  ST_EXPECT(&s1, &s2, huge_frees, 1);
  ck_assert_uint_eq(s2.blocks_in_use, s0.blocks_in_use);
  ck_assert_uint_eq(s2.bytes_in_use, s0.bytes_in_use);
}
END_TEST

/* ============================================================================
 * counts_exact_across_threads: four threads run known sequences and exit
 * (leaving some blocks live), the main thread frees those; the totals are
 * exact, threads_started/threads_exited included.  The threads are created
 * before the first snapshot and wait on a barrier, so that thread creation
 * is outside the window. */

enum { ST_THREADS = 4 };

typedef struct st_thread_arg {
  pthread_barrier_t *start;
  int index;
  bool work;                /* false: a control thread, no smalloc call */
  void *left[ST_THREADS];   /* blocks left live for the main thread */
  int nleft;
  int failed;
} st_thread_arg_t;

/* The request realloc(p, 96) of a smaller block makes (class 112). */
#define ST_MOVED_96 (96 + 96 / 8)

static void *st_worker(void *arg)
{
  st_thread_arg_t *a = arg;
  void *m[40], *c[5];
  int n = 10 * (a->index + 1);

  pthread_barrier_wait(a->start);
  if (!a->work)
    return NULL;
  for (int j = 0; j < n; j++)
    m[j] = smalloc_malloc(48);
  for (int j = 0; j < 5; j++)
    c[j] = smalloc_calloc(2, 32);
  m[0] = smalloc_realloc(m[0], 96);   /* moves: 96 + 1/8 headroom (ST_MOVED_96) */
  smalloc_free(m[0]);
  for (int j = 0; j < 5; j++)
    smalloc_free(c[j]);
  int keep = a->index + 1;
  for (int j = 1; j < n - keep; j++)
    smalloc_free(m[j]);
  for (int j = 0; j < keep; j++)
    a->left[j] = m[n - keep + j];
  a->nleft = keep;
  for (int j = 0; j < n; j++)
    if (m[j] == NULL)
      a->failed = 1;
  for (int j = 0; j < 5; j++)
    if (c[j] == NULL)
      a->failed = 1;
  return NULL;
}

/* Start ST_THREADS threads, snapshot s0, let them run, join them,
 * snapshot s1, free what they left, snapshot s2. */
static void st_thread_round(bool work, st_thread_arg_t *args, smalloc_stats_t *s0,
                            smalloc_stats_t *s1, smalloc_stats_t *s2)
{
  pthread_t t[ST_THREADS];
  pthread_barrier_t start;
  int rc = 0;

  ck_assert_int_eq(pthread_barrier_init(&start, NULL, ST_THREADS + 1), 0);
  for (int i = 0; i < ST_THREADS; i++) {
    args[i] = (st_thread_arg_t){.start = &start, .index = i, .work = work};
    ck_assert_int_eq(pthread_create(&t[i], NULL, st_worker, &args[i]), 0);
  }
  rc |= st_snap(s0);
  pthread_barrier_wait(&start);
  for (int i = 0; i < ST_THREADS; i++)
    pthread_join(t[i], NULL);
  rc |= st_snap(s1);
  for (int i = 0; i < ST_THREADS; i++)
    for (int j = 0; j < args[i].nleft; j++)
      smalloc_free(args[i].left[j]);
  rc |= st_snap(s2);
  pthread_barrier_destroy(&start);
  ck_assert_int_eq(rc, 0);
}

START_TEST(counts_exact_across_threads)
{
  static st_thread_arg_t args[ST_THREADS];
  static smalloc_stats_t c0, c1, c2, s0, s1, s2;

  /* the exited threads' heaps are taken apart at exit (heaps that wait
   * for the next thread: threads.c) */
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HEAP_CACHE, 0), 0);

  /* The main thread frees the exited threads' blocks below: a thread gets
   * its heap (threads_started) at its first smalloc call, so make that
   * call now, also in builds where malloc is not smalloc's. */
  smalloc_free(smalloc_malloc(1));

  /* Control round: threads that make no smalloc call.  Where smalloc
   * replaces malloc, the C library's own thread exit calls free(NULL)
   * (glibc: twice a thread); whatever it counts is added to the figures
   * expected below.  It must not allocate. */
  st_thread_round(false, args, &c0, &c1, &c2);
  st_expect_classes(&c0, &c1, NULL, 0);
  ST_EXPECT(&c0, &c1, blocks_in_use, 0);
  ST_EXPECT(&c0, &c1, threads_started, 0);
  uint64_t libc_calls[15];
  for (size_t i = 0; i < 15; i++)
    libc_calls[i] = st_get(&c1, &st_fields[i]) - st_get(&c0, &st_fields[i]);
  if (!SM_HAVE_OVERRIDE)
    for (size_t i = 0; i < 15; i++)
      ck_assert_msg(libc_calls[i] == 0, "%s counted %llu calls of threads that made none",
                    st_fields[i].name, (unsigned long long)libc_calls[i]);

  st_thread_round(true, args, &s0, &s1, &s2);
  int live = 0, mallocs = 0, thread_frees = 0;
  for (int i = 0; i < ST_THREADS; i++) {
    ck_assert_int_eq(args[i].failed, 0);
    ck_assert_int_eq(args[i].nleft, i + 1);
    live += i + 1;
    mallocs += 10 * (i + 1);
    /* m[0] after realloc, c[0..4], m[1 .. n-keep) */
    thread_frees += 1 + 5 + (10 * (i + 1) - (i + 1) - 1);
  }
  st_calls_t want = {.malloc_ = (uint64_t)mallocs, .calloc_ = 5 * ST_THREADS,
                     .realloc_ = ST_THREADS, .free_ = (uint64_t)thread_frees};
  uint64_t *w = (uint64_t *)&want;
  for (size_t i = 0; i < 15; i++)
    w[i] += libc_calls[i];
  st_expect_calls(&s0, &s1, &want);
  ST_EXPECT(&s0, &s1, bytes_requested,
            mallocs * 48 + 5 * ST_THREADS * 64 + ST_THREADS * 96);
  const st_class_want_t want1[] = {
    {48, mallocs, mallocs - live},  /* realloc moved one per thread */
    {64, 5 * ST_THREADS, 5 * ST_THREADS},
    {ST_MOVED_96, ST_THREADS, ST_THREADS},
  };
  st_expect_classes(&s0, &s1, want1, 3);
  ST_EXPECT(&s0, &s1, blocks_in_use, live);
  ST_EXPECT(&s0, &s1, threads_started, ST_THREADS);
  ST_EXPECT(&s0, &s1, threads_exited, ST_THREADS);
  ck_assert_msg(ST_D(&s0, &s1, pages_abandoned) >= ST_THREADS,
                "%llu pages abandoned by %d exited threads with live blocks",
                (unsigned long long)ST_D(&s0, &s1, pages_abandoned), ST_THREADS);

  /* the main thread frees what the exited threads left */
  st_expect_calls(&s1, &s2, &(st_calls_t){.free_ = (uint64_t)live});
  st_expect_classes(&s1, &s2, &(st_class_want_t){48, 0, live}, 1);
  ck_assert_uint_eq(s2.blocks_in_use, s0.blocks_in_use);
  ST_EXPECT(&s1, &s2, threads_started, 0);
  ST_EXPECT(&s1, &s2, threads_exited, 0);
}
END_TEST

/* ============================================================================
 * counts_a_threads_own_unsent_remote_frees
 *
 * A thread's frees of a live thread's blocks wait in a batch per page and
 * are counted as the batch is sent; until then the thread's own reads
 * count them from its batches (so exact for the calling thread, as
 * smalloc_stats(3) says).  40 blocks of one page make one batch, which
 * fills at 64. */
enum { ST_RF_BLOCKS = 40 };
static struct {
  sm_test_phase_t ph;
  void *v[ST_RF_BLOCKS];
} st_rf = {.ph = SM_TEST_PHASE_INIT};

static void *st_rf_owner(void *arg)
{
  (void)arg;
  for (int i = 0; i < ST_RF_BLOCKS; i++)
    st_rf.v[i] = smalloc_malloc(40);
  sm_test_phase_set(&st_rf.ph, 1);
  sm_test_phase_wait(&st_rf.ph, 2);   /* alive while this thread frees */
  return NULL;
}

START_TEST(counts_a_threads_own_unsent_remote_frees)
{
  smalloc_stats_t a, b, c;
  pthread_t t;
  smalloc_free(smalloc_malloc(1));   /* this thread's heap: its frees are batched */
  ck_assert_int_eq(pthread_create(&t, NULL, st_rf_owner, NULL), 0);
  sm_test_phase_wait(&st_rf.ph, 1);
  for (int i = 0; i < ST_RF_BLOCKS; i++)
    ck_assert_ptr_nonnull(st_rf.v[i]);
  int rc = st_snap(&a);
  for (int i = 0; i < 10; i++)
    smalloc_free(st_rf.v[i]);
  rc |= st_snap(&b);
  for (int i = 10; i < ST_RF_BLOCKS; i++)
    smalloc_free(st_rf.v[i]);
  rc |= st_snap(&c);
  sm_test_phase_set(&st_rf.ph, 2);
  pthread_join(t, NULL);
  ck_assert_int_eq(rc, 0);
  int k = st_class(&a, 40);
  ck_assert_uint_eq(b.calls_free - a.calls_free, 10);
  ck_assert_uint_eq(b.classes[k].frees - a.classes[k].frees, 10);
  ck_assert_uint_eq(c.calls_free - a.calls_free, ST_RF_BLOCKS);
  ck_assert_uint_eq(c.classes[k].frees - a.classes[k].frees, ST_RF_BLOCKS);
}
END_TEST

/* ============================================================================
 * reset_zeroes_events_keeps_gauges */

START_TEST(reset_zeroes_events_keeps_gauges)
{
  smalloc_stats_t a, b, c;
  void *m[20];
  int rc = 0;

  for (int i = 0; i < 20; i++)
    m[i] = smalloc_malloc(40);
  void *large = smalloc_malloc(ST_MiB);
  rc |= st_snap(&a);
  smalloc_stats_reset();
  rc |= st_snap(&b);
  for (int i = 0; i < 5; i++)
    smalloc_free(m[i]);
  rc |= st_snap(&c);

  ck_assert_int_eq(rc, 0);
  ck_assert_ptr_nonnull(large);
  for (size_t i = 0; i < ST_NFIELDS; i++) {
    const st_field_t *f = &st_fields[i];
    if (f->kind == ST_EVENT)
      ck_assert_msg(st_get(&b, f) == 0, "%s is %llu after reset", f->name,
                    (unsigned long long)st_get(&b, f));
    else if (f->kind == ST_GAUGE)
      ck_assert_msg(st_get(&b, f) == st_get(&a, f),
                    "gauge %s went from %llu to %llu on reset", f->name,
                    (unsigned long long)st_get(&a, f),
                    (unsigned long long)st_get(&b, f));
  }
  ck_assert_uint_ge(a.blocks_in_use, 21);
  for (int k = 0; k < SMALLOC_STEP_COUNT; k++)
    ck_assert_msg(b.slow_steps[k] == 0, "slow_steps.%s is %llu after reset",
                  sm_test_step_names[k], (unsigned long long)b.slow_steps[k]);
  for (int i = 0; i < SMALLOC_STATS_CLASSES; i++) {
    const smalloc_class_stats_t *x = &a.classes[i], *y = &b.classes[i];
    ck_assert_uint_eq(y->block_size, x->block_size);
    ck_assert_uint_eq(y->allocs, 0);
    ck_assert_uint_eq(y->frees, 0);
    for (int k = 0; k < SMALLOC_STEP_COUNT; k++)
      ck_assert_uint_eq(y->slow_steps[k], 0);
    ck_assert_uint_eq(y->blocks_in_use, x->blocks_in_use);
    ck_assert_uint_eq(y->pages_in_use, x->pages_in_use);
  }

  /* counting goes on from zero; blocks live at the reset still count */
  int k48 = st_class(&c, 40);
  ck_assert_uint_eq(c.calls_free, 5);
  ck_assert_uint_eq(c.calls_malloc, 0);
  ck_assert_uint_eq(c.classes[k48].frees, 5);
  ck_assert_uint_eq(c.classes[k48].allocs, 0);
  ck_assert_uint_eq(c.classes[k48].blocks_in_use, a.classes[k48].blocks_in_use - 5);
  ck_assert_uint_eq(c.blocks_in_use, a.blocks_in_use - 5);

  for (int i = 5; i < 20; i++)
    smalloc_free(m[i]);
  smalloc_free(large);
}
END_TEST

/* ---- files and commands ---------------------------------------------------- */

/* A temporary file name; the file exists and is empty. */
static void st_tmpname(char *buf, size_t len)
{
  snprintf(buf, len, "/tmp/smalloc-stats-XXXXXX");
  int fd = mkstemp(buf);
  ck_assert_msg(fd >= 0, "mkstemp: %s", strerror(errno));
  close(fd);
}

/* Read a whole file into buf (NUL-terminated); returns its length. */
static size_t st_slurp(const char *path, char *buf, size_t len)
{
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  ck_assert_msg(fd >= 0, "open %s: %s", path, strerror(errno));
  size_t n = 0;
  for (;;) {
    ssize_t r = read(fd, buf + n, len - 1 - n);
    if (r <= 0)
      break;
    n += (size_t)r;
  }
  close(fd);
  buf[n] = '\0';
  return n;
}

static bool st_have_python(void)
{
  static int have = -1;
  if (have < 0)
    have = system("python3 -c '' >/dev/null 2>&1") == 0;
  return have;
}

static bool st_json_valid(const char *path)
{
  char cmd[512];
  snprintf(cmd, sizeof cmd, "python3 -m json.tool '%s' >/dev/null", path);
  return system(cmd) == 0;
}

/* Prints one line per figure of a JSON stats object:
 *   k NAME VALUE            top-level integers
 *   s STEP VALUE            slow_steps
 *   c INDEX block_size blocks_in_use allocs frees pages_in_use
 *     blocks_peak page_bytes STEPS...
 *   x KEY                   a slow_steps key this test does not know */
static const char st_json_script[] =
  "import json, sys\n"
  "d = json.load(open(sys.argv[1]))\n"
  "steps = ['local_swap', 'thread_collect', 'extend', 'next_page',\n"
  "         'retired_page', 'fresh_page', 'new_segment']\n"
  "for k, v in d.items():\n"
  "    if isinstance(v, int) and not isinstance(v, bool):\n"
  "        print('k', k, v)\n"
  "for k, v in d['slow_steps'].items():\n"
  "    print('s' if k in steps else 'x', k, v)\n"
  "for i, c in enumerate(d['classes']):\n"
  "    print('c', i, c['block_size'], c['blocks_in_use'], c['allocs'],\n"
  "          c['frees'], c['pages_in_use'], c['blocks_peak'], c['page_bytes'],\n"
  "          ' '.join(str(c['slow_steps'][s]) for s in steps))\n";

typedef struct st_json_figures {
  uint64_t top[ST_NFIELDS];
  bool have_top[ST_NFIELDS];
  uint64_t version, size, nclasses;
  uint64_t steps[SMALLOC_STEP_COUNT];
  int nsteps, unknown_steps;
  smalloc_class_stats_t classes[SMALLOC_STATS_CLASSES];
  uint64_t class_blocks_peak[SMALLOC_STATS_CLASSES], class_page_bytes[SMALLOC_STATS_CLASSES];
  int nclass_entries;
} st_json_figures_t;

/* Run the script on a JSON file and collect its figures. */
static void st_json_figures(const char *json_path, st_json_figures_t *j)
{
  char script[64], cmd[512], line[1024];
  memset(j, 0, sizeof *j);
  st_tmpname(script, sizeof script);
  FILE *f = fopen(script, "w");
  ck_assert_ptr_nonnull(f);
  fputs(st_json_script, f);
  fclose(f);
  snprintf(cmd, sizeof cmd, "python3 '%s' '%s'", script, json_path);
  FILE *p = popen(cmd, "r");
  ck_assert_ptr_nonnull(p);
  while (fgets(line, sizeof line, p)) {
    char name[128];
    unsigned long long v;
    if (sscanf(line, "k %127s %llu", name, &v) == 2) {
      if (strcmp(name, "version") == 0)
        j->version = v;
      else if (strcmp(name, "size") == 0)
        j->size = v;
      else if (strcmp(name, "nclasses") == 0)
        j->nclasses = v;
      for (size_t i = 0; i < ST_NFIELDS; i++)
        if (strcmp(name, st_fields[i].name) == 0) {
          j->top[i] = v;
          j->have_top[i] = true;
        }
    } else if (sscanf(line, "s %127s %llu", name, &v) == 2) {
      for (int k = 0; k < SMALLOC_STEP_COUNT; k++)
        if (strcmp(name, sm_test_step_names[k]) == 0) {
          j->steps[k] = v;
          j->nsteps++;
        }
    } else if (line[0] == 'x') {
      j->unknown_steps++;
    } else if (line[0] == 'c') {
      unsigned idx;
      unsigned long long c[7], st[SMALLOC_STEP_COUNT];
      int got = sscanf(line, "c %u %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu",
                       &idx, &c[0], &c[1], &c[2], &c[3], &c[4], &c[5], &c[6], &st[0], &st[1],
                       &st[2], &st[3], &st[4], &st[5], &st[6]);
      ck_assert_msg(got == 15, "bad class line from the script: %s", line);
      ck_assert_uint_lt(idx, SMALLOC_STATS_CLASSES);
      smalloc_class_stats_t *x = &j->classes[idx];
      x->block_size = c[0];
      x->blocks_in_use = c[1];
      x->allocs = c[2];
      x->frees = c[3];
      x->pages_in_use = c[4];
      j->class_blocks_peak[idx] = c[5];
      j->class_page_bytes[idx] = c[6];
      for (int k = 0; k < SMALLOC_STEP_COUNT; k++)
        x->slow_steps[k] = st[k];
      j->nclass_entries++;
    }
  }
  int status = pclose(p);
  unlink(script);
  ck_assert_msg(status == 0, "the JSON figures script failed (status %d)", status);
}

/* Every figure of the JSON equals the struct's. */
static void st_expect_json_equals(const st_json_figures_t *j, const smalloc_stats_t *s)
{
  ck_assert_uint_eq(j->version, SMALLOC_STATS_VERSION);
  ck_assert_uint_eq(j->nclasses, s->nclasses);
  for (size_t i = 0; i < ST_NFIELDS; i++) {
    ck_assert_msg(j->have_top[i], "JSON has no key \"%s\"", st_fields[i].name);
    ck_assert_msg(j->top[i] == st_get(s, &st_fields[i]), "JSON %s = %llu, struct %llu",
                  st_fields[i].name, (unsigned long long)j->top[i],
                  (unsigned long long)st_get(s, &st_fields[i]));
  }
  ck_assert_int_eq(j->nsteps, SMALLOC_STEP_COUNT);
  ck_assert_int_eq(j->unknown_steps, 0);
  for (int k = 0; k < SMALLOC_STEP_COUNT; k++)
    ck_assert_msg(j->steps[k] == s->slow_steps[k], "JSON slow_steps.%s = %llu, struct %llu",
                  sm_test_step_names[k], (unsigned long long)j->steps[k],
                  (unsigned long long)s->slow_steps[k]);
  ck_assert_int_eq(j->nclass_entries, (int)s->nclasses);
  for (uint32_t i = 0; i < s->nclasses; i++) {
    const smalloc_class_stats_t *x = &j->classes[i], *y = &s->classes[i];
    ck_assert_msg(x->block_size == y->block_size && x->blocks_in_use == y->blocks_in_use &&
                      x->allocs == y->allocs && x->frees == y->frees &&
                      x->pages_in_use == y->pages_in_use &&
                      memcmp(x->slow_steps, y->slow_steps, sizeof x->slow_steps) == 0,
                  "JSON classes[%u] (block %llu, allocs %llu, frees %llu) differs from "
                  "the struct (block %llu, allocs %llu, frees %llu)",
                  i, (unsigned long long)x->block_size, (unsigned long long)x->allocs,
                  (unsigned long long)x->frees, (unsigned long long)y->block_size,
                  (unsigned long long)y->allocs, (unsigned long long)y->frees);
    ck_assert_uint_eq(j->class_blocks_peak[i], s->class_blocks_peak[i]);
    ck_assert_uint_eq(j->class_page_bytes[i], s->class_page_bytes[i]);
  }
}

/* ============================================================================
 * json_matches_struct: smalloc_stats_print_json writes valid JSON whose
 * every figure is the struct's at the same moment.  The FILE gets a static
 * buffer so that printing allocates nothing and the counters stand still
 * (checked: the snapshots before and after are equal). */

static char st_filebuf[256 * 1024];

START_TEST(json_matches_struct)
{
  if (!st_have_python()) {
    fprintf(stderr, "json_matches_struct: python3 not found, JSON not checked\n");
    return;
  }
  void *keep[3];
  for (int i = 0; i < 3; i++)
    keep[i] = smalloc_malloc(100 << i);
  char path[64];
  st_tmpname(path, sizeof path);
  FILE *f = fopen(path, "w");
  ck_assert_ptr_nonnull(f);
  ck_assert_int_eq(setvbuf(f, st_filebuf, _IOFBF, sizeof st_filebuf), 0);
  smalloc_stats_t s0, s1;
  int rc = st_snap(&s0);
  smalloc_stats_print_json(f);
  rc |= st_snap(&s1);
  fclose(f);
  ck_assert_int_eq(rc, 0);
  ck_assert_msg(memcmp(&s0, &s1, sizeof s0) == 0,
                "the counters moved while the JSON was printed");

  ck_assert_msg(st_json_valid(path), "smalloc_stats_print_json wrote invalid JSON (%s)", path);
  st_json_figures_t *j = calloc(1, sizeof *j);
  ck_assert_ptr_nonnull(j);
  st_json_figures(path, j);
  ck_assert_uint_eq(j->size, sizeof(smalloc_stats_t));
  st_expect_json_equals(j, &s0);
  free(j);
  unlink(path);
  for (int i = 0; i < 3; i++)
    smalloc_free(keep[i]);
}
END_TEST

/* ============================================================================
 * print_table_shape: smalloc_stats_print writes a table whose first line
 * starts with "smalloc" and which names malloc and shows calls_malloc. */

/* The number on the table row whose first word is name, or -1. */
static long long st_table_value(const char *text, const char *name)
{
  size_t len = strlen(name);
  for (const char *line = text; line && *line;) {
    const char *p = line;
    while (*p == ' ')
      p++;
    if (strncmp(p, name, len) == 0 && p[len] == ' ') {
      long long v = -1;
      if (sscanf(p + len, " %lld", &v) == 1)
        return v;
    }
    line = strchr(line, '\n');
    if (line)
      line++;
  }
  return -1;
}

START_TEST(print_table_shape)
{
  static char text[256 * 1024];
  for (int i = 0; i < 7; i++)
    smalloc_free(smalloc_malloc(64));
  char path[64];
  st_tmpname(path, sizeof path);
  FILE *f = fopen(path, "w");
  ck_assert_ptr_nonnull(f);
  ck_assert_int_eq(setvbuf(f, st_filebuf, _IOFBF, sizeof st_filebuf), 0);
  smalloc_stats_t s;
  int rc = st_snap(&s);
  smalloc_stats_print(f);
  fclose(f);
  size_t n = st_slurp(path, text, sizeof text);
  unlink(path);

  ck_assert_int_eq(rc, 0);
  ck_assert_msg(n > 0, "smalloc_stats_print wrote nothing");
  ck_assert_msg(strncmp(text, "smalloc", 7) == 0, "first line: %.80s", text);
  const char *rest = strchr(text, '\n');
  ck_assert_msg(rest != NULL && strstr(rest, "malloc") != NULL,
                "the table never mentions malloc");
  ck_assert_int_eq(st_table_value(text, "calls_malloc"), (long long)s.calls_malloc);
  ck_assert_int_eq(st_table_value(text, "calls_free"), (long long)s.calls_free);
  /* the headline: running time, peak, overhead, fast-path share, slow
   * path per 1000 calls; the classes' fill of their pages */
  ck_assert_msg(strstr(text, ", running ") != NULL && strstr(text, " s)\n") != NULL, "%.100s", text);
  ck_assert_msg(strstr(text, " live blocks (peak ") != NULL, "no peak in:\n%.400s", text);
  ck_assert_msg(strstr(text, " % overhead), ") != NULL, "no overhead in:\n%.400s", text);
  ck_assert_msg(strstr(text, " % on the fast path; ") != NULL, "no fast-path share in:\n%.400s", text);
  ck_assert_msg(strstr(text, " per 1000 calls), ") != NULL, "no rate in:\n%.400s", text);
  const char *classes = strstr(text, "  class ");
  ck_assert_msg(classes != NULL && strncmp(classes, "  class          allocs       frees      in use"
                                           "        peak     pages   used", 66) == 0,
                "class table header: %.120s", classes ? classes : "(none)");
}
END_TEST

/* ============================================================================
 * class_peak_follows_in_use: a class's class_blocks_peak is the highest
 * blocks_in_use sampled: 40 blocks more than before, read while they are
 * live, stay its peak after they are freed (exactly: nothing else runs
 * here), and smalloc_stats_reset brings it back to what is in use now. */

START_TEST(class_peak_follows_in_use)
{
  enum { N = 40 };
  static void *v[N];
  const size_t req = SM_TEST_REQUEST_FOR(7680);
  smalloc_stats_t s0, s1, s2, s3;
  int rc = st_snap(&s0);
  int failed = 0;
  for (int i = 0; i < N; i++)
    failed += (v[i] = smalloc_malloc(req)) == NULL;
  rc |= st_snap(&s1);
  for (int i = 0; i < N; i++)
    smalloc_free(v[i]);
  rc |= st_snap(&s2);
  smalloc_stats_reset();
  rc |= st_snap(&s3);

  ck_assert_int_eq(rc, 0);
  ck_assert_int_eq(failed, 0);
  int c = sm_test_class_index(&s0, req);
  ck_assert_int_ge(c, 0);
  uint64_t u0 = s0.classes[c].blocks_in_use;
  uint64_t want = s0.class_blocks_peak[c] > u0 + N ? s0.class_blocks_peak[c] : u0 + N;
  ck_assert_uint_eq(s1.classes[c].blocks_in_use, u0 + N);
  ck_assert_uint_eq(s1.class_blocks_peak[c], want);
  ck_assert_uint_eq(s2.classes[c].blocks_in_use, u0);
  ck_assert_uint_eq(s2.class_blocks_peak[c], want);
  ck_assert_uint_eq(s3.class_blocks_peak[c], u0);
}
END_TEST

/* ============================================================================
 * class_page_bytes_follow_page_sizes: a class's page bytes add up the
 * pages it holds at their own size, which differs within a class.  Alone,
 * the main thread takes the 512 KiB pages of its own medium segments; a
 * second thread, while main's heap lives, takes its first pages of a
 * medium class from the shared segments, 64 KiB each (smalloc(7)).  The
 * table's "used" column weighs the live blocks against those bytes. */

enum { ST_PB_MAX = 256 };
static void *st_pb_blocks[ST_PB_MAX];
static size_t st_pb_req;
static int st_pb_class, st_pb_n, st_pb_rc;
static smalloc_stats_t st_pb_before, st_pb_after;
static char st_pb_table[64 * 1024];

/* Allocate blocks of st_pb_req until the class holds one page more. */
static void st_pb_grow_one_page(void)
{
  st_pb_rc = st_snap(&st_pb_before);
  st_pb_class = sm_test_class_index(&st_pb_before, st_pb_req);
  st_pb_n = 0;
  if (st_pb_class < 0)
    return;
  uint64_t pages = st_pb_before.classes[st_pb_class].pages_in_use;
  st_pb_after = st_pb_before;
  while (st_pb_n < ST_PB_MAX && st_pb_after.classes[st_pb_class].pages_in_use == pages &&
         (st_pb_blocks[st_pb_n] = smalloc_malloc(st_pb_req)) != NULL) {
    st_pb_n++;
    st_pb_rc |= st_snap(&st_pb_after);
  }
}

/* The "used" percentage on the table's row of the class of block bytes. */
static int st_table_used(const char *text, uint64_t block)
{
  char want[32];
  snprintf(want, sizeof want, "\n  %9llu ", (unsigned long long)block);
  const char *row = strstr(text, want);
  if (!row)
    return -1;
  unsigned long long bs, allocs, frees, in_use, peak, pages;
  int used;
  if (sscanf(row, " %llu %llu %llu %llu %llu %llu %d%%", &bs, &allocs, &frees, &in_use, &peak, &pages,
             &used) != 7)
    return -2;
  return used;
}

static void *st_pb_worker(void *arg)
{
  (void)arg;
  st_pb_grow_one_page();
  FILE *f = fmemopen(st_pb_table, sizeof st_pb_table - 1, "w");
  if (f) {
    smalloc_stats_print(f);
    fclose(f);
  }
  for (int i = 0; i < st_pb_n; i++)
    smalloc_free(st_pb_blocks[i]);
  return NULL;
}

START_TEST(class_page_bytes_follow_page_sizes)
{
  const uint64_t medium = 512 * ST_KiB, small = 64 * ST_KiB;
  /* main alone: a page of its own medium segment */
  st_pb_req = SM_TEST_REQUEST_FOR(5632);
  st_pb_grow_one_page();
  for (int i = 0; i < st_pb_n; i++)
    smalloc_free(st_pb_blocks[i]);
  ck_assert_int_eq(st_pb_rc, 0);
  ck_assert_int_ge(st_pb_class, 0);
  int c = st_pb_class;
  ck_assert_uint_eq(st_pb_after.classes[c].pages_in_use, st_pb_before.classes[c].pages_in_use + 1);
  ck_assert_uint_eq(st_pb_after.class_page_bytes[c], st_pb_before.class_page_bytes[c] + medium);

  /* a second thread: a shared small page */
  st_pb_req = SM_TEST_REQUEST_FOR(6656);
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, st_pb_worker, NULL), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
  ck_assert_int_eq(st_pb_rc, 0);
  ck_assert_int_ge(st_pb_class, 0);
  c = st_pb_class;
  ck_assert_uint_eq(st_pb_after.classes[c].pages_in_use, st_pb_before.classes[c].pages_in_use + 1);
  ck_assert_uint_eq(st_pb_after.class_page_bytes[c], st_pb_before.class_page_bytes[c] + small);
  /* the page holds the worker's blocks only (the last one took it) */
  ck_assert_uint_eq(st_pb_before.class_page_bytes[c], 0);
  int want = (int)(100.0 * (double)st_pb_after.classes[c].blocks_in_use * 6656 /
                   (double)st_pb_after.class_page_bytes[c] + 0.5);
  ck_assert_int_eq(st_table_used(st_pb_table, st_pb_after.classes[c].block_size), want);
}
END_TEST

/* ============================================================================
 * The peaks follow counts that each thread publishes: its net bytes once
 * they changed by 64 KiB either way, its blocks by class once 1 MiB of
 * changes came, and both at its exit; a large or huge block raises
 * bytes_in_use_peak as it is allocated.  smalloc_stats(3): the bytes may
 * lag the exact figure by under 64 KiB a live thread and a class's
 * blocks by 1 MiB's worth, plus the blocks its pages handed out since
 * their counts were last folded (a page a class: 64 KiB of small
 * blocks). */

enum { ST_LAG = 64 << 10, ST_CLASS_LAG = 1 << 20, ST_PAGE = 64 << 10 };

/* peak_counts_a_large_block_at_once: a 4 MiB block allocated and freed
 * with no read in between shows in the peak, at the bytes a read counts
 * for it while it is live. */
START_TEST(peak_counts_a_large_block_at_once)
{
  enum { BIG = 4 << 20 };
  smalloc_stats_t s0, s1, s2, s3;
  smalloc_stats_reset();
  int rc = st_snap(&s0);
  void *p = smalloc_malloc(BIG);
  ck_assert_ptr_nonnull(p);
  rc |= st_snap(&s1);   /* what the block counts for */
  smalloc_free(p);
  smalloc_stats_reset();
  rc |= st_snap(&s2);
  p = smalloc_malloc(BIG);
  ck_assert_ptr_nonnull(p);
  smalloc_free(p);
  rc |= st_snap(&s3);
  ck_assert_int_eq(rc, 0);

  uint64_t block = s1.bytes_in_use - s0.bytes_in_use;
  ck_assert_uint_ge(block, BIG);
  ck_assert_uint_eq(s2.bytes_in_use_peak, s2.bytes_in_use);   /* reset: the peak is what is in use */
  ck_assert_uint_ge(s3.bytes_in_use_peak + ST_LAG, s2.bytes_in_use + block);
  ck_assert_uint_le(s3.bytes_in_use_peak, s2.bytes_in_use + block + ST_LAG);
}
END_TEST

/* peak_counts_every_thread: THREADS threads each hold 2 MiB of 64-byte
 * blocks at once, then free them and exit, with no read of the stats
 * meanwhile: the peak holds all of them, less the lag each thread may
 * leave (the blocks it had not published, and its last page's). */

enum { ST_PT_THREADS = 16, ST_PT_BLOCK = 64, ST_PT_BLOCKS = (2 << 20) / ST_PT_BLOCK };
static pthread_barrier_t st_pt_held;
static void *st_pt_blocks[ST_PT_THREADS][ST_PT_BLOCKS];

static void *st_pt_holder(void *arg)
{
  void **v = arg;
  int failed = 0;
  for (int i = 0; i < ST_PT_BLOCKS; i++)
    failed |= (v[i] = smalloc_malloc(ST_PT_BLOCK)) == NULL;
  pthread_barrier_wait(&st_pt_held);   /* all held at once */
  for (int i = 0; i < ST_PT_BLOCKS; i++)
    smalloc_free(v[i]);
  return (void *)(intptr_t)failed;
}

START_TEST(peak_counts_every_thread)
{
  smalloc_stats_t s0, s1;
  pthread_t t[ST_PT_THREADS];
  ck_assert_int_eq(pthread_barrier_init(&st_pt_held, NULL, ST_PT_THREADS), 0);
  smalloc_stats_reset();
  ck_assert_int_eq(st_snap(&s0), 0);
  for (int i = 0; i < ST_PT_THREADS; i++)
    ck_assert_int_eq(pthread_create(&t[i], NULL, st_pt_holder, st_pt_blocks[i]), 0);
  for (int i = 0; i < ST_PT_THREADS; i++) {
    void *failed;
    ck_assert_int_eq(pthread_join(t[i], &failed), 0);
    ck_assert_ptr_null(failed);
  }
  pthread_barrier_destroy(&st_pt_held);
  ck_assert_int_eq(st_snap(&s1), 0);

  int c = sm_test_class_index(&s1, ST_PT_BLOCK);
  ck_assert_int_ge(c, 0);
  /* at the block size (the secure build's blocks hold a canary more) */
  const uint64_t held = (uint64_t)ST_PT_THREADS * ST_PT_BLOCKS * s1.classes[c].block_size;
  /* what the threads' start left in use (glibc's, a few dozen bytes each) */
  ck_assert_uint_ge(s1.bytes_in_use, s0.bytes_in_use);
  const uint64_t kept = s1.bytes_in_use - s0.bytes_in_use;
  ck_assert_uint_lt(kept, held / 1000);
  ck_assert_uint_ge(s1.bytes_in_use_peak + (uint64_t)ST_PT_THREADS * (ST_LAG + ST_PAGE),
                    s0.bytes_in_use + held);
  /* and not more than was held, give or take what a thread had freed
   * and not published */
  ck_assert_uint_le(s1.bytes_in_use_peak, s0.bytes_in_use + kept + held + (uint64_t)ST_PT_THREADS * ST_LAG);
  ck_assert_uint_ge(s1.class_blocks_peak[c] + (uint64_t)ST_PT_THREADS * (ST_CLASS_LAG + ST_PAGE) / s1.classes[c].block_size,
                    s0.classes[c].blocks_in_use + (uint64_t)ST_PT_THREADS * ST_PT_BLOCKS);
}
END_TEST

/* ============================================================================
 * stats_get_respects_size: a caller built against an older, shorter struct
 * gets no byte written past its size; too small a size and NULL are
 * EINVAL. */

START_TEST(stats_get_respects_size)
{
  static unsigned char buf[sizeof(smalloc_stats_t) + 256];
  const size_t sizes[] = {
    offsetof(smalloc_stats_t, classes),
    offsetof(smalloc_stats_t, calls_free) + sizeof(uint64_t),
    offsetof(smalloc_stats_t, calls_malloc) + 4,  /* mid-field */
    offsetof(smalloc_stats_t, calls_malloc),      /* header only */
  };
  for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
    size_t size = sizes[k];
    memset(buf, 0xAB, sizeof buf);
    memcpy(buf + offsetof(smalloc_stats_t, size), &size, sizeof size);
    int rc = smalloc_stats_get((smalloc_stats_t *)buf);
    ck_assert_msg(rc == 0, "size %zu: smalloc_stats_get returned %d", size, rc);
    uint32_t version;
    memcpy(&version, buf + offsetof(smalloc_stats_t, version), sizeof version);
    ck_assert_uint_eq(version, SMALLOC_STATS_VERSION);
    for (size_t i = size; i < sizeof buf; i++)
      ck_assert_msg(buf[i] == 0xAB, "size %zu: byte %zu was written (%#x)", size, i, buf[i]);
    if (size >= offsetof(smalloc_stats_t, calls_malloc)) {
      uint32_t nclasses;
      memcpy(&nclasses, buf + offsetof(smalloc_stats_t, nclasses), sizeof nclasses);
      ck_assert_uint_eq(nclasses, SMALLOC_STATS_CLASSES);
    }
  }

  /* a newer caller's larger struct: filled up to what the library knows */
  smalloc_stats_t full;
  ck_assert_int_eq(st_snap(&full), 0);
  ck_assert_uint_eq(full.version, SMALLOC_STATS_VERSION);
  ck_assert_uint_eq(full.nclasses, SMALLOC_STATS_CLASSES);
  ck_assert_uint_eq(full.size, sizeof full);

  const size_t bad[] = {0, 1, offsetof(smalloc_stats_t, nclasses) - 1};
  for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
    memset(buf, 0xAB, sizeof buf);
    memcpy(buf, &bad[k], sizeof bad[k]);
    ck_assert_int_eq(smalloc_stats_get((smalloc_stats_t *)buf), EINVAL);
    for (size_t i = sizeof(size_t); i < sizeof buf; i++)
      ck_assert_msg(buf[i] == 0xAB, "size %zu: byte %zu was written", bad[k], i);
  }
  ck_assert_int_eq(smalloc_stats_get(NULL), EINVAL);

  /* the smallest valid size: just the size and version fields */
  size_t small = offsetof(smalloc_stats_t, nclasses);
  memset(buf, 0xAB, sizeof buf);
  memcpy(buf, &small, sizeof small);
  ck_assert_msg(smalloc_stats_get((smalloc_stats_t *)buf) == 0,
                "size %zu (size and version fields): EINVAL", small);
  uint32_t version;
  memcpy(&version, buf + offsetof(smalloc_stats_t, version), sizeof version);
  ck_assert_uint_eq(version, SMALLOC_STATS_VERSION);
  for (size_t i = small; i < sizeof buf; i++)
    ck_assert_msg(buf[i] == 0xAB, "size %zu: byte %zu was written", small, i);
}
END_TEST

/* ============================================================================
 * option_ranges: every option takes its whole documented range and
 * nothing outside it; unknown options are EINVAL. */

START_TEST(option_ranges)
{
  long saved[SMALLOC_OPTION_COUNT];
  for (int i = 0; i < SMALLOC_OPTION_COUNT; i++) {
    const sm_test_option_range_t *r = &sm_test_option_ranges[i];
    saved[i] = smalloc_option_get(r->opt);
    ck_assert_msg(saved[i] >= r->min && saved[i] <= r->max, "option %d is %ld", i, saved[i]);
    ck_assert_int_eq(smalloc_option_set(r->opt, r->min), 0);
    ck_assert_int_eq(smalloc_option_get(r->opt), r->min);
    ck_assert_int_eq(smalloc_option_set(r->opt, r->max), 0);
    ck_assert_int_eq(smalloc_option_get(r->opt), r->max);
    ck_assert_int_eq(smalloc_option_set(r->opt, r->min - 1), EINVAL);
    ck_assert_int_eq(smalloc_option_get(r->opt), r->max);
    ck_assert_int_eq(smalloc_option_set(r->opt, r->max + 1), EINVAL);
    ck_assert_int_eq(smalloc_option_set(r->opt, -1000), EINVAL);
    ck_assert_int_eq(smalloc_option_get(r->opt), r->max);
    ck_assert_int_eq(smalloc_option_set(r->opt, saved[i]), 0);
    ck_assert_int_eq(smalloc_option_get(r->opt), saved[i]);
  }
  const int unknown[] = {-1, SMALLOC_OPTION_COUNT, SMALLOC_OPTION_COUNT + 100};
  for (size_t k = 0; k < 3; k++) {
    errno = 0;
    ck_assert_int_eq(smalloc_option_get((smalloc_option_t)unknown[k]), -1);
    ck_assert_int_eq(errno, EINVAL);
    ck_assert_int_eq(smalloc_option_set((smalloc_option_t)unknown[k], 0), EINVAL);
  }
  for (int i = 0; i < SMALLOC_OPTION_COUNT; i++)
    ck_assert_int_eq(smalloc_option_get(sm_test_option_ranges[i].opt), saved[i]);
}
END_TEST

/* ============================================================================
 * option_retire_cycles_changes_release: retire cycles set at run time
 * (256, neither the default nor 0) keep a churn's pages (8.5 pages of 1 KiB
 * blocks allocated and freed, three rounds after a warm-up): no page is
 * released or taken fresh.  What 0 does (release at once) is churn.c's
 * retire_cycles_zero_is_naive.  Runs in a fresh thread: a heap with no
 * history. */

typedef struct st_churn {
  smalloc_stats_t s0, s1;
  int rc, failed;
} st_churn_t;

/* 1 KiB blocks (small pages, kept the full retire cycles) in both layouts */
enum {
  ST_CHURN_SIZE = SM_TEST_REQUEST_FOR(1024),
  ST_CHURN_BLOCKS = (8 * 64 * 1024 + 32 * 1024) / 1024
};

static void *st_churn_thread(void *arg)
{
  st_churn_t *c = arg;
  void *v[ST_CHURN_BLOCKS];
  for (int round = 0; round < 4; round++) {
    if (round == 1)
      c->rc = st_snap(&c->s0);
    for (int i = 0; i < ST_CHURN_BLOCKS; i++)
      if ((v[i] = smalloc_malloc(ST_CHURN_SIZE)) == NULL)
        c->failed = 1;
    for (int i = 0; i < ST_CHURN_BLOCKS; i++)
      smalloc_free(v[i]);
  }
  c->rc |= st_snap(&c->s1);
  return NULL;
}

static void st_run_churn(st_churn_t *c)
{
  pthread_t t;
  memset(c, 0, sizeof *c);
  ck_assert_int_eq(pthread_create(&t, NULL, st_churn_thread, c), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
  ck_assert_int_eq(c->rc, 0);
  ck_assert_int_eq(c->failed, 0);
}

START_TEST(option_retire_cycles_changes_release)
{
  static st_churn_t def;
  long old = smalloc_option_get(SMALLOC_OPTION_RETIRE_CYCLES);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, 256), 0);
  st_run_churn(&def);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, old), 0);

  ST_EXPECT(&def.s0, &def.s1, pages_released, 0);
  ck_assert_msg(ST_D(&def.s0, &def.s1, pages_retired) >= 3 * 8,
                "%llu pages retired in three rounds",
                (unsigned long long)ST_D(&def.s0, &def.s1, pages_retired));
  ST_EXPECT(&def.s0, &def.s1, slow_steps[SMALLOC_STEP_FRESH_PAGE], 0);
  ST_EXPECT(&def.s0, &def.s1, slow_steps[SMALLOC_STEP_NEW_SEGMENT], 0);
}
END_TEST

/* ============================================================================
 * option_purge_delay_zero_purges / option_segment_cache_zero_unmaps:
 * segments freed into the cache are purged at once with PURGE_DELAY=0 and
 * never with an hour's delay; with SEGMENT_CACHE=0 they are unmapped at
 * once instead of cached.  A thread fills ST_SEGS medium segments (of
 * those all threads share, page.c: sm_page_borrow) with blocks of the
 * 224 KiB class (two per 512 KiB page, sixteen per segment; its first
 * four blocks get mappings of their own), frees them and exits, which
 * sends its empty pages home and the segments to the cache. */

enum { ST_SEGS = 4, ST_SEG_BLOCKS = 16, ST_SEG_BLOCK = 200 * 1024 };

typedef struct st_segrun {
  smalloc_stats_t s0, s1;
  int rc, failed;
} st_segrun_t;

static void *st_segment_filler(void *arg)
{
  st_segrun_t *r = arg;
  void *v[ST_SEGS * ST_SEG_BLOCKS];
  for (int i = 0; i < ST_SEGS * ST_SEG_BLOCKS; i++)
    if ((v[i] = smalloc_malloc(ST_SEG_BLOCK)) == NULL)
      r->failed = 1;
  for (int i = 0; i < ST_SEGS * ST_SEG_BLOCKS; i++)
    smalloc_free(v[i]);
  return NULL;
}

static void st_segment_burst(long cache, long delay, st_segrun_t *r)
{
  pthread_t t;
  memset(r, 0, sizeof *r);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_SEGMENT_CACHE, cache), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, delay), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HEAP_CACHE, 0), 0);   /* taken apart at exit */
  sm_test_heap_here();      /* the filler's pages are shared ones */
  smalloc_collect(true);   /* start from an empty cache, nothing abandoned */
  r->rc = st_snap(&r->s0);
  ck_assert_int_eq(pthread_create(&t, NULL, st_segment_filler, r), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
  smalloc_collect(false);
  r->rc |= st_snap(&r->s1);
  ck_assert_int_eq(r->rc, 0);
  ck_assert_int_eq(r->failed, 0);
  ST_EXPECT(&r->s0, &r->s1, segments_mapped, ST_SEGS);
}

START_TEST(option_purge_delay_zero_purges)
{
  long cache = smalloc_option_get(SMALLOC_OPTION_SEGMENT_CACHE);
  long delay = smalloc_option_get(SMALLOC_OPTION_PURGE_DELAY);
  st_segrun_t now, later;

  st_segment_burst(8, 0, &now);
  ST_EXPECT(&now.s0, &now.s1, segments_cached, ST_SEGS);
  ST_EXPECT(&now.s0, &now.s1, segments_purged, ST_SEGS);
  ck_assert_msg(ST_D(&now.s0, &now.s1, os_madvise) >= ST_SEGS,
                "%llu madvise calls for %d purged segments",
                (unsigned long long)ST_D(&now.s0, &now.s1, os_madvise), ST_SEGS);
  ck_assert_uint_gt(ST_D(&now.s0, &now.s1, bytes_purged), 0);
  ST_EXPECT(&now.s0, &now.s1, segments_unmapped, 0);

  st_segment_burst(8, 3600000, &later);
  ST_EXPECT(&later.s0, &later.s1, segments_cached, ST_SEGS);
  ST_EXPECT(&later.s0, &later.s1, segments_purged, 0);
  ST_EXPECT(&later.s0, &later.s1, os_madvise, 0);
  ST_EXPECT(&later.s0, &later.s1, bytes_purged, 0);
  ST_EXPECT(&later.s0, &later.s1, segments_unmapped, 0);

  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_SEGMENT_CACHE, cache), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, delay), 0);
}
END_TEST

START_TEST(option_segment_cache_zero_unmaps)
{
  long cache = smalloc_option_get(SMALLOC_OPTION_SEGMENT_CACHE);
  long delay = smalloc_option_get(SMALLOC_OPTION_PURGE_DELAY);
  st_segrun_t none, some;

  /* segments_unmapped tells the cache's decision; os_munmap also counts
   * the trimming of over-sized mappings when segments are mapped */
  st_segment_burst(0, 3600000, &none);
  ST_EXPECT(&none.s0, &none.s1, segments_cached, 0);
  ST_EXPECT(&none.s0, &none.s1, segments_unmapped, ST_SEGS);
  ck_assert_msg(ST_D(&none.s0, &none.s1, os_munmap) >= ST_SEGS,
                "%llu munmap calls for %d unmapped segments",
                (unsigned long long)ST_D(&none.s0, &none.s1, os_munmap), ST_SEGS);

  st_segment_burst(8, 3600000, &some);
  ST_EXPECT(&some.s0, &some.s1, segments_cached, ST_SEGS);
  ST_EXPECT(&some.s0, &some.s1, segments_unmapped, 0);

  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_SEGMENT_CACHE, cache), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, delay), 0);
}
END_TEST

/* ---- start-up options: this program run again ------------------------------- */

/* Child modes (argv[1] is ST_CHILD_MARK, argv[2] the mode):
 *   options  print "option INDEX VALUE" for every option on stdout
 *   exit     7 posix_memalign, 3 free_aligned_sized, 4 free; exit normally
 *            (so SMALLOC_STATS prints at exit) */
static uint64_t st_now_ms(void)
{
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000 + (uint64_t)t.tv_nsec / 1000000;
}

static int st_child_main(const char *mode)
{
  if (strcmp(mode, "options") == 0) {
    for (int i = 0; i < SMALLOC_OPTION_COUNT; i++)
      printf("option %d %ld\n", i, smalloc_option_get((smalloc_option_t)i));
    return fflush(stdout) == 0 ? 0 : 1;
  }
  if (strcmp(mode, "churn") == 0) {
    /* 300 ms of bursts over 64 classes: slow paths, and their housekeeping */
    uint64_t t0 = st_now_ms();
    static void *p[3000];
    while (st_now_ms() - t0 < 300) {
      for (int i = 0; i < 3000; i++)
        if ((p[i] = smalloc_malloc(16 + (size_t)(i % 64) * 16)) == NULL)
          return 1;
      for (int i = 0; i < 3000; i++)
        smalloc_free(p[i]);
    }
    return 0;
  }
  if (strcmp(mode, "fastchurn") == 0) {
    /* 300 ms of bursts that the class's current page serves from its own
     * free list: after the first, no slow-path entry of the class (exit 3
     * if there is one; the reports allocate in other classes); the
     * periodic work is the heartbeat's.  The secure build delays the
     * reuse of freed blocks: slow paths there. */
    static void *p[100];
    static smalloc_stats_t s0 = {.size = sizeof s0}, s1 = {.size = sizeof s1};
    uint64_t t0 = 0;
    for (int round = 0; round == 0 || st_now_ms() - t0 < 300; round++) {
      for (int i = 0; i < 100; i++)
        if ((p[i] = smalloc_malloc(64)) == NULL)
          return 1;
      for (int i = 0; i < 100; i++)
        smalloc_free(p[i]);
      if (round == 0) {
        smalloc_stats_get(&s0);
        t0 = st_now_ms();
      }
    }
    smalloc_stats_get(&s1);
    uint64_t slow = 0;
    for (uint32_t c = 0; c < s1.nclasses; c++)
      if (s1.classes[c].block_size == sm_test_class_size(64))
        for (int k = 0; k < SMALLOC_STEP_COUNT; k++)
          slow += s1.classes[c].slow_steps[k] - s0.classes[c].slow_steps[k];
    return slow == 0 || SM_TEST_SECURE ? 0 : 3;
  }
  if (strcmp(mode, "exit") == 0) {
    void *p[7];
    for (int i = 0; i < 7; i++)
      if (smalloc_posix_memalign(&p[i], 64, 100) != 0)
        return 1;
    for (int i = 0; i < 3; i++)
      smalloc_free_aligned_sized(p[i], 64, 100);
    for (int i = 3; i < 7; i++)
      smalloc_free(p[i]);
    return 0;
  }
  return 2;
}

typedef struct st_child {
  int status;
  char out_path[64], err_path[64];
  char out[16 * 1024];
  char err[256 * 1024];
  size_t out_len, err_len;
  long options[SMALLOC_OPTION_COUNT];
  bool have_option[SMALLOC_OPTION_COUNT];
} st_child_t;

/* Run this program in a child mode with the environment minus every
 * SMALLOC_* variable plus env_add (NULL-terminated); capture both
 * streams.  The output files are kept until st_child_done. */
static void st_run_self(const char *mode, const char *const *env_add, st_child_t *c)
{
  memset(c, 0, sizeof *c);
  st_tmpname(c->out_path, sizeof c->out_path);
  st_tmpname(c->err_path, sizeof c->err_path);
  int out = open(c->out_path, O_WRONLY | O_TRUNC);
  int err = open(c->err_path, O_WRONLY | O_TRUNC);
  ck_assert_msg(out >= 0 && err >= 0, "open: %s", strerror(errno));
  const char *argv[] = {"test_stats", ST_CHILD_MARK, mode, NULL};
  pid_t pid = sm_test_rerun_start(argv, env_add, out, err);
  close(out);
  close(err);
  int status = sm_test_rerun_wait(pid);
  c->status = status;
  c->out_len = st_slurp(c->out_path, c->out, sizeof c->out);
  c->err_len = st_slurp(c->err_path, c->err, sizeof c->err);
  ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                "child mode %s failed (status %#x); stderr:\n%s", mode, status, c->err);
  for (const char *line = c->out; line && *line;) {
    int idx;
    long v;
    if (sscanf(line, "option %d %ld", &idx, &v) == 2 && idx >= 0 &&
        idx < SMALLOC_OPTION_COUNT) {
      c->options[idx] = v;
      c->have_option[idx] = true;
    }
    line = strchr(line, '\n');
    if (line)
      line++;
  }
}

static void st_child_done(st_child_t *c)
{
  unlink(c->out_path);
  unlink(c->err_path);
}

static int st_count_lines(const char *text)
{
  int n = 0;
  for (; *text; text++)
    n += *text == '\n';
  return n;
}

static const char *const st_option_env[SMALLOC_OPTION_COUNT] = {
  "SMALLOC_STATS", "SMALLOC_VERBOSE", "SMALLOC_RETIRE_CYCLES",
  "SMALLOC_PURGE_DELAY", "SMALLOC_SEGMENT_CACHE", "SMALLOC_ON_ERROR",
  "SMALLOC_BACKGROUND", "SMALLOC_STATS_INTERVAL", "SMALLOC_PROF", "SMALLOC_PROF_RATE",
  "SMALLOC_PROF_EVENT_RATE", "SMALLOC_PROF_LEAKS", "SMALLOC_PROF_SEED", "SMALLOC_HUGEPAGES",
  "SMALLOC_HEAP_CACHE",
};

/* The options of a child started with a clean environment. */
static void st_default_options(long out[SMALLOC_OPTION_COUNT])
{
  static st_child_t c;
  st_run_self("options", NULL, &c);
  for (int i = 0; i < SMALLOC_OPTION_COUNT; i++) {
    ck_assert_msg(c.have_option[i], "child printed no value for option %d", i);
    out[i] = c.options[i];
  }
  ck_assert_msg(c.err_len == 0, "clean start-up wrote to stderr:\n%s", c.err);
  st_child_done(&c);
}

/* ============================================================================
 * env_options_applied: each variable with a valid value sets its option,
 * silently; VERBOSE=1 prints the effective options at start-up. */

START_TEST(env_options_applied)
{
  static st_child_t c;
  long def[SMALLOC_OPTION_COUNT];
  st_default_options(def);
  ck_assert_int_eq(def[SMALLOC_OPTION_STATS], 0);
  ck_assert_int_eq(def[SMALLOC_OPTION_VERBOSE], 0);
  ck_assert_int_eq(def[SMALLOC_OPTION_ON_ERROR], 0);
  ck_assert_int_eq(def[SMALLOC_OPTION_BACKGROUND], 1);

  static const struct {
    const char *env;
    smalloc_option_t opt;
    long want;
  } cases[] = {
    {"SMALLOC_RETIRE_CYCLES=17", SMALLOC_OPTION_RETIRE_CYCLES, 17},
    {"SMALLOC_RETIRE_CYCLES=0", SMALLOC_OPTION_RETIRE_CYCLES, 0},
    {"SMALLOC_PURGE_DELAY=5", SMALLOC_OPTION_PURGE_DELAY, 5},
    {"SMALLOC_SEGMENT_CACHE=3", SMALLOC_OPTION_SEGMENT_CACHE, 3},
    {"SMALLOC_ON_ERROR=warn", SMALLOC_OPTION_ON_ERROR, 1},
    {"SMALLOC_ON_ERROR=abort", SMALLOC_OPTION_ON_ERROR, 0},
    {"SMALLOC_BACKGROUND=0", SMALLOC_OPTION_BACKGROUND, 0},
    {"SMALLOC_HEAP_CACHE=0", SMALLOC_OPTION_HEAP_CACHE, 0},
    /* words in any case, white space around a value, empty as unset */
    {"SMALLOC_ON_ERROR=WARN", SMALLOC_OPTION_ON_ERROR, 1},
    {"SMALLOC_ON_ERROR= Warn ", SMALLOC_OPTION_ON_ERROR, 1},
    {"SMALLOC_RETIRE_CYCLES= 23 ", SMALLOC_OPTION_RETIRE_CYCLES, 23},
    {"SMALLOC_PURGE_DELAY=", SMALLOC_OPTION_PURGE_DELAY, 1000},
  };
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    const char *env[] = {cases[k].env, NULL};
    st_run_self("options", env, &c);
    for (int i = 0; i < SMALLOC_OPTION_COUNT; i++) {
      long want = i == (int)cases[k].opt ? cases[k].want : def[i];
      ck_assert_msg(c.have_option[i] && c.options[i] == want,
                    "%s: option %s is %ld, want %ld", cases[k].env, st_option_env[i],
                    c.options[i], want);
    }
    ck_assert_msg(c.err_len == 0, "%s: stderr:\n%s", cases[k].env, c.err);
    st_child_done(&c);
  }

  const char *verbose[] = {"SMALLOC_VERBOSE=1", "SMALLOC_RETIRE_CYCLES=77", NULL};
  st_run_self("options", verbose, &c);
  ck_assert_int_eq(c.options[SMALLOC_OPTION_VERBOSE], 1);
  ck_assert_int_eq(c.options[SMALLOC_OPTION_RETIRE_CYCLES], 77);
  ck_assert_msg(strstr(c.err, "SMALLOC_RETIRE_CYCLES") != NULL,
                "SMALLOC_VERBOSE=1 did not print the options:\n%s", c.err);
  for (int i = 0; i < SMALLOC_OPTION_COUNT; i++)
    ck_assert_msg(strstr(c.err, st_option_env[i]) != NULL,
                  "SMALLOC_VERBOSE=1 did not print %s:\n%s", st_option_env[i], c.err);
  ck_assert_msg(strstr(c.err, "77") != NULL, "the effective value 77 is not shown:\n%s", c.err);
  /* and the build: the fast paths' checks it has, secure or not */
  char build[160];
  snprintf(build, sizeof build, "smalloc: build: checks%s%s%s%s%s\n",
           SM_CHECK_FREE_LIST ? " free-list" : "", SM_CHECK_DOUBLE_FREE ? " double-free" : "",
           SM_CHECK_BLOCK_START ? " block-start" : "",
           SM_CHECK_FREE_LIST || SM_CHECK_DOUBLE_FREE || SM_CHECK_BLOCK_START ? "" : " none",
           SM_TEST_SECURE ? "; secure" : "");
  ck_assert_msg(strstr(c.err, build) != NULL, "SMALLOC_VERBOSE=1 did not print '%s':\n%s", build, c.err);
  ck_assert_msg(strstr(c.err, "ignoring") == NULL, "valid values were rejected:\n%s", c.err);
  st_child_done(&c);
}
END_TEST

/* ============================================================================
 * env_stats_at_exit: SMALLOC_STATS=1 prints the table on stderr at exit,
 * SMALLOC_STATS=json one JSON object; both count the child's calls. */

START_TEST(env_stats_at_exit)
{
  static st_child_t c;
  const char *table[] = {"SMALLOC_STATS=1", NULL};
  st_run_self("exit", table, &c);
  ck_assert_msg(c.err_len > 0, "SMALLOC_STATS=1 printed nothing");
  ck_assert_msg(strncmp(c.err, "smalloc", 7) == 0, "first line: %.80s", c.err);
  ck_assert_msg(strstr(strchr(c.err, '\n'), "malloc") != NULL, "no malloc in:\n%s", c.err);
  /* the program named, then the headline */
  ck_assert_msg(strstr(c.err, "statistics: test_stats (pid ") != NULL ||
                    strstr(c.err, "statistics: lt-test_stats (pid ") != NULL,
                "first line: %.80s", c.err);
  ck_assert_msg(strncmp(strchr(c.err, '\n'), "\n  summary: ", 12) == 0, "second line: %.100s",
                strchr(c.err, '\n'));
  ck_assert_msg(strstr(c.err, " live blocks (peak ") != NULL && strstr(c.err, " resident") != NULL,
                "no summary of the memory in:\n%.400s", c.err);
  ck_assert_int_eq(st_table_value(c.err, "calls_posix_memalign"), 7);
  ck_assert_int_eq(st_table_value(c.err, "calls_free_aligned_sized"), 3);
  st_child_done(&c);

  const char *json[] = {"SMALLOC_STATS=json", NULL};
  st_run_self("exit", json, &c);
  ck_assert_msg(c.err_len > 0, "SMALLOC_STATS=json printed nothing");
  ck_assert_msg(c.err[0] == '{', "SMALLOC_STATS=json: stderr starts: %.80s", c.err);
  /* who and with what: pid, program, library version, options in effect */
  ck_assert_msg(strstr(c.err, "\"pid\": ") != NULL, "no pid in: %.300s", c.err);
  ck_assert_msg(strstr(c.err, "\"resident\": ") != NULL && strstr(c.err, "\"running_ms\": ") != NULL,
                "no resident or running_ms in: %.500s", c.err);
  ck_assert_msg(strstr(c.err, "\"program\": \"test_stats\"") != NULL ||
                    strstr(c.err, "\"program\": \"lt-test_stats\"") != NULL,
                "no program in: %.300s", c.err);
  char lib[64];
  snprintf(lib, sizeof lib, "\"library\": \"%d.%d.%d\"", SMALLOC_VERSION_MAJOR,
           SMALLOC_VERSION_MINOR, SMALLOC_VERSION_PATCH);
  ck_assert_msg(strstr(c.err, lib) != NULL, "no %s in: %.300s", lib, c.err);
  ck_assert_msg(strstr(c.err, "\"options\": {\"SMALLOC_STATS\": \"json\", \"SMALLOC_VERBOSE\": 0, "
                              "\"SMALLOC_RETIRE_CYCLES\": 1024") != NULL,
                "no options in: %.400s", c.err);
  st_child_done(&c);

  /* and nothing at all without the variable */
  st_run_self("exit", NULL, &c);
  ck_assert_msg(c.err_len == 0, "stderr without SMALLOC_STATS:\n%s", c.err);
  st_child_done(&c);
}
END_TEST

/* ============================================================================
 * env_stats_json_at_exit: the report SMALLOC_STATS=json prints at exit is
 * valid JSON (python3 reads it) with every figure of the struct, the
 * steps and all the classes, and the child's counts. */

START_TEST(env_stats_json_at_exit)
{
  static st_child_t c;
  const char *json[] = {"SMALLOC_STATS=json", NULL};
  st_run_self("exit", json, &c);
  ck_assert_msg(st_json_valid(c.err_path), "SMALLOC_STATS=json: invalid JSON:\n%.2000s", c.err);
  st_json_figures_t *j = calloc(1, sizeof *j);
  ck_assert_ptr_nonnull(j);
  st_json_figures(c.err_path, j);
  for (size_t i = 0; i < ST_NFIELDS; i++) {
    ck_assert_msg(j->have_top[i], "no \"%s\" in the exit JSON", st_fields[i].name);
    if (strcmp(st_fields[i].name, "calls_posix_memalign") == 0)
      ck_assert_uint_eq(j->top[i], 7);
    if (strcmp(st_fields[i].name, "calls_free_aligned_sized") == 0)
      ck_assert_uint_eq(j->top[i], 3);
  }
  ck_assert_int_eq(j->nsteps, SMALLOC_STEP_COUNT);
  ck_assert_int_eq(j->nclass_entries, SMALLOC_STATS_CLASSES);
  free(j);
  st_child_done(&c);
}
END_TEST

/* ============================================================================
 * env_stats_interval: SMALLOC_STATS_INTERVAL=50 prints reports while the
 * program runs (a child that churns for 300 ms: at least two besides the
 * one at exit, however the machine schedules it), each JSON one a line of
 * its own; into a file, appended after the first; none at all while it is
 * 0; and as many from a child whose bursts never leave the fast path (its
 * heartbeat, every MiB it allocates, looks at the clock). */

START_TEST(env_stats_interval)
{
  static st_child_t c;
  const char *json[] = {"SMALLOC_STATS=json", "SMALLOC_STATS_INTERVAL=50", NULL};
  st_run_self("churn", json, &c);
  int lines = st_count_lines(c.err);
  ck_assert_msg(lines >= 3 && c.err_len < sizeof c.err - 1, "%d reports in 300 ms at 50 ms:\n%.300s",
                lines, c.err);
  for (const char *l = c.err; *l; l = strchr(l, '\n') + 1) {
    size_t n = strcspn(l, "\n");
    ck_assert_msg(l[0] == '{' && l[n - 1] == '}' && l[n] == '\n', "not a JSON line: %.80s", l);
  }
  st_child_done(&c);

  const char *table[] = {"SMALLOC_STATS_INTERVAL=50", NULL};
  st_run_self("churn", table, &c);
  int reports = 0;
  for (const char *l = c.err; (l = strstr(l, "statistics: ")) != NULL; l++)
    reports++;
  ck_assert_msg(reports >= 2, "%d table reports in 300 ms at 50 ms (SMALLOC_STATS=0)", reports);
  st_child_done(&c);

  char dir[] = "/tmp/smalloc-stats.XXXXXX";
  ck_assert_ptr_nonnull(mkdtemp(dir));
  char var[sizeof dir + 32], path[sizeof dir + 8];
  snprintf(var, sizeof var, "SMALLOC_STATS_FILE=%s/st", dir);
  snprintf(path, sizeof path, "%s/st", dir);
  const char *file[] = {"SMALLOC_STATS=json", "SMALLOC_STATS_INTERVAL=50", var, NULL};
  st_run_self("churn", file, &c);
  ck_assert_msg(c.err_len == 0, "stderr:\n%s", c.err);
  static char text[4 << 20];
  size_t n = st_slurp(path, text, sizeof text);
  ck_assert_msg(n > 0 && st_count_lines(text) >= 3, "%d reports in the file", st_count_lines(text));
  unlink(path);
  rmdir(dir);
  st_child_done(&c);

  const char *none[] = {"SMALLOC_STATS=json", NULL};
  st_run_self("churn", none, &c);
  ck_assert_int_eq(st_count_lines(c.err), 1);
  st_child_done(&c);

  /* bursts that never leave the fast path: the reports come all the same
   * (st_run_self asserts the child's exit 0, so no slow path there) */
  st_run_self("fastchurn", json, &c);
  lines = st_count_lines(c.err);
  ck_assert_msg(lines >= 3, "%d reports in 300 ms at 50 ms on the fast path:\n%.300s", lines, c.err);
  st_child_done(&c);
}
END_TEST

/* ============================================================================
 * env_stats_to_a_file: with SMALLOC_STATS_FILE=DIR/st.%p the report at exit
 * goes to DIR/st.<pid> (the child's pid, the one the table names), and
 * nothing to stderr. */

START_TEST(env_stats_to_a_file)
{
  static st_child_t c;
  char dir[] = "/tmp/smalloc-stats.XXXXXX";
  ck_assert_ptr_nonnull(mkdtemp(dir));
  char var[128];
  snprintf(var, sizeof var, "SMALLOC_STATS_FILE=%s/st.%%p", dir);
  const char *env[] = {"SMALLOC_STATS=1", var, NULL};
  st_run_self("exit", env, &c);
  ck_assert_msg(c.err_len == 0, "stderr:\n%s", c.err);
  DIR *d = opendir(dir);
  ck_assert_ptr_nonnull(d);
  char name[256] = "";
  int files = 0;
  for (struct dirent *e; (e = readdir(d)) != NULL;)
    if (e->d_name[0] != '.') {
      files++;
      snprintf(name, sizeof name, "%s", e->d_name);
    }
  closedir(d);
  ck_assert_int_eq(files, 1);
  ck_assert_msg(strncmp(name, "st.", 3) == 0 && strspn(name + 3, "0123456789") == strlen(name + 3),
                "file %s", name);
  char path[512], text[16384], want[64];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE *f = fopen(path, "r");
  ck_assert_ptr_nonnull(f);
  size_t n = fread(text, 1, sizeof text - 1, f);
  text[n] = '\0';
  fclose(f);
  snprintf(want, sizeof want, "(pid %.20s, running ", name + 3);
  ck_assert_msg(strstr(text, want) != NULL && strncmp(text, "smalloc ", 8) == 0, "the file holds:\n%.200s",
                text);
  ck_assert_int_eq(st_table_value(text, "calls_posix_memalign"), 7);
  unlink(path);
  rmdir(dir);
  st_child_done(&c);
}
END_TEST

/* ============================================================================
 * env_malformed_values_fall_back: a malformed value keeps the default and
 * prints exactly one "smalloc: ignoring SMALLOC_X='value': ...; using D"
 * line; every other option keeps its default too. */

START_TEST(env_malformed_values_fall_back)
{
  static st_child_t c;
  long def[SMALLOC_OPTION_COUNT];
  st_default_options(def);

  static const struct {
    smalloc_option_t opt;
    const char *value;
  } cases[] = {
    {SMALLOC_OPTION_RETIRE_CYCLES, "abc"},
    {SMALLOC_OPTION_RETIRE_CYCLES, "-5"},
    {SMALLOC_OPTION_RETIRE_CYCLES, "99999999999"},
    {SMALLOC_OPTION_RETIRE_CYCLES, "99999999999999999999999"},
    {SMALLOC_OPTION_RETIRE_CYCLES, "1000001"},
    {SMALLOC_OPTION_RETIRE_CYCLES, "12x"},
    {SMALLOC_OPTION_RETIRE_CYCLES, "1 2"},
    {SMALLOC_OPTION_STATS, "maybe"},
    {SMALLOC_OPTION_STATS, "3"},
    {SMALLOC_OPTION_VERBOSE, "2"},
    {SMALLOC_OPTION_PURGE_DELAY, "3600001"},
    {SMALLOC_OPTION_SEGMENT_CACHE, "1025"},
    {SMALLOC_OPTION_ON_ERROR, "maybe"},
  };
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    const char *name = st_option_env[cases[k].opt];
    char var[128], prefix[160];
    snprintf(var, sizeof var, "%s=%s", name, cases[k].value);
    snprintf(prefix, sizeof prefix, "smalloc: ignoring %s='%s'", name, cases[k].value);
    const char *env[] = {var, NULL};
    st_run_self("options", env, &c);
    for (int i = 0; i < SMALLOC_OPTION_COUNT; i++)
      ck_assert_msg(c.have_option[i] && c.options[i] == def[i],
                    "%s: option %s is %ld, default %ld", var, st_option_env[i],
                    c.options[i], def[i]);
    ck_assert_msg(st_count_lines(c.err) == 1 && c.err[c.err_len - 1] == '\n',
                  "%s: want one line on stderr, got:\n%s", var, c.err);
    ck_assert_msg(strncmp(c.err, prefix, strlen(prefix)) == 0,
                  "%s: stderr line does not start with \"%s\":\n%s", var, prefix, c.err);
    /* "; using <default>": the number, or its word */
    const char *using = strstr(c.err, "; using ");
    ck_assert_msg(using != NULL, "%s: no \"; using\" in:\n%s", var, c.err);
    using += strlen("; using ");
    char want[32];
    snprintf(want, sizeof want, "%ld\n", def[cases[k].opt]);
    bool ok = strcmp(using, want) == 0;
    if (cases[k].opt == SMALLOC_OPTION_ON_ERROR)
      ok = ok || strcmp(using, def[cases[k].opt] ? "warn\n" : "abort\n") == 0;
    ck_assert_msg(ok, "%s: default shown as \"%s\", want %ld", var, using,
                  def[cases[k].opt]);
    st_child_done(&c);
  }
  /* a word option lists its words */
  const char *bad_word[] = {"SMALLOC_ON_ERROR=maybe", NULL};
  st_run_self("options", bad_word, &c);
  ck_assert_msg(strstr(c.err, "not abort or warn; using abort") != NULL, "stderr:\n%s", c.err);
  st_child_done(&c);
}
END_TEST

/* ============================================================================
 * env_misspelt_names_are_named: a SMALLOC_ variable within two edits of
 * an option's name (case aside) is reported with the name meant, and
 * changes nothing; other SMALLOC_ variables (of scripts and harnesses)
 * are left alone. */

START_TEST(env_misspelt_names_are_named)
{
  static st_child_t c;
  long def[SMALLOC_OPTION_COUNT];
  st_default_options(def);
  static const struct {
    const char *env, *meant;
  } cases[] = {
    {"SMALLOC_STAT=1", "SMALLOC_STATS"},
    {"SMALLOC_RETIRE_CYCLE=5", "SMALLOC_RETIRE_CYCLES"},
    {"SMALLOC_BACKGRUND=0", "SMALLOC_BACKGROUND"},
    {"smalloc_purge_delay=5", NULL},   /* not SMALLOC_: not ours */
    {"SMALLOC_retire_cycles=3", "SMALLOC_RETIRE_CYCLES"},
    {"SMALLOC_LIB=/tmp/x", NULL},
    {"SMALLOC_NO_APT=1", NULL},
  };
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    const char *env[] = {cases[k].env, NULL};
    st_run_self("options", env, &c);
    for (int i = 0; i < SMALLOC_OPTION_COUNT; i++)
      ck_assert_msg(c.have_option[i] && c.options[i] == def[i], "%s: option %s is %ld",
                    cases[k].env, st_option_env[i], c.options[i]);
    if (cases[k].meant == NULL) {
      ck_assert_msg(c.err_len == 0, "%s: stderr:\n%s", cases[k].env, c.err);
    } else {
      char want[160];
      size_t n = strcspn(cases[k].env, "=");
      snprintf(want, sizeof want, "smalloc: ignoring %.*s: no such option; did you mean %s?\n",
               (int)n, cases[k].env, cases[k].meant);
      ck_assert_msg(strcmp(c.err, want) == 0, "%s: stderr is\n%s\nwant\n%s", cases[k].env,
                    c.err, want);
    }
    st_child_done(&c);
  }
}
END_TEST

/* ============================================================================
 * env_conf_sets_several: SMALLOC_CONF="key:value,..." sets several options
 * at once; keys are the names without SMALLOC_ in any case (or the full
 * names), spaces around keys and values are ignored, the separate
 * variables win, and each bad pair is named once while the rest apply. */

START_TEST(env_conf_sets_several)
{
  static st_child_t c;
  long def[SMALLOC_OPTION_COUNT];
  st_default_options(def);
  static const struct {
    const char *env[3];
    long want[SMALLOC_OPTION_COUNT];   /* -1: the default */
    const char *err;                   /* the whole of stderr */
  } cases[] = {
    {{"SMALLOC_CONF=retire_cycles:512,purge_delay:7,on_error:warn", NULL},
     {-1, -1, 512, 7, -1, 1, -1, -1, -1, -1, -1, -1, -1, -1, -1}, ""},
    {{"SMALLOC_CONF= Retire_Cycles : 33 , SMALLOC_BACKGROUND:0,stats_interval:250", NULL},
     {-1, -1, 33, -1, -1, -1, 0, 250, -1, -1, -1, -1, -1, -1, -1}, ""},
    {{"SMALLOC_CONF=retire_cycles:5,segment_cache:2", "SMALLOC_RETIRE_CYCLES=9", NULL},
     {-1, -1, 9, -1, 2, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1}, ""},
    {{"SMALLOC_CONF=retire_cycle:5,purge_delay:3", NULL},
     {-1, -1, -1, 3, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
     "smalloc: ignoring SMALLOC_CONF key 'retire_cycle': no such option; did you mean retire_cycles?\n"},
    {{"SMALLOC_CONF=colour:red,on_error:maybe,segment_cache", NULL},
     {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
     "smalloc: ignoring SMALLOC_CONF key 'colour': no such option\n"
     "smalloc: ignoring SMALLOC_CONF on_error='maybe': not abort or warn; using abort\n"
     "smalloc: ignoring SMALLOC_CONF 'segment_cache': not key:value\n"},
  };
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    st_run_self("options", cases[k].env, &c);
    for (int i = 0; i < SMALLOC_OPTION_COUNT; i++) {
      long want = cases[k].want[i] < 0 ? def[i] : cases[k].want[i];
      ck_assert_msg(c.have_option[i] && c.options[i] == want, "%s: option %s is %ld, want %ld",
                    cases[k].env[0], st_option_env[i], c.options[i], want);
    }
    ck_assert_msg(strcmp(c.err, cases[k].err) == 0, "%s: stderr is\n%s\nwant\n%s", cases[k].env[0],
                  c.err, cases[k].err);
    st_child_done(&c);
  }
}
END_TEST

/* The JSON checks read the reports with python3 (a test dependency that
 * bootstrap and the package's Build-Depends install); without it they are
 * left out and the program reports SKIP (77) when the rest passed. */
static Suite *stats_suite(bool with_json)
{
  Suite *s = suite_create("stats");
  TCase *tc = tcase_create("counters");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, counts_exact_one_thread);
  tcase_add_test(tc, env_misspelt_names_are_named);
  tcase_add_test(tc, env_stats_to_a_file);
  tcase_add_test(tc, counts_failed_and_odd_calls);
  tcase_add_test(tc, counts_large_and_huge);
  tcase_add_test(tc, counts_exact_across_threads);
  tcase_add_test(tc, counts_a_threads_own_unsent_remote_frees);
  tcase_add_test(tc, reset_zeroes_events_keeps_gauges);
  tcase_add_test(tc, print_table_shape);
  tcase_add_test(tc, stats_get_respects_size);
  tcase_add_test(tc, class_peak_follows_in_use);
  tcase_add_test(tc, class_page_bytes_follow_page_sizes);
  tcase_add_test(tc, peak_counts_a_large_block_at_once);
  tcase_add_test(tc, peak_counts_every_thread);
  suite_add_tcase(s, tc);

  tc = tcase_create("options");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, option_ranges);
  tcase_add_test(tc, option_retire_cycles_changes_release);
  tcase_add_test(tc, option_purge_delay_zero_purges);
  tcase_add_test(tc, option_segment_cache_zero_unmaps);
  tcase_add_test(tc, env_options_applied);
  tcase_add_test(tc, env_stats_at_exit);
  tcase_add_test(tc, env_malformed_values_fall_back);
  tcase_add_test(tc, env_conf_sets_several);
  tcase_add_test(tc, env_stats_interval);
  suite_add_tcase(s, tc);

  if (with_json) {
    tc = tcase_create("json");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, json_matches_struct);
    tcase_add_test(tc, env_stats_json_at_exit);
    suite_add_tcase(s, tc);
  }
  return s;
}

int main(int argc, char **argv)
{
  if (argc >= 3 && strcmp(argv[1], ST_CHILD_MARK) == 0)
    return st_child_main(argv[2]);
  bool with_json = st_have_python();
  SRunner *sr = srunner_create(stats_suite(with_json));
  srunner_set_fork_status(sr, CK_FORK);   /* as sm_run_suite (common.h) */
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  if (failed != 0)
    return EXIT_FAILURE;
  if (!with_json) {
    fprintf(stderr, "test_stats: python3 not found: the JSON checks (tcase json) did not run\n");
    return 77;
  }
  return EXIT_SUCCESS;
}
