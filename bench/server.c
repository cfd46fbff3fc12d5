/* Server-like load: many threads, each keeping a pool of live blocks of
 * random sizes and replacing a random one each step.  One block in eight is
 * not freed by its owner but handed to another thread, which frees it.
 *
 *   bench_server [quick]
 *   SERVER_STEPS=2000000 bench_server   steps of each thread (default
 *                                       500,000; quick 25,000)
 */
#include "common.h"

#include <pthread.h>
#include <stdatomic.h>

enum { NTHREADS = 8, POOL = 2000, HANDOFF = 8, DRAIN_EVERY = 32 };

static struct inbox inbox[NTHREADS];
static uint64_t steps;
static pthread_barrier_t done_stepping;
static _Atomic uint64_t total_ck;

/* Mostly small blocks, some medium, a few up to 32 KiB. */
static size_t pick_size(uint64_t *rng)
{
  uint64_t r = rng_next(rng) % 100;
  if (r < 80)
    return (size_t)rng_range(rng, 16, 256);
  if (r < 97)
    return (size_t)rng_range(rng, 257, 4096);
  return (size_t)rng_range(rng, 4097, 32768);
}

/* Word 0 is the hand-off link, word 1 a tag holding the size, the last
 * word (when there is room) a value derived from the tag. */
static uint64_t *make_block(uint64_t *rng)
{
  size_t sz = pick_size(rng);
  uint64_t *p = xmalloc(sz);
  uint64_t tag = (rng_next(rng) << 20) | sz;
  p[1] = tag;
  size_t last = sz / 8 - 1;
  if (last >= 2)
    p[last] = mix64(tag);
  return p;
}

static uint64_t retire_block(uint64_t *p)
{
  uint64_t tag = p[1];
  size_t last = (tag & 0xfffff) / 8 - 1;
  uint64_t v = mix64(tag) + (last >= 2 ? p[last] : 0);
  free(p);
  return v;
}


static void *worker(void *arg)
{
  unsigned self = (unsigned)(uintptr_t)arg;
  uint64_t rng = 0x5e7e7000 + self;
  uint64_t ck = 0;
  uint64_t **pool = xmalloc(POOL * sizeof *pool);
  for (int i = 0; i < POOL; i++)
    pool[i] = make_block(&rng);

  for (uint64_t s = 0; s < steps; s++) {
    uint64_t r = rng_next(&rng);
    unsigned i = (unsigned)(r % POOL);
    uint64_t *old = pool[i];
    if ((r >> 32) % HANDOFF == 0) {
      unsigned to = (unsigned)(self + 1 + (r >> 40) % (NTHREADS - 1)) % NTHREADS;
      inbox_push(&inbox[to], old);
    } else {
      ck += retire_block(old);
    }
    pool[i] = make_block(&rng);
    if (s % DRAIN_EVERY == DRAIN_EVERY - 1)
      ck += inbox_drain(&inbox[self], retire_block);
  }

  pthread_barrier_wait(&done_stepping);
  ck += inbox_drain(&inbox[self], retire_block);
  for (int i = 0; i < POOL; i++)
    ck += retire_block(pool[i]);
  free(pool);
  atomic_fetch_add(&total_ck, ck);
  return NULL;
}

int main(int argc, char **argv)
{
  int quick = is_quick(argc, argv);
  steps = count_from_env("SERVER_STEPS", quick ? 25000 : 500000);
  pthread_t t[NTHREADS];
  pthread_barrier_init(&done_stepping, NULL, NTHREADS);

  double t0 = now_s();
  for (unsigned i = 0; i < NTHREADS; i++)
    if (pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)i) != 0) {
      fprintf(stderr, "bench_server: pthread_create failed\n");
      return 2;
    }
  for (unsigned i = 0; i < NTHREADS; i++)
    pthread_join(t[i], NULL);
  double t1 = now_s();

  report(t1 - t0, (uint64_t)NTHREADS * steps, atomic_load(&total_ck));
  return 0;
}
