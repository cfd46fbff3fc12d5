/* Threads: blocks freed by threads other than their owner, owners that exit
 * with live blocks, and many short-lived threads.  In every case smalloc's
 * own count of live blocks returns to where it started. */
#include "common.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>

/* ---- failures from worker threads ----------------------------------------------
 * libcheck's assertions belong to the main thread; workers record the first
 * failure and the main thread reports it. */

static atomic_ulong failures;
static char first_failure[512];

static void worker_fail(const char *fmt, ...)
{
  if (atomic_fetch_add(&failures, 1) == 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(first_failure, sizeof first_failure, fmt, ap);
    va_end(ap);
  }
}

static void check_no_failures(void)
{
  unsigned long n = atomic_load(&failures);
  ck_assert_msg(n == 0, "%lu failures in worker threads; first: %s", n, first_failure);
}

/* ---- threads ---------------------------------------------------------------------
 * Small stacks, all alike: glibc caches joined threads' stacks together with
 * their TLS vector (allocated with calloc, so counted by smalloc when it is the
 * system malloc).  warm_up() fills that cache with as many threads as any test
 * runs at once, so later threads reuse cached stacks and the block count
 * taken after it stays exact. */

enum { MAX_THREADS = 32, STACK = 256 * 1024 };

static void start(pthread_t *t, void *(*fn)(void *), void *arg)
{
  pthread_attr_t a;
  ck_assert_int_eq(pthread_attr_init(&a), 0);
  ck_assert_int_eq(pthread_attr_setstacksize(&a, STACK), 0);
  int rc = pthread_create(t, &a, fn, arg);
  ck_assert_msg(rc == 0, "pthread_create: %s", strerror(rc));
  pthread_attr_destroy(&a);
}

static void join(pthread_t t)
{
  int rc = pthread_join(t, NULL);
  ck_assert_msg(rc == 0, "pthread_join: %s", strerror(rc));
}

static void *warm_thread(void *arg)
{
  (void)arg;
  void *p = smalloc_malloc(100);
  if (!p)
    worker_fail("warm-up malloc failed");
  smalloc_free(p);
  return NULL;
}

static void warm_up(void)
{
  pthread_t t[MAX_THREADS];
  for (int i = 0; i < MAX_THREADS; i++)
    start(&t[i], warm_thread, NULL);
  for (int i = 0; i < MAX_THREADS; i++)
    join(t[i]);
}

/* ---- blocks ------------------------------------------------------------------------ */

typedef struct item {
  unsigned char *p;
  size_t n;
  uint64_t seed;
} item_t;

static size_t random_size(sm_rng_t *r)
{
  size_t k = sm_rng_below(r, 10000);
  if (k < 8000)
    return sm_rng_range(r, 1, 512);
  if (k < 9700)
    return sm_rng_range(r, 513, 8 * KiB);
  if (k < 9985)
    return sm_rng_range(r, 8 * KiB + 1, 64 * KiB);
  if (k < 9998)
    return sm_rng_range(r, 64 * KiB + 1, 600 * KiB);
  return sm_rng_range(r, 2 * MiB + 1, 3 * MiB);
}

/* Only the first and last KiB of big blocks are filled: enough to see a
 * block handed out twice, without making the test a memset benchmark. */
static size_t fill_len(size_t n)
{
  return n < 4096 ? n : 1024;
}

static bool make_item(item_t *it, sm_rng_t *r, uint64_t gen)
{
  it->n = random_size(r);
  it->p = smalloc_malloc(it->n);
  if (!it->p) {
    worker_fail("malloc(%zu) failed", it->n);
    return false;
  }
  if (smalloc_malloc_usable_size(it->p) < it->n)
    worker_fail("malloc(%zu): usable %zu", it->n, smalloc_malloc_usable_size(it->p));
  it->seed = sm_pattern_seed(it->p, gen);
  size_t f = fill_len(it->n);
  sm_pattern_fill(it->p, f, it->seed);
  if (f < it->n)
    sm_pattern_fill(it->p + it->n - f, f, ~it->seed);
  return true;
}

static bool item_ok(const item_t *it)
{
  size_t f = fill_len(it->n);
  size_t bad = sm_pattern_find_bad(it->p, f, it->seed);
  if (bad == SIZE_MAX && f < it->n && !sm_pattern_ok(it->p + it->n - f, f, ~it->seed))
    bad = it->n - f;
  if (bad != SIZE_MAX) {
    worker_fail("block %p of %zu bytes: byte %zu changed", (void *)it->p, it->n, bad);
    return false;
  }
  return true;
}

/* Check, sometimes realloc (a foreign block, for consumers), then free. */
static void consume_item(item_t *it, sm_rng_t *r)
{
  if (!item_ok(it))
    return;
  size_t k = sm_rng_below(r, 100);
  if (k < 10 && it->n < 64 * KiB) {
    size_t n = it->n * 2 + 16;
    unsigned char *q = smalloc_realloc(it->p, n);
    if (!q) {
      worker_fail("realloc(%zu -> %zu) failed", it->n, n);
      return;
    }
    size_t f = fill_len(it->n);
    if (!sm_pattern_ok(q, f, it->seed))
      worker_fail("realloc(%zu -> %zu) of a foreign block lost data", it->n, n);
    smalloc_free(q);
  } else if (k < 30) {
    smalloc_free_sized(it->p, it->n);
  } else {
    smalloc_free(it->p);
  }
}

/* ---- a producer/consumer ring ------------------------------------------------------- */

enum { RING = 4096, BATCH = 32, LOCAL = 16 };

static struct {
  pthread_mutex_t lock;
  pthread_cond_t not_full, not_empty;
  item_t items[RING];
  size_t head, count;
  int producers_left;
} ring = {.lock = PTHREAD_MUTEX_INITIALIZER,
          .not_full = PTHREAD_COND_INITIALIZER,
          .not_empty = PTHREAD_COND_INITIALIZER};

static void ring_push(const item_t *v, size_t n)
{
  pthread_mutex_lock(&ring.lock);
  while (RING - ring.count < n)
    pthread_cond_wait(&ring.not_full, &ring.lock);
  for (size_t i = 0; i < n; i++)
    ring.items[(ring.head + ring.count + i) % RING] = v[i];
  ring.count += n;
  pthread_cond_broadcast(&ring.not_empty);
  pthread_mutex_unlock(&ring.lock);
}

/* Returns 0 once the ring is empty and every producer is done. */
static size_t ring_pop(item_t *v, size_t max)
{
  pthread_mutex_lock(&ring.lock);
  while (ring.count == 0 && ring.producers_left > 0)
    pthread_cond_wait(&ring.not_empty, &ring.lock);
  size_t n = ring.count < max ? ring.count : max;
  for (size_t i = 0; i < n; i++)
    v[i] = ring.items[(ring.head + i) % RING];
  ring.head = (ring.head + n) % RING;
  ring.count -= n;
  pthread_cond_broadcast(&ring.not_full);
  pthread_mutex_unlock(&ring.lock);
  return n;
}

/* A producer is done: consumers return once the ring is empty and none
 * is left. */
static void ring_producer_done(void)
{
  pthread_mutex_lock(&ring.lock);
  ring.producers_left--;
  pthread_cond_broadcast(&ring.not_empty);
  pthread_mutex_unlock(&ring.lock);
}

typedef struct worker {
  pthread_t t;
  unsigned id;
  size_t items; /* to produce */
} worker_t;

/* Blocks a thread keeps for itself a while, so its pages see local frees
 * interleaved with the remote ones. */
typedef struct local {
  item_t v[LOCAL];
  unsigned next;
} local_t;

static void local_churn(local_t *l, sm_rng_t *r, uint64_t gen)
{
  item_t *it = &l->v[l->next++ % LOCAL];
  if (it->p && item_ok(it))
    smalloc_free(it->p);
  it->p = NULL;
  make_item(it, r, gen);
}

static void local_drain(local_t *l)
{
  for (int i = 0; i < LOCAL; i++)
    if (l->v[i].p) {
      if (item_ok(&l->v[i]))
        smalloc_free(l->v[i].p);
      l->v[i].p = NULL;
    }
}

static void *producer(void *arg)
{
  worker_t *w = arg;
  sm_rng_t r;
  local_t l = {0};
  item_t batch[BATCH];
  sm_rng_seed(&r, 1000 + w->id);
  size_t made = 0;
  uint64_t gen = (uint64_t)w->id << 40;
  while (made < w->items) {
    size_t n = 0;
    while (n < BATCH && made < w->items) {
      if (!make_item(&batch[n], &r, gen++))
        break;
      n++;
      made++;
    }
    if (n == 0)
      break;
    ring_push(batch, n);
    local_churn(&l, &r, gen++);
  }
  local_drain(&l);
  if (made < w->items)
    worker_fail("producer %u stopped after %zu of %zu items", w->id, made, w->items);
  ring_producer_done();
  return NULL;
}

static atomic_size_t consumed;

static void *consumer(void *arg)
{
  worker_t *w = arg;
  sm_rng_t r;
  local_t l = {0};
  item_t batch[BATCH];
  sm_rng_seed(&r, 2000 + w->id);
  uint64_t gen = ((uint64_t)w->id << 40) | (1ull << 39);
  size_t n, total = 0;
  while ((n = ring_pop(batch, BATCH)) > 0) {
    for (size_t i = 0; i < n; i++)
      consume_item(&batch[i], &r);
    total += n;
    local_churn(&l, &r, gen++);
  }
  local_drain(&l);
  atomic_fetch_add(&consumed, total);
  return NULL;
}

static void cross_thread_run(int nthreads, size_t total_items)
{
  int np = nthreads / 2, nc = nthreads - np;
  worker_t w[MAX_THREADS];
  ring.head = ring.count = 0;
  ring.producers_left = np;
  atomic_store(&consumed, 0);
  for (int i = 0; i < nthreads; i++) {
    w[i].id = (unsigned)i;
    w[i].items = i < np ? total_items / (size_t)np : 0;
  }
  for (int i = 0; i < nthreads; i++)
    start(&w[i].t, i < np ? producer : consumer, &w[i]);
  for (int i = 0; i < nthreads; i++)
    join(w[i].t);
  check_no_failures();
  ck_assert_uint_eq(atomic_load(&consumed), total_items / (size_t)np * (size_t)np);
  (void)nc;
}

START_TEST(cross_thread_free)
{
  static const int counts[] = {2, 4, 8, 16, 32};
  warm_up();
  uint64_t base = sm_blocks_in_use();
  for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
    cross_thread_run(counts[i], 60000);
    uint64_t now = sm_blocks_in_use();
    ck_assert_msg(now == base, "%d threads: %lld blocks lost (in use %llu, base %llu)",
                  counts[i], (long long)(now - base), (unsigned long long)now,
                  (unsigned long long)base);
  }
}
END_TEST

/* ---- owners that exit with live blocks ------------------------------------------------ */

enum { ORPHANS = 20000, FREERS = 4 };
static item_t orphans[ORPHANS];

static void *orphan_maker(void *arg)
{
  unsigned round = (unsigned)(uintptr_t)arg;
  sm_rng_t r;
  sm_rng_seed(&r, 31337 + round);
  for (size_t i = 0; i < ORPHANS; i++)
    if (!make_item(&orphans[i], &r, i)) {
      orphans[i].p = NULL;
      break;
    }
  /* a churn of its own first, so some pages are half empty at exit */
  for (size_t i = 0; i < ORPHANS; i += 3) {
    if (orphans[i].p && item_ok(&orphans[i]))
      smalloc_free(orphans[i].p);
    orphans[i].p = NULL;
  }
  return NULL;
}

static void *orphan_freer(void *arg)
{
  unsigned id = (unsigned)(uintptr_t)arg;
  sm_rng_t r;
  local_t l = {0};
  sm_rng_seed(&r, 4242 + id);
  for (size_t i = id; i < ORPHANS; i += FREERS) {
    if (orphans[i].p && item_ok(&orphans[i]))
      smalloc_free(orphans[i].p);
    orphans[i].p = NULL;
    if (i % 64 == id)
      local_churn(&l, &r, i);
  }
  local_drain(&l);
  return NULL;
}

START_TEST(owner_exits_with_live_blocks)
{
  warm_up();
  uint64_t base = sm_blocks_in_use();
  uint64_t mapped_first = 0;
  for (unsigned round = 0; round < 5; round++) {
    pthread_t maker, freers[FREERS];
    start(&maker, orphan_maker, (void *)(uintptr_t)round);
    join(maker);
    check_no_failures();
    ck_assert_uint_gt(sm_blocks_in_use(), base + ORPHANS / 2);
    for (unsigned i = 0; i < FREERS; i++)
      start(&freers[i], orphan_freer, (void *)(uintptr_t)i);
    for (unsigned i = 0; i < FREERS; i++)
      join(freers[i]);
    check_no_failures();
    uint64_t now = sm_blocks_in_use();
    ck_assert_msg(now == base, "round %u: %lld blocks lost", round,
                  (long long)(now - base));

    /* this thread allocates again: abandoned pages are reclaimed, not leaked */
    sm_rng_t r;
    sm_rng_seed(&r, round);
    for (size_t i = 0; i < ORPHANS; i++)
      if (!make_item(&orphans[i], &r, i))
        break;
    check_no_failures();
    for (size_t i = 0; i < ORPHANS; i++) {
      if (orphans[i].p && item_ok(&orphans[i]))
        smalloc_free(orphans[i].p);
      orphans[i].p = NULL;
    }
    check_no_failures();
    smalloc_collect(true);
    smalloc_stats_t s;
    sm_stats_snap(&s);
    if (round == 0)
      mapped_first = s.bytes_mapped;
    else
      ck_assert_msg(s.bytes_mapped <= mapped_first + 8 * MiB,
                    "round %u: %llu bytes mapped, %llu after the first round", round,
                    (unsigned long long)s.bytes_mapped,
                    (unsigned long long)mapped_first);
  }
  ck_assert_uint_eq(sm_blocks_in_use(), base);
}
END_TEST

/* ---- ten thousand short-lived threads ---------------------------------------------------- */

enum { SHORT_THREADS = 10000, SHORT_BATCH = 16, SHORT_KEEP = 2, SHORT_BLOCKS = 24 };
static item_t handed[SHORT_BATCH][SHORT_KEEP];

static void *short_lived(void *arg)
{
  unsigned id = (unsigned)(uintptr_t)arg;
  sm_rng_t r;
  item_t v[SHORT_BLOCKS];
  sm_rng_seed(&r, 77 + id);
  size_t made = 0;
  for (; made < SHORT_BLOCKS; made++)
    if (!make_item(&v[made], &r, ((uint64_t)id << 8) | made))
      break;
  /* keep two for the main thread to free after this thread is gone */
  for (size_t i = 0; i < made; i++) {
    if (i < SHORT_KEEP) {
      handed[id % SHORT_BATCH][i] = v[i];
    } else if (item_ok(&v[i])) {
      smalloc_free(v[i].p);
    }
  }
  return NULL;
}

START_TEST(ten_thousand_short_threads)
{
  warm_up();
  smalloc_stats_t a, b;
  sm_stats_snap(&a);
  for (unsigned base_id = 0; base_id < SHORT_THREADS; base_id += SHORT_BATCH) {
    pthread_t t[SHORT_BATCH];
    memset(handed, 0, sizeof handed);
    for (unsigned i = 0; i < SHORT_BATCH; i++)
      start(&t[i], short_lived, (void *)(uintptr_t)(base_id + i));
    for (unsigned i = 0; i < SHORT_BATCH; i++)
      join(t[i]);
    for (unsigned i = 0; i < SHORT_BATCH; i++)
      for (unsigned k = 0; k < SHORT_KEEP; k++)
        if (handed[i][k].p) {
          if (item_ok(&handed[i][k]))
            smalloc_free(handed[i][k].p);
        } else {
          worker_fail("thread %u handed no block", base_id + i);
        }
    if (atomic_load(&failures))
      break;
  }
  check_no_failures();
  smalloc_collect(true);
  sm_stats_snap(&b);
  ck_assert_msg(b.blocks_in_use == a.blocks_in_use, "%lld blocks lost",
                (long long)(b.blocks_in_use - a.blocks_in_use));
  /* Exited threads' segments are reused or released, not piled up. */
  ck_assert_msg(b.bytes_mapped <= a.bytes_mapped + 64 * MiB,
                "bytes mapped grew from %llu to %llu over %d threads",
                (unsigned long long)a.bytes_mapped, (unsigned long long)b.bytes_mapped,
                SHORT_THREADS);
}
END_TEST


/* ---- heaps that wait for the next thread -------------------------------------------
 * An exited thread's heap waits, whole, for the next thread to start
 * (heap.c).  A leaver allocates WH_LIVE blocks of one class, frees the
 * first (back on its page's free list, in front) and exits with the rest
 * live: one page, held by a heap that waits. */

#include <sys/wait.h>
#include <unistd.h>

enum { WH_SIZE = SM_TEST_REQUEST_FOR(896), WH_LIVE = 5, WH_CACHE = 2, WH_LEAVERS = 4 };
static void *wh_blocks[WH_LEAVERS][WH_LIVE];
static pthread_barrier_t wh_all_allocated;
static bool wh_together;

static void *wh_leaver(void *arg)
{
  int id = (int)(intptr_t)arg;
  for (int i = 0; i < WH_LIVE; i++)
    if ((wh_blocks[id][i] = smalloc_malloc(WH_SIZE)) == NULL)
      worker_fail("leaver %d: malloc failed", id);
  smalloc_free(wh_blocks[id][0]);
  if (wh_together)   /* every leaver holds its heap until all have one */
    pthread_barrier_wait(&wh_all_allocated);
  return NULL;
}

static void *wh_taker(void *arg)
{
  *(void **)arg = smalloc_malloc(WH_SIZE);
  return NULL;
}

/* One leaver, on a process where no heap waits (collected), no purge
 * thread; the class's index in *k and the counts before it in s0. */
static void wh_leave(smalloc_stats_t *s0, int *k)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  sm_test_heap_here();   /* a thread without a heap would take the waiting one */
  smalloc_collect(true);
  sm_stats_snap(s0);
  *k = sm_test_class_index(s0, WH_SIZE);
  ck_assert_int_ge(*k, 0);
  pthread_t t;
  start(&t, wh_leaver, (void *)(intptr_t)0);
  join(t);
  check_no_failures();
}

static void wh_free_left(int id)
{
  for (int i = 1; i < WH_LIVE; i++)
    smalloc_free(wh_blocks[id][i]);
}

/* The next thread allocates from the page the leaver left, first the
 * block the leaver freed last: its free list, as the leaver left it (the
 * secure build hands blocks out in another order).  Nothing was taken
 * apart or carved, and the counts are exact. */
static bool wh_same_page(const void *a, const void *b)
{
  return (uintptr_t)a / SM_TEST_SMALL_PAGE == (uintptr_t)b / SM_TEST_SMALL_PAGE;
}

START_TEST(the_next_thread_takes_an_exited_threads_heap)
{
  smalloc_stats_t s0, s1, s2, s3;
  int k;
  wh_leave(&s0, &k);
  sm_stats_snap(&s1);
  ck_assert_uint_eq(s1.threads_exited - s0.threads_exited, 1);
  ck_assert_uint_eq(s1.pages_abandoned, s0.pages_abandoned);   /* it waits */
  ck_assert_uint_eq(s1.classes[k].blocks_in_use - s0.classes[k].blocks_in_use, WH_LIVE - 1);
  ck_assert_uint_eq(s1.classes[k].pages_in_use - s0.classes[k].pages_in_use, 1);

  void *got = NULL;
  pthread_t t;
  start(&t, wh_taker, &got);
  join(t);
  sm_stats_snap(&s2);
  ck_assert(wh_same_page(got, wh_blocks[0][1]));
  if (!SM_TEST_SECURE)
    ck_assert_ptr_eq(got, wh_blocks[0][0]);
  ck_assert_uint_eq(s2.threads_started - s1.threads_started, 1);
  ck_assert_uint_eq(s2.pages_abandoned, s0.pages_abandoned);
  ck_assert_uint_eq(s2.pages_reclaimed, s0.pages_reclaimed);
  ck_assert_uint_eq(s2.classes[k].pages_in_use, s1.classes[k].pages_in_use);
  ck_assert_uint_eq(s2.classes[k].blocks_in_use - s0.classes[k].blocks_in_use, WH_LIVE);
  ck_assert_uint_eq(s2.classes[k].allocs - s0.classes[k].allocs, WH_LIVE + 1);

  smalloc_free(got);
  wh_free_left(0);
  smalloc_collect(true);
  sm_stats_snap(&s3);
  ck_assert_uint_eq(s3.classes[k].blocks_in_use, s0.classes[k].blocks_in_use);
  ck_assert_uint_eq(s3.classes[k].pages_in_use, s0.classes[k].pages_in_use);
}
END_TEST

/* Trim takes a waiting heap apart: its page with live blocks goes to the
 * pool, and comes back to its segment once they are freed. */
START_TEST(trim_takes_a_waiting_heap_apart)
{
  smalloc_stats_t s0, s1, s2, s3;
  int k;
  wh_leave(&s0, &k);
  sm_stats_snap(&s1);
  ck_assert_uint_eq(s1.pages_abandoned, s0.pages_abandoned);
  smalloc_malloc_trim(0);
  sm_stats_snap(&s2);
  ck_assert_uint_eq(s2.pages_abandoned - s0.pages_abandoned, 1);
  ck_assert_uint_eq(s2.classes[k].blocks_in_use - s0.classes[k].blocks_in_use, WH_LIVE - 1);
  wh_free_left(0);
  smalloc_malloc_trim(0);
  sm_stats_snap(&s3);
  ck_assert_uint_eq(s3.classes[k].blocks_in_use, s0.classes[k].blocks_in_use);
  ck_assert_uint_eq(s3.classes[k].pages_in_use, s0.classes[k].pages_in_use);
}
END_TEST

/* Without a purge thread, a heap that waited a purge delay is taken apart
 * by the next slow path of any thread (the first allocation of a class
 * this thread has no page of), not before. */
START_TEST(a_heap_that_waited_a_purge_delay_is_taken_apart)
{
  smalloc_stats_t s0, s1, s2;
  int k;
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 1000), 0);
  wh_leave(&s0, &k);
  void *early = smalloc_malloc(SM_TEST_REQUEST_FOR(2560));   /* a slow path */
  sm_stats_snap(&s1);
  ck_assert_uint_eq(s1.pages_abandoned, s0.pages_abandoned);
  usleep(1100 * 1000);
  void *late = smalloc_malloc(SM_TEST_REQUEST_FOR(3072));    /* another */
  sm_stats_snap(&s2);
  ck_assert_uint_eq(s2.pages_abandoned - s0.pages_abandoned, 1);
  smalloc_free(early);
  smalloc_free(late);
  wh_free_left(0);
}
END_TEST

/* Beyond SMALLOC_HEAP_CACHE, the heaps of threads that exit are taken
 * apart at once, and the rest wait. */
START_TEST(heaps_beyond_the_cache_are_taken_apart)
{
  smalloc_stats_t s0, s1, s2;
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HEAP_CACHE, WH_CACHE), 0);
  sm_test_heap_here();   /* a thread without a heap would take the waiting one */
  smalloc_collect(true);
  sm_stats_snap(&s0);
  ck_assert_int_eq(pthread_barrier_init(&wh_all_allocated, NULL, WH_LEAVERS), 0);
  wh_together = true;
  pthread_t t[WH_LEAVERS];
  for (int i = 0; i < WH_LEAVERS; i++)
    start(&t[i], wh_leaver, (void *)(intptr_t)i);
  for (int i = 0; i < WH_LEAVERS; i++)
    join(t[i]);
  wh_together = false;
  pthread_barrier_destroy(&wh_all_allocated);
  check_no_failures();
  sm_stats_snap(&s1);
  ck_assert_uint_eq(s1.threads_exited - s0.threads_exited, WH_LEAVERS);
  ck_assert_uint_eq(s1.pages_abandoned - s0.pages_abandoned, WH_LEAVERS - WH_CACHE);
  smalloc_collect(true);
  sm_stats_snap(&s2);
  ck_assert_uint_eq(s2.pages_abandoned - s0.pages_abandoned, WH_LEAVERS);
  for (int i = 0; i < WH_LEAVERS; i++)
    wh_free_left(i);
}
END_TEST

/* Trim gives back the heaps of exited threads, but a page of each (heap.c:
 * the pool of heaps): every one once (heaps_purged), none before it
 * without a purge thread.  The threads that start afterwards take the
 * heaps given back and allocate as from fresh ones: blocks of many
 * classes, written and read back, none left in use; and trim gives those
 * heaps back again. */
enum { HP_THREADS = 12, HP_BLOCKS = 40 };
static pthread_barrier_t hp_all_allocated;

static void *hp_worker(void *arg)
{
  unsigned id = (unsigned)(uintptr_t)arg;
  unsigned char *v[HP_BLOCKS];
  for (int i = 0; i < HP_BLOCKS; i++) {
    size_t n = 16 + (size_t)i * 97;   /* 16 bytes to 3.8 KiB */
    if ((v[i] = smalloc_malloc(n)) == NULL)
      worker_fail("thread %u: malloc(%zu) failed", id, n);
    else
      memset(v[i], (int)(id * HP_BLOCKS + (unsigned)i) & 0xff, n);
  }
  pthread_barrier_wait(&hp_all_allocated);   /* a heap each, all at once */
  for (int i = 0; i < HP_BLOCKS; i++) {
    size_t n = 16 + (size_t)i * 97;
    for (size_t j = 0; v[i] && j < n; j++)
      if (v[i][j] != ((id * HP_BLOCKS + (unsigned)i) & 0xff)) {
        worker_fail("thread %u: block %d changed at byte %zu", id, i, j);
        break;
      }
    smalloc_free(v[i]);
  }
  return NULL;
}

static void hp_generation(void)
{
  pthread_t t[HP_THREADS];
  ck_assert_int_eq(pthread_barrier_init(&hp_all_allocated, NULL, HP_THREADS), 0);
  for (int i = 0; i < HP_THREADS; i++)
    start(&t[i], hp_worker, (void *)(uintptr_t)i);
  for (int i = 0; i < HP_THREADS; i++)
    join(t[i]);
  pthread_barrier_destroy(&hp_all_allocated);
  check_no_failures();
}

START_TEST(trim_gives_back_the_heaps_of_exited_threads)
{
  smalloc_stats_t s0, s1, s2, s3, s4;
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  sm_test_heap_here();   /* a thread without a heap would take a waiting one */
  smalloc_malloc_trim(0);
  sm_stats_snap(&s0);
  hp_generation();
  sm_stats_snap(&s1);
  ck_assert_uint_eq(s1.threads_exited - s0.threads_exited, HP_THREADS);
  ck_assert_uint_eq(s1.heaps_purged, s0.heaps_purged);
  smalloc_malloc_trim(0);
  sm_stats_snap(&s2);
  ck_assert_uint_eq(s2.heaps_purged - s0.heaps_purged, HP_THREADS);

  hp_generation();
  sm_stats_snap(&s3);
  ck_assert_uint_eq(s3.threads_started - s2.threads_started, HP_THREADS);
  /* (glibc keeps a block of each thread it caches the stack of) */
  ck_assert_uint_eq(s3.blocks_in_use, s2.blocks_in_use);
  ck_assert_uint_eq(s3.heaps_purged, s2.heaps_purged);
  smalloc_malloc_trim(0);
  sm_stats_snap(&s4);
  ck_assert_uint_eq(s4.heaps_purged - s3.heaps_purged, HP_THREADS);
}
END_TEST

/* A heap that waited in the parent serves a thread of the child. */
START_TEST(a_child_takes_a_heap_that_waited_in_its_parent)
{
  smalloc_stats_t s0;
  int k;
  wh_leave(&s0, &k);
  smalloc_stats_t s1;
  sm_stats_snap(&s1);
  ck_assert_uint_eq(s1.pages_abandoned, s0.pages_abandoned);   /* it waits */
  pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0) {
    void *got = NULL;
    pthread_t t;
    if (pthread_create(&t, NULL, wh_taker, &got) != 0 || pthread_join(t, NULL) != 0)
      _exit(2);
    if (!wh_same_page(got, wh_blocks[0][1]) || (!SM_TEST_SECURE && got != wh_blocks[0][0]))
      _exit(3);
    if (sm_test_snap(&s1) != 0 || s1.pages_abandoned != s0.pages_abandoned)
      _exit(4);   /* taken over whole, not taken apart */
    smalloc_free(got);
    wh_free_left(0);
    smalloc_collect(true);
    _exit(0);
  }
  int status;
  ck_assert_int_eq(waitpid(pid, &status, 0), pid);
  ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child: status %#x", status);
  wh_free_left(0);
}
END_TEST

/* Generations of threads take the heaps of the generation before: each
 * thread checks and frees half the blocks its predecessor in the chain
 * left, hands the other half to a consumer that lives throughout, and
 * allocates as many again.  The consumer's frees (and reallocs) land in
 * the pages of heaps that wait, are being taken over, or are being taken
 * apart, while that happens (ThreadSanitizer runs this in CI).  Nothing
 * is lost or damaged. */
enum { WR_CHAINS = 4, WR_GENS = 12, WR_KEEP = 256 };
static item_t wr_pool[WR_CHAINS][WR_KEEP];

static void *wr_worker(void *arg)
{
  unsigned id = (unsigned)(uintptr_t)arg;   /* generation * WR_CHAINS + chain */
  item_t *v = wr_pool[id % WR_CHAINS];
  item_t given[WR_KEEP / 2];
  size_t nh = 0;
  sm_rng_t r;
  sm_rng_seed(&r, 0x5eed0000u + id);
  for (size_t i = 0; i < WR_KEEP; i++) {
    if (v[i].p) {
      if (i % 2)
        given[nh++] = v[i];
      else if (item_ok(&v[i]))
        smalloc_free(v[i].p);
      v[i].p = NULL;
    }
    if (!make_item(&v[i], &r, id))
      break;
  }
  if (nh)
    ring_push(given, nh);
  return NULL;
}

START_TEST(generations_take_each_others_heaps_while_another_thread_frees_into_them)
{
  warm_up();
  smalloc_stats_t a, b;
  sm_stats_snap(&a);
  ring.producers_left = 1;   /* until the last generation is done */
  atomic_store(&consumed, 0);
  worker_t f = {.id = 0};
  start(&f.t, consumer, &f);
  for (unsigned g = 0; g < WR_GENS; g++) {
    pthread_t t[WR_CHAINS];
    for (unsigned c = 0; c < WR_CHAINS; c++)
      start(&t[c], wr_worker, (void *)(uintptr_t)(g * WR_CHAINS + c));
    for (unsigned c = 0; c < WR_CHAINS; c++)
      join(t[c]);
  }
  ring_producer_done();
  join(f.t);
  check_no_failures();
  /* half of what each generation but the first found */
  ck_assert_uint_eq(atomic_load(&consumed), (WR_GENS - 1) * WR_CHAINS * (WR_KEEP / 2));
  for (unsigned c = 0; c < WR_CHAINS; c++)
    for (unsigned i = 0; i < WR_KEEP; i++)
      if (wr_pool[c][i].p && item_ok(&wr_pool[c][i]))
        smalloc_free(wr_pool[c][i].p);
  check_no_failures();
  smalloc_collect(true);
  sm_stats_snap(&b);
  ck_assert_msg(b.blocks_in_use == a.blocks_in_use, "%lld blocks lost",
                (long long)(b.blocks_in_use - a.blocks_in_use));
  ck_assert_uint_eq(b.threads_exited - a.threads_exited, WR_CHAINS * WR_GENS + 1);
}
END_TEST

int main(void)
{
  Suite *s = suite_create("threads");
  TCase *tc = sm_tcase("cross-thread", 120);
  tcase_add_test(tc, cross_thread_free);
  suite_add_tcase(s, tc);
  tc = sm_tcase("thread-exit", 120);
  tcase_add_test(tc, owner_exits_with_live_blocks);
  tcase_add_test(tc, ten_thousand_short_threads);
  suite_add_tcase(s, tc);
  tc = sm_tcase("waiting-heaps", 60);
  tcase_add_test(tc, the_next_thread_takes_an_exited_threads_heap);
  tcase_add_test(tc, trim_takes_a_waiting_heap_apart);
  tcase_add_test(tc, a_heap_that_waited_a_purge_delay_is_taken_apart);
  tcase_add_test(tc, heaps_beyond_the_cache_are_taken_apart);
  tcase_add_test(tc, trim_gives_back_the_heaps_of_exited_threads);
  tcase_add_test(tc, a_child_takes_a_heap_that_waited_in_its_parent);
  tcase_add_test(tc, generations_take_each_others_heaps_while_another_thread_frees_into_them);
  suite_add_tcase(s, tc);
  return sm_run_suite(s);
}
