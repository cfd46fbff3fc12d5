/* Large and huge blocks are reused, not remapped: a freed huge mapping is
 * kept for the next huge request and a freed large block's segment for
 * the next segment, so steady replacement makes no OS call after its
 * first round (exact counters); kept memory is purged after the purge
 * delay and unmapped on request. */
#include "common.h"

#include <sys/mman.h>

typedef struct lg_window {
  smalloc_stats_t s0, s1;
} lg_window_t;

#define LG_DELTA(w, f) ((w)->s1.f - (w)->s0.f)

static void lg_assert_no_os(const lg_window_t *w, const char *what)
{
#define LG_ZERO(f)                                                             \
  ck_assert_msg(LG_DELTA(w, f) == 0, "%s: %s grew by %llu", what, #f,          \
                (unsigned long long)LG_DELTA(w, f))
  LG_ZERO(os_mmap);
  LG_ZERO(os_munmap);
  LG_ZERO(os_madvise);
  LG_ZERO(os_mremap);
  LG_ZERO(segments_mapped);
#undef LG_ZERO
}

/* Rounds that each replace every one of `live` blocks by one of the same
 * size (sizes spread over lo..hi), writing every page; the window is the
 * rounds after the first. */
static void lg_replace(size_t live, size_t lo, size_t hi, unsigned rounds, lg_window_t *w)
{
  unsigned char *v[32];
  size_t sz[32];
  ck_assert_uint_le(live, 32);
  for (size_t i = 0; i < live; i++) {
    sz[i] = lo + (hi - lo) * i / (live - 1);
    v[i] = smalloc_malloc(sz[i]);
    ck_assert_ptr_nonnull(v[i]);
  }
  for (unsigned r = 0; r < rounds; r++) {
    if (r == 1)
      ck_assert_int_eq(sm_test_snap(&w->s0), 0);
    for (size_t k = 0; k < live; k++) {
      size_t i = (k * 7) % live;   /* not in allocation order */
      smalloc_free(v[i]);
      v[i] = smalloc_malloc(sz[i]);
      ck_assert_ptr_nonnull(v[i]);
      for (size_t o = 0; o < sz[i]; o += 4096)
        v[i][o] = (unsigned char)(o + r);
    }
  }
  ck_assert_int_eq(sm_test_snap(&w->s1), 0);
  for (size_t i = 0; i < live; i++)
    smalloc_free(v[i]);
}

/* 20 live blocks of 5-25 MiB */
START_TEST(huge_replacement_makes_no_os_calls)
{
  if (SM_TEST_SECURE)
    return;   /* the secure build keeps no huge mapping: a guard page ends each */
  lg_window_t w;
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 3600000), 0);
  lg_replace(20, 5 * MiB, 25 * MiB, 4, &w);
  lg_assert_no_os(&w, "huge replacement");
  ck_assert_uint_eq(LG_DELTA(&w, huge_allocs), 3 * 20);
  ck_assert_uint_eq(LG_DELTA(&w, huge_cache_hits), 3 * 20);
  ck_assert_uint_eq(LG_DELTA(&w, huge_cached), 3 * 20);
}
END_TEST

/* 8 live blocks of 300 KB: each has a segment of its own, which the
 * segment cache keeps */
START_TEST(large_replacement_makes_no_os_calls)
{
  lg_window_t w;
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 3600000), 0);
  lg_replace(8, 300 * 1000, 300 * 1000 + 7, 4, &w);
  lg_assert_no_os(&w, "large replacement");
  ck_assert_uint_eq(LG_DELTA(&w, large_allocs), 3 * 8);
  ck_assert_uint_eq(LG_DELTA(&w, segments_cache_hits), 3 * 8);
}
END_TEST

/* A reused mapping holds the old block's bytes: calloc clears them. */
START_TEST(calloc_of_a_reused_huge_block_is_zero)
{
  if (SM_TEST_SECURE)
    return;   /* the secure build keeps no huge mapping: a guard page ends each */
  enum { N = 9 * 1024 * 1024 };
  unsigned char *p = smalloc_malloc(N);
  ck_assert_ptr_nonnull(p);
  memset(p, 0xa5, N);
  smalloc_free(p);
  smalloc_stats_t a, b;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  unsigned char *q = smalloc_calloc(1, N);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_ptr_nonnull(q);
  ck_assert_uint_eq(b.huge_cache_hits - a.huge_cache_hits, 1);
  ck_assert_uint_eq(b.os_mmap - a.os_mmap, 0);
  size_t bad = sm_find_not_byte(q, N, 0);
  ck_assert_msg(bad == SIZE_MAX, "calloc'd byte %zu is %#x", bad, q[bad]);
  smalloc_free(q);
}
END_TEST

/* Kept mappings are purged after the delay (here 0: at once) and unmapped
 * by malloc_trim; a stale pointer into a kept mapping is no block. */
START_TEST(kept_huge_mappings_are_purged_then_trimmed)
{
  if (SM_TEST_SECURE)
    return;   /* the secure build keeps no huge mapping: a guard page ends each */
  enum { N = 12 * 1024 * 1024 };
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 0), 0);
  smalloc_malloc_trim(0);
  smalloc_stats_t a, b, c;
  unsigned char *p = smalloc_malloc(N);
  ck_assert_ptr_nonnull(p);
  memset(p, 1, N);
  ck_assert_int_eq(sm_test_snap(&a), 0);
  smalloc_free(p);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_uint_eq(b.huge_cached - a.huge_cached, 1);
  ck_assert_uint_eq(b.os_munmap - a.os_munmap, 0);
  ck_assert_uint_eq(b.os_madvise - a.os_madvise, 1);
  ck_assert_uint_ge(b.bytes_purged - a.bytes_purged, N);
  ck_assert_uint_le(b.bytes_committed + N, a.bytes_committed);
  ck_assert_uint_eq(b.bytes_mapped, a.bytes_mapped);
  ck_assert_int_eq(smalloc_malloc_trim(0), 1);
  ck_assert_int_eq(sm_test_snap(&c), 0);
  ck_assert_uint_eq(c.os_munmap - b.os_munmap, 1);
  ck_assert_uint_le(c.bytes_mapped + N, b.bytes_mapped);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 1000), 0);
}
END_TEST

static Suite *large_suite(void)
{
  Suite *s = suite_create("large");
  TCase *tc = sm_tcase("large", 300);
  tcase_add_test(tc, huge_replacement_makes_no_os_calls);
  tcase_add_test(tc, large_replacement_makes_no_os_calls);
  tcase_add_test(tc, calloc_of_a_reused_huge_block_is_zero);
  tcase_add_test(tc, kept_huge_mappings_are_purged_then_trimmed);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  return sm_run_suite(large_suite());
}
