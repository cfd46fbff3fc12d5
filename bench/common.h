/* Shared helpers for the benchmark programs.
 *
 * The programs are plain C11 + pthreads and are not linked with smalloc:
 * the allocator under test is chosen with LD_PRELOAD, so one binary runs
 * under every allocator.  Each prints one line
 *   time_s=<measured wall seconds> ops=<n> maxrss_kb=<peak RSS> checksum=<hex>
 * and the checksum depends only on the work done, never on addresses or
 * timing, so it must agree across allocators.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>

/* Make the compiler believe p is used and memory may have changed, so a
 * malloc/free pair is never elided and a store before free() is kept. */
#define ESCAPE(p) __asm__ volatile("" : : "g"(p) : "memory")

#define UNUSED __attribute__((unused))

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
}

static UNUSED double now_s(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* splitmix64: tiny, fast, good enough for choosing sizes and indices. */
static inline uint64_t rng_next(uint64_t *state)
{
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Uniform in [lo, hi]. */
static inline uint64_t rng_range(uint64_t *state, uint64_t lo, uint64_t hi)
{
  return lo + rng_next(state) % (hi - lo + 1);
}

/* A mixing function for checksums; sums of mix64() values are order
 * independent, which multi-threaded programs need. */
static inline uint64_t mix64(uint64_t v)
{
  v ^= v >> 33;
  v *= 0xff51afd7ed558ccdull;
  v ^= v >> 33;
  v *= 0xc4ceb9fe1a85ec53ull;
  return v ^ (v >> 33);
}

static UNUSED void *xmalloc(size_t n)
{
  void *p = malloc(n);
  if (p == NULL) {
    fprintf(stderr, "bench: malloc(%zu) failed\n", n);
    exit(2);
  }
  return p;
}

static UNUSED void *xrealloc(void *p, size_t n)
{
  void *q = realloc(p, n);
  if (q == NULL && n != 0) {
    fprintf(stderr, "bench: realloc(%zu) failed\n", n);
    exit(2);
  }
  return q;
}

/* The last argument "quick" selects the small sizes used by QUICK=1. */
static UNUSED int is_quick(int argc, char **argv)
{
  return argc > 1 && strcmp(argv[argc - 1], "quick") == 0;
}

static UNUSED void report(double seconds, uint64_t ops, uint64_t checksum)
{
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  printf("time_s=%.6f ops=%llu maxrss_kb=%ld checksum=%016llx\n", seconds,
         (unsigned long long)ops, ru.ru_maxrss, (unsigned long long)checksum);
  fflush(stdout);
}

static UNUSED void usage_exit(const char *msg)
{
  fprintf(stderr, "usage: %s\n", msg);
  exit(64);
}

#endif /* BENCH_COMMON_H */
