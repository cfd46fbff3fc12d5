/* Server-like load: many threads, each keeping a pool of live blocks of
 * random sizes and replacing a random one each step.  One block in eight is
 * not freed by its owner but handed to another thread, which frees it.
 *
 * relay: 16 workers that come and go, as a server's worker threads do:
 * every RELAY_STEPS steps a worker starts its successor, which takes over
 * its pool (the blocks it allocated) and its place, and exits.  The new
 * thread frees what the exited one allocated; nothing is handed off.
 * The first blocks are main's, dealt out among the workers at random
 * (as mimalloc-bench's larson starts).
 *
 *   bench_server [relay] [quick]
 *   SERVER_STEPS=2000000 bench_server   steps of each worker, or of each
 *                                       relay of workers (default
 *                                       500,000; quick 25,000)
 */
#include "common.h"

#include <pthread.h>
#include <stdatomic.h>

enum { NTHREADS = 8, POOL = 2000, HANDOFF = 8, DRAIN_EVERY = 32 };
enum { RELAYS = 16, RELAY_STEPS = 25000 };

static struct inbox inbox[NTHREADS];
static uint64_t steps, relay_steps;
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

/* One relay of workers: its pool and where it stands, handed from each
 * worker to its successor.  Worker g starts worker g + 1 and stores its
 * id in workers[g + 1], a slot of its own: with one slot for the chain,
 * a successor that finished and started its own before pthread_create
 * returned in its predecessor (which may store the id that late) had its
 * id overwritten with a stale one, and main joined a thread twice
 * (double frees in glibc's own thread bookkeeping, under any malloc).
 * Main joins every worker in turn; it reads workers[g + 1] after joining
 * worker g. */
struct relay {
  uint64_t **pool;
  uint64_t rng, ck, done;
  pthread_t *workers;
  uint64_t gens;             /* workers in the relay */
};

static void *relay_worker(void *arg)
{
  struct relay *r = arg;
  uint64_t g = r->done / relay_steps;
  uint64_t stop = r->done + relay_steps < steps ? r->done + relay_steps : steps;
  for (; r->done < stop; r->done++) {
    unsigned i = (unsigned)(rng_next(&r->rng) % POOL);
    r->ck += retire_block(r->pool[i]);
    r->pool[i] = make_block(&r->rng);
  }
  if (g + 1 < r->gens && pthread_create(&r->workers[g + 1], NULL, relay_worker, r) != 0) {
    fprintf(stderr, "bench_server: pthread_create failed\n");
    exit(2);
  }
  return NULL;
}

static int run_relays(void)
{
  static struct relay relay[RELAYS];
  double t0 = now_s();
  for (unsigned k = 0; k < RELAYS; k++) {
    relay[k].gens = steps == 0 ? 1 : (steps + relay_steps - 1) / relay_steps;
    relay[k].workers = xmalloc(relay[k].gens * sizeof *relay[k].workers);
    relay[k].rng = 0x4e1a7000 + k;
    relay[k].pool = xmalloc(POOL * sizeof *relay[k].pool);
    for (int i = 0; i < POOL; i++)
      relay[k].pool[i] = make_block(&relay[k].rng);
  }
  /* the blocks main allocated, dealt out among the relays at random */
  uint64_t rng = 0x4e1a7fff;
  for (unsigned n = RELAYS * POOL; n > 1; n--) {
    unsigned a = n - 1, b = (unsigned)(rng_next(&rng) % n);
    uint64_t *t = relay[a / POOL].pool[a % POOL];
    relay[a / POOL].pool[a % POOL] = relay[b / POOL].pool[b % POOL];
    relay[b / POOL].pool[b % POOL] = t;
  }
  for (unsigned k = 0; k < RELAYS; k++) {
    if (pthread_create(&relay[k].workers[0], NULL, relay_worker, &relay[k]) != 0) {
      fprintf(stderr, "bench_server: pthread_create failed\n");
      return 2;
    }
  }
  uint64_t ck = 0;
  for (unsigned k = 0; k < RELAYS; k++) {
    for (uint64_t g = 0; g < relay[k].gens; g++)
      pthread_join(relay[k].workers[g], NULL);
    free(relay[k].workers);
    for (int i = 0; i < POOL; i++)
      ck += retire_block(relay[k].pool[i]);
    free(relay[k].pool);
    ck += relay[k].ck;
  }
  double t1 = now_s();
  report(t1 - t0, (uint64_t)RELAYS * steps, ck);
  return 0;
}

int main(int argc, char **argv)
{
  int quick = is_quick(argc, argv);
  steps = count_from_env("SERVER_STEPS", quick ? 25000 : 500000);
  relay_steps = quick ? RELAY_STEPS / 20 : RELAY_STEPS;
  if (argc > 1 && strcmp(argv[1], "relay") == 0)
    return run_relays();
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
