/* Helpers shared by the libcheck suites.
 *
 * Every suite calls the smalloc_* names so that it also runs against a
 * --disable-override build under a sanitizer; SM_OVERRIDE (config.h) tells a
 * suite that the libc names are smalloc's too and may be checked as such.
 *
 * Nothing here allocates behind the caller's back: suites count blocks through
 * the stats, and a helper that called malloc would skew the counts.
 */
#ifndef SMALLOC_TESTS_COMMON_H
#define SMALLOC_TESTS_COMMON_H

#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "smalloc.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)
#define GiB ((size_t)1 << 30)

/* Built with AddressSanitizer or ThreadSanitizer: their shadow memory
 * makes the resident size say little about smalloc's, and ThreadSanitizer
 * maps memory of its own under an address-space limit. */
#if defined(__SANITIZE_THREAD__)
#define SM_TEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SM_TEST_TSAN 1
#endif
#endif
#ifndef SM_TEST_TSAN
#define SM_TEST_TSAN 0
#endif
#if defined(__SANITIZE_ADDRESS__)
#define SM_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SM_TEST_ASAN 1
#endif
#endif
#ifndef SM_TEST_ASAN
#define SM_TEST_ASAN 0
#endif
#define SM_TEST_SANITIZED (SM_TEST_TSAN || SM_TEST_ASAN)

#ifdef SM_OVERRIDE
#define SM_HAVE_OVERRIDE 1
#else
#define SM_HAVE_OVERRIDE 0
#endif

/* ---- geometry the suites expect ---------------------------------------------
 * The size classes, pages and realloc behaviour of smalloc(7), in
 * both layouts: the plain one and --enable-secure (SM_SECURE), which
 *   - ends every small and medium block with an 8-byte canary: a request
 *     of n bytes is served by the class of max(n, 16) + 8 bytes and its
 *     usable size is the block size - 8 (classes[].block_size stays the
 *     real block size);
 *   - so serves from the classes only requests up to 256 KiB - 8;
 *   - gives up the last 4 KiB of every small and medium page to a guard;
 *   - builds fresh free lists in random order (consecutive mallocs need
 *     not return adjacent blocks);
 *   - copies on realloc of a huge block (no mremap) and keeps a large
 *     block in place only when the new size fits.
 * Suites compute their expectations through these helpers instead of
 * testing SM_SECURE themselves. */

#ifdef SM_SECURE
#define SM_TEST_SECURE 1
#define SM_TEST_CANARY ((size_t)8)
#define SM_TEST_GUARD ((size_t)4096)
#else
#define SM_TEST_SECURE 0
#define SM_TEST_CANARY ((size_t)0)
#define SM_TEST_GUARD ((size_t)0)
#endif

#define SM_TEST_SMALL_PAGE ((size_t)64 << 10)   /* blocks <= 1 KiB */
#define SM_TEST_MEDIUM_PAGE ((size_t)512 << 10) /* blocks <= 256 KiB */
#define SM_TEST_SMALL_MAX ((size_t)1 << 10)
#define SM_TEST_CLASS_MAX ((size_t)256 << 10)    /* the largest block size */
#define SM_TEST_SEGMENT_HDR ((size_t)16 << 10)  /* before page 0 */
#define SM_TEST_SEGMENT ((uintptr_t)4 << 20)    /* a segment, aligned to its size */
/* The largest request served from a size class; above it, "large". */
#define SM_TEST_CLASS_MAX_REQUEST (SM_TEST_CLASS_MAX - SM_TEST_CANARY)
/* The largest request served by the class of block bytes (a class size, at
 * least 32), for a test that wants blocks of that size in both layouts. */
#define SM_TEST_REQUEST_FOR(block) ((size_t)(block) - SM_TEST_CANARY)

/* Waste a request may carry beyond the contract's class rounding
 * (usable - n < max(16, n/8)): in the secure layout the canary and the
 * rounding up to 16 usable bytes. */
#define SM_TEST_EXTRA_WASTE (SM_TEST_SECURE ? SM_TEST_CANARY + 15 : 0)

/* The smallest block size of a class holding b bytes: multiples of 16 up
 * to 256, then 8 classes per power of two; b <= SM_TEST_CLASS_MAX. */
static inline size_t sm_test_class_round(size_t b)
{
  if (b <= 16)
    return 16;
  if (b <= 256)
    return (b + 15) & ~(size_t)15;
  size_t pow = (size_t)1 << (63 - __builtin_clzll((unsigned long long)(b - 1)));
  size_t step = pow / 8;
  return (b + step - 1) / step * step;
}

/* Block size of the class serving malloc(n), n <= SM_TEST_CLASS_MAX_REQUEST. */
static inline size_t sm_test_class_size(size_t n)
{
  if (SM_TEST_SECURE)
    n = (n < 16 ? 16 : n) + SM_TEST_CANARY;
  return sm_test_class_round(n);
}

/* malloc_usable_size of malloc(n), n <= SM_TEST_CLASS_MAX_REQUEST. */
static inline size_t sm_test_usable(size_t n)
{
  return sm_test_class_size(n) - SM_TEST_CANARY;
}

/* Size of the pages holding blocks of block_size bytes (a class size);
 * pages are aligned to their size. */
static inline size_t sm_test_page_size(size_t block_size)
{
  return block_size <= SM_TEST_SMALL_MAX ? SM_TEST_SMALL_PAGE : SM_TEST_MEDIUM_PAGE;
}

/* Blocks of block_size bytes (a class size) in page page_index of its
 * segment (page 0 also holds the segment header). */
static inline size_t sm_test_page_capacity(size_t block_size, size_t page_index)
{
  size_t area = sm_test_page_size(block_size);
  if (page_index == 0)
    area -= SM_TEST_SEGMENT_HDR;
  return (area - SM_TEST_GUARD) / block_size;
}

/* Slow-path entries that give no page back: n blocks of malloc(size),
 * more than one page's worth (the page malloc takes blocks from gets
 * every block freed into it back on its free list, so rounds on one page
 * would need no slow path), all freed again except the first on each
 * page, which go to anchors (at most max; the caller frees them) so that
 * no page of the class ever empties, retires or goes back.  Returns
 * false when malloc fails or anchors is full. */
static inline bool sm_test_round_anchored(void **v, size_t n, size_t size, void **anchors,
                                          size_t *nanchors, size_t max)
{
  uintptr_t mask = ~(uintptr_t)(sm_test_page_size(sm_test_class_size(size)) - 1);
  for (size_t i = 0; i < n; i++) {
    v[i] = smalloc_malloc(size);
    if (v[i] == NULL) return false;
  }
  for (size_t i = 0; i < n; i++) {
    bool anchored = false;
    for (size_t k = 0; k < *nanchors && !anchored; k++)
      anchored = ((uintptr_t)anchors[k] & mask) == ((uintptr_t)v[i] & mask);
    if (!anchored) {
      if (*nanchors == max) return false;
      anchors[(*nanchors)++] = v[i];
    } else {
      smalloc_free(v[i]);
    }
  }
  return true;
}

/* Give the calling thread a heap, as its first allocation does: built
 * with --disable-override, a test's main thread may have none, and a
 * thread started while no other has one takes its pages from segments
 * of its own, not from those all threads share (page.c:
 * sm_page_borrow). */
static inline void sm_test_heap_here(void)
{
  smalloc_free(smalloc_malloc(16));
}

/* realloc of a huge block that stays huge remaps it (huge_remaps) rather
 * than allocating a new block and freeing the old one. */
static inline bool sm_test_huge_realloc_remaps(void)
{
  return !SM_TEST_SECURE;
}

/* ---- the test program run again ----------------------------------------------
 * A test that needs a process of its own (a variable read as the library
 * starts, a process of one thread, what happens at exit) runs this program
 * again, with an argument its main() knows (argv: the suite's name, that
 * argument and any more, NULL-terminated).  The child's environment is
 * this one's without any SMALLOC_* variable, plus the variables in add
 * (NULL-terminated, or NULL): each child names every option it needs,
 * SMALLOC_BACKGROUND=0 too.  Its standard output and error go to out and
 * err (-1: this process's).  Returns its pid, for sm_test_rerun_wait. */
extern char **environ;

static inline pid_t sm_test_rerun_start(const char *const argv[], const char *const add[], int out, int err)
{
  static char *envp[4096];
  size_t n = 0;
  for (char **e = environ; *e && n < 4000; e++)
    if (strncmp(*e, "SMALLOC_", 8) != 0)
      envp[n++] = *e;
  for (; add && *add && n < 4095; add++)
    envp[n++] = (char *)*add;
  envp[n] = NULL;
  fflush(NULL);
  pid_t pid = fork();
  ck_assert_msg(pid >= 0, "fork: %s", strerror(errno));
  if (pid == 0) {
    if ((out >= 0 && dup2(out, 1) < 0) || (err >= 0 && dup2(err, 2) < 0))
      _exit(126);
    execve("/proc/self/exe", (char *const *)argv, envp);
    _exit(127);
  }
  return pid;
}

/* Wait for the child sm_test_rerun_start started: its wait status. */
static inline int sm_test_rerun_wait(pid_t pid)
{
  int status;
  ck_assert_int_eq(waitpid(pid, &status, 0), pid);
  return status;
}

/* The same, started and waited for, and it must exit 0: what is wrong,
 * it says on its standard error (err, or this process's).  Returns its
 * pid (a file it wrote may be named for it). */
static inline pid_t sm_test_rerun(const char *const argv[], const char *const add[], int out, int err)
{
  pid_t pid = sm_test_rerun_start(argv, add, out, err);
  int status = sm_test_rerun_wait(pid);
  ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "%s %s: status %#x (its stderr says why)",
                argv[0], argv[1] ? argv[1] : "", (unsigned)status);
  return pid;
}

/* ck_assert* reports every passing check to the parent process (one write
 * per call in fork mode), far too slow inside loops of a million steps.  This
 * one costs a branch until it fails. */
#define SM_CHECK(expr, fmt, ...)                                               \
  do {                                                                         \
    if (__builtin_expect(!(expr), 0))                                          \
      ck_abort_msg("check '%s' failed: " fmt, #expr, ##__VA_ARGS__);           \
  } while (0)

/* Keep the compiler from reasoning about a pointer or a size (it knows what
 * malloc, free and memset do and may drop a malloc/free pair or fold a size
 * check on a constant). */
static inline void *sm_opaque(void *p)
{
  __asm__ volatile("" : "+r"(p) : : "memory");
  return p;
}

static inline size_t sm_opaque_size(size_t n)
{
  __asm__ volatile("" : "+r"(n));
  return n;
}

static inline bool sm_is_aligned(const void *p, size_t alignment)
{
  return ((uintptr_t)p & (alignment - 1)) == 0;
}

static inline size_t sm_page_size(void)
{
  return (size_t)sysconf(_SC_PAGESIZE);
}

/* The process's size and resident pages (/proc/self/statm), read
 * without allocating (open and read, no stdio), so that reading them
 * changes nothing they measure (stdio's buffer is a block of smalloc's,
 * a medium one in the secure build); false when unreadable. */
static inline bool sm_test_statm(unsigned long *size_pages, unsigned long *resident_pages)
{
  char buf[128];
  int fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return false;
  ssize_t len = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (len <= 0)
    return false;
  buf[len] = '\0';
  return sscanf(buf, "%lu %lu", size_pages, resident_pages) == 2;
}

/* The process's address space in use (what RLIMIT_AS counts). */
static inline size_t sm_test_vm_bytes(void)
{
  unsigned long size_pages, resident;
  return sm_test_statm(&size_pages, &resident) ? size_pages * sm_page_size() : 0;
}

/* ---- a check in a child process ------------------------------------------- */

/* Tests that set an address-space limit or otherwise spoil their process
 * run their body in a child; the child reports its first failed check
 * through a pipe and exits, and the test fails with that report. */
static int sm_child_fd __attribute__((unused)) = -1;

#define SM_CHILD_CHECK(cond, ...)                                              \
  do {                                                                         \
    if (!(cond)) {                                                             \
      char m_[512];                                                            \
      int n_ = snprintf(m_, sizeof m_, __VA_ARGS__);                           \
      if (write(sm_child_fd, m_, n_ > 0 ? (size_t)n_ : 0) < 0)                 \
        _exit(3);                                                              \
      _exit(1);                                                                \
    }                                                                          \
  } while (0)

static inline void sm_test_in_child(void (*body)(void))
{
  int fds[2];
  ck_assert_int_eq(pipe(fds), 0);
  pid_t pid = fork();
  ck_assert_msg(pid >= 0, "fork: %s", strerror(errno));
  if (pid == 0) {
    close(fds[0]);
    sm_child_fd = fds[1];
    body();
    _exit(0);
  }
  close(fds[1]);
  char msg[513];
  ssize_t n = read(fds[0], msg, sizeof msg - 1);
  msg[n > 0 ? n : 0] = '\0';
  close(fds[0]);
  int status;
  while (waitpid(pid, &status, 0) < 0)
    ck_assert_msg(errno == EINTR, "waitpid: %s", strerror(errno));
  ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child: %s (status %#x)",
                msg[0] ? msg : "died", status);
}

/* ---- random numbers: xorshift64*, fixed seeds, reproducible runs --------- */

typedef struct sm_rng {
  uint64_t s;
} sm_rng_t;

static inline void sm_rng_seed(sm_rng_t *r, uint64_t seed)
{
  r->s = seed ? seed : 0x9E3779B97F4A7C15u;
}

static inline uint64_t sm_rng_next(sm_rng_t *r)
{
  uint64_t x = r->s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  r->s = x;
  return x * 0x2545F4914F6CDD1Du;
}

/* Uniform in [0, n), n > 0 (the bias of the multiply-shift is irrelevant). */
static inline size_t sm_rng_below(sm_rng_t *r, size_t n)
{
  return (size_t)(((unsigned __int128)sm_rng_next(r) * n) >> 64);
}

/* Uniform in [lo, hi]. */
static inline size_t sm_rng_range(sm_rng_t *r, size_t lo, size_t hi)
{
  return lo + sm_rng_below(r, hi - lo + 1);
}

/* ---- patterns -------------------------------------------------------------
 * Byte i of a block filled with seed s depends on s and i only, so a block's
 * prefix still checks after realloc moved it.  Derive the seed from the
 * block's first address and a generation number (sm_pattern_seed) so that two
 * blocks, or two lives of one block, never carry the same bytes. */

static inline uint64_t sm_mix64(uint64_t x)
{
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9u;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBu;
  x ^= x >> 31;
  return x;
}

static inline uint64_t sm_pattern_seed(const void *p, uint64_t generation)
{
  return sm_mix64((uint64_t)(uintptr_t)p ^ (generation * 0x9E3779B97F4A7C15u));
}

static inline uint64_t sm_pattern_word(uint64_t seed, size_t word)
{
  /* Cheaper than a full mix per word; still differs in every byte lane. */
  uint64_t x = seed + (uint64_t)word * 0x9E3779B97F4A7C15u;
  x ^= x >> 29;
  x *= 0xBF58476D1CE4E5B9u;
  return x ^ (x >> 32);
}

static inline uint8_t sm_pattern_byte(uint64_t seed, size_t i)
{
  return (uint8_t)(sm_pattern_word(seed, i / 8) >> (8 * (i % 8)));
}

static inline void sm_pattern_fill(void *p, size_t n, uint64_t seed)
{
  unsigned char *b = p;
  size_t w;
  for (w = 0; w < n / 8; w++) {
    uint64_t v = sm_pattern_word(seed, w);
    memcpy(b + 8 * w, &v, 8);
  }
  for (size_t i = 8 * w; i < n; i++)
    b[i] = sm_pattern_byte(seed, i);
}

/* Fill [from, to) of a block whose bytes follow seed (to grow a filled
 * prefix after realloc). */
static inline void sm_pattern_fill_range(void *p, size_t from, size_t to,
                                         uint64_t seed)
{
  unsigned char *b = p;
  for (; from < to && from % 8; from++)
    b[from] = sm_pattern_byte(seed, from);
  for (; from + 8 <= to; from += 8) {
    uint64_t v = sm_pattern_word(seed, from / 8);
    memcpy(b + from, &v, 8);
  }
  for (; from < to; from++)
    b[from] = sm_pattern_byte(seed, from);
}

/* Offset of the first byte that differs from the pattern, or SIZE_MAX. */
static inline size_t sm_pattern_find_bad(const void *p, size_t n, uint64_t seed)
{
  const unsigned char *b = p;
  size_t w;
  for (w = 0; w < n / 8; w++) {
    uint64_t v, want = sm_pattern_word(seed, w);
    memcpy(&v, b + 8 * w, 8);
    if (v != want)
      break;
  }
  for (size_t i = 8 * w; i < n; i++)
    if (b[i] != sm_pattern_byte(seed, i))
      return i;
  return SIZE_MAX;
}

static inline bool sm_pattern_ok(const void *p, size_t n, uint64_t seed)
{
  return sm_pattern_find_bad(p, n, seed) == SIZE_MAX;
}

/* Offset of the first byte of p[0..n) that is not c, or SIZE_MAX. */
static inline size_t sm_find_not_byte(const void *p, size_t n, unsigned char c)
{
  const unsigned char *b = p;
  uint64_t want = 0x0101010101010101u * c;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v;
    memcpy(&v, b + i, 8);
    if (v != want)
      break;
  }
  for (; i < n; i++)
    if (b[i] != c)
      return i;
  return SIZE_MAX;
}

/* ---- the resident size ---------------------------------------------------- */

/* Each line of /proc/self/smaps (without its newline), read in pieces
 * into a static buffer: no allocation.  false when it cannot be read. */
static inline bool sm_test_smaps_each(void (*fn)(const char *line, void *ctx), void *ctx)
{
  static char buf[65536];
  int fd = open("/proc/self/smaps", O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return false;
  size_t have = 0;
  bool eof = false;
  while (!eof || have > 0) {
    if (!eof && have < sizeof buf - 1) {
      ssize_t n = read(fd, buf + have, sizeof buf - 1 - have);
      if (n <= 0)
        eof = true;
      else
        have += (size_t)n;
    }
    buf[have] = '\0';
    char *nl = strchr(buf, '\n');
    if (nl == NULL && !eof && have < sizeof buf - 1)
      continue;
    size_t len = nl ? (size_t)(nl - buf) + 1 : have;
    if (nl)
      *nl = '\0';
    fn(buf, ctx);
    memmove(buf, buf + len, have - len);
    have -= len;
  }
  close(fd);
  return true;
}

typedef struct sm_test_rss_ctx {
  unsigned long long size, kib;
} sm_test_rss_ctx_t;

static inline void sm_test_rss_line(const char *line, void *arg)
{
  sm_test_rss_ctx_t *c = arg;
  unsigned long long lo, hi, v;
  if (sscanf(line, "%llx-%llx ", &lo, &hi) == 2)
    c->size = hi - lo;
  else if (sscanf(line, "Rss: %llu kB", &v) == 1 && c->size < (1ull << 40))
    c->kib += v;
}

/* Resident bytes of the mappings under 1 TiB (the sanitizers' shadow
 * mappings are terabytes); 0 when they cannot be read. */
static inline size_t sm_test_rss_unshadowed(void)
{
  sm_test_rss_ctx_t c = {0, 0};
  return sm_test_smaps_each(sm_test_rss_line, &c) ? (size_t)c.kib * 1024 : 0;
}

typedef struct sm_test_vmflags_ctx {
  uintptr_t addr;
  bool in;
  char flags[256];
} sm_test_vmflags_ctx_t;

static inline void sm_test_vmflags_line(const char *line, void *arg)
{
  sm_test_vmflags_ctx_t *c = arg;
  unsigned long long lo, hi;
  if (sscanf(line, "%llx-%llx ", &lo, &hi) == 2)
    c->in = c->addr >= lo && c->addr < hi;
  else if (c->in && strncmp(line, "VmFlags:", 8) == 0)
    snprintf(c->flags, sizeof c->flags, "%.200s ", line + 8);
}

/* Whether the mapping that holds addr has the two-letter flag (smaps'
 * VmFlags: "hg" advised for huge pages, "nh" advised against them). */
static inline bool sm_test_vmflag(const void *addr, const char *flag)
{
  sm_test_vmflags_ctx_t c = {(uintptr_t)addr, false, ""};
  char word[8];
  snprintf(word, sizeof word, " %s ", flag);
  return sm_test_smaps_each(sm_test_vmflags_line, &c) && strstr(c.flags, word) != NULL;
}

/* Resident bytes of this process (sm_test_statm).  In the
 * sanitizer builds, without the sanitizer's shadow memory, which is not
 * smalloc's: on a kernel that gives anonymous memory a page for every
 * read (seen on 6.18), the shadow of memory a test touched stays
 * resident after smalloc gave that memory back. */
static inline size_t sm_test_rss(void)
{
  if (SM_TEST_SANITIZED)
    return sm_test_rss_unshadowed();
  unsigned long size_pages, resident;
  return sm_test_statm(&size_pages, &resident) ? (size_t)resident * sm_page_size() : 0;
}

/* ---- statistics ---------------------------------------------------------- */

static inline void sm_stats_snap(smalloc_stats_t *s)
{
  memset(s, 0, sizeof *s);
  s->size = sizeof *s;
  int rc = smalloc_stats_get(s);
  SM_CHECK(rc == 0, "smalloc_stats_get returned %d", rc);
}

/* A snapshot that reports failure instead of asserting (safe between two
 * snapshots that must not see libcheck's own allocations). */
static inline int sm_test_snap(smalloc_stats_t *s)
{
  memset(s, 0, sizeof *s);
  s->size = sizeof *s;
  return smalloc_stats_get(s);
}

/* Index in classes[] of the class that serves a request of n bytes. */
static inline int sm_test_class_index(const smalloc_stats_t *s, size_t n)
{
  int best = -1;
  uint64_t want = sm_test_class_size(n);
  for (uint32_t i = 0; i < s->nclasses && i < SMALLOC_STATS_CLASSES; i++) {
    uint64_t b = s->classes[i].block_size;
    if (b != 0 && b >= want && (best < 0 || b < s->classes[best].block_size))
      best = (int)i;
  }
  return best;
}

/* Steps between threads of a test: one waits until another has set a
 * phase at least as high. */
typedef struct sm_test_phase {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int phase;
} sm_test_phase_t;
#define SM_TEST_PHASE_INIT {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0}

static inline void sm_test_phase_set(sm_test_phase_t *p, int phase)
{
  pthread_mutex_lock(&p->mu);
  p->phase = phase;
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
}

static inline void sm_test_phase_wait(sm_test_phase_t *p, int phase)
{
  pthread_mutex_lock(&p->mu);
  while (p->phase < phase)
    pthread_cond_wait(&p->cv, &p->mu);
  pthread_mutex_unlock(&p->mu);
}

static inline uint64_t sm_blocks_in_use(void)
{
  smalloc_stats_t s;
  sm_stats_snap(&s);
  return s.blocks_in_use;
}

/* ---- intervals: no two live blocks overlap -------------------------------- */

typedef struct sm_interval {
  uintptr_t lo, hi; /* [lo, hi) */
} sm_interval_t;

static inline int sm_interval_cmp(const void *a, const void *b)
{
  const sm_interval_t *x = a, *y = b;
  return x->lo < y->lo ? -1 : x->lo > y->lo;
}

/* Sorts v; returns the index i of the first interval overlapping v[i-1], or
 * 0 when all are disjoint. */
static inline size_t sm_intervals_overlap(sm_interval_t *v, size_t n)
{
  qsort(v, n, sizeof *v, sm_interval_cmp);
  for (size_t i = 1; i < n; i++)
    if (v[i].lo < v[i - 1].hi)
      return i;
  return 0;
}

/* ---- running a suite --------------------------------------------------------
 * Fork mode gives every test a fresh process, so the counters a test reads
 * start from its own baseline; the suites need it, and set it whatever
 * CK_FORK says (with CK_FORK=no, misuse's tests that expect an abort end
 * the run, pool's made-up pages stay in the process's pool for the next
 * test to trip on, and fork, large, background and prof fail or stop; to
 * debug a test, run gdb with "set follow-fork-mode child").  Timeouts are
 * generous because sanitizer builds run these suites several times
 * slower; runtime is kept small by the tests themselves. */

static inline TCase *sm_tcase(const char *name, double timeout)
{
  TCase *tc = tcase_create(name);
  tcase_set_timeout(tc, timeout);
  return tc;
}

static inline int sm_run_suite(Suite *s)
{
  SRunner *sr = srunner_create(s);
  srunner_set_fork_status(sr, CK_FORK);
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed != 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* ---- the documented option ranges and slow-path step names ------------ */

typedef struct sm_test_option_range {
  smalloc_option_t opt;
  long min, max;
} sm_test_option_range_t;

/* smalloc_option_set(3): every option, in enum order */
static const sm_test_option_range_t sm_test_option_ranges[SMALLOC_OPTION_COUNT] = {
  {SMALLOC_OPTION_STATS, 0, 2},
  {SMALLOC_OPTION_VERBOSE, 0, 1},
  {SMALLOC_OPTION_RETIRE_CYCLES, 0, 1000000},
  {SMALLOC_OPTION_PURGE_DELAY, 0, 3600000},
  {SMALLOC_OPTION_SEGMENT_CACHE, 0, 1024},
  {SMALLOC_OPTION_ON_ERROR, 0, 1},
  {SMALLOC_OPTION_BACKGROUND, 0, 1},
  {SMALLOC_OPTION_STATS_INTERVAL, 0, 86400000},
  {SMALLOC_OPTION_PROF, 0, 1},
  {SMALLOC_OPTION_PROF_RATE, 1, 1073741824},
  {SMALLOC_OPTION_PROF_EVENT_RATE, 1, 1000000},
  {SMALLOC_OPTION_PROF_LEAKS, 0, 1},
  {SMALLOC_OPTION_PROF_SEED, 0, 2147483647},
  {SMALLOC_OPTION_HUGEPAGES, 0, 2},
  {SMALLOC_OPTION_HEAP_CACHE, 0, 1024},
};

/* the names smalloc_stats_print_json uses for slow_steps[] (bench/run.py
 * keeps a copy for its tables) */
static const char *const sm_test_step_names[SMALLOC_STEP_COUNT] = {
  "local_swap", "thread_collect", "extend", "next_page",
  "retired_page", "fresh_page", "new_segment",
};

#endif /* SMALLOC_TESTS_COMMON_H */
