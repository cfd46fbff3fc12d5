/* Heap misuse: double frees, pointers smalloc never handed out, a corrupted
 * free list.  Every misuse runs in a child process whose stderr is captured.
 * By default the child must print the documented diagnostic line and die
 * of SIGABRT; with SMALLOC_OPTION_ON_ERROR = 1 (warn) it must print the
 * same line and go on, the offending block leaked and every allocation
 * after it still sound.
 *
 * The child announces the exact line it expects on a second pipe (only the
 * child knows the addresses), and reports a failed check of its own on
 * stderr with exit status 1: libcheck's assertions belong to the test
 * process, not to its children. */
#include "common.h"

#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>

typedef void (*misuse_fn)(bool warn);

typedef struct outcome {
  int status;        /* from waitpid */
  char err[16384];   /* the child's stderr */
  char expect[512];  /* the line the child announced, without its newline */
  bool prefix;       /* expect is a prefix of the line, not all of it */
} outcome_t;

/* ---- child side ------------------------------------------------------------ */

static int expect_fd = -1;

static void child_write(int fd, const char *s, size_t n)
{
  while (n > 0) {
    ssize_t w = write(fd, s, n);
    if (w <= 0)
      return;
    s += w;
    n -= (size_t)w;
  }
}

/* Failure of a check in the child: one line on stderr, exit status 1. */
static void __attribute__((noreturn, format(printf, 1, 2)))
child_fail(const char *fmt, ...)
{
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
  va_end(ap);
  if (n < 0)
    n = 0;
  if ((size_t)n > sizeof buf - 2)
    n = (int)sizeof buf - 2;
  buf[n++] = '\n';
  child_write(STDERR_FILENO, "CHILD CHECK FAILED: ", 20);
  child_write(STDERR_FILENO, buf, (size_t)n);
  _exit(1);
}

#define CHILD_CHECK(expr, fmt, ...)                                            \
  do {                                                                         \
    if (!(expr))                                                               \
      child_fail("'%s' (line %d): " fmt, #expr, __LINE__, ##__VA_ARGS__);      \
  } while (0)

/* Announce the whole diagnostic line (without "smalloc: ") the misuse that
 * follows must print.  A leading '^' marks a prefix. */
static void __attribute__((format(printf, 1, 2))) expect_line(const char *fmt, ...)
{
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n > 0)
    child_write(expect_fd, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

/* Misuses the child's case commits (in the child: a case may change it);
 * 0: one or more (a write that damages a neighbour too). */
static unsigned child_misuses = 1;

static uint64_t child_errors_reported(void)
{
  smalloc_stats_t s;
  memset(&s, 0, sizeof s);
  s.size = sizeof s;
  CHILD_CHECK(smalloc_stats_get(&s) == 0, "smalloc_stats_get failed");
  return s.errors_reported;
}

/* Where the blocks of small block p's page start, as the corrupted-list
 * message names the page: after the segment header in page 0. */
static void *page_start_of(const void *p)
{
  uintptr_t page = (uintptr_t)p & ~(uintptr_t)(SM_TEST_SMALL_PAGE - 1);
  uintptr_t seg = (uintptr_t)p & ~(uintptr_t)(4 * MiB - 1);
  return (void *)(page == seg ? seg + SM_TEST_SEGMENT_HDR : page);
}

/* Calls answered with an error. */
static uint64_t child_calls_failed(void)
{
  smalloc_stats_t s;
  memset(&s, 0, sizeof s);
  s.size = sizeof s;
  CHILD_CHECK(smalloc_stats_get(&s) == 0, "smalloc_stats_get failed");
  return s.calls_failed;
}

/* Pages held for blocks of size bytes. */
static uint64_t child_class_pages(size_t size)
{
  smalloc_stats_t s;
  memset(&s, 0, sizeof s);
  s.size = sizeof s;
  CHILD_CHECK(smalloc_stats_get(&s) == 0, "smalloc_stats_get failed");
  for (uint32_t c = 0; c < s.nclasses; c++)
    if (s.classes[c].block_size == size) return s.classes[c].pages_in_use;
  return UINT64_MAX;
}

static uint64_t child_blocks_in_use(void)
{
  smalloc_stats_t s;
  memset(&s, 0, sizeof s);
  s.size = sizeof s;
  CHILD_CHECK(smalloc_stats_get(&s) == 0, "smalloc_stats_get failed");
  return s.blocks_in_use;
}

/* After a reported misuse in warn mode: the next 10,000 allocations (a
 * third of the given size, or one in 300 when it is above 64 KiB; the
 * others up to 2 KiB and now and then up to 600 KB) are distinct,
 * disjoint, writable, keep their contents, and are freed without
 * complaint. */
static void heap_still_sound(size_t size)
{
  enum { N = 10000 };
  static unsigned char *p[N];
  static size_t n[N];
  static sm_interval_t iv[N];
  sm_rng_t r;
  sm_rng_seed(&r, 4242);
  uint64_t before = child_blocks_in_use();
  size_t every = size > 64 * KiB ? 300 : 3;
  for (size_t i = 0; i < N; i++) {
    n[i] = i % every == 0 ? size
           : i % 3 == 1 ? sm_rng_range(&r, 1, 512)
           : i % 600 == 2 ? sm_rng_range(&r, 1, 600000)
                          : sm_rng_range(&r, 1, 2048);
    p[i] = smalloc_malloc(n[i]);
    CHILD_CHECK(p[i] != NULL, "malloc(%zu) failed", n[i]);
    CHILD_CHECK(sm_is_aligned(p[i], 16), "malloc(%zu) = %p", n[i], (void *)p[i]);
    CHILD_CHECK(smalloc_malloc_usable_size(p[i]) >= n[i], "usable size of %p", (void *)p[i]);
    sm_pattern_fill(p[i], n[i], sm_pattern_seed(p[i], i));
    iv[i].lo = (uintptr_t)p[i];
    iv[i].hi = (uintptr_t)p[i] + n[i];
  }
  CHILD_CHECK(child_blocks_in_use() == before + N, "blocks_in_use %llu, want %llu",
              (unsigned long long)child_blocks_in_use(), (unsigned long long)(before + N));
  for (size_t i = 0; i < N; i++) {
    size_t bad = sm_pattern_find_bad(p[i], n[i], sm_pattern_seed(p[i], i));
    CHILD_CHECK(bad == SIZE_MAX, "block %p (%zu bytes) changed at offset %zu",
                (void *)p[i], n[i], bad);
  }
  size_t k = sm_intervals_overlap(iv, N);
  CHILD_CHECK(k == 0, "blocks [%#lx, %#lx) and [%#lx, %#lx) overlap",
              (unsigned long)iv[k - 1].lo, (unsigned long)iv[k - 1].hi,
              (unsigned long)iv[k].lo, (unsigned long)iv[k].hi);
  for (size_t i = 0; i < N; i++)
    smalloc_free(p[i]);
  CHILD_CHECK(child_blocks_in_use() == before, "blocks_in_use %llu after freeing, want %llu",
              (unsigned long long)child_blocks_in_use(), (unsigned long long)before);
}

/* ---- parent side ------------------------------------------------------------ */

static size_t read_all(int fd, char *buf, size_t cap)
{
  size_t len = 0;
  for (;;) {
    char sink[4096];
    char *dst = len + 1 < cap ? buf + len : sink;
    size_t room = len + 1 < cap ? cap - 1 - len : sizeof sink;
    ssize_t r = read(fd, dst, room);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    if (dst == buf + len)
      len += (size_t)r;
  }
  buf[len] = '\0';
  return len;
}

static void run_child(misuse_fn fn, bool warn, outcome_t *o)
{
  int errp[2], expp[2];
  memset(o, 0, sizeof *o);
  ck_assert_int_eq(pipe(errp), 0);
  ck_assert_int_eq(pipe(expp), 0);
  fflush(NULL);
  pid_t pid = fork();
  ck_assert_msg(pid >= 0, "fork: %s", strerror(errno));
  if (pid == 0) {
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);   /* the aborts are expected */
    signal(SIGABRT, SIG_DFL);
    alarm(30);
    close(errp[0]);
    close(expp[0]);
    if (dup2(errp[1], STDERR_FILENO) < 0)
      _exit(3);
    close(errp[1]);
    expect_fd = expp[1];
    /* the environment may say otherwise: each case picks its mode */
    if (smalloc_option_set(SMALLOC_OPTION_ON_ERROR, warn ? 1 : 0) != 0)
      child_fail("smalloc_option_set(SMALLOC_OPTION_ON_ERROR, %d) failed", warn);
    uint64_t errors = child_errors_reported();
    fn(warn);
    /* in warn mode: every misuse counted once */
    CHILD_CHECK(child_misuses == 0 ? child_errors_reported() > errors
                                   : child_errors_reported() == errors + child_misuses,
                "errors_reported went from %llu to %llu, want +%u", (unsigned long long)errors,
                (unsigned long long)child_errors_reported(), child_misuses);
    _exit(0);
  }
  close(errp[1]);
  close(expp[1]);
  /* the announced line is short and written first: it fits in the pipe */
  read_all(errp[0], o->err, sizeof o->err);
  read_all(expp[0], o->expect, sizeof o->expect);
  close(errp[0]);
  close(expp[0]);
  while (waitpid(pid, &o->status, 0) < 0)
    ck_assert_msg(errno == EINTR, "waitpid: %s", strerror(errno));
  if (o->expect[0] == '^') {
    o->prefix = true;
    memmove(o->expect, o->expect + 1, strlen(o->expect));
  }
}

/* Lines of err that are the diagnostic: the whole line, or a line that
 * starts with it when only a prefix was announced. */
static unsigned count_lines(const outcome_t *o)
{
  char want[600];
  unsigned hits = 0;
  snprintf(want, sizeof want, "smalloc: %s", o->expect);
  size_t wn = strlen(want);
  for (const char *line = o->err; *line;) {
    const char *end = strchr(line, '\n');
    size_t len = end ? (size_t)(end - line) : strlen(line);
    if (strncmp(line, want, wn) == 0 && (o->prefix || len == wn))
      hits++;
    line += len + (end != NULL);
  }
  return hits;
}

static const char *describe(int status, char *buf, size_t cap)
{
  if (WIFEXITED(status))
    snprintf(buf, cap, "exited with status %d", WEXITSTATUS(status));
  else if (WIFSIGNALED(status))
    snprintf(buf, cap, "killed by signal %d (%s)", WTERMSIG(status),
             strsignal(WTERMSIG(status)));
  else
    snprintf(buf, cap, "status %#x", status);
  return buf;
}

static void expect_abort(const char *name, misuse_fn fn)
{
  outcome_t o;
  char st[64];
  run_child(fn, false, &o);
  ck_assert_msg(o.expect[0] != '\0', "%s: the child announced no diagnostic (%s); stderr:\n%s",
                name, describe(o.status, st, sizeof st), o.err);
  ck_assert_msg(WIFSIGNALED(o.status) && WTERMSIG(o.status) == SIGABRT,
                "%s: the child %s, not SIGABRT; stderr:\n%s", name,
                describe(o.status, st, sizeof st), o.err);
  ck_assert_msg(count_lines(&o) == 1, "%s: expected the line 'smalloc: %s%s' once; stderr:\n%s",
                name, o.expect, o.prefix ? "..." : "", o.err);
}

static void expect_warning(const char *name, misuse_fn fn)
{
  outcome_t o;
  char st[64];
  run_child(fn, true, &o);
  ck_assert_msg(o.expect[0] != '\0', "%s: the child announced no diagnostic (%s); stderr:\n%s",
                name, describe(o.status, st, sizeof st), o.err);
  ck_assert_msg(WIFEXITED(o.status) && WEXITSTATUS(o.status) == 0,
                "%s (warn): the child %s; stderr:\n%s", name,
                describe(o.status, st, sizeof st), o.err);
  ck_assert_msg(count_lines(&o) == 1,
                "%s (warn): expected the line 'smalloc: %s%s' once; stderr:\n%s", name,
                o.expect, o.prefix ? "..." : "", o.err);
  ck_assert_msg(strstr(o.err, "abort") == NULL, "%s (warn): talks of aborting:\n%s", name,
                o.err);
}

/* Two tests per misuse: it aborts by default, and with warn it reports and
 * the process goes on. */
#define MISUSE(name)                                                           \
  START_TEST(name##_aborts) { expect_abort(#name, name); }                     \
  END_TEST                                                                     \
  START_TEST(name##_warns_and_goes_on) { expect_warning(#name, name); }        \
  END_TEST

#define ADD_MISUSE(tc, name)                                                   \
  do {                                                                         \
    tcase_add_test(tc, name##_aborts);                                         \
    tcase_add_test(tc, name##_warns_and_goes_on);                              \
  } while (0)

/* ---- the misuses --------------------------------------------------------------- */

/* A block freed, bytes [stale, stale + 8) written over when stale >= 0,
 * then freed again at once. */
static void double_free_of_the_last(bool warn, size_t size, int stale)
{
  unsigned char *p = smalloc_malloc(size);
  CHILD_CHECK(p != NULL, "malloc(%zu) failed", size);
  smalloc_free(p);
  /* before the write: while a free block is written over, the blocks of
   * its list from there on count as in use (smalloc_stats(3)) */
  uint64_t in_use = child_blocks_in_use();
  if (stale >= 0)
    memset(sm_opaque(p) + stale, 0x41, 8);
  expect_line("free(): double free of %p", (void *)p);
  smalloc_free(sm_opaque(p));
  if (!warn)
    return;
  CHILD_CHECK(child_blocks_in_use() == in_use, "the second free was counted");
  heap_still_sound(size);
}

static void double_free_at_once(bool warn)
{
  double_free_of_the_last(warn, 32, -1);
}
MISUSE(double_free_at_once)

/* Other blocks of the page freed in between: the block is deeper in the
 * page's local list, its link points to another free block. */
static void double_free_after_other_frees(bool warn)
{
  enum { N = 64 };
  unsigned char *a[N];
  for (int i = 0; i < N; i++) {
    a[i] = smalloc_malloc(48);
    CHILD_CHECK(a[i] != NULL, "malloc(48) failed");
  }
  smalloc_free(a[10]);
  for (int i = 11; i < 40; i++)
    smalloc_free(a[i]);
  for (int i = 0; i < 5; i++)
    smalloc_free(a[N - 1 - i]);
  uint64_t in_use = child_blocks_in_use();
  expect_line("free(): double free of %p", (void *)a[10]);
  smalloc_free(sm_opaque(a[10]));
  if (!warn)
    return;
  CHILD_CHECK(child_blocks_in_use() == in_use, "the second free was counted");
  heap_still_sound(48);
}
MISUSE(double_free_after_other_frees)

/* Profiling on, every allocation sampled: the page's frees take the
 * path for pages holding samples, which checks as free does; the first
 * free takes the block out of the profile, the second is reported. */
static void double_free_in_a_sampled_page(bool warn)
{
  enum { N = 16 };
  unsigned char *a[N];
  CHILD_CHECK(smalloc_option_set(SMALLOC_OPTION_PROF_RATE, 1) == 0, "option");
  CHILD_CHECK(smalloc_prof_start() == 0, "smalloc_prof_start");
  for (int i = 0; i < N; i++) {
    a[i] = smalloc_malloc(48);
    CHILD_CHECK(a[i] != NULL, "malloc(48) failed");
  }
  smalloc_prof_stop();
  smalloc_free(a[3]);
  smalloc_free(a[4]);
  uint64_t in_use = child_blocks_in_use();
  expect_line("free(): double free of %p", (void *)a[3]);
  smalloc_free(sm_opaque(a[3]));
  if (!warn)
    return;
  CHILD_CHECK(child_blocks_in_use() == in_use, "the second free was counted");
  heap_still_sound(48);
}
MISUSE(double_free_in_a_sampled_page)

/* Blocks handed out and freed again between the two frees, so the page's
 * lists were swapped and rebuilt meanwhile. */
static void double_free_after_reuse_of_others(bool warn)
{
  enum { N = 200 };
  unsigned char *a[N];
  for (int i = 0; i < N; i++) {
    a[i] = smalloc_malloc(96);
    CHILD_CHECK(a[i] != NULL, "malloc(96) failed");
  }
  smalloc_free(a[0]);
  for (int i = 1; i < N; i += 2)
    smalloc_free(a[i]);
  /* take some back (the free list first, the local list later) */
  for (int i = 1; i < 60; i += 2) {
    a[i] = smalloc_malloc(96);
    CHILD_CHECK(a[i] != a[0], "a freed block came back: not a double free any more");
  }
  for (int i = 1; i < 60; i += 2)
    smalloc_free(a[i]);
  expect_line("free(): double free of %p", (void *)a[0]);
  smalloc_free(sm_opaque(a[0]));
  if (!warn)
    return;
  heap_still_sound(96);
}
MISUSE(double_free_after_reuse_of_others)

static void *free_in_thread(void *p)
{
  smalloc_free(p);
  return NULL;
}

/* First free from another thread (the block sits on the page's
 * thread_free list), second from the owner. */
static void double_free_after_cross_thread_free(bool warn)
{
  unsigned char *keep = smalloc_malloc(144);  /* keeps the page from retiring */
  unsigned char *p = smalloc_malloc(144);
  pthread_t t;
  CHILD_CHECK(keep && p, "malloc(144) failed");
  CHILD_CHECK(pthread_create(&t, NULL, free_in_thread, p) == 0, "pthread_create");
  CHILD_CHECK(pthread_join(t, NULL) == 0, "pthread_join");
  expect_line("free(): double free of %p", (void *)p);
  smalloc_free(sm_opaque(p));
  if (!warn)
    return;
  heap_still_sound(144);
  smalloc_free(keep);
}
MISUSE(double_free_after_cross_thread_free)

/* Both frees by a thread that does not own the block, its tag written
 * over in between: the block heads that thread's batch for the page, and
 * pushed again it would link to itself (found by the fuzzer). */
static struct {
  unsigned char *p;
} stale_remote;

static void *stale_remote_frees(void *arg)
{
  (void)arg;
  smalloc_free(smalloc_malloc(16));   /* a heap of its own: its frees are batched */
  smalloc_free(stale_remote.p);
  memset(stale_remote.p + 8, 0x41, 8);   /* a stale write over its tag */
  smalloc_free(sm_opaque(stale_remote.p));
  return NULL;
}

static void double_free_from_another_thread_after_stale_write(bool warn)
{
  unsigned char *keep = smalloc_malloc(176);  /* keeps the page from retiring */
  stale_remote.p = smalloc_malloc(176);
  CHILD_CHECK(keep && stale_remote.p, "malloc(176) failed");
  expect_line("free(): double free of %p", (void *)stale_remote.p);
  pthread_t t;
  CHILD_CHECK(pthread_create(&t, NULL, stale_remote_frees, NULL) == 0, "pthread_create");
  CHILD_CHECK(pthread_join(t, NULL) == 0, "pthread_join");
  if (!warn)
    return;
  heap_still_sound(176);
  smalloc_free(keep);
}
MISUSE(double_free_from_another_thread_after_stale_write)

/* The same after the thread's batch for the page went: the block was the
 * one that filled it (the batch goes at 64 blocks), so it heads the page's
 * thread_free, or, when the page is on its owner's full list, the owner's
 * hand-over list.  Pushed again it would link to itself (found by the
 * fuzzer; the page on the full list: a SIGBUS). */
enum { SENT_BATCH = 64 };
static struct {
  unsigned char *a[SENT_BATCH];
} stale_sent;

static void *stale_sent_frees(void *arg)
{
  (void)arg;
  smalloc_free(smalloc_malloc(16));   /* a heap of its own: its frees are batched */
  for (int i = 0; i < SENT_BATCH; i++)
    smalloc_free(stale_sent.a[i]);
  unsigned char *p = stale_sent.a[SENT_BATCH - 1];
  memset(p + 8, 0x41, 8);   /* a stale write over its tag */
  smalloc_free(sm_opaque(p));
  return NULL;
}

/* n blocks of size bytes into v; the first SENT_BATCH of them that lie in
 * v[0]'s page also into first. */
static void alloc_noting_the_first_page(unsigned char **v, int n, size_t size, unsigned char **first)
{
  int k = 0;
  for (int i = 0; i < n; i++) {
    v[i] = smalloc_malloc(size);
    CHILD_CHECK(v[i] != NULL, "malloc(%zu) failed", size);
    if (k < SENT_BATCH && page_start_of(v[i]) == page_start_of(v[0]))
      first[k++] = v[i];
  }
  CHILD_CHECK(k == SENT_BATCH, "%d blocks in the first page", k);
}

static void double_free_after_the_batch_went(bool warn, bool full)
{
  enum { SIZE = 176, MANY = 3000 };
  static unsigned char *v[MANY];
  /* on the full list: the first page of many; else the only one */
  int n = full ? MANY : 2 * SENT_BATCH;
  alloc_noting_the_first_page(v, n, SIZE, stale_sent.a);
  CHILD_CHECK(page_start_of(v[n - 1]) != page_start_of(v[0]) || !full, "one page holds all");
  CHILD_CHECK(page_start_of(v[n - 1]) == page_start_of(v[0]) || full, "more than one page");
  unsigned char *p = stale_sent.a[SENT_BATCH - 1];
  expect_line("free(): double free of %p", (void *)p);
  pthread_t t;
  CHILD_CHECK(pthread_create(&t, NULL, stale_sent_frees, NULL) == 0, "pthread_create");
  CHILD_CHECK(pthread_join(t, NULL) == 0, "pthread_join");
  if (!warn)
    return;
  for (int i = 0; i < n; i++) {
    bool sent = false;
    for (int j = 0; j < SENT_BATCH; j++)
      sent |= v[i] == stale_sent.a[j];
    if (!sent)
      smalloc_free(v[i]);
  }
  heap_still_sound(SIZE);
}

static void double_free_from_another_thread_after_its_batch_went(bool warn)
{
  double_free_after_the_batch_went(warn, false);
}
MISUSE(double_free_from_another_thread_after_its_batch_went)

static void double_free_into_a_full_page_after_the_batch_went(bool warn)
{
  double_free_after_the_batch_went(warn, true);
}
MISUSE(double_free_into_a_full_page_after_the_batch_went)

/* Blocks of pages on their owner's full list, freed by another thread:
 * the first of each page goes to the owner on a list of its own (the
 * hand-over list), linked through the blocks' first words.  The owner
 * writes over the link of the one that heads it (a use after free) and
 * then collects: the link is reported, not followed (it was followed to
 * 0x41414141... ^ the secret: SIGSEGV or SIGBUS). */
static struct {
  unsigned char *a[SENT_BATCH], *last;
} handed;

static void *hand_over_frees(void *arg)
{
  (void)arg;
  smalloc_free(smalloc_malloc(16));   /* a heap of its own: its frees are batched */
  for (int i = 0; i < SENT_BATCH; i++)   /* a batch that fills goes at once */
    smalloc_free(handed.a[i]);
  smalloc_free(handed.last);   /* goes as the thread exits, last */
  return NULL;
}

static void corrupted_hand_over_list(bool warn)
{
  enum { SIZE = 176, MANY = 3000 };
  static unsigned char *v[MANY];
  alloc_noting_the_first_page(v, MANY, SIZE, handed.a);
  for (int i = 0; i < MANY && !handed.last; i++)   /* a block of the second page */
    if (page_start_of(v[i]) != page_start_of(v[0]))
      handed.last = v[i];
  CHILD_CHECK(page_start_of(v[MANY - 1]) != page_start_of(handed.last), "two pages hold all");
  pthread_t t;
  CHILD_CHECK(pthread_create(&t, NULL, hand_over_frees, NULL) == 0, "pthread_create");
  CHILD_CHECK(pthread_join(t, NULL) == 0, "pthread_join");
  memset(sm_opaque(handed.last), 0x41, 8);   /* a use after free, over its link */
  expect_line("corrupted free list in page at %p: block %p was written after its free "
              "(or freed twice)", page_start_of(handed.last), (void *)handed.last);
  smalloc_collect(false);
  if (!warn)
    return;
  for (int i = 0; i < MANY; i++) {
    bool gone = v[i] == handed.last;
    for (int j = 0; j < SENT_BATCH; j++)
      gone |= v[i] == handed.a[j];
    if (!gone)
      smalloc_free(v[i]);
  }
  heap_still_sound(SIZE);
}
MISUSE(corrupted_hand_over_list)

/* First free from another thread that is still running, so the block is
 * still in that thread's batch (not on any list of the owner's), second
 * from the owner: the block's tag word tells it. */
typedef struct batched_free {
  void *p;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int state;   /* 1 freed, 2 may exit */
} batched_free_t;

static void *free_in_thread_and_wait(void *arg)
{
  batched_free_t *bf = arg;
  smalloc_free(bf->p);
  pthread_mutex_lock(&bf->mu);
  bf->state = 1;
  pthread_cond_broadcast(&bf->cv);
  while (bf->state != 2)
    pthread_cond_wait(&bf->cv, &bf->mu);
  pthread_mutex_unlock(&bf->mu);
  return NULL;
}

static void double_free_while_cross_thread_free_is_batched(bool warn)
{
  static batched_free_t bf = {NULL, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
  unsigned char *keep = smalloc_malloc(176);  /* keeps the page from retiring */
  bf.p = smalloc_malloc(176);
  pthread_t t;
  CHILD_CHECK(keep && bf.p, "malloc(176) failed");
  CHILD_CHECK(pthread_create(&t, NULL, free_in_thread_and_wait, &bf) == 0, "pthread_create");
  pthread_mutex_lock(&bf.mu);
  while (bf.state != 1)
    pthread_cond_wait(&bf.cv, &bf.mu);
  pthread_mutex_unlock(&bf.mu);
  expect_line("free(): double free of %p", bf.p);
  smalloc_free(sm_opaque(bf.p));
  pthread_mutex_lock(&bf.mu);
  bf.state = 2;
  pthread_cond_broadcast(&bf.cv);
  pthread_mutex_unlock(&bf.mu);
  CHILD_CHECK(pthread_join(t, NULL) == 0, "pthread_join");
  if (!warn)
    return;
  heap_still_sound(176);
  smalloc_free(keep);
}
MISUSE(double_free_while_cross_thread_free_is_batched)

/* The owner frees a block and writes over its tag; another thread frees
 * it again (not seen: its tag no longer says free) and holds it in its
 * batch; the owner frees the rest and allocates again: the block is live
 * again (64-byte blocks: their pages hold other live blocks, and the
 * block comes back off the owner's list; when its page is carved anew
 * instead, the batch's key shows it).  The other thread's batch, sent as
 * it exits, is reported and left out: pushed, it would write a link into
 * the live block and hand it out twice (found by probing). */
enum { RC_BLOCKS = 2000, RC_MORE = 64000 };
static void double_free_batched_then_handed_out(bool warn, size_t size, int count)
{
  static batched_free_t bf = {NULL, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
  static unsigned char *v[RC_MORE];
  for (int i = 0; i < count; i++) {
    v[i] = smalloc_malloc(size);
    CHILD_CHECK(v[i] != NULL, "malloc(%zu) failed", size);
  }
  bf.p = v[count / 2];
  smalloc_free(bf.p);
  memset(bf.p + 8, 0x5a, 8);   /* a write after free, over its tag */
  pthread_t t;
  CHILD_CHECK(pthread_create(&t, NULL, free_in_thread_and_wait, &bf) == 0, "pthread_create");
  pthread_mutex_lock(&bf.mu);
  while (bf.state != 1)
    pthread_cond_wait(&bf.cv, &bf.mu);
  pthread_mutex_unlock(&bf.mu);
  for (int i = 0; i < count; i++)
    if (i != count / 2)
      smalloc_free(v[i]);
  smalloc_malloc_trim(0);
  /* until the block comes back: in the default layout within the first
   * few; where the page went back to its segment, once it is carved again */
  bool again = false;
  int n = 0;
  while (n < RC_MORE && (n < count || !again)) {
    v[n] = smalloc_malloc(size);
    CHILD_CHECK(v[n] != NULL, "malloc(%zu) failed", size);
    memset(v[n], 0x11, size);
    again |= v[n] == bf.p;
    n++;
  }
  CHILD_CHECK(again, "the block was not handed out again");
  expect_line("free(): double free of %p (handed out again since)", bf.p);
  pthread_mutex_lock(&bf.mu);
  bf.state = 2;
  pthread_cond_broadcast(&bf.cv);
  pthread_mutex_unlock(&bf.mu);
  CHILD_CHECK(pthread_join(t, NULL) == 0, "pthread_join");   /* it sends its batch as it exits */
  if (!warn)
    return;
  for (int i = 0; i < n; i++)
    for (size_t j = 0; j < size; j++)
      CHILD_CHECK(v[i][j] == 0x11, "live block %p damaged at byte %zu", (void *)v[i], j);
  for (int i = 0; i < n; i++)
    smalloc_free(v[i]);
  heap_still_sound(size);
}
static void double_free_batched_while_the_block_is_handed_out_again(bool warn)
{
  double_free_batched_then_handed_out(warn, 64, RC_BLOCKS);
}
MISUSE(double_free_batched_while_the_block_is_handed_out_again)


/* realloc of a block freed already, to its own size: resized in place it
 * would be handed out again while still on a free list. */
static void realloc_of_a_freed_block(bool warn)
{
  unsigned char *keep = smalloc_malloc(96);   /* keeps the page from retiring */
  unsigned char *p = smalloc_malloc(96);
  CHILD_CHECK(keep && p, "malloc(96) failed");
  smalloc_free(p);
  expect_line("realloc(): pointer %p was freed", (void *)p);
  uint64_t failed = child_calls_failed();
  errno = 0;
  void *q = smalloc_realloc(sm_opaque(p), 96);
  if (!warn)
    return;
  CHILD_CHECK(q == NULL && errno == EINVAL, "realloc of a freed block: %p, errno %d", q, errno);
  CHILD_CHECK(child_calls_failed() == failed + 1, "calls_failed went from %llu to %llu",
              (unsigned long long)failed, (unsigned long long)child_calls_failed());
  /* the block is handed out once, not twice */
  void *a = smalloc_malloc(96), *b = smalloc_malloc(96);
  CHILD_CHECK(a != b, "malloc returned %p twice", a);
  smalloc_free(a);
  smalloc_free(b);
  heap_still_sound(96);
  smalloc_free(keep);
}
MISUSE(realloc_of_a_freed_block)

/* The same when another thread freed it (the block is in that thread's
 * batch or on the page's thread_free): the tag says so. */
static void realloc_of_a_block_freed_by_another_thread(bool warn)
{
  unsigned char *keep = smalloc_malloc(112);
  unsigned char *p = smalloc_malloc(112);
  pthread_t t;
  CHILD_CHECK(keep && p, "malloc(112) failed");
  CHILD_CHECK(pthread_create(&t, NULL, free_in_thread, p) == 0, "pthread_create");
  CHILD_CHECK(pthread_join(t, NULL) == 0, "pthread_join");
  expect_line("realloc(): pointer %p was freed", (void *)p);
  errno = 0;
  void *q = smalloc_realloc(sm_opaque(p), 112);
  if (!warn)
    return;
  CHILD_CHECK(q == NULL && errno == EINVAL, "realloc of a freed block: %p, errno %d", q, errno);
  heap_still_sound(112);
  smalloc_free(keep);
}
MISUSE(realloc_of_a_block_freed_by_another_thread)

/* First free from the owner (the block sits on its page's local list),
 * second from another thread, which cannot walk the owner's lists: the
 * block's tag word tells it. */
static void double_free_cross_thread_after_local_free(bool warn)
{
  unsigned char *keep = smalloc_malloc(80);   /* keeps the page from retiring */
  unsigned char *p = smalloc_malloc(80);
  pthread_t t;
  CHILD_CHECK(keep && p, "malloc(80) failed");
  smalloc_free(p);
  expect_line("free(): double free of %p", (void *)p);
  CHILD_CHECK(pthread_create(&t, NULL, free_in_thread, sm_opaque(p)) == 0, "pthread_create");
  CHILD_CHECK(pthread_join(t, NULL) == 0, "pthread_join");
  if (!warn)
    return;
  heap_still_sound(80);
  smalloc_free(keep);
}
MISUSE(double_free_cross_thread_after_local_free)

static void *free_twice_in_thread(void *p)
{
  smalloc_free(p);
  smalloc_free(sm_opaque(p));
  return NULL;
}

/* Both frees from another thread: the second finds the block at the head
 * of thread_free.  (Undetected, the block would link to itself and the
 * owner's next collection would never end.) */
static void double_free_both_cross_thread(bool warn)
{
  unsigned char *keep = smalloc_malloc(48);   /* keeps the page from retiring */
  unsigned char *p = smalloc_malloc(48);
  pthread_t t;
  CHILD_CHECK(keep && p, "malloc(48) failed");
  expect_line("free(): double free of %p", (void *)p);
  CHILD_CHECK(pthread_create(&t, NULL, free_twice_in_thread, p) == 0, "pthread_create");
  CHILD_CHECK(pthread_join(t, NULL) == 0, "pthread_join");
  if (!warn)
    return;
  for (int i = 0; i < 10000; i++) {   /* collects thread_free: must end */
    void *q = smalloc_malloc(48);
    CHILD_CHECK(q != NULL, "malloc(48) failed");
  }
  heap_still_sound(48);
}
MISUSE(double_free_both_cross_thread)

static void free_middle_of_block(bool warn, size_t size, size_t offset)
{
  unsigned char *p = smalloc_malloc(size);
  CHILD_CHECK(p != NULL, "malloc(%zu) failed", size);
  uint64_t seed = sm_pattern_seed(p, 1);
  sm_pattern_fill(p, size, seed);
  uint64_t in_use = child_blocks_in_use();
  expect_line("free(): invalid pointer %p (not the start of a block)", (void *)(p + offset));
  smalloc_free(sm_opaque(p + offset));
  if (!warn)
    return;
  /* leaked: still allocated, still ours */
  CHILD_CHECK(child_blocks_in_use() == in_use, "the bad free changed blocks_in_use");
  CHILD_CHECK(sm_pattern_ok(p, size, seed), "the block changed");
  CHILD_CHECK(smalloc_malloc_usable_size(p) >= size, "usable size %zu < %zu",
              smalloc_malloc_usable_size(p), size);
  heap_still_sound(size);
  CHILD_CHECK(sm_pattern_ok(p, size, seed), "the block changed");
  smalloc_free(p);
  CHILD_CHECK(child_blocks_in_use() == in_use - 1, "the block did not free");
}

static void free_middle_of_small_block(bool warn)
{
  free_middle_of_block(warn, 100, 16);
}
MISUSE(free_middle_of_small_block)

/* free_sized with a size larger than the block holds: reported, the block
 * leaked (the program's idea of it is wrong); the size it holds is fine */
static void free_sized_larger_than_the_block(bool warn, size_t size)
{
  unsigned char *p = smalloc_malloc(size);
  CHILD_CHECK(p != NULL, "malloc(%zu) failed", size);
  size_t usable = smalloc_malloc_usable_size(p);
  uint64_t seed = sm_pattern_seed(p, 1);
  sm_pattern_fill(p, usable, seed);
  uint64_t in_use = child_blocks_in_use();
  expect_line("free_sized(): size %zu given for %p, whose block holds %zu bytes", usable + 1,
              (void *)p, usable);
  smalloc_free_sized(sm_opaque(p), usable + 1);
  if (!warn)
    return;
  CHILD_CHECK(child_blocks_in_use() == in_use, "the bad free_sized changed blocks_in_use");
  CHILD_CHECK(sm_pattern_ok(p, usable, seed), "the block changed");
  heap_still_sound(size);
  smalloc_free_sized(p, usable);
  CHILD_CHECK(child_blocks_in_use() == in_use - 1, "the block did not free");
}

static void free_sized_larger_than_a_small_block(bool warn)
{
  free_sized_larger_than_the_block(warn, 100);
}
MISUSE(free_sized_larger_than_a_small_block)

static void free_sized_larger_than_a_large_block(bool warn)
{
  free_sized_larger_than_the_block(warn, (size_t)1 << 20);
}
MISUSE(free_sized_larger_than_a_large_block)

/* realloc into the middle of a small block, to a size its block would
 * keep in place (realloc's fast path must not take it) */
static void realloc_middle_of_small_block(bool warn)
{
  unsigned char *p = smalloc_malloc(100);
  CHILD_CHECK(p != NULL, "malloc(100) failed");
  uint64_t seed = sm_pattern_seed(p, 1);
  sm_pattern_fill(p, 100, seed);
  uint64_t in_use = child_blocks_in_use();
  expect_line("realloc(): invalid pointer %p (not the start of a block)", (void *)(p + 16));
  errno = 0;
  void *r = smalloc_realloc(sm_opaque(p + 16), 80);
  if (!warn)
    return;
  CHILD_CHECK(r == NULL && errno == EINVAL, "realloc returned %p, errno %d", r, errno);
  CHILD_CHECK(child_blocks_in_use() == in_use, "the bad realloc changed blocks_in_use");
  CHILD_CHECK(sm_pattern_ok(p, 100, seed), "the block changed");
  heap_still_sound(100);
  smalloc_free(p);
  CHILD_CHECK(child_blocks_in_use() == in_use - 1, "the block did not free");
}
MISUSE(realloc_middle_of_small_block)

static void free_middle_of_medium_block(bool warn)
{
  free_middle_of_block(warn, 100 * KiB, 4096);
}
MISUSE(free_middle_of_medium_block)

static void free_middle_of_large_block(bool warn)
{
  free_middle_of_block(warn, 1 * MiB, 64);
}
MISUSE(free_middle_of_large_block)

/* a unit boundary inside a large block: that unit describes the block too */
static void free_unit_inside_large_block(bool warn)
{
  free_middle_of_block(warn, 1 * MiB, 64 * KiB);
}
MISUSE(free_unit_inside_large_block)

static void free_middle_of_huge_block(bool warn)
{
  free_middle_of_block(warn, 3 * MiB, 2 * MiB);
}
MISUSE(free_middle_of_huge_block)


/* The block's tag word (bytes 8-15) written after the free, then the
 * block freed again: the tag no longer says "maybe free", but the block
 * heads its page's local list, and pushed again it would link to itself
 * and come out of malloc over and over. */
static void double_free_after_stale_write(bool warn)
{
  double_free_of_the_last(warn, 64, 8);
}
MISUSE(double_free_after_stale_write)

/* n blocks of 48 bytes into o, each written with fill, none of them
 * over the live block of size bytes at live: what a class that takes the
 * live block's page would hand out. */
static void others_keep_off(unsigned char **o, int n, const unsigned char *live, int size, int fill)
{
  uintptr_t lo = (uintptr_t)live, hi = lo + (uintptr_t)size;
  for (int i = 0; i < n; i++) {
    o[i] = smalloc_malloc(48);
    CHILD_CHECK(o[i] != NULL, "malloc(48) failed");
    CHILD_CHECK((uintptr_t)o[i] + 48 <= lo || (uintptr_t)o[i] >= hi,
                "malloc(48) = %p overlaps the live block %p", (void *)o[i], (const void *)live);
    memset(o[i], fill, 48);
  }
}

/* Run fn(&warn) in a thread of its own (a new heap) and wait for it. */
static void run_in_a_thread(void *(*fn)(void *), bool *warn)
{
  pthread_t t;
  CHILD_CHECK(pthread_create(&t, NULL, fn, warn) == 0, "pthread_create");
  CHILD_CHECK(pthread_join(t, NULL) == 0, "pthread_join");
}

/* A block freed, another block of its page freed after it, the first
 * one's tag overwritten, then the first freed again: free cannot tell
 * (the block is not its page's last freed one), and the block is on the
 * page's list twice.  malloc must hand it out once only: the second time
 * it comes off the list its tag says it was handed out, the list is
 * reported and dropped, and the page is kept for good (its count of
 * blocks in use counted the block twice), so that no later block
 * overlaps the blocks still live in it. */
static void *stale_write_deep_thread(void *arg)
{
  bool warn = *(bool *)arg;
  enum { N = 64, SIZE = 80, MORE = 400, OTHER = 4000 };
  static unsigned char *a[N + MORE], *o[OTHER];
  /* an emptied page goes back to its segment at once, for the next
   * class that needs a page */
  CHILD_CHECK(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, 0) == 0, "option");
  for (int i = 0; i < N; i++) {
    a[i] = smalloc_malloc(SIZE);
    CHILD_CHECK(a[i] != NULL, "malloc(%d) failed", SIZE);
  }
  unsigned char *victim = a[10];
  smalloc_free(victim);
  smalloc_free(a[11]);
  memset(victim + 8, 0x41, 8);   /* a stale write over its tag */
  smalloc_free(sm_opaque(victim));   /* not seen: pushed again */
  a[10] = a[11] = NULL;
  uintptr_t vpage = (uintptr_t)victim & ~(uintptr_t)0xffff;
  expect_line("corrupted free list in page at %p: block %p was written after its free "
              "(or freed twice)", page_start_of(victim), (void *)victim);
  for (int i = N; i < N + MORE; i++) {
    a[i] = smalloc_malloc(SIZE);
    CHILD_CHECK(a[i] != NULL, "malloc(%d) failed", SIZE);
    for (int j = 0; j < i; j++)
      CHILD_CHECK(a[j] != a[i], "malloc returned %p while it was live", (void *)a[i]);
    memset(a[i], i & 0xff, SIZE);
  }
  if (!warn)
    child_fail("the block on the list twice was not reported");
  for (int i = N; i < N + MORE; i++)
    for (int k = 0; k < SIZE; k++)
      CHILD_CHECK(a[i][k] == (unsigned char)(i & 0xff), "block %p changed", (void *)a[i]);
  /* all freed but the last one in the victim's page: its page must not
   * be taken for another class while that one is live */
  int keep = -1;
  for (int i = 0; i < N + MORE; i++)
    if (a[i] && ((uintptr_t)a[i] & ~(uintptr_t)0xffff) == vpage) keep = i;
  CHILD_CHECK(keep >= N, "no block of the victim's page was handed out again");
  uint64_t pages = child_class_pages(SIZE);
  for (int i = 0; i < N + MORE; i++)
    if (i != keep) smalloc_free(a[i]);
  smalloc_collect(true);   /* releases every page that holds no live block */
  CHILD_CHECK(child_class_pages(SIZE) == pages, "pages of %d bytes: %llu, want %llu", SIZE,
              (unsigned long long)child_class_pages(SIZE), (unsigned long long)pages);
  others_keep_off(o, OTHER, a[keep], SIZE, 0x5a);
  for (int k = 0; k < SIZE; k++)
    CHILD_CHECK(a[keep][k] == (unsigned char)(keep & 0xff), "block %p changed", (void *)a[keep]);
  for (int i = 0; i < OTHER; i++)
    smalloc_free(o[i]);
  smalloc_free(a[keep]);
  return NULL;
}

/* In a thread of its own: its heap is new, and so is the page. */
static void double_free_after_stale_write_deep(bool warn)
{
  run_in_a_thread(stale_write_deep_thread, &warn);
  heap_still_sound(80);
}
MISUSE(double_free_after_stale_write_deep)

/* Blocks of size into v (room for max) until one lands in another page
 * than the first: the first page's blocks are v[0 .. n - 1], returned
 * n, and v[n] is the first of the next page. */
static int fill_a_page(unsigned char **v, int max, int size)
{
  int n = 0;
  uintptr_t first = 0;
  for (;;) {
    CHILD_CHECK(n < max, "no block of %d landed in a second page", size);
    v[n] = smalloc_malloc((size_t)size);
    CHILD_CHECK(v[n] != NULL, "malloc(%d) failed", size);
    uintptr_t page = (uintptr_t)page_start_of(v[n]);
    if (n == 0)
      first = page;
    if (page != first)
      return n;
    n++;
  }
}

/* The same double free, unseen, in a page that is not the one its class
 * allocates from (its frees go on local_free): the rest of its blocks
 * freed but one, the page's count says it is empty, one free early.
 * Before, the page went back to its segment with that block live in it,
 * and the next class's blocks were written over it, unreported.  Where
 * the page leaves its class every block it built must be tagged free:
 * the page is reported and kept for good. */
static void *stale_write_emptied_thread(void *arg)
{
  bool warn = *(bool *)arg;
  enum { SIZE = 80, MAX = 2000, OTHER = 4000 };
  static unsigned char *a[MAX], *o[OTHER];
  /* an emptied page goes back to its segment at once */
  CHILD_CHECK(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, 0) == 0, "option");
  int n = fill_a_page(a, MAX, SIZE);
  unsigned char *victim = a[0], *live = a[n - 1];
  memset(live, 0x5c, SIZE);
  smalloc_free(victim);
  smalloc_free(a[1]);
  memset(victim + 8, 0x41, 8);   /* a stale write over its tag */
  smalloc_free(sm_opaque(victim));   /* not seen: counted twice */
  expect_line("corrupted free list in page at %p: a block of it was freed twice", page_start_of(victim));
  for (int i = 2; i < n - 1; i++)   /* the last of these empties the page, by its count */
    smalloc_free(a[i]);
  if (!warn)
    child_fail("a page emptied with a block live in it, unreported");
  others_keep_off(o, OTHER, live, SIZE, 0x3c);
  smalloc_collect(true);
  for (int k = 0; k < SIZE; k++)
    CHILD_CHECK(live[k] == 0x5c, "the live block %p changed", (void *)live);
  for (int i = 0; i < OTHER; i++)
    smalloc_free(o[i]);
  smalloc_free(live);
  smalloc_free(a[n]);
  return NULL;
}

static void double_free_after_stale_write_then_the_page_empties(bool warn)
{
  run_in_a_thread(stale_write_emptied_thread, &warn);
  heap_still_sound(80);
}
MISUSE(double_free_after_stale_write_then_the_page_empties)

/* A block whose page went back to its segment at its free (retire cycles
 * 0) while another heap holds the segment (while other threads live, a
 * thread's pages are borrowed from the segments all threads share): the
 * page waits, cleared, for the holder to take it home, still in use in
 * its segment.  Freeing the block again there, after a write over its
 * tag, is a double free (found by the fuzzer: it went unreported).  The
 * page is filled, so that the free that empties it finds no free list. */
static void *cleared_page_thread(void *arg)
{
  bool warn = *(bool *)arg;
  enum { N = 64, SIZE = 7000 };
  static unsigned char *v[N];
  CHILD_CHECK(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, 0) == 0, "option");
  int n = fill_a_page(v, N, SIZE);
  for (int i = 0; i < n; i++)   /* the first page's blocks: the last empties it */
    smalloc_free(v[i]);
  unsigned char *p = v[n - 1];
  memset(sm_opaque(p) + 8, 0x41, 8);
  expect_line("free(): double free of %p", (void *)p);
  smalloc_free(sm_opaque(p));
  smalloc_free(v[n]);
  if (warn)
    heap_still_sound(SIZE);
  return NULL;
}

static void double_free_into_a_page_on_its_way_home(bool warn)
{
  sm_test_heap_here();   /* another heap lives: the thread borrows its pages */
  run_in_a_thread(cleared_page_thread, &warn);
}
MISUSE(double_free_into_a_page_on_its_way_home)

/* A page that holds a block returned at an aligned offset (posix_memalign
 * pads a 40-byte request with 64-byte alignment into a 96-byte block, in
 * the secure build too; of two such blocks 96 bytes apart, one at least
 * does not start 64-byte aligned) and an ordinary block q of the same
 * class: q + 16 is inside q, not an aligned block's pointer. */
static unsigned char *aligned_page_block(void **aligned)
{
  /* the secure build hands blocks out in a random order, and the class's
   * page may fill up in between: try again (what is not used stays
   * allocated) until all three are in one page */
  for (int attempt = 0; attempt < 50; attempt++) {
    void *other;
    CHILD_CHECK(smalloc_posix_memalign(aligned, 64, 40) == 0, "posix_memalign failed");
    CHILD_CHECK(smalloc_posix_memalign(&other, 64, 40) == 0, "posix_memalign failed");
    uintptr_t page = (uintptr_t)*aligned & ~(uintptr_t)0xffff;
    if (((uintptr_t)other & ~(uintptr_t)0xffff) != page)
      continue;
    for (int i = 0; i < 64; i++) {
      unsigned char *q = smalloc_malloc(SM_TEST_REQUEST_FOR(96));   /* the aligned blocks' class */
      CHILD_CHECK(q != NULL, "malloc(96) failed");
      if (((uintptr_t)q & ~(uintptr_t)0xffff) == page)
        return q;
    }
  }
  CHILD_CHECK(false, "no page with aligned blocks and a block of 96 bytes");
  return NULL;
}

static void interior_free_in_a_page_with_aligned_blocks(bool warn)
{
  void *a;
  unsigned char *q = aligned_page_block(&a);
  uint64_t in_use = child_blocks_in_use();
  expect_line("free(): invalid pointer %p (not the start of a block)", (void *)(q + 16));
  smalloc_free(sm_opaque(q + 16));
  if (!warn)
    return;
  CHILD_CHECK(child_blocks_in_use() == in_use, "the bad free changed blocks_in_use");
  heap_still_sound(96);
  smalloc_free(q);
  smalloc_free(a);
  CHILD_CHECK(child_blocks_in_use() == in_use - 2, "the blocks did not free");
}
MISUSE(interior_free_in_a_page_with_aligned_blocks)

static void interior_realloc_in_a_page_with_aligned_blocks(bool warn)
{
  void *a;
  unsigned char *q = aligned_page_block(&a);
  uint64_t in_use = child_blocks_in_use();
  expect_line("realloc(): invalid pointer %p (not the start of a block)", (void *)(q + 16));
  errno = 0;
  void *r = smalloc_realloc(sm_opaque(q + 16), 10);
  if (!warn)
    return;
  CHILD_CHECK(r == NULL && errno == EINVAL, "realloc returned %p, errno %d", r, errno);
  CHILD_CHECK(child_blocks_in_use() == in_use, "the bad realloc changed blocks_in_use");
  heap_still_sound(96);
}
MISUSE(interior_realloc_in_a_page_with_aligned_blocks)

/* An aligned pointer freed twice: its mark went with the first free. */
static void double_free_of_an_aligned_block(bool warn)
{
  void *a;
  CHILD_CHECK(smalloc_posix_memalign(&a, 64, 48) == 0, "posix_memalign failed");
  unsigned char *blk = smalloc_malloc(96);   /* keeps the page from retiring */
  smalloc_free(a);
  uint64_t in_use = child_blocks_in_use();
  expect_line("free(): double free of %p", a);
  smalloc_free(sm_opaque(a));
  if (!warn)
    return;
  CHILD_CHECK(child_blocks_in_use() == in_use, "the second free was counted");
  heap_still_sound(96);
  smalloc_free(blk);
}
MISUSE(double_free_of_an_aligned_block)

/* ---- the free-list key stays secret ------------------------------------------- */

/* A block handed out again holds no tag (the page's key), and no link
 * derived from it: the secure build's link is the key xor an address (two
 * blocks' addresses would give the key away) and is cleared; the default
 * build's is a plain address of a block of the same page, or 0. */
START_TEST(reused_blocks_hold_no_list_words)
{
  enum { N = 256 };
  static uint64_t *v[N];
  for (int round = 0; round < 3; round++) {
    for (int i = 0; i < N; i++) {
      v[i] = smalloc_malloc(48);
      ck_assert_ptr_nonnull(v[i]);
      bool plain_link = v[i][0] == 0 || (!SM_TEST_SECURE &&
                        ((v[i][0] ^ (uint64_t)(uintptr_t)v[i]) / SM_TEST_SMALL_PAGE) == 0);
      SM_CHECK(round == 0 || (plain_link && v[i][1] == 0),
               "round %d block %d: words %#llx %#llx", round, i, (unsigned long long)v[i][0],
               (unsigned long long)v[i][1]);
    }
    for (int i = 0; i < N; i++) {
      v[i][0] = v[i][1] = 0x5555555555555555ull;
      smalloc_free(v[i]);
    }
  }
}
END_TEST

/* A page that went back to its segment and is carved again gets another
 * key: a link or tag an earlier life left in memory (inside blocks of
 * another size class, later) tells nothing about the present one.  The
 * tag of a freed block is the key (read after the free, as an attacker
 * with a dangling pointer would).  With RETIRE_CYCLES 0 an emptied page
 * goes back to its segment at once; a 200 KiB block is the only block its
 * 512 KiB page has built when it is freed, so the page empties, and the
 * next one is carved from the first free page again, most often the same. */
START_TEST(a_page_gets_a_new_key_each_life)
{
  enum { LIVES = 32 };
  uintptr_t at[LIVES], key[LIVES];
  long cycles = smalloc_option_get(SMALLOC_OPTION_RETIRE_CYCLES);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, 0), 0);
  for (int i = 0; i < LIVES; i++) {
    uint64_t *p = smalloc_malloc(200 * KiB);
    ck_assert_ptr_nonnull(p);
    smalloc_free(p);
    at[i] = (uintptr_t)p;
    key[i] = ((volatile uint64_t *)p)[1];
  }
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, cycles), 0);
  int again = 0;
  for (int i = 0; i < LIVES; i++)
    for (int j = i + 1; j < LIVES; j++)
      if (at[i] == at[j]) {
        again++;
        ck_assert_msg(key[i] != key[j], "lives %d and %d of the page at %p have key %#llx", i,
                      j, (void *)at[i], (unsigned long long)key[i]);
      }
  ck_assert_msg(again > 0, "no page was carved twice in %d lives", LIVES);
}
END_TEST

/* A pointer smalloc never handed out: reported, left alone, and the heap
 * goes on.  The callers check in warn mode that the memory is untouched. */
static void free_foreign(bool warn, void *p)
{
  uint64_t in_use = child_blocks_in_use();
  expect_line("free(): invalid pointer %p (not allocated by smalloc)", p);
  smalloc_free(sm_opaque(p));
  if (!warn)
    return;
  CHILD_CHECK(child_blocks_in_use() == in_use, "the bad free changed blocks_in_use");
  heap_still_sound(64);
}

static void free_stack_address(bool warn)
{
  unsigned char buf[256];
  memset(buf, 0x5a, sizeof buf);
  void *live = smalloc_malloc(64);   /* a heap exists */
  free_foreign(warn, buf + 32);
  CHILD_CHECK(sm_find_not_byte(buf, sizeof buf, 0x5a) == SIZE_MAX, "the stack buffer changed");
  smalloc_free(live);
}
MISUSE(free_stack_address)

/* realloc of a stack address: reported, NULL with EINVAL, counted as a
 * failed call, the buffer untouched. */
static void realloc_stack_address(bool warn)
{
  unsigned char buf[256];
  memset(buf, 0x5a, sizeof buf);
  void *live = smalloc_malloc(64);   /* a heap exists */
  expect_line("realloc(): invalid pointer %p (not allocated by smalloc)", (void *)(buf + 32));
  uint64_t failed = child_calls_failed();
  errno = 0;
  void *q = smalloc_realloc(sm_opaque(buf + 32), 100);
  if (!warn)
    return;
  CHILD_CHECK(q == NULL && errno == EINVAL, "realloc of a stack address: %p, errno %d", q, errno);
  CHILD_CHECK(child_calls_failed() == failed + 1, "calls_failed went from %llu to %llu",
              (unsigned long long)failed, (unsigned long long)child_calls_failed());
  CHILD_CHECK(sm_find_not_byte(buf, sizeof buf, 0x5a) == SIZE_MAX, "the stack buffer changed");
  heap_still_sound(64);
  smalloc_free(live);
}
MISUSE(realloc_stack_address)

static unsigned char static_buf[4096] __attribute__((aligned(64)));

static void free_static_address(bool warn)
{
  memset(static_buf, 0xa5, sizeof static_buf);
  void *live = smalloc_malloc(64);
  free_foreign(warn, static_buf + 64);
  CHILD_CHECK(sm_find_not_byte(static_buf, sizeof static_buf, 0xa5) == SIZE_MAX,
              "the static buffer changed");
  smalloc_free(live);
}
MISUSE(free_static_address)

/* The C library's own allocator.  When smalloc is the system malloc, plain
 * malloc is smalloc's: ask libc.so.6 itself (RTLD_NEXT would find smalloc,
 * which the program loads before libc). */
typedef void *(*malloc_fn)(size_t);
typedef void (*free_fn)(void *);

static void libc_allocator(malloc_fn *m, free_fn *f)
{
#ifdef SM_OVERRIDE
  void *h = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
  CHILD_CHECK(h != NULL, "dlopen(libc.so.6): %s", dlerror());
  *(void **)m = dlsym(h, "malloc");
  *(void **)f = dlsym(h, "free");
  CHILD_CHECK(*m && *f, "dlsym(libc.so.6, malloc/free) failed");
  CHILD_CHECK((void *)*m != (void *)smalloc_malloc, "libc.so.6's malloc is smalloc's");
#else
  *m = malloc;
  *f = free;
#endif
}

static void free_libc_block(bool warn)
{
  malloc_fn m;
  free_fn f;
  libc_allocator(&m, &f);
  unsigned char *p = m(200);
  CHILD_CHECK(p != NULL, "the C library's malloc failed");
  memset(p, 0x3c, 200);
  free_foreign(warn, p);
  CHILD_CHECK(sm_find_not_byte(p, 200, 0x3c) == SIZE_MAX, "the libc block changed");
  f(p);
}
MISUSE(free_libc_block)

/* A mapping of our own, alone in its 4 MiB unit, so that no smalloc
 * segment shares it. */
static unsigned char *map_own_unit(void)
{
  size_t len = 8 * MiB;
  unsigned char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHILD_CHECK(m != MAP_FAILED, "mmap: %s", strerror(errno));
  unsigned char *unit = (unsigned char *)(((uintptr_t)m + 4 * MiB - 1) & ~(uintptr_t)(4 * MiB - 1));
  memset(unit, 0x77, 64 * KiB);
  return unit;
}

static void free_mmap_page(bool warn)
{
  unsigned char *unit = map_own_unit();
  void *live = smalloc_malloc(64);
  free_foreign(warn, unit + 4096 + 16);
  CHILD_CHECK(sm_find_not_byte(unit, 64 * KiB, 0x77) == SIZE_MAX, "the mapping changed");
  smalloc_free(live);
}
MISUSE(free_mmap_page)

/* The start of a mapped 4 MiB unit: where a segment header would be. */
static void free_mmap_unit_start(bool warn)
{
  unsigned char *unit = map_own_unit();
  void *live = smalloc_malloc(64);
  free_foreign(warn, unit);
  CHILD_CHECK(sm_find_not_byte(unit, 64 * KiB, 0x77) == SIZE_MAX, "the mapping changed");
  smalloc_free(live);
}
MISUSE(free_mmap_unit_start)

/* A pointer into smalloc's own metadata: the header at the start of the
 * segment of a live block is no block. */
static void free_segment_header(bool warn)
{
  unsigned char *p = smalloc_malloc(64);
  CHILD_CHECK(p != NULL, "malloc(64) failed");
  unsigned char *hdr = (unsigned char *)((uintptr_t)p & ~(uintptr_t)(4 * MiB - 1)) + 256;
  expect_line("^free(): invalid pointer %p (not ", (void *)hdr);
  smalloc_free(sm_opaque(hdr));
  if (!warn)
    return;
  heap_still_sound(64);
  smalloc_free(p);
}
MISUSE(free_segment_header)

/* After the link of the freed block victim (size bytes) was written
 * over: the allocations of its size class reach it and must stop at its
 * link with the report, never handing out an address in its segment's
 * header; with warn they go on with sound blocks. */
static void malloc_up_to_the_bad_link(bool warn, unsigned char *victim, size_t size)
{
  enum { MAX = 100000 };
  static void *kept[MAX];
  uintptr_t seg = (uintptr_t)victim & ~(((uintptr_t)4 << 20) - 1);
  expect_line("^corrupted free list in page at 0x");
  size_t i;
  for (i = 0; i < MAX; i++) {
    kept[i] = smalloc_malloc(size);
    CHILD_CHECK(kept[i] != NULL, "malloc(%zu) failed after %zu", size, i);
    CHILD_CHECK((uintptr_t)kept[i] - seg >= SM_TEST_SEGMENT_HDR, "malloc(%zu) returned %p, in the segment header",
                size, kept[i]);
    if (kept[i] == victim)
      break;
  }
  CHILD_CHECK(i < MAX, "the freed block never came back");
  /* the next allocation of the class would follow the bad link */
  unsigned char *q = smalloc_malloc(size);
  if (!warn)
    child_fail("malloc after the corrupted block returned %p", (void *)q);
  CHILD_CHECK(q != NULL && sm_is_aligned(q, 16) && (uintptr_t)q - seg >= SM_TEST_SEGMENT_HDR &&
                  smalloc_malloc_usable_size(q) >= size,
              "malloc after the corrupted block returned %p", (void *)q);
  memset(q, 0, size);
  heap_still_sound(size);
}

/* A freed block's first word (its free-list link) overwritten. */
static void corrupted_free_list(bool warn)
{
  unsigned char *victim = smalloc_malloc(208);
  CHILD_CHECK(victim != NULL, "malloc failed");
  smalloc_free(victim);
  memset(victim, 0x41, 8);   /* a use after free */
  malloc_up_to_the_bad_link(warn, victim, 208);
}
MISUSE(corrupted_free_list)

/* A freed block's link pointed, by a write after its free, into its
 * segment's header, 8 bytes before a copy of the block's tag word there
 * if the header holds one (its page's key, in the page's descriptor,
 * when the descriptors are in the header: the tag check alone took that
 * for a free block and malloc handed out the header). */
static void free_list_link_into_the_segment_header(bool warn)
{
  unsigned char *victim = smalloc_malloc(208);
  CHILD_CHECK(victim != NULL, "malloc failed");
  smalloc_free(victim);
  uint64_t tag, *seg = (uint64_t *)((uintptr_t)victim & ~(((uintptr_t)4 << 20) - 1));
  memcpy(&tag, sm_opaque(victim) + 8, 8);   /* a read after free */
  uint64_t *target = seg + 8;
  for (size_t i = 1; i < SM_TEST_SEGMENT_HDR / 8; i++)
    if (seg[i] == tag) {
      target = &seg[i - 1];
      break;
    }
  memcpy(sm_opaque(victim), &target, 8);   /* a write after free */
  malloc_up_to_the_bad_link(warn, victim, 208);
}
MISUSE(free_list_link_into_the_segment_header)

/* The same on the list of blocks freed by other threads, which the owner
 * takes whole when its own lists run dry: the allocation after the
 * corrupted block must stop at its link. */
static void corrupted_thread_free_list(bool warn)
{
  enum { SIZE = 224, MAX = 100000 };
  static void *kept[MAX];
  unsigned char *a = smalloc_malloc(SIZE), *b = smalloc_malloc(SIZE);
  pthread_t t;
  CHILD_CHECK(a && b, "malloc failed");
  CHILD_CHECK(pthread_create(&t, NULL, free_in_thread, a) == 0, "pthread_create");
  CHILD_CHECK(pthread_join(t, NULL) == 0, "pthread_join");
  CHILD_CHECK(pthread_create(&t, NULL, free_in_thread, b) == 0, "pthread_create");
  CHILD_CHECK(pthread_join(t, NULL) == 0, "pthread_join");
  memset(b, 0x41, 8);   /* b heads the list; its link led to a */
  expect_line("^corrupted free list in page at 0x");
  size_t i;
  for (i = 0; i < MAX; i++) {
    kept[i] = smalloc_malloc(SIZE);
    CHILD_CHECK(kept[i] != NULL && sm_is_aligned(kept[i], 16),
                "malloc(%d) returned %p after %zu", SIZE, kept[i], i);
    if (kept[i] == b)
      break;
  }
  CHILD_CHECK(i < MAX, "the freed block never came back");
  /* the next allocation of the class would follow the bad link */
  unsigned char *q = smalloc_malloc(SIZE);
  if (!warn)
    child_fail("malloc after the corrupted block returned %p", (void *)q);
  CHILD_CHECK(q != NULL && q != a && sm_is_aligned(q, 16) && smalloc_malloc_usable_size(q) >= SIZE,
              "malloc after the corrupted block returned %p", (void *)q);
  memset(q, 0, SIZE);
  heap_still_sound(SIZE);
}
MISUSE(corrupted_thread_free_list)

static void realloc_foreign(bool warn)
{
  unsigned char buf[128];
  memset(buf, 0x11, sizeof buf);
  void *live = smalloc_malloc(64);
  expect_line("realloc(): invalid pointer %p (not allocated by smalloc)", (void *)buf);
  void *q = smalloc_realloc(sm_opaque(buf), 256);
  if (!warn)
    return;
  CHILD_CHECK(q == NULL, "realloc of a foreign pointer returned %p", q);
  CHILD_CHECK(sm_find_not_byte(buf, sizeof buf, 0x11) == SIZE_MAX, "the buffer changed");
  heap_still_sound(256);
  smalloc_free(live);
}
MISUSE(realloc_foreign)

static void realloc_foreign_mapping(bool warn)
{
  unsigned char *unit = map_own_unit();
  void *live = smalloc_malloc(64);
  expect_line("realloc(): invalid pointer %p (not allocated by smalloc)", (void *)(unit + 32));
  void *q = smalloc_realloc(sm_opaque(unit + 32), 10);
  if (!warn)
    return;
  CHILD_CHECK(q == NULL, "realloc of a foreign pointer returned %p", q);
  CHILD_CHECK(sm_find_not_byte(unit, 64 * KiB, 0x77) == SIZE_MAX, "the mapping changed");
  heap_still_sound(10);
  smalloc_free(live);
}
MISUSE(realloc_foreign_mapping)

static void usable_size_foreign(bool warn)
{
  static unsigned char buf[512];
  void *live = smalloc_malloc(64);
  expect_line("malloc_usable_size(): invalid pointer %p (not allocated by smalloc)",
              (void *)(buf + 16));
  size_t n = smalloc_malloc_usable_size(sm_opaque(buf + 16));
  if (!warn)
    return;
  CHILD_CHECK(n == 0, "malloc_usable_size of a foreign pointer = %zu", n);
  heap_still_sound(64);
  smalloc_free(live);
}
MISUSE(usable_size_foreign)

static void usable_size_libc_block(bool warn)
{
  malloc_fn m;
  free_fn f;
  libc_allocator(&m, &f);
  void *p = m(100);
  CHILD_CHECK(p != NULL, "the C library's malloc failed");
  expect_line("malloc_usable_size(): invalid pointer %p (not allocated by smalloc)", p);
  size_t n = smalloc_malloc_usable_size(sm_opaque(p));
  if (!warn)
    return;
  CHILD_CHECK(n == 0, "malloc_usable_size of a foreign pointer = %zu", n);
  f(p);
  heap_still_sound(100);
}
MISUSE(usable_size_libc_block)

/* malloc_usable_size checks its pointer as realloc does: a pointer into
 * a block (small, large, huge), or a block that was freed, is reported
 * and measures 0 bytes, not the bytes to the block's end. */
static void usable_size_interior_of(bool warn, size_t size)
{
  unsigned char *p = smalloc_malloc(size);
  CHILD_CHECK(p != NULL, "malloc(%zu) failed", size);
  expect_line("malloc_usable_size(): invalid pointer %p (not the start of a block)", (void *)(p + 16));
  size_t n = smalloc_malloc_usable_size(sm_opaque(p + 16));
  if (!warn)
    return;
  CHILD_CHECK(n == 0, "malloc_usable_size(%p + 16) = %zu", (void *)p, n);
  smalloc_free(p);
  heap_still_sound(48);
}
static void usable_size_interior_small(bool warn) { usable_size_interior_of(warn, 48); }
MISUSE(usable_size_interior_small)
static void usable_size_interior_large(bool warn) { usable_size_interior_of(warn, 300 * KiB); }
MISUSE(usable_size_interior_large)
static void usable_size_interior_huge(bool warn) { usable_size_interior_of(warn, 6 * MiB); }
MISUSE(usable_size_interior_huge)

static void usable_size_freed(bool warn)
{
  void *live = smalloc_malloc(48);
  void *p = smalloc_malloc(48);
  CHILD_CHECK(live != NULL && p != NULL, "malloc failed");
  smalloc_free(p);
  expect_line("malloc_usable_size(): pointer %p was freed", p);
  size_t n = smalloc_malloc_usable_size(sm_opaque(p));
  if (!warn)
    return;
  CHILD_CHECK(n == 0, "malloc_usable_size of a freed block = %zu", n);
  heap_still_sound(48);
  smalloc_free(live);
}
MISUSE(usable_size_freed)

/* free_sized takes the same checks as free. */
static void free_sized_foreign(bool warn)
{
  unsigned char buf[64];
  void *live = smalloc_malloc(64);
  expect_line("^free");
  smalloc_free_sized(sm_opaque(buf), sizeof buf);
  if (!warn)
    return;
  heap_still_sound(64);
  smalloc_free(live);
}
MISUSE(free_sized_foreign)

/* ---- the secure build: writes past the end ------------------------------------
 * A write of 1 to 16 bytes past a block's usable size damages its canary
 * (8 bytes after a block of a size class, 16 after a large or huge one,
 * before its guard page), which free reports. */

static void overflow_past(bool warn, size_t n, size_t over)
{
  unsigned char *p = smalloc_malloc(n);
  CHILD_CHECK(p != NULL, "malloc(%zu) failed", n);
  size_t u = smalloc_malloc_usable_size(p);
  CHILD_CHECK(u >= n, "usable size %zu < %zu", u, n);
  memset(p + u, 0x41, over);
  if (over > SM_TEST_CANARY && n <= SM_TEST_CLASS_MAX_REQUEST)
    child_misuses = 0;   /* the next block's first word too: reported if it is free */
  expect_line("free(): heap overflow: the canary after block %p was overwritten", (void *)p);
  smalloc_free(sm_opaque(p));
  if (!warn)
    return;
  if (child_misuses == 0) {
    /* the next block, if free, had its list word written over: malloc
     * of the size reaches it and reports it, and the blocks of the list
     * past it are lost, counted as in use from then on (smalloc(3));
     * reached first, so that the heap's counts below are exact */
    enum { MAX = 4096 };
    static void *kept[MAX];
    uint64_t errors = child_errors_reported();
    size_t i;
    for (i = 0; i < MAX && child_errors_reported() == errors; i++)
      kept[i] = smalloc_malloc(n);
    while (i > 0)
      smalloc_free(kept[--i]);
  }
  heap_still_sound(64);
}

static void overflow_small_by_1(bool warn) { overflow_past(warn, 24, 1); }
MISUSE(overflow_small_by_1)
static void overflow_small_by_16(bool warn) { overflow_past(warn, 100, 16); }
MISUSE(overflow_small_by_16)
static void overflow_medium_by_16(bool warn) { overflow_past(warn, 100000, 16); }
MISUSE(overflow_medium_by_16)
static void overflow_large_by_1(bool warn) { overflow_past(warn, 300000, 1); }
MISUSE(overflow_large_by_1)
static void overflow_large_by_16(bool warn) { overflow_past(warn, 1000000, 16); }
MISUSE(overflow_large_by_16)
static void overflow_huge_by_16(bool warn) { overflow_past(warn, 5 * MiB + 123, 16); }
MISUSE(overflow_huge_by_16)

/* A write into a freed block past its first 16 bytes (the secure build
 * fills bytes 16-31 of a free block with a pattern): reported when malloc
 * takes the block again, and the block is not handed out. */
static void use_after_free_write(bool warn)
{
  enum { SIZE = 48, MAX = 100000 };
  static void *kept[MAX];
  unsigned char *p = smalloc_malloc(SIZE);
  CHILD_CHECK(p != NULL, "malloc failed");
  smalloc_free(p);
  ((unsigned char *)sm_opaque(p))[20] ^= 1;
  expect_line("corrupted free list in page at %p: block %p was written after its free "
              "(or freed twice)", page_start_of(p), (void *)p);
  uint64_t errors = child_errors_reported();
  size_t i;
  for (i = 0; i < MAX && child_errors_reported() == errors; i++) {
    kept[i] = smalloc_malloc(SIZE);
    CHILD_CHECK(kept[i] != NULL && kept[i] != p, "malloc(%d) returned %p", SIZE, kept[i]);
  }
  if (!warn)
    child_fail("the write after free was not reported in %zu allocations", i);
  CHILD_CHECK(i < MAX, "the write after free was not reported");
  heap_still_sound(SIZE);
}
MISUSE(use_after_free_write)

/* The same, found by trim: every block of a thread's page back on the
 * free list it allocates from, the one freed last written over after its
 * free.  That page is empty by its counts, so smalloc_collect(true) goes
 * to give it back, and takes its free list first: the write is reported
 * there and the page kept, not given back with the damage unseen.  A
 * thread of its own, so that the page holds no other block. */
static void *trim_finds_write_after_free_thread(void *arg)
{
  enum { SIZE = 48, N = 64 };
  void *v[N];
  (void)arg;
  for (int i = 0; i < N; i++) {
    v[i] = smalloc_malloc(SIZE);
    CHILD_CHECK(v[i] != NULL && page_start_of(v[i]) == page_start_of(v[0]),
                "malloc(%d) number %d returned %p, not in the first one's page", SIZE, i, v[i]);
  }
  for (int i = 0; i < N; i++)
    smalloc_free(v[i]);
  ((unsigned char *)sm_opaque(v[N - 1]))[8] ^= 0x10;   /* its tag word */
  expect_line("corrupted free list in page at %p: block %p was written after its free "
              "(or freed twice)", page_start_of(v[N - 1]), v[N - 1]);
  smalloc_collect(true);
  heap_still_sound(SIZE);
  return NULL;
}

static void write_after_free_found_by_trim(bool warn)
{
  (void)warn;
  pthread_t t;
  CHILD_CHECK(pthread_create(&t, NULL, trim_finds_write_after_free_thread, NULL) == 0, "pthread_create failed");
  CHILD_CHECK(pthread_join(t, NULL) == 0, "pthread_join failed");
}
MISUSE(write_after_free_found_by_trim)

/* ---- warn mode keeps reporting within bounds ------------------------------------ */

static void many_bad_frees(bool warn)
{
  unsigned char buf[64];
  (void)warn;
  child_misuses = 1000;   /* all counted, though fewer are printed */
  expect_line("^free(): invalid pointer 0x");
  for (int i = 0; i < 1000; i++)
    smalloc_free(sm_opaque(buf + (i % 4) * 16));
}

START_TEST(warn_mode_caps_repeated_reports)
{
  outcome_t o;
  char st[64];
  run_child(many_bad_frees, true, &o);
  ck_assert_msg(WIFEXITED(o.status) && WEXITSTATUS(o.status) == 0, "the child %s:\n%s",
                describe(o.status, st, sizeof st), o.err);
  unsigned lines = count_lines(&o);
  ck_assert_msg(lines >= 1 && lines < 100, "1000 bad frees gave %u reports", lines);
}
END_TEST

/* ---- errno ------------------------------------------------------------------------ */

static void *free_list_in_thread(void *arg)
{
  void **v = arg;
  int bad = 0;
  for (size_t i = 0; v[i]; i++) {
    errno = EILSEQ;
    smalloc_free(v[i]);
    bad += errno != EILSEQ;
  }
  return (void *)(uintptr_t)bad;
}

START_TEST(free_keeps_errno)
{
  /* frees that return memory to the OS at once take every path that may
   * make a system call */
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, 0), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_SEGMENT_CACHE, 0), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 0), 0);
  static const size_t sizes[] = {0, 1, 24, 200, 1000, 5000, 9000, 70 * KiB, 256 * KiB,
                                 300 * KiB, 1 * MiB, 2 * MiB, 3 * MiB, 9 * MiB};
  enum { NS = sizeof sizes / sizeof sizes[0], PER = 40 };
  for (int round = 0; round < 3; round++) {
    static void *v[NS * PER + 1];
    static size_t n[NS * PER];
    size_t k = 0;
    for (size_t s = 0; s < NS; s++)
      for (int j = 0; j < (sizes[s] > 256 * KiB ? 2 : PER); j++) {
        n[k] = sizes[s];
        v[k] = smalloc_malloc(n[k]);
        ck_assert_ptr_nonnull(v[k]);
        k++;
      }
    v[k] = NULL;
    if (round == 1) {
      /* freed by another thread */
      pthread_t t;
      void *bad;
      ck_assert_int_eq(pthread_create(&t, NULL, free_list_in_thread, v), 0);
      ck_assert_int_eq(pthread_join(t, &bad), 0);
      ck_assert_msg(bad == NULL, "%zu frees in a thread changed errno", (size_t)(uintptr_t)bad);
      continue;
    }
    for (size_t i = 0; i < k; i++) {
      errno = EILSEQ;
      if (round == 2)
        smalloc_free_sized(v[i], n[i]);
      else
        smalloc_free(v[i]);
      ck_assert_msg(errno == EILSEQ, "free of block %zu changed errno to %d", i, errno);
    }
    errno = EILSEQ;
    smalloc_free(NULL);
    ck_assert_int_eq(errno, EILSEQ);
  }
  errno = EILSEQ;
  smalloc_collect(true);
  ck_assert_int_eq(errno, EILSEQ);
}
END_TEST

int main(void)
{
  Suite *s = suite_create("misuse");
  TCase *tc = sm_tcase("misuse", 60);
  /* (the sanitizer builds' layout does not hand the block out again) */
  if (!SM_TEST_SANITIZED)
    ADD_MISUSE(tc, double_free_batched_while_the_block_is_handed_out_again);
  ADD_MISUSE(tc, free_sized_larger_than_a_small_block);
  ADD_MISUSE(tc, free_sized_larger_than_a_large_block);
  ADD_MISUSE(tc, realloc_of_a_freed_block);
  ADD_MISUSE(tc, realloc_of_a_block_freed_by_another_thread);
  ADD_MISUSE(tc, double_free_both_cross_thread);
  ADD_MISUSE(tc, double_free_cross_thread_after_local_free);
  if (SM_TEST_SECURE) {
    ADD_MISUSE(tc, overflow_small_by_1);
    ADD_MISUSE(tc, overflow_small_by_16);
    ADD_MISUSE(tc, overflow_medium_by_16);
    ADD_MISUSE(tc, overflow_large_by_1);
    ADD_MISUSE(tc, overflow_large_by_16);
    ADD_MISUSE(tc, overflow_huge_by_16);
    ADD_MISUSE(tc, use_after_free_write);
  }
  ADD_MISUSE(tc, double_free_after_stale_write_then_the_page_empties);
  ADD_MISUSE(tc, double_free_into_a_page_on_its_way_home);
  ADD_MISUSE(tc, double_free_from_another_thread_after_stale_write);
  ADD_MISUSE(tc, double_free_from_another_thread_after_its_batch_went);
  ADD_MISUSE(tc, double_free_into_a_full_page_after_the_batch_went);
  ADD_MISUSE(tc, corrupted_hand_over_list);
  ADD_MISUSE(tc, interior_free_in_a_page_with_aligned_blocks);
  ADD_MISUSE(tc, interior_realloc_in_a_page_with_aligned_blocks);
  ADD_MISUSE(tc, realloc_middle_of_small_block);
  ADD_MISUSE(tc, free_middle_of_large_block);
  ADD_MISUSE(tc, free_unit_inside_large_block);
  ADD_MISUSE(tc, free_middle_of_huge_block);
  ADD_MISUSE(tc, free_stack_address);
  ADD_MISUSE(tc, realloc_stack_address);
  ADD_MISUSE(tc, free_static_address);
  ADD_MISUSE(tc, free_libc_block);
  ADD_MISUSE(tc, free_mmap_page);
  ADD_MISUSE(tc, free_mmap_unit_start);
  ADD_MISUSE(tc, realloc_foreign);
  ADD_MISUSE(tc, realloc_foreign_mapping);
  ADD_MISUSE(tc, usable_size_foreign);
  ADD_MISUSE(tc, usable_size_libc_block);
  ADD_MISUSE(tc, usable_size_interior_small);
  ADD_MISUSE(tc, usable_size_interior_large);
  ADD_MISUSE(tc, usable_size_interior_huge);
  ADD_MISUSE(tc, usable_size_freed);
  ADD_MISUSE(tc, free_sized_foreign);
  /* misuse that only the fast paths' named checks catch (configure
   * --enable-checks; internal.h): tested where they are built in */
  if (SM_CHECK_DOUBLE_FREE) {
    ADD_MISUSE(tc, double_free_at_once);
    ADD_MISUSE(tc, double_free_after_other_frees);
    ADD_MISUSE(tc, double_free_in_a_sampled_page);
    ADD_MISUSE(tc, double_free_after_reuse_of_others);
    ADD_MISUSE(tc, double_free_after_cross_thread_free);
    ADD_MISUSE(tc, double_free_while_cross_thread_free_is_batched);
    ADD_MISUSE(tc, double_free_after_stale_write);
    ADD_MISUSE(tc, double_free_after_stale_write_deep);
    ADD_MISUSE(tc, double_free_of_an_aligned_block);
    if (!SM_TEST_SECURE)   /* its frees go on local_free, which trim does not walk */
      ADD_MISUSE(tc, write_after_free_found_by_trim);
  }
  if (SM_CHECK_BLOCK_START) {
    ADD_MISUSE(tc, free_middle_of_small_block);
    ADD_MISUSE(tc, free_middle_of_medium_block);
    ADD_MISUSE(tc, free_segment_header);
  }
  if (SM_CHECK_FREE_LIST) {
    ADD_MISUSE(tc, corrupted_free_list);
    ADD_MISUSE(tc, corrupted_thread_free_list);
  }
  /* a link aimed at the copy of the page's key: either check sees it */
  if (SM_CHECK_FREE_LIST || SM_CHECK_DOUBLE_FREE)
    ADD_MISUSE(tc, free_list_link_into_the_segment_header);
  tcase_add_test(tc, warn_mode_caps_repeated_reports);
  tcase_add_test(tc, free_keeps_errno);
  tcase_add_test(tc, reused_blocks_hold_no_list_words);
  tcase_add_test(tc, a_page_gets_a_new_key_each_life);
  suite_add_tcase(s, tc);
  return sm_run_suite(s);
}
