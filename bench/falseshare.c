/* False sharing caused by the allocator.
 *
 *   bench_falseshare active|passive [quick]
 *
 * active:  every thread allocates two small blocks and writes into them
 *          over and over; an allocator that hands neighbouring blocks of one cache line
 *          to different threads makes the writes fight over that line.
 * passive: the main thread allocates two small blocks per thread, back to
 *          back and interleaved, and hands them out; each thread frees its
 *          blocks and then works as above.  An allocator that gives the freed
 *          blocks (whose neighbours belong to other threads) back to the
 *          freeing thread shares cache lines between threads.
 * ops counts increments of a block's counter.
 */
#include "common.h"

#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

enum { OBJ = 8, PER_THREAD = 2, MAXTHREADS = 8 };

static int nthreads;
static uint64_t iters, reps;
static pthread_barrier_t start;
static void *handed[PER_THREAD][MAXTHREADS];
static _Atomic uint64_t total_ck;
static double t_start[MAXTHREADS], t_end[MAXTHREADS];

static void *worker(void *arg)
{
  int self = (int)(uintptr_t)arg;
  uint64_t ck = 0;
  for (int j = 0; j < PER_THREAD; j++)
    if (handed[j][self] != NULL)
      free(handed[j][self]);
  pthread_barrier_wait(&start);
  t_start[self] = now_s();
  for (uint64_t i = 0; i < iters; i++) {
    volatile uint64_t *p[PER_THREAD];
    for (int j = 0; j < PER_THREAD; j++) {
      p[j] = xmalloc(OBJ);
      *p[j] = (uint64_t)(self + j);
    }
    /* one dependent chain of increments per block: every store waits for
     * the cache line, so sharing a line with another thread shows */
    for (uint64_t r = 0; r < reps; r++)
      for (int j = 0; j < PER_THREAD; j++)
        (*p[j])++;
    for (int j = 0; j < PER_THREAD; j++) {
      ck += *p[j];
      free((void *)p[j]);
    }
  }
  t_end[self] = now_s();
  atomic_fetch_add(&total_ck, mix64(ck + (uint64_t)self));
  return NULL;
}

int main(int argc, char **argv)
{
  if (argc < 2 || (strcmp(argv[1], "active") != 0 && strcmp(argv[1], "passive") != 0))
    usage_exit("bench_falseshare active|passive [quick]");
  int passive = strcmp(argv[1], "passive") == 0;
  int quick = is_quick(argc, argv);
  long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  nthreads = ncpu < 2 ? 2 : ncpu > MAXTHREADS ? MAXTHREADS : (int)ncpu;
  iters = quick ? 300 : 2000;
  reps = quick ? 40000 : 100000;

  if (passive)
    for (int j = 0; j < PER_THREAD; j++)
      for (int i = 0; i < nthreads; i++)
        handed[j][i] = xmalloc(OBJ);

  pthread_t t[MAXTHREADS];
  pthread_barrier_init(&start, NULL, (unsigned)nthreads + 1);
  for (int i = 0; i < nthreads; i++)
    if (pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)i) != 0) {
      fprintf(stderr, "bench_falseshare: pthread_create failed\n");
      return 2;
    }
  pthread_barrier_wait(&start);
  for (int i = 0; i < nthreads; i++)
    pthread_join(t[i], NULL);
  /* from the first thread's start to the last one's end, taken by the
   * workers: the main thread may not even be scheduled in between */
  double t0 = t_start[0], t1 = t_end[0];
  for (int i = 1; i < nthreads; i++) {
    if (t_start[i] < t0)
      t0 = t_start[i];
    if (t_end[i] > t1)
      t1 = t_end[i];
  }

  report(t1 - t0, (uint64_t)nthreads * iters * reps * PER_THREAD, atomic_load(&total_ck));
  return 0;
}
