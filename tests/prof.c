/* The heap profiler (smalloc_prof(3)): its estimates per call site and of
 * the live heap, read back from the profile it writes (pprof's heap_v2
 * text format, scaled back as pprof does); freed blocks leave it, from
 * any thread; nothing is sampled while it is off. */
#define _GNU_SOURCE
#include "common.h"

#include <dlfcn.h>
#include <math.h>
#include <pthread.h>

#define RATE 8192

typedef struct prof_site {
  const char *name;
  double live_est;        /* bytes, scaled back */
  uint64_t live_count;    /* samples live */
  uint64_t alloc_count;   /* samples since the start or reset */
} prof_site_t;

typedef struct prof_read {
  uint64_t live_count, live_bytes, alloc_count, alloc_bytes, rate;
  double live_est;
  prof_site_t sites[2];
  int lines;
} prof_read_t;

/* pprof's scaling of a heap_v2 line: count samples of bytes in all */
static double prof_unsample(uint64_t count, uint64_t bytes, uint64_t rate)
{
  if (count == 0)
    return 0;
  double avg = (double)bytes / (double)count;
  return (double)bytes / (1 - exp(-avg / (double)rate));
}

/* Dump the profile to a file and read it back; a line counts for a site
 * when one of its frames is in the site's function. */
static void prof_dump_read(prof_read_t *r, const char *site_a, const char *site_b)
{
  char path[] = "/tmp/smalloc-prof.XXXXXX";
  int fd = mkstemp(path);
  ck_assert_int_ge(fd, 0);
  close(fd);
  ck_assert_int_eq(smalloc_prof_dump(path), 0);
  FILE *f = fopen(path, "r");
  ck_assert_ptr_nonnull(f);
  memset(r, 0, sizeof *r);
  r->sites[0].name = site_a;
  r->sites[1].name = site_b;
  static char line[8192];
  ck_assert_ptr_nonnull(fgets(line, sizeof line, f));
  unsigned long long lc, lb, ac, ab, rate;
  ck_assert_int_eq(sscanf(line, "heap profile: %llu: %llu [%llu: %llu] @ heap_v2/%llu", &lc, &lb,
                          &ac, &ab, &rate), 5);
  r->live_count = lc;
  r->live_bytes = lb;
  r->alloc_count = ac;
  r->alloc_bytes = ab;
  r->rate = rate;
  bool maps = false;
  while (fgets(line, sizeof line, f)) {
    if (strcmp(line, "MAPPED_LIBRARIES:\n") == 0)
      maps = true;
    if (maps || line[0] == '\n')
      continue;
    int at = 0;
    ck_assert_int_eq(sscanf(line, "%llu: %llu [%llu: %llu] @%n", &lc, &lb, &ac, &ab, &at), 4);
    ck_assert_int_gt(at, 0);
    r->lines++;
    double est = prof_unsample(lc, lb, rate);
    r->live_est += est;
    bool counted[2] = {false, false};
    for (char *s = line + at, *end; *s && *s != '\n'; s = end) {
      void *pc = (void *)strtoull(s, &end, 16);
      if (end == s)
        break;
      Dl_info info;
      if (!dladdr((char *)pc - 1, &info) || !info.dli_sname)
        continue;
      for (int i = 0; i < 2; i++)
        if (r->sites[i].name && !counted[i] && strcmp(info.dli_sname, r->sites[i].name) == 0) {
          counted[i] = true;
          r->sites[i].live_est += est;
          r->sites[i].live_count += lc;
          r->sites[i].alloc_count += ac;
        }
    }
  }
  ck_assert_msg(maps, "no MAPPED_LIBRARIES section");
  fclose(f);
  unlink(path);
  char churn[sizeof path + 8];   /* the dump writes the churn profile beside it */
  snprintf(churn, sizeof churn, "%s.churn", path);
  unlink(churn);
}

static void *blocks[1 << 18];
static size_t nblocks;
static uint64_t rng = 0x5eed;

static size_t prof_size(void)
{
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return 32 + rng % 993;   /* 32-1024 bytes */
}

/* the two call sites; their names are looked up in the profile */
__attribute__((noinline)) size_t prof_site_a(size_t n);
__attribute__((noinline)) size_t prof_site_b(size_t n);

__attribute__((noinline)) size_t prof_site_a(size_t n)
{
  void *p = smalloc_malloc(n);
  if (!p)
    abort();   /* not ck_assert: test_prof --dump runs it outside a test */
  memset(p, 0xa, 16);
  blocks[nblocks++] = p;
  return n;
}

__attribute__((noinline)) size_t prof_site_b(size_t n)
{
  void *p = smalloc_malloc(n);
  if (!p)
    abort();
  memset(p, 0xb, 16);
  blocks[nblocks++] = p;
  return n;
}

static void prof_free_all(void)
{
  for (size_t i = 0; i < nblocks; i++)
    smalloc_free(blocks[i]);
  nblocks = 0;
}

static void prof_within(const char *what, double est, double truth, double tolerance)
{
  ck_assert_msg(fabs(est - truth) <= tolerance * truth, "%s: estimated %.0f bytes, true %.0f (%+.1f %%)",
                what, est, truth, 100 * (est - truth) / truth);
}

/* The two sites, 3:1 in bytes, until site b has 16 MiB; the same sizes
 * in the same order every time (the block sizes' generator starts again). */
static void prof_sites_3_to_1(size_t *true_a, size_t *true_b)
{
  rng = 0x5eed;
  *true_a = *true_b = 0;
  while (*true_b < 16 * MiB) {
    for (int k = 0; k < 3; k++)
      *true_a += prof_site_a(prof_size());
    *true_b += prof_site_b(prof_size());
  }
}

/* Two call sites allocate blocks of the same sizes in a 3:1 ratio of
 * bytes: the profile gives each its bytes within 10 %, and the live heap
 * within 10 % of bytes_in_use.  With a mean of 8 KiB between samples,
 * site b (16 MiB) has about 2000 samples: a standard error near 2 %.
 * The draws follow a fixed seed (SMALLOC_PROF_SEED), so the test gives
 * the same answer every run (over 12 runs with random draws the sites'
 * errors stayed within 3.5 %). */
START_TEST(estimates_per_call_site_are_within_ten_percent)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_RATE, RATE), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_SEED, 12345), 0);
  ck_assert_int_eq(smalloc_prof_start(), 0);
  size_t true_a, true_b;
  prof_sites_3_to_1(&true_a, &true_b);
  smalloc_prof_stop();   /* what the reading allocates is not the test's */
  smalloc_stats_t st;
  ck_assert_int_eq(sm_test_snap(&st), 0);
  prof_read_t r;
  prof_dump_read(&r, "prof_site_a", "prof_site_b");
  ck_assert_int_eq(r.rate, RATE);
  ck_assert_uint_gt(r.sites[1].live_count, 1000);
  prof_within("site a", r.sites[0].live_est, (double)true_a, 0.10);
  prof_within("site b", r.sites[1].live_est, (double)true_b, 0.10);
  prof_within("live heap", r.live_est, (double)st.bytes_in_use, 0.10);
  prof_free_all();
}
END_TEST

/* Every block sampled (a mean of 1 byte between samples), the two sites
 * called in turn from one loop, so that each takes its stacks from the
 * same frame address: the thread's remembered stack (prof.c) must not
 * give one site's samples to the other.  Exact counts. */
START_TEST(sites_called_in_turn_keep_their_own_samples)
{
  enum { N = 1000 };
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_RATE, 1), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_SEED, 7), 0);
  prof_site_a(64);   /* the unwinder's first run, before the counts */
  prof_free_all();
  smalloc_prof_reset();
  ck_assert_int_eq(smalloc_prof_start(), 0);
  for (int i = 0; i < N; i++) {
    prof_site_a(64);
    prof_site_b(64);
  }
  smalloc_prof_stop();
  prof_read_t r;
  prof_dump_read(&r, "prof_site_a", "prof_site_b");
  ck_assert_uint_eq(r.sites[0].alloc_count, N);
  ck_assert_uint_eq(r.sites[1].alloc_count, N);
  ck_assert_uint_eq(r.sites[0].live_count, N);
  ck_assert_uint_eq(r.sites[1].live_count, N);
  prof_free_all();
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_RATE, 524288), 0);
}
END_TEST

/* With a seed, the same allocations give the same samples: the sequence
 * run twice (the profile reset and the blocks freed in between) samples
 * exactly as many blocks at each site, of exactly the same bytes; with
 * another seed, other ones.  A first run loads the unwinder (its first
 * stack allocates, in this thread, which the next runs do not). */
static void prof_seeded_run(long seed, prof_read_t *r)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_SEED, seed), 0);
  smalloc_prof_reset();
  ck_assert_int_eq(smalloc_prof_start(), 0);
  size_t true_a, true_b;
  prof_sites_3_to_1(&true_a, &true_b);
  smalloc_prof_stop();
  prof_dump_read(r, "prof_site_a", "prof_site_b");
  prof_free_all();
}

START_TEST(a_seed_gives_the_same_samples)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_RATE, RATE), 0);
  prof_read_t r1, r2, r3;
  prof_seeded_run(1, &r1);
  prof_seeded_run(777, &r1);
  prof_seeded_run(777, &r2);
  prof_seeded_run(778, &r3);
  ck_assert_uint_gt(r1.sites[0].alloc_count, 1000);
  for (int i = 0; i < 2; i++) {
    ck_assert_uint_eq(r2.sites[i].alloc_count, r1.sites[i].alloc_count);
    ck_assert(r2.sites[i].live_est == r1.sites[i].live_est);
  }
  ck_assert(r3.sites[0].live_est != r1.sites[0].live_est ||
            r3.sites[0].alloc_count != r1.sites[0].alloc_count);
}
END_TEST

/* Freed blocks leave the live profile, small and large (those above the
 * size classes are all sampled at this rate); the allocation totals stay. */
START_TEST(freed_blocks_leave_the_live_profile)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_RATE, RATE), 0);
  ck_assert_int_eq(smalloc_prof_start(), 0);
  for (int i = 0; i < 20000; i++)
    prof_site_a(prof_size());
  for (int i = 0; i < 40; i++)
    prof_site_b(MiB + (size_t)i * 4096);
  smalloc_prof_stop();   /* what the reading allocates is not the test's */
  prof_read_t r;
  prof_dump_read(&r, "prof_site_a", "prof_site_b");
  ck_assert_uint_gt(r.sites[0].live_count, 500);
  ck_assert_uint_eq(r.sites[1].live_count, 40);
  uint64_t allocated = r.alloc_count;
  prof_free_all();
  prof_dump_read(&r, "prof_site_a", "prof_site_b");
  ck_assert_uint_eq(r.live_count, 0);
  ck_assert_uint_eq(r.live_bytes, 0);
  ck_assert_uint_eq(r.alloc_count, allocated);
  /* reset keeps what is live (nothing) and drops the totals */
  smalloc_prof_reset();
  prof_dump_read(&r, "prof_site_a", "prof_site_b");
  ck_assert_uint_eq(r.alloc_count, 0);
  ck_assert_int_eq(r.lines, 0);
}
END_TEST

/* Off (the default), nothing is sampled; stopped, nothing more. */
START_TEST(nothing_is_sampled_while_off)
{
  for (int i = 0; i < 20000; i++)
    prof_site_a(prof_size());
  prof_read_t r;
  prof_dump_read(&r, "prof_site_a", NULL);
  ck_assert_uint_eq(r.alloc_count, 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_RATE, RATE), 0);
  ck_assert_int_eq(smalloc_prof_start(), 0);
  for (int i = 0; i < 2000; i++)
    prof_site_a(prof_size());
  smalloc_prof_stop();
  prof_dump_read(&r, "prof_site_a", NULL);
  uint64_t sampled = r.alloc_count;
  ck_assert_uint_gt(sampled, 0);
  for (int i = 0; i < 20000; i++)
    prof_site_a(prof_size());
  prof_dump_read(&r, "prof_site_a", NULL);
  ck_assert_uint_eq(r.alloc_count, sampled);
  prof_free_all();
}
END_TEST

/* Sampled blocks freed by other threads leave the profile too: four
 * threads allocate, each frees its neighbour's blocks. */
enum { PT_THREADS = 4, PT_BLOCKS = 20000 };
static void *pt_blocks[PT_THREADS][PT_BLOCKS];
static pthread_barrier_t pt_allocated;

void *pt_worker(void *arg);
void *pt_worker(void *arg)
{
  int self = (int)(intptr_t)arg;
  uint64_t x = 0x1234 + (uint64_t)self;
  for (int i = 0; i < PT_BLOCKS; i++) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    pt_blocks[self][i] = smalloc_malloc(16 + (x >> 40) % 2000);
    ck_assert_ptr_nonnull(pt_blocks[self][i]);
  }
  pthread_barrier_wait(&pt_allocated);
  int other = (self + 1) % PT_THREADS;
  for (int i = 0; i < PT_BLOCKS; i++)
    smalloc_free(pt_blocks[other][i]);
  return NULL;
}

START_TEST(blocks_freed_by_other_threads_leave_the_profile)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_RATE, RATE), 0);
  ck_assert_int_eq(smalloc_prof_start(), 0);
  pthread_t t[PT_THREADS];
  pthread_barrier_init(&pt_allocated, NULL, PT_THREADS);
  for (int i = 0; i < PT_THREADS; i++)
    ck_assert_int_eq(pthread_create(&t[i], NULL, pt_worker, (void *)(intptr_t)i), 0);
  for (int i = 0; i < PT_THREADS; i++)
    pthread_join(t[i], NULL);
  pthread_barrier_destroy(&pt_allocated);
  smalloc_prof_stop();
  prof_read_t r;
  prof_dump_read(&r, "pt_worker", NULL);
  ck_assert_uint_gt(r.sites[0].alloc_count, (uint64_t)PT_THREADS * 500);
  ck_assert_uint_eq(r.sites[0].live_count, 0);
}
END_TEST

/* At a rate of 512 KiB or more, a sampled block of a size class (small
 * or medium: 1000 and 4000 bytes here) gets a 64 KiB unit of its own, and
 * the block taken for it goes back to its page, which is never flagged
 * for it: frees of the page's other blocks stay on the fast path.  Exact: the blocks whose
 * usable size is a unit are the samples, counted once each as a large
 * block, and all leave the profile when another thread frees them.  At
 * 8 KiB, where a unit would cost more than an eighth of the bytes a
 * sample stands for, samples stay in their pages. */
enum { MV_N = 32768 };   /* 1000 and 4000 bytes by turns: 80 MiB, about 32 + 128 samples at 512 KiB */
static void *mv_blocks[MV_N];

void *mv_free_all(void *arg);
void *mv_free_all(void *arg)
{
  (void)arg;
  for (int i = 0; i < MV_N; i++)
    smalloc_free(mv_blocks[i]);
  return NULL;
}

static void mv_run(long rate, size_t moved[2], uint64_t *large, uint64_t *live)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_RATE, rate), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_SEED, 99), 0);
  smalloc_prof_reset();
  ck_assert_int_eq(smalloc_prof_start(), 0);
  smalloc_stats_t a, b;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  for (int i = 0; i < MV_N; i++)
    if ((mv_blocks[i] = smalloc_malloc(i % 2 ? 4000 : 1000)) == NULL)
      abort();
  ck_assert_int_eq(sm_test_snap(&b), 0);
  smalloc_prof_stop();
  *large = b.large_allocs - a.large_allocs;
  moved[0] = moved[1] = 0;   /* small, medium */
  for (int i = 0; i < MV_N; i++)
    moved[i % 2] += smalloc_malloc_usable_size(mv_blocks[i]) >= 65536;
  prof_read_t r;
  prof_dump_read(&r, NULL, NULL);
  *live = r.live_count;
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, mv_free_all, NULL), 0);
  pthread_join(t, NULL);
  prof_dump_read(&r, NULL, NULL);
  ck_assert_uint_eq(r.live_count, 0);
}

START_TEST(samples_get_units_of_their_own_at_the_default_rate)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_RATE, 1), 0);
  prof_site_a(4000);   /* the unwinder's first run, before the counts */
  prof_free_all();
  size_t moved[2];
  uint64_t large, live;
  mv_run(524288, moved, &large, &live);
  if (!SM_TEST_SECURE) {   /* the secure build keeps samples in their pages */
    ck_assert_uint_gt(moved[0], 10);
    ck_assert_uint_gt(moved[1], 60);
    ck_assert_uint_eq(large, moved[0] + moved[1]);
    ck_assert_uint_eq(live, moved[0] + moved[1]);
  }
  mv_run(RATE, moved, &large, &live);
  ck_assert_uint_eq(moved[0] + moved[1], 0);
  ck_assert_uint_eq(large, 0);
  ck_assert_uint_gt(live, 1000);
}
END_TEST

/* A page's samples are found when they are freed, whether the page marks
 * each of them (up to four) or holds too many to mark, and whichever
 * thread frees them; frees of the page's other blocks leave them be. */
static void *ps_block;
void *ps_free_one(void *arg);
void *ps_free_one(void *arg)
{
  (void)arg;
  smalloc_free(ps_block);
  return NULL;
}

static uint64_t ps_live(void)
{
  prof_read_t r;
  prof_dump_read(&r, NULL, NULL);
  return r.live_count;
}

START_TEST(a_page_finds_its_samples_among_its_blocks)
{
  smalloc_prof_stop();   /* SMALLOC_PROF=1 may have left samples live: counted from here */
  const uint64_t base = ps_live();
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_RATE, 1), 0);   /* every allocation */
  for (int many = 0; many < 2; many++) {
    enum { OTHERS = 200 };
    int n = many ? 7 : 3;
    void *sampled[8], *others[OTHERS];
    ck_assert_int_eq(smalloc_prof_start(), 0);
    for (int i = 0; i < n; i++)
      ck_assert_ptr_nonnull(sampled[i] = smalloc_malloc(48));
    smalloc_prof_stop();   /* the rest are not samples, nor what reading allocates */
    ck_assert_uint_eq(ps_live(), base + (uint64_t)n);
    for (int i = 0; i < OTHERS; i++)
      ck_assert_ptr_nonnull(others[i] = smalloc_malloc(48));
    for (int i = 0; i < OTHERS; i++)
      smalloc_free(others[i]);
    ck_assert_uint_eq(ps_live(), base + (uint64_t)n);
    /* one freed by another thread */
    ps_block = sampled[1];
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, ps_free_one, NULL), 0);
    pthread_join(t, NULL);
    ck_assert_uint_eq(ps_live(), base + (uint64_t)n - 1);
    /* a new sample in the page, where the freed one was marked */
    ck_assert_int_eq(smalloc_prof_start(), 0);
    ck_assert_ptr_nonnull(sampled[1] = smalloc_malloc(48));
    smalloc_prof_stop();
    ck_assert_uint_eq(ps_live(), base + (uint64_t)n);
    for (int i = 0; i < n; i++) {
      smalloc_free(sampled[i]);
      ck_assert_uint_eq(ps_live(), base + (uint64_t)(n - 1 - i));
    }
  }
}
END_TEST

/* ---- the churn profile ---------------------------------------------------- */

/* Blocks of 40 size classes, 600 of each, then all freed: fresh pages
 * and segments, and OS calls */
__attribute__((noinline)) void churn_maker(void);
__attribute__((noinline)) void churn_maker(void)
{
  static void *v[40 * 600];
  for (int i = 0; i < 40 * 600; i++) {
    v[i] = smalloc_malloc(16 + (size_t)(i % 40) * 48);
    if (!v[i])
      abort();
  }
  for (int i = 0; i < 40 * 600; i++)
    smalloc_free(v[i]);
}

/* The same block over and over: the swap alone, after the first round */
__attribute__((noinline)) void steady_churner(void);
__attribute__((noinline)) void steady_churner(void)
{
  static void *v[100];
  for (int r = 0; r < 2000; r++) {
    for (int i = 0; i < 100; i++)
      if (!(v[i] = smalloc_malloc(48)))
        abort();
    for (int i = 0; i < 100; i++)
      smalloc_free(v[i]);
  }
}

/* The lines of the churn profile that name fn, and their events by kind,
 * summed: the count of lines is the result.  In a line that names fn, fn
 * is the innermost frame: it calls smalloc, and the library's own frames
 * (however many the event is deep in it) are left out. */
static int churn_read(const char *path, const char *fn, uint64_t *counts, const char *const *kinds)
{
  char churn[300];
  snprintf(churn, sizeof churn, "%s.churn", path);
  FILE *f = fopen(churn, "r");
  ck_assert_msg(f != NULL, "%s: %s", churn, strerror(errno));
  static char line[8192];
  int lines = 0;
  while (fgets(line, sizeof line, f)) {
    lines++;
    char *sp = strrchr(line, ' ');
    ck_assert_ptr_nonnull(sp);
    *sp = '\0';
    char *leaf = strrchr(line, ';');
    ck_assert_ptr_nonnull(leaf);
    if (fn && !strstr(line, fn))
      continue;
    *leaf = '\0';
    char *inner = strrchr(line, ';');
    inner = inner ? inner + 1 : line;
    ck_assert_msg(!fn || strcmp(inner, fn) == 0, "%s: innermost frame %s, not %s", leaf + 1, inner, fn);
    for (int k = 0; kinds[k]; k++)
      if (strcmp(leaf + 1, kinds[k]) == 0)
        counts[k] += strtoull(sp + 1, NULL, 10);
  }
  fclose(f);
  unlink(churn);
  return lines;
}

/* churn_maker under the profiler the caller started, which is stopped
 * after it: the counters before and after, the profile written to path
 * (a mkstemp template; the caller unlinks it) and its events of the given
 * kinds in lines that name churn_maker, of which there are some. */
static void churn_maker_profiled(char *path, smalloc_stats_t *s0, smalloc_stats_t *s1, uint64_t *counts,
                                 const char *const *kinds)
{
  ck_assert_int_eq(sm_test_snap(s0), 0);
  churn_maker();
  ck_assert_int_eq(sm_test_snap(s1), 0);
  smalloc_prof_stop();
  int fd = mkstemp(path);
  ck_assert_int_ge(fd, 0);
  close(fd);
  ck_assert_int_eq(smalloc_prof_dump(path), 0);
  ck_assert_int_gt(churn_read(path, "churn_maker", counts, kinds), 0);
}

/* The churn profile names the function that made smalloc take fresh pages
 * and map memory; under steady churn (the swap only) it is empty. */
START_TEST(churn_profile_names_the_cause_and_is_empty_under_steady_churn)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_RATE, RATE), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_EVENT_RATE, 1), 0);
  ck_assert_int_eq(smalloc_prof_start(), 0);
  for (int i = 0; i < 200; i++)
    prof_site_a(prof_size());   /* the first samples load the unwinder */
  prof_free_all();
  smalloc_stats_t s0, s1;
  char path[] = "/tmp/smalloc-churn.XXXXXX";
  static const char *const kinds[] = {"fresh_page", "new_segment", "os_mmap", "extend", NULL};
  uint64_t c[16] = {0};
  churn_maker_profiled(path, &s0, &s1, c, kinds);
  /* every event taken (rate 1) and attributed to churn_maker */
  ck_assert_uint_eq(c[0], s1.slow_steps[SMALLOC_STEP_FRESH_PAGE] - s0.slow_steps[SMALLOC_STEP_FRESH_PAGE]);
  ck_assert_uint_eq(c[1], s1.slow_steps[SMALLOC_STEP_NEW_SEGMENT] - s0.slow_steps[SMALLOC_STEP_NEW_SEGMENT]);
  ck_assert_uint_eq(c[2], s1.os_mmap - s0.os_mmap);
  ck_assert_uint_gt(c[0], 30);
  ck_assert_uint_gt(c[2], 0);

  smalloc_prof_reset();
  ck_assert_int_eq(smalloc_prof_start(), 0);
  steady_churner();   /* its first round takes pages; the profile starts after it */
  smalloc_prof_reset();
  steady_churner();
  smalloc_prof_stop();
  ck_assert_int_eq(smalloc_prof_dump(path), 0);
  memset(c, 0, sizeof c);
  ck_assert_int_eq(churn_read(path, NULL, c, kinds), 0);
  unlink(path);
}
END_TEST

/* Profiling is ready when it starts: the slow work it causes is counted
 * from smalloc_prof_start on, before any block was sampled (a rate of
 * 1 GiB: churn_maker's 24 MB make a sample unlikely, and one would only
 * come after events it must not have lost). */
START_TEST(churn_is_counted_from_the_start_before_any_sample)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_RATE, 1L << 30), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PROF_EVENT_RATE, 1), 0);
  ck_assert_int_eq(smalloc_prof_start(), 0);
  smalloc_stats_t s0, s1;
  char path[] = "/tmp/smalloc-churn.XXXXXX";
  static const char *const kinds[] = {"fresh_page", "new_segment", "os_mmap", NULL};
  uint64_t c[16] = {0};
  churn_maker_profiled(path, &s0, &s1, c, kinds);
  ck_assert_uint_eq(c[0], s1.slow_steps[SMALLOC_STEP_FRESH_PAGE] - s0.slow_steps[SMALLOC_STEP_FRESH_PAGE]);
  ck_assert_uint_eq(c[1], s1.slow_steps[SMALLOC_STEP_NEW_SEGMENT] - s0.slow_steps[SMALLOC_STEP_NEW_SEGMENT]);
  ck_assert_uint_gt(c[0], 30);
  /* the process's mappings meanwhile: churn_maker's, and on a loaded
   * machine (3 runs in 80) one more that no line of the profile names */
  ck_assert_uint_gt(c[2], 0);
  ck_assert_uint_le(c[2], s1.os_mmap - s0.os_mmap);
  unlink(path);
}
END_TEST

/* ---- the leak report ------------------------------------------------------- */

/* 2 MiB in 4 KiB blocks, never freed */
__attribute__((noinline)) void leaky_function(void);
__attribute__((noinline)) void leaky_function(void)
{
  for (int i = 0; i < 512; i++)
    if (!smalloc_malloc(4096))
      abort();
}

/* test_prof --leak: leaks from leaky_function, frees everything else. */
static int leak_main(void)
{
  for (int i = 0; i < 5000; i++)
    prof_site_a(prof_size());
  leaky_function();
  prof_free_all();
  for (int i = 0; i < 100; i++)
    prof_site_b(prof_size());   /* a smaller leak */
  return 0;
}

/* SMALLOC_PROF_LEAKS=1: at exit, the report's first stack is the function
 * that leaked most, with about the bytes it leaked; SMALLOC_STATS=1 ends
 * its table with the same call site first. */
START_TEST(the_leak_report_names_the_leaking_function_first)
{
  int fds[2];
  ck_assert_int_eq(pipe(fds), 0);
  const char *argv[] = {"test_prof", "--leak", NULL};
  const char *add[] = {"SMALLOC_PROF_LEAKS=1", "SMALLOC_PROF_RATE=8192", "SMALLOC_BACKGROUND=0", "SMALLOC_STATS=1",
                       NULL};
  pid_t pid = sm_test_rerun_start(argv, add, -1, fds[1]);
  close(fds[1]);
  static char out[1 << 17];
  size_t len = 0;
  ssize_t r;
  while (len < sizeof out - 1 && (r = read(fds[0], out + len, sizeof out - 1 - len)) > 0)
    len += (size_t)r;
  out[len] = '\0';
  close(fds[0]);
  int status = sm_test_rerun_wait(pid);
  ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d:\n%s", status, out);
  const char *top = strstr(out, "  heap profile: the call sites with the most live bytes");
  ck_assert_msg(top != NULL, "the stats table has no heap profile part:\n%s", out);
  char first_site[512];
  const char *next = strchr(top, '\n');
  ck_assert_ptr_nonnull(next);
  size_t n = strcspn(next + 1, "\n");
  snprintf(first_site, sizeof first_site, "%.*s", (int)n, next + 1);
  ck_assert_msg(strstr(first_site, " B  leaky_function < ") != NULL,
                "the stats table's first call site is not leaky_function: %s", first_site);
  char *head = strstr(out, "smalloc: leak report: ");
  ck_assert_msg(head != NULL, "no leak report:\n%s", out);
  char *first = strstr(head, "\nsmalloc:   about ");
  ck_assert_msg(first != NULL, "the report lists no stack:\n%s", out);
  char *eol = strchr(first + 1, '\n');
  ck_assert_ptr_nonnull(eol);
  *eol = '\0';
  ck_assert_msg(strstr(first, "allocated at leaky_function") != NULL, "first entry:%s", first);
  double bytes = strtod(first + strlen("\nsmalloc:   about "), NULL);
  prof_within("leaked by leaky_function", bytes, 2.0 * MiB, 0.25);   /* ~256 samples */
}
END_TEST

/* SMALLOC_PROF_DUMP: the profiles at exit go to its path, "%p" the
 * process id, the churn profile beside it; with SMALLOC_PROF=1, and with
 * a program that starts profiling itself. */
static int exit_profile_main(bool start)
{
  if (start && smalloc_prof_start() != 0)
    return 2;
  for (int i = 0; i < 4000; i++)
    prof_site_a(prof_size());
  return 0;   /* the blocks stay live: the profile at exit shows them */
}

static void pd_run(const char *mode, bool env_on, const char *dir, pid_t *child)
{
  static char dump[512];
  snprintf(dump, sizeof dump, "SMALLOC_PROF_DUMP=%s/p.%%p.heap", dir);
  const char *argv[] = {"test_prof", mode, NULL};
  const char *add[] = {dump, "SMALLOC_PROF_RATE=8192", "SMALLOC_BACKGROUND=0", env_on ? "SMALLOC_PROF=1" : NULL, NULL};
  *child = sm_test_rerun(argv, add, -1, -1);
}

/* The live samples of the profile at path, from its first line. */
static long pd_live_samples(const char *path)
{
  FILE *f = fopen(path, "r");
  ck_assert_msg(f != NULL, "no profile at %s", path);
  unsigned long long lc, lb, ac, ab, rate;
  int got = fscanf(f, "heap profile: %llu: %llu [%llu: %llu] @ heap_v2/%llu", &lc, &lb, &ac, &ab, &rate);
  fclose(f);
  ck_assert_int_eq(got, 5);
  ck_assert_uint_eq(rate, 8192);
  return (long)lc;
}

START_TEST(profiles_at_exit_go_where_smalloc_prof_dump_says)
{
  char dir[] = "/tmp/smalloc-prof-dump.XXXXXX";
  ck_assert_ptr_nonnull(mkdtemp(dir));
  const char *modes[] = {"--exit-profile", "--exit-profile-started"};
  for (int m = 0; m < 2; m++) {
    pid_t pid;
    pd_run(modes[m], m == 0, dir, &pid);
    char path[600], churn[620];
    snprintf(path, sizeof path, "%s/p.%ld.heap", dir, (long)pid);
    snprintf(churn, sizeof churn, "%s.churn", path);
    /* 4000 blocks of 32-1024 bytes live at exit: about 250 samples */
    ck_assert_int_gt(pd_live_samples(path), 100);
    ck_assert_int_eq(access(churn, R_OK), 0);
    unlink(path);
    unlink(churn);
  }
  /* neither SMALLOC_PROF nor a start: nothing written */
  pid_t pid;
  pd_run("--exit-profile-off", false, dir, &pid);
  char path[600];
  snprintf(path, sizeof path, "%s/p.%ld.heap", dir, (long)pid);
  ck_assert_int_ne(access(path, F_OK), 0);
  ck_assert_int_eq(rmdir(dir), 0);
}
END_TEST

static Suite *prof_suite(void)
{
  Suite *s = suite_create("prof");
  TCase *tc = sm_tcase("prof", 300);
  tcase_add_test(tc, estimates_per_call_site_are_within_ten_percent);
  tcase_add_test(tc, sites_called_in_turn_keep_their_own_samples);
  tcase_add_test(tc, a_seed_gives_the_same_samples);
  tcase_add_test(tc, freed_blocks_leave_the_live_profile);
  tcase_add_test(tc, nothing_is_sampled_while_off);
  tcase_add_test(tc, blocks_freed_by_other_threads_leave_the_profile);
  tcase_add_test(tc, a_page_finds_its_samples_among_its_blocks);
  tcase_add_test(tc, samples_get_units_of_their_own_at_the_default_rate);
  tcase_add_test(tc, churn_profile_names_the_cause_and_is_empty_under_steady_churn);
  tcase_add_test(tc, churn_is_counted_from_the_start_before_any_sample);
  tcase_add_test(tc, the_leak_report_names_the_leaking_function_first);
  tcase_add_test(tc, profiles_at_exit_go_where_smalloc_prof_dump_says);
  suite_add_tcase(s, tc);
  return s;
}

/* test_prof --dump FILE: a profile of prof_site_a and prof_site_b (3:1)
 * for tests/prof-pprof.sh to read with google-pprof. */
int main(int argc, char **argv)
{
  if (argc == 3 && strcmp(argv[1], "--dump") == 0) {
    if (smalloc_option_set(SMALLOC_OPTION_PROF_RATE, RATE) != 0 || smalloc_prof_start() != 0)
      return 2;
    for (size_t b = 0; b < 4 * MiB;) {
      for (int k = 0; k < 3; k++)
        prof_site_a(prof_size());
      b += prof_site_b(prof_size());
    }
    smalloc_prof_stop();
    return smalloc_prof_dump(argv[2]) == 0 ? 0 : 1;
  }
  if (argc == 2 && strcmp(argv[1], "--leak") == 0)
    return leak_main();
  if (argc == 2 && strcmp(argv[1], "--exit-profile") == 0)
    return exit_profile_main(false);
  if (argc == 2 && strcmp(argv[1], "--exit-profile-started") == 0)
    return exit_profile_main(true);
  if (argc == 2 && strcmp(argv[1], "--exit-profile-off") == 0)
    return exit_profile_main(false);
  return sm_run_suite(prof_suite());
}
