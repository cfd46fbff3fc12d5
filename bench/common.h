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
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include <unistd.h>

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

/* A count from the environment variable name when it holds a positive
 * number, else dflt (a longer run, say, shows the steady state after the
 * heap has grown and its first touches are paid). */
static UNUSED uint64_t count_from_env(const char *name, uint64_t dflt)
{
  const char *v = getenv(name);
  unsigned long long n = v ? strtoull(v, NULL, 10) : 0;
  return n > 0 ? (uint64_t)n : dflt;
}

static UNUSED void report(double seconds, uint64_t ops, uint64_t checksum)
{
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  printf("time_s=%.6f ops=%llu maxrss_kb=%ld checksum=%016llx\n", seconds,
         (unsigned long long)ops, ru.ru_maxrss, (unsigned long long)checksum);
  fflush(stdout);
}

/* A lock-free inbox of blocks handed from one thread to another: the
 * block's first word links it (threaded workloads: server, xchurn). */
struct inbox {
  _Alignas(64) _Atomic(uint64_t *) head;
};

static UNUSED void inbox_push(struct inbox *in, uint64_t *p)
{
  uint64_t *old = atomic_load_explicit(&in->head, memory_order_relaxed);
  do
    p[0] = (uint64_t)(uintptr_t)old;
  while (!atomic_compare_exchange_weak_explicit(&in->head, &old, p, memory_order_release,
                                                memory_order_relaxed));
}

/* Take every block and hand each to retire; the sum of what it returns. */
static UNUSED uint64_t inbox_drain(struct inbox *in, uint64_t (*retire)(uint64_t *))
{
  uint64_t ck = 0;
  uint64_t *p = atomic_exchange_explicit(&in->head, NULL, memory_order_acquire);
  while (p != NULL) {
    uint64_t *next = (uint64_t *)(uintptr_t)p[0];
    ck += retire(p);
    p = next;
  }
  return ck;
}

/* The resident size now, in KiB (/proc/self/statm). */
static UNUSED long rss_kb(void)
{
  long pages = 0, res = 0;
  FILE *f = fopen("/proc/self/statm", "r");
  if (f) {
    if (fscanf(f, "%ld %ld", &pages, &res) != 2)
      res = 0;
    fclose(f);
  }
  return res * (sysconf(_SC_PAGESIZE) / 1024);
}

static UNUSED void usage_exit(const char *msg)
{
  fprintf(stderr, "usage: %s\n", msg);
  exit(64);
}

#endif /* BENCH_COMMON_H */
