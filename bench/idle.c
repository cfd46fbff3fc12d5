/* Memory return, and what an address-space limit lets a program use.
 *
 *   bench_idle burst [quick] [IDLE_S]
 *       Allocate a burst of blocks (small 16-256 B, large 300 KB, huge
 *       8 MiB; 1 GiB in all, 128 MiB quick, BENCH_IDLE_MIB if set), write
 *       every page, free it all,
 *       then make no allocator call for IDLE_S seconds (default 3) while
 *       the resident size is sampled every 100 ms.  Prints one line
 *       "t_ms=T rss_kb=R" per sample (t from the end of the frees; the
 *       samples before 0 are the burst's peak and the moment after the
 *       frees), then the result line with base_kb (resident before the
 *       burst) and end_kb (after the idle time).
 *
 *   bench_idle limit SIZE
 *       Under a 256 MiB RLIMIT_AS for the whole process (a small program
 *       under `ulimit -v 262144`), malloc(SIZE) until NULL; prints the
 *       bytes obtained as limit_mib=M.
 */
#include "common.h"

#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static void sleep_ms(long ms)
{
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0) {
  }
}

static int burst(int quick, double idle_s)
{
  /* MiB in all: 1024, 128 quick, or BENCH_IDLE_MIB; three quarters small */
  const char *env = getenv("BENCH_IDLE_MIB");
  const size_t mib = env && atol(env) >= 16 ? (size_t)atol(env) : quick ? 128 : 1024;
  const size_t small_bytes = (mib * 3 / 4) << 20;
  const size_t large_n = (mib / 8 << 20) / 300000;
  const size_t huge_n = (mib / 8 << 20) / ((size_t)8 << 20);
  uint64_t rng = 0x1d1e;
  size_t nsmall = small_bytes / 136;   /* mean of 16..256 */
  uint64_t ck = 0;

  /* the pointer array is mapped, not malloc'ed, so that it is not part of
   * what the allocator gives back */
  void **v = mmap(NULL, (nsmall + large_n + huge_n) * sizeof *v, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (v == MAP_FAILED) {
    perror("bench_idle: mmap");
    return 2;
  }
  long base = rss_kb();
  double t0 = now_s();
  size_t n = 0;
  for (size_t i = 0; i < nsmall; i++) {
    size_t sz = (size_t)rng_range(&rng, 16, 256);
    uint64_t *p = xmalloc(sz);
    p[0] = sz;
    v[n++] = p;
  }
  for (size_t i = 0; i < large_n + huge_n; i++) {
    size_t sz = i < large_n ? 300000 : (size_t)8 << 20;
    unsigned char *p = xmalloc(sz);
    for (size_t o = 0; o < sz; o += 4096)
      p[o] = (unsigned char)o;
    v[n++] = p;
  }
  long peak = rss_kb();
  for (size_t i = 0; i < n; i++) {
    ck += *(unsigned char *)v[i];
    free(v[i]);
  }
  double t1 = now_s();
  munmap(v, (nsmall + large_n + huge_n) * sizeof *v);
  printf("t_ms=-2 rss_kb=%ld\nt_ms=-1 rss_kb=%ld\n", peak, rss_kb());
  long end = 0;
  for (long ms = 100; ms <= (long)(idle_s * 1000); ms += 100) {
    double target = t1 + ms / 1000.0;
    double now = now_s();
    if (target > now)
      sleep_ms((long)((target - now) * 1000));
    end = rss_kb();
    printf("t_ms=%ld rss_kb=%ld\n", ms, end);
  }
  printf("time_s=%.6f ops=%zu maxrss_kb=%ld checksum=%016llx base_kb=%ld end_kb=%ld\n",
         t1 - t0, n, peak, (unsigned long long)ck, base, end);
  return 0;
}

static int limit(size_t size)
{
  enum { MAX = 1 << 16 };
  void **v = mmap(NULL, MAX * sizeof *v, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (v == MAP_FAILED)
    return 2;
  struct rlimit rl = {(rlim_t)256 << 20, (rlim_t)256 << 20};
  if (setrlimit(RLIMIT_AS, &rl) != 0) {
    perror("bench_idle: setrlimit");
    return 2;
  }
  size_t n = 0;
  while (n < MAX && (v[n] = malloc(size)) != NULL) {
    *(char *)v[n] = 1;
    n++;
  }
  for (size_t i = 0; i < n; i++)
    free(v[i]);
  printf("limit_mib=%zu blocks=%zu\n", n * size >> 20, n);
  return 0;
}

int main(int argc, char **argv)
{
  if (argc >= 2 && strcmp(argv[1], "burst") == 0) {
    int quick = argc >= 3 && strcmp(argv[2], "quick") == 0;
    double idle = argc >= 3 + quick ? atof(argv[2 + quick]) : 3.0;
    return burst(quick, idle > 0 ? idle : 3.0);
  }
  if (argc >= 3 && strcmp(argv[1], "limit") == 0)
    return limit((size_t)strtoull(argv[2], NULL, 0));
  usage_exit("bench_idle burst [quick] [IDLE_S] | bench_idle limit SIZE");
  return 64;
}
