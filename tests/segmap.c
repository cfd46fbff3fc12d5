/* The segment map, the page map and the thread_free word at any address
 * width.
 *
 * free finds a block's page through the page map (a 32 GiB window around
 * the first segment), and otherwise its segment through the segment map:
 * a wider window, and three levels of tables beyond it that cover 57-bit
 * addresses (x86-64 with 5-level paging, arm64 with 52-bit VA).
 * This suite links the library's objects (libsmalloc-core.la) to reach
 * the map and the hint for the next segment's address:
 *   - a segment placed far from the window (below 2^47 on any kernel;
 *     above it where the kernel hands such addresses out) serves mallocs
 *     and frees from its thread and from another one;
 *   - the map records and erases units anywhere below 2^57 (synthetic
 *     addresses: nothing is mapped there) and refuses beyond;
 *   - the thread_free word keeps a head anywhere below 2^64 with its
 *     count (it packs the head's offset in its segment, not the address);
 *   - page descriptors lie apart from their segments, each segment's at
 *     another offset.
 */
#include "common.h"

#include <pthread.h>
#include <sys/mman.h>

#include "internal.h"

/* Live blocks of malloc(64)'s class (pthread_create allocates blocks of
 * its own). */
static uint64_t blocks_in_use(void)
{
  smalloc_stats_t st = {.size = sizeof st};
  smalloc_stats_get(&st);
  for (uint32_t c = 0; c < st.nclasses; c++)
    if (st.classes[c].block_size == sm_test_class_size(64)) return st.classes[c].blocks_in_use;
  return UINT64_MAX;
}

/* ---- a real segment far from the window ----------------------------------- */

enum { FAR_N = 200 };
static void *far_blocks[FAR_N];

static void *far_thread(void *arg)
{
  uintptr_t want = (uintptr_t)arg;
  for (int i = 0; i < FAR_N; i++) {
    far_blocks[i] = smalloc_malloc(64);
    SM_CHILD_CHECK(far_blocks[i] != NULL, "malloc(64) failed");
    memset(far_blocks[i], i, 64);
  }
  SM_CHILD_CHECK(sm_ptr_segment(far_blocks[0]) == (sm_segment_t *)want,
                 "the thread's first block %p is not in the segment at %#lx",
                 far_blocks[0], (unsigned long)want);
  /* half of them freed here, through the far path of the map */
  for (int i = 0; i < FAR_N; i += 2) smalloc_free(far_blocks[i]);
  return NULL;
}

/* Map a segment at seg (free address space there, checked by the caller)
 * for a new thread's heap; use it from that thread and from this one. */
static void far_segment_serves(uintptr_t seg)
{
  SM_CHILD_CHECK(sm_pagemap_page((void *)seg) == NULL, "%#lx is inside the page map's window",
                 (unsigned long)seg);
  uint64_t before = blocks_in_use();
  atomic_store(&sm_os_hint, seg);
  pthread_t t;
  SM_CHILD_CHECK(pthread_create(&t, NULL, far_thread, (void *)seg) == 0, "pthread_create");
  SM_CHILD_CHECK(pthread_join(t, NULL) == 0, "pthread_join");
  SM_CHILD_CHECK(sm_segmap_shift(seg) == SM_SMALL_SHIFT, "the map has shift %u at %#lx",
                 sm_segmap_shift(seg), (unsigned long)seg);
  SM_CHILD_CHECK(blocks_in_use() == before + FAR_N / 2, "blocks_in_use %llu, want %llu",
                 (unsigned long long)blocks_in_use(), (unsigned long long)(before + FAR_N / 2));
  SM_CHILD_CHECK(sm_pagemap_page(far_blocks[1]) == NULL, "a block at %p is in the page map",
                 far_blocks[1]);
  for (int i = 1; i < FAR_N; i += 2) {
    unsigned char *b = far_blocks[i];
    SM_CHILD_CHECK(b[0] == (unsigned char)i && b[63] == (unsigned char)i, "block %d changed", i);
    SM_CHILD_CHECK(smalloc_malloc_usable_size(b) >= 64, "usable size of %p", (void *)b);
    smalloc_free(b);   /* the owner has exited: its segment was abandoned */
  }
  SM_CHILD_CHECK(blocks_in_use() == before, "blocks_in_use %llu, want %llu",
                 (unsigned long long)blocks_in_use(), (unsigned long long)before);
}

/* Whether [addr, addr + len) is free address space this kernel hands out. */
static bool range_is_free(uintptr_t addr, size_t len)
{
  void *p = mmap((void *)addr, len, PROT_NONE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
  if (p == MAP_FAILED) return false;
  munmap(p, len);
  return (uintptr_t)p == addr;
}

static void window_first(void)
{
  smalloc_free(smalloc_malloc(16));   /* the first segment places the window */
}

static void far_below_the_window(void)
{
  window_first();
  uintptr_t base = __atomic_load_n(&sm_segmap_base, __ATOMIC_RELAXED);
  SM_CHILD_CHECK(base != SM_SEGMAP_NO_BASE, "no window after the first malloc");
  /* 64 GiB steps down from the window's start, to a free range */
  for (uintptr_t unit = base - 16384; unit > 16384; unit -= 16384) {
    uintptr_t seg = unit << SM_SEGMENT_SHIFT;
    if (range_is_free(seg, SM_SEGMENT_SIZE)) {
      SM_CHILD_CHECK(sm_segmap_shift_near(seg) == 0, "%#lx is inside the window",
                     (unsigned long)seg);
      far_segment_serves(seg);
      return;
    }
  }
  SM_CHILD_CHECK(false, "no free 4 MiB below the window at unit %#lx", (unsigned long)base);
}

START_TEST(a_segment_far_from_the_window_serves)
{
  sm_test_in_child(far_below_the_window);
}
END_TEST

/* The page map's first and last unit (in segments) and the segment map's
 * window start: the page map's window lies inside the segment map's. */
static uintptr_t pagemap_first_unit(void)
{
  return __atomic_load_n(&sm_pagemap_base, __ATOMIC_RELAXED) >> SM_SEGMENT_SHIFT;
}

/* A segment in the segment map's window but outside the page map's: its
 * blocks are freed the long way (segment map, cookie), from its thread
 * and from another one. */
static void beside_the_page_map(void)
{
  window_first();
  uintptr_t first = pagemap_first_unit();
  uintptr_t base = __atomic_load_n(&sm_segmap_base, __ATOMIC_RELAXED);
  SM_CHILD_CHECK(first > base, "the page map starts at unit %#lx, the window at %#lx",
                 (unsigned long)first, (unsigned long)base);
  for (uintptr_t unit = first - 1; unit > base; unit -= 64) {
    uintptr_t seg = unit << SM_SEGMENT_SHIFT;
    if (range_is_free(seg, SM_SEGMENT_SIZE)) {
      SM_CHILD_CHECK(sm_segmap_shift_near(seg) == 0 && unit - base < SM_SEGMAP_WINDOW,
                     "%#lx is not free in the window", (unsigned long)seg);
      far_segment_serves(seg);
      SM_CHILD_CHECK(sm_segmap_shift_near(seg) == SM_SMALL_SHIFT, "%#lx not in the window",
                     (unsigned long)seg);
      return;
    }
  }
  SM_CHILD_CHECK(false, "no free 4 MiB between unit %#lx and %#lx", (unsigned long)base,
                 (unsigned long)first);
}

START_TEST(a_segment_outside_the_page_map_serves)
{
  sm_test_in_child(beside_the_page_map);
}
END_TEST

/* Every slice of a segment in the page map's window names the page that
 * the segment's shift puts it in; erased, none does. */
START_TEST(the_page_map_names_each_slices_page)
{
  window_first();
  uintptr_t first = pagemap_first_unit();
  const unsigned shifts[] = {SM_SMALL_SHIFT, SM_MEDIUM_SHIFT, SM_SEGMENT_SHIFT};
  uintptr_t unit = first + SM_PAGEMAP_SLICES / SM_PAGEMAP_UNIT - 1;   /* the last */
  for (; unit > first; unit--)
    if (sm_segmap_shift(unit << SM_SEGMENT_SHIFT) == 0 &&
        range_is_free(unit << SM_SEGMENT_SHIFT, SM_SEGMENT_SIZE)) break;
  ck_assert_msg(unit > first, "no free unit in the page map's window");
  uintptr_t seg = unit << SM_SEGMENT_SHIFT;   /* synthetic: nothing is mapped there */
  static sm_page_t descs[SM_SMALL_PAGES];      /* its descriptors (addresses only) */
  ck_assert_msg(sm_segmap_prepare(seg), "no place in the map for %#lx", (unsigned long)seg);
  for (size_t k = 0; k < sizeof shifts / sizeof shifts[0]; k++) {
    sm_segmap_set_pages(seg, shifts[k], descs);
    for (uintptr_t off = 0; off < SM_SEGMENT_SIZE; off += SM_OS_PAGE) {
      sm_page_t *want = &descs[off >> shifts[k]];
      ck_assert_msg(sm_pagemap_page((void *)(seg + off)) == want,
                    "shift %u: offset %#lx has page %p, want %p", shifts[k], (unsigned long)off,
                    (void *)sm_pagemap_page((void *)(seg + off)), (void *)want);
    }
    ck_assert_ptr_null(sm_pagemap_page((void *)(seg + SM_SEGMENT_SIZE)));
    ck_assert_ptr_null(sm_pagemap_page((void *)(seg - 1)));
    sm_segmap_set(seg, 0);
    for (uintptr_t off = 0; off < SM_SEGMENT_SIZE; off += SM_OS_PAGE)
      ck_assert_ptr_null(sm_pagemap_page((void *)(seg + off)));
  }
  /* the window's first segment is none's: never recorded, so none holds
   * no block (free's block test fails there) */
  uintptr_t none_seg = first << SM_SEGMENT_SHIFT;
  if (sm_segmap_shift(none_seg) == 0 && range_is_free(none_seg, SM_SEGMENT_SIZE)) {
    ck_assert(sm_segmap_prepare(none_seg));
    sm_segmap_set(none_seg, SM_SMALL_SHIFT);
    for (uintptr_t off = 0; off < SM_SEGMENT_SIZE; off += SM_OS_PAGE)
      ck_assert_ptr_null(sm_pagemap_page((void *)(none_seg + off)));
    sm_segmap_set(none_seg, 0);
  }
  ck_assert_ptr_null(sm_pagemap.none.start);
  ck_assert_uint_eq(sm_pagemap.none.limit, 0);
  ck_assert(!sm_page_is_block(&sm_pagemap.none, (void *)seg));
}
END_TEST

/* Blocks of every kind the library hands out are found in the page map
 * at the page that the long way finds. */
START_TEST(the_page_map_agrees_with_the_segment_map)
{
  const size_t sizes[] = {16, 64, 1024, 8192, 20000, 200000, 300000, 1 << 20, 5 << 20};
  void *blocks[sizeof sizes / sizeof sizes[0]];
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    blocks[i] = smalloc_malloc(sizes[i]);
    ck_assert_ptr_nonnull(blocks[i]);
    sm_segment_t *seg;
    sm_page_t *page;
    ck_assert_msg(sm_lookup(blocks[i], &seg, &page), "malloc(%zu) gave %p, not found",
                  sizes[i], blocks[i]);
    if (sm_pagemap_page(blocks[i]) == NULL) {
      /* outside the window: the whole segment is */
      ck_assert_ptr_null(sm_pagemap_page(seg));
      continue;
    }
    ck_assert_msg(sm_pagemap_page(blocks[i]) == page, "malloc(%zu) gave %p: page %p, want %p",
                  sizes[i], blocks[i], (void *)sm_pagemap_page(blocks[i]), (void *)page);
  }
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) smalloc_free(blocks[i]);
}
END_TEST

/* Above 2^47 only a kernel with 5-level paging (or arm64 with 52-bit VA)
 * maps anything, and only where asked; elsewhere this part is skipped
 * and the synthetic tests below stand for it. */
static void far_above_2_47(void)
{
  window_first();
  uintptr_t seg = ((uintptr_t)1 << 52) + 5 * SM_SEGMENT_SIZE;
  if (SM_TEST_TSAN) {
    /* ThreadSanitizer refuses application memory outside its ranges */
    fprintf(stderr, "segmap: ThreadSanitizer build; skipped\n");
    return;
  }
  if (!range_is_free(seg, SM_SEGMENT_SIZE)) {
    fprintf(stderr, "segmap: this kernel maps nothing at %#lx; skipped\n", (unsigned long)seg);
    return;
  }
  far_segment_serves(seg);
}

START_TEST(a_segment_above_2_47_serves_where_the_kernel_allows)
{
  sm_test_in_child(far_above_2_47);
}
END_TEST

/* ---- the map at synthetic addresses -------------------------------------- */

START_TEST(the_map_covers_57_bit_addresses)
{
  window_first();
  const uintptr_t units[] = {
    (uintptr_t)1 << (47 - SM_SEGMENT_SHIFT),
    ((uintptr_t)1 << (52 - SM_SEGMENT_SHIFT)) - 1,
    ((uintptr_t)1 << (56 - SM_SEGMENT_SHIFT)) + 12345,
    ((uintptr_t)1 << (57 - SM_SEGMENT_SHIFT)) - 1,
  };
  uintptr_t base = __atomic_load_n(&sm_segmap_base, __ATOMIC_RELAXED);
  for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
    /* beyond the window (which may lie just below 2^47 when the address
     * space is not randomised) */
    uintptr_t unit = units[i] - base < SM_SEGMAP_WINDOW ? units[i] + SM_SEGMAP_WINDOW : units[i];
    uintptr_t seg = unit << SM_SEGMENT_SHIFT;
    ck_assert_msg(sm_segmap_prepare(seg), "no place in the map for %#lx", (unsigned long)seg);
    ck_assert_uint_eq(sm_segmap_shift(seg), 0);
    sm_segmap_set(seg, SM_MEDIUM_SHIFT);
    ck_assert_msg(sm_segmap_shift(seg) == SM_MEDIUM_SHIFT, "%#lx not recorded",
                  (unsigned long)seg);
    ck_assert_uint_eq(sm_segmap_shift(seg + SM_SEGMENT_SIZE), 0);
    ck_assert_uint_eq(sm_segmap_shift(seg - SM_SEGMENT_SIZE), 0);
    ck_assert_uint_eq(sm_segmap_shift_near(seg), 0);   /* far from the window */
    sm_segmap_set(seg, 0);
    ck_assert_uint_eq(sm_segmap_shift(seg), 0);
  }
  uintptr_t beyond = (uintptr_t)1 << 57;
  ck_assert_msg(!sm_segmap_prepare(beyond), "the map took %#lx", (unsigned long)beyond);
  ck_assert_uint_eq(sm_segmap_shift(beyond), 0);
  ck_assert_uint_eq(sm_segmap_shift(UINTPTR_MAX & ~SM_SEGMENT_MASK), 0);
}
END_TEST

START_TEST(the_thread_free_word_keeps_high_addresses)
{
  const uintptr_t segs[] = {
    (uintptr_t)1 << 30,
    ((uintptr_t)1 << 48) + 3 * SM_SEGMENT_SIZE,
    ((uintptr_t)1 << 56) + 7 * SM_SEGMENT_SIZE,
    UINTPTR_MAX & ~SM_SEGMENT_MASK,
  };
  for (size_t i = 0; i < sizeof segs / sizeof segs[0]; i++) {
    /* the last page's descriptor (its start is all the word reads) */
    sm_page_t page_desc = {.start = (uint8_t *)segs[i] + SM_SEGMENT_SIZE - ((size_t)1 << SM_SMALL_SHIFT)};
    sm_page_t *page = &page_desc;
    sm_block_t *last = (sm_block_t *)(segs[i] + SM_SEGMENT_SIZE - 16);
    sm_block_t *first = (sm_block_t *)(segs[i] + SM_SEGMENT_HDR);
    uint32_t most = (uint32_t)((1u << SM_MEDIUM_SHIFT) / 16);
    uintptr_t v = sm_tf_off(last) | SM_TF_FULL | (uintptr_t)most * SM_TF_COUNT_ONE;
    ck_assert_ptr_eq(sm_tf_ptr(page, v), last);
    ck_assert_uint_eq(sm_tf_count(v), most);
    ck_assert_ptr_eq(sm_tf_ptr(page, sm_tf_off(first) + SM_TF_COUNT_ONE), first);
    ck_assert_ptr_null(sm_tf_ptr(page, SM_TF_FULL | 5 * SM_TF_COUNT_ONE));
    ck_assert_ptr_null(sm_tf_ptr(page, sm_tf_off(NULL)));
  }
}
END_TEST

/* ---- page descriptors ------------------------------------------------------ */

/* A thread's first small segments, found through blocks of malloc(64)'s
 * class: each one's page descriptors lie apart from it, in a block that
 * names the segment, and no two segments' descriptors are at one offset
 * within 1 MiB.  (In the headers they were, each segment being aligned to
 * its 4 MiB: descriptor i of every segment fell in one cache set.) */
enum { DESC_SEGS = 6 };
static void descriptors_apart(void)
{
  window_first();
  sm_segment_t *segs[DESC_SEGS];
  unsigned nsegs = 0;
  const size_t most = DESC_SEGS * 2 * (SM_SEGMENT_SIZE / 64);
  for (size_t i = 0; nsegs < DESC_SEGS && i < most; i++) {
    void *p = smalloc_malloc(64);
    SM_CHILD_CHECK(p != NULL, "malloc(64) failed");
    sm_segment_t *seg = sm_ptr_segment(p);
    sm_page_t *page = sm_pagemap_page(p);
    SM_CHILD_CHECK(page == sm_segment_page_of(seg, p), "the page map has %p for %p, the segment %p",
                   (void *)page, p, (void *)sm_segment_page_of(seg, p));
    SM_CHILD_CHECK(sm_page_segment(page) == seg, "page %p names segment %p, not %p", (void *)page,
                   (void *)sm_page_segment(page), (void *)seg);
    SM_CHILD_CHECK((uintptr_t)page - (uintptr_t)seg >= SM_SEGMENT_SIZE,
                   "page %p is in its segment at %p", (void *)page, (void *)seg);
    bool seen = false;
    for (unsigned k = 0; k < nsegs; k++) seen = seen || segs[k] == seg;
    if (!seen) segs[nsegs++] = seg;
  }
  SM_CHILD_CHECK(nsegs == DESC_SEGS, "%u segments after %zu blocks", nsegs, most);
  for (unsigned a = 0; a < nsegs; a++)
    for (unsigned b = a + 1; b < nsegs; b++)
      SM_CHILD_CHECK(((uintptr_t)segs[a]->pages - (uintptr_t)segs[b]->pages) % ((size_t)1 << 20) != 0,
                     "the descriptors of segments %p and %p are %p and %p", (void *)segs[a],
                     (void *)segs[b], (void *)segs[a]->pages, (void *)segs[b]->pages);
}

START_TEST(page_descriptors_lie_apart_from_their_segments)
{
  sm_test_in_child(descriptors_apart);
}
END_TEST

int main(void)
{
  Suite *s = suite_create("segmap");
  TCase *tc = sm_tcase("core", 120);
  tcase_add_test(tc, a_segment_far_from_the_window_serves);
  tcase_add_test(tc, a_segment_outside_the_page_map_serves);
  tcase_add_test(tc, the_page_map_names_each_slices_page);
  tcase_add_test(tc, the_page_map_agrees_with_the_segment_map);
  tcase_add_test(tc, a_segment_above_2_47_serves_where_the_kernel_allows);
  tcase_add_test(tc, the_map_covers_57_bit_addresses);
  tcase_add_test(tc, the_thread_free_word_keeps_high_addresses);
  tcase_add_test(tc, page_descriptors_lie_apart_from_their_segments);
  suite_add_tcase(s, tc);
  return sm_run_suite(s);
}
