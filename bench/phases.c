/* A program that works in phases with pauses: each phase, two threads
 * each allocate 200,000 blocks of 16-256 bytes, write them, free them
 * and exit; then the program sleeps.  A pause a little longer than the
 * allocator's purge delay is where memory given back only to be faulted
 * in again at the next phase shows: the result line adds the page
 * faults (minflt) and the CPU seconds of the whole run (cpu_s), and the
 * resident size at the end (rss_kb); time_s is the phases' own time,
 * pauses left out.
 *
 *   bench_phases [PAUSE_MS [PHASES]]     default 1500 ms, 6 phases
 *
 * Not a `make bench` workload (a run takes PHASES pauses); run it by
 * hand under each allocator, e.g.
 *   SMALLOC_STATS=1 LD_PRELOAD=lib/.libs/libsmalloc.so.0 bench/bench_phases
 */
#include "common.h"

#include <pthread.h>
#include <sys/resource.h>
#include <time.h>

enum { BLOCKS = 200000, THREADS = 2 };

static void *work(void *arg)
{
  uint64_t rng = (uint64_t)(uintptr_t)arg, ck = 0;
  uint64_t **v = xmalloc(BLOCKS * sizeof *v);
  for (int i = 0; i < BLOCKS; i++) {
    size_t n = (size_t)rng_range(&rng, 16, 256);
    v[i] = xmalloc(n);
    memset(v[i], 1, n);
    v[i][0] = n;
  }
  for (int i = 0; i < BLOCKS; i++) {
    ck += mix64(v[i][0]);
    free(v[i]);
  }
  free(v);
  return (void *)(uintptr_t)ck;
}

int main(int argc, char **argv)
{
  long pause_ms = argc > 1 ? atol(argv[1]) : 1500;
  int phases = argc > 2 ? atoi(argv[2]) : 6;
  if (pause_ms < 0 || phases <= 0)
    usage_exit("bench_phases [PAUSE_MS [PHASES]]");
  double busy = 0;
  uint64_t ck = 0;
  for (int p = 0; p < phases; p++) {
    double t0 = now_s();
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
      pthread_create(&t[i], NULL, work, (void *)(uintptr_t)(p * THREADS + i + 1));
    for (int i = 0; i < THREADS; i++) {
      void *r;
      pthread_join(t[i], &r);
      ck += (uint64_t)(uintptr_t)r;
    }
    busy += now_s() - t0;
    struct timespec ts = {pause_ms / 1000, (pause_ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
  }
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  printf("minflt=%ld cpu_s=%.3f rss_kb=%ld ", ru.ru_minflt,
         (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6,
         rss_kb());
  report(busy, (uint64_t)phases * THREADS * BLOCKS, ck);
  return 0;
}
