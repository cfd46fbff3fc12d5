/* Many-thread churn with cross-thread frees: each thread keeps a pool of
 * live blocks of 16-256 bytes and replaces a random one each step; one
 * block in four is not freed by its owner but handed to another thread,
 * which frees it.  After the steps every thread stops and waits; the main
 * thread then reads the resident size against the live bytes (the pools
 * and the blocks still on their way in the inboxes: live_kb, rss_kb on the
 * result line), before anything is freed.
 *
 *   bench_xchurn THREADS [quick]
 *   XCHURN_SECONDS=60 bench_xchurn THREADS    run by time instead, and print
 *                                             the resident size every 5 s
 *   XCHURN_POOL=20000 bench_xchurn THREADS    blocks each thread keeps live
 *                                             (default 4096)
 *   XCHURN_STEPS=40000000 bench_xchurn THREADS   steps of all threads
 *                                             (default 8,000,000; quick 400,000)
 */
#include "common.h"

#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

enum { POOL_DEFAULT = 4096, HANDOFF = 4, DRAIN_EVERY = 32 };
static unsigned pool_size = POOL_DEFAULT;   /* blocks live per thread */

static struct inbox *inbox;
static unsigned nthreads;
static uint64_t steps;
static double deadline;              /* by time when > 0 */
static pthread_barrier_t stopped, measured;
static _Atomic uint64_t total_ck, live_bytes;

static uint64_t *make_block(uint64_t *rng)
{
  size_t sz = (size_t)rng_range(rng, 16, 256);
  uint64_t *p = xmalloc(sz);
  p[1] = (rng_next(rng) << 20) | sz;
  return p;
}

static uint64_t retire_block(uint64_t *p)
{
  uint64_t v = mix64(p[1]);
  free(p);
  return v;
}


static void *worker(void *arg)
{
  unsigned self = (unsigned)(uintptr_t)arg;
  uint64_t rng = 0x7c4e0000 + self;
  uint64_t ck = 0;
  uint64_t **pool = xmalloc(pool_size * sizeof *pool);
  for (unsigned i = 0; i < pool_size; i++)
    pool[i] = make_block(&rng);

  for (uint64_t s = 0; deadline > 0 || s < steps; s++) {
    uint64_t r = rng_next(&rng);
    unsigned i = (unsigned)(r % pool_size);
    uint64_t *old = pool[i];
    if ((r >> 32) % HANDOFF == 0) {
      unsigned to = (unsigned)(self + 1 + (r >> 40) % (nthreads - 1)) % nthreads;
      inbox_push(&inbox[to], old);
    } else {
      ck += retire_block(old);
    }
    pool[i] = make_block(&rng);
    if (s % DRAIN_EVERY == DRAIN_EVERY - 1) {
      ck += inbox_drain(&inbox[self], retire_block);
      if (deadline > 0 && (s & 4095) == 4095 && now_s() >= deadline)
        break;
    }
  }

  pthread_barrier_wait(&stopped);   /* nobody hands off any more */
  uint64_t live = 0;
  for (unsigned i = 0; i < pool_size; i++)
    live += pool[i][1] & 0xfffff;
  for (uint64_t *p = atomic_load(&inbox[self].head); p; p = (uint64_t *)(uintptr_t)p[0])
    live += p[1] & 0xfffff;
  atomic_fetch_add(&live_bytes, live);
  pthread_barrier_wait(&measured);  /* main reads the resident size */
  pthread_barrier_wait(&measured);
  ck += inbox_drain(&inbox[self], retire_block);
  for (unsigned i = 0; i < pool_size; i++)
    ck += retire_block(pool[i]);
  free(pool);
  atomic_fetch_add(&total_ck, ck);
  return NULL;
}

int main(int argc, char **argv)
{
  if (argc < 2 || atoi(argv[1]) < 2)
    usage_exit("bench_xchurn THREADS(>=2) [quick]");
  nthreads = (unsigned)atoi(argv[1]);
  int quick = is_quick(argc, argv);
  steps = count_from_env("XCHURN_STEPS", quick ? 400000 : 8000000) / nthreads;
  pool_size = (unsigned)count_from_env("XCHURN_POOL", POOL_DEFAULT);
  const char *secs = getenv("XCHURN_SECONDS");
  double t0 = now_s();
  if (secs && atof(secs) > 0)
    deadline = t0 + atof(secs);
  inbox = xmalloc(nthreads * sizeof *inbox);
  for (unsigned i = 0; i < nthreads; i++)
    atomic_init(&inbox[i].head, NULL);
  pthread_t *t = xmalloc(nthreads * sizeof *t);
  pthread_barrier_init(&stopped, NULL, nthreads);
  pthread_barrier_init(&measured, NULL, nthreads + 1);

  for (unsigned i = 0; i < nthreads; i++)
    if (pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)i) != 0) {
      fprintf(stderr, "bench_xchurn: pthread_create failed\n");
      return 2;
    }
  if (deadline > 0) {
    for (double next = t0 + 5; next < deadline; next += 5) {
      while (now_s() < next)
        usleep(20000);
      fprintf(stderr, "t=%.0fs rss_kb=%ld\n", next - t0, rss_kb());
    }
  }
  pthread_barrier_wait(&measured);
  double t1 = now_s();
  long rss = rss_kb();
  pthread_barrier_wait(&measured);
  for (unsigned i = 0; i < nthreads; i++)
    pthread_join(t[i], NULL);

  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  printf("time_s=%.6f ops=%llu maxrss_kb=%ld checksum=%016llx live_kb=%llu rss_kb=%ld\n", t1 - t0,
         (unsigned long long)(steps * nthreads), ru.ru_maxrss,
         (unsigned long long)atomic_load(&total_ck),
         (unsigned long long)(atomic_load(&live_bytes) / 1024), rss);
  free(t);
  free(inbox);
  return 0;
}
