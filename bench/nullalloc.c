/* The null allocator: the least work any allocator can do, as a reference
 * row for the churn cases.  `make bench` builds it as libsmnull.so and
 * preloads it like any other allocator; nothing else uses it.
 *
 * Per-thread LIFO lists per size class, blocks carved from one reserved
 * region per class, so free finds the class from the address alone.  No
 * checks, no statistics, memory is never returned, and a block freed by
 * another thread simply joins that thread's list.  Its time per
 * malloc+free pair is the cost of the benchmark loop and the call; what
 * an allocator spends above it is its own.
 */
#include <errno.h>
#include <malloc.h>
#include <stddef.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define EXPORT __attribute__((visibility("default")))

/* classes: 16-byte steps up to 1 KiB (0..64), then powers of two from
 * 2 KiB to 64 MiB (65..80); each class owns REGION bytes of address space
 * (small enough for valgrind), and the regions start at a multiple of
 * 64 MiB; larger requests fail */
enum { SMALL_CLASSES = 65, CLASSES = SMALL_CLASSES + 16 };
#define MAX_SIZE ((size_t)1 << 26)
#define REGION ((uintptr_t)1 << 28)
#define ALIGN  ((uintptr_t)MAX_SIZE)
#define CHUNK  ((uintptr_t)1 << 20)

struct block { struct block *next; };

static char *base;
static uintptr_t region_top[CLASSES];              /* bytes handed to threads */
#define TLS __thread __attribute__((tls_model("initial-exec")))
static TLS struct block *heads[CLASSES];
static TLS char *chunk_cur[CLASSES], *chunk_end[CLASSES];

static size_t class_of(size_t n)
{
  if (n <= 1024)
    return (n + 15) >> 4;
  return SMALL_CLASSES + (63 - (size_t)__builtin_clzl(n - 1)) - 10;
}

static size_t class_size(size_t c)
{
  if (c < SMALL_CLASSES)
    return c ? c * 16 : 16;
  return (size_t)1 << (c - SMALL_CLASSES + 11);
}

static __attribute__((noinline)) void *refill_or_null(size_t c)
{
  if (base == NULL) {
    size_t len = REGION * CLASSES + ALIGN;
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    char *expect = NULL;
    if (m == MAP_FAILED)
      return NULL;
    char *aligned = (char *)(((uintptr_t)m + ALIGN - 1) & ~(ALIGN - 1));
    if (!__atomic_compare_exchange_n(&base, &expect, aligned, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
      munmap(m, len);
  }
  size_t sz = class_size(c);
  if (chunk_cur[c] == NULL || chunk_cur[c] + sz > chunk_end[c]) {
    uintptr_t take = sz > CHUNK ? sz : CHUNK;
    uintptr_t off = __atomic_fetch_add(&region_top[c], take, __ATOMIC_RELAXED);
    if (off + take > REGION)
      return NULL;
    chunk_cur[c] = base + REGION * c + off;
    chunk_end[c] = chunk_cur[c] + take;
  }
  void *p = chunk_cur[c];
  chunk_cur[c] += sz;
  return p;
}

static __attribute__((noinline)) void *refill(size_t c)
{
  void *p = c < CLASSES ? refill_or_null(c) : NULL;
  if (p == NULL)
    errno = ENOMEM;
  return p;
}

/* calloc and realloc call this, not malloc: a compiler may turn malloc
 * followed by memset into a call to calloc */
static inline void *alloc(size_t n)
{
  size_t c = n <= MAX_SIZE ? class_of(n) : CLASSES;
  struct block *b = c < CLASSES ? heads[c] : NULL;
  if (__builtin_expect(b != NULL, 1)) {
    heads[c] = b->next;
    return b;
  }
  return refill(c);
}

EXPORT void *malloc(size_t n)
{
  return alloc(n);
}

EXPORT void free(void *p)
{
  size_t c = (size_t)(((uintptr_t)p - (uintptr_t)base) / REGION);
  if (c >= CLASSES)   /* NULL, or memory from before this library was loaded */
    return;
  struct block *b = p;
  b->next = heads[c];
  heads[c] = b;
}

EXPORT size_t malloc_usable_size(void *p)
{
  size_t c = (size_t)(((uintptr_t)p - (uintptr_t)base) / REGION);
  return c < CLASSES ? class_size(c) : 0;
}

EXPORT void *calloc(size_t k, size_t n)
{
  size_t t;
  if (__builtin_mul_overflow(k, n, &t)) {
    errno = ENOMEM;
    return NULL;
  }
  void *p = alloc(t);
  if (p)
    memset(p, 0, t);
  return p;
}

EXPORT void *realloc(void *p, size_t n)
{
  void *q = alloc(n);
  if (q && p) {
    size_t old = malloc_usable_size(p);
    memcpy(q, p, old < n ? old : n);
    free(p);
  }
  return q;
}

/* Blocks of a power-of-two class are aligned to their size within the
 * (aligned) region, so an alignment is served by a large enough class. */
EXPORT int posix_memalign(void **out, size_t align, size_t n)
{
  if (align < sizeof(void *) || (align & (align - 1)))
    return EINVAL;
  void *p = alloc(n < align ? align : (n <= 1024 && align > 16) ? 2048 : n);
  if (p == NULL)
    return ENOMEM;
  *out = p;
  return 0;
}

EXPORT void *aligned_alloc(size_t align, size_t n)
{
  void *p = NULL;
  int e = posix_memalign(&p, align, n);
  if (e)
    errno = e;
  return p;
}

EXPORT void *memalign(size_t align, size_t n)
{
  return aligned_alloc(align, n);
}
