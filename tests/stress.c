/* Stress: between 2 and 16 threads per core allocate blocks of random sizes
 * (mostly small, some up to 1 MiB), trade them through a shared array of
 * slots so that most blocks die on a thread other than their owner, start
 * and end as the run goes (an ending thread hands its live blocks to the
 * array), and a fork() in the middle checks that the child can allocate
 * while the parent's threads run.  Every block carries a pattern that is
 * checked before it is freed or resized.  At the end every block is freed
 * and smalloc's count of live blocks is back where it started.
 *
 * Scale: STRESS_SCALE (environment) or the first argument, default 1, which
 * keeps make check at a few seconds; STRESS_SCALE=50 runs for minutes.
 * STRESS_VERBOSE=1 prints what ran and the memory held at the end. */
#include "common.h"

#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <time.h>

/* The sanitizers' own allocators are not safe across a fork of a
 * multi-threaded process: under ThreadSanitizer a child cannot start
 * threads, and under AddressSanitizer a thread started in the child can
 * block for good on an allocator lock another parent thread held at the
 * fork (pthread_getattr_np frees through ASan's malloc while the thread
 * starts).  There the forked child stays single-threaded. */
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define STRESS_CHILD_NO_THREADS 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define STRESS_CHILD_NO_THREADS 1
#endif
#endif
#ifndef STRESS_CHILD_NO_THREADS
#define STRESS_CHILD_NO_THREADS 0
#endif

enum {
  SLOTS = 2048,            /* shared array */
  STRIPES = 64,            /* locks over the slots */
  LOCAL = 96,              /* blocks a worker holds itself */
  THREADS_PER_SCALE = 128, /* workers started per unit of scale */
  OPS_MIN = 1000,          /* operations per worker, uniform */
  OPS_MAX = 5000,
  STACK = 256 * 1024,
  MAX_WORKERS = 512,
};

/* ---- failures from threads: the first one is reported by the test ------------ */

static atomic_ulong failures;
static char first_failure[512];

static void __attribute__((format(printf, 1, 2))) stress_fail(const char *fmt, ...)
{
  if (atomic_fetch_add(&failures, 1) == 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(first_failure, sizeof first_failure, fmt, ap);
    va_end(ap);
  }
}

/* ---- blocks ------------------------------------------------------------------------ */

typedef struct block {
  unsigned char *p;
  size_t n;
  size_t align;   /* alignment asked for, 0 for plain malloc/calloc/realloc */
  uint64_t seed;
} block_t;

static size_t random_size(sm_rng_t *r)
{
  size_t k = sm_rng_below(r, 1000);
  if (k < 880)
    return sm_rng_range(r, 0, 256);
  if (k < 980)
    return sm_rng_range(r, 257, 32 * KiB);
  if (k < 995)
    return sm_rng_range(r, 32 * KiB + 1, 256 * KiB);
  return sm_rng_range(r, 256 * KiB + 1, 1 * MiB);
}

/* Big blocks carry the pattern in their first and last 8 KiB only: enough to
 * see a block handed out twice or overlapping another, cheap enough that
 * the run measures the allocator and not memset. */
enum { HEAD = 8 * 1024 };

static void block_fill(block_t *b)
{
  if (b->n <= 2 * HEAD) {
    sm_pattern_fill(b->p, b->n, b->seed);
  } else {
    sm_pattern_fill_range(b->p, 0, HEAD, b->seed);
    sm_pattern_fill_range(b->p, b->n - HEAD, b->n, b->seed);
  }
}

static size_t block_find_bad(const block_t *b)
{
  if (b->n <= 2 * HEAD)
    return sm_pattern_find_bad(b->p, b->n, b->seed);
  size_t bad = sm_pattern_find_bad(b->p, HEAD, b->seed);
  if (bad != SIZE_MAX)
    return bad;
  for (size_t i = b->n - HEAD; i < b->n; i++)
    if (b->p[i] != sm_pattern_byte(b->seed, i))
      return i;
  return SIZE_MAX;
}

static bool block_ok(const block_t *b, const char *when)
{
  size_t bad = block_find_bad(b);
  if (bad != SIZE_MAX) {
    stress_fail("%s: block %p of %zu bytes: byte %zu changed", when, (void *)b->p, b->n, bad);
    return false;
  }
  return true;
}

static bool block_new(block_t *b, sm_rng_t *r, uint64_t gen)
{
  size_t k = sm_rng_below(r, 100);
  b->n = random_size(r);
  b->align = 0;
  if (k < 80) {
    b->p = smalloc_malloc(b->n);
  } else if (k < 90) {
    b->p = smalloc_calloc(1, b->n);
    if (b->p && sm_find_not_byte(b->p, b->n, 0) != SIZE_MAX) {
      stress_fail("calloc(1, %zu) = %p: byte %zu not zero", b->n, (void *)b->p,
                  sm_find_not_byte(b->p, b->n, 0));
      smalloc_free(b->p);
      b->p = NULL;
      return false;
    }
  } else {
    b->align = (size_t)16 << sm_rng_below(r, 9);   /* 16 .. 4096 */
    if (k < 94) {
      void *q = NULL;
      int rc = smalloc_posix_memalign(&q, b->align, b->n);
      b->p = rc == 0 ? q : NULL;
    } else if (k < 97) {
      b->p = smalloc_aligned_alloc(b->align, b->n);
    } else {
      b->p = smalloc_memalign(b->align, b->n);
    }
  }
  if (!b->p) {
    stress_fail("allocation of %zu bytes (alignment %zu) failed", b->n, b->align);
    return false;
  }
  if (b->align && !sm_is_aligned(b->p, b->align))
    stress_fail("block %p of %zu bytes: not aligned to %zu", (void *)b->p, b->n, b->align);
  if (b->n >= 16 && !sm_is_aligned(b->p, 16))
    stress_fail("block %p of %zu bytes: not 16-byte aligned", (void *)b->p, b->n);
  if (smalloc_malloc_usable_size(b->p) < b->n)
    stress_fail("block %p of %zu bytes: usable size %zu", (void *)b->p, b->n,
                smalloc_malloc_usable_size(b->p));
  b->seed = sm_pattern_seed(b->p, gen);
  block_fill(b);
  return true;
}

/* Check, then free through one of the free entry points. */
static void block_free(block_t *b, sm_rng_t *r, const char *when)
{
  if (!b->p)
    return;
  block_ok(b, when);
  size_t k = sm_rng_below(r, 10);
  if (k < 2)
    smalloc_free_sized(b->p, b->n);
  else if (k < 4 && b->align)
    smalloc_free_aligned_sized(b->p, b->align, b->n);
  else
    smalloc_free(b->p);
  b->p = NULL;
}

/* Check, resize (never to 0, which would free), check the kept prefix and
 * fill the block anew. */
static void block_realloc(block_t *b, sm_rng_t *r, uint64_t gen)
{
  if (!block_ok(b, "before realloc"))
    return;
  size_t n = random_size(r) + 1;
  unsigned char *q = smalloc_realloc(b->p, n);
  if (!q) {
    stress_fail("realloc(%p, %zu) failed", (void *)b->p, n);
    return;
  }
  size_t keep = n < b->n ? n : b->n;
  if (keep > HEAD)
    keep = HEAD;
  size_t bad = sm_pattern_find_bad(q, keep, b->seed);
  if (bad != SIZE_MAX)
    stress_fail("realloc(%p, %zu -> %zu) = %p: byte %zu not kept", (void *)b->p, b->n, n,
                (void *)q, bad);
  if (smalloc_malloc_usable_size(q) < n)
    stress_fail("realloc to %zu: usable size %zu", n, smalloc_malloc_usable_size(q));
  b->p = q;
  b->n = n;
  b->align = 0;
  b->seed = sm_pattern_seed(q, gen);
  block_fill(b);
}

/* ---- the shared slots ---------------------------------------------------------------- */

static block_t slots[SLOTS];
static pthread_mutex_t stripes[STRIPES];

/* Put *in (or nothing, when in->p is NULL) into a slot and return what was
 * there. */
static block_t slot_swap(size_t i, const block_t *in)
{
  pthread_mutex_t *m = &stripes[i % STRIPES];
  pthread_mutex_lock(m);
  block_t out = slots[i];
  slots[i] = *in;
  pthread_mutex_unlock(m);
  return out;
}

/* ---- workers ------------------------------------------------------------------------- */

enum { W_FREE = 0, W_RUNNING, W_DONE };

typedef struct worker {
  pthread_t thread;
  atomic_int state;
  uint64_t seed;
} worker_t;

static worker_t workers[MAX_WORKERS];
static atomic_ulong total_ops;

static void local_drop(block_t *local, size_t *nlocal, size_t i)
{
  local[i] = local[--*nlocal];
  local[*nlocal].p = NULL;
}

static void *worker_main(void *arg)
{
  worker_t *w = arg;
  sm_rng_t r;
  block_t local[LOCAL];
  size_t nlocal = 0;
  memset(local, 0, sizeof local);
  sm_rng_seed(&r, w->seed);
  unsigned long ops = sm_rng_range(&r, OPS_MIN, OPS_MAX);
  uint64_t gen = w->seed << 20;

  for (unsigned long op = 0; op < ops; op++) {
    size_t k = sm_rng_below(&r, 100);
    if (k < 35 || nlocal == 0) {
      if (nlocal == LOCAL) {
        size_t i = sm_rng_below(&r, nlocal);
        block_free(&local[i], &r, "local free");
        local_drop(local, &nlocal, i);
      }
      if (block_new(&local[nlocal], &r, gen++))
        nlocal++;
    } else if (k < 55) {
      size_t i = sm_rng_below(&r, nlocal);
      block_free(&local[i], &r, "local free");
      local_drop(local, &nlocal, i);
    } else if (k < 85) {
      /* trade with the array: give one of ours or nothing, take what is
       * there; what we take is mostly freed at once, on this thread */
      block_t give = {0};
      if (sm_rng_below(&r, 2)) {
        size_t i = sm_rng_below(&r, nlocal);
        give = local[i];
        local_drop(local, &nlocal, i);
      }
      block_t got = slot_swap(sm_rng_below(&r, SLOTS), &give);
      if (got.p) {
        if (nlocal < LOCAL && sm_rng_below(&r, 4) == 0) {
          if (block_ok(&got, "taken from a slot"))
            local[nlocal++] = got;
        } else {
          block_free(&got, &r, "free of a traded block");
        }
      }
    } else if (k < 95) {
      block_realloc(&local[sm_rng_below(&r, nlocal)], &r, gen++);
    } else {
      /* a short-lived burst, freed in reverse */
      block_t burst[16];
      size_t nb = sm_rng_range(&r, 1, 16), got = 0;
      for (size_t i = 0; i < nb; i++)
        if (block_new(&burst[got], &r, gen++))
          got++;
      while (got > 0)
        block_free(&burst[--got], &r, "burst free");
    }
  }

  /* ending: the live blocks go to the array, whatever they displace is
   * freed here */
  for (size_t i = 0; i < nlocal; i++) {
    if (!block_ok(&local[i], "handed over at thread exit"))
      continue;
    block_t got = slot_swap(sm_rng_below(&r, SLOTS), &local[i]);
    block_free(&got, &r, "free of a block displaced at exit");
  }
  atomic_fetch_add(&total_ops, ops);
  atomic_store(&w->state, W_DONE);
  return NULL;
}

static bool start_thread(pthread_t *t, void *(*fn)(void *), void *arg)
{
  pthread_attr_t a;
  pthread_attr_init(&a);
  pthread_attr_setstacksize(&a, STACK);
  int rc = pthread_create(t, &a, fn, arg);
  pthread_attr_destroy(&a);
  if (rc != 0)
    stress_fail("pthread_create: %s", strerror(rc));
  return rc == 0;
}

/* glibc caches the stacks of joined threads together with their TLS vector,
 * which it allocates with calloc: when smalloc is the system malloc those
 * blocks count as live.  Running the most threads the test ever runs at once
 * first fills that cache, so the count taken afterwards stays exact; one
 * more, for smalloc's purge thread, which glibc may give a cached stack of
 * the test's size, and which is started once here: the ones after it get
 * its stack and vector back from glibc's cache, and the first one started
 * during the test made the count one higher at its end (make check runs
 * this suite without it, SMALLOC_BACKGROUND=0). */
static atomic_int warm_go;

static void *warm_thread(void *arg)
{
  (void)arg;
  while (!atomic_load(&warm_go))
    sched_yield();
  smalloc_free(smalloc_malloc(64));
  return NULL;
}

static void warm_up(unsigned n)
{
  static pthread_t t[MAX_WORKERS + 1];
  unsigned started = 0;
  atomic_store(&warm_go, 0);
  while (started < n && start_thread(&t[started], warm_thread, NULL))
    started++;
  atomic_store(&warm_go, 1);
  for (unsigned i = 0; i < started; i++)
    pthread_join(t[i], NULL);
  /* a freed block of 300 KB asks for the purge thread */
  smalloc_stats_t s;
  for (int i = 0; i < 1000; i++) {
    smalloc_free(smalloc_malloc(300 << 10));
    sm_stats_snap(&s);
    if (s.background_threads > 0 || !smalloc_option_get(SMALLOC_OPTION_BACKGROUND))
      break;
    usleep(1000);
  }
}

/* ---- fork in the middle ---------------------------------------------------------------- */

static void *child_thread(void *arg)
{
  sm_rng_t r;
  block_t b[64];
  sm_rng_seed(&r, (uint64_t)(uintptr_t)arg);
  for (int round = 0; round < 20; round++) {
    for (int i = 0; i < 64; i++)
      if (!block_new(&b[i], &r, (uint64_t)round * 64 + (uint64_t)i))
        _exit(2);
    for (int i = 0; i < 64; i++)
      block_free(&b[i], &r, "child thread");
  }
  return NULL;
}

/* The child: allocates, checks and frees blocks of its own and from a thread
 * of its own, frees what it finds in the slots whose lock nobody held at the
 * fork, and exits 0 if all was well. */
static int child_main(uint64_t seed)
{
  enum { N = 1000 };
  static block_t b[N];
  sm_rng_t r;
  sm_rng_seed(&r, seed);
  alarm(60);
  for (int i = 0; i < N; i++)
    if (!block_new(&b[i], &r, (uint64_t)i))
      break;
  pthread_t t;
  memset(&t, 0, sizeof t);   /* read only when the thread started */
  bool have_thread = !STRESS_CHILD_NO_THREADS && start_thread(&t, child_thread, (void *)(uintptr_t)(seed + 1));
  for (size_t i = 0; i < SLOTS; i += 3) {
    pthread_mutex_t *m = &stripes[i % STRIPES];
    if (pthread_mutex_trylock(m) != 0)
      continue;   /* held by a thread that does not exist here */
    block_t got = slots[i];
    slots[i].p = NULL;
    pthread_mutex_unlock(m);
    block_free(&got, &r, "child: block from a slot");
  }
  for (int i = 0; i < N; i++)
    block_free(&b[i], &r, "child");
  if (have_thread)
    pthread_join(t, NULL);
  if (atomic_load(&failures)) {
    fprintf(stderr, "stress child: %s\n", first_failure);
    return 1;
  }
  return 0;
}

static void fork_and_check(uint64_t seed)
{
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0) {
    stress_fail("fork: %s", strerror(errno));
    return;
  }
  if (pid == 0)
    _exit(child_main(seed));
  int status;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) {
      stress_fail("waitpid: %s", strerror(errno));
      return;
    }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    stress_fail("forked child: %s %d", WIFEXITED(status) ? "exit status" : "signal",
                WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
}

/* ---- the run ------------------------------------------------------------------------ */

static unsigned long stress_scale(void)
{
  const char *s = getenv("STRESS_SCALE");
  if (!s || !*s)
    return 1;
  char *end;
  unsigned long v = strtoul(s, &end, 10);
  ck_assert_msg(*end == '\0' && v >= 1 && v <= 100000, "STRESS_SCALE='%s': want 1..100000", s);
  return v;
}

static void pause_briefly(void)
{
  struct timespec ts = {0, 200 * 1000};
  nanosleep(&ts, NULL);
}

static void report_class_drift(const smalloc_stats_t *a, const smalloc_stats_t *b)
{
  for (unsigned i = 0; i < SMALLOC_STATS_CLASSES; i++)
    if (a->classes[i].blocks_in_use != b->classes[i].blocks_in_use)
      fprintf(stderr, "stress: class %u (%llu bytes): %llu blocks in use before, %llu after\n",
              i, (unsigned long long)b->classes[i].block_size,
              (unsigned long long)a->classes[i].blocks_in_use,
              (unsigned long long)b->classes[i].blocks_in_use);
}

START_TEST(threads_trade_blocks_and_nothing_is_lost)
{
  unsigned long scale = stress_scale();
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  if (cores < 1)
    cores = 1;
  unsigned min_threads = (unsigned)(2 * cores), max_threads = (unsigned)(16 * cores);
  if (max_threads > MAX_WORKERS)
    max_threads = MAX_WORKERS;
  if (min_threads > max_threads)
    min_threads = max_threads;
  unsigned long total = THREADS_PER_SCALE * scale;
  if (total < max_threads)
    total = max_threads;
  for (int i = 0; i < STRIPES; i++)
    pthread_mutex_init(&stripes[i], NULL);

  warm_up(max_threads + 1);
  smalloc_stats_t before, after;
  sm_stats_snap(&before);

  sm_rng_t r;
  sm_rng_seed(&r, 20240601);
  unsigned long started = 0, running = 0, peak = 0;
  unsigned target = max_threads;
  bool forked = false;
  for (;;) {
    for (unsigned i = 0; i < max_threads; i++)
      if (atomic_load(&workers[i].state) == W_DONE) {
        pthread_join(workers[i].thread, NULL);
        atomic_store(&workers[i].state, W_FREE);
        running--;
      }
    if (started >= total && running == 0)
      break;
    if (!forked && started >= total / 2 && running > 0) {
      fork_and_check(sm_rng_next(&r));
      forked = true;
    }
    /* the population swings between 2 and 16 threads per core */
    if (sm_rng_below(&r, 16) == 0)
      target = (unsigned)sm_rng_range(&r, min_threads, max_threads);
    for (unsigned i = 0; i < max_threads && running < target && started < total; i++) {
      if (atomic_load(&workers[i].state) != W_FREE)
        continue;
      workers[i].seed = sm_rng_next(&r) | 1;
      atomic_store(&workers[i].state, W_RUNNING);
      if (!start_thread(&workers[i].thread, worker_main, &workers[i])) {
        atomic_store(&workers[i].state, W_FREE);
        break;
      }
      started++;
      running++;
    }
    if (running > peak)
      peak = running;
    pause_briefly();
  }
  ck_assert_msg(forked, "no fork happened");

  for (size_t i = 0; i < SLOTS; i++) {
    block_t empty = {0};
    block_t got = slot_swap(i, &empty);
    block_free(&got, &r, "final free");
  }
  unsigned long n = atomic_load(&failures);
  ck_assert_msg(n == 0, "%lu failures; first: %s", n, first_failure);

  sm_stats_snap(&after);
  if (after.blocks_in_use != before.blocks_in_use)
    report_class_drift(&before, &after);
  ck_assert_msg(after.blocks_in_use == before.blocks_in_use,
                "blocks_in_use %llu at the start, %llu at the end (purge threads started: %llu, then %llu)",
                (unsigned long long)before.blocks_in_use,
                (unsigned long long)after.blocks_in_use,
                (unsigned long long)before.background_threads,
                (unsigned long long)after.background_threads);
  ck_assert_uint_ge(after.threads_started - before.threads_started, started);

  /* with nothing live but what was live at the start, a forced collect
   * leaves at most the segments holding those few blocks */
  smalloc_stats_t collected;
  smalloc_collect(true);
  sm_stats_snap(&collected);
  ck_assert_msg(collected.segments_in_use <= before.segments_in_use + 4,
                "%llu segments in use after smalloc_collect(true) (%llu at the start)",
                (unsigned long long)collected.segments_in_use,
                (unsigned long long)before.segments_in_use);
  if (getenv("STRESS_VERBOSE"))
    fprintf(stderr,
            "stress: scale %lu, %lu threads (peak %lu at once), %lu operations; "
            "at the end %llu segments in use, %llu MiB mapped (peak %llu MiB), "
            "%llu MiB committed; after collect %llu segments, %llu MiB mapped\n",
            scale, started, peak, (unsigned long)atomic_load(&total_ops),
            (unsigned long long)after.segments_in_use,
            (unsigned long long)(after.bytes_mapped >> 20),
            (unsigned long long)(after.bytes_mapped_peak >> 20),
            (unsigned long long)(after.bytes_committed >> 20),
            (unsigned long long)collected.segments_in_use,
            (unsigned long long)(collected.bytes_mapped >> 20));
}
END_TEST

int main(int argc, char **argv)
{
  if (argc > 1)
    setenv("STRESS_SCALE", argv[1], 1);
  unsigned long scale = 1;
  const char *s = getenv("STRESS_SCALE");
  if (s && strtoul(s, NULL, 10) > 1)
    scale = strtoul(s, NULL, 10);
  Suite *suite = suite_create("stress");
  TCase *tc = sm_tcase("stress", 120.0 * (double)scale);
  tcase_add_test(tc, threads_trade_blocks_and_nothing_is_lost);
  suite_add_tcase(suite, tc);
  return sm_run_suite(suite);
}
