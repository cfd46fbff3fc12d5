/* libFuzzer target: an input is a program of allocator operations on 64
 * slots.  A shadow model keeps each live block's size, alignment and
 * contents (a pattern from a seed, or zeros for calloc); every block is
 * checked before it is freed or resized, every new block for alignment,
 * usable size and overlap with the live ones.  Any mismatch aborts.
 *
 * The library is compiled into the fuzzer from the lib/ sources without
 * the libc names (SM_OVERRIDE unset), so libFuzzer and the sanitizer
 * runtime keep the system malloc and only the smalloc_* calls reach it.  Build and
 * run with tests/fuzz/run.sh.
 *
 * Input format, one record after another (bytes past the end read as 0):
 *   op slot args...
 * op % OP_COUNT picks the operation, slot % SLOTS the slot.  Sizes take one
 * byte of kind and up to two bytes of value (see read_size), alignments one
 * byte (read_align).  A record on an occupied slot that allocates frees the
 * old block first; one on an empty slot that needs a block does nothing.
 *
 * Misuse operations run with SMALLOC_ON_ERROR=warn: a double free (at
 * once, after a stale write into the freed block's first or second word,
 * or from the other thread), an interior free, a realloc of a freed
 * block.  Each must be reported (errors_reported counts it) and leave the
 * heap sound: no later block may overlap a live one, and live blocks keep
 * their contents. */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "smalloc.h"

#define SLOTS 64
#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)
#define PAGE ((size_t)4096)
/* Blocks larger than 2 * EDGE carry their pattern in the first and last
 * EDGE bytes only, so that a few multi-MiB blocks do not make every run
 * a memset benchmark. */
#define EDGE ((size_t)4096)
/* Requests above this fail with ENOMEM (no machine we run on has it). */
#define ABSURD ((size_t)1 << 46)

enum op {
  OP_MALLOC, OP_CALLOC, OP_REALLOC, OP_REALLOCARRAY, OP_POSIX_MEMALIGN,
  OP_ALIGNED_ALLOC, OP_MEMALIGN, OP_VALLOC, OP_PVALLOC, OP_FREE, OP_FREE_SIZED,
  OP_FREE_ALIGNED_SIZED, OP_THREAD_FREE, OP_THREAD_REALLOC, OP_THREAD_ALLOC_EXIT,
  OP_COLLECT, OP_USABLE_SIZE, OP_BURST, OP_OPTION, OP_CALLOC_OVERFLOW,
  OP_DOUBLE_FREE, OP_INTERIOR_FREE, OP_REALLOC_FREED,
  OP_COUNT
};

typedef struct slot {
  unsigned char *p;
  size_t n;        /* bytes asked for */
  size_t align;    /* alignment asked for (16 for plain allocations) */
  uint64_t seed;   /* contents: pattern from seed, or zeros when zero */
  bool zero;
} slot_t;

static slot_t slots[SLOTS];
static uint64_t generation;

/* ---- failing -------------------------------------------------------------------- */

static void __attribute__((noreturn, format(printf, 1, 2))) fail(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fputs("fuzz_alloc: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  abort();
}

#define CHECK(expr, ...)                                                       \
  do {                                                                         \
    if (__builtin_expect(!(expr), 0))                                          \
      fail(__VA_ARGS__);                                                       \
  } while (0)

/* ---- input ------------------------------------------------------------------------ */

typedef struct input {
  const uint8_t *d;
  size_t n, i;
} input_t;

static uint8_t byte(input_t *in)
{
  return in->i < in->n ? in->d[in->i++] : 0;
}

static size_t u16(input_t *in)
{
  size_t lo = byte(in);
  return lo | (size_t)byte(in) << 8;
}

/* Mostly small, sometimes medium, large (one block per segment) or huge
 * (own mapping, up to 8 MiB). */
static size_t read_size(input_t *in)
{
  uint8_t kind = byte(in);
  switch (kind % 8) {
  case 0: case 1: case 2:
    return byte(in);                          /* 0..255 */
  case 3: case 4:
    return u16(in) % (8 * KiB + 64);          /* small, around the medium edge */
  case 5:
    return u16(in) << 2;                      /* medium: up to 256 KiB */
  case 6:
    return (256 * KiB - 64) + (u16(in) << 5); /* large: up to 2.25 MiB */
  default:
    return (u16(in) << 7) + (kind >> 3);      /* up to 8 MiB */
  }
}

/* A power of two from 1 to 8 MiB, or (high bit set) any value up to 200,
 * mostly not a valid alignment. */
static size_t read_align(input_t *in)
{
  uint8_t b = byte(in);
  if (b & 0x80)
    return b & 0x7f ? (size_t)(b & 0x7f) * 3 : 0;
  return (size_t)1 << (b % 24);
}

static bool pow2(size_t a)
{
  return a != 0 && (a & (a - 1)) == 0;
}

/* ---- patterns ------------------------------------------------------------------------ */

static uint64_t mix(uint64_t x)
{
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9u;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBu;
  return x ^ (x >> 31);
}

static uint8_t pat(uint64_t seed, size_t i)
{
  return (uint8_t)(mix(seed + i / 8) >> (8 * (i % 8)));
}

/* The checked ranges of a block of n bytes: all of it, or its two edges. */
static void ranges(size_t n, size_t r[2][2])
{
  if (n <= 2 * EDGE) {
    r[0][0] = 0, r[0][1] = n;
    r[1][0] = r[1][1] = n;
  } else {
    r[0][0] = 0, r[0][1] = EDGE;
    r[1][0] = n - EDGE, r[1][1] = n;
  }
}

static void fill(slot_t *s)
{
  size_t r[2][2];
  ranges(s->n, r);
  for (int k = 0; k < 2; k++)
    for (size_t i = r[k][0]; i < r[k][1]; i++)
      s->p[i] = s->zero ? 0 : pat(s->seed, i);
}

/* Byte i of the block as the model has it. */
static uint8_t want(const slot_t *s, size_t i)
{
  return s->zero ? 0 : pat(s->seed, i);
}

static void check_contents(const slot_t *s, const char *when)
{
  size_t r[2][2];
  ranges(s->n, r);
  for (int k = 0; k < 2; k++)
    for (size_t i = r[k][0]; i < r[k][1]; i++)
      CHECK(s->p[i] == want(s, i), "%s: block %p (%zu bytes, %s): byte %zu is %#x, want %#x",
            when, (void *)s->p, s->n, s->zero ? "zeroed" : "pattern", i, s->p[i],
            want(s, i));
}

/* ---- the model ----------------------------------------------------------------------- */

static void check_block(const slot_t *s, const char *when)
{
  CHECK(((uintptr_t)s->p & (s->align - 1)) == 0, "%s: block %p not aligned to %zu", when,
        (void *)s->p, s->align);
  size_t u = smalloc_malloc_usable_size(s->p);
  CHECK(u >= s->n, "%s: block %p: usable size %zu < %zu", when, (void *)s->p, u, s->n);
  check_contents(s, when);
}

/* A new block: aligned, big enough, disjoint from every live block. */
static void adopt(slot_t *s, void *p, size_t n, size_t align, bool zero, const char *who)
{
  CHECK(p != NULL, "%s(%zu, alignment %zu) failed: %s", who, n, align, strerror(errno));
  s->p = p;
  s->n = n;
  s->align = align;
  if (n >= 16 && s->align < 16)
    s->align = 16;   /* every block of 16 bytes or more is 16-byte aligned */
  CHECK(((uintptr_t)p & (s->align - 1)) == 0, "%s(%zu): %p not aligned to %zu", who, n, p,
        s->align);
  size_t u = smalloc_malloc_usable_size(p);
  CHECK(u >= n, "%s(%zu) = %p: usable size %zu", who, n, p, u);
  uintptr_t lo = (uintptr_t)p, hi = lo + (n ? n : 1);
  for (size_t i = 0; i < SLOTS; i++) {
    const slot_t *o = &slots[i];
    if (o == s || !o->p)
      continue;
    uintptr_t olo = (uintptr_t)o->p, ohi = olo + (o->n ? o->n : 1);
    CHECK(hi <= olo || ohi <= lo, "%s(%zu) = %p overlaps live block %p of %zu bytes", who, n,
          p, (void *)o->p, o->n);
  }
  s->seed = mix(++generation);
  s->zero = zero;
  if (zero)
    check_contents(s, who);   /* calloc: zero from the start */
  else
    fill(s);
}

static void release(slot_t *s, int how)
{
  if (!s->p)
    return;
  check_block(s, "before free");
  int saved = errno = 1234;
  switch (how) {
  case 1:
    smalloc_free_sized(s->p, s->n);
    break;
  case 2:
    smalloc_free_aligned_sized(s->p, s->align, s->n);
    break;
  default:
    smalloc_free(s->p);
  }
  CHECK(errno == saved, "free changed errno to %d", errno);
  s->p = NULL;
}

static bool in_ranges(size_t r[2][2], size_t i)
{
  return (i >= r[0][0] && i < r[0][1]) || (i >= r[1][0] && i < r[1][1]);
}

/* After realloc from old_n to s->n: the kept prefix still reads as the
 * model says wherever the old block was checked; every other byte the new
 * block is checked over (grown, or newly an edge) is written anew. */
static void after_resize(slot_t *s, size_t old_n, const char *who)
{
  size_t keep = old_n < s->n ? old_n : s->n;
  size_t ro[2][2], rn[2][2];
  ranges(old_n, ro);
  ranges(s->n, rn);
  for (int k = 0; k < 2; k++)
    for (size_t i = ro[k][0]; i < ro[k][1] && i < keep; i++)
      CHECK(s->p[i] == want(s, i), "%s %zu -> %zu = %p: byte %zu is %#x, want %#x", who, old_n,
            s->n, (void *)s->p, i, s->p[i], want(s, i));
  for (int k = 0; k < 2; k++)
    for (size_t i = rn[k][0]; i < rn[k][1]; i++)
      if (i >= keep || !in_ranges(ro, i))
        s->p[i] = want(s, i);
  s->align = s->n >= 16 ? 16 : 1;
  CHECK(((uintptr_t)s->p & (s->align - 1)) == 0, "%s: %p not aligned", who, (void *)s->p);
  size_t u = smalloc_malloc_usable_size(s->p);
  CHECK(u >= s->n, "%s(%zu) = %p: usable size %zu", who, s->n, (void *)s->p, u);
}

static void do_realloc(slot_t *s, size_t n, bool array, size_t nmemb)
{
  if (!s->p)
    return;
  check_block(s, "before realloc");
  size_t old_n = s->n;
  void *q;
  errno = 0;
  if (array) {
    size_t total;
    bool overflow = __builtin_mul_overflow(nmemb, n, &total);
    q = smalloc_reallocarray(s->p, nmemb, n);
    if (overflow || total > ABSURD) {
      CHECK(q == NULL && errno == ENOMEM, "reallocarray(%zu, %zu) = %p, errno %d: want ENOMEM",
            nmemb, n, q, errno);
      check_block(s, "after a failed reallocarray");   /* untouched */
      return;
    }
    n = total;
  } else {
    q = smalloc_realloc(s->p, n);
  }
  if (n == 0) {
    /* frees the block, returns NULL (glibc's behaviour) */
    CHECK(q == NULL, "realloc(p, 0) returned %p", q);
    s->p = NULL;
    return;
  }
  CHECK(q != NULL, "realloc(%p, %zu) failed: %s", (void *)s->p, n, strerror(errno));
  s->p = q;
  s->n = n;
  after_resize(s, old_n, array ? "reallocarray" : "realloc");
}

/* ---- the second thread: frees and reallocs blocks the main thread owns ---------------
 * It lives from its first use to the end of the input, so that within an
 * input its heap is live (blocks it frees land on other threads' pages, its
 * own blocks are freed by the main thread), and it has exited by the
 * final count: only the counts of exited threads are exact. */

static pthread_mutex_t mbox_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t mbox_cond = PTHREAD_COND_INITIALIZER;
enum { HELPER_IDLE, HELPER_FREE, HELPER_REALLOC, HELPER_FREE_RAW, HELPER_QUIT };
static struct {
  int pending;
  slot_t *s;
  size_t n;
  void *p;   /* HELPER_FREE_RAW: a pointer freed as is (a misuse) */
} mbox;
static pthread_t helper;
static bool helper_started;

static void *helper_main(void *arg)
{
  (void)arg;
  pthread_mutex_lock(&mbox_lock);
  for (;;) {
    while (mbox.pending == HELPER_IDLE)
      pthread_cond_wait(&mbox_cond, &mbox_lock);
    int what = mbox.pending;
    if (what == HELPER_FREE)
      release(mbox.s, 0);
    else if (what == HELPER_FREE_RAW)
      smalloc_free(mbox.p);
    else if (what == HELPER_REALLOC)
      do_realloc(mbox.s, mbox.n, false, 0);
    mbox.pending = HELPER_IDLE;
    pthread_cond_broadcast(&mbox_cond);
    if (what == HELPER_QUIT)
      break;
  }
  pthread_mutex_unlock(&mbox_lock);
  return NULL;
}

static void on_helper_raw(int what, slot_t *s, size_t n, void *p);

static void on_helper(int what, slot_t *s, size_t n)
{
  on_helper_raw(what, s, n, NULL);
}

static void on_helper_raw(int what, slot_t *s, size_t n, void *p)
{
  if (!helper_started) {
    if (what == HELPER_QUIT)
      return;
    CHECK(pthread_create(&helper, NULL, helper_main, NULL) == 0, "pthread_create");
    helper_started = true;
  }
  pthread_mutex_lock(&mbox_lock);
  mbox.s = s;
  mbox.n = n;
  mbox.p = p;
  mbox.pending = what;
  pthread_cond_broadcast(&mbox_cond);
  while (mbox.pending != HELPER_IDLE)
    pthread_cond_wait(&mbox_cond, &mbox_lock);
  pthread_mutex_unlock(&mbox_lock);
  if (what == HELPER_QUIT) {
    CHECK(pthread_join(helper, NULL) == 0, "pthread_join");
    helper_started = false;
  }
}

/* A thread that allocates a block into the slot and exits at once: the
 * block outlives its heap and is freed later by the main thread. */
static struct {
  slot_t *s;
  size_t n;
  int how;
} orphan;

static void *orphan_main(void *arg)
{
  (void)arg;
  slot_t *s = orphan.s;
  if (orphan.how == 0)
    adopt(s, smalloc_malloc(orphan.n), orphan.n, 1, false, "malloc in an exiting thread");
  else
    adopt(s, smalloc_calloc(1, orphan.n), orphan.n, 1, true, "calloc in an exiting thread");
  /* a little churn of its own so that the heap has pages to abandon */
  void *tmp[8];
  for (int i = 0; i < 8; i++)
    tmp[i] = smalloc_malloc((size_t)i * 40);
  for (int i = 0; i < 8; i += 2)
    smalloc_free(tmp[i]);
  for (int i = 1; i < 8; i += 2)
    smalloc_free(tmp[i]);
  return NULL;
}

/* ---- options ------------------------------------------------------------------------- */

static long saved_options[SMALLOC_OPTION_COUNT];

static void options_save(void)
{
  for (int o = 0; o < SMALLOC_OPTION_COUNT; o++)
    saved_options[o] = smalloc_option_get((smalloc_option_t)o);
}

static void options_restore(void)
{
  for (int o = 0; o < SMALLOC_OPTION_COUNT; o++)
    if (saved_options[o] >= 0)
      smalloc_option_set((smalloc_option_t)o, saved_options[o]);
}

static void set_option(input_t *in)
{
  static const long retire[] = {0, 1, 4, 1024};
  static const long cache[] = {0, 1, 8};
  static const long purge[] = {0, 1, 1000};
  uint8_t b = byte(in);
  switch (b % 3) {
  case 0:
    smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, retire[(b >> 2) % 4]);
    break;
  case 1:
    smalloc_option_set(SMALLOC_OPTION_SEGMENT_CACHE, cache[(b >> 2) % 3]);
    break;
  default:
    smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, purge[(b >> 2) % 3]);
  }
}

/* ---- one input ------------------------------------------------------------------------- */

static smalloc_stats_t stats_now(void)
{
  smalloc_stats_t st;
  memset(&st, 0, sizeof st);
  st.size = sizeof st;
  CHECK(smalloc_stats_get(&st) == 0, "smalloc_stats_get failed");
  return st;
}

static uint64_t blocks_in_use(void)
{
  return stats_now().blocks_in_use;
}

static uint64_t errors_reported(void)
{
  return stats_now().errors_reported;
}

/* ---- misuse -------------------------------------------------------------------------- */

/* Whether another live slot's block of a size class shares s's segment:
 * then the segment stays mapped after s's block is freed, and a stale
 * write into that block cannot fault. */
static bool segment_stays(const slot_t *s)
{
  uintptr_t seg = (uintptr_t)s->p >> 22;
  for (size_t i = 0; i < SLOTS; i++) {
    const slot_t *o = &slots[i];
    if (o != s && o->p && o->n + o->align <= 128 * KiB && (uintptr_t)o->p >> 22 == seg)
      return true;
  }
  return false;
}

/* Free s's block, then free it again at once: from this thread, from the
 * other one, or after a stale write into its first or second word (only
 * where the memory stays mapped). */
/* Whether an input so far wrote into a freed block's list words.  The
 * blocks of its page's lists past that point are out of reach, and count
 * as in use (smalloc_stats(3)), by as many as the lists held: the count
 * moves as the damaged lists are walked, cut or mended later (by a later
 * input, too), so from then on it is not compared.  What matters then is
 * checked for every block as ever: no block overlaps a live one, and
 * live blocks keep their contents (a page given back while it held a
 * live block would hand that block's memory out again). */
static bool list_damaged;

static void double_free(slot_t *s, uint8_t how)
{
  if (!s->p)
    return;
  check_block(s, "before a double free");
  unsigned char *p = s->p;
  bool small = s->n + s->align <= 128 * KiB;
  int stale = (how & 3) == 1 ? 0 : (how & 3) == 2 ? 8 : -1;
  if (stale >= 0 && !(small && segment_stays(s)))
    stale = -1;
  release(s, 0);
  if (stale >= 0) {
    memset(p + stale, how, 8);
    list_damaged = true;
  }
  uint64_t e = errors_reported();
  int saved = errno = 777;
  if ((how & 3) == 3)
    on_helper_raw(HELPER_FREE_RAW, NULL, 0, p);
  else
    smalloc_free(p);
  CHECK(errors_reported() == e + 1, "double free of %p (%s) not reported", (void *)p,
        stale == 0 ? "link overwritten" : stale == 8 ? "tag overwritten"
        : (how & 3) == 3 ? "second free by another thread" : "at once");
  CHECK((how & 3) == 3 || errno == saved, "a reported free changed errno to %d", errno);
}

/* free(p + off) inside a live block: reported; the block stays live and
 * keeps its contents. */
static void interior_free(slot_t *s, uint8_t b)
{
  if (!s->p || s->n < 32)
    return;
  size_t span = s->n / 16;   /* offsets 16 .. n - 16, multiples of 16 */
  size_t off = 16 * (1 + b % (span - 1));
  uint64_t e = errors_reported();
  smalloc_free(s->p + off);
  CHECK(errors_reported() == e + 1, "free(%p + %zu) inside a block of %zu bytes not reported",
        (void *)s->p, off, s->n);
  check_block(s, "after an interior free");
}

/* realloc of a block freed just before: reported, NULL with EINVAL. */
static void realloc_freed(slot_t *s, size_t n)
{
  if (!s->p)
    return;
  unsigned char *p = s->p;
  release(s, 0);
  uint64_t e = errors_reported();
  errno = 0;
  void *q = smalloc_realloc(p, n);
  CHECK(errors_reported() == e + 1, "realloc(%p, %zu) of a freed block not reported", (void *)p, n);
  CHECK(q == NULL && errno == EINVAL, "realloc of a freed block = %p, errno %d", q, errno);
}

static void aligned_op(slot_t *s, enum op op, size_t align, size_t n)
{
  void *p = NULL;
  errno = 0;
  switch (op) {
  case OP_POSIX_MEMALIGN: {
    void *q = (void *)&p;   /* a sentinel that must stay */
    int rc = smalloc_posix_memalign(&q, align, n);
    if (!pow2(align) || align % sizeof(void *) != 0) {
      CHECK(rc == EINVAL && q == (void *)&p, "posix_memalign(%zu, %zu): rc %d", align, n, rc);
      return;
    }
    CHECK(rc == 0, "posix_memalign(%zu, %zu) failed: %d", align, n, rc);
    p = q;
    break;
  }
  case OP_ALIGNED_ALLOC:
    p = smalloc_aligned_alloc(align, n);
    if (!pow2(align)) {
      CHECK(p == NULL && errno == EINVAL, "aligned_alloc(%zu, %zu) = %p, errno %d", align, n, p, errno);
      return;
    }
    break;
  case OP_MEMALIGN:
    /* as glibc's: any other alignment is rounded up to a power of two,
     * 16 at least (read_align's are at most 8 MiB) */
    p = smalloc_memalign(align, n);
    while (!pow2(align) || align < 16)
      align = align < 16 ? 16 : align + (align & -align);
    break;
  case OP_VALLOC:
    p = smalloc_valloc(n);
    align = PAGE;
    break;
  default: /* OP_PVALLOC */
    p = smalloc_pvalloc(n);
    align = PAGE;
    n = n ? (n + PAGE - 1) & ~(PAGE - 1) : PAGE;   /* all of it is usable */
    break;
  }
  release(s, 0);
  adopt(s, p, n, align, false, "aligned allocation");
}

static void run(input_t *in)
{
  while (in->i < in->n) {
    enum op op = (enum op)(byte(in) % OP_COUNT);
    slot_t *s = &slots[byte(in) % SLOTS];
    switch (op) {
    case OP_MALLOC: {
      size_t n = read_size(in);
      release(s, 0);
      adopt(s, smalloc_malloc(n), n, 1, false, "malloc");
      break;
    }
    case OP_CALLOC: {
      size_t n = read_size(in), m = byte(in) % 8 + 1;
      if (n > 2 * MiB)
        n /= m;
      release(s, 0);
      adopt(s, smalloc_calloc(m, n), m * n, 1, true, "calloc");
      break;
    }
    case OP_CALLOC_OVERFLOW: {
      size_t m = ((size_t)1 << (40 + byte(in) % 24)) + byte(in);
      errno = 0;
      void *p = smalloc_calloc(m, (size_t)1 << 24);
      CHECK(p == NULL && errno == ENOMEM, "calloc(%zu, 16 MiB) = %p, errno %d", m, p, errno);
      break;
    }
    case OP_REALLOC:
      do_realloc(s, read_size(in), false, 0);
      break;
    case OP_REALLOCARRAY: {
      size_t n = read_size(in), b = byte(in), m;
      if (b >= 250) {
        m = SIZE_MAX / (b - 248);   /* overflows, or asks too much */
      } else {
        m = b % 8;
        if (m && n > 4 * MiB / m)
          n = 4 * MiB / m;
      }
      do_realloc(s, n, true, m);
      break;
    }
    case OP_POSIX_MEMALIGN:
    case OP_ALIGNED_ALLOC:
    case OP_MEMALIGN:
    case OP_VALLOC:
    case OP_PVALLOC: {
      size_t align = read_align(in), n = read_size(in);
      aligned_op(s, op, align, n);
      break;
    }
    case OP_FREE:
      release(s, 0);
      break;
    case OP_FREE_SIZED:
      release(s, 1);
      break;
    case OP_FREE_ALIGNED_SIZED:
      release(s, 2);
      break;
    case OP_THREAD_FREE:
      if (s->p)
        on_helper(HELPER_FREE, s, 0);
      break;
    case OP_THREAD_REALLOC: {
      size_t n = read_size(in);
      if (s->p)
        on_helper(HELPER_REALLOC, s, n);
      break;
    }
    case OP_THREAD_ALLOC_EXIT: {
      size_t n = read_size(in);
      int how = byte(in) & 1;
      pthread_t t;
      release(s, 0);
      orphan.s = s;
      orphan.n = n;
      orphan.how = how;
      CHECK(pthread_create(&t, NULL, orphan_main, NULL) == 0, "pthread_create");
      CHECK(pthread_join(t, NULL) == 0, "pthread_join");
      break;
    }
    case OP_COLLECT: {
      int saved = errno = 4321;
      if (byte(in) & 1)
        smalloc_collect(true);
      else
        smalloc_collect(false);
      CHECK(errno == saved, "smalloc_collect changed errno to %d", errno);
      break;
    }
    case OP_USABLE_SIZE:
      if (s->p)
        check_block(s, "usable size");
      break;
    case OP_BURST: {
      /* a burst of one size, freed in an order from the input: the churn
       * path, retired pages, reuse */
      enum { B = 48 };
      unsigned char *v[B];
      size_t n = read_size(in) % (64 * KiB), k = byte(in) % B + 1;
      uint8_t order = byte(in);
      for (size_t i = 0; i < k; i++) {
        v[i] = smalloc_malloc(n);
        CHECK(v[i] != NULL, "malloc(%zu) in a burst failed", n);
        memset(v[i], (int)i, n < 64 ? n : 64);
      }
      for (size_t i = 0; i < k; i++) {
        size_t j = order & 1 ? k - 1 - i : i;
        for (size_t b = 0; b < (n < 64 ? n : 64); b++)
          CHECK(v[j][b] == (unsigned char)j, "burst block %zu (%p, %zu bytes) changed", j,
                (void *)v[j], n);
        smalloc_free(v[j]);
      }
      break;
    }
    case OP_OPTION:
      set_option(in);
      break;
    case OP_DOUBLE_FREE:
      double_free(s, byte(in));
      break;
    case OP_INTERIOR_FREE:
      interior_free(s, byte(in));
      break;
    case OP_REALLOC_FREED:
      realloc_freed(s, read_size(in));
      break;
    default:
      break;
    }
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static bool first = true;
  if (first) {
    /* misuse is reported and survived, so that it can be checked */
    smalloc_option_set(SMALLOC_OPTION_ON_ERROR, 1);
    options_save();
    first = false;
  }
  uint64_t start = blocks_in_use();
  input_t in = {data, size, 0};
  run(&in);
  for (size_t i = 0; i < SLOTS; i++)
    release(&slots[i], 0);
  on_helper(HELPER_QUIT, NULL, 0);
  options_restore();
  uint64_t end = blocks_in_use();
  CHECK(list_damaged || end == start, "blocks_in_use %llu after the input, %llu before",
        (unsigned long long)end, (unsigned long long)start);
  return 0;
}
