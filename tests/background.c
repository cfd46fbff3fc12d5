/* Memory goes back while the program is idle: with SMALLOC_BACKGROUND on,
 * a purge thread releases the retired pages of heaps that stopped calling
 * in and purges cached segments and kept huge mappings, while the test
 * only sleeps (no smalloc call in the polling loop: RSS is read with
 * open/read).  The polls have generous bounds: they prove the behaviour,
 * they do not time it.  The thread parks when nothing is left to purge,
 * is never started with the option off, and survives fork. */
#include "common.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

/* How long a test waits for the purge thread: under a sanitizer on a
 * busy machine (CI runs two suites at once) it was still at work after
 * 20 s, a few dozen pages short of the last. */
enum { BG_DELAY_MS = 100, BG_POLL_MS = 20, BG_POLL_MAX_MS = SM_TEST_SANITIZED ? 120000 : 20000 };
/* retired pages (of all threads) that start the purge thread (smalloc(7)) */
#define BG_WAKE_BYTES ((uint64_t)8 << 20)

static void bg_sleep_ms(long ms)
{
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0) {
  }
}

static long bg_ms(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Threads of this process, without allocating (getdents on /proc/self/task
 * through a fixed buffer would do; the count is in /proc/self/status). */
static int bg_threads(void)
{
  char buf[4096];
  int fd = open("/proc/self/status", O_RDONLY);
  if (fd < 0)
    return -1;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0)
    return -1;
  buf[n] = '\0';
  const char *t = strstr(buf, "\nThreads:");
  return t ? atoi(t + 9) : -1;
}

static void bg_on(void)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, BG_DELAY_MS), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 1), 0);
}

/* Poll until the resident size is at most `limit`; returns it. */
static size_t bg_wait_rss(size_t limit)
{
  size_t rss = sm_test_rss();
  for (long waited = 0; rss > limit && waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
    bg_sleep_ms(BG_POLL_MS);
    rss = sm_test_rss();
  }
  return rss;
}

enum { BG_BLOCKS = 1 << 20, BG_SIZE = 64 };   /* 64 MiB of small blocks */

/* The burst: BG_BLOCKS blocks of BG_SIZE, written, in an array of their
 * own mapped outside smalloc (it counts in the resident size before and
 * after alike); *rss0 is the resident size just before, after a trim. */
static void **bg_burst(size_t *rss0)
{
  void **v = mmap(NULL, BG_BLOCKS * sizeof *v, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ck_assert(v != MAP_FAILED);
  memset(v, 0, BG_BLOCKS * sizeof *v);
  smalloc_malloc_trim(0);
  *rss0 = sm_test_rss();
  for (size_t i = 0; i < BG_BLOCKS; i++) {
    v[i] = smalloc_malloc(BG_SIZE);
    ck_assert_ptr_nonnull(v[i]);
    memset(v[i], 7, BG_SIZE);
  }
  return v;
}


START_TEST(idle_small_blocks_go_back_without_a_call)
{
  bg_on();
  size_t rss0;
  void **v = bg_burst(&rss0);
  /* before the frees: on a loaded machine they last long enough for the
   * purge thread to give memory back while they go on */
  size_t rss1 = sm_test_rss();
  smalloc_stats_t a, b, c;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  long t0 = bg_ms();
  for (size_t i = 0; i < BG_BLOCKS; i++)
    smalloc_free(v[i]);
  /* frees that lasted a purge delay (a sanitizer, a loaded machine) let
   * the purge thread work before the last of them */
  bool long_frees = SM_TEST_SANITIZED || bg_ms() - t0 >= BG_DELAY_MS;
  ck_assert_int_eq(sm_test_snap(&b), 0);
  /* idle from here on: nothing but sleeping and reading /proc */
  size_t rss2 = bg_wait_rss(SM_TEST_SANITIZED ? SIZE_MAX : rss0 + 10 * MiB);
  uint64_t retired = b.pages_retired - a.pages_retired;
  /* the resident size falls while the purge thread works; its counts
   * come with it.  A slow build (a sanitizer, a loaded machine) frees
   * for long enough that the thread releases pages before the last free,
   * this thread's own slow path releases some, and the segments they
   * leave empty may be purged before the last free.  It may even find
   * every retired page released while this thread is held up, and park:
   * the pages retired after that wait for this thread's next call, or
   * for the purge thread to wake, which takes 8 MiB of them
   * (smalloc(7)).  Fewer are left; none in a quick run. */
  uint64_t wake_pages = BG_WAKE_BYTES / SM_TEST_SMALL_PAGE;
  uint64_t may_stay = long_frees ? wake_pages - 1 : 0;
  for (long waited = 0; waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
    ck_assert_int_eq(sm_test_snap(&c), 0);
    if (c.pages_released - a.pages_released + may_stay >= retired &&
        c.segments_purged + c.segments_unmapped >= a.segments_purged + a.segments_unmapped + 14)
      break;
    bg_sleep_ms(BG_POLL_MS);
  }
  ck_assert_msg(rss1 > rss0 + 48 * MiB, "resident %zu MiB before, %zu MiB after the burst",
                rss0 / MiB, rss1 / MiB);
  /* the sanitizers' shadow of the blocks stays resident: the counters
   * below show the return there */
  ck_assert_msg(SM_TEST_SANITIZED || rss2 <= rss0 + 10 * MiB,
                "resident %zu MiB after %d ms idle; %zu MiB before the burst", rss2 / MiB,
                BG_POLL_MAX_MS, rss0 / MiB);
  ck_assert_uint_ge(retired, BG_BLOCKS * BG_SIZE / SM_TEST_SMALL_PAGE - 1);
  ck_assert_msg(c.pages_released - a.pages_released <= retired &&
                    c.pages_released - a.pages_released + may_stay >= retired,
                "%llu of the %llu retired pages released",
                (unsigned long long)(c.pages_released - a.pages_released),
                (unsigned long long)retired);
  /* most of them claimed by the purge thread once this thread went
   * idle; a slow build may have had them all released as they aged,
   * while this thread was still freeing (the purge thread's work under
   * a sanitizer is shown by the other tests here) */
  ck_assert_msg(long_frees || 2 * (c.pages_claimed - a.pages_claimed) > retired,
                "the purge thread claimed %llu of the %llu retired pages",
                (unsigned long long)(c.pages_claimed - a.pages_claimed),
                (unsigned long long)retired);
  /* a purge thread runs (started by the frees; under ThreadSanitizer,
   * whose runtime thread makes the process a threaded one, by the first
   * malloc of the burst) */
  ck_assert_uint_ge(c.background_threads, 1);
  ck_assert_uint_ge(c.segments_purged + c.segments_unmapped,
                    a.segments_purged + a.segments_unmapped + 14);
  munmap(v, BG_BLOCKS * sizeof *v);
}
END_TEST

/* Blocks that one thread allocated and another freed, while the first
 * stays alive and idle: its exhausted pages sit on its full list with
 * every block freed, and neither thread calls in again.  The frees start
 * the purge thread, which claims those pages once their thread has been
 * idle for the purge delay: all of them, and the resident size falls.  (The
 * frees go in allocation order, a page at a time, in batches of 64: each
 * page's last batch fills and goes out with its last block, so no block
 * waits in this thread's batches: in the default layout, where a page
 * holds a multiple of 64 of these blocks.) */
typedef struct bg_w {
  sm_test_phase_t ph;   /* 1 filled, 2 exit */
  void **v;
  size_t rss0;
  smalloc_stats_t s0, s1;
} bg_w_t;

static bg_w_t bg_w = {SM_TEST_PHASE_INIT, NULL, 0, {0}, {0}};

static void *bg_w_filler(void *arg)
{
  (void)arg;
  sm_test_snap(&bg_w.s0);
  bg_w.v = bg_burst(&bg_w.rss0);
  sm_test_snap(&bg_w.s1);
  sm_test_phase_set(&bg_w.ph, 1);
  sm_test_phase_wait(&bg_w.ph, 2);   /* alive and idle */
  return NULL;
}

START_TEST(blocks_freed_for_an_idle_thread_go_back_without_a_call)
{
  bg_on();
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, bg_w_filler, NULL), 0);
  sm_test_phase_wait(&bg_w.ph, 1);
  /* before the frees, which may last long enough on a loaded machine for
   * the purge thread to claim pages while they go on */
  size_t rss1 = sm_test_rss();
  smalloc_stats_t a, c;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  for (size_t i = 0; i < BG_BLOCKS; i++)
    smalloc_free(bg_w.v[i]);
  /* idle from here on */
  size_t rss2 = bg_wait_rss(SM_TEST_SANITIZED ? SIZE_MAX : bg_w.rss0 + 10 * MiB);
  uint64_t full = bg_w.s1.pages_full - bg_w.s0.pages_full;
  /* In the secure layout the first page of each segment holds a number
   * of blocks that is not a multiple of 64: its last batch waits in this
   * thread's slots, and the page with it */
  uint64_t waiting = SM_TEST_SECURE ? full / 64 + 1 : 0;
  for (long waited = 0; waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
    ck_assert_int_eq(sm_test_snap(&c), 0);
    if (c.pages_claimed - a.pages_claimed + waiting >= full)
      break;
    bg_sleep_ms(BG_POLL_MS);
  }
  sm_test_phase_set(&bg_w.ph, 2);
  pthread_join(t, NULL);
  ck_assert_msg(rss1 > bg_w.rss0 + 48 * MiB, "resident %zu MiB before, %zu MiB after the burst",
                bg_w.rss0 / MiB, rss1 / MiB);
  ck_assert_msg(SM_TEST_SANITIZED || rss2 <= bg_w.rss0 + 10 * MiB,
                "resident %zu MiB after %d ms idle; %zu MiB before the burst", rss2 / MiB,
                BG_POLL_MAX_MS, bg_w.rss0 / MiB);
  ck_assert_uint_ge(full, BG_BLOCKS * BG_SIZE / SM_TEST_SMALL_PAGE - 1);
  /* (this thread's heap is idle too: pages of it that other threads
   * freed, such as what the C library allocated for the worker, may be
   * claimed with them) */
  ck_assert_msg(c.pages_claimed - a.pages_claimed + waiting >= full,
                "the purge thread claimed %llu of the idle thread's %llu full pages",
                (unsigned long long)(c.pages_claimed - a.pages_claimed), (unsigned long long)full);
  /* by the purge thread started when the worker first allocated, parked
   * in between: no other was started */
  ck_assert_uint_ge(c.background_threads, 1);
  ck_assert_uint_eq(c.background_threads - a.background_threads, 0);
  munmap(bg_w.v, BG_BLOCKS * sizeof *bg_w.v);
}
END_TEST

/* Many threads that each retire less than BG_WAKE_BYTES and go idle:
 * what counts for the purge thread is every heap's retired pages
 * together.  Before, 100 threads that each freed 1 MiB of small blocks
 * and waited kept 120 MiB resident for good, no purge thread started. */
enum { BG_IT_THREADS = 16, BG_IT_BLOCKS = (1 << 20) / BG_SIZE };   /* 1 MiB a thread */
_Static_assert((uint64_t)BG_IT_BLOCKS * BG_SIZE < BG_WAKE_BYTES, "one thread alone does not wake it");
_Static_assert((uint64_t)BG_IT_THREADS * BG_IT_BLOCKS * BG_SIZE >= 2 * BG_WAKE_BYTES, "all of them do");
static sm_test_phase_t bg_it_ph = SM_TEST_PHASE_INIT;
static _Atomic int bg_it_idle, bg_it_failed;

/* No ck_assert in the loops: libcheck's bookkeeping of each assertion
 * allocates, and in the secure build, which reuses a freed block only
 * once its page's list runs dry, that retired and reused pages as the
 * thread went */
static void *bg_it_worker(void *arg)
{
  (void)arg;
  void **v = mmap(NULL, BG_IT_BLOCKS * sizeof *v, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (v == MAP_FAILED) {
    atomic_store(&bg_it_failed, 1);
    atomic_fetch_add(&bg_it_idle, 1);
    return NULL;
  }
  for (size_t i = 0; i < BG_IT_BLOCKS; i++) {
    v[i] = smalloc_malloc(BG_SIZE);
    if (v[i] == NULL) {
      atomic_store(&bg_it_failed, 1);
      break;
    }
    memset(v[i], 7, BG_SIZE);
  }
  for (size_t i = 0; i < BG_IT_BLOCKS; i++)
    smalloc_free(v[i]);
  munmap(v, BG_IT_BLOCKS * sizeof *v);
  atomic_fetch_add(&bg_it_idle, 1);
  sm_test_phase_wait(&bg_it_ph, 1);   /* alive and idle */
  return NULL;
}

START_TEST(many_idle_threads_small_bursts_go_back_without_a_call)
{
  bg_on();
  smalloc_stats_t a, b, c;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  pthread_t t[BG_IT_THREADS];
  for (int i = 0; i < BG_IT_THREADS; i++)
    ck_assert_int_eq(pthread_create(&t[i], NULL, bg_it_worker, NULL), 0);
  while (atomic_load(&bg_it_idle) < BG_IT_THREADS)
    bg_sleep_ms(1);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  uint64_t retired = b.pages_retired - a.pages_retired;
  for (long waited = 0; waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
    ck_assert_int_eq(sm_test_snap(&c), 0);
    if (c.pages_released - a.pages_released >= retired)
      break;
    bg_sleep_ms(BG_POLL_MS);
  }
  sm_test_phase_set(&bg_it_ph, 1);
  for (int i = 0; i < BG_IT_THREADS; i++)
    pthread_join(t[i], NULL);
  ck_assert_int_eq(atomic_load(&bg_it_failed), 0);
  ck_assert_uint_eq(b.pages_reused, a.pages_reused);
  /* each thread retired all but its current page's worth */
  ck_assert_uint_ge(retired, BG_IT_THREADS * (BG_IT_BLOCKS * BG_SIZE / SM_TEST_SMALL_PAGE - 1));
  /* (other pages may go back with them: a page of this thread's) */
  ck_assert_msg(c.pages_released - a.pages_released >= retired,
                "%llu of the %llu retired pages released after %d ms idle",
                (unsigned long long)(c.pages_released - a.pages_released), (unsigned long long)retired,
                BG_POLL_MAX_MS);
  ck_assert_uint_ge(c.background_threads - a.background_threads, 1);
}
END_TEST

/* The same blocks freed by two threads in turn, the second only once the
 * purge thread has looked at the first one's frees, found no page free
 * (each still holds every other block) and exited: the second thread's
 * frees bring it back, and it claims every page.  (Each freeing thread
 * exits, which sends its last batches.) */
static void *bg_free_every_other(void *arg)
{
  for (size_t i = (size_t)(uintptr_t)arg; i < BG_BLOCKS; i += 2)
    smalloc_free(bg_w.v[i]);
  return NULL;
}

static void bg_free_by_a_thread(size_t first)
{
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, bg_free_every_other, (void *)(uintptr_t)first), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
}

START_TEST(blocks_freed_slowly_for_an_idle_thread_go_back_without_a_call)
{
  bg_on();
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, bg_w_filler, NULL), 0);
  sm_test_phase_wait(&bg_w.ph, 1);
  int before = bg_threads();
  smalloc_stats_t a, b, c;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  bg_free_by_a_thread(0);
  /* the purge thread looks, claims nothing and parks */
  bg_sleep_ms(10 * BG_DELAY_MS);
  int between = bg_threads();
  /* (ThreadSanitizer keeps threads of its own that come and go) */
  for (long waited = 0; !SM_TEST_TSAN && between > before && waited < BG_POLL_MAX_MS;
       waited += BG_POLL_MS) {
    bg_sleep_ms(BG_POLL_MS);
    between = bg_threads();
  }
  ck_assert_int_eq(sm_test_snap(&b), 0);
  bg_free_by_a_thread(1);
  uint64_t full = bg_w.s1.pages_full - bg_w.s0.pages_full;
  for (long waited = 0; waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
    ck_assert_int_eq(sm_test_snap(&c), 0);
    if (c.pages_claimed - a.pages_claimed >= full)
      break;
    bg_sleep_ms(BG_POLL_MS);
  }
  sm_test_phase_set(&bg_w.ph, 2);
  pthread_join(t, NULL);
  ck_assert_uint_ge(full, BG_BLOCKS * BG_SIZE / SM_TEST_SMALL_PAGE - 1);
  /* ThreadSanitizer keeps threads of its own that come and go */
  ck_assert_msg(SM_TEST_TSAN || between == before,
                "%d threads after the first half of the frees, %d before", between, before);
  ck_assert_msg(b.pages_claimed - a.pages_claimed < full / 64,
                "the purge thread claimed %llu pages with every other block in use",
                (unsigned long long)(b.pages_claimed - a.pages_claimed));
  ck_assert_msg(c.pages_claimed - a.pages_claimed >= full,
                "the purge thread claimed %llu of the idle thread's %llu full pages",
                (unsigned long long)(c.pages_claimed - a.pages_claimed), (unsigned long long)full);
  /* by the purge thread started when the worker first allocated, parked
   * in between: no other was started */
  ck_assert_uint_ge(c.background_threads, 1);
  ck_assert_uint_eq(c.background_threads - a.background_threads, 0);
  munmap(bg_w.v, BG_BLOCKS * sizeof *bg_w.v);
}
END_TEST

START_TEST(idle_huge_block_goes_back_without_a_call)
{
  enum { N = 64 * 1024 * 1024 };
  if (SM_TEST_SECURE)
    return;   /* the secure build keeps no huge mapping */
  bg_on();
  smalloc_malloc_trim(0);
  size_t rss0 = sm_test_rss();
  unsigned char *p = smalloc_malloc(N);
  ck_assert_ptr_nonnull(p);
  memset(p, 3, N);
  smalloc_stats_t a, b;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  smalloc_free(p);   /* kept for the next huge request */
  size_t rss2 = bg_wait_rss(SM_TEST_SANITIZED ? SIZE_MAX : rss0 + 10 * MiB);
  /* the resident size falls while madvise runs; its count comes after */
  for (long waited = 0; waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
    ck_assert_int_eq(sm_test_snap(&b), 0);
    if (b.bytes_purged - a.bytes_purged >= N)
      break;
    bg_sleep_ms(BG_POLL_MS);
  }
  ck_assert_uint_eq(b.huge_cached - a.huge_cached, 1);
  ck_assert_msg(SM_TEST_SANITIZED || rss2 <= rss0 + 10 * MiB,
                "resident %zu MiB after %d ms idle; %zu MiB before", rss2 / MiB, BG_POLL_MAX_MS,
                rss0 / MiB);
  ck_assert_uint_ge(b.bytes_purged - a.bytes_purged, N);
  ck_assert_uint_eq(b.bytes_mapped, a.bytes_mapped);   /* kept, purged, not unmapped */
}
END_TEST

/* 48 blocks of 1 MiB (three to a shared segment, span.c), all freed but
 * one: the segments left without blocks are unmapped and the free units
 * of the last one purged, while the test sleeps. */
START_TEST(idle_large_blocks_go_back_without_a_call)
{
  enum { N = 48, SIZE = 1 << 20 };
  bg_on();
  smalloc_malloc_trim(0);
  size_t rss0 = sm_test_rss();
  unsigned char *v[N];
  for (int i = 0; i < N; i++) {
    v[i] = smalloc_malloc(SIZE);
    ck_assert_ptr_nonnull(v[i]);
    memset(v[i], 5, SIZE);
  }
  smalloc_stats_t a, b;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  for (int i = 1; i < N; i++)
    smalloc_free(v[i]);
  size_t limit = rss0 + SIZE + 10 * MiB;
  size_t rss2 = bg_wait_rss(SM_TEST_SANITIZED ? SIZE_MAX : limit);
  ck_assert_msg(SM_TEST_SANITIZED || rss2 <= limit, "resident %zu MiB after %d ms idle; %zu MiB before",
                rss2 / MiB, BG_POLL_MAX_MS, rss0 / MiB);
  if (!SM_TEST_SECURE) {
    /* the counts come after the resident size falls */
    for (long waited = 0; waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
      ck_assert_int_eq(sm_test_snap(&b), 0);
      if (b.segments_unmapped - a.segments_unmapped >= N / 3 - 1 && b.bytes_purged > a.bytes_purged)
        break;
      bg_sleep_ms(BG_POLL_MS);
    }
    ck_assert_uint_ge(b.segments_unmapped - a.segments_unmapped, N / 3 - 1);
    ck_assert_uint_ge(b.bytes_purged - a.bytes_purged, 2 * SIZE);
  }
  ck_assert_uint_eq(v[0][SIZE - 1], 5);
  smalloc_free(v[0]);
}
END_TEST

/* Something for the purge thread: 16 MiB of 1 KiB blocks, freed (their
 * pages retire: more than the 8 MiB that start it). */
static void bg_give_something_back(void)
{
  enum { N = 16384 };
  static void *v[N];
  for (int i = 0; i < N; i++) {
    v[i] = smalloc_malloc(SM_TEST_REQUEST_FOR(1024));
    ck_assert_ptr_nonnull(v[i]);
  }
  for (int i = 0; i < N; i++)
    smalloc_free(v[i]);
}

/* The purge thread's id (its name is smalloc-purge), or 0. */
static int bg_purge_tid(void)
{
  DIR *d = opendir("/proc/self/task");
  if (!d)
    return 0;
  int tid = 0;
  for (struct dirent *e; tid == 0 && (e = readdir(d)) != NULL;) {
    if (e->d_name[0] == '.')
      continue;
    char path[300], comm[32] = "";
    snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
      continue;
    ssize_t n = read(fd, comm, sizeof comm - 1);
    close(fd);
    if (n > 0 && strncmp(comm, "smalloc-purge\n", 14) == 0)
      tid = atoi(e->d_name);
  }
  closedir(d);
  return tid;
}

/* The purge thread's id, once it has named itself (it may not have run
 * yet when pthread_create returns); 0 if it does not within the bound. */
static int bg_wait_purge_tid(void)
{
  int tid = bg_purge_tid();
  for (long waited = 0; tid == 0 && waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
    bg_sleep_ms(BG_POLL_MS);
    tid = bg_purge_tid();
  }
  return tid;
}

/* How often the thread has gone to sleep (voluntary context switches). */
static long bg_switches(int tid)
{
  char path[64], buf[4096];
  snprintf(path, sizeof path, "/proc/self/task/%d/status", tid);
  int fd = open(path, O_RDONLY);
  ck_assert_int_ge(fd, 0);
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  ck_assert_int_gt(n, 0);
  buf[n] = '\0';
  const char *v = strstr(buf, "\nvoluntary_ctxt_switches:");
  ck_assert_ptr_nonnull(v);
  return atol(v + 25);
}

/* Wait until the purge thread sleeps for good: it wakes every quarter
 * purge delay while it has work, not at all once parked.  Returns its
 * switch count then. */
static long bg_wait_parked(int tid)
{
  long s0 = bg_switches(tid);
  for (long waited = 0; waited < BG_POLL_MAX_MS; waited += 4 * BG_DELAY_MS) {
    bg_sleep_ms(4 * BG_DELAY_MS);
    long s1 = bg_switches(tid);
    if (s1 == s0)
      return s1;
    s0 = s1;
  }
  ck_abort_msg("the purge thread still wakes after %d ms", BG_POLL_MAX_MS);
  return -1;
}

/* When nothing is left to purge the thread parks: no wake-up while the
 * program is idle, and the next memory to give back wakes it, the same
 * thread (a free never starts one in a threaded program: glibc frees a
 * dead thread's TLS under the lock pthread_create takes). */
START_TEST(purge_thread_parks_when_done)
{
  bg_on();
  smalloc_stats_t a, a2, b, b2, c;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  int before = bg_threads();
  long t0 = bg_ms();
  bg_give_something_back();
  ck_assert_int_eq(sm_test_snap(&a2), 0);
  /* frees that last a purge delay (a loaded machine) look idle to the
   * purge thread: it may release what they retired so far and park
   * before the last of them, whose pages (fewer than wake it: smalloc(7))
   * then wait */
  uint64_t may_stay = bg_ms() - t0 >= BG_DELAY_MS ? BG_WAKE_BYTES / SM_TEST_SMALL_PAGE - 1 : 0;
  int tid = bg_wait_purge_tid();
  ck_assert_msg(tid != 0, "no purge thread after 16 MiB freed");
  long s0 = bg_wait_parked(tid);
  /* parked: no wake-up in ten purge delays */
  bg_sleep_ms(10 * BG_DELAY_MS);
  ck_assert_int_eq(bg_switches(tid), s0);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_uint_eq(b.background_threads - a.background_threads, 1);
  /* every page the burst retired was released, or reused (a few are by
   * the burst's own mallocs, from pages retired as it began) */
  ck_assert_msg(b.pages_released - a.pages_released + b.pages_reused - a.pages_reused + may_stay >=
                    a2.pages_retired - a.pages_retired,
                "the burst retired %llu pages; %llu released, %llu reused, %llu retired since",
                (unsigned long long)(a2.pages_retired - a.pages_retired),
                (unsigned long long)(b.pages_released - a.pages_released),
                (unsigned long long)(b.pages_reused - a.pages_reused),
                (unsigned long long)(b.pages_retired - a2.pages_retired));
  /* (all the burst's pages but the one its class allocates from) */
  ck_assert_uint_ge(a2.pages_retired - a.pages_retired, 16 * MiB / SM_TEST_SMALL_PAGE - 1);
  if (!SM_TEST_TSAN)   /* ThreadSanitizer keeps threads of its own that come and go */
    ck_assert_int_eq(bg_threads(), before + 1);

  /* more to give back: the same thread wakes and releases it */
  t0 = bg_ms();
  bg_give_something_back();
  ck_assert_int_eq(sm_test_snap(&b2), 0);
  may_stay = bg_ms() - t0 >= BG_DELAY_MS ? BG_WAKE_BYTES / SM_TEST_SMALL_PAGE - 1 : 0;
  ck_assert_int_eq(bg_purge_tid(), tid);
  bg_wait_parked(tid);
  ck_assert_int_gt(bg_switches(tid), s0);
  ck_assert_int_eq(sm_test_snap(&c), 0);
  ck_assert_uint_eq(c.background_threads - a.background_threads, 1);
  ck_assert_uint_ge(b2.pages_retired - b.pages_retired, 16 * MiB / SM_TEST_SMALL_PAGE - 1);
  ck_assert_uint_ge(c.pages_released - b.pages_released + c.pages_reused - b.pages_reused + may_stay,
                    b2.pages_retired - b.pages_retired);
}
END_TEST

/* A thread frees another's blocks and goes idle, and so does the owner:
 * the frees wait in the idle thread's batches (one per page, sent when
 * it reaches 64 blocks or at that thread's next slow path), and the
 * purge thread sends them for it, after which the owner's pages, free
 * again, go back like any others.  Before, the batches kept the pages in
 * use for as long as the thread stayed idle. */
enum { BG_X_SIZE = SM_TEST_REQUEST_FOR(2048), BG_X_PAGES = 16, BG_X_MAX = 4096 };
static struct {
  sm_test_phase_t ph;
  void *v[BG_X_MAX];
  size_t n;
  int k;
  uint64_t p0, frees0;
} bg_x = {.ph = SM_TEST_PHASE_INIT};

static uint64_t bg_x_pages(void)
{
  smalloc_stats_t s;
  ck_assert_int_eq(sm_test_snap(&s), 0);
  return s.classes[bg_x.k].pages_in_use;
}

/* Fills BG_X_PAGES pages (they go on its full list as it starts the
 * next), keeps the block that started the next, and idles. */
static void *bg_x_owner(void *arg)
{
  (void)arg;
  smalloc_stats_t s;
  ck_assert_int_eq(sm_test_snap(&s), 0);
  bg_x.k = sm_test_class_index(&s, BG_X_SIZE);
  ck_assert_int_ge(bg_x.k, 0);
  bg_x.p0 = s.classes[bg_x.k].pages_in_use;
  void *extra = NULL;
  while (extra == NULL) {
    void *p = smalloc_malloc(BG_X_SIZE);
    ck_assert_ptr_nonnull(p);
    if (bg_x_pages() == bg_x.p0 + BG_X_PAGES + 1) {
      extra = p;
    } else {
      ck_assert_uint_lt(bg_x.n, BG_X_MAX);
      bg_x.v[bg_x.n++] = p;
    }
  }
  ck_assert_int_eq(sm_test_snap(&s), 0);
  bg_x.frees0 = s.classes[bg_x.k].frees;
  sm_test_phase_set(&bg_x.ph, 1);
  sm_test_phase_wait(&bg_x.ph, 3);   /* alive and idle */
  smalloc_free(extra);
  return NULL;
}

static void *bg_x_freer(void *arg)
{
  (void)arg;
  sm_test_phase_wait(&bg_x.ph, 1);
  for (size_t i = 0; i < bg_x.n; i++)
    smalloc_free(bg_x.v[i]);
  sm_test_phase_set(&bg_x.ph, 2);
  sm_test_phase_wait(&bg_x.ph, 3);   /* alive and idle */
  return NULL;
}

START_TEST(an_idle_threads_remote_frees_are_sent_without_a_call)
{
  bg_on();
  pthread_t o, f;
  ck_assert_int_eq(pthread_create(&o, NULL, bg_x_owner, NULL), 0);
  ck_assert_int_eq(pthread_create(&f, NULL, bg_x_freer, NULL), 0);
  sm_test_phase_wait(&bg_x.ph, 2);
  ck_assert_uint_ge(bg_x.n, BG_X_PAGES * 24);
  /* idle: only the owner's page with the kept block is left */
  uint64_t pages = bg_x_pages();
  for (long waited = 0; pages > bg_x.p0 + 1 && waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
    bg_sleep_ms(BG_POLL_MS);
    pages = bg_x_pages();
  }
  ck_assert_msg(pages == bg_x.p0 + 1, "%llu pages of the %d filled still in use after %d ms",
                (unsigned long long)(pages - bg_x.p0 - 1), BG_X_PAGES, BG_POLL_MAX_MS);
  /* every free counted once, those of the batches the purge thread sent
   * too (by it: the idle thread's counters are its own) */
  smalloc_stats_t s;
  ck_assert_int_eq(sm_test_snap(&s), 0);
  ck_assert_uint_eq(s.classes[bg_x.k].frees - bg_x.frees0, bg_x.n);
  sm_test_phase_set(&bg_x.ph, 3);
  pthread_join(o, NULL);
  pthread_join(f, NULL);
}
END_TEST

/* A thread fills BG_A_PAGES pages of a class and exits; this thread
 * frees every block but the last and goes idle.  The exited thread's
 * segment stays abandoned (the page of the kept block is in use), and the
 * pages that went back to it, released from the pool or from this
 * thread's retired ones, are given back to the OS after the purge delay
 * like the free pages of a live thread's segments.  Before, they stayed
 * committed until a thread took the segment, which an idle program never
 * does: a program whose threads came and went kept 90 MB resident for
 * 6 KB live. */
enum { BG_A_PAGES = 24, BG_A_SIZE = SM_TEST_REQUEST_FOR(512), BG_A_HUGE = 8 << 20 };
static void **bg_a_v;
static size_t bg_a_n;

static void *bg_a_maker(void *arg)
{
  (void)arg;
  for (size_t i = 0; i < bg_a_n; i++)
    bg_a_v[i] = smalloc_malloc(BG_A_SIZE);
  return NULL;
}

START_TEST(free_pages_of_an_exited_threads_segment_go_back)
{
  bg_on();
  bg_a_n = BG_A_PAGES * (SM_TEST_SMALL_PAGE / sm_test_class_size(BG_A_SIZE));
  bg_a_v = mmap(NULL, bg_a_n * sizeof *bg_a_v, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ck_assert(bg_a_v != MAP_FAILED);
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, bg_a_maker, NULL), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
  for (size_t i = 0; i < bg_a_n; i++)
    ck_assert_ptr_nonnull(bg_a_v[i]);
  smalloc_stats_t a, c;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  for (size_t i = 0; i + 1 < bg_a_n; i++)
    smalloc_free(bg_a_v[i]);
  /* so little retired does not wake a parked purge thread (8 MiB does);
   * a kept huge mapping does, whatever its size, and its purge is no
   * page's (distcheck, with the thread parked before these frees, saw
   * none purged) */
  smalloc_free(smalloc_malloc(BG_A_HUGE));
  /* idle: every page but the kept block's gives its memory back (the
   * count takes in other heaps' free pages too) */
  uint64_t want = BG_A_PAGES - 2;
  for (long waited = 0; waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
    ck_assert_int_eq(sm_test_snap(&c), 0);
    /* both: under THP "always" the segment's pages never used go back
     * too, at the thread's exit (a huge page may have brought them in),
     * which can be before the kept mapping's purge */
    if (c.pages_purged - a.pages_purged >= want &&
        c.bytes_committed + want * SM_TEST_SMALL_PAGE <= a.bytes_committed)
      break;
    bg_sleep_ms(BG_POLL_MS);
  }
  ck_assert_msg(c.pages_purged - a.pages_purged >= want,
                "%llu pages purged after %d ms idle, of the %d free in the exited thread's segment",
                (unsigned long long)(c.pages_purged - a.pages_purged), BG_POLL_MAX_MS, BG_A_PAGES - 1);
  ck_assert_uint_le(c.bytes_committed + want * SM_TEST_SMALL_PAGE, a.bytes_committed);
  smalloc_free(bg_a_v[bg_a_n - 1]);
  munmap(bg_a_v, bg_a_n * sizeof *bg_a_v);
}
END_TEST

/* A thread writes blocks of 80 KiB, frees three in four and exits: each
 * of its 512 KiB pages keeps a live block and waits in the process's
 * pool, where no thread may take it for a long while.  Idle, the memory
 * of the free blocks goes back all the same, but the words each keeps at
 * its start: the purge thread gives it back once the pages have waited
 * for the purge delay (pool.c).  Before, 1,000 such blocks of 100 KB
 * kept 128 MB resident for 25 MB live, for good. */
enum { BG_P_N = 64, BG_P_KEEP = 4, BG_P_SIZE = SM_TEST_REQUEST_FOR(81920) };
static void *bg_p_v[BG_P_N];
static size_t bg_p_free_resident(void);
static size_t bg_p_before;   /* bg_p_free_resident() as the worker exits */

static void *bg_p_worker(void *arg)
{
  (void)arg;
  for (int i = 0; i < BG_P_N; i++) {
    bg_p_v[i] = smalloc_malloc(BG_P_SIZE);
    ck_assert_ptr_nonnull(bg_p_v[i]);
    memset(bg_p_v[i], 0x5a, BG_P_SIZE);
  }
  for (int i = 0; i < BG_P_N; i++)
    if (i % BG_P_KEEP)
      smalloc_free(bg_p_v[i]);
  bg_p_before = bg_p_free_resident();   /* its pages go to the pool when it exits */
  return NULL;
}

/* OS pages resident of those [from, to) touches (mincore; an unmapped
 * one, such as a block lent a mapping of its own and freed, counts as
 * not). */
static size_t bg_resident(uintptr_t from, uintptr_t to)
{
  size_t n = 0;
  for (uintptr_t at = from & ~(uintptr_t)4095; at < to; at += 4096) {
    unsigned char v = 0;
    n += mincore((void *)at, 4096, &v) == 0 && (v & 1);
  }
  return n;
}

/* OS pages resident inside the free blocks (past the 32 bytes each keeps). */
static size_t bg_p_free_resident(void)
{
  size_t n = 0;
  for (int i = 0; i < BG_P_N; i++) {
    if (i % BG_P_KEEP == 0) continue;
    uintptr_t from = ((uintptr_t)bg_p_v[i] + 32 + 4095) & ~(uintptr_t)4095;
    uintptr_t to = ((uintptr_t)bg_p_v[i] + sm_test_class_size(BG_P_SIZE)) & ~(uintptr_t)4095;
    n += bg_resident(from, to);
  }
  return n;
}

START_TEST(free_blocks_of_an_exited_threads_sparse_pages_go_back)
{
  bg_on();
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, bg_p_worker, NULL), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
  /* resident when their thread exits: most of them (lent mappings are
   * given back at once) */
  size_t before = bg_p_before;
  ck_assert_uint_ge(before, BG_P_N / 2 * (BG_P_SIZE / 4096 - 1));
  size_t left = before;
  for (long waited = 0; left > 0 && waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
    bg_sleep_ms(BG_POLL_MS);
    left = bg_p_free_resident();
  }
  ck_assert_msg(left == 0, "%zu of %zu OS pages of free blocks still resident after %d ms idle", left, before,
                BG_POLL_MAX_MS);
  /* the live blocks and the words the free ones keep stay */
  for (int i = 0; i < BG_P_N; i++) {
    uintptr_t b = (uintptr_t)bg_p_v[i];
    if (i % BG_P_KEEP == 0) {
      uintptr_t end = b + BG_P_SIZE;
      ck_assert_uint_eq(bg_resident(b, end), (end - (b & ~(uintptr_t)4095) + 4095) / 4096);
      ck_assert_uint_eq(((unsigned char *)bg_p_v[i])[BG_P_SIZE - 1], 0x5a);
      smalloc_free(bg_p_v[i]);
    }
  }
}
END_TEST

/* Threads start, free into pages that retire, hand blocks to main and
 * exit, round after round, while the purge thread has work: glibc frees
 * a dead thread's TLS vector, in pthread_join, under the lock that
 * pthread_create takes, and a free that started the purge thread there
 * would wait for itself.  One purge thread serves the whole run (it
 * parks, it does not exit and start again), also where the main thread
 * never allocates from smalloc (the sanitizer builds): then no thread
 * with a heap is left after each round, but the main thread runs.  The workers' blocks sit in
 * thread-local arrays: with those of churn_thread below, 64 KiB of them,
 * more than the purge thread's own 64 KiB stack holds (glibc puts a
 * thread's TLS there), and it must start all the same. */
enum { BG_S_ROUNDS = 40, BG_S_THREADS = 4, BG_S_BLOCKS = 4096 };
static void *bg_s_given[BG_S_THREADS][BG_S_BLOCKS / 2];

static void *bg_s_worker(void *arg)
{
  void **given = arg;
  static __thread void *mine[BG_S_BLOCKS];
  for (int i = 0; i < BG_S_BLOCKS; i++) {
    mine[i] = smalloc_malloc(SM_TEST_REQUEST_FOR(1024));
    ck_assert_ptr_nonnull(mine[i]);
  }
  for (int i = 0; i < BG_S_BLOCKS; i++) {
    if (i % 2) given[i / 2] = mine[i];
    else smalloc_free(mine[i]);
  }
  return NULL;
}

START_TEST(threads_come_and_go_while_the_purge_thread_works)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 10), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 1), 0);
  smalloc_stats_t a, b;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  for (int r = 0; r < BG_S_ROUNDS; r++) {
    pthread_t t[BG_S_THREADS];
    for (int k = 0; k < BG_S_THREADS; k++)
      ck_assert_int_eq(pthread_create(&t[k], NULL, bg_s_worker, bg_s_given[k]), 0);
    for (int k = 0; k < BG_S_THREADS; k++)
      ck_assert_int_eq(pthread_join(t[k], NULL), 0);
    for (int k = 0; k < BG_S_THREADS; k++)
      for (int i = 0; i < BG_S_BLOCKS / 2; i++)
        smalloc_free(bg_s_given[k][i]);
  }
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_uint_eq(b.background_threads - a.background_threads, 1);
}
END_TEST

/* Threads that each allocated a block and exited together: their heaps
 * are kept for later threads, but a purge delay after their exit the
 * purge thread gives back their memory, all but a page of each (heap.c:
 * the pool of heaps), without a call: every heap, once. */
enum { BG_H_THREADS = 16 };
static pthread_barrier_t bg_h_all_allocated;

static void *bg_h_worker(void *arg)
{
  (void)arg;
  void *p = smalloc_malloc(64);
  ck_assert_ptr_nonnull(p);
  memset(p, 1, 64);
  pthread_barrier_wait(&bg_h_all_allocated);   /* a heap each, all at once */
  smalloc_free(p);
  return NULL;
}

START_TEST(the_heaps_of_exited_threads_go_back_without_a_call)
{
  bg_on();
  smalloc_malloc_trim(0);   /* the heaps taken apart before: given back */
  smalloc_stats_t a, c;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  pthread_t t[BG_H_THREADS];
  ck_assert_int_eq(pthread_barrier_init(&bg_h_all_allocated, NULL, BG_H_THREADS), 0);
  for (int i = 0; i < BG_H_THREADS; i++)
    ck_assert_int_eq(pthread_create(&t[i], NULL, bg_h_worker, NULL), 0);
  for (int i = 0; i < BG_H_THREADS; i++)
    ck_assert_int_eq(pthread_join(t[i], NULL), 0);
  pthread_barrier_destroy(&bg_h_all_allocated);
  for (long waited = 0; waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
    ck_assert_int_eq(sm_test_snap(&c), 0);
    if (c.heaps_purged - a.heaps_purged >= BG_H_THREADS)
      break;
    bg_sleep_ms(BG_POLL_MS);
  }
  ck_assert_msg(c.heaps_purged - a.heaps_purged == BG_H_THREADS,
                "%llu heaps of %d exited threads given back after %d ms idle",
                (unsigned long long)(c.heaps_purged - a.heaps_purged), BG_H_THREADS, BG_POLL_MAX_MS);
}
END_TEST

/* SMALLOC_BACKGROUND=0: no thread, ever. */
START_TEST(background_off_starts_no_thread)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, BG_DELAY_MS), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  int before = bg_threads();
  smalloc_stats_t a, b;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  void **v = mmap(NULL, 200000 * sizeof *v, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                  -1, 0);
  ck_assert(v != MAP_FAILED);
  for (int i = 0; i < 200000; i++)
    v[i] = smalloc_malloc(100);
  for (int i = 0; i < 200000; i++)
    smalloc_free(v[i]);
  smalloc_free(smalloc_malloc(32 * MiB));
  bg_sleep_ms(5 * BG_DELAY_MS);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_int_eq(bg_threads(), before);
  ck_assert_uint_eq(b.background_threads - a.background_threads, 0);
  munmap(v, 200000 * sizeof *v);
}
END_TEST

/* SMALLOC_OPTION_BACKGROUND set to 0 stops a thread that runs, and
 * smalloc_option_set returns once it has (its id is gone from the
 * process's threads soon after: the kernel lets it go after the join);
 * set to 1 again, the next memory to give back starts another, which
 * gives it back.  The stop comes at any point of the thread's work: the
 * burst freed just before keeps it busy. */
START_TEST(background_off_stops_the_thread_and_on_starts_another)
{
  smalloc_stats_t a, b;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  for (int round = 0; round < 3; round++) {
    bg_on();
    bg_give_something_back();
    smalloc_free(smalloc_malloc(3 * MiB));   /* the end of a slow-path malloc starts the thread */
    int tid = bg_wait_purge_tid();
    ck_assert_msg(tid != 0, "round %d: no purge thread", round);
    bg_give_something_back();   /* at work when told to stop */
    ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
    int left = bg_purge_tid();
    for (long waited = 0; left != 0 && waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
      bg_sleep_ms(BG_POLL_MS);
      left = bg_purge_tid();
    }
    ck_assert_msg(left == 0, "round %d: the purge thread %d still runs", round, left);
    /* off: memory to give back starts none */
    bg_give_something_back();
    smalloc_free(smalloc_malloc(3 * MiB));
    bg_sleep_ms(2 * BG_DELAY_MS);
    ck_assert_int_eq(bg_purge_tid(), 0);
  }
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_uint_eq(b.background_threads - a.background_threads, 3);
  /* on again: the next memory to give back starts another, which gives
   * back pages (counted: under the sanitizers the resident size says
   * little) */
  bg_on();
  bg_give_something_back();
  smalloc_free(smalloc_malloc(3 * MiB));
  ck_assert_msg(bg_wait_purge_tid() != 0, "no purge thread once on again");
  smalloc_stats_t c;
  ck_assert_int_eq(sm_test_snap(&c), 0);
  for (long waited = 0; c.pages_released == b.pages_released && waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
    bg_sleep_ms(BG_POLL_MS);
    ck_assert_int_eq(sm_test_snap(&c), 0);
  }
  ck_assert_uint_gt(c.pages_released, b.pages_released);
  ck_assert_uint_eq(c.background_threads - a.background_threads, 4);
}
END_TEST

/* fork while the purge thread runs: the child allocates at once and
 * exits; the parent's thread goes on. */
START_TEST(fork_while_purging)
{
  bg_on();
  bg_give_something_back();   /* starts the thread */
  ck_assert_int_ge(bg_threads(), 2);
  for (int k = 0; k < 20; k++) {
    pid_t pid = fork();
    ck_assert_msg(pid >= 0, "fork: %s", strerror(errno));
    if (pid == 0) {
      alarm(20);
      for (int i = 0; i < 1000; i++) {
        void *q = smalloc_malloc((size_t)(16 + i * 37 % 5000));
        if (q == NULL)
          _exit(2);
        smalloc_free(q);
      }
      smalloc_free(smalloc_malloc(16 * MiB));   /* may start the child's own */
      _exit(0);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0)
      ck_assert_int_eq(errno, EINTR);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child %d: status %#x", k, status);
    smalloc_free(smalloc_malloc(9 * MiB));
  }
}
END_TEST

#ifdef SM_OVERRIDE
/* The calls the kernel makes only in a process of one thread, in a child
 * (they change its namespaces).  unshare(CLONE_NEWUSER) is the first
 * step of unprivileged sandboxes (unshare -r, bubblewrap); setns into a
 * mount namespace needs CAP_SYS_ADMIN (joining its own changes only the
 * child's root and working directory). */
enum { BG_SETNS = 1, BG_UNSHARE = 2 };
static int bg_ns_call(int which)
{
  if (which == BG_UNSHARE)
    return unshare(CLONE_NEWUSER);
  int fd = open("/proc/self/ns/mnt", O_RDONLY);
  if (fd < 0)
    return -1;
  int r = setns(fd, CLONE_NEWNS);
  int e = errno;
  close(fd);
  errno = e;
  return r;
}

/* Which of the calls this kernel and this process's rights allow a
 * process of one thread (a container may forbid both). */
static int bg_ns_allowed(void)
{
  int allowed = 0;
  for (int which = BG_SETNS; which <= BG_UNSHARE; which <<= 1) {
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0)
      _exit(bg_ns_call(which) == 0 ? 0 : 1);
    int status;
    while (waitpid(pid, &status, 0) < 0)
      ck_assert_int_eq(errno, EINTR);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
      allowed |= which;
  }
  return allowed;
}

/* In the child: make the allowed calls with the purge thread running;
 * 0, or the step that failed (said on stderr). */
static int bg_ns_child(int allowed)
{
  smalloc_stats_t a, b;
  bg_on();
  if (sm_test_snap(&a) != 0)
    return 1;
  int starts = 0;
  for (int which = BG_SETNS; which <= BG_UNSHARE; which <<= 1) {
    if (!(allowed & which))
      continue;
    bg_give_something_back();
    smalloc_free(smalloc_malloc(3 * MiB));   /* the end of a slow-path malloc starts the thread */
    if (bg_wait_purge_tid() == 0 || bg_threads() != 2) {
      fprintf(stderr, "no purge thread beside the test's (%d threads)\n", bg_threads());
      return 2;
    }
    starts++;
    errno = EDOM;
    if (bg_ns_call(which) != 0) {
      fprintf(stderr, "%s with the purge thread running: %s\n",
              which == BG_UNSHARE ? "unshare(CLONE_NEWUSER)" : "setns(CLONE_NEWNS)", strerror(errno));
      return 3;
    }
    if (errno != EDOM) {   /* the refusal the call was made again after does not show */
      fprintf(stderr, "errno %s after the call succeeded\n", strerror(errno));
      return 7;
    }
    /* the call may succeed before the kernel has taken the thread off the
     * process's threads (setns asks only that no other shares the root) */
    int threads = bg_threads();
    for (long waited = 0; threads != 1 && waited < 1000; waited += 10) {
      bg_sleep_ms(10);
      threads = bg_threads();
    }
    if (threads != 1) {
      fprintf(stderr, "%d threads after the call\n", threads);
      return 4;
    }
  }
  /* the next malloc after memory to give back starts the thread again */
  bg_give_something_back();
  smalloc_free(smalloc_malloc(3 * MiB));
  if (bg_wait_purge_tid() == 0) {
    fprintf(stderr, "no purge thread after the calls\n");
    return 5;
  }
  if (sm_test_snap(&b) != 0 || b.background_threads - a.background_threads != (uint64_t)starts + 1) {
    fprintf(stderr, "%llu purge threads started, %d expected\n",
            (unsigned long long)(b.background_threads - a.background_threads), starts + 1);
    return 6;
  }
  return 0;
}

/* A program of one thread that has freed memory, and so has a purge
 * thread, may still make the calls the kernel refuses (EINVAL) to a
 * process of more than one: the thread steps aside for them, and the
 * next malloc starts it again. */
START_TEST(purge_thread_steps_aside_for_unshare_and_setns)
{
  int allowed = bg_ns_allowed();
  if (allowed == 0) {
    printf("skipped: neither unshare(CLONE_NEWUSER) nor setns(CLONE_NEWNS) is allowed here\n");
    return;
  }
  pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0)
    _exit(bg_ns_child(allowed));
  int status;
  while (waitpid(pid, &status, 0) < 0)
    ck_assert_int_eq(errno, EINTR);
  ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child: status %#x (allowed %d)", status,
                allowed);
}
END_TEST
#endif

/* Pages freed in a segment that still holds a live block go back to the
 * OS too (once free for the purge delay; here 0, so at once): committed
 * bytes follow the live bytes, not the most pages a segment ever held.
 * The test's thread is the process's only one: its pages are in segments
 * of its own (with other threads, they would be shared ones, whose free
 * pages go back at the next trim or purge round: free_pages_of_an_exited_
 * threads_segment_go_back). */
START_TEST(free_pages_of_a_live_segment_go_back)
{
  /* 17 pages of 64 KiB, the first of which may hold another block */
  enum { N = 17 * 1024, SIZE = SM_TEST_REQUEST_FOR(64) };
  static void *v[N];
  smalloc_stats_t s[2];
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 0), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, 0), 0);
  void *anchor = smalloc_malloc(1000);   /* keeps the segment */
  for (int i = 0; i < N; i++)
    v[i] = smalloc_malloc(SIZE);
  ck_assert_int_eq(sm_test_snap(&s[0]), 0);
  for (int i = 0; i < N; i++)
    smalloc_free(v[i]);
  ck_assert_int_eq(sm_test_snap(&s[1]), 0);
  smalloc_free(anchor);
  uint64_t released = s[1].pages_released - s[0].pages_released;
  ck_assert_uint_ge(released, 16);
  ck_assert_uint_eq(s[1].segments_cached - s[0].segments_cached, 0);   /* the segment lives */
  ck_assert_uint_eq(s[1].pages_purged - s[0].pages_purged, released);
  ck_assert_uint_ge(s[0].bytes_committed - s[1].bytes_committed,
                    (released - 1) * SM_TEST_SMALL_PAGE);
  ck_assert_uint_ge(s[1].bytes_purged - s[0].bytes_purged, (released - 1) * SM_TEST_SMALL_PAGE);
}
END_TEST


/* (Under AddressSanitizer the exit status is the leak checker's, which
 * finds libcheck's memory at that exit: only the exit is checked.)
 * A process ends when its last thread does, as if by exit(0) (POSIX),
 * also when main calls pthread_exit: the purge thread, once no other
 * thread runs, ends too rather than keep the process alive (it
 * blocks every signal: only SIGKILL ended it).  In a child of fork, too,
 * whose parent's other threads did not come along.  The child starts
 * the purge thread (a second thread allocated), then its last thread
 * calls pthread_exit; the test waits for it to exit, with status 0. */
static void *pe_alloc(void *arg)
{
  if (arg != NULL) {   /* a worker of its own: its own name and mask */
    sigset_t term;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    if (prctl(PR_SET_NAME, "pe-worker", 0, 0, 0) != 0 || pthread_sigmask(SIG_BLOCK, &term, NULL) != 0)
      _exit(6);
  }
  smalloc_free(smalloc_malloc(100));
  return NULL;
}

/* purge threads started before the child's (its parent's) */
static uint64_t pe_started;
/* pe_child's worker has a stack of the program's (glibc keeps no such
 * stack for a next thread, so the one that exits the process is given
 * a new one, and its TLS vector is allocated on the purge thread), a
 * name and SIGTERM blocked */
static bool pe_own_worker;

/* The child: the purge thread sleeps 10 ms between rounds (a quarter of
 * the delay), so that it looks within 10 ms of the last thread's end
 * even when the wake comes just before its sleep. */
static void pe_child(void)
{
  smalloc_stats_t s0;
  if (sm_test_snap(&s0) != 0)
    _exit(2);
  pe_started = s0.background_threads;
  if (smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 40) != 0 ||
      smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 1) != 0)
    _exit(2);
  pthread_t t;
  pthread_attr_t attr;
  static char stack[1 << 20] __attribute__((aligned(4096)));
  if (pthread_attr_init(&attr) != 0 || (pe_own_worker && pthread_attr_setstack(&attr, stack, sizeof stack) != 0))
    _exit(3);
  /* the purge thread starts at the end of the worker's malloc */
  if (pthread_create(&t, &attr, pe_alloc, pe_own_worker ? stack : NULL) != 0 || pthread_join(t, NULL) != 0)
    _exit(3);
  smalloc_free(smalloc_malloc(100));
  smalloc_stats_t s;
  if (sm_test_snap(&s) != 0 || s.background_threads == pe_started)
    _exit(4);
  pthread_exit(NULL);
}

/* Wait for pid to end, at most BG_POLL_MAX_MS; its wait status, or -1
 * after killing it when it did not end. */
static int pe_wait(pid_t pid)
{
  int status;
  for (long waited = 0; waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
    if (waitpid(pid, &status, WNOHANG) == pid)
      return status;
    bg_sleep_ms(BG_POLL_MS);
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return -1;
}

/* A child that runs setup (when given), then pe_child, with no heap
 * waiting for a next thread (no work left for the purge thread when the
 * last thread tells it to end); its wait status, once it has ended
 * (the test fails if it outlives BG_POLL_MAX_MS), or -1 under
 * ThreadSanitizer, where it is not run: its runtime starts a thread of
 * its own with pthread_create, which keeps any process alive past its
 * last thread's pthread_exit, and it does not follow a fork from a
 * thread. */
static int pe_run(const char *test, void (*setup)(void))
{
  if (SM_TEST_TSAN) {
    fprintf(stderr, "%s: not under ThreadSanitizer\n", test);
    return -1;
  }
  pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0) {
    if (smalloc_option_set(SMALLOC_OPTION_HEAP_CACHE, 0) != 0)
      _exit(5);
    if (setup)
      setup();
    pe_child();
  }
  int status = pe_wait(pid);
  ck_assert_msg(status != -1, "the process outlived its last thread by %d ms", BG_POLL_MAX_MS);
  return status;
}

START_TEST(the_process_exits_when_its_last_thread_calls_pthread_exit)
{
  int status = pe_run("the_process_exits_when_its_last_thread_calls_pthread_exit", NULL);
  if (status == -1)
    return;
  ck_assert_msg(WIFEXITED(status) && (WEXITSTATUS(status) == 0 || SM_TEST_ASAN), "wait status %#x", status);
}
END_TEST

static void *pe_fork(void *arg)
{
  (void)arg;
  smalloc_free(smalloc_malloc(100));
  pid_t pid = fork();
  if (pid == 0)
    pe_child();
  return (void *)(intptr_t)pid;
}

START_TEST(a_child_forked_by_a_thread_exits_with_its_last_thread)
{
  if (SM_TEST_TSAN) {
    fprintf(stderr, "a_child_forked_by_a_thread_exits_with_its_last_thread: not under ThreadSanitizer\n");
    return;
  }
  pthread_t t;
  void *r;
  ck_assert_int_eq(pthread_create(&t, NULL, pe_fork, NULL), 0);
  ck_assert_int_eq(pthread_join(t, &r), 0);
  pid_t pid = (pid_t)(intptr_t)r;
  ck_assert_int_gt(pid, 0);
  int status = pe_wait(pid);
  ck_assert_msg(status != -1, "the child outlived its last thread by %d ms", BG_POLL_MAX_MS);
  ck_assert_msg(WIFEXITED(status) && (WEXITSTATUS(status) == 0 || SM_TEST_ASAN), "wait status %#x", status);
}
END_TEST

/* The exit of a process whose last thread was the purge thread runs the
 * program's exit handlers as its own last thread would: with the name
 * and signal mask of the main thread (the last to allocate), on a
 * thread of the default stack size, not on the purge thread (every
 * signal blocked, 64 KiB of stack where the program's thread-local data
 * leaves room; not in this program), nor with the mask and name of the
 * worker that started the purge thread.  The worker's stack is the
 * program's: the exit thread's TLS vector is allocated on the purge
 * thread, which must not start another.  The handler checks name and
 * mask and ends the child with _exit: 0 when they are right (so under
 * AddressSanitizer too). */
static char pe_main_name[16];

static void pe_exit_handler(void)
{
  char name[16] = "";
  sigset_t now;
  if (prctl(PR_GET_NAME, name, 0, 0, 0) != 0 || strcmp(name, "smalloc-purge") == 0)
    _exit(11);
  if (strcmp(name, pe_main_name) != 0)
    _exit(12);
  if (pthread_sigmask(SIG_SETMASK, NULL, &now) != 0 || sigismember(&now, SIGTERM))
    _exit(9);
  _exit(0);
}

static void pe_exit_setup(void)
{
  if (atexit(pe_exit_handler) != 0 || prctl(PR_GET_NAME, pe_main_name, 0, 0, 0) != 0)
    _exit(5);
  pe_own_worker = true;
}

START_TEST(exit_handlers_run_with_the_programs_signal_mask_and_stack)
{
  int status = pe_run("exit_handlers_run_with_the_programs_signal_mask_and_stack", pe_exit_setup);
  if (status == -1)
    return;
  ck_assert_msg(!WIFEXITED(status) || WEXITSTATUS(status) != 11, "the exit handlers ran on the purge thread");
  ck_assert_msg(!WIFEXITED(status) || WEXITSTATUS(status) != 12, "the exit handlers ran under another name");
  ck_assert_msg(!WIFEXITED(status) || WEXITSTATUS(status) != 9, "the exit handlers ran with SIGTERM blocked");
  ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "wait status %#x", status);
}
END_TEST

/* A main thread that ends with pthread_exit while a thread that never
 * allocated runs on leaves the purge thread running: the program is not
 * over (where smalloc is linked rather than preloaded, the main thread
 * itself is such a thread, and the purge thread must serve the whole
 * run, not end and start again with each generation of threads).  It
 * ends with that thread, which checks, once the main thread has ended
 * (a zombie, in /proc) and the purge thread has had 50 ms to look, that
 * the process still has its three threads. */
static bool pw_main_ended(void)
{
  char buf[1024];
  int fd = open("/proc/self/stat", O_RDONLY);
  ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
  if (fd >= 0)
    close(fd);
  buf[n > 0 ? n : 0] = '\0';
  const char *p = strrchr(buf, ')');
  return p && p[1] == ' ' && p[2] == 'Z';
}

static void *pw_runs_on(void *arg)
{
  (void)arg;
  for (long waited = 0; !pw_main_ended(); waited++) {
    if (waited == BG_POLL_MAX_MS)
      _exit(6);
    bg_sleep_ms(1);
  }
  bg_sleep_ms(50);
  if (bg_threads() != 3)
    _exit(7);
  return NULL;
}

static void pw_setup(void)
{
  pthread_t t;
  if (pthread_create(&t, NULL, pw_runs_on, NULL) != 0)
    _exit(8);
}

START_TEST(the_purge_thread_stays_while_a_thread_without_a_heap_runs)
{
  int status = pe_run("the_purge_thread_stays_while_a_thread_without_a_heap_runs", pw_setup);
  if (status == -1)
    return;
  ck_assert_msg(!WIFEXITED(status) || WEXITSTATUS(status) != 7,
                "the purge thread ended while a thread without a heap ran");
  ck_assert_msg(WIFEXITED(status) && (WEXITSTATUS(status) == 0 || SM_TEST_ASAN), "wait status %#x", status);
}
END_TEST

/* An io_uring ring with a kernel thread of its own (SQPOLL: iou-sqp,
 * which lives while the ring's descriptor is open, so until the process
 * ends) counts among the process's threads in /proc, but it is not one
 * of the program's: the process whose last thread calls pthread_exit
 * ends all the same (it did not: the purge thread watched the kernel's
 * thread, every signal blocked, and only SIGKILL ended the process).
 * Not run where io_uring is refused (seccomp, io_uring_disabled), nor
 * before Linux 5.12, whose SQPOLL thread is not among the process's: the
 * child exits IOU_NONE then. */
enum { IOU_NONE = 14 };

#if __has_include(<linux/io_uring.h>)
#include <linux/io_uring.h>
#endif

static void iou_setup(void)
{
#if __has_include(<linux/io_uring.h>) && defined(SYS_io_uring_setup)
  struct io_uring_params p;
  memset(&p, 0, sizeof p);
  p.flags = IORING_SETUP_SQPOLL;
  p.sq_thread_idle = 1;   /* ms the kernel's thread polls before it sleeps */
  int before = bg_threads();
  if (syscall(SYS_io_uring_setup, 4, &p) >= 0 && bg_threads() == before + 1)
    return;
#endif
  _exit(IOU_NONE);
}

START_TEST(the_process_exits_while_io_uring_threads_run)
{
  int status = pe_run("the_process_exits_while_io_uring_threads_run", iou_setup);
  if (status == -1)
    return;
  if (WIFEXITED(status) && WEXITSTATUS(status) == IOU_NONE) {
    fprintf(stderr, "the_process_exits_while_io_uring_threads_run: no io_uring thread among the process's\n");
    return;
  }
  ck_assert_msg(WIFEXITED(status) && (WEXITSTATUS(status) == 0 || SM_TEST_ASAN), "wait status %#x", status);
}
END_TEST

/* The purge delay in force (stats: purge_delay) doubles each time memory
 * given back for having been unused for it is used again within it, at
 * most three times, and halves after eight delays in force with no such
 * reuse; memory that trim gave back says nothing of the delay.  The test's thread is
 * the process's only one and the purge thread is off: the test gives
 * back the pages it freed with smalloc_collect(false), which gives back
 * what has been free for the delay in force.  17 pages of 64 KiB are
 * freed (the first may hold another block), and allocated again. */
enum { PD_N = 17 * 1024, PD_SIZE = SM_TEST_REQUEST_FOR(64) };
static void *pd_v[PD_N];

static void pd_alloc(void)
{
  for (int i = 0; i < PD_N; i++)
    ck_assert_ptr_nonnull(pd_v[i] = smalloc_malloc(PD_SIZE));
}

static void pd_free(void)
{
  for (int i = 0; i < PD_N; i++)
    smalloc_free(pd_v[i]);
}

/* The options of these tests; returns the block that keeps the segment.
 * The pages the test will use are taken and given back by trim first:
 * pages that a purge of the test runner's gave back a moment before the
 * fork (the child inherits them) would double the delay at their first
 * use (seen in the secure build). */
static void *pd_setup(long delay)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, 0), 0);   /* freed pages go back to the segment */
  void *anchor = smalloc_malloc(1000);
  pd_alloc();
  pd_free();
  smalloc_collect(true);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, delay), 0);
  return anchor;
}

/* Free the blocks, wait `wait` ms, give back what has been free for the
 * delay in force: the pages given back (they all went to the segment).
 * Free pages the process held before (the sanitizers' runtimes allocate
 * too) are given back first, at once, so that none of theirs comes of
 * age in the wait. */
static uint64_t pd_free_wait_collect(long wait, uint64_t *released)
{
  smalloc_stats_t a, b;
  smalloc_collect(true);
  ck_assert_int_eq(sm_test_snap(&a), 0);
  pd_free();
  smalloc_collect(false);   /* the pages go back to the segment now (the secure build keeps them till a look) */
  bg_sleep_ms(wait);
  smalloc_collect(false);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  *released = b.pages_released - a.pages_released;
  ck_assert_uint_ge(*released, 16);
  return b.pages_purged - a.pages_purged;
}

static uint64_t pd_delay(void)
{
  smalloc_stats_t s;
  ck_assert_int_eq(sm_test_snap(&s), 0);
  return s.purge_delay;
}

START_TEST(memory_used_again_within_the_purge_delay_doubles_it)
{
  enum { D = 500 };
  void *anchor = pd_setup(D);
  uint64_t released;
  ck_assert_uint_eq(pd_delay(), D);
  pd_alloc();
  ck_assert_uint_eq(pd_free_wait_collect(D + 50, &released), released);   /* free for the delay: given back */
  ck_assert_uint_eq(pd_delay(), D);
  pd_alloc();   /* at once: the pages given back are faulted in again */
  ck_assert_uint_eq(pd_delay(), 2 * D);
  /* the same wait gives back nothing now; the rest of the longer delay does */
  ck_assert_uint_eq(pd_free_wait_collect(D + 50, &released), 0);
  bg_sleep_ms(D);
  smalloc_stats_t a, b;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  smalloc_collect(false);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_uint_eq(b.pages_purged - a.pages_purged, released);
  ck_assert_uint_eq(b.purge_delay, 2 * D);
  smalloc_free(anchor);
}
END_TEST

START_TEST(memory_used_again_after_the_purge_delay_leaves_it)
{
  enum { D = 200 };
  void *anchor = pd_setup(D);
  uint64_t released;
  pd_alloc();
  ck_assert_uint_eq(pd_free_wait_collect(D + 50, &released), released);
  bg_sleep_ms(D + 50);   /* given back for longer than the delay before it is used again */
  /* A page that went back to its segment after the others, emptied by
   * the free of a block that was not the test's (seen in the secure
   * build: freed during the wait's last collect), would be given back by
   * the timed purge of pd_alloc's first slow paths and used again at
   * once, which doubles the delay.  Trim gives it back first, and what
   * trim gives back says nothing of the delay; the pages given back
   * after the wait keep their stamps. */
  smalloc_collect(true);
  pd_alloc();
  ck_assert_uint_eq(pd_delay(), D);
  ck_assert_uint_eq(pd_free_wait_collect(D + 50, &released), released);
  smalloc_free(anchor);
}
END_TEST

START_TEST(memory_that_trim_gave_back_leaves_the_purge_delay)
{
  enum { D = 500 };
  void *anchor = pd_setup(D);
  pd_alloc();
  pd_free();
  smalloc_collect(true);   /* at once, whatever the delay */
  pd_alloc();
  ck_assert_uint_eq(pd_delay(), D);
  /* and the delay still decides: what it gives back, used again, doubles it */
  uint64_t released;
  ck_assert_uint_eq(pd_free_wait_collect(D + 50, &released), released);
  pd_alloc();
  ck_assert_uint_eq(pd_delay(), 2 * D);
  pd_free();
  smalloc_free(anchor);
}
END_TEST

START_TEST(the_purge_delay_doubles_at_most_three_times)
{
  enum { D = 250 };
  void *anchor = pd_setup(D);
  uint64_t released, want = D;
  pd_alloc();
  for (int i = 0; i < 4; i++) {
    ck_assert_uint_eq(pd_free_wait_collect((long)want + 20, &released), released);
    pd_alloc();
    if (want < 8 * D)
      want *= 2;
    ck_assert_uint_eq(pd_delay(), want);
  }
  ck_assert_uint_eq(want, 8 * D);
  pd_free();
  smalloc_free(anchor);
}
END_TEST

START_TEST(the_purge_delay_halves_after_a_calm_spell)
{
  enum { D = 250, CALM = 8 };
  void *anchor = pd_setup(D);
  uint64_t released;
  pd_alloc();
  ck_assert_uint_eq(pd_free_wait_collect(D + 20, &released), released);
  long t0 = bg_ms();
  pd_alloc();
  ck_assert_uint_eq(pd_delay(), 2 * D);
  uint64_t d = 2 * D;
  long waited = 0;
  for (; waited < BG_POLL_MAX_MS && (d = pd_delay()) == 2 * D; waited += BG_POLL_MS)
    bg_sleep_ms(BG_POLL_MS);
  ck_assert_uint_eq(d, D);
  /* not before the calm spell (less a tick of the library's coarser clock) */
  ck_assert_int_ge(bg_ms() - t0, CALM * 2 * D - 20);
  pd_free();
  smalloc_free(anchor);
}
END_TEST

/* A thread frees a burst of its own segment's pages, all but one block,
 * and goes idle.  The purge thread releases its retired pages once they
 * have waited the delay, which comes before the thread counts as idle:
 * their memory waits a delay more in the segment, and the purge thread
 * stays awake for it.  Before, it parked there (nothing retired left),
 * and the thread, idle from then on, kept 1.5 MB resident for good. */
static void *bg_i_nothing(void *arg)
{
  (void)arg;
  smalloc_free(smalloc_malloc(16));
  return NULL;
}

START_TEST(free_pages_of_a_thread_going_idle_go_back)
{
  enum { PAGES = 24, SIZE = SM_TEST_REQUEST_FOR(512) };
  enum { N = PAGES * (SM_TEST_SMALL_PAGE / 512) };
  static void *v[N];
  bg_on();
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HEAP_CACHE, 0), 0);   /* no heap waits */
  sm_test_heap_here();
  pthread_t t;   /* a second thread: the purge thread starts */
  ck_assert_int_eq(pthread_create(&t, NULL, bg_i_nothing, NULL), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
  for (int i = 0; i < N; i++)
    ck_assert_ptr_nonnull(v[i] = smalloc_malloc(SIZE));
  smalloc_stats_t a, c;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  for (int i = 0; i + 1 < N; i++)
    smalloc_free(v[i]);
  uint64_t want = PAGES - 2;
  for (long waited = 0; waited < BG_POLL_MAX_MS; waited += BG_POLL_MS) {
    ck_assert_int_eq(sm_test_snap(&c), 0);
    if (c.pages_purged - a.pages_purged >= want)
      break;
    bg_sleep_ms(BG_POLL_MS);
  }
  ck_assert_msg(c.pages_purged - a.pages_purged >= want, "%llu of %llu free pages purged after %d ms idle",
                (unsigned long long)(c.pages_purged - a.pages_purged), (unsigned long long)want,
                BG_POLL_MAX_MS);
  smalloc_free(v[N - 1]);
}
END_TEST

/* A thread that calls in now and then is never idle for a whole purge
 * delay, but its burst is over: the purge thread releases the pages that
 * have been retired for the delay all the same.  RETIRE_CYCLES is set so
 * high that the thread's own expiry never comes; a slow path every 10 ms
 * (100 blocks of 8 KiB, allocated and freed) keeps it from looking idle. */
START_TEST(a_burst_goes_back_while_its_thread_calls_in)
{
  enum { TICK_MS = 10, TICK_BLOCKS = 100, TICK_SIZE = 8192 };
  long cycles = smalloc_option_get(SMALLOC_OPTION_RETIRE_CYCLES);
  bg_on();
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, 1000000), 0);
  void *tick[TICK_BLOCKS];
  size_t rss0;
  void **v = bg_burst(&rss0);
  smalloc_stats_t a, b, c;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  long t0 = bg_ms();
  for (size_t i = 0; i < BG_BLOCKS; i++)
    smalloc_free(v[i]);
  bool long_frees = SM_TEST_SANITIZED || bg_ms() - t0 >= BG_DELAY_MS;
  ck_assert_int_eq(sm_test_snap(&b), 0);
  uint64_t retired = b.pages_retired - a.pages_retired;
  uint64_t slow = b.slow_path;
  size_t rss = sm_test_rss();
  /* A sanitizer or a loaded machine slows the frees above past the purge
   * delay (to seconds under a sanitizer), during which this heap
   * makes no slow-path step and looks idle: the purge thread may claim
   * every page retired so far and park before the last frees.  The pages
   * retired after that wait for it to wake, which takes 8 MiB of
   * them (smalloc(7)), as this thread's own expiry is off here.  Fewer
   * may stay there; none in a quick run. */
  uint64_t may_stay = long_frees ? BG_WAKE_BYTES / SM_TEST_SMALL_PAGE - 1 : 0;
  long waited;
  for (waited = 0; waited < BG_POLL_MAX_MS; waited += TICK_MS) {
    for (int i = 0; i < TICK_BLOCKS; i++)
      tick[i] = smalloc_malloc(TICK_SIZE);
    for (int i = 0; i < TICK_BLOCKS; i++)
      smalloc_free(tick[i]);
    ck_assert_int_eq(sm_test_snap(&c), 0);
    ck_assert_msg(c.slow_path > slow, "no slow path in a tick");
    slow = c.slow_path;
    rss = sm_test_rss();
    if (c.pages_claimed - a.pages_claimed + may_stay >= retired &&
        (SM_TEST_SANITIZED || rss <= rss0 + 10 * MiB))
      break;
    bg_sleep_ms(TICK_MS);
  }
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, cycles), 0);
  munmap(v, BG_BLOCKS * sizeof *v);
  ck_assert_uint_ge(retired, BG_BLOCKS * BG_SIZE / SM_TEST_SMALL_PAGE - 1);
  ck_assert_msg(c.pages_claimed - a.pages_claimed + may_stay >= retired,
                "the purge thread claimed %llu of the %llu retired pages in %ld ms",
                (unsigned long long)(c.pages_claimed - a.pages_claimed),
                (unsigned long long)retired, waited);
  ck_assert_msg(SM_TEST_SANITIZED || rss <= rss0 + 10 * MiB,
                "resident %zu MiB after %ld ms; %zu MiB before the burst", rss / MiB, waited,
                rss0 / MiB);
}
END_TEST

/* Many threads churn with frees across threads while the purge thread
 * stops and starts again and again (a purge delay of 10 ms): starting it
 * allocates (pthread_create takes the new thread's TLS vector from
 * malloc), and it must never happen inside a slow path, where the nested
 * malloc retired pages a sweep was walking (an internal assertion, abort,
 * in two of three 4-second runs of bench_xchurn 64 before the fix). */
enum { CH_THREADS = 64, CH_POOL = 4096, CH_HANDOFF = 4, CH_DRAIN = 32 };
static _Atomic(void *) ch_inbox[CH_THREADS];   /* stacks linked through word 0 */
static _Atomic int ch_stop;

static void ch_push(unsigned to, void *b)
{
  void *head = atomic_load(&ch_inbox[to]);
  do
    *(void **)b = head;
  while (!atomic_compare_exchange_weak(&ch_inbox[to], &head, b));
}

static void ch_drain(unsigned self)
{
  for (void *b = atomic_exchange(&ch_inbox[self], NULL); b;) {
    void *next = *(void **)b;
    smalloc_free(b);
    b = next;
  }
}

static void *churn_thread(void *arg)
{
  unsigned id = (unsigned)(uintptr_t)arg;
  sm_rng_t r;
  sm_rng_seed(&r, id + 1);
  static __thread void *pool[CH_POOL];
  for (int i = 0; i < CH_POOL; i++) {
    pool[i] = smalloc_malloc(sm_rng_range(&r, 16, 256));
    SM_CHILD_CHECK(pool[i] != NULL, "malloc failed");
  }
  for (unsigned long step = 0; !atomic_load_explicit(&ch_stop, memory_order_relaxed); step++) {
    size_t k = sm_rng_range(&r, 0, CH_POOL - 1);
    if (sm_rng_range(&r, 0, CH_HANDOFF - 1) == 0)
      ch_push((id + 1 + sm_rng_range(&r, 0, CH_THREADS - 2)) % CH_THREADS, pool[k]);
    else
      smalloc_free(pool[k]);
    pool[k] = smalloc_malloc(sm_rng_range(&r, 16, 256));
    SM_CHILD_CHECK(pool[k] != NULL, "malloc failed");
    if (step % CH_DRAIN == CH_DRAIN - 1)
      ch_drain(id);
  }
  for (int i = 0; i < CH_POOL; i++) smalloc_free(pool[i]);
  return NULL;
}

static void churn_with_restarts(void)
{
  SM_CHILD_CHECK(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 10) == 0, "option");
  SM_CHILD_CHECK(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 1) == 0, "option");
  pthread_t t[CH_THREADS];
  for (unsigned i = 0; i < CH_THREADS; i++)
    SM_CHILD_CHECK(pthread_create(&t[i], NULL, churn_thread, (void *)(uintptr_t)i) == 0,
                   "pthread_create");
  bg_sleep_ms(4000);
  atomic_store(&ch_stop, 1);
  for (unsigned i = 0; i < CH_THREADS; i++)
    SM_CHILD_CHECK(pthread_join(t[i], NULL) == 0, "pthread_join");
  for (unsigned i = 0; i < CH_THREADS; i++) ch_drain(i);
  /* what is checked: the process got here (the abort killed the child);
   * whether the purge thread started depends on the scheduling */
}

START_TEST(many_threads_churn_while_the_purge_thread_restarts)
{
  sm_test_in_child(churn_with_restarts);
}
END_TEST

/* Threads that exit leave sparse pages of medium blocks in the pool,
 * round after round, while the purge thread gives their free blocks'
 * memory back (a purge delay of 10 ms), a taker thread allocates blocks
 * of the same class all along (from those pages, when they have enough
 * free blocks) and main frees what the leavers kept (claiming their
 * pages).  Every live block keeps every byte it was given: the purge
 * touches free blocks only, and never one a thread took meanwhile. */
enum { LV_ROUNDS = 40, LV_LEAVERS = 2, LV_BLOCKS = 24, LV_KEEP = 4, LV_TAKE = 8,
       LV_SIZE = SM_TEST_REQUEST_FOR(81920) };
static void *lv_kept[LV_LEAVERS][LV_BLOCKS / LV_KEEP];
static _Atomic int lv_stop;

/* The block's own byte at every OS page of it, and at its end. */
static void lv_fill(void *b)
{
  unsigned char v = (unsigned char)((uintptr_t)b >> 12);
  for (size_t o = 0; o < LV_SIZE; o += 4096) ((unsigned char *)b)[o] = v;
  ((unsigned char *)b)[LV_SIZE - 1] = v;
}

static bool lv_intact(const void *b)
{
  unsigned char v = (unsigned char)((uintptr_t)b >> 12);
  for (size_t o = 0; o < LV_SIZE; o += 4096)
    if (((const unsigned char *)b)[o] != v) return false;
  return ((const unsigned char *)b)[LV_SIZE - 1] == v;
}

static void *lv_leaver(void *arg)
{
  void **kept = arg;
  void *v[LV_BLOCKS];
  for (int i = 0; i < LV_BLOCKS; i++) {
    v[i] = smalloc_malloc(LV_SIZE);
    SM_CHILD_CHECK(v[i] != NULL, "malloc failed");
    lv_fill(v[i]);
  }
  for (int i = 0; i < LV_BLOCKS; i++) {
    if (i % LV_KEEP == 0) kept[i / LV_KEEP] = v[i];
    else smalloc_free(v[i]);
  }
  return NULL;
}

static void *lv_taker(void *arg)
{
  (void)arg;
  void *v[LV_TAKE];
  while (!atomic_load(&lv_stop)) {
    for (int i = 0; i < LV_TAKE; i++) {
      v[i] = smalloc_malloc(LV_SIZE);
      SM_CHILD_CHECK(v[i] != NULL, "malloc failed");
      lv_fill(v[i]);
    }
    bg_sleep_ms(1);
    for (int i = 0; i < LV_TAKE; i++) {
      SM_CHILD_CHECK(lv_intact(v[i]), "a block the taker held lost its bytes");
      smalloc_free(v[i]);
    }
  }
  return NULL;
}

static void leavers_and_takers(void)
{
  SM_CHILD_CHECK(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 10) == 0, "option");
  SM_CHILD_CHECK(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 1) == 0, "option");
  smalloc_free(smalloc_malloc(16));   /* main's heap, to claim pages with */
  pthread_t taker, t[LV_LEAVERS];
  SM_CHILD_CHECK(pthread_create(&taker, NULL, lv_taker, NULL) == 0, "pthread_create");
  for (int round = 0; round < LV_ROUNDS; round++) {
    for (int k = 0; k < LV_LEAVERS; k++)
      SM_CHILD_CHECK(pthread_create(&t[k], NULL, lv_leaver, lv_kept[k]) == 0, "pthread_create");
    for (int k = 0; k < LV_LEAVERS; k++) SM_CHILD_CHECK(pthread_join(t[k], NULL) == 0, "pthread_join");
    bg_sleep_ms(round % 3 * 10);   /* some pages purged before main frees into them, some not */
    for (int k = 0; k < LV_LEAVERS; k++) {
      for (int i = 0; i < LV_BLOCKS / LV_KEEP; i++) {
        SM_CHILD_CHECK(lv_intact(lv_kept[k][i]), "a block an exited thread left lost its bytes");
        smalloc_free(lv_kept[k][i]);
      }
    }
  }
  atomic_store(&lv_stop, 1);
  SM_CHILD_CHECK(pthread_join(taker, NULL) == 0, "pthread_join");
}

START_TEST(threads_leave_sparse_pages_while_the_purge_thread_gives_them_back)
{
  sm_test_in_child(leavers_and_takers);
}
END_TEST

static Suite *background_suite(void)
{
  Suite *s = suite_create("background");
  TCase *tc = sm_tcase("background", 300);
  tcase_add_test(tc, idle_small_blocks_go_back_without_a_call);
  tcase_add_test(tc, blocks_freed_for_an_idle_thread_go_back_without_a_call);
  tcase_add_test(tc, many_idle_threads_small_bursts_go_back_without_a_call);
  tcase_add_test(tc, blocks_freed_slowly_for_an_idle_thread_go_back_without_a_call);
  tcase_add_test(tc, idle_huge_block_goes_back_without_a_call);
  tcase_add_test(tc, idle_large_blocks_go_back_without_a_call);
  tcase_add_test(tc, a_burst_goes_back_while_its_thread_calls_in);
  tcase_add_test(tc, purge_thread_parks_when_done);
  tcase_add_test(tc, an_idle_threads_remote_frees_are_sent_without_a_call);
  tcase_add_test(tc, threads_come_and_go_while_the_purge_thread_works);
  tcase_add_test(tc, the_heaps_of_exited_threads_go_back_without_a_call);
  tcase_add_test(tc, background_off_starts_no_thread);
  tcase_add_test(tc, background_off_stops_the_thread_and_on_starts_another);
  tcase_add_test(tc, fork_while_purging);
#ifdef SM_OVERRIDE
  tcase_add_test(tc, purge_thread_steps_aside_for_unshare_and_setns);
#endif
  tcase_add_test(tc, free_pages_of_a_live_segment_go_back);
  tcase_add_test(tc, free_pages_of_a_thread_going_idle_go_back);
  tcase_add_test(tc, the_process_exits_when_its_last_thread_calls_pthread_exit);
  tcase_add_test(tc, the_purge_thread_stays_while_a_thread_without_a_heap_runs);
  tcase_add_test(tc, the_process_exits_while_io_uring_threads_run);
  tcase_add_test(tc, exit_handlers_run_with_the_programs_signal_mask_and_stack);
  tcase_add_test(tc, a_child_forked_by_a_thread_exits_with_its_last_thread);
  tcase_add_test(tc, memory_used_again_within_the_purge_delay_doubles_it);
  tcase_add_test(tc, memory_used_again_after_the_purge_delay_leaves_it);
  tcase_add_test(tc, memory_that_trim_gave_back_leaves_the_purge_delay);
  tcase_add_test(tc, the_purge_delay_doubles_at_most_three_times);
  tcase_add_test(tc, the_purge_delay_halves_after_a_calm_spell);
  tcase_add_test(tc, free_pages_of_an_exited_threads_segment_go_back);
  tcase_add_test(tc, free_blocks_of_an_exited_threads_sparse_pages_go_back);
  tcase_add_test(tc, threads_leave_sparse_pages_while_the_purge_thread_gives_them_back);
  tcase_add_test(tc, many_threads_churn_while_the_purge_thread_restarts);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  return sm_run_suite(background_suite());
}
