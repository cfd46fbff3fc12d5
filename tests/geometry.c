/* Geometry: the block-start test of free's fast path, checked against
 * plain arithmetic for every size class and every offset a pointer in the
 * same segment can have.
 *
 * free() decides "p starts one of the page's blocks" with one multiply and
 * one compare (sm_page_is_block in lib/internal.h, where the argument for
 * why that is exact is written down).  A wrong answer would put an
 * interior or foreign pointer on a free list, so this suite does not trust
 * the argument: for each of the 96 classes, in a page of its kind with and
 * without the segment header, it tries every byte offset from -4 MiB to
 * +4 MiB and compares with offset >= 0, offset % size == 0 and
 * offset / size < blocks.  It includes the library's internal header for
 * the inline test and the constants; nothing else of the library is used.
 */
#include "common.h"

#include "internal.h"

typedef struct geo_miss {
  size_t bin, bsize, reserved;
  int64_t off;
  bool want;
  uint64_t count;
} geo_miss_t;

/* Every offset in [-range, range): returns the number of wrong answers and
 * records the first. */
static uint64_t geo_check(size_t bin, size_t bsize, size_t reserved, int64_t range,
                          geo_miss_t *miss)
{
  sm_page_t page;
  static uint8_t anchor[1];
  uint64_t mul, limit, wrong = 0;
  memset(&page, 0, sizeof page);
  sm_block_test_consts(bsize, reserved, &mul, &limit);
  page.mul = mul;
  page.limit = limit;
  /* pointers are formed as integers relative to an arbitrary start: the
   * test only does arithmetic on them */
  uintptr_t start = (uintptr_t)anchor + ((uintptr_t)1 << 40);
  page.start = (uint8_t *)start;

  int64_t off = -range;
  /* k = floor(off / bsize), j = off - k * bsize in [0, bsize) */
  int64_t k = off / (int64_t)bsize;
  int64_t j = off - k * (int64_t)bsize;
  if (j < 0) {
    j += (int64_t)bsize;
    k--;
  }
  for (; off < range; off++) {
    bool want = j == 0 && k >= 0 && k < (int64_t)reserved;
    bool got = sm_page_is_block(&page, (const void *)(start + (uintptr_t)off));
    if (sm_unlikely(got != want)) {
      if (wrong++ == 0)
        *miss = (geo_miss_t){bin, bsize, reserved, off, want, 0};
    }
    if (++j == (int64_t)bsize) {
      j = 0;
      k++;
    }
  }
  return wrong;
}

START_TEST(block_start_test_is_exact)
{
  const int64_t range = (int64_t)SM_SEGMENT_SIZE;
  geo_miss_t miss = {0};
  uint64_t wrong = 0, cases = 0;
  for (size_t bin = 1; bin <= SMALLOC_STATS_CLASSES; bin++) {
    size_t bsize = sm_bin_size(bin);
    size_t psize = (size_t)1 << (bin <= SM_BIN_SMALL_LAST ? SM_SMALL_SHIFT : SM_MEDIUM_SHIFT);
    /* a page after the first, and page 0 (which also holds the header) */
    size_t counts[2] = {(psize - SM_GUARD) / bsize, (psize - SM_SEGMENT_HDR - SM_GUARD) / bsize};
    for (int v = 0; v < 2; v++) {
      if (counts[v] == 0)
        continue;
      uint64_t w = geo_check(bin, bsize, counts[v], range, &miss);
      if (w && !wrong)
        miss.count = w;
      wrong += w;
      cases++;
    }
  }
  ck_assert_msg(wrong == 0,
                "%llu wrong answers; first: class %zu (%zu bytes, %zu blocks), offset %lld: "
                "want %s",
                (unsigned long long)wrong, miss.bin, miss.bsize, miss.reserved,
                (long long)miss.off, miss.want ? "a block start" : "not a block start");
  ck_assert_uint_ge(cases, 2 * SMALLOC_STATS_CLASSES - 8);
}
END_TEST

/* The largest class in the largest page: the argument needs 2 * limit and
 * every product of a valid offset to stay far from 2^64. */
START_TEST(block_start_constants_in_range)
{
  for (size_t bin = 1; bin <= SMALLOC_STATS_CLASSES; bin++) {
    size_t bsize = sm_bin_size(bin);
    uint64_t mul, limit;
    sm_block_test_consts(bsize, SM_SEGMENT_SIZE / bsize, &mul, &limit);
    uint64_t e = (uint64_t)bsize * mul;
    ck_assert_msg(e >= bsize && e < 2 * bsize, "class %zu: e = %llu", bsize,
                  (unsigned long long)e);
    ck_assert_msg(limit < ((uint64_t)1 << 32), "class %zu: limit %llu", bsize,
                  (unsigned long long)limit);
    ck_assert_msg(mul > ((uint64_t)1 << 45), "class %zu: mul %llu", bsize,
                  (unsigned long long)mul);
  }
}
END_TEST

int main(void)
{
  Suite *s = suite_create("geometry");
  TCase *tc = sm_tcase("core", 120);
  tcase_add_test(tc, block_start_test_is_exact);
  tcase_add_test(tc, block_start_constants_in_range);
  suite_add_tcase(s, tc);
  return sm_run_suite(s);
}
