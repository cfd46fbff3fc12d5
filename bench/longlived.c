/* A long-lived heap: N live small blocks (16-64 B), then random
 * replacements (free one, allocate another of a new size) among them.
 *
 *   bench_longlived N [quick]
 *
 * Building the heap is not timed; the replacements are.  maxrss shows what
 * the allocator needs to hold N small blocks.  ops counts replacements.
 */
#include "common.h"

static uint64_t *make_block(uint64_t *rng, uint64_t id)
{
  size_t sz = (size_t)rng_range(rng, 16, 64);
  uint64_t *p = xmalloc(sz);
  p[0] = id;
  p[1] = sz;
  return p;
}

int main(int argc, char **argv)
{
  if (argc < 2)
    usage_exit("bench_longlived N [quick]");
  uint64_t n = strtoull(argv[1], NULL, 10);
  if (n == 0)
    usage_exit("bench_longlived N [quick]  (N > 0)");
  uint64_t reps = is_quick(argc, argv) ? 300000 : 5000000;
  uint64_t rng = 0x10e6117ed;
  uint64_t ck = 0, id = 0;

  uint64_t **live = xmalloc(n * sizeof *live);
  for (uint64_t i = 0; i < n; i++)
    live[i] = make_block(&rng, id++);

  double t0 = now_s();
  for (uint64_t r = 0; r < reps; r++) {
    uint64_t i = rng_next(&rng) % n;
    uint64_t *p = live[i];
    ck += mix64(p[0] ^ p[1] << 40);
    free(p);
    live[i] = make_block(&rng, id++);
  }
  double t1 = now_s();

  /* Read every survivor back (untimed); leave them to process exit. */
  for (uint64_t i = 0; i < n; i++)
    ck += live[i][0] ^ live[i][1] << 40;
  report(t1 - t0, reps, ck);
  return 0;
}
