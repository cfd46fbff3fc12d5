/* Every public entry point, and every bad input the contract names. */
#include "common.h"

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <malloc.h>
#include <sys/stat.h>

#ifdef SM_OVERRIDE
#include <dlfcn.h>
/* C23 names that glibc 2.36 does not declare yet. */
void free_sized(void *ptr, size_t size);
void free_aligned_sized(void *ptr, size_t alignment, size_t size);
#endif

#define TOO_BIG ((size_t)PTRDIFF_MAX + 1)

/* A call that must fail with NULL and set errno to err. */
#define EXPECT_NULL_ERRNO(call, err)                                           \
  do {                                                                         \
    errno = 0;                                                                 \
    void *r_ = (call);                                                         \
    int e_ = errno;                                                            \
    SM_CHECK(r_ == NULL, "%s returned %p", #call, r_);                         \
    SM_CHECK(e_ == (err), "%s set errno %d (%s), want %d", #call, e_,          \
             strerror(e_), (err));                                             \
  } while (0)

static const size_t some_sizes[] = {
  1, 7, 8, 15, 16, 17, 24, 100, 255, 256, 257, 1000, 4096, 8191, 8192, 8193,
  30000, 65535, 65536, 65537, 100000, 262144, 262145, 1 << 20, 2 * MiB - 4096,
  2 * MiB + 1, 3 * MiB,
};
#define NSIZES (sizeof some_sizes / sizeof some_sizes[0])

/* Writes every usable byte and reads it back. */
static void check_block(void *p, size_t n)
{
  SM_CHECK(p != NULL, "allocation of %zu failed", n);
  size_t usable = smalloc_malloc_usable_size(p);
  SM_CHECK(usable >= n, "usable %zu < requested %zu", usable, n);
  if (n >= 16)
    SM_CHECK(sm_is_aligned(p, 16), "%p of size %zu not 16-byte aligned", p, n);
  else
    SM_CHECK(sm_is_aligned(p, 8), "%p of size %zu not 8-byte aligned", p, n);
  memset(p, 0x5a, usable);
  size_t bad = sm_find_not_byte(p, usable, 0x5a);
  SM_CHECK(bad == SIZE_MAX, "byte %zu of %p (usable %zu) did not keep its value",
           bad, p, usable);
}

/* ---- malloc / free ---------------------------------------------------------- */

START_TEST(malloc_returns_usable_memory)
{
  for (size_t i = 0; i < NSIZES; i++) {
    void *p = smalloc_malloc(some_sizes[i]);
    check_block(p, some_sizes[i]);
    smalloc_free(p);
  }
}
END_TEST

START_TEST(malloc_zero_is_unique_and_freeable)
{
  enum { N = 100 };
  void *p[N];
  uint64_t before = sm_blocks_in_use();
  for (int i = 0; i < N; i++) {
    p[i] = smalloc_malloc(sm_opaque_size(0));
    SM_CHECK(p[i] != NULL, "malloc(0) #%d returned NULL", i);
    size_t usable = smalloc_malloc_usable_size(p[i]);
    SM_CHECK(usable >= sm_test_usable(0), "malloc(0) gave %zu usable bytes, want %zu",
             usable, sm_test_usable(0));
    SM_CHECK(sm_is_aligned(p[i], 16), "malloc(0) gave %p", p[i]);
    memset(p[i], i, usable);
  }
  ck_assert_uint_eq(sm_blocks_in_use(), before + N);
  for (int i = 0; i < N; i++)
    for (int j = i + 1; j < N; j++)
      SM_CHECK(p[i] != p[j], "malloc(0) returned %p twice", p[i]);
  for (int i = 0; i < N; i++) {
    size_t bad = sm_find_not_byte(p[i], 16, (unsigned char)i);
    SM_CHECK(bad == SIZE_MAX, "malloc(0) block %d overwritten", i);
    smalloc_free(p[i]);
  }
  ck_assert_uint_eq(sm_blocks_in_use(), before);
}
END_TEST

START_TEST(free_null_is_noop)
{
  smalloc_stats_t a, b;
  sm_stats_snap(&a);
  smalloc_free(NULL);
  smalloc_free_sized(NULL, 0);
  smalloc_free_aligned_sized(NULL, 64, 0);
  sm_stats_snap(&b);
  ck_assert_uint_eq(b.blocks_in_use, a.blocks_in_use);
  ck_assert_uint_eq(b.calls_free, a.calls_free);
  ck_assert_uint_ge(b.calls_free_null, a.calls_free_null + 1);
}
END_TEST

START_TEST(usable_size_of_null_is_zero)
{
  ck_assert_uint_eq(smalloc_malloc_usable_size(NULL), 0);
}
END_TEST

START_TEST(usable_size_covers_request)
{
  for (size_t n = 0; n <= 3000; n += 7) {
    void *p = smalloc_malloc(n);
    SM_CHECK(p != NULL, "malloc(%zu)", n);
    size_t u = smalloc_malloc_usable_size(p);
    SM_CHECK(u >= n && u >= sm_test_usable(0), "malloc(%zu): usable %zu", n, u);
    smalloc_free(p);
  }
}
END_TEST

/* ---- calloc -------------------------------------------------------------------- */

START_TEST(calloc_zeroes_fresh_memory)
{
  for (size_t i = 0; i < NSIZES; i++) {
    size_t n = some_sizes[i];
    unsigned char *p = smalloc_calloc(1, n);
    SM_CHECK(p != NULL, "calloc(1, %zu)", n);
    size_t bad = sm_find_not_byte(p, n, 0);
    SM_CHECK(bad == SIZE_MAX, "calloc(1, %zu): byte %zu is %#x", n, bad, p[bad]);
    smalloc_free(p);
  }
}
END_TEST

START_TEST(calloc_zeroes_reused_memory)
{
  /* Dirty a block, free it, and calloc the same size: the allocator hands
   * back the block it just got (the free list is LIFO), so calloc must clear
   * it.  Repeat with a batch so whole pages are dirty. */
  for (size_t i = 0; i < NSIZES; i++) {
    size_t n = some_sizes[i];
    for (int round = 0; round < 3; round++) {
      void *d = smalloc_malloc(n);
      SM_CHECK(d != NULL, "malloc(%zu)", n);
      memset(d, 0xff, smalloc_malloc_usable_size(d));
      uintptr_t dirty = (uintptr_t)d;
      smalloc_free(d);
      unsigned char *p = smalloc_calloc(n, 1);
      SM_CHECK(p != NULL, "calloc(%zu, 1)", n);
      size_t bad = sm_find_not_byte(p, n, 0);
      SM_CHECK(bad == SIZE_MAX, "calloc(%zu, 1) after free (%s): byte %zu is %#x",
               n, dirty == (uintptr_t)p ? "same block" : "other block", bad,
               p[bad]);
      smalloc_free(p);
    }
  }
  enum { N = 512 };
  static void *v[N];
  for (size_t sz = 16; sz <= 4096; sz *= 4) {
    for (int i = 0; i < N; i++) {
      v[i] = smalloc_malloc(sz);
      SM_CHECK(v[i] != NULL, "malloc(%zu)", sz);
      memset(v[i], 0xa5, sz);
    }
    for (int i = 0; i < N; i++)
      smalloc_free(v[i]);
    for (int i = 0; i < N; i++) {
      v[i] = smalloc_calloc(sz / 8, 8);
      SM_CHECK(v[i] != NULL, "calloc(%zu, 8)", sz / 8);
      size_t bad = sm_find_not_byte(v[i], sz, 0);
      SM_CHECK(bad == SIZE_MAX, "calloc(%zu, 8) #%d: byte %zu not zero", sz / 8, i,
               bad);
    }
    for (int i = 0; i < N; i++)
      smalloc_free(v[i]);
  }
}
END_TEST

START_TEST(calloc_zero_sizes)
{
  void *a = smalloc_calloc(0, 0), *b = smalloc_calloc(0, 100),
       *c = smalloc_calloc(100, 0);
  ck_assert_ptr_nonnull(a);
  ck_assert_ptr_nonnull(b);
  ck_assert_ptr_nonnull(c);
  ck_assert_ptr_ne(a, b);
  ck_assert_ptr_ne(b, c);
  ck_assert_ptr_ne(a, c);
  smalloc_free(a);
  smalloc_free(b);
  smalloc_free(c);
}
END_TEST

START_TEST(calloc_overflow_sets_enomem)
{
  smalloc_stats_t a, b;
  sm_stats_snap(&a);
  EXPECT_NULL_ERRNO(smalloc_calloc(SIZE_MAX, 2), ENOMEM);
  EXPECT_NULL_ERRNO(smalloc_calloc(2, SIZE_MAX), ENOMEM);
  EXPECT_NULL_ERRNO(smalloc_calloc(SIZE_MAX / 2 + 1, 2), ENOMEM);
  EXPECT_NULL_ERRNO(smalloc_calloc((size_t)1 << 32, (size_t)1 << 32), ENOMEM);
  EXPECT_NULL_ERRNO(smalloc_calloc(SIZE_MAX, SIZE_MAX), ENOMEM);
  /* no overflow, but above PTRDIFF_MAX */
  EXPECT_NULL_ERRNO(smalloc_calloc(1, sm_opaque_size(TOO_BIG)), ENOMEM);
  EXPECT_NULL_ERRNO(smalloc_calloc(2, (size_t)PTRDIFF_MAX / 2 + 1), ENOMEM);
  sm_stats_snap(&b);
  ck_assert_uint_eq(b.calls_calloc - a.calls_calloc, 7);
  ck_assert_uint_eq(b.calls_failed - a.calls_failed, 7);
  ck_assert_uint_eq(b.blocks_in_use, a.blocks_in_use);
}
END_TEST

/* ---- sizes beyond PTRDIFF_MAX ------------------------------------------------ */

START_TEST(huge_requests_set_enomem)
{
  const size_t bad[] = {TOO_BIG, SIZE_MAX, SIZE_MAX - 15, SIZE_MAX - 4096,
                        (size_t)PTRDIFF_MAX};
  void *q = (void *)0x1;
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    size_t n = sm_opaque_size(bad[i]);
    EXPECT_NULL_ERRNO(smalloc_malloc(n), ENOMEM);
    EXPECT_NULL_ERRNO(smalloc_calloc(1, n), ENOMEM);
    EXPECT_NULL_ERRNO(smalloc_realloc(NULL, n), ENOMEM);
    EXPECT_NULL_ERRNO(smalloc_reallocarray(NULL, 1, n), ENOMEM);
    EXPECT_NULL_ERRNO(smalloc_aligned_alloc(64, n), ENOMEM);
    EXPECT_NULL_ERRNO(smalloc_aligned_alloc(4096, n), ENOMEM);
    EXPECT_NULL_ERRNO(smalloc_memalign(64, n), ENOMEM);
    EXPECT_NULL_ERRNO(smalloc_memalign(1 << 20, n), ENOMEM);
    EXPECT_NULL_ERRNO(smalloc_valloc(n), ENOMEM);
    EXPECT_NULL_ERRNO(smalloc_pvalloc(n), ENOMEM);
    int rc = smalloc_posix_memalign(&q, 64, n);
    SM_CHECK(rc == ENOMEM, "posix_memalign(64, %#zx) returned %d", n, rc);
    rc = smalloc_posix_memalign(&q, 1 << 16, n);
    SM_CHECK(rc == ENOMEM, "posix_memalign(65536, %#zx) returned %d", n, rc);
  }
  /* a live block survives a failed realloc */
  unsigned char *p = smalloc_malloc(100);
  ck_assert_ptr_nonnull(p);
  uint64_t seed = sm_pattern_seed(p, 1);
  sm_pattern_fill(p, 100, seed);
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    size_t n = sm_opaque_size(bad[i]);
    EXPECT_NULL_ERRNO(smalloc_realloc(p, n), ENOMEM);
    EXPECT_NULL_ERRNO(smalloc_reallocarray(p, 1, n), ENOMEM);
  }
  ck_assert(sm_pattern_ok(p, 100, seed));
  smalloc_free(p);
}
END_TEST

/* ---- realloc / reallocarray ---------------------------------------------------- */

START_TEST(realloc_null_is_malloc)
{
  smalloc_stats_t a, b;
  sm_stats_snap(&a);
  void *p = smalloc_realloc(NULL, 100);
  void *z = smalloc_realloc(NULL, 0);
  sm_stats_snap(&b);
  ck_assert_ptr_nonnull(p);
  ck_assert_ptr_nonnull(z);
  ck_assert_ptr_ne(p, z);
  ck_assert_uint_ge(smalloc_malloc_usable_size(p), 100);
  ck_assert_uint_eq(b.calls_realloc - a.calls_realloc, 2);
  ck_assert_uint_eq(b.blocks_in_use - a.blocks_in_use, 2);
  check_block(p, 100);
  smalloc_free(p);
  smalloc_free(z);
}
END_TEST

START_TEST(realloc_to_zero_frees)
{
  const size_t sizes[] = {1, 100, 5000, 40000, 200000, 3 * MiB};
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    void *p = smalloc_malloc(sizes[i]);
    ck_assert_ptr_nonnull(p);
    uint64_t before = sm_blocks_in_use();
    void *r = smalloc_realloc(p, sm_opaque_size(0));
    uint64_t after = sm_blocks_in_use();
    ck_assert_ptr_null(r);
    ck_assert_uint_eq(after, before - 1);
  }
}
END_TEST

START_TEST(realloc_keeps_contents)
{
  unsigned char *p = smalloc_malloc(10);
  ck_assert_ptr_nonnull(p);
  uint64_t seed = sm_pattern_seed(p, 7);
  sm_pattern_fill(p, 10, seed);
  size_t have = 10;
  const size_t steps[] = {20, 300, 5000, 70000, 3 * MiB, 1000, 5, 64};
  for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
    size_t n = steps[i];
    p = smalloc_realloc(p, n);
    SM_CHECK(p != NULL, "realloc to %zu", n);
    size_t keep = have < n ? have : n;
    size_t bad = sm_pattern_find_bad(p, keep, seed);
    SM_CHECK(bad == SIZE_MAX, "realloc to %zu lost byte %zu", n, bad);
    sm_pattern_fill(p, n, seed);
    have = n;
  }
  smalloc_free(p);
}
END_TEST

START_TEST(reallocarray_works_and_checks_overflow)
{
  smalloc_stats_t a, b;
  unsigned char *p = smalloc_reallocarray(NULL, 10, 10);
  ck_assert_ptr_nonnull(p);
  ck_assert_uint_ge(smalloc_malloc_usable_size(p), 100);
  uint64_t seed = sm_pattern_seed(p, 3);
  sm_pattern_fill(p, 100, seed);
  p = smalloc_reallocarray(p, 1000, 10);
  ck_assert_ptr_nonnull(p);
  ck_assert_uint_ge(smalloc_malloc_usable_size(p), 10000);
  ck_assert(sm_pattern_ok(p, 100, seed));
  sm_pattern_fill(p, 10000, seed);

  sm_stats_snap(&a);
  EXPECT_NULL_ERRNO(smalloc_reallocarray(p, SIZE_MAX / 2 + 1, 2), ENOMEM);
  EXPECT_NULL_ERRNO(smalloc_reallocarray(p, 2, SIZE_MAX / 2 + 1), ENOMEM);
  EXPECT_NULL_ERRNO(smalloc_reallocarray(p, (size_t)1 << 33, (size_t)1 << 33),
                    ENOMEM);
  EXPECT_NULL_ERRNO(smalloc_reallocarray(NULL, SIZE_MAX, SIZE_MAX), ENOMEM);
  sm_stats_snap(&b);
  ck_assert_uint_eq(b.calls_reallocarray - a.calls_reallocarray, 4);
  ck_assert_uint_eq(b.calls_failed - a.calls_failed, 4);
  ck_assert_uint_eq(b.blocks_in_use, a.blocks_in_use);
  /* the block is untouched and still owned by the caller */
  ck_assert(sm_pattern_ok(p, 10000, seed));
  p = smalloc_reallocarray(p, 3, 7);
  ck_assert_ptr_nonnull(p);
  ck_assert(sm_pattern_ok(p, 21, seed));
  smalloc_free(p);
}
END_TEST

/* ---- aligned allocation --------------------------------------------------------- */

START_TEST(posix_memalign_bad_alignment_is_einval)
{
  const size_t bad[] = {0, 1, 2, 4, 3, 12, 24, 48, 100, 4097, 65535,
                        SIZE_MAX, SIZE_MAX / 2 + 2};
  smalloc_stats_t a, b;
  sm_stats_snap(&a);
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    void *sentinel = (void *)(uintptr_t)0xdeadbeef;
    void *q = sentinel;
    int rc = smalloc_posix_memalign(&q, bad[i], 64);
    SM_CHECK(rc == EINVAL, "posix_memalign(alignment %zu) returned %d", bad[i], rc);
    SM_CHECK(q == sentinel, "posix_memalign(alignment %zu) wrote %p", bad[i], q);
  }
  sm_stats_snap(&b);
  ck_assert_uint_eq(b.calls_posix_memalign - a.calls_posix_memalign,
                    sizeof bad / sizeof bad[0]);
  ck_assert_uint_eq(b.calls_failed - a.calls_failed, sizeof bad / sizeof bad[0]);
  ck_assert_uint_eq(b.blocks_in_use, a.blocks_in_use);
}
END_TEST

START_TEST(posix_memalign_aligns)
{
  for (size_t al = sizeof(void *); al <= 64 * KiB; al *= 2) {
    for (size_t n = 0; n <= 5000; n += 1250) {
      void *q = NULL;
      int rc = smalloc_posix_memalign(&q, al, n);
      SM_CHECK(rc == 0, "posix_memalign(%zu, %zu) returned %d", al, n, rc);
      SM_CHECK(sm_is_aligned(q, al), "posix_memalign(%zu, %zu) gave %p", al, n, q);
      check_block(q, n);
      smalloc_free(q);
    }
  }
}
END_TEST

START_TEST(aligned_alloc_bad_alignment_is_einval)
{
  const size_t bad[] = {0, 3, 12, 24, 48, 100, 4097, 65535, SIZE_MAX,
                        SIZE_MAX / 2 + 2};
  smalloc_stats_t a, b;
  sm_stats_snap(&a);
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    EXPECT_NULL_ERRNO(smalloc_aligned_alloc(sm_opaque_size(bad[i]), 64), EINVAL);
  sm_stats_snap(&b);
  ck_assert_uint_eq(b.calls_aligned_alloc - a.calls_aligned_alloc,
                    sizeof bad / sizeof bad[0]);
  ck_assert_uint_eq(b.calls_failed - a.calls_failed, sizeof bad / sizeof bad[0]);
}
END_TEST

START_TEST(aligned_alloc_size_need_not_be_multiple)
{
  const size_t al[] = {1, 2, 4, 8, 16, 64, 4096};
  for (size_t i = 0; i < sizeof al / sizeof al[0]; i++) {
    void *p = smalloc_aligned_alloc(al[i], 100);
    SM_CHECK(p != NULL, "aligned_alloc(%zu, 100)", al[i]);
    SM_CHECK(sm_is_aligned(p, al[i]), "aligned_alloc(%zu, 100) gave %p", al[i], p);
    check_block(p, 100);
    smalloc_free_aligned_sized(p, al[i], 100);
  }
}
END_TEST

/* As the GNU C library's: rounded up to a power of two, EINVAL only above
 * SIZE_MAX / 2 + 1. */
START_TEST(memalign_bad_alignment_is_einval)
{
  const size_t bad[] = {SIZE_MAX, SIZE_MAX / 2 + 2};
  smalloc_stats_t a, b;
  sm_stats_snap(&a);
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    EXPECT_NULL_ERRNO(smalloc_memalign(sm_opaque_size(bad[i]), 64), EINVAL);
  sm_stats_snap(&b);
  ck_assert_uint_eq(b.calls_memalign - a.calls_memalign, sizeof bad / sizeof bad[0]);
  ck_assert_uint_eq(b.calls_failed - a.calls_failed, sizeof bad / sizeof bad[0]);
}
END_TEST

START_TEST(memalign_rounds_the_alignment_up_to_a_power_of_two)
{
  const size_t al[] = {0, 1, 3, 8, 12, 24, 48, 100, 4097, 65535};
  const size_t want[] = {16, 16, 16, 16, 16, 32, 64, 128, 8192, 65536};
  smalloc_stats_t a, b;
  sm_stats_snap(&a);
  for (size_t i = 0; i < sizeof al / sizeof al[0]; i++) {
    errno = 0;
    void *p = smalloc_memalign(sm_opaque_size(al[i]), 100);
    SM_CHECK(p != NULL && errno == 0, "memalign(%zu, 100): %p, errno %d", al[i], p, errno);
    SM_CHECK(sm_is_aligned(p, want[i]), "memalign(%zu, 100) gave %p, not aligned to %zu", al[i], p,
             want[i]);
    check_block(p, 100);
    smalloc_free(p);
  }
  sm_stats_snap(&b);
  ck_assert_uint_eq(b.calls_memalign - a.calls_memalign, sizeof al / sizeof al[0]);
  ck_assert_uint_eq(b.calls_failed - a.calls_failed, 0);
}
END_TEST

START_TEST(memalign_aligns)
{
  for (size_t al = 1; al <= 1 * MiB; al *= 4) {
    void *p = smalloc_memalign(al, 1000);
    SM_CHECK(p != NULL, "memalign(%zu, 1000)", al);
    SM_CHECK(sm_is_aligned(p, al), "memalign(%zu, 1000) gave %p", al, p);
    check_block(p, 1000);
    smalloc_free(p);
  }
}
END_TEST

START_TEST(alignment_beyond_address_space_fails)
{
  size_t al = (size_t)1 << 62;
  void *q = NULL;
  errno = 0;
  void *p = smalloc_aligned_alloc(sm_opaque_size(al), 1);
  int e = errno;
  ck_assert_ptr_null(p);
  ck_assert_msg(e == ENOMEM || e == EINVAL, "errno %d", e);
  ck_assert_ptr_null(smalloc_memalign(sm_opaque_size(al), 1));
  int rc = smalloc_posix_memalign(&q, al, 1);
  ck_assert_msg(rc == ENOMEM || rc == EINVAL, "posix_memalign returned %d", rc);
}
END_TEST

START_TEST(valloc_is_page_aligned)
{
  size_t page = sm_page_size();
  const size_t sizes[] = {0, 1, 100, page - 1, page, page + 1, 100000, 3 * MiB};
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    void *p = smalloc_valloc(sizes[i]);
    SM_CHECK(p != NULL, "valloc(%zu)", sizes[i]);
    SM_CHECK(sm_is_aligned(p, page), "valloc(%zu) gave %p", sizes[i], p);
    check_block(p, sizes[i]);
    smalloc_free(p);
  }
}
END_TEST

START_TEST(pvalloc_rounds_to_pages)
{
  size_t page = sm_page_size();
  const size_t sizes[] = {0, 1, 100, page - 1, page, page + 1, 100000, 3 * MiB + 1};
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    size_t n = sizes[i];
    size_t rounded = n == 0 ? page : (n + page - 1) / page * page;
    void *p = smalloc_pvalloc(n);
    SM_CHECK(p != NULL, "pvalloc(%zu)", n);
    SM_CHECK(sm_is_aligned(p, page), "pvalloc(%zu) gave %p", n, p);
    size_t u = smalloc_malloc_usable_size(p);
    SM_CHECK(u >= rounded, "pvalloc(%zu): usable %zu < %zu", n, u, rounded);
    check_block(p, rounded);
    smalloc_free(p);
  }
}
END_TEST

/* ---- sized free ------------------------------------------------------------------ */

START_TEST(free_sized_frees)
{
  const size_t sizes[] = {1, 16, 100, 5000, 50000, 200000, 3 * MiB};
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    size_t n = sizes[i];
    void *p = smalloc_malloc(n);
    void *q = smalloc_aligned_alloc(256, n);
    void *r = smalloc_memalign(4096, n);
    ck_assert_ptr_nonnull(p);
    ck_assert_ptr_nonnull(q);
    ck_assert_ptr_nonnull(r);
    smalloc_stats_t a, b;
    sm_stats_snap(&a);
    smalloc_free_sized(p, n);
    smalloc_free_aligned_sized(q, 256, n);
    smalloc_free_aligned_sized(r, 4096, n);
    sm_stats_snap(&b);
    ck_assert_uint_eq(a.blocks_in_use - b.blocks_in_use, 3);
    ck_assert_uint_eq(b.calls_free_sized - a.calls_free_sized, 1);
    ck_assert_uint_eq(b.calls_free_aligned_sized - a.calls_free_aligned_sized, 2);
    ck_assert_uint_eq(b.calls_free - a.calls_free, 3);
  }
}
END_TEST

/* ---- malloc_trim, mallinfo2, malloc_stats ------------------------------------------ */

START_TEST(malloc_trim_releases_then_has_nothing_left)
{
  enum { NL = 24, NS = 4096 };
  static void *large[NL], *small[NS];
  for (int i = 0; i < NL; i++) {
    large[i] = smalloc_malloc(200 * KiB + (size_t)i * 4096);
    ck_assert_ptr_nonnull(large[i]);
    ((char *)large[i])[0] = 1;
  }
  for (int i = 0; i < NS; i++) {
    small[i] = smalloc_malloc(48 + (size_t)(i % 8) * 16);
    ck_assert_ptr_nonnull(small[i]);
    memset(small[i], 1, 48);
  }
  for (int i = 0; i < NL; i++)
    smalloc_free(large[i]);
  for (int i = 0; i < NS; i++)
    smalloc_free(small[i]);
  int first = smalloc_malloc_trim(0);
  int second = smalloc_malloc_trim(0);
  ck_assert_int_eq(first, 1);
  ck_assert_int_eq(second, 0);
  /* and the allocator still works */
  void *p = smalloc_malloc(100);
  check_block(p, 100);
  smalloc_free(p);
  ck_assert_int_ge(smalloc_malloc_trim(4096), 0);
  ck_assert_int_le(smalloc_malloc_trim(4096), 1);
}
END_TEST

START_TEST(mallinfo2_counts_live_blocks)
{
  const size_t sizes[] = {1000, 40000, 1 * MiB, 5 * MiB};
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    size_t n = sizes[i];
    struct mallinfo2 a = smalloc_mallinfo2();
    void *p = smalloc_malloc(n);
    struct mallinfo2 b = smalloc_mallinfo2();
    ck_assert_ptr_nonnull(p);
    SM_CHECK(b.uordblks >= a.uordblks + n,
             "malloc(%zu): uordblks %zu -> %zu", n, a.uordblks, b.uordblks);
    smalloc_free(p);
    struct mallinfo2 c = smalloc_mallinfo2();
    SM_CHECK(c.uordblks + n <= b.uordblks, "free of %zu: uordblks %zu -> %zu", n,
             b.uordblks, c.uordblks);
  }
}
END_TEST

/* The older mallinfo: mallinfo2's figures in ints. */
START_TEST(mallinfo_matches_mallinfo2)
{
  void *p = smalloc_malloc(3 * MiB);
  ck_assert_ptr_nonnull(p);
  struct mallinfo2 a = smalloc_mallinfo2();
  struct mallinfo b = smalloc_mallinfo();
  ck_assert_uint_eq((size_t)b.uordblks, a.uordblks);
  ck_assert_uint_eq((size_t)b.hblks, a.hblks);
  ck_assert_uint_eq((size_t)b.hblkhd, a.hblkhd);
  ck_assert_uint_eq((size_t)b.arena, a.arena);
  ck_assert_int_ge(b.uordblks, 3 * (int)MiB);
  smalloc_free(p);
}
END_TEST

/* glibc's XML report, with smalloc's figures where glibc's would be. */
START_TEST(malloc_info_reports_in_glibc_layout)
{
  char *buf = NULL;
  size_t len = 0;
  void *p = smalloc_malloc(5 * MiB);
  ck_assert_ptr_nonnull(p);
  FILE *f = open_memstream(&buf, &len);   /* glibc's memory: freed with free below */
  ck_assert_ptr_nonnull(f);
  ck_assert_int_eq(smalloc_malloc_info(0, f), 0);
  fclose(f);
  smalloc_stats_t s = {.size = sizeof s};
  smalloc_stats_get(&s);
  ck_assert_msg(strncmp(buf, "<malloc version=\"1\">", 20) == 0, "report: %s", buf);
  ck_assert_msg(strstr(buf, "</malloc>") != NULL, "report: %s", buf);
  /* one huge block of at least 5 MiB under "mmap" */
  const char *mm = strstr(buf, "<total type=\"mmap\" count=\"1\" size=\"");
  ck_assert_msg(mm != NULL, "report: %s", buf);
  ck_assert_uint_ge(strtoull(mm + strlen("<total type=\"mmap\" count=\"1\" size=\""), NULL, 10),
                    5 * MiB);
  char want[96];
  snprintf(want, sizeof want, "<system type=\"max\" size=\"%llu\"/>",
           (unsigned long long)s.bytes_mapped_peak);
  ck_assert_msg(strstr(buf, want) != NULL, "no '%s' in: %s", want, buf);
  free(buf);
  ck_assert_int_eq(smalloc_malloc_info(1, stdout), EINVAL);
  smalloc_free(p);
}
END_TEST

/* glibc's knobs change nothing in smalloc, and it answers as glibc
 * 2.36 does: 1 (some programs stop at a 0), known param or not, but 0
 * for M_MXFAST beyond glibc's largest fast size (160 bytes here). */
START_TEST(mallopt_answers_as_glibc)
{
  ck_assert_int_eq(smalloc_mallopt(M_ARENA_MAX, 1), 1);
  ck_assert_int_eq(smalloc_mallopt(M_MMAP_THRESHOLD, 1 << 20), 1);
  ck_assert_int_eq(smalloc_mallopt(M_TRIM_THRESHOLD, -1), 1);
  ck_assert_int_eq(smalloc_mallopt(M_MMAP_MAX, 0), 1);
  ck_assert_int_eq(smalloc_mallopt(12345, 7), 1);
  ck_assert_int_eq(smalloc_mallopt(M_MXFAST, 0), 1);
  ck_assert_int_eq(smalloc_mallopt(M_MXFAST, 80 * (int)sizeof(size_t) / 4), 1);
  ck_assert_int_eq(smalloc_mallopt(M_MXFAST, 80 * (int)sizeof(size_t) / 4 + 1), 0);
  ck_assert_int_eq(smalloc_mallopt(M_MXFAST, -1), 0);
}
END_TEST

/* Runs fn with stderr sent to a temporary file; returns that file, rewound. */
static FILE *capture_stderr(void (*fn)(void))
{
  FILE *tmp = tmpfile();
  ck_assert_ptr_nonnull(tmp);
  fflush(stderr);
  int saved = dup(STDERR_FILENO);
  ck_assert_int_ge(saved, 0);
  ck_assert_int_eq(dup2(fileno(tmp), STDERR_FILENO), STDERR_FILENO);
  fn();
  fflush(stderr);
  ck_assert_int_eq(dup2(saved, STDERR_FILENO), STDERR_FILENO);
  close(saved);
  rewind(tmp);
  return tmp;
}

static off_t file_size(FILE *f)
{
  struct stat st;
  ck_assert_int_eq(fstat(fileno(f), &st), 0);
  return st.st_size;
}

/* Every call that reads the statistics runs on a thread with the least
 * stack a thread may have (16 KiB): their figures (10 KiB, and twice 7
 * KiB of per-thread counters summed) are not copied onto it.  mallinfo2
 * and malloc_stats overflowed a 32 KiB stack, malloc_info a 48 KiB one,
 * and smalloc_stats_get, _print and _reset a 32 KiB one. */
static _Atomic size_t small_stack_in_use;

static void *small_stack_reads(void *arg)
{
  FILE *devnull = arg;
  smalloc_stats_t *s = smalloc_malloc(sizeof *s);
  if (s == NULL)
    return NULL;
  s->size = sizeof *s;
  if (smalloc_stats_get(s) == 0 && smalloc_malloc_info(0, devnull) == 0) {
    smalloc_stats_print(devnull);
    smalloc_stats_print_json(devnull);
    smalloc_malloc_stats();
    struct mallinfo m = smalloc_mallinfo();
    smalloc_stats_reset();
    if ((size_t)m.uordblks == smalloc_mallinfo2().uordblks)
      atomic_store(&small_stack_in_use, s->bytes_in_use);
  }
  smalloc_free(s);
  return NULL;
}

static void small_stack_run(void)
{
  FILE *devnull = fopen("/dev/null", "w");
  ck_assert_ptr_nonnull(devnull);
  pthread_attr_t at;
  pthread_t t;
  ck_assert_int_eq(pthread_attr_init(&at), 0);
  ck_assert_int_eq(pthread_attr_setstacksize(&at, PTHREAD_STACK_MIN), 0);
  ck_assert_int_eq(pthread_create(&t, &at, small_stack_reads, devnull), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
  pthread_attr_destroy(&at);
  fclose(devnull);
}

START_TEST(statistics_are_read_on_the_smallest_stack)
{
  if (SM_TEST_SANITIZED)
    return;   /* a sanitizer's frames are larger */
  void *p = smalloc_malloc(3 * MiB);   /* the figures the thread reads count it */
  ck_assert_ptr_nonnull(p);
  fclose(capture_stderr(small_stack_run));
  ck_assert_uint_ge(atomic_load(&small_stack_in_use), 3 * MiB);
  smalloc_free(p);
}
END_TEST


START_TEST(malloc_stats_prints_to_stderr)
{
  void *p = smalloc_malloc(1000);
  FILE *out = capture_stderr(smalloc_malloc_stats);
  ck_assert_int_gt(file_size(out), 0);
  fclose(out);
  smalloc_free(p);
}
END_TEST

/* ---- statistics ---------------------------------------------------------------------- */

START_TEST(stats_get_checks_its_argument)
{
  ck_assert_int_eq(smalloc_stats_get(NULL), EINVAL);
  smalloc_stats_t s;
  memset(&s, 0, sizeof s);
  s.size = sizeof s.size;
  ck_assert_int_eq(smalloc_stats_get(&s), EINVAL);
  s.size = 0;
  ck_assert_int_eq(smalloc_stats_get(&s), EINVAL);

  /* an older, shorter struct: filled up to its size and no further */
  size_t shortsize = offsetof(smalloc_stats_t, calls_calloc);
  memset(&s, 0xa5, sizeof s);
  s.size = shortsize;
  ck_assert_int_eq(smalloc_stats_get(&s), 0);
  ck_assert_uint_eq(s.version, SMALLOC_STATS_VERSION);
  size_t bad = sm_find_not_byte((char *)&s + shortsize, sizeof s - shortsize, 0xa5);
  ck_assert_msg(bad == SIZE_MAX, "byte %zu past size written", shortsize + bad);
}
END_TEST

START_TEST(stats_get_fills_classes)
{
  smalloc_stats_t s;
  sm_stats_snap(&s);
  ck_assert_uint_eq(s.version, SMALLOC_STATS_VERSION);
  ck_assert_uint_ge(s.nclasses, 1);
  ck_assert_uint_le(s.nclasses, SMALLOC_STATS_CLASSES);
  uint64_t last = 0, largest = 0, smallest = 0;
  for (unsigned i = 0; i < s.nclasses; i++) {
    uint64_t bs = s.classes[i].block_size;
    if (bs == 0)
      continue;
    if (smallest == 0)
      smallest = bs;
    SM_CHECK(bs > last, "class %u block_size %llu after %llu", i,
             (unsigned long long)bs, (unsigned long long)last);
    SM_CHECK(bs % 16 == 0, "class %u block_size %llu", i, (unsigned long long)bs);
    last = largest = bs;
  }
  ck_assert_uint_eq(smallest, 16);
  ck_assert_uint_eq(largest, SM_TEST_CLASS_MAX);
}
END_TEST

START_TEST(stats_reset_keeps_gauges)
{
  void *p = smalloc_malloc(100);
  void *q = smalloc_malloc(300000);
  ck_assert_ptr_nonnull(p);
  ck_assert_ptr_nonnull(q);
  smalloc_stats_t a, b;
  sm_stats_snap(&a);
  smalloc_stats_reset();
  sm_stats_snap(&b);
  ck_assert_uint_ge(a.calls_malloc, 2);
  ck_assert_uint_eq(b.calls_malloc, 0);
  ck_assert_uint_eq(b.bytes_requested, 0);
  ck_assert_uint_eq(b.blocks_in_use, a.blocks_in_use);
  ck_assert_uint_eq(b.bytes_in_use, a.bytes_in_use);
  ck_assert_uint_eq(b.bytes_mapped, a.bytes_mapped);
  /* no ck_assert between reset and the snapshot: it allocates */
  smalloc_stats_reset();
  smalloc_free(p);
  smalloc_free(q);
  smalloc_stats_t c;
  sm_stats_snap(&c);
  ck_assert_uint_eq(c.blocks_in_use, a.blocks_in_use - 2);
  ck_assert_uint_eq(c.calls_free, 2);
  ck_assert_uint_eq(c.calls_malloc, 0);
}
END_TEST

static void print_table(FILE *f)
{
  smalloc_stats_print(f);
}

static void print_json(FILE *f)
{
  smalloc_stats_print_json(f);
}

/* Prints into a temporary file and returns its contents (static buffer). */
static const char *printed(void (*fn)(FILE *))
{
  static char buf[256 * 1024];
  FILE *f = tmpfile();
  ck_assert_ptr_nonnull(f);
  fn(f);
  fflush(f);
  rewind(f);
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  buf[n] = '\0';
  fclose(f);
  return buf;
}

START_TEST(stats_print_writes_table_and_json)
{
  void *p = smalloc_malloc(100);
  const char *table = printed(print_table);
  ck_assert_msg(strncmp(table, "smalloc", 7) == 0, "table starts with '%.40s'", table);
  ck_assert_ptr_nonnull(strchr(table, '\n'));
  const char *json = printed(print_json);
  const char *s = json + strspn(json, " \n");
  ck_assert_msg(*s == '{', "json starts with '%.40s'", json);
  ck_assert_ptr_nonnull(strstr(json, "\"calls_malloc\""));
  ck_assert_ptr_nonnull(strrchr(json, '}'));
  smalloc_free(p);
}
END_TEST

/* ---- options -------------------------------------------------------------------------- */

START_TEST(option_get_rejects_unknown)
{
  for (int o = 0; o < SMALLOC_OPTION_COUNT; o++)
    ck_assert_int_ge(smalloc_option_get((smalloc_option_t)o), 0);
  errno = 0;
  ck_assert_int_eq(smalloc_option_get((smalloc_option_t)-1), -1);
  ck_assert_int_eq(errno, EINVAL);
  errno = 0;
  ck_assert_int_eq(smalloc_option_get(SMALLOC_OPTION_COUNT), -1);
  ck_assert_int_eq(errno, EINVAL);
}
END_TEST

START_TEST(option_set_checks_range)
{
  for (size_t i = 0; i < SMALLOC_OPTION_COUNT; i++) {
    const sm_test_option_range_t *r = &sm_test_option_ranges[i];
    long old = smalloc_option_get(r->opt);
    ck_assert_int_ge(old, r->min);
    ck_assert_int_le(old, r->max);
    ck_assert_int_eq(smalloc_option_set(r->opt, r->min - 1), EINVAL);
    ck_assert_int_eq(smalloc_option_set(r->opt, r->max + 1), EINVAL);
    ck_assert_int_eq(smalloc_option_set(r->opt, LONG_MIN), EINVAL);
    ck_assert_int_eq(smalloc_option_get(r->opt), old);
    ck_assert_int_eq(smalloc_option_set(r->opt, r->max), 0);
    ck_assert_int_eq(smalloc_option_get(r->opt), r->max);
    ck_assert_int_eq(smalloc_option_set(r->opt, r->min), 0);
    ck_assert_int_eq(smalloc_option_get(r->opt), r->min);
    ck_assert_int_eq(smalloc_option_set(r->opt, old), 0);
    ck_assert_int_eq(smalloc_option_get(r->opt), old);
  }
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_COUNT, 0), EINVAL);
  ck_assert_int_eq(smalloc_option_set((smalloc_option_t)-1, 0), EINVAL);
}
END_TEST

/* ---- collect -------------------------------------------------------------------------- */

START_TEST(collect_keeps_live_blocks)
{
  enum { N = 300 };
  static void *v[N];
  static uint64_t seed[N];
  static size_t len[N];
  sm_rng_t r;
  sm_rng_seed(&r, 42);
  for (int i = 0; i < N; i++) {
    size_t n = i % 50 == 0 ? sm_rng_range(&r, 70000, 3 * MiB) : sm_rng_range(&r, 1, 9000);
    v[i] = smalloc_malloc(n);
    ck_assert_ptr_nonnull(v[i]);
    seed[i] = sm_pattern_seed(v[i], 1);
    len[i] = n < 4096 ? n : 4096;
    sm_pattern_fill(v[i], len[i], seed[i]);
  }
  for (int i = 0; i < N; i += 2) /* leave pages half empty */
    smalloc_free(v[i]);
  smalloc_collect(false);
  smalloc_collect(true);
  for (int i = 1; i < N; i += 2) {
    SM_CHECK(sm_pattern_ok(v[i], len[i], seed[i]), "block %d changed by collect", i);
    smalloc_free(v[i]);
  }
  smalloc_collect(true);
  void *p = smalloc_malloc(64);
  check_block(p, 64);
  smalloc_free(p);
}
END_TEST

/* ---- the libc names ----------------------------------------------------------------- */

#ifdef SM_OVERRIDE
/* Called through volatile pointers so that the compiler emits every call
 * (it may drop malloc/free pairs or fold results of builtins). */
static void *(*volatile libc_malloc)(size_t) = malloc;
static void (*volatile libc_free)(void *) = free;
static void *(*volatile libc_calloc)(size_t, size_t) = calloc;
static void *(*volatile libc_realloc)(void *, size_t) = realloc;
static void *(*volatile libc_reallocarray)(void *, size_t, size_t) = reallocarray;
static int (*volatile libc_posix_memalign)(void **, size_t, size_t) = posix_memalign;
static void *(*volatile libc_aligned_alloc)(size_t, size_t) = aligned_alloc;
static void *(*volatile libc_memalign)(size_t, size_t) = memalign;
static void *(*volatile libc_valloc)(size_t) = valloc;
static void *(*volatile libc_pvalloc)(size_t) = pvalloc;
static size_t (*volatile libc_usable_size)(void *) = malloc_usable_size;
static void (*volatile libc_free_sized)(void *, size_t) = free_sized;
static void (*volatile libc_free_aligned_sized)(void *, size_t, size_t) =
  free_aligned_sized;

START_TEST(libc_names_are_counted_by_smalloc)
{
  smalloc_stats_t a, b;
  void *p[10] = {0};
  size_t u = 0;
  int rc;

  sm_stats_snap(&a);
  p[0] = libc_malloc(100);
  p[1] = libc_calloc(10, 10);
  p[2] = libc_realloc(NULL, 100);
  p[3] = libc_reallocarray(NULL, 10, 10);
  rc = libc_posix_memalign(&p[4], 64, 100);
  p[5] = libc_aligned_alloc(64, 100);
  p[6] = libc_memalign(64, 100);
  p[7] = libc_valloc(100);
  p[8] = libc_pvalloc(100);
  u = libc_usable_size(p[0]);
  libc_free(p[0]);
  libc_free_sized(p[1], 100);
  libc_free_aligned_sized(p[5], 64, 100);
  sm_stats_snap(&b);

  ck_assert_int_eq(rc, 0);
  for (int i = 0; i < 9; i++)
    ck_assert_ptr_nonnull(p[i]);
  ck_assert_uint_ge(u, 100);
  ck_assert_uint_eq(b.calls_malloc - a.calls_malloc, 1);
  ck_assert_uint_eq(b.calls_calloc - a.calls_calloc, 1);
  ck_assert_uint_eq(b.calls_realloc - a.calls_realloc, 1);
  ck_assert_uint_eq(b.calls_reallocarray - a.calls_reallocarray, 1);
  ck_assert_uint_eq(b.calls_posix_memalign - a.calls_posix_memalign, 1);
  ck_assert_uint_eq(b.calls_aligned_alloc - a.calls_aligned_alloc, 1);
  ck_assert_uint_eq(b.calls_memalign - a.calls_memalign, 1);
  ck_assert_uint_eq(b.calls_valloc - a.calls_valloc, 1);
  ck_assert_uint_eq(b.calls_pvalloc - a.calls_pvalloc, 1);
  ck_assert_uint_eq(b.calls_usable_size - a.calls_usable_size, 1);
  ck_assert_uint_eq(b.calls_free - a.calls_free, 3);
  ck_assert_uint_eq(b.calls_free_sized - a.calls_free_sized, 1);
  ck_assert_uint_eq(b.calls_free_aligned_sized - a.calls_free_aligned_sized, 1);
  ck_assert_uint_eq(b.blocks_in_use - a.blocks_in_use, 6);
  for (int i = 2; i < 9; i++)
    if (i != 5)
      smalloc_free(p[i]);
}
END_TEST

START_TEST(libc_names_share_blocks_with_smalloc_names)
{
  for (size_t i = 0; i < NSIZES; i++) {
    size_t n = some_sizes[i];
    void *p = libc_malloc(n);
    ck_assert_ptr_nonnull(p);
    ck_assert_uint_eq(libc_usable_size(p), smalloc_malloc_usable_size(p));
    check_block(p, n);
    uint64_t before = sm_blocks_in_use();
    smalloc_free(p);
    ck_assert_uint_eq(sm_blocks_in_use(), before - 1);
    void *q = smalloc_malloc(n);
    ck_assert_ptr_nonnull(q);
    ck_assert_uint_eq(libc_usable_size(q), smalloc_malloc_usable_size(q));
    q = libc_realloc(q, n + 1);
    ck_assert_ptr_nonnull(q);
    libc_free(q);
    ck_assert_uint_eq(sm_blocks_in_use(), before - 1);
  }
  /* glibc's own allocations (strdup, fopen) come from smalloc too */
  uint64_t before = sm_blocks_in_use();
  char *s = strdup("a string from glibc");
  ck_assert_ptr_nonnull(s);
  ck_assert_uint_eq(sm_blocks_in_use(), before + 1);
  ck_assert_uint_ge(smalloc_malloc_usable_size(s), strlen(s) + 1);
  smalloc_free(s);
  ck_assert_uint_eq(sm_blocks_in_use(), before);
}
END_TEST

START_TEST(libc_bad_input_matches_contract)
{
  EXPECT_NULL_ERRNO(libc_calloc(SIZE_MAX / 2 + 1, 2), ENOMEM);
  EXPECT_NULL_ERRNO(libc_malloc(sm_opaque_size(TOO_BIG)), ENOMEM);
  EXPECT_NULL_ERRNO(libc_reallocarray(NULL, SIZE_MAX, 3), ENOMEM);
  EXPECT_NULL_ERRNO(libc_aligned_alloc(24, 64), EINVAL);
  EXPECT_NULL_ERRNO(libc_memalign(SIZE_MAX / 2 + 2, 64), EINVAL);
  void *sentinel = (void *)(uintptr_t)0xdeadbeef, *q = sentinel;
  ck_assert_int_eq(libc_posix_memalign(&q, 4, 64), EINVAL);
  ck_assert_ptr_eq(q, sentinel);
  ck_assert_int_eq(libc_usable_size(NULL), 0);
  void *p = libc_malloc(10);
  ck_assert_ptr_null(libc_realloc(p, 0));
}
END_TEST

/* glibc's other names for the family, which a few programs and
 * libraries call directly, and cfree, which programs built against a
 * glibc before 2.26 call: each is smalloc's (found in the library that
 * holds smalloc_malloc), and a block goes back through cfree. */
START_TEST(glibc_other_names_are_smalloc)
{
  static const char *const names[] = {"__libc_malloc", "__libc_free", "__libc_calloc",
                                      "__libc_realloc", "__libc_memalign", "__libc_valloc",
                                      "__libc_pvalloc", "__libc_mallinfo", "__libc_mallopt",
                                      "cfree"};
  Dl_info self, it;
  void *own = dlsym(RTLD_DEFAULT, "smalloc_malloc");
  ck_assert_ptr_nonnull(own);
  ck_assert_int_ne(dladdr(own, &self), 0);
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    void *f = dlsym(RTLD_DEFAULT, names[i]);
    ck_assert_msg(f != NULL, "%s: not found", names[i]);
    ck_assert_int_ne(dladdr(f, &it), 0);
    ck_assert_msg(strcmp(it.dli_fname, self.dli_fname) == 0, "%s is %s's, not %s's", names[i], it.dli_fname,
                  self.dli_fname);
  }
  void *(*volatile libc_valloc_other)(size_t) = (void *(*)(size_t))dlsym(RTLD_DEFAULT, "__libc_valloc");
  void (*volatile libc_cfree)(void *) = (void (*)(void *))dlsym(RTLD_DEFAULT, "cfree");
  smalloc_stats_t a, b;
  sm_stats_snap(&a);
  void *p = libc_valloc_other(100);
  libc_cfree(p);
  sm_stats_snap(&b);
  ck_assert_ptr_nonnull(p);
  ck_assert_uint_eq(b.calls_valloc - a.calls_valloc, 1);
  ck_assert_uint_eq(b.calls_free - a.calls_free, 1);
  ck_assert_uint_eq(b.blocks_in_use, a.blocks_in_use);
}
END_TEST

START_TEST(libc_mallinfo2_and_trim_are_smalloc)
{
  struct mallinfo2 a = mallinfo2();
  void *p = smalloc_malloc(3 * MiB);
  struct mallinfo2 b = mallinfo2();
  ck_assert_ptr_nonnull(p);
  ck_assert_uint_ge(b.uordblks, a.uordblks + 3 * MiB);
  smalloc_free(p);
  /* no ck_assert in between: it allocates and frees, leaving a page to trim */
  int first = malloc_trim(0);
  int second = malloc_trim(0);
  ck_assert_int_ge(first, 0);
  ck_assert_int_le(first, 1);
  ck_assert_int_eq(second, 0);
  FILE *out = capture_stderr(malloc_stats);
  ck_assert_int_gt(file_size(out), 0);
  fclose(out);
  /* mallopt is smalloc's, and answers as glibc's (mallopt_answers_as_glibc) */
  ck_assert_ptr_eq(dlsym(RTLD_DEFAULT, "mallopt"), (void *)smalloc_mallopt);
  ck_assert_int_eq(mallopt(M_MXFAST, 80 * (int)sizeof(size_t) / 4 + 1), 0);
  ck_assert_int_eq(mallopt(M_ARENA_MAX, 1), 1);
  ck_assert_int_eq(malloc_info(1, stdout), EINVAL);
}
END_TEST
#endif /* SM_OVERRIDE */

static Suite *api_suite(void)
{
  Suite *s = suite_create("api");
  TCase *tc = sm_tcase("malloc", 30);
  tcase_add_test(tc, malloc_returns_usable_memory);
  tcase_add_test(tc, malloc_zero_is_unique_and_freeable);
  tcase_add_test(tc, free_null_is_noop);
  tcase_add_test(tc, usable_size_of_null_is_zero);
  tcase_add_test(tc, usable_size_covers_request);
  tcase_add_test(tc, huge_requests_set_enomem);
  suite_add_tcase(s, tc);

  tc = sm_tcase("calloc", 30);
  tcase_add_test(tc, calloc_zeroes_fresh_memory);
  tcase_add_test(tc, calloc_zeroes_reused_memory);
  tcase_add_test(tc, calloc_zero_sizes);
  tcase_add_test(tc, calloc_overflow_sets_enomem);
  suite_add_tcase(s, tc);

  tc = sm_tcase("realloc", 30);
  tcase_add_test(tc, realloc_null_is_malloc);
  tcase_add_test(tc, realloc_to_zero_frees);
  tcase_add_test(tc, realloc_keeps_contents);
  tcase_add_test(tc, reallocarray_works_and_checks_overflow);
  suite_add_tcase(s, tc);

  tc = sm_tcase("aligned", 30);
  tcase_add_test(tc, posix_memalign_bad_alignment_is_einval);
  tcase_add_test(tc, posix_memalign_aligns);
  tcase_add_test(tc, aligned_alloc_bad_alignment_is_einval);
  tcase_add_test(tc, aligned_alloc_size_need_not_be_multiple);
  tcase_add_test(tc, memalign_bad_alignment_is_einval);
  tcase_add_test(tc, memalign_rounds_the_alignment_up_to_a_power_of_two);
  tcase_add_test(tc, memalign_aligns);
  tcase_add_test(tc, alignment_beyond_address_space_fails);
  tcase_add_test(tc, valloc_is_page_aligned);
  tcase_add_test(tc, pvalloc_rounds_to_pages);
  tcase_add_test(tc, free_sized_frees);
  suite_add_tcase(s, tc);

  tc = sm_tcase("glibc-extensions", 30);
  tcase_add_test(tc, malloc_trim_releases_then_has_nothing_left);
  tcase_add_test(tc, mallinfo2_counts_live_blocks);
  tcase_add_test(tc, mallinfo_matches_mallinfo2);
  tcase_add_test(tc, malloc_info_reports_in_glibc_layout);
  tcase_add_test(tc, statistics_are_read_on_the_smallest_stack);
  tcase_add_test(tc, mallopt_answers_as_glibc);
  tcase_add_test(tc, malloc_stats_prints_to_stderr);
  suite_add_tcase(s, tc);

  tc = sm_tcase("stats-options", 30);
  tcase_add_test(tc, stats_get_checks_its_argument);
  tcase_add_test(tc, stats_get_fills_classes);
  tcase_add_test(tc, stats_reset_keeps_gauges);
  tcase_add_test(tc, stats_print_writes_table_and_json);
  tcase_add_test(tc, option_get_rejects_unknown);
  tcase_add_test(tc, option_set_checks_range);
  tcase_add_test(tc, collect_keeps_live_blocks);
  suite_add_tcase(s, tc);

#ifdef SM_OVERRIDE
  tc = sm_tcase("libc-names", 30);
  tcase_add_test(tc, libc_names_are_counted_by_smalloc);
  tcase_add_test(tc, libc_names_share_blocks_with_smalloc_names);
  tcase_add_test(tc, libc_bad_input_matches_contract);
  tcase_add_test(tc, libc_mallinfo2_and_trim_are_smalloc);
  tcase_add_test(tc, glibc_other_names_are_smalloc);
  suite_add_tcase(s, tc);
#endif
  return s;
}

int main(void)
{
  return sm_run_suite(api_suite());
}
