/* Churn: bursts of small blocks allocated and freed again and again, the
 * workload smalloc is built for.  These tests pin down, through the exact
 * stats counters, that steady churn is served from the thread's own pages
 * (local_free swaps and retired pages) without a single OS call, that
 * retired pages really are kept and really do expire, and that memory goes
 * back to the OS on smalloc_collect(true).
 *
 * Semantics relied on (stated in smalloc_stats(3), smalloc(7) and
 * include/smalloc.h):
 *   - Counters are exact for the calling thread and for exited threads;
 *     other live threads are read racily.  Every measured window below runs
 *     in one thread while any other thread of the process is blocked (in
 *     pthread_join), so its deltas are exact.
 *   - Small pages are 64 KiB slices of 4 MiB segments, so the page of a
 *     small block (<= 1 KiB) is p & ~(64 KiB - 1); larger blocks live in
 *     512 KiB pages.  Page 0 of a segment also holds the segment header and
 *     has fewer blocks than the others.
 *   - The class serving a request, its page size and how many blocks fit
 *     a page come from common.h (sm_test_class_size, sm_test_page_size,
 *     sm_test_page_capacity): the secure layout adds a canary to every
 *     block and a guard to every page.  Tests that want blocks of a given
 *     size ask for SM_TEST_REQUEST_FOR(size) bytes.
 *   - slow_path counts entries into the malloc slow path and every entry is
 *     served by exactly one step: sum(slow_steps) == slow_path.
 *   - A page whose last block is freed (and whose free list is empty) is
 *     retired (pages_retired++) and kept for SMALLOC_RETIRE_CYCLES
 *     slow-path entries of its thread (blocks <= 1 KiB; a quarter of that
 *     above); reusing it counts SMALLOC_STEP_RETIRED_PAGE and pages_reused.
 *     With SMALLOC_RETIRE_CYCLES=0 an emptied page is released at once.
 *   - smalloc_collect(true) releases every empty page of the calling
 *     thread's heap and unmaps the segment cache.
 *
 * Measured windows contain no libcheck call: in fork mode every passing
 * ck_assert sends a message to the runner and allocates (through smalloc
 * when it replaces malloc), which would show up in the counters.  Failures
 * inside a window are recorded and asserted after it.  Bookkeeping arrays
 * live in mmap'd memory for the same reason.
 *
 * Windows that need a heap with no history (page layout, exact step
 * counts) run in a fresh thread: its heap starts with no page at all,
 * whatever the test runner allocated before forking. */
#include "common.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>

#define CH_SANITIZED SM_TEST_SANITIZED

#define CH_KiB ((size_t)1 << 10)
#define CH_MiB ((size_t)1 << 20)
#define CH_GiB ((size_t)1 << 30)
/* The page holding p, a block of a request of n bytes. */
static uintptr_t ch_page_of(const void *p, size_t n)
{
  return (uintptr_t)p & ~(uintptr_t)(sm_test_page_size(sm_test_class_size(n)) - 1);
}

/* ---- failures recorded inside measured windows ------------------------- */

typedef struct ch_err {
  int failed;
  char msg[320];
} ch_err_t;

#define CH_FAIL(e, ...)                                                        \
  do {                                                                         \
    if (!(e)->failed) {                                                        \
      (e)->failed = 1;                                                         \
      snprintf((e)->msg, sizeof (e)->msg, __VA_ARGS__);                        \
    }                                                                          \
  } while (0)

#define CH_ASSERT_OK(e) ck_assert_msg(!(e)->failed, "%s", (e)->msg)

/* ---- memory for bookkeeping, outside the allocator under test ---------- */

static void *ch_map(size_t bytes)
{
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ck_assert_msg(p != MAP_FAILED, "mmap(%zu): %s", bytes, strerror(errno));
  return p;
}

/* The same from a test's own thread, where a failure is recorded in e
 * (libcheck's assertions belong to the main thread); NULL then. */
static void *ch_thread_map(size_t bytes, ch_err_t *e)
{
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p != MAP_FAILED)
    return p;
  CH_FAIL(e, "mmap(%zu): %s", bytes, strerror(errno));
  return NULL;
}

static void ch_unmap(void *p, size_t bytes)
{
  munmap(p, bytes);
}

/* Free the n blocks of v (NULL ones too), then unmap v's max slots. */
static void ch_free_unmap(void **v, size_t n, size_t max)
{
  for (size_t i = 0; i < n; i++)
    smalloc_free(v[i]);
  ch_unmap(v, max * sizeof *v);
}

/* ---- stats ---------------------------------------------------------------- */

#define ch_snap sm_test_snap
#define ch_class sm_test_class_index

static uint64_t ch_steps_sum(const smalloc_stats_t *s)
{
  uint64_t sum = 0;
  for (int k = 0; k < SMALLOC_STEP_COUNT; k++)
    sum += s->slow_steps[k];
  return sum;
}

/* ---- random numbers and patterns ------------------------------------------ */

typedef sm_rng_t ch_rng_t;
#define ch_rand sm_rng_next

static size_t ch_rand_range(ch_rng_t *r, size_t lo, size_t hi)
{
  return lo + (size_t)(ch_rand(r) % (hi - lo + 1));
}

#define ch_mix sm_mix64

/* Word i of the pattern of a block at p in generation gen: two blocks, or
 * two lives of one block, never hold the same bytes. */
static uint64_t ch_word(const void *p, uint64_t gen, size_t i)
{
  return ch_mix((uint64_t)(uintptr_t)p ^ (gen * 0x9E3779B97F4A7C15u) ^
                ((uint64_t)i << 48));
}

/* full: every byte of the block; else its first and last 8 bytes (cheap
 * enough for a thousand rounds, still catches a block handed out twice). */
static void ch_fill(unsigned char *p, size_t n, uint64_t gen, bool full)
{
  size_t words = n / 8;
  for (size_t i = 0; i < words; i++) {
    if (!full && i != 0 && i != words - 1)
      continue;
    uint64_t v = ch_word(p, gen, i);
    memcpy(p + 8 * i, &v, 8);
  }
  if (full)
    for (size_t i = 8 * words; i < n; i++)
      p[i] = (unsigned char)(ch_word(p, gen, words) >> (8 * (i % 8)));
}

static bool ch_verify(const unsigned char *p, size_t n, uint64_t gen, bool full)
{
  size_t words = n / 8;
  for (size_t i = 0; i < words; i++) {
    if (!full && i != 0 && i != words - 1)
      continue;
    uint64_t v;
    memcpy(&v, p + 8 * i, 8);
    if (v != ch_word(p, gen, i))
      return false;
  }
  if (full)
    for (size_t i = 8 * words; i < n; i++)
      if (p[i] != (unsigned char)(ch_word(p, gen, words) >> (8 * (i % 8))))
        return false;
  return true;
}

/* ---- sorting without the allocator (glibc's qsort may call malloc) -------- */

typedef struct ch_span {
  uintptr_t lo, hi;
} ch_span_t;

static bool ch_span_less(const ch_span_t *a, const ch_span_t *b)
{
  return a->lo < b->lo || (a->lo == b->lo && a->hi < b->hi);
}

static void ch_sift(ch_span_t *v, size_t root, size_t n)
{
  for (;;) {
    size_t child = 2 * root + 1;
    if (child >= n)
      return;
    if (child + 1 < n && ch_span_less(&v[child], &v[child + 1]))
      child++;
    if (!ch_span_less(&v[root], &v[child]))
      return;
    ch_span_t t = v[root];
    v[root] = v[child];
    v[child] = t;
    root = child;
  }
}

static void ch_sort(ch_span_t *v, size_t n)
{
  if (n < 2)
    return;
  for (size_t i = n / 2; i-- > 0;)
    ch_sift(v, i, n);
  for (size_t end = n - 1; end > 0; end--) {
    ch_span_t t = v[0];
    v[0] = v[end];
    v[end] = t;
    ch_sift(v, 0, end);
  }
}

static size_t ch_count_distinct(ch_span_t *v, size_t n)
{
  ch_sort(v, n);
  size_t d = 0;
  for (size_t i = 0; i < n; i++)
    if (i == 0 || v[i].lo != v[i - 1].lo)
      d++;
  return d;
}

/* ---- batches ----------------------------------------------------------------- */

typedef struct ch_blk {
  unsigned char *p;
  uint32_t n;
  uint32_t cls; /* index into the test's class list, where it has one */
} ch_blk_t;

enum ch_order { CH_ALLOC_ORDER, CH_REVERSE_ORDER, CH_RANDOM_ORDER, CH_ORDERS };

static const char *const ch_order_names[CH_ORDERS] = {"allocation", "reverse",
                                                      "random"};

/* Allocate b[i].n bytes for every i, fill each block. */
static void ch_alloc_all(ch_blk_t *b, size_t count, uint64_t gen, bool full,
                         ch_err_t *e)
{
  for (size_t i = 0; i < count; i++) {
    b[i].p = smalloc_malloc(b[i].n);
    if (b[i].p == NULL) {
      CH_FAIL(e, "gen %llu: malloc(%u) returned NULL (block %zu)",
              (unsigned long long)gen, b[i].n, i);
      return;
    }
    if (((uintptr_t)b[i].p & 15) != 0)
      CH_FAIL(e, "gen %llu: malloc(%u) = %p is not 16-byte aligned",
              (unsigned long long)gen, b[i].n, (void *)b[i].p);
    ch_fill(b[i].p, b[i].n, gen, full);
  }
}

/* Verify, then free every block, in the given order. */
static void ch_free_all(ch_blk_t *b, size_t count, enum ch_order order,
                        uint64_t gen, bool full, uint32_t *perm, ch_rng_t *r,
                        ch_err_t *e)
{
  if (order == CH_RANDOM_ORDER) {
    for (size_t i = 0; i < count; i++)
      perm[i] = (uint32_t)i;
    for (size_t i = count; i > 1; i--) {
      size_t j = (size_t)(ch_rand(r) % i);
      uint32_t t = perm[i - 1];
      perm[i - 1] = perm[j];
      perm[j] = t;
    }
  }
  for (size_t k = 0; k < count; k++) {
    size_t i = order == CH_ALLOC_ORDER     ? k
               : order == CH_REVERSE_ORDER ? count - 1 - k
                                           : perm[k];
    if (b[i].p == NULL)
      continue;
    if (!ch_verify(b[i].p, b[i].n, gen, full))
      CH_FAIL(e, "gen %llu: block %p (%u bytes) lost its pattern before free "
                 "(%s order)",
              (unsigned long long)gen, (void *)b[i].p, b[i].n,
              ch_order_names[order]);
    smalloc_free(b[i].p);
    b[i].p = NULL;
  }
}

/* No two live blocks overlap (a block handed out twice overlaps itself). */
static void ch_check_disjoint(const ch_blk_t *b, size_t count, ch_span_t *scratch,
                              uint64_t gen, ch_err_t *e)
{
  for (size_t i = 0; i < count; i++) {
    scratch[i].lo = (uintptr_t)b[i].p;
    scratch[i].hi = (uintptr_t)b[i].p + b[i].n;
  }
  ch_sort(scratch, count);
  for (size_t i = 1; i < count; i++)
    if (scratch[i].lo < scratch[i - 1].hi) {
      CH_FAIL(e, "gen %llu: live blocks [%#lx, %#lx) and [%#lx, %#lx) overlap",
              (unsigned long long)gen, (unsigned long)scratch[i - 1].lo,
              (unsigned long)scratch[i - 1].hi, (unsigned long)scratch[i].lo,
              (unsigned long)scratch[i].hi);
      return;
    }
}

/* Distinct small pages holding the blocks of class index cls. */
static size_t ch_pages_of_class(const ch_blk_t *b, size_t count, uint32_t cls,
                                ch_span_t *scratch)
{
  size_t k = 0;
  for (size_t i = 0; i < count; i++)
    if (b[i].cls == cls) {
      scratch[k].lo = ch_page_of(b[i].p, b[i].n);
      scratch[k].hi = 0;
      k++;
    }
  return ch_count_distinct(scratch, k);
}

/* Blocks of several classes, n blocks each, interleaved so that every
 * class grows at once; returns the number of blocks. */
static size_t ch_interleave(ch_blk_t *b, const size_t *sizes,
                            const size_t *counts, size_t nclasses)
{
  size_t k = 0, left = 1;
  for (size_t round = 0; left; round++) {
    left = 0;
    for (size_t c = 0; c < nclasses; c++)
      if (round < counts[c]) {
        b[k].n = (uint32_t)sizes[c];
        b[k].cls = (uint32_t)c;
        b[k].p = NULL;
        k++;
        left = 1;
      }
  }
  return k;
}

/* Requests of size bytes that fill n_pages and a half of the pages of
 * their class (more pages where a guard takes part of each). */
static size_t ch_blocks_for_pages(size_t size, size_t n_pages)
{
  size_t block = sm_test_class_size(size), page = sm_test_page_size(block);
  return (n_pages * page + page / 2) / block;
}

/* ---- running a window in a fresh thread ------------------------------------- */

static void ch_in_thread(void *(*fn)(void *), void *arg)
{
  pthread_t t;
  int rc = pthread_create(&t, NULL, fn, arg);
  ck_assert_msg(rc == 0, "pthread_create: %s", strerror(rc));
  rc = pthread_join(t, NULL);
  ck_assert_msg(rc == 0, "pthread_join: %s", strerror(rc));
}

/* The same with SMALLOC_RETIRE_CYCLES set to cycles meanwhile. */
static void ch_in_thread_retiring(long cycles, void *(*fn)(void *), void *arg)
{
  long old = smalloc_option_get(SMALLOC_OPTION_RETIRE_CYCLES);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, cycles), 0);
  ch_in_thread(fn, arg);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, old), 0);
}

/* ============================================================================
 * churn_correctness: rounds of 1000 mixed 16..256-byte blocks, each filled
 * with a pattern of its address and round and verified before it is
 * freed; the batch and 64 long-lived blocks never overlap; frees go in
 * allocation, reverse and random order in turn. */

START_TEST(churn_correctness)
{
  enum { ROUNDS = 300, BATCH = 1000, ANCHORS = 64, ALL = BATCH + ANCHORS };
  ch_blk_t *b = ch_map(ALL * sizeof *b);
  ch_span_t *scratch = ch_map(ALL * sizeof *scratch);
  uint32_t *perm = ch_map(ALL * sizeof *perm);
  ch_rng_t r = {0x5EEDC0DE12345678u};
  ch_err_t e = {0};
  uint64_t requested = 0;
  smalloc_stats_t s0, s1;
  int rc0, rc1;

  rc0 = ch_snap(&s0);
  /* b[0..ANCHORS) stay live through every round */
  for (size_t i = 0; i < ANCHORS; i++) {
    b[i].n = (uint32_t)ch_rand_range(&r, 16, 256);
    requested += b[i].n;
  }
  ch_alloc_all(b, ANCHORS, UINT64_MAX, true, &e);
  for (unsigned round = 0; round < ROUNDS && !e.failed; round++) {
    ch_blk_t *batch = b + ANCHORS;
    for (size_t i = 0; i < BATCH; i++) {
      batch[i].n = (uint32_t)ch_rand_range(&r, 16, 256);
      requested += batch[i].n;
    }
    ch_alloc_all(batch, BATCH, round, true, &e);
    ch_check_disjoint(b, ALL, scratch, round, &e);
    ch_free_all(batch, BATCH, (enum ch_order)(round % CH_ORDERS), round, true,
                perm, &r, &e);
  }
  ch_free_all(b, ANCHORS, CH_RANDOM_ORDER, UINT64_MAX, true, perm, &r, &e);
  rc1 = ch_snap(&s1);

  ck_assert_int_eq(rc0, 0);
  ck_assert_int_eq(rc1, 0);
  CH_ASSERT_OK(&e);
  uint64_t blocks = ANCHORS + (uint64_t)ROUNDS * BATCH;
  ck_assert_uint_eq(s1.calls_malloc - s0.calls_malloc, blocks);
  ck_assert_uint_eq(s1.calls_free - s0.calls_free, blocks);
  ck_assert_uint_eq(s1.bytes_requested - s0.bytes_requested, requested);
  ck_assert_uint_eq(s1.blocks_in_use, s0.blocks_in_use);
  ch_unmap(b, ALL * sizeof *b);
  ch_unmap(scratch, ALL * sizeof *scratch);
  ch_unmap(perm, ALL * sizeof *perm);
}
END_TEST

/* ============================================================================
 * multi_page_churn_correctness: the same with batches of eight and a half
 * pages of each of seven size classes at once (34816 blocks of 16 bytes,
 * ...), checked to really occupy at least eight pages per class: by the
 * addresses and by stats.classes[i].pages_in_use.  The sizes are requests;
 * their classes are those of sm_test_class_size (the secure layout serves
 * 16-byte requests from 32-byte blocks, and so on). */

static const size_t ch_multi_sizes[] = {16, 48, 112, 256, 640, 1024, 4096};
#define CH_MULTI_CLASSES (sizeof ch_multi_sizes / sizeof ch_multi_sizes[0])

START_TEST(multi_page_churn_correctness)
{
  enum { ROUNDS = 9, PAGES = 8 };
  size_t counts[CH_MULTI_CLASSES], total = 0;
  for (size_t c = 0; c < CH_MULTI_CLASSES; c++) {
    counts[c] = ch_blocks_for_pages(ch_multi_sizes[c], PAGES);
    total += counts[c];
  }
  ch_blk_t *b = ch_map(total * sizeof *b);
  ch_span_t *scratch = ch_map(total * sizeof *scratch);
  uint32_t *perm = ch_map(total * sizeof *perm);
  ch_rng_t r = {0xC0FFEE0123456789u};
  ch_err_t e = {0};
  size_t pages[CH_MULTI_CLASSES];
  uint64_t stat_pages[CH_MULTI_CLASSES];
  int cls_index[CH_MULTI_CLASSES];
  smalloc_stats_t s;

  ck_assert_int_eq(ch_snap(&s), 0);
  for (size_t c = 0; c < CH_MULTI_CLASSES; c++) {
    size_t block = sm_test_class_size(ch_multi_sizes[c]);
    cls_index[c] = ch_class(&s, ch_multi_sizes[c]);
    ck_assert_msg(cls_index[c] >= 0 && s.classes[cls_index[c]].block_size == block,
                  "no size class of exactly %zu bytes", block);
  }

  for (unsigned round = 0; round < ROUNDS; round++) {
    size_t n = ch_interleave(b, ch_multi_sizes, counts, CH_MULTI_CLASSES);
    ck_assert_uint_eq(n, total);
    ch_alloc_all(b, n, round, true, &e);
    CH_ASSERT_OK(&e);
    ch_check_disjoint(b, n, scratch, round, &e);
    CH_ASSERT_OK(&e);
    int rc = ch_snap(&s);
    for (size_t c = 0; c < CH_MULTI_CLASSES; c++) {
      pages[c] = ch_pages_of_class(b, n, (uint32_t)c, scratch);
      stat_pages[c] = s.classes[cls_index[c]].pages_in_use;
    }
    ck_assert_int_eq(rc, 0);
    for (size_t c = 0; c < CH_MULTI_CLASSES; c++) {
      ck_assert_msg(pages[c] >= PAGES,
                    "round %u: %zu blocks of %zu bytes lie in %zu pages, want >= %d",
                    round, counts[c], ch_multi_sizes[c], pages[c], PAGES);
      ck_assert_msg(stat_pages[c] >= pages[c],
                    "round %u: class %zu: pages_in_use %llu while %zu pages hold "
                    "live blocks",
                    round, sm_test_class_size(ch_multi_sizes[c]),
                    (unsigned long long)stat_pages[c], pages[c]);
    }
    ch_free_all(b, n, (enum ch_order)(round % CH_ORDERS), round, true, perm, &r, &e);
    CH_ASSERT_OK(&e);
  }
  ch_unmap(b, total * sizeof *b);
  ch_unmap(scratch, total * sizeof *scratch);
  ch_unmap(perm, total * sizeof *perm);
}
END_TEST

/* ============================================================================
 * churn_no_os_calls: once a pattern has run a few rounds, a thousand more
 * rounds of it make no OS call, map no segment and take no fresh page;
 * every slow-path entry is a local_free swap or a retired page.
 *
 * Why warm-up rounds and not one: pages build their free lists lazily
 * (about 4 KiB per extension step), so a page that ended the first burst
 * partly built is extended by the second; from the third round on every
 * page of the working set is fully built and the set itself no longer
 * changes (each round frees everything it allocated). */

enum { CH_WARMUP = 3, CH_STEADY_ROUNDS = 1000, CH_PINGPONG = 1000000 };

/* Pattern A: one batch of 1000 blocks of 16..256 bytes, the same sizes
 * every round (a round asking more of a class than the last would extend
 * its page: correct, but not steady). */
enum { CH_SMALL_BATCH = 1000 };
/* Pattern B: eight and a half pages of each of these (all <= 1 KiB, so
 * their pages are kept the full retire cycles; about 30 slow-path entries
 * a round, far below the default 1024). */
static const size_t ch_steady_sizes[] = {
  SM_TEST_REQUEST_FOR(128), SM_TEST_REQUEST_FOR(256), SM_TEST_REQUEST_FOR(1024)};
#define CH_STEADY_CLASSES (sizeof ch_steady_sizes / sizeof ch_steady_sizes[0])

typedef struct ch_window {
  smalloc_stats_t s0, s1;
  int rc;
  uint64_t rounds, blocks_per_round;
} ch_window_t;

typedef struct ch_steady {
  ch_window_t small, multi, pingpong;
  ch_err_t e;
} ch_steady_t;

/* Set up the blocks of a pattern; returns their number. */
static size_t ch_pattern_blocks(ch_blk_t *b, bool multi)
{
  if (multi) {
    size_t counts[CH_STEADY_CLASSES];
    for (size_t c = 0; c < CH_STEADY_CLASSES; c++)
      counts[c] = ch_blocks_for_pages(ch_steady_sizes[c], 8);
    return ch_interleave(b, ch_steady_sizes, counts, CH_STEADY_CLASSES);
  }
  ch_rng_t r = {0xBADC0FFEE0DDF00Du};
  for (size_t i = 0; i < CH_SMALL_BATCH; i++) {
    b[i].n = (uint32_t)ch_rand_range(&r, 16, 256);
    b[i].cls = 0;
    b[i].p = NULL;
  }
  return CH_SMALL_BATCH;
}

static size_t ch_pattern_max_blocks(void)
{
  size_t n = 0;
  for (size_t c = 0; c < CH_STEADY_CLASSES; c++)
    n += ch_blocks_for_pages(ch_steady_sizes[c], 8);
  return n > CH_SMALL_BATCH ? n : CH_SMALL_BATCH;
}

/* Warm-up rounds, then measured rounds between two snapshots.  Rounds
 * cycle through the three free orders. */
static void ch_run_pattern(ch_window_t *w, bool multi, unsigned warmup,
                           unsigned rounds, ch_blk_t *b, uint32_t *perm,
                           ch_err_t *e)
{
  ch_rng_t r = {multi ? 0x1234567887654321u : 0x0F1E2D3C4B5A6978u};
  size_t n = ch_pattern_blocks(b, multi);
  w->blocks_per_round = n;
  w->rounds = rounds;
  for (unsigned i = 0; i < warmup + rounds; i++) {
    if (i == warmup)
      w->rc = ch_snap(&w->s0);
    ch_alloc_all(b, n, i, false, e);
    ch_free_all(b, n, (enum ch_order)(i % CH_ORDERS), i, false, perm, &r, e);
  }
  w->rc |= ch_snap(&w->s1);
}

static void *ch_steady_thread(void *arg)
{
  ch_steady_t *st = arg;
  size_t max = ch_pattern_max_blocks();
  ch_blk_t *b = ch_thread_map(max * sizeof *b, &st->e);
  uint32_t *perm = ch_thread_map(max * sizeof *perm, &st->e);
  if (b == NULL || perm == NULL)
    return NULL;
  /* An empty segment cache: a segment cached before the test would be
   * purged (madvise) once it outlived the purge delay. */
  smalloc_collect(true);
  ch_run_pattern(&st->small, false, CH_WARMUP, CH_STEADY_ROUNDS, b, perm, &st->e);
  /* The first pattern's pages, empty and idle from now on, would be
   * retired by the slow path's sweep and released in the next window. */
  smalloc_collect(true);
  ch_run_pattern(&st->multi, true, CH_WARMUP, CH_STEADY_ROUNDS, b, perm, &st->e);
  smalloc_collect(true);

  /* ping-pong: malloc(32), free, a million times */
  for (unsigned i = 0; i < 1000; i++)
    smalloc_free(smalloc_malloc(32));
  st->pingpong.rc = ch_snap(&st->pingpong.s0);
  for (unsigned i = 0; i < CH_PINGPONG; i++) {
    void *volatile p = smalloc_malloc(32);
    if (p == NULL)
      CH_FAIL(&st->e, "ping-pong: malloc(32) returned NULL");
    smalloc_free(p);
  }
  st->pingpong.rc |= ch_snap(&st->pingpong.s1);
  st->pingpong.rounds = CH_PINGPONG;
  munmap(b, max * sizeof *b);
  munmap(perm, max * sizeof *perm);
  return NULL;
}

#define CH_DELTA(w, f) ((w)->s1.f - (w)->s0.f)

/* No OS call, no segment, no fresh page in the window. */
static void ch_assert_no_os(const ch_window_t *w, const char *what)
{
  ck_assert_msg(w->rc == 0, "%s: smalloc_stats_get failed", what);
#define CH_ZERO(f)                                                             \
  ck_assert_msg(CH_DELTA(w, f) == 0, "%s: %s grew by %llu", what, #f,          \
                (unsigned long long)CH_DELTA(w, f))
  CH_ZERO(segments_mapped);
  CH_ZERO(os_mmap);
  CH_ZERO(os_munmap);
  CH_ZERO(os_madvise);
  CH_ZERO(os_mremap);
  CH_ZERO(slow_steps[SMALLOC_STEP_FRESH_PAGE]);
  CH_ZERO(slow_steps[SMALLOC_STEP_NEW_SEGMENT]);
#undef CH_ZERO
}

/* Every slow-path entry of the window was a local swap or a retired page,
 * and the steps add up to slow_path. */
static void ch_assert_steps_steady(const ch_window_t *w, const char *what)
{
  uint64_t sum = 0;
  for (int k = 0; k < SMALLOC_STEP_COUNT; k++) {
    uint64_t d = CH_DELTA(w, slow_steps[k]);
    sum += d;
    if (k != SMALLOC_STEP_LOCAL_SWAP && k != SMALLOC_STEP_RETIRED_PAGE)
      ck_assert_msg(d == 0, "%s: %llu slow-path entries served by %s", what,
                    (unsigned long long)d, sm_test_step_names[k]);
  }
  ck_assert_msg(CH_DELTA(w, slow_path) == sum,
                "%s: slow_path grew by %llu but the steps by %llu", what,
                (unsigned long long)CH_DELTA(w, slow_path),
                (unsigned long long)sum);
  ck_assert_msg(CH_DELTA(w, pages_released) == 0, "%s: %llu pages released",
                what, (unsigned long long)CH_DELTA(w, pages_released));
}

START_TEST(churn_no_os_calls)
{
  static ch_steady_t st;
  /* Pages that warm-up left free in their segments are given back once
   * they have been free for the purge delay, which a slow machine can
   * reach inside a window: that is memory returned, not churn. */
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 3600000), 0);
  ch_in_thread(ch_steady_thread, &st);
  CH_ASSERT_OK(&st.e);

  ch_assert_no_os(&st.small, "mixed batch");
  ch_assert_steps_steady(&st.small, "mixed batch");
  ck_assert_uint_eq(CH_DELTA(&st.small, calls_malloc),
                    st.small.rounds * st.small.blocks_per_round);

  ch_assert_no_os(&st.multi, "multi-page batch");
  ch_assert_steps_steady(&st.multi, "multi-page batch");
  /* Each class switches pages at least 7 times a round (8.5 pages): those
   * switches must have been served by retired pages. */
  uint64_t reused = CH_DELTA(&st.multi, slow_steps[SMALLOC_STEP_RETIRED_PAGE]);
  ck_assert_msg(reused >= st.multi.rounds * CH_STEADY_CLASSES * 7,
                "multi-page batch: only %llu retired-page steps in %llu rounds",
                (unsigned long long)reused, (unsigned long long)st.multi.rounds);
  ck_assert_uint_eq(CH_DELTA(&st.multi, pages_reused), reused);

  /* Ping-pong: a block freed goes to local_free, so the page's free list
   * runs dry once per batch of blocks built by one extension (4 KiB, 128
   * blocks of 32 bytes), and that one entry swaps the whole batch back.
   * "Few" slow-path entries: at most one per 64 pairs. */
  ch_assert_no_os(&st.pingpong, "ping-pong");
  ck_assert_uint_eq(CH_DELTA(&st.pingpong, calls_malloc), CH_PINGPONG);
  ck_assert_uint_eq(CH_DELTA(&st.pingpong, calls_free), CH_PINGPONG);
  ck_assert_msg(CH_DELTA(&st.pingpong, slow_path) <= CH_PINGPONG / 64,
                "ping-pong: %llu slow-path entries for %d malloc/free pairs",
                (unsigned long long)CH_DELTA(&st.pingpong, slow_path),
                CH_PINGPONG);
  ck_assert_uint_eq(ch_steps_sum(&st.pingpong.s1) - ch_steps_sum(&st.pingpong.s0),
                    CH_DELTA(&st.pingpong, slow_path));
}
END_TEST

/* ============================================================================
 * emptied_only_page_stays_current: a page of 1 KiB blocks filled exactly,
 * then emptied, is still the page malloc takes blocks from: the next
 * malloc of its class is the block freed last, on the fast path (no
 * slow-path entry, no page retired, reused or released).  The secure
 * build delays the reuse of freed blocks: there the emptied page retires
 * and serves the next malloc as a retired page (one slow-path entry).
 *
 * How the page is filled exactly without knowing its capacity: allocate
 * until the blocks have crossed onto a third page.  The second page was
 * then filled from its first block to its last, which gives the capacity
 * of a page that is not the segment's first; the third page (fresh, not
 * the segment's first either) is filled up to that capacity.  The first
 * two pages stay full, so the third is the only page in its class queue. */

typedef struct ch_only {
  ch_err_t e;
  smalloc_stats_t s0, s1;
  int rc;
  uintptr_t page, got;
  void *last, *q;
  size_t capacity;
} ch_only_t;

enum { CH_ONLY_SIZE = SM_TEST_REQUEST_FOR(1024), CH_ONLY_MAX = 4 * 64 };

/* Fill pages up to and including a third page of exactly capacity blocks.
 * Returns the number of blocks; [*third, count) lie on the third page. */
static size_t ch_fill_third_page(void **v, size_t *third, size_t *capacity,
                                 ch_err_t *e)
{
  size_t n = 0, crossings = 0, second = 0;
  while (crossings < 2) {
    if (n == CH_ONLY_MAX) {
      CH_FAIL(e, "no third page after %d blocks", CH_ONLY_MAX);
      return n;
    }
    v[n] = smalloc_malloc(CH_ONLY_SIZE);
    if (v[n] == NULL) {
      CH_FAIL(e, "malloc(%d) returned NULL", CH_ONLY_SIZE);
      return n;
    }
    if (n > 0 && ch_page_of(v[n], CH_ONLY_SIZE) != ch_page_of(v[n - 1], CH_ONLY_SIZE)) {
      crossings++;
      if (crossings == 1)
        second = n;
    }
    n++;
  }
  *third = n - 1;
  *capacity = *third - second;
  for (size_t i = 1; i < *capacity; i++) {
    v[n] = smalloc_malloc(CH_ONLY_SIZE);
    if (v[n] == NULL ||
        ch_page_of(v[n], CH_ONLY_SIZE) != ch_page_of(v[*third], CH_ONLY_SIZE)) {
      CH_FAIL(e, "block %zu of the third page (capacity %zu) is %p, not on page %#lx",
              i, *capacity, v[n], (unsigned long)ch_page_of(v[*third], CH_ONLY_SIZE));
      return n + (v[n] != NULL);
    }
    n++;
  }
  return n;
}

static void *ch_only_thread(void *arg)
{
  ch_only_t *o = arg;
  void *v[CH_ONLY_MAX + 1];
  size_t third = 0;
  size_t n = ch_fill_third_page(v, &third, &o->capacity, &o->e);
  if (!o->e.failed) {
    o->page = ch_page_of(v[third], CH_ONLY_SIZE);
    o->rc = ch_snap(&o->s0);
    for (size_t i = third; i < n; i++)
      smalloc_free(v[i]);
    o->last = v[n - 1];
    void *q = smalloc_malloc(CH_ONLY_SIZE);
    o->rc |= ch_snap(&o->s1);
    o->q = q;
    o->got = ch_page_of(q, CH_ONLY_SIZE);
    smalloc_free(q);
    n = third;
  }
  for (size_t i = 0; i < n; i++)
    smalloc_free(v[i]);
  return NULL;
}

START_TEST(emptied_only_page_stays_current)
{
  static ch_only_t o;
  ch_in_thread(ch_only_thread, &o);
  CH_ASSERT_OK(&o.e);
  ck_assert_int_eq(o.rc, 0);
  /* 64 in the plain layout; the secure one has bigger blocks and a guard */
  ck_assert_msg(o.capacity >= 2 &&
                    o.capacity <= sm_test_page_capacity(sm_test_class_size(CH_ONLY_SIZE), 1),
                "a page of %zu-byte blocks holds %zu blocks",
                sm_test_class_size(CH_ONLY_SIZE), o.capacity);
  ck_assert_msg(o.got == o.page,
                "malloc after emptying page %#lx returned a block of page %#lx",
                (unsigned long)o.page, (unsigned long)o.got);
  ck_assert_uint_eq(o.s1.pages_released - o.s0.pages_released, 0);
  int c = ch_class(&o.s1, CH_ONLY_SIZE);
  ck_assert_int_ge(c, 0);
  ck_assert_uint_eq(o.s1.classes[c].blocks_in_use, o.s0.classes[c].blocks_in_use - o.capacity + 1);
  if (SM_TEST_SECURE) {
    ck_assert_uint_eq(o.s1.pages_retired - o.s0.pages_retired, 1);
    ck_assert_uint_eq(o.s1.pages_reused - o.s0.pages_reused, 1);
    ck_assert_uint_eq(o.s1.slow_path - o.s0.slow_path, 1);
    ck_assert_uint_eq(o.s1.classes[c].slow_steps[SMALLOC_STEP_RETIRED_PAGE] -
                          o.s0.classes[c].slow_steps[SMALLOC_STEP_RETIRED_PAGE],
                      1);
    return;
  }
  ck_assert_ptr_eq(o.q, o.last);   /* the block freed last, still in the cache */
  ck_assert_uint_eq(o.s1.pages_retired - o.s0.pages_retired, 0);
  ck_assert_uint_eq(o.s1.pages_reused - o.s0.pages_reused, 0);
  ck_assert_uint_eq(o.s1.slow_path - o.s0.slow_path, 0);
}
END_TEST

/* ---- pages of one class filled in turn ------------------------------------ */

/* Blocks of `size` into v (room for max) until the first block of page
 * number `pages` is taken; first[k] is where page k's blocks start in v
 * (page 0 at 0).  Returns how many were taken; a failure goes to e. */
static size_t ch_fill_pages(void **v, size_t max, size_t size, size_t pages, size_t *first,
                            ch_err_t *e)
{
  size_t n = 0, page = 0;
  first[0] = 0;
  while (page + 1 < pages && n < max) {
    v[n] = smalloc_malloc(size);
    if (v[n] == NULL) {
      CH_FAIL(e, "malloc(%zu) returned NULL", size);
      return n;
    }
    if (n > 0 && ch_page_of(v[n], size) != ch_page_of(v[n - 1], size))
      first[++page] = n;
    n++;
  }
  if (page + 1 < pages) CH_FAIL(e, "page %zu not reached after %zu blocks", pages, n);
  return n;
}

/* The owner's frees into a full page of `capacity` blocks that bring it
 * back to its queue: a sixteenth of its blocks, at most 16, at least 1
 * (smalloc(7)). */
static size_t ch_unfull_frees(size_t capacity)
{
  size_t want = capacity / 16 < 16 ? capacity / 16 : 16;
  return want == 0 ? 1 : want;
}

/* ============================================================================
 * full_page_waits_for_blocks: a page whose every block is in use leaves
 * its class's queue for the full list; the owner's frees into it bring it
 * back once they number a sixteenth of its blocks (at most 16, at least
 * one), not at the first free, so that malloc does not come back to a
 * page for a block or two (smalloc(7)); smalloc_collect(true) brings back
 * a page with any block freed.  Counted in pages_unfull, exactly: the
 * windows run in a fresh thread and make no malloc. */

enum { CH_WAKE_SIZE = SM_TEST_REQUEST_FOR(256), CH_WAKE_MAX = 3 * 256 + 1 };

typedef struct ch_wake {
  ch_err_t e;
  int rc;
  size_t capacity, want;
  smalloc_stats_t s[5];
} ch_wake_t;

static void *ch_wake_thread(void *arg)
{
  ch_wake_t *w = arg;
  void **v = ch_thread_map(CH_WAKE_MAX * sizeof *v, &w->e);
  if (v == NULL)
    return NULL;
  /* pages A, B and C filled, the first block of D taken: A to C are on
   * the full list; [b0, c0) are B's blocks, C's start at c0 */
  size_t first[4] = {0};
  size_t n = ch_fill_pages(v, CH_WAKE_MAX, CH_WAKE_SIZE, 4, first, &w->e);
  size_t b0 = first[1], c0 = first[2];
  if (!w->e.failed) {
    w->capacity = c0 - b0;
    w->want = ch_unfull_frees(w->capacity);
    w->rc |= ch_snap(&w->s[0]);
    for (size_t i = 0; i + 1 < w->want; i++)
      smalloc_free(v[b0 + i]);   /* B stays on the full list */
    w->rc |= ch_snap(&w->s[1]);
    smalloc_free(v[b0 + w->want - 1]);   /* B goes back */
    w->rc |= ch_snap(&w->s[2]);
    smalloc_free(v[c0]);   /* C stays */
    w->rc |= ch_snap(&w->s[3]);
    smalloc_collect(true);   /* C goes back */
    w->rc |= ch_snap(&w->s[4]);
    v[c0] = NULL;
    for (size_t i = 0; i < w->want; i++) v[b0 + i] = NULL;
  }
  ch_free_unmap(v, n, CH_WAKE_MAX);
  return NULL;
}

START_TEST(full_page_waits_for_blocks)
{
  static ch_wake_t w;
  ch_in_thread(ch_wake_thread, &w);
  CH_ASSERT_OK(&w.e);
  ck_assert_int_eq(w.rc, 0);
  ck_assert_uint_eq(w.capacity, sm_test_page_capacity(sm_test_class_size(CH_WAKE_SIZE), 1));
  for (int i = 1; i < 5; i++)
    ck_assert_uint_eq(w.s[i].pages_full - w.s[i - 1].pages_full, 0);
  ck_assert_uint_eq(w.s[1].pages_unfull - w.s[0].pages_unfull, 0);
  ck_assert_uint_eq(w.s[2].pages_unfull - w.s[1].pages_unfull, 1);
  ck_assert_uint_eq(w.s[3].pages_unfull - w.s[2].pages_unfull, 0);
  ck_assert_uint_eq(w.s[4].pages_unfull - w.s[3].pages_unfull, 1);
}
END_TEST

/* ============================================================================
 * exhausted_page_goes_back_once: a page of a class's queue that runs out
 * of blocks while other pages of the class wait behind it goes to the
 * back of the queue, not to the full list, so that the owner's frees
 * into it stay on the fast path; met again with no block, it goes to the
 * full list (page.c: sm_page_exhausted).  Pages A and B are filled (each
 * the only page of its queue when it ran out: full list), the first block
 * of C taken, and A and B each freed the blocks that bring a full page
 * back: the queue is C, A, B.  C filled to its last block, the next
 * malloc sends C to the back and takes A's blocks (no page full); A
 * emptied, the next sends A back and takes B's; B emptied, the next
 * meets B, C and A with no block: all three go to the full list, and a
 * fourth page serves.  Exact counts in pages_full. */

enum { CH_RQ_SIZE = SM_TEST_REQUEST_FOR(64), CH_RQ_MAX = 4 * 1024 + 64 };

typedef struct ch_rq {
  ch_err_t e;
  int rc;
  size_t capacity, want;
  int fourth_page;
  smalloc_stats_t s[4];
} ch_rq_t;

/* n more blocks of CH_RQ_SIZE into v[*at...] */
static void ch_rq_take(ch_rq_t *w, void **v, size_t *at, size_t n)
{
  for (size_t i = 0; i < n && !w->e.failed; i++) {
    if (*at >= CH_RQ_MAX) {
      CH_FAIL(&w->e, "more than %d blocks", CH_RQ_MAX);
      return;
    }
    v[*at] = smalloc_malloc(CH_RQ_SIZE);
    if (v[*at] == NULL)
      CH_FAIL(&w->e, "malloc(%d) returned NULL", CH_RQ_SIZE);
    (*at)++;
  }
}

static void *ch_rq_thread(void *arg)
{
  ch_rq_t *w = arg;
  void **v = ch_thread_map(CH_RQ_MAX * sizeof *v, &w->e);
  if (v == NULL)
    return NULL;
  /* pages A and B filled, the first block of C taken */
  size_t first[3] = {0};
  size_t n = ch_fill_pages(v, CH_RQ_MAX, CH_RQ_SIZE, 3, first, &w->e);
  size_t b0 = first[1], c0 = first[2];
  if (!w->e.failed) {
    size_t cap = c0 - b0;   /* B's blocks; every page of the class holds as many */
    w->capacity = cap;
    w->want = ch_unfull_frees(cap);
    for (size_t i = 0; i < w->want; i++) {
      smalloc_free(v[i]);        /* A's first blocks: A back, behind C */
      v[i] = NULL;
    }
    for (size_t i = 0; i < w->want; i++) {
      smalloc_free(v[b0 + i]);   /* B's: B back, behind A */
      v[b0 + i] = NULL;
    }
    w->rc |= ch_snap(&w->s[0]);
    ch_rq_take(w, v, &n, cap);   /* the rest of C (all but one), then one from A */
    w->rc |= ch_snap(&w->s[1]);
    ch_rq_take(w, v, &n, w->want);   /* the rest of A, then one from B */
    w->rc |= ch_snap(&w->s[2]);
    ch_rq_take(w, v, &n, w->want);   /* the rest of B, then one from a fourth page */
    w->rc |= ch_snap(&w->s[3]);
    if (!w->e.failed) {
      uintptr_t last = ch_page_of(v[n - 1], CH_RQ_SIZE);
      w->fourth_page = last != ch_page_of(v[w->want], CH_RQ_SIZE) &&
                       last != ch_page_of(v[b0 + w->want], CH_RQ_SIZE) &&
                       last != ch_page_of(v[c0], CH_RQ_SIZE);
    }
  }
  ch_free_unmap(v, n, CH_RQ_MAX);
  return NULL;
}

START_TEST(exhausted_page_goes_back_once)
{
  static ch_rq_t w;
  ch_in_thread(ch_rq_thread, &w);
  CH_ASSERT_OK(&w.e);
  ck_assert_int_eq(w.rc, 0);
  ck_assert_uint_eq(w.capacity, sm_test_page_capacity(sm_test_class_size(CH_RQ_SIZE), 1));
  ck_assert_uint_eq(w.s[1].pages_full - w.s[0].pages_full, 0);
  ck_assert_uint_eq(w.s[2].pages_full - w.s[1].pages_full, 0);
  ck_assert_uint_eq(w.s[3].pages_full - w.s[2].pages_full, 3);
  ck_assert_int_eq(w.fourth_page, 1);
  int c = ch_class(&w.s[0], CH_RQ_SIZE);
  ck_assert_uint_eq(w.s[1].classes[c].slow_steps[SMALLOC_STEP_NEXT_PAGE] -
                        w.s[0].classes[c].slow_steps[SMALLOC_STEP_NEXT_PAGE],
                    1);
  ck_assert_uint_eq(w.s[2].classes[c].slow_steps[SMALLOC_STEP_NEXT_PAGE] -
                        w.s[1].classes[c].slow_steps[SMALLOC_STEP_NEXT_PAGE],
                    1);
}
END_TEST

/* ============================================================================
 * pages_fill_before_extension: when the class's first page has run out of
 * built blocks, the slow path takes a page behind it that holds at least
 * as many free blocks as an extension builds (4 KiB of blocks, page.c),
 * rather than extend the first page into memory never touched; behind a
 * page with fewer, it extends (smalloc(7), step 3).  Page A is filled, a
 * block of fresh page B taken, and A given back `freed` of its blocks (A
 * returns to the queue behind B at its 16th); once B's built blocks are
 * used up, one malloc: exactly one slow path, by next_page into A when A
 * has an extension's worth, by extend in B when it has fewer. */

enum { CH_FILL_BLOCK = 64, CH_FILL_SIZE = SM_TEST_REQUEST_FOR(CH_FILL_BLOCK),
       CH_FILL_EXTEND = 4096 / CH_FILL_BLOCK, CH_FILL_MAX = 2 * 65536 / CH_FILL_BLOCK };

typedef struct ch_fill {
  ch_err_t e;
  int rc;
  size_t freed;
  uintptr_t page_a, page_b, got;
  smalloc_stats_t s0, s1;
} ch_fill_t;

static void *ch_fill_thread(void *arg)
{
  ch_fill_t *f = arg;
  void **v = ch_thread_map(CH_FILL_MAX * sizeof *v, &f->e);
  if (v == NULL)
    return NULL;
  size_t n = 0;
  for (; n < CH_FILL_MAX; n++) {
    v[n] = smalloc_malloc(CH_FILL_SIZE);
    if (v[n] == NULL) {
      CH_FAIL(&f->e, "malloc(%d) returned NULL", CH_FILL_SIZE);
      break;
    }
    if (n > 0 && ch_page_of(v[n], CH_FILL_SIZE) != ch_page_of(v[0], CH_FILL_SIZE))
      break;   /* v[n] is B's first block */
  }
  if (n == CH_FILL_MAX && !f->e.failed) CH_FAIL(&f->e, "no second page after %zu blocks", n);
  if (!f->e.failed) {
    f->page_a = ch_page_of(v[0], CH_FILL_SIZE);
    f->page_b = ch_page_of(v[n], CH_FILL_SIZE);
    for (size_t i = 0; i < f->freed; i++) {
      smalloc_free(v[i]);
      v[i] = NULL;
    }
    size_t m = n + 1;
    for (size_t i = 1; i < CH_FILL_EXTEND && m < CH_FILL_MAX; i++, m++) {   /* B's built blocks */
      v[m] = smalloc_malloc(CH_FILL_SIZE);
      if (v[m] == NULL || ch_page_of(v[m], CH_FILL_SIZE) != f->page_b) {
        CH_FAIL(&f->e, "block %zu of page B: %p", i, v[m]);
        break;
      }
    }
    if (!f->e.failed && m < CH_FILL_MAX) {
      f->rc |= ch_snap(&f->s0);
      v[m] = smalloc_malloc(CH_FILL_SIZE);
      f->rc |= ch_snap(&f->s1);
      f->got = v[m] ? ch_page_of(v[m], CH_FILL_SIZE) : 0;
      n = m + 1;
    }
  }
  ch_free_unmap(v, n, CH_FILL_MAX);
  return NULL;
}

static void ch_fill_check(size_t freed, bool takes_a)
{
  static ch_fill_t f;
  memset(&f, 0, sizeof f);
  f.freed = freed;
  ch_in_thread(ch_fill_thread, &f);
  CH_ASSERT_OK(&f.e);
  ck_assert_int_eq(f.rc, 0);
  int c = ch_class(&f.s0, CH_FILL_SIZE);
  ck_assert_int_ge(c, 0);
  const uint64_t *a = f.s0.classes[c].slow_steps, *b = f.s1.classes[c].slow_steps;
  ck_assert_uint_eq(f.s1.slow_path - f.s0.slow_path, 1);
  ck_assert_uint_eq(b[SMALLOC_STEP_NEXT_PAGE] - a[SMALLOC_STEP_NEXT_PAGE], takes_a ? 1 : 0);
  ck_assert_uint_eq(b[SMALLOC_STEP_EXTEND] - a[SMALLOC_STEP_EXTEND], takes_a ? 0 : 1);
  ck_assert_uint_eq(f.got, takes_a ? f.page_a : f.page_b);
}

START_TEST(pages_fill_before_extension)
{
  ch_fill_check(CH_FILL_EXTEND, true);
}
END_TEST

START_TEST(page_with_few_free_blocks_waits_for_extension)
{
  ch_fill_check(16, false);
}
END_TEST

/* ============================================================================
 * retire_keeps_every_page: a burst of eight and a half pages of 512-byte
 * blocks, freed completely, leaves every page retired; the next identical
 * burst is served by exactly the same pages, with no fresh page, no new
 * segment and no OS call.
 *
 * Why the page sets must be equal, not just overlap: the pages of the
 * first burst, all of them filled except the last, hold exactly enough for
 * the second (its last page had the spare room; lazily built capacity is
 * extended in place), and a page is only left once it has no free block,
 * so the second burst needs every one of them. */

typedef struct ch_every {
  ch_err_t e;
  smalloc_stats_t s0, s1;
  int rc;
  size_t pages1, pages2, differ;
} ch_every_t;

enum { CH_EVERY_SIZE = SM_TEST_REQUEST_FOR(512) };

static void *ch_every_thread(void *arg)
{
  ch_every_t *ev = arg;
  size_t n = ch_blocks_for_pages(CH_EVERY_SIZE, 8);
  void **v = ch_thread_map(n * sizeof *v, &ev->e);
  ch_span_t *a = ch_thread_map(2 * n * sizeof *a, &ev->e);
  if (v == NULL || a == NULL)
    return NULL;
  ch_span_t *b = a + n;
  for (int burst = 0; burst < 2; burst++) {
    ch_span_t *set = burst == 0 ? a : b;
    if (burst == 1)
      ev->rc = ch_snap(&ev->s0);
    for (size_t i = 0; i < n; i++) {
      v[i] = smalloc_malloc(CH_EVERY_SIZE);
      if (v[i] == NULL) {
        CH_FAIL(&ev->e, "burst %d: malloc(%d) returned NULL", burst, CH_EVERY_SIZE);
        n = i;
        break;
      }
      set[i].lo = ch_page_of(v[i], CH_EVERY_SIZE);
      set[i].hi = 0;
    }
    if (burst == 1)
      ev->rc |= ch_snap(&ev->s1);
    for (size_t i = 0; i < n; i++)
      smalloc_free(v[i]);
  }
  /* compare the two sets of page addresses */
  ev->pages1 = ch_count_distinct(a, n);
  ev->pages2 = ch_count_distinct(b, n);
  size_t i = 0, j = 0;
  while (i < n || j < n) {
    uintptr_t x = i < n ? a[i].lo : UINTPTR_MAX, y = j < n ? b[j].lo : UINTPTR_MAX;
    uintptr_t m = x < y ? x : y;
    if (x != y)
      ev->differ++;
    while (i < n && a[i].lo == m)
      i++;
    while (j < n && b[j].lo == m)
      j++;
  }
  munmap(v, n * sizeof *v);
  munmap(a, 2 * n * sizeof *a);
  return NULL;
}

START_TEST(retire_keeps_every_page)
{
  static ch_every_t ev;
  ch_in_thread(ch_every_thread, &ev);
  CH_ASSERT_OK(&ev.e);
  ck_assert_int_eq(ev.rc, 0);
  ck_assert_msg(ev.pages1 >= 9, "the burst took %zu pages", ev.pages1);
  ck_assert_msg(ev.differ == 0,
                "second burst: %zu pages, first burst: %zu pages, %zu not in both",
                ev.pages2, ev.pages1, ev.differ);
  ch_window_t w;
  w.s0 = ev.s0;
  w.s1 = ev.s1;
  w.rc = ev.rc;
  ch_assert_no_os(&w, "second burst");
  ck_assert_uint_eq(CH_DELTA(&w, pages_released), 0);
  ck_assert_msg(CH_DELTA(&w, pages_reused) >= ev.pages1 - 1,
                "second burst reused %llu retired pages of %zu",
                (unsigned long long)CH_DELTA(&w, pages_reused), ev.pages1);
}
END_TEST

/* ============================================================================
 * retired_pages_expire: retired pages go back to their segment once their
 * thread ran more than SMALLOC_RETIRE_CYCLES slow-path entries (here set
 * to 8 to keep the test short), and at once on smalloc_collect(true).  A
 * page that emptied with part of its free list unused (the burst's last)
 * is retired by the slow path's periodic sweep, then expires the same way. */

enum {
  CH_EXPIRE_CYCLES = 8,
  CH_SWEEP_CYCLES = 16, /* the sweep's period for retire cycles below 16 */
  CH_EXPIRE_SIZE = SM_TEST_REQUEST_FOR(1024), /* 1 KiB blocks: the full cycles */
  CH_OTHER_SIZE = 64
};

typedef struct ch_expire {
  ch_err_t e;
  int rc;
  /* s0 start (after collect), s1 burst live, s2 burst freed, s3 after
   * other activity; s4 second burst freed, s5 after smalloc_collect(true) */
  smalloc_stats_t s[6];
  unsigned other_rounds;
} ch_expire_t;

static void ch_burst(void **v, size_t n, size_t size, ch_err_t *e)
{
  for (size_t i = 0; i < n; i++) {
    v[i] = smalloc_malloc(size);
    if (v[i] == NULL)
      CH_FAIL(e, "malloc(%zu) returned NULL", size);
  }
}

static void ch_free_burst(void **v, size_t n)
{
  for (size_t i = 0; i < n; i++)
    smalloc_free(v[i]);
}

static void *ch_expire_thread(void *arg)
{
  ch_expire_t *x = arg;
  size_t n = ch_blocks_for_pages(CH_EXPIRE_SIZE, 8);
  void *v[ch_blocks_for_pages(CH_EXPIRE_SIZE, 8)];
  enum { OTHER_N = 3 * 65536 / 64, ANCHORS = 16 };   /* 64-byte blocks: three pages */
  static void *other[OTHER_N], *anchors[ANCHORS];
  size_t nanchors = 0;

  smalloc_collect(true);
  x->rc = ch_snap(&x->s[0]);
  ch_burst(v, n, CH_EXPIRE_SIZE, &x->e);
  x->rc |= ch_snap(&x->s[1]);
  ch_free_burst(v, n);
  /* one more block, freed: the class's first page is then empty but has
   * unused blocks on its free list, which the free path does not retire */
  smalloc_free(smalloc_malloc(CH_EXPIRE_SIZE));
  x->rc |= ch_snap(&x->s[2]);
  /* Rounds of another class over three pages, slow-path entries that
   * retire or release none of its pages */
  for (x->other_rounds = 0; x->other_rounds < 100 * CH_EXPIRE_CYCLES; x->other_rounds++) {
    if (!sm_test_round_anchored(other, OTHER_N, CH_OTHER_SIZE, anchors, &nanchors, ANCHORS))
      CH_FAIL(&x->e, "a round of malloc(%d) failed", CH_OTHER_SIZE);
    x->rc |= ch_snap(&x->s[3]);
    if (x->s[3].slow_path - x->s[2].slow_path > 2 * (CH_SWEEP_CYCLES + CH_EXPIRE_CYCLES))
      break;
  }
  ch_free_burst(anchors, nanchors);
  ch_burst(v, n, CH_EXPIRE_SIZE, &x->e);
  ch_free_burst(v, n);
  x->rc |= ch_snap(&x->s[4]);
  smalloc_collect(true);
  x->rc |= ch_snap(&x->s[5]);
  return NULL;
}

START_TEST(retired_pages_expire)
{
  static ch_expire_t x;
  ch_in_thread_retiring(CH_EXPIRE_CYCLES, ch_expire_thread, &x);
  CH_ASSERT_OK(&x.e);
  ck_assert_int_eq(x.rc, 0);

  const smalloc_stats_t *s = x.s;
  int c = ch_class(&s[0], CH_EXPIRE_SIZE);
  ck_assert_int_ge(c, 0);
  uint64_t base = s[0].classes[c].pages_in_use;
  uint64_t burst_pages = s[1].classes[c].pages_in_use - base;
  ck_assert_msg(burst_pages >= 9, "the burst took %llu pages",
                (unsigned long long)burst_pages);

  /* freeing the burst retires the pages it emptied and releases none; all
   * but one are retired afterwards (the one with unused blocks) */
  uint64_t retired = s[2].pages_retired - s[1].pages_retired;
  uint64_t reused = s[2].pages_reused - s[1].pages_reused;
  ck_assert_msg(retired - reused == burst_pages - 1, "%llu retired, %llu reused, of %llu pages",
                (unsigned long long)retired, (unsigned long long)reused,
                (unsigned long long)burst_pages);
  ck_assert_uint_eq(s[2].pages_released - s[1].pages_released, 0);
  ck_assert_uint_eq(s[2].classes[c].pages_in_use, s[1].classes[c].pages_in_use);

  /* more than the sweep period plus RETIRE_CYCLES slow-path entries later,
   * every page of the burst is back, the last one included: the sweep
   * retired it (exactly burst_pages released, none of another class) */
  ck_assert_msg(s[3].slow_path - s[2].slow_path > CH_SWEEP_CYCLES + CH_EXPIRE_CYCLES,
                "only %llu slow-path entries in %u rounds",
                (unsigned long long)(s[3].slow_path - s[2].slow_path), x.other_rounds);
  ck_assert_msg(s[3].pages_released - s[2].pages_released == burst_pages,
                "%llu pages in the burst, %llu released after %llu slow-path entries",
                (unsigned long long)burst_pages,
                (unsigned long long)(s[3].pages_released - s[2].pages_released),
                (unsigned long long)(s[3].slow_path - s[2].slow_path));
  ck_assert_msg(s[3].classes[c].pages_in_use == base,
                "class %zu: pages_in_use %llu -> %llu, %llu before the burst",
                sm_test_class_size(CH_EXPIRE_SIZE),
                (unsigned long long)s[2].classes[c].pages_in_use,
                (unsigned long long)s[3].classes[c].pages_in_use, (unsigned long long)base);

  /* smalloc_collect(true) releases a fresh burst's pages at once */
  ck_assert_msg(s[4].classes[c].pages_in_use >= base + 9,
                "second burst: class pages %llu, before %llu",
                (unsigned long long)s[4].classes[c].pages_in_use, (unsigned long long)base);
  ck_assert_msg(s[5].pages_released - s[4].pages_released >= 9,
                "smalloc_collect(true) released %llu pages",
                (unsigned long long)(s[5].pages_released - s[4].pages_released));
  ck_assert_uint_eq(s[5].classes[c].pages_in_use, base);
}
END_TEST

/* ============================================================================
 * first_page_in_use_stays: a class served by its first page on the fast
 * path alone keeps that page, though the page is vacant at every sweep:
 * the head of its free list changed since the sweep before, so it is in
 * use.  Between two slow-path entries of another class (a sweep comes in
 * one of those), the class takes k blocks and gives them back, k one
 * more each time, which puts a block never at the head before there.
 * The class never needs a page back (retired, fresh or from a new
 * segment), but in the secure build, whose frees go on local_free: there
 * free retires the page itself each time the class has given back every
 * block its free list held (smalloc(7)).  Idle, its page is retired by a
 * later sweep and expires. */

enum {
  CH_INUSE_SIZE = SM_TEST_REQUEST_FOR(64),
  CH_INUSE_OTHER = SM_TEST_REQUEST_FOR(1024),
  CH_INUSE_RING = 200,       /* live blocks of the other class */
  CH_INUSE_BUILT = 300,      /* blocks the class builds first: one page */
  CH_INUSE_EVENTS = 240,     /* slow-path entries in use, and idle after */
  CH_INUSE_CYCLES = 16       /* SMALLOC_RETIRE_CYCLES: a sweep at most every 8 * pages */
};

typedef struct ch_inuse {
  ch_err_t e;
  int rc;
  /* s0 after the class built its page; s1 after the rounds in use;
   * s2 after as many slow-path entries with the class idle */
  smalloc_stats_t s[3];
  unsigned ops;
} ch_inuse_t;

/* Free the oldest block of the ring (none while it fills), allocate
 * another in its place: the other class's step, until the slow path was
 * entered once more. */
static void ch_inuse_step(void **ring, size_t *at, smalloc_stats_t *s, ch_inuse_t *x)
{
  uint64_t before = s->slow_path;
  while (!x->e.failed && x->rc == 0 && s->slow_path == before) {
    smalloc_free(ring[*at]);
    ring[*at] = smalloc_malloc(CH_INUSE_OTHER);
    if (ring[*at] == NULL)
      CH_FAIL(&x->e, "malloc(%d) returned NULL", CH_INUSE_OTHER);
    *at = (*at + 1) % CH_INUSE_RING;
    x->rc |= ch_snap(s);
  }
}

static void *ch_inuse_thread(void *arg)
{
  ch_inuse_t *x = arg;
  static void *ring[CH_INUSE_RING], *v[CH_INUSE_BUILT];
  static smalloc_stats_t now;
  size_t at = 0;

  for (size_t i = 0; i < CH_INUSE_BUILT; i++)
    if ((v[i] = smalloc_malloc(CH_INUSE_SIZE)) == NULL)
      CH_FAIL(&x->e, "malloc(%d) returned NULL", CH_INUSE_SIZE);
  ch_free_burst(v, CH_INUSE_BUILT);
  x->rc |= ch_snap(&x->s[0]);
  now = x->s[0];
  /* k from 2: one block taken and given back heads the list again */
  for (x->ops = 0; x->ops < CH_INUSE_EVENTS && !x->e.failed; x->ops++) {
    ch_inuse_step(ring, &at, &now, x);
    size_t k = x->ops + 2;
    ch_burst(v, k, CH_INUSE_SIZE, &x->e);
    ch_free_burst(v, k);
  }
  x->rc |= ch_snap(&x->s[1]);
  now = x->s[1];
  for (unsigned i = 0; i < CH_INUSE_EVENTS && !x->e.failed; i++)
    ch_inuse_step(ring, &at, &now, x);
  x->rc |= ch_snap(&x->s[2]);
  ch_free_burst(ring, CH_INUSE_RING);
  return NULL;
}

/* The class's slow-path entries that took a page back: retired, fresh, or
 * of a new segment. */
static uint64_t ch_pages_back(const smalloc_class_stats_t *c)
{
  return c->slow_steps[SMALLOC_STEP_RETIRED_PAGE] + c->slow_steps[SMALLOC_STEP_FRESH_PAGE] +
         c->slow_steps[SMALLOC_STEP_NEW_SEGMENT];
}

START_TEST(first_page_in_use_stays)
{
  static ch_inuse_t x;
  ch_in_thread_retiring(CH_INUSE_CYCLES, ch_inuse_thread, &x);
  CH_ASSERT_OK(&x.e);
  ck_assert_int_eq(x.rc, 0);

  const smalloc_stats_t *s = x.s;
  int c = ch_class(&s[0], CH_INUSE_SIZE);
  ck_assert_int_ge(c, 0);
  /* many sweeps: at least one every 8 slow-path entries per page visited */
  ck_assert_uint_ge(s[1].slow_path - s[0].slow_path, CH_INUSE_EVENTS);
  ck_assert_msg(SM_TEST_SECURE || ch_pages_back(&s[1].classes[c]) == ch_pages_back(&s[0].classes[c]),
                "the class in use took %llu pages back in %u rounds",
                (unsigned long long)(ch_pages_back(&s[1].classes[c]) -
                                     ch_pages_back(&s[0].classes[c])),
                x.ops);
  ck_assert_uint_eq(s[1].classes[c].pages_in_use, s[0].classes[c].pages_in_use);
  ck_assert_uint_eq(s[1].classes[c].blocks_in_use, s[0].classes[c].blocks_in_use);
  /* idle: retired by a sweep, released once expired (the one page of the
   * class that the thread had) */
  ck_assert_uint_eq(s[2].classes[c].pages_in_use + 1, s[0].classes[c].pages_in_use);
  ck_assert_uint_eq(ch_pages_back(&s[2].classes[c]), ch_pages_back(&s[1].classes[c]));
}
END_TEST

/* ============================================================================
 * cross_thread_frees_are_counted: another thread frees a burst that spans
 * several pages; the owner's next burst is served by those same pages (no
 * fresh page, no new segment), and once the owner has freed it as well,
 * smalloc_collect(true) releases every one of them.  That only happens if
 * the owner's count of blocks in use per page stayed exact through the
 * blocks it took back, as a list and its length, from other threads. */

enum { CH_XT_SIZE = SM_TEST_REQUEST_FOR(128) };

typedef struct ch_xt {
  ch_err_t e;
  int rc;
  void **v;
  size_t n;
  /* s0 before; s1 after the other thread freed the burst; s2 after the
   * second burst; s3 after it was freed and smalloc_collect(true) */
  smalloc_stats_t s[4];
} ch_xt_t;

static void *ch_xt_freer(void *arg)
{
  ch_xt_t *x = arg;
  ch_free_burst(x->v, x->n);
  return NULL;
}

static void *ch_xt_owner(void *arg)
{
  ch_xt_t *x = arg;
  pthread_t t;
  x->n = ch_blocks_for_pages(CH_XT_SIZE, 4);
  x->v = ch_thread_map(x->n * sizeof *x->v, &x->e);
  if (x->v == NULL)
    return NULL;
  smalloc_collect(true);
  x->rc = ch_snap(&x->s[0]);
  ch_burst(x->v, x->n, CH_XT_SIZE, &x->e);
  if (pthread_create(&t, NULL, ch_xt_freer, x) != 0 || pthread_join(t, NULL) != 0)
    CH_FAIL(&x->e, "pthread_create or pthread_join failed");
  x->rc |= ch_snap(&x->s[1]);
  ch_burst(x->v, x->n, CH_XT_SIZE, &x->e);
  x->rc |= ch_snap(&x->s[2]);
  ch_free_burst(x->v, x->n);
  smalloc_collect(true);
  x->rc |= ch_snap(&x->s[3]);
  munmap(x->v, x->n * sizeof *x->v);
  return NULL;
}

START_TEST(cross_thread_frees_are_counted)
{
  static ch_xt_t x;
  ch_in_thread(ch_xt_owner, &x);
  CH_ASSERT_OK(&x.e);
  ck_assert_int_eq(x.rc, 0);

  const smalloc_stats_t *s = x.s;
  int c = ch_class(&s[0], CH_XT_SIZE);
  ck_assert_int_ge(c, 0);
  uint64_t base = s[0].classes[c].pages_in_use;
  uint64_t pages = s[1].classes[c].pages_in_use - base;
  ck_assert_msg(pages >= 4, "the burst took %llu pages", (unsigned long long)pages);
  /* (whole-process totals would also count the C library's allocations
   * for the new thread: look at the class) */
  ck_assert_uint_eq(s[1].classes[c].allocs - s[0].classes[c].allocs, x.n);
  ck_assert_uint_eq(s[1].classes[c].frees - s[0].classes[c].frees, x.n);
  ck_assert_uint_eq(s[1].classes[c].blocks_in_use, s[0].classes[c].blocks_in_use);

  /* the second burst: the same pages, taken back from the other thread */
  ck_assert_uint_eq(s[2].classes[c].pages_in_use, s[1].classes[c].pages_in_use);
  ck_assert_uint_eq(s[2].slow_steps[SMALLOC_STEP_FRESH_PAGE] -
                    s[1].slow_steps[SMALLOC_STEP_FRESH_PAGE], 0);
  ck_assert_uint_eq(s[2].slow_steps[SMALLOC_STEP_NEW_SEGMENT] -
                    s[1].slow_steps[SMALLOC_STEP_NEW_SEGMENT], 0);
  ck_assert_uint_eq(s[2].classes[c].blocks_in_use - s[1].classes[c].blocks_in_use, x.n);

  /* all free again: every page goes back */
  ck_assert_uint_eq(s[3].classes[c].blocks_in_use, s[0].classes[c].blocks_in_use);
  ck_assert_msg(s[3].classes[c].pages_in_use == base,
                "class %zu: %llu pages before, %llu after everything was freed and collected",
                sm_test_class_size(CH_XT_SIZE), (unsigned long long)base,
                (unsigned long long)s[3].classes[c].pages_in_use);
  ck_assert_msg(s[3].pages_released - s[2].pages_released >= pages,
                "%llu of %llu pages released",
                (unsigned long long)(s[3].pages_released - s[2].pages_released),
                (unsigned long long)pages);
}
END_TEST

/* ============================================================================
 * current_page_counts_are_exact: malloc takes blocks off the free list of
 * its class's first page and the owner's frees put them back on it, with
 * no count on either path (used counts that list's blocks too: see
 * sm_page_t).  The counters still give the blocks in use exactly, and a
 * first page whose blocks are all back on its free list is empty:
 * smalloc_collect(true) gives it back.  A fresh thread, so that the
 * class's page is its own and holds nothing else. */
enum { CH_CUR_SIZE = 448, CH_CUR_N = 40 };

typedef struct {
  smalloc_stats_t s[4];
  int rc;
  bool null, one_page;
} ch_cur_t;

static void *ch_current_thread(void *arg)
{
  ch_cur_t *c = arg;
  void *v[CH_CUR_N];
  c->rc = ch_snap(&c->s[0]);
  for (int i = 0; i < CH_CUR_N; i++) {
    v[i] = smalloc_malloc(CH_CUR_SIZE);
    c->null |= v[i] == NULL;
  }
  for (int i = 0; i < CH_CUR_N; i += 2)   /* 20 back on the free list */
    smalloc_free(v[i]);
  for (int i = 0; i < 10; i += 2) {       /* 5 of them taken again */
    v[i] = smalloc_malloc(CH_CUR_SIZE);
    c->null |= v[i] == NULL;
  }
  c->one_page = true;
  for (int i = 1; i < CH_CUR_N; i++)
    if (v[i] && v[i - 1])
      c->one_page &= ch_page_of(v[i], CH_CUR_SIZE) == ch_page_of(v[0], CH_CUR_SIZE);
  c->rc |= ch_snap(&c->s[1]);
  for (int i = 0; i < CH_CUR_N; i++)
    if (i < 10 || i % 2 == 1)
      smalloc_free(v[i]);
  c->rc |= ch_snap(&c->s[2]);
  smalloc_collect(true);
  c->rc |= ch_snap(&c->s[3]);
  return NULL;
}

START_TEST(current_page_counts_are_exact)
{
  static ch_cur_t c;
  ch_in_thread(ch_current_thread, &c);
  ck_assert_int_eq(c.rc, 0);
  ck_assert(!c.null);
  ck_assert(c.one_page);
  int k = ch_class(&c.s[0], CH_CUR_SIZE);
  ck_assert_int_ge(k, 0);
  const smalloc_class_stats_t *a = &c.s[0].classes[k], *b = &c.s[1].classes[k],
                              *d = &c.s[2].classes[k], *e = &c.s[3].classes[k];
  ck_assert_uint_eq(b->pages_in_use - a->pages_in_use, 1);
  ck_assert_uint_eq(b->blocks_in_use - a->blocks_in_use, CH_CUR_N - 20 + 5);
  ck_assert_uint_eq(b->allocs - a->allocs, CH_CUR_N + 5);
  ck_assert_uint_eq(b->frees - a->frees, 20);
  ck_assert_uint_eq(d->blocks_in_use, a->blocks_in_use);
  ck_assert_uint_eq(d->frees - b->frees, CH_CUR_N - 20 + 5);
  ck_assert_uint_eq(d->pages_in_use - a->pages_in_use, 1);   /* kept warm as the first */
  ck_assert_uint_eq(e->pages_in_use, a->pages_in_use);
  ck_assert_uint_ge(c.s[3].pages_released - c.s[2].pages_released, 1);
}
END_TEST

/* ============================================================================
 * frees_on_both_lists_are_counted: the owner's frees into its class's
 * first page go back on that page's free list and count down one count
 * (free_pushes), its frees into a page behind the first go on that
 * page's local_free and count down used (sm_page_push_count: one count
 * or the other, with no branch on which).  The class's counters still
 * give every free and every allocation exactly, with frees of both kinds
 * in turns and across the folds of the slow path; and the page behind,
 * its last block freed, is empty by its count and retires.  Pages A and
 * B are filled and C begun (A and B on the full list); a sixteenth of B
 * freed brings it back behind C. */
enum { CH_BL_SIZE = SM_TEST_REQUEST_FOR(512), CH_BL_TURNS = 24, CH_BL_MAX = 3 * 128 + 4 * CH_BL_TURNS };

typedef struct {
  ch_err_t e;
  int rc;
  size_t b_left, more;
  smalloc_stats_t s[4];
} ch_bl_t;

static void *ch_both_lists_thread(void *arg)
{
  ch_bl_t *t = arg;
  void **v = ch_thread_map(CH_BL_MAX * sizeof *v, &t->e);
  if (v == NULL)
    return NULL;
  size_t first[3] = {0};
  size_t n = ch_fill_pages(v, CH_BL_MAX, CH_BL_SIZE, 3, first, &t->e);
  size_t b0 = first[1], c0 = first[2], back = ch_unfull_frees(c0 - b0);
  if (!t->e.failed && c0 - b0 < back + CH_BL_TURNS + 1)
    CH_FAIL(&t->e, "page B holds %zu blocks, too few", c0 - b0);
  /* more of C first, while no other page has a free block */
  size_t c1 = n;
  for (int k = 0; !t->e.failed && k < CH_BL_TURNS && n < CH_BL_MAX; k++, n++) {
    v[n] = smalloc_malloc(CH_BL_SIZE);
    if (v[n] == NULL || ch_page_of(v[n], CH_BL_SIZE) != ch_page_of(v[c0], CH_BL_SIZE))
      CH_FAIL(&t->e, "malloc %d after C's first block: %p, not on C", k, v[n]);
  }
  for (size_t i = 0; !t->e.failed && i < back; i++) {
    smalloc_free(v[b0 + i]);   /* the last brings B back behind C */
    v[b0 + i] = NULL;
  }
  if (!t->e.failed) {
    t->rc |= ch_snap(&t->s[0]);
    /* in turns: a block of B (onto its local_free), one of C (its free list) */
    for (int k = 0; k < CH_BL_TURNS; k++) {
      smalloc_free(v[b0 + back + (size_t)k]);
      v[b0 + back + (size_t)k] = NULL;
      smalloc_free(v[c1 + (size_t)k]);
      v[c1 + (size_t)k] = NULL;
    }
    t->rc |= ch_snap(&t->s[1]);
    /* the rest of B, all onto its local_free: the last empties it */
    t->b_left = 0;
    for (size_t i = b0; i < c0; i++)
      if (v[i] != NULL) {
        smalloc_free(v[i]);
        v[i] = NULL;
        t->b_left++;
      }
    t->rc |= ch_snap(&t->s[2]);
    /* C's free list taken again and past it: the slow path folds C's
     * counts before it serves more; every other block freed back */
    t->more = 3 * CH_BL_TURNS;
    for (size_t k = 0; k < t->more && n < CH_BL_MAX; k++, n++) {
      v[n] = smalloc_malloc(CH_BL_SIZE);
      if (v[n] == NULL)
        CH_FAIL(&t->e, "malloc(%d) returned NULL", CH_BL_SIZE);
    }
    for (size_t k = n - t->more; k < n; k += 2) {
      smalloc_free(v[k]);
      v[k] = NULL;
    }
    t->rc |= ch_snap(&t->s[3]);
  }
  ch_free_unmap(v, n, CH_BL_MAX);
  return NULL;
}

START_TEST(frees_on_both_lists_are_counted)
{
  static ch_bl_t t;
  ch_in_thread(ch_both_lists_thread, &t);
  ck_assert_msg(!t.e.failed, "%s", t.e.msg);
  ck_assert_int_eq(t.rc, 0);
  int k = ch_class(&t.s[0], CH_BL_SIZE);
  ck_assert_int_ge(k, 0);
  const smalloc_class_stats_t *a = &t.s[0].classes[k], *b = &t.s[1].classes[k],
                              *c = &t.s[2].classes[k], *d = &t.s[3].classes[k];
  ck_assert_uint_eq(b->frees - a->frees, 2 * CH_BL_TURNS);
  ck_assert_uint_eq(b->allocs - a->allocs, 0);
  ck_assert_uint_eq(a->blocks_in_use - b->blocks_in_use, 2 * CH_BL_TURNS);
  ck_assert_uint_gt(t.b_left, 0);
  ck_assert_uint_eq(c->frees - b->frees, t.b_left);
  ck_assert_uint_eq(b->blocks_in_use - c->blocks_in_use, t.b_left);
  ck_assert_uint_eq(t.s[2].pages_retired - t.s[1].pages_retired, 1);
  ck_assert_uint_eq(d->allocs - c->allocs, t.more);
  ck_assert_uint_eq(d->frees - c->frees, t.more / 2);
  ck_assert_uint_eq(d->blocks_in_use - c->blocks_in_use, t.more - t.more / 2);
}
END_TEST

/* ============================================================================
 * collect_returns_resident_memory: 1 GiB of 64..256-byte blocks allocated,
 * touched and freed; after smalloc_collect(true) the resident size is back
 * within 10 MiB of what it was before.  The pointer array is mmap'd and
 * unmapped before measuring so that it does not count.  (Sanitizer builds
 * use 128 MiB: their shadow memory makes the full size slow.) */

START_TEST(collect_returns_resident_memory)
{
  const size_t target = CH_SANITIZED ? 128 * CH_MiB : CH_GiB;
  const size_t max_blocks = target / 64 + 1;
  const size_t slack = 10 * CH_MiB;

  smalloc_collect(true);
  size_t before = sm_test_rss();
  ck_assert_msg(before > 0, "cannot read /proc/self/statm");

  void **v = ch_map(max_blocks * sizeof *v);
  size_t n = 0, bytes = 0;
  bool null = false;
  while (bytes < target) {
    size_t size = 64 + 16 * (n % 13); /* 64, 80, ..., 256 */
    unsigned char *p = smalloc_malloc(size);
    if (p == NULL) {
      null = true;
      break;
    }
    p[0] = (unsigned char)n;
    p[size - 1] = (unsigned char)size;
    v[n++] = p;
    bytes += size;
  }
  size_t peak = sm_test_rss();
  for (size_t i = n; i-- > 0;)
    smalloc_free(v[i]);
  ch_unmap(v, max_blocks * sizeof *v);
  smalloc_collect(true);
  size_t after = sm_test_rss();

  ck_assert_msg(!null, "malloc returned NULL after %zu bytes", bytes);
  ck_assert_msg(peak >= before + target - target / 8,
                "%zu MiB allocated but resident size only went %zu -> %zu MiB",
                bytes / CH_MiB, before / CH_MiB, peak / CH_MiB);
  ck_assert_msg(after <= before + slack,
                "resident size %zu KiB before, %zu KiB with %zu MiB live, %zu KiB "
                "after free and smalloc_collect(true)",
                before / CH_KiB, peak / CH_KiB, bytes / CH_MiB, after / CH_KiB);
}
END_TEST

/* ============================================================================
 * retire_cycles_zero_is_naive: with SMALLOC_RETIRE_CYCLES=0 the same churn
 * releases its pages every round and takes fresh ones again, so the tests
 * above measure the retire policy and do not pass by accident. */

enum { CH_NAIVE_ROUNDS = 3 };

typedef struct ch_naive {
  ch_err_t e;
  smalloc_stats_t s[CH_NAIVE_ROUNDS + 1];
  int rc;
  ch_only_t only;
} ch_naive_t;

static void *ch_naive_thread(void *arg)
{
  ch_naive_t *x = arg;
  size_t max = ch_pattern_max_blocks();
  ch_blk_t *b = ch_thread_map(max * sizeof *b, &x->e);
  uint32_t *perm = ch_thread_map(max * sizeof *perm, &x->e);
  if (b == NULL || perm == NULL)
    return NULL;
  ch_rng_t r = {0x1234567887654321u};
  size_t n = ch_pattern_blocks(b, true);
  /* one warm-up round, then snapshots between rounds */
  for (unsigned i = 0; i <= CH_NAIVE_ROUNDS; i++) {
    if (i > 0)
      x->rc |= ch_snap(&x->s[i - 1]);
    ch_alloc_all(b, n, i, false, &x->e);
    ch_free_all(b, n, (enum ch_order)(i % CH_ORDERS), i, false, perm, &r, &x->e);
  }
  x->rc |= ch_snap(&x->s[CH_NAIVE_ROUNDS]);
  munmap(b, max * sizeof *b);
  munmap(perm, max * sizeof *perm);
  return NULL;
}

START_TEST(retire_cycles_zero_is_naive)
{
  static ch_naive_t x;
  long old = smalloc_option_get(SMALLOC_OPTION_RETIRE_CYCLES);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, 0), 0);
  ck_assert_int_eq(smalloc_option_get(SMALLOC_OPTION_RETIRE_CYCLES), 0);
  ch_in_thread(ch_naive_thread, &x);
  ch_in_thread(ch_only_thread, &x.only);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, old), 0);
  ck_assert_int_eq(smalloc_option_get(SMALLOC_OPTION_RETIRE_CYCLES), old);
  CH_ASSERT_OK(&x.e);
  ck_assert_int_eq(x.rc, 0);

  for (unsigned i = 0; i < CH_NAIVE_ROUNDS; i++) {
    const smalloc_stats_t *a = &x.s[i], *b = &x.s[i + 1];
    uint64_t released = b->pages_released - a->pages_released;
    uint64_t fresh = b->slow_steps[SMALLOC_STEP_FRESH_PAGE] -
                     a->slow_steps[SMALLOC_STEP_FRESH_PAGE] +
                     b->slow_steps[SMALLOC_STEP_NEW_SEGMENT] -
                     a->slow_steps[SMALLOC_STEP_NEW_SEGMENT];
    ck_assert_msg(released > 0, "round %u released no page", i);
    ck_assert_msg(fresh > 0, "round %u took no fresh page or new segment", i);
    ck_assert_uint_eq(b->pages_retired - a->pages_retired, 0);
  }

  /* the exactly filled page is released at once, and the next malloc
   * takes a fresh page, not a retired one */
  CH_ASSERT_OK(&x.only.e);
  ck_assert_int_eq(x.only.rc, 0);
  const smalloc_stats_t *a = &x.only.s0, *b = &x.only.s1;
  ck_assert_uint_ge(b->pages_released - a->pages_released, 1);
  ck_assert_uint_eq(b->pages_retired - a->pages_retired, 0);
  ck_assert_uint_eq(b->slow_steps[SMALLOC_STEP_RETIRED_PAGE] -
                        a->slow_steps[SMALLOC_STEP_RETIRED_PAGE],
                    0);
  ck_assert_uint_eq(b->slow_steps[SMALLOC_STEP_FRESH_PAGE] -
                        a->slow_steps[SMALLOC_STEP_FRESH_PAGE] +
                        b->slow_steps[SMALLOC_STEP_NEW_SEGMENT] -
                        a->slow_steps[SMALLOC_STEP_NEW_SEGMENT],
                    1);
}
END_TEST

static Suite *churn_suite(void)
{
  Suite *s = suite_create("churn");
  TCase *tc = tcase_create("churn");
  /* generous for sanitizer builds; the tests take seconds at most */
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, churn_correctness);
  tcase_add_test(tc, multi_page_churn_correctness);
  tcase_add_test(tc, churn_no_os_calls);
  tcase_add_test(tc, emptied_only_page_stays_current);
  tcase_add_test(tc, full_page_waits_for_blocks);
  tcase_add_test(tc, exhausted_page_goes_back_once);
  tcase_add_test(tc, pages_fill_before_extension);
  tcase_add_test(tc, page_with_few_free_blocks_waits_for_extension);
  tcase_add_test(tc, retire_keeps_every_page);
  tcase_add_test(tc, current_page_counts_are_exact);
  tcase_add_test(tc, frees_on_both_lists_are_counted);
  tcase_add_test(tc, retired_pages_expire);
  tcase_add_test(tc, first_page_in_use_stays);
  tcase_add_test(tc, cross_thread_frees_are_counted);
  tcase_add_test(tc, collect_returns_resident_memory);
  tcase_add_test(tc, retire_cycles_zero_is_naive);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  return sm_run_suite(churn_suite());
}
