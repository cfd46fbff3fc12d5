/* Large-block replacement: LIVE blocks of LO..HI bytes stay live; each
 * step frees a random one and allocates a block of a random size in its
 * place, writing one byte in every 4 KiB page of it (as a program that
 * fills its buffers would touch them).
 *
 *   bench_largerep huge [quick]    20 live blocks of 5-25 MiB, 2000 steps
 *   bench_largerep mid [quick]     64 live blocks of 256 KiB-2 MiB, 20000 steps
 */
#include "common.h"

int main(int argc, char **argv)
{
  if (argc < 2)
    usage_exit("bench_largerep huge|mid [quick]");
  int quick = is_quick(argc, argv);
  size_t lo, hi, live;
  uint64_t steps;
  if (strcmp(argv[1], "huge") == 0) {
    lo = (size_t)5 << 20;
    hi = (size_t)25 << 20;
    live = 20;
    steps = quick ? 200 : 2000;
  } else if (strcmp(argv[1], "mid") == 0) {
    lo = (size_t)256 << 10;
    hi = (size_t)2 << 20;
    live = 64;
    steps = quick ? 2000 : 20000;
  } else {
    usage_exit("bench_largerep huge|mid [quick]");
    return 64;
  }
  uint64_t rng = 0x1a26e000;
  unsigned char **v = xmalloc(live * sizeof *v);
  size_t *sz = xmalloc(live * sizeof *sz);
  uint64_t ck = 0;
  double t0 = now_s();
  for (size_t i = 0; i < live; i++) {
    sz[i] = (size_t)rng_range(&rng, lo, hi);
    v[i] = xmalloc(sz[i]);
    for (size_t o = 0; o < sz[i]; o += 4096)
      v[i][o] = (unsigned char)o;
  }
  for (uint64_t s = 0; s < steps; s++) {
    size_t i = (size_t)(rng_next(&rng) % live);
    ck += v[i][sz[i] - 1] + sz[i];
    free(v[i]);
    sz[i] = (size_t)rng_range(&rng, lo, hi);
    v[i] = xmalloc(sz[i]);
    for (size_t o = 0; o < sz[i]; o += 4096)
      v[i][o] = (unsigned char)(o + s);
    v[i][sz[i] - 1] = (unsigned char)s;
  }
  double t1 = now_s();
  for (size_t i = 0; i < live; i++)
    free(v[i]);
  free(v);
  free(sz);
  report(t1 - t0, steps, ck);
  return 0;
}
