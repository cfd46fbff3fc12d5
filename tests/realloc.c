/* realloc keeps contents across every size-class boundary, between small,
 * large (over 256 KiB) and huge (over 2 MiB) blocks, and stays in place where
 * the block already has room. */
#include "common.h"

#define MAX_CLASSES 256

static size_t class_size[MAX_CLASSES];
static size_t nclass;

#define MAX_CLASS SM_TEST_CLASS_MAX_REQUEST   /* the largest usable size of a class */

/* The class block sizes up to the largest (256 KiB), as seen through
 * malloc_usable_size. */
static void find_classes(void)
{
  size_t last = 0;
  nclass = 0;
  for (size_t n = 1; n <= MAX_CLASS; n++) {
    void *p = smalloc_malloc(n);
    SM_CHECK(p != NULL, "malloc(%zu)", n);
    size_t u = smalloc_malloc_usable_size(p);
    smalloc_free(p);
    if (u != last) {
      SM_CHECK(u > last, "usable size %zu of malloc(%zu) below %zu", u, n, last);
      SM_CHECK(nclass < MAX_CLASSES, "more than %d size classes", MAX_CLASSES);
      class_size[nclass++] = u;
      last = u;
      n = u; /* every request up to u lands in this class */
    }
  }
  ck_assert_uint_ge(nclass, 40);
  ck_assert_uint_eq(class_size[nclass - 1], MAX_CLASS);
}

static const size_t big_steps[] = {
  MAX_CLASS + 1, 300 * KiB, 512 * KiB, MiB, 2 * MiB - 64 * KiB, 2 * MiB - 1,
  2 * MiB, 2 * MiB + 1, 3 * MiB, 4 * MiB + 1, 8 * MiB, 16 * MiB, 32 * MiB + 1,
  64 * MiB,
};
#define NBIG (sizeof big_steps / sizeof big_steps[0])

/* The walk: each class size and one byte more, then the large and huge steps. */
static size_t walk[2 * MAX_CLASSES + NBIG];
static size_t nwalk;

static void build_walk(void)
{
  find_classes();
  nwalk = 0;
  for (size_t i = 0; i < nclass; i++) {
    walk[nwalk++] = class_size[i];
    if (class_size[i] < MAX_CLASS)
      walk[nwalk++] = class_size[i] + 1;
  }
  for (size_t i = 0; i < NBIG; i++)
    walk[nwalk++] = big_steps[i];
}

/* realloc p (holding `have` pattern bytes) to n and check the kept prefix. */
static unsigned char *step(unsigned char *p, size_t have, size_t n, uint64_t seed)
{
  unsigned char *q = smalloc_realloc(p, n);
  SM_CHECK(q != NULL, "realloc(%zu -> %zu) returned NULL", have, n);
  size_t u = smalloc_malloc_usable_size(q);
  SM_CHECK(u >= n, "realloc to %zu: usable %zu", n, u);
  SM_CHECK(sm_is_aligned(q, 16), "realloc to %zu: %p", n, (void *)q);
  size_t keep = have < n ? have : n;
  size_t bad = sm_pattern_find_bad(q, keep, seed);
  SM_CHECK(bad == SIZE_MAX, "realloc %zu -> %zu (%s): byte %zu of %zu lost", have, n,
           p == q ? "in place" : "moved", bad, keep);
  if (n > have)
    sm_pattern_fill_range(q, have, n, seed);
  return q;
}

START_TEST(grow_through_every_class)
{
  build_walk();
  uint64_t base = sm_blocks_in_use();
  uint64_t seed = 0x1234567;
  unsigned char *p = smalloc_malloc(1);
  ck_assert_ptr_nonnull(p);
  sm_pattern_fill(p, 1, seed);
  size_t have = 1;
  for (size_t i = 0; i < nwalk; i++) {
    p = step(p, have, walk[i], seed);
    have = walk[i];
  }
  ck_assert(sm_pattern_ok(p, have, seed));
  smalloc_free(p);
  ck_assert_uint_eq(sm_blocks_in_use(), base);
}
END_TEST

START_TEST(shrink_through_every_class)
{
  build_walk();
  uint64_t base = sm_blocks_in_use();
  uint64_t seed = 0x7654321;
  size_t have = walk[nwalk - 1];
  unsigned char *p = smalloc_malloc(have);
  ck_assert_ptr_nonnull(p);
  sm_pattern_fill(p, have, seed);
  for (size_t i = nwalk - 1; i-- > 0;) {
    p = step(p, have, walk[i], seed);
    have = walk[i];
  }
  p = step(p, have, 1, seed);
  smalloc_free(p);
  ck_assert_uint_eq(sm_blocks_in_use(), base);
}
END_TEST

/* Jumps between the three kinds of block, both directions, many times. */
START_TEST(small_large_huge_round_trips)
{
  static const size_t hops[] = {
    100, 300 * KiB, 5 * MiB, 100, 5 * MiB, 400 * KiB, 30 * KiB, 64 * MiB, 10,
    3 * MiB, 200 * KiB, 2 * MiB + 1, 8 * KiB, 700 * KiB, 40, 24 * MiB, 65 * KiB,
  };
  uint64_t base = sm_blocks_in_use();
  uint64_t seed = 99;
  size_t have = 64;
  unsigned char *p = smalloc_malloc(have);
  ck_assert_ptr_nonnull(p);
  sm_pattern_fill(p, have, seed);
  for (int round = 0; round < 3; round++)
    for (size_t i = 0; i < sizeof hops / sizeof hops[0]; i++) {
      p = step(p, have, hops[i], seed);
      /* refill completely so each hop checks fresh data */
      seed = sm_pattern_seed(p, seed + i);
      sm_pattern_fill(p, hops[i], seed);
      have = hops[i];
    }
  smalloc_free(p);
  ck_assert_uint_eq(sm_blocks_in_use(), base);
}
END_TEST

START_TEST(realloc_in_place_within_class)
{
  find_classes();
  for (size_t i = 0; i < nclass; i++) {
    size_t c = class_size[i];
    unsigned char *p = smalloc_malloc(c);
    ck_assert_ptr_nonnull(p);
    uint64_t seed = sm_pattern_seed(p, i);
    sm_pattern_fill(p, c, seed);
    void *q = smalloc_realloc(p, c - 1);
    SM_CHECK(q == p, "realloc(%zu -> %zu) moved the block", c, c - 1);
    q = smalloc_realloc(p, c);
    SM_CHECK(q == p, "realloc(%zu -> %zu) within the block moved it", c - 1, c);
    size_t down = c - c / 16; /* shrink by less than one class step */
    if (i > 0 && down <= class_size[i - 1])
      down = class_size[i - 1] + 1;
    q = smalloc_realloc(p, down);
    SM_CHECK(q == p, "realloc(%zu -> %zu) in the same class moved the block", c, down);
    SM_CHECK(sm_pattern_ok(p, down, seed), "class %zu: contents changed", c);
    smalloc_free(p);

    /* a request below the class size can grow up to it in place */
    size_t n = i > 0 ? class_size[i - 1] + 1 : 1;
    p = smalloc_malloc(n);
    ck_assert_ptr_nonnull(p);
    size_t u = smalloc_malloc_usable_size(p);
    ck_assert_uint_eq(u, c);
    q = smalloc_realloc(p, u);
    SM_CHECK(q == p, "realloc(%zu -> usable %zu) moved the block", n, u);
    smalloc_free(p);
  }
}
END_TEST

START_TEST(realloc_in_place_large_and_huge)
{
  static const size_t sizes[] = {300 * KiB, 500 * KiB, 1500 * KiB, 3 * MiB, 9 * MiB,
                                 40 * MiB};
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    size_t n = sizes[i];
    unsigned char *p = smalloc_malloc(n);
    ck_assert_ptr_nonnull(p);
    uint64_t seed = sm_pattern_seed(p, 1);
    sm_pattern_fill(p, n, seed);
    size_t u = smalloc_malloc_usable_size(p);
    void *q = smalloc_realloc(p, u);
    SM_CHECK(q == p, "realloc(%zu -> usable %zu) moved the block", n, u);
    q = smalloc_realloc(p, n - 100);
    SM_CHECK(q == p, "realloc(%zu -> %zu) moved the block", n, n - 100);
    q = smalloc_realloc(p, n - n / 16);
    SM_CHECK(q == p, "realloc(%zu -> %zu) moved the block", n, n - n / 16);
    SM_CHECK(sm_pattern_ok(p, n - n / 16, seed), "block of %zu: contents changed", n);
    smalloc_free(p);
  }
}
END_TEST

START_TEST(huge_realloc_uses_remap)
{
  smalloc_stats_t a, b;
  uint64_t seed = 4242;
  size_t have = 3 * MiB;
  unsigned char *p = smalloc_malloc(have);
  ck_assert_ptr_nonnull(p);
  sm_pattern_fill(p, have, seed);
  sm_stats_snap(&a);
  static const size_t steps[] = {6 * MiB, 12 * MiB, 48 * MiB, 5 * MiB, 20 * MiB};
  for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
    p = step(p, have, steps[i], seed);
    have = steps[i];
  }
  sm_stats_snap(&b);
  smalloc_free(p);
#ifndef SM_SECURE
  ck_assert_uint_ge(b.huge_remaps - a.huge_remaps, 1);
  ck_assert_uint_eq(b.huge_allocs - a.huge_allocs, 0);
  ck_assert_uint_eq(b.huge_frees - a.huge_frees, 0);
#else
  /* the secure build keeps a guard page after each huge block and copies */
  (void)a;
  (void)b;
#endif
}
END_TEST

START_TEST(realloc_of_aligned_blocks)
{
  static const size_t al[] = {64, 4096, 64 * KiB, MiB};
  static const size_t steps[] = {100, 5000, 200 * KiB, 3 * MiB, 50, 70 * KiB};
  uint64_t base = sm_blocks_in_use();
  for (size_t i = 0; i < sizeof al / sizeof al[0]; i++) {
    size_t have = 40;
    unsigned char *p = smalloc_memalign(al[i], have);
    ck_assert_ptr_nonnull(p);
    uint64_t seed = sm_pattern_seed(p, al[i]);
    sm_pattern_fill(p, have, seed);
    for (size_t j = 0; j < sizeof steps / sizeof steps[0]; j++) {
      p = step(p, have, steps[j], seed);
      have = steps[j];
    }
    smalloc_free(p);
  }
  ck_assert_uint_eq(sm_blocks_in_use(), base);
}
END_TEST

/* Many blocks grown a little at a time, interleaved, as a string builder or
 * a vector does. */
START_TEST(interleaved_growth)
{
  enum { N = 64 };
  static unsigned char *p[N];
  static size_t have[N];
  static uint64_t seed[N];
  uint64_t base = sm_blocks_in_use();
  for (int i = 0; i < N; i++) {
    have[i] = 0;
    p[i] = NULL;
    seed[i] = sm_mix64((uint64_t)i + 1);
  }
  sm_rng_t r;
  sm_rng_seed(&r, 777);
  for (int it = 0; it < 20000; it++) {
    int i = (int)sm_rng_below(&r, N);
    size_t n = have[i] + sm_rng_range(&r, 1, have[i] < 4096 ? 64 : have[i] / 8);
    if (n > MAX_CLASS + 32 * KiB) { /* just past the largest class, then start over */
      p[i] = step(p[i], have[i], 16, seed[i]);
      n = 16;
    } else {
      p[i] = step(p[i], have[i], n, seed[i]);
    }
    have[i] = n;
  }
  for (int i = 0; i < N; i++) {
    SM_CHECK(sm_pattern_ok(p[i], have[i], seed[i]), "block %d", i);
    smalloc_free(p[i]);
  }
  ck_assert_uint_eq(sm_blocks_in_use(), base);
}
END_TEST

int main(void)
{
  Suite *s = suite_create("realloc");
  TCase *tc = sm_tcase("contents", 60);
  tcase_add_test(tc, grow_through_every_class);
  tcase_add_test(tc, shrink_through_every_class);
  tcase_add_test(tc, small_large_huge_round_trips);
  tcase_add_test(tc, realloc_of_aligned_blocks);
  tcase_add_test(tc, interleaved_growth);
  suite_add_tcase(s, tc);
  tc = sm_tcase("in-place", 60);
  tcase_add_test(tc, realloc_in_place_within_class);
  tcase_add_test(tc, realloc_in_place_large_and_huge);
  tcase_add_test(tc, huge_realloc_uses_remap);
  suite_add_tcase(s, tc);
  return sm_run_suite(s);
}
