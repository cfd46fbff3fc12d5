/* fork() while other threads allocate: the child can allocate at once, free
 * blocks of threads that do not exist in it, and start threads of its own. */
#include "common.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>

enum { CHURNERS = 3, KEPT = 300, RING = 64, FORKS = 20, THREAD_FORKS = 5 };

typedef struct block {
  unsigned char *p;
  size_t n;
  uint64_t seed;
} block_t;

static block_t kept[CHURNERS + 1][KEPT]; /* [CHURNERS] is the main thread's */
static atomic_int ready, stop;
static atomic_ulong churn_failures, churn_ops;

static size_t random_size(sm_rng_t *r)
{
  size_t k = sm_rng_below(r, 1000);
  if (k < 850)
    return sm_rng_range(r, 0, 512);
  if (k < 990)
    return sm_rng_range(r, 513, 64 * KiB);
  if (k < 998)
    return sm_rng_range(r, 64 * KiB + 1, 1 * MiB);
  return sm_rng_range(r, 2 * MiB + 1, 4 * MiB);
}

static size_t fill_len(size_t n)
{
  return n < 8192 ? n : 8192;
}

static bool make_block(block_t *b, sm_rng_t *r, uint64_t gen)
{
  b->n = random_size(r);
  b->p = smalloc_malloc(b->n);
  if (!b->p)
    return false;
  b->seed = sm_pattern_seed(b->p, gen);
  sm_pattern_fill(b->p, fill_len(b->n), b->seed);
  return true;
}

static bool block_ok(const block_t *b)
{
  return sm_pattern_ok(b->p, fill_len(b->n), b->seed);
}

static void *churner(void *arg)
{
  unsigned id = (unsigned)(uintptr_t)arg;
  sm_rng_t r;
  block_t ring[RING] = {{0}};
  sm_rng_seed(&r, 99 + id);
  for (int i = 0; i < KEPT; i++)
    if (!make_block(&kept[id][i], &r, (uint64_t)i))
      atomic_fetch_add(&churn_failures, 1);
  atomic_fetch_add(&ready, 1);
  uint64_t gen = 1000;
  while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
    block_t *b = &ring[sm_rng_below(&r, RING)];
    if (b->p) {
      if (!block_ok(b))
        atomic_fetch_add(&churn_failures, 1);
      if (sm_rng_below(&r, 8) == 0) {
        size_t n = random_size(&r) + 1; /* realloc(p, 0) would free */
        unsigned char *q = smalloc_realloc(b->p, n);
        if (!q || !sm_pattern_ok(q, fill_len(n < b->n ? n : b->n), b->seed)) {
          atomic_fetch_add(&churn_failures, 1);
          b->p = NULL;
          continue;
        }
        smalloc_free(q);
      } else {
        smalloc_free(b->p);
      }
      b->p = NULL;
    } else if (!make_block(b, &r, gen++)) {
      atomic_fetch_add(&churn_failures, 1);
    }
    atomic_fetch_add_explicit(&churn_ops, 1, memory_order_relaxed);
  }
  for (int i = 0; i < RING; i++)
    if (ring[i].p)
      smalloc_free(ring[i].p);
  return NULL;
}

/* ---- in the child -------------------------------------------------------------------
 * No libcheck here: the child reports through its exit status and a line on
 * stderr. */

static int child_fail(const char *what)
{
  fprintf(stderr, "fork child %d: %s\n", (int)getpid(), what);
  return 1;
}

static block_t child_blocks[2000];

static void *child_thread(void *arg)
{
  sm_rng_t r;
  block_t ring[RING] = {{0}};
  sm_rng_seed(&r, (uint64_t)(uintptr_t)arg);
  /* free the child main thread's blocks: a cross-thread free in the child */
  for (size_t i = 1; i < sizeof child_blocks / sizeof child_blocks[0]; i += 2) {
    if (!block_ok(&child_blocks[i]))
      return (void *)"child thread: block of the child's main thread changed";
    smalloc_free(child_blocks[i].p);
    child_blocks[i].p = NULL;
  }
  for (int k = 0; k < 5000; k++) {
    block_t *b = &ring[sm_rng_below(&r, RING)];
    if (b->p) {
      if (!block_ok(b))
        return (void *)"child thread: block changed";
      smalloc_free(b->p);
      b->p = NULL;
    } else if (!make_block(b, &r, (uint64_t)k)) {
      return (void *)"child thread: malloc failed";
    }
  }
  for (int i = 0; i < RING; i++)
    smalloc_free(ring[i].p);
  return NULL;
}

static int child_main(unsigned nr)
{
  alarm(20); /* a deadlocked child dies of SIGALRM, which the parent reports */
  /* blocks of every thread of the parent, the forking one included */
  for (int t = 0; t <= CHURNERS; t++)
    for (int i = 0; i < KEPT; i++) {
      if (!kept[t][i].p)
        return child_fail("a kept block is missing");
      if (!block_ok(&kept[t][i]))
        return child_fail("a block inherited from the parent changed");
      if (i % 2 == (int)(nr % 2))
        smalloc_free(kept[t][i].p);
    }
  sm_rng_t r;
  sm_rng_seed(&r, 5000 + nr);
  size_t n = sizeof child_blocks / sizeof child_blocks[0];
  for (size_t i = 0; i < n; i++)
    if (!make_block(&child_blocks[i], &r, i))
      return child_fail("malloc failed");
  pthread_t t;
  if (pthread_create(&t, NULL, child_thread, (void *)(uintptr_t)nr) != 0)
    return child_fail("pthread_create failed");
  void *res;
  if (pthread_join(t, &res) != 0)
    return child_fail("pthread_join failed");
  if (res)
    return child_fail(res);
  for (size_t i = 0; i < n; i += 2) {
    if (!block_ok(&child_blocks[i]))
      return child_fail("a block of the child changed");
    smalloc_free(child_blocks[i].p);
  }
  void *p = smalloc_malloc(100);
  if (!p)
    return child_fail("malloc after the thread failed");
  smalloc_free(p);
  return 0;
}

/* ---- in the parent ---------------------------------------------------------------------- */

static pid_t fork_child(unsigned nr)
{
  fflush(NULL);
  pid_t pid = fork();
  if (pid == 0) {
    /* _exit: a leak checker at exit() would scan only this thread's stack
     * and report the parent's blocks that other threads' stacks hold. */
    int rc = child_main(nr);
    fflush(NULL);
    _exit(rc);
  }
  return pid;
}

/* Returns NULL, or what went wrong. */
static const char *wait_child(pid_t pid, char *buf, size_t len)
{
  int status;
  if (pid < 0)
    return "fork failed";
  if (waitpid(pid, &status, 0) != pid)
    return "waitpid failed";
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
    return NULL;
  if (WIFSIGNALED(status))
    snprintf(buf, len, "child %d killed by signal %d%s", (int)pid, WTERMSIG(status),
             WTERMSIG(status) == SIGALRM ? " (deadlocked)" : "");
  else
    snprintf(buf, len, "child %d exited with %d", (int)pid, WEXITSTATUS(status));
  return buf;
}

static void *forking_thread(void *arg)
{
  static char buf[128];
  (void)arg;
  for (unsigned i = 0; i < THREAD_FORKS; i++) {
    const char *err = wait_child(fork_child(100 + i), buf, sizeof buf);
    if (err)
      return (void *)err;
    usleep(1000);
  }
  return NULL;
}

static void start_churners(pthread_t *t)
{
  atomic_store(&ready, 0);
  atomic_store(&stop, 0);
  atomic_store(&churn_failures, 0);
  atomic_store(&churn_ops, 0);
  for (int i = 0; i < CHURNERS; i++)
    ck_assert_int_eq(pthread_create(&t[i], NULL, churner, (void *)(uintptr_t)i), 0);
  while (atomic_load(&ready) < CHURNERS)
    usleep(100);
}

static void stop_churners(pthread_t *t)
{
  atomic_store(&stop, 1);
  for (int i = 0; i < CHURNERS; i++)
    ck_assert_int_eq(pthread_join(t[i], NULL), 0);
  unsigned long failures = atomic_load(&churn_failures);
  ck_assert_msg(failures == 0, "%lu failures in churning threads", failures);
}

static void make_main_kept(void)
{
  sm_rng_t r;
  sm_rng_seed(&r, 4);
  for (int i = 0; i < KEPT; i++)
    ck_assert(make_block(&kept[CHURNERS][i], &r, (uint64_t)i));
}

static void free_all_kept(void)
{
  for (int t = 0; t <= CHURNERS; t++)
    for (int i = 0; i < KEPT; i++) {
      SM_CHECK(block_ok(&kept[t][i]), "kept block %d of thread %d changed", i, t);
      smalloc_free(kept[t][i].p);
      kept[t][i].p = NULL;
    }
}

START_TEST(fork_while_threads_allocate)
{
  pthread_t t[CHURNERS];
  char buf[128];
  make_main_kept();
  start_churners(t);
  for (unsigned i = 0; i < FORKS; i++) {
    unsigned long ops = atomic_load(&churn_ops);
    pid_t pid = fork_child(i);
    const char *err = wait_child(pid, buf, sizeof buf);
    ck_assert_msg(err == NULL, "fork %u: %s", i, err);
    /* let the churners get back into the allocator before the next fork */
    while (atomic_load(&churn_ops) < ops + 200)
      usleep(200);
  }
  unsigned long ops = atomic_load(&churn_ops);
  stop_churners(t);
  ck_assert_uint_gt(ops, 1000);
  /* the parent's heap is fine too */
  void *p = smalloc_malloc(1000);
  ck_assert_ptr_nonnull(p);
  smalloc_free(p);
  free_all_kept();
}
END_TEST

START_TEST(fork_from_a_thread)
{
  pthread_t t[CHURNERS], f;
  void *res;
  make_main_kept();
  start_churners(t);
  ck_assert_int_eq(pthread_create(&f, NULL, forking_thread, NULL), 0);
  ck_assert_int_eq(pthread_join(f, &res), 0);
  ck_assert_msg(res == NULL, "%s", (const char *)res);
  stop_churners(t);
  free_all_kept();
}
END_TEST

START_TEST(forked_children_fork_again)
{
  /* a child that forks again: the handlers leave the allocator usable in
   * every generation */
  pthread_t t[CHURNERS];
  char buf[128];
  make_main_kept();
  start_churners(t);
  fflush(NULL);
  pid_t pid = fork();
  if (pid == 0) {
    alarm(30);
    for (unsigned i = 0; i < 3; i++) {
      pid_t g = fork_child(200 + i);
      if (wait_child(g, buf, sizeof buf))
        _exit(child_fail(buf));
    }
    _exit(child_main(300));
  }
  const char *err = wait_child(pid, buf, sizeof buf);
  ck_assert_msg(err == NULL, "%s", err);
  stop_churners(t);
  free_all_kept();
}
END_TEST

/* ============================================================================
 * fork against the C library's own locks (tests bounded by alarm: a
 * deadlock fails the test by SIGALRM instead of hanging CI).
 *
 * Three threads: one holds a FILE's lock while it allocates (as getline
 * does; smalloc_malloc of a large block takes smalloc's segment cache
 * lock), one flushes every stream (fflush(NULL) takes the stream list
 * lock, then each FILE's), one forks.  A prepare handler that took
 * smalloc's locks before glibc takes the list lock would deadlock them. */

static FILE *stdio_file;
static atomic_int stdio_stop;

static void *stdio_reader(void *arg)
{
  (void)arg;
  char *line = NULL;
  size_t cap = 0;
  while (!atomic_load(&stdio_stop)) {
    flockfile(stdio_file);
    void *big = smalloc_malloc(300000);   /* under the FILE lock */
    rewind(stdio_file);
    ssize_t n = getline(&line, &cap, stdio_file);
    funlockfile(stdio_file);
    if (big == NULL || n <= 0)
      break;
    smalloc_free(big);
  }
  free(line);
  return NULL;
}

static void *stdio_flusher(void *arg)
{
  (void)arg;
  while (!atomic_load(&stdio_stop))
    fflush(NULL);
  return NULL;
}

START_TEST(fork_while_threads_use_stdio)
{
#if SM_TEST_TSAN
  /* ThreadSanitizer's own fork handling holds its allocator's locks
   * across fork while other threads allocate through it (getline): that
   * hangs without smalloc, so this test does not run there. */
  return;
#endif
  alarm(40);
  stdio_file = tmpfile();
  ck_assert_ptr_nonnull(stdio_file);
  fputs("a line for getline\n", stdio_file);
  fflush(stdio_file);
  pthread_t r, f;
  ck_assert_int_eq(pthread_create(&r, NULL, stdio_reader, NULL), 0);
  ck_assert_int_eq(pthread_create(&f, NULL, stdio_flusher, NULL), 0);
  time_t end = time(NULL) + 3;
  int forks = 0;
  while (time(NULL) < end) {
    pid_t pid = fork();
    ck_assert_msg(pid >= 0, "fork: %s", strerror(errno));
    if (pid == 0) {
      alarm(10);
      void *p = smalloc_malloc(300000), *q = smalloc_malloc(40);
      _exit(p && q ? 0 : 1);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0)
      ck_assert_int_eq(errno, EINTR);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child %d: status %#x", forks,
                  status);
    forks++;
  }
  atomic_store(&stdio_stop, 1);
  pthread_join(r, NULL);
  pthread_join(f, NULL);
  fclose(stdio_file);
  alarm(0);
  ck_assert_int_gt(forks, 10);
}
END_TEST

/* One thread: a SIGALRM handler forks while the main flow forks (and
 * allocates) in a loop; a lock held by fork's prepare step would be taken
 * again by the handler's fork.  The handler's children exit at once. */
static atomic_int handler_forks;

static void forking_handler(int sig)
{
  (void)sig;
  int saved = errno;
  pid_t pid = fork();
  if (pid == 0)
    _exit(0);
  if (pid > 0)
    atomic_fetch_add(&handler_forks, 1);
  errno = saved;
}

START_TEST(fork_from_a_signal_handler_during_fork)
{
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = forking_handler;
  sa.sa_flags = SA_RESTART;
  ck_assert_int_eq(sigaction(SIGALRM, &sa, NULL), 0);
  /* every 2 ms, or every four forks' time where a fork costs more: under
   * ThreadSanitizer, on a kernel that gives its shadow memory a page for
   * every read, a fork took a good part of a second, and a handler that
   * forked every 2 ms left the main flow two forks in 3 s */
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  pid_t first = fork();
  if (first == 0)
    _exit(0);
  ck_assert_int_gt(first, 0);
  while (waitpid(first, NULL, 0) < 0)
    ck_assert_int_eq(errno, EINTR);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  long fork_us = (t1.tv_sec - t0.tv_sec) * 1000000L + (t1.tv_nsec - t0.tv_nsec) / 1000;
  long period = fork_us * 4 > 2000 ? fork_us * 4 : 2000;
  struct itimerval it = {{period / 1000000, period % 1000000}, {period / 1000000, period % 1000000}};
  ck_assert_int_eq(setitimer(ITIMER_REAL, &it, NULL), 0);
  /* 3 s, and at least 11 forks where they are slow (within 40 s) */
  time_t end = time(NULL) + 3, last = time(NULL) + 40;
  int forks = 0;
  while ((time(NULL) < end || forks <= 10) && time(NULL) < last) {
    void *keep = smalloc_malloc(64);
    pid_t pid = fork();
    if (pid < 0 && errno == EAGAIN)
      continue;
    ck_assert_msg(pid >= 0, "fork: %s", strerror(errno));
    if (pid == 0) {
      struct itimerval off = {{0, 0}, {0, 0}};
      setitimer(ITIMER_REAL, &off, NULL);
      void *p = smalloc_malloc(100);
      smalloc_free(p);
      smalloc_free(keep);
      _exit(p ? 0 : 1);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0)
      ck_assert_int_eq(errno, EINTR);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child %d: status %#x", forks,
                  status);
    while (waitpid(-1, NULL, WNOHANG) > 0) {   /* the handler's children */
    }
    smalloc_free(keep);
    forks++;
  }
  struct itimerval off = {{0, 0}, {0, 0}};
  setitimer(ITIMER_REAL, &off, NULL);
  while (waitpid(-1, NULL, 0) > 0) {
  }
  ck_assert_int_gt(forks, 10);
  ck_assert_int_gt(atomic_load(&handler_forks), 0);
}
END_TEST

/* ============================================================================
 * malloc_stats from a thread with a cancel request pending prints the
 * whole report (its writes are cancellation points) and the thread is
 * cancelled afterwards. */

static atomic_int cancel_requested;

static void *stats_printer(void *arg)
{
  (void)arg;
  pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
  while (!atomic_load(&cancel_requested)) {
  }
  pthread_setcancelstate(PTHREAD_CANCEL_ENABLE, NULL);   /* not a cancellation point */
  smalloc_malloc_stats();
  pthread_testcancel();
  return NULL;
}

START_TEST(malloc_stats_survives_cancellation)
{
  alarm(20);
  fflush(stderr);
  FILE *out = tmpfile();
  ck_assert_ptr_nonnull(out);
  int saved = dup(STDERR_FILENO);
  ck_assert_int_ge(saved, 0);
  ck_assert_int_ge(dup2(fileno(out), STDERR_FILENO), 0);
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, stats_printer, NULL), 0);
  ck_assert_int_eq(pthread_cancel(t), 0);
  atomic_store(&cancel_requested, 1);
  void *ret;
  ck_assert_int_eq(pthread_join(t, &ret), 0);
  fflush(stderr);
  dup2(saved, STDERR_FILENO);
  close(saved);
  ck_assert_msg(ret == PTHREAD_CANCELED, "the thread was not cancelled");
  char buf[1024];
  rewind(out);
  size_t n = fread(buf, 1, sizeof buf - 1, out);
  buf[n] = '\0';
  fclose(out);
  ck_assert_msg(strstr(buf, "Arena 0:") != NULL && strstr(buf, "max mmap bytes") != NULL,
                "malloc_stats wrote:\n%s", buf);
}
END_TEST

int main(void)
{
  Suite *s = suite_create("fork");
  TCase *tc = sm_tcase("fork", 60);
  tcase_add_test(tc, fork_while_threads_allocate);
  tcase_add_test(tc, fork_from_a_thread);
  tcase_add_test(tc, forked_children_fork_again);
  tcase_add_test(tc, fork_while_threads_use_stdio);
  tcase_add_test(tc, fork_from_a_signal_handler_during_fork);
  tcase_add_test(tc, malloc_stats_survives_cancellation);
  suite_add_tcase(s, tc);
  return sm_run_suite(s);
}
