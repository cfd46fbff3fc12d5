/* The process's pool of pages (pool.c), on pages made up for it: which
 * page a thread that needs one takes.  Linked with the library's objects
 * (libsmalloc-core.la) to reach sm_pool_push and sm_pool_pop, which the
 * shared library does not export.  The made-up pages are of a class this
 * program never allocates (POOL_BIN), so its own heap's pages never mix
 * with them:
 *   - a page counts the blocks it never handed out, not only those other
 *     threads freed into it;
 *   - a page with fewer free blocks than the bound is taken once they are
 *     all free;
 *   - a page ready behind more than eight that wait for their blocks is
 *     found, not passed by for a fresh page.
 */
#include "common.h"

#include "internal.h"

enum { POOL_BIN = 90, POOL_PAGES = 40, POOL_MIN = 8 };
static sm_page_t pages[POOL_PAGES] __attribute__((aligned(64)));

/* A page that handed out `used` of `reserved` blocks, `freed` of which
 * other threads have freed onto its thread_free (the count is what the
 * pool reads; no block is linked). */
static sm_page_t *pool_page(int i, uint32_t reserved, uint32_t used, uint32_t freed)
{
  sm_page_t *p = &pages[i];
  memset(p, 0, sizeof *p);
  p->bin = POOL_BIN;
  p->reserved = reserved;
  p->capacity = reserved;
  p->used = used;
  atomic_store(&p->thread_free, (uintptr_t)freed * SM_TF_COUNT_ONE);
  sm_pool_push(p);
  return p;
}

START_TEST(blocks_never_handed_out_count)
{
  sm_page_t *p = pool_page(0, 100, 3, 0);
  ck_assert_ptr_eq(sm_pool_pop(POOL_BIN, POOL_MIN), p);
  ck_assert_ptr_null(sm_pool_pop(POOL_BIN, POOL_MIN));
}
END_TEST

START_TEST(a_page_with_few_blocks_is_taken_once_all_are_free)
{
  sm_page_t *p = pool_page(0, 4, 4, 3);
  ck_assert_ptr_null(sm_pool_pop(POOL_BIN, POOL_MIN));
  atomic_store(&p->thread_free, (uintptr_t)4 * SM_TF_COUNT_ONE);
  ck_assert_ptr_eq(sm_pool_pop(POOL_BIN, POOL_MIN), p);
}
END_TEST

START_TEST(a_ready_page_behind_waiting_ones_is_found)
{
  for (int i = 0; i < 20; i++)
    pool_page(i, 100, 100, 1);   /* waiting: one block freed */
  sm_page_t *ready = pool_page(20, 100, 100, 60);
  ck_assert_ptr_eq(sm_pool_pop(POOL_BIN, POOL_MIN), ready);
  /* of the waiting ones, none will do */
  ck_assert_ptr_null(sm_pool_pop(POOL_BIN, POOL_MIN));
}
END_TEST

static Suite *pool_suite(void)
{
  Suite *s = suite_create("pool");
  TCase *tc = sm_tcase("pool", 30);
  tcase_add_test(tc, blocks_never_handed_out_count);
  tcase_add_test(tc, a_page_with_few_blocks_is_taken_once_all_are_free);
  tcase_add_test(tc, a_ready_page_behind_waiting_ones_is_found);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  return sm_run_suite(pool_suite());
}
