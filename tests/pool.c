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
 *   - a page must have a part of its blocks free too, not only the bound
 *     (a large page soon exhausted would go back and forth);
 *   - a page ready behind more than eight that wait for their blocks is
 *     found, not passed by for a fresh page;
 *   - a page whose last live blocks other threads free while it waits is
 *     the next one taken, before ready pages given earlier.
 * And the same end to end, on real pages: a live thread gives the pool
 * a page another thread freed into once it has handed out all its
 * blocks, while another thread lives; frees that empty such a page there
 * (a thread's batch, or a single push) put it ahead of one emptied before.
 * And, on real pages a thread left in the pool when it exited: the free
 * blocks of a page that waits give back their memory but the words they
 * keep, and so do the blocks not built yet and the tail (exact counters,
 * and what mincore says), once, and a block freed into it later at the
 * next purge; counted as committed again when the page leaves the pool.
 * And the same in this thread's own pages behind the first of their
 * class when it trims, counted as committed again when one becomes first.
 * And, on a page of this thread's heap, sm_page_free_to_local: the free
 * list of a page put behind the first of its class joins its local_free,
 * whichever of the two is longer, with no block lost or doubled, and the
 * head of the list the owner's frees went on still at its head; and
 * where the frees into a page that becomes first go (page-queue.c).
 * And remote frees (free.c): a thread's frees into a page another thread
 * owns wait in one batch, in one slot of the pair the page hashes to,
 * linked from the last freed to the first, and reach the page's
 * thread_free together at the thread's next collect.
 * And a new thread's heap struct (heap.c): fresh memory, not cleared, of
 * which a thread that allocates a little writes the first pages only.
 */
#include "common.h"

#include "internal.h"

#include <pthread.h>
#include <sys/mman.h>

enum { POOL_BIN = 90, POOL_PAGES = 40, POOL_MIN = 8, POOL_PART = 16 };
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
  ck_assert_ptr_eq(sm_pool_pop(POOL_BIN, POOL_MIN, POOL_PART), p);
  ck_assert_ptr_null(sm_pool_pop(POOL_BIN, POOL_MIN, POOL_PART));
}
END_TEST

START_TEST(a_page_with_few_blocks_is_taken_once_all_are_free)
{
  sm_page_t *p = pool_page(0, 4, 4, 3);
  ck_assert_ptr_null(sm_pool_pop(POOL_BIN, POOL_MIN, POOL_PART));
  atomic_store(&p->thread_free, (uintptr_t)4 * SM_TF_COUNT_ONE);
  ck_assert_ptr_eq(sm_pool_pop(POOL_BIN, POOL_MIN, POOL_PART), p);
}
END_TEST

START_TEST(a_large_page_needs_a_part_of_its_blocks_free)
{
  /* 400 blocks: 24 free is fewer than a 16th, 25 is one */
  sm_page_t *p = pool_page(0, 400, 400, 24);
  ck_assert_ptr_null(sm_pool_pop(POOL_BIN, POOL_MIN, POOL_PART));
  atomic_store(&p->thread_free, (uintptr_t)25 * SM_TF_COUNT_ONE);
  ck_assert_ptr_eq(sm_pool_pop(POOL_BIN, POOL_MIN, POOL_PART), p);
}
END_TEST

START_TEST(a_ready_page_behind_waiting_ones_is_found)
{
  for (int i = 0; i < 20; i++)
    pool_page(i, 100, 100, 1);   /* waiting: one block freed */
  sm_page_t *ready = pool_page(20, 100, 100, 60);
  ck_assert_ptr_eq(sm_pool_pop(POOL_BIN, POOL_MIN, POOL_PART), ready);
  /* of the waiting ones, none will do */
  ck_assert_ptr_null(sm_pool_pop(POOL_BIN, POOL_MIN, POOL_PART));
}
END_TEST

/* The push that frees a waiting page's last live block (what the pusher's
 * CAS made its thread_free: the count is what the pool reads) moves it to
 * the front, ahead of ten ready pages, more than a look at the pool
 * takes in; one that leaves a block live moves nothing. */
START_TEST(a_page_its_frees_empty_is_taken_first)
{
  sm_page_t *ready[10];
  for (int i = 0; i < 10; i++)
    ready[i] = pool_page(i, 100, 100, 20);   /* a fifth of their blocks free */
  sm_page_t *p = pool_page(10, 100, 100, 98);
  uintptr_t v = (uintptr_t)99 * SM_TF_COUNT_ONE;
  atomic_store(&p->thread_free, v);
  sm_pool_freed_into(p, v);
  ck_assert_ptr_eq(sm_pool_pop(POOL_BIN, POOL_MIN, POOL_PART), ready[0]);
  v = (uintptr_t)100 * SM_TF_COUNT_ONE;
  atomic_store(&p->thread_free, v);
  sm_pool_freed_into(p, v);
  ck_assert_ptr_eq(sm_pool_pop(POOL_BIN, POOL_MIN, POOL_PART), p);
  ck_assert_ptr_eq(sm_pool_pop(POOL_BIN, POOL_MIN, POOL_PART), ready[1]);
}
END_TEST

/* A class the test harness hardly uses: between the move and the
 * snapshot of the lists, nothing may allocate from the page (a malloc
 * that found free empty would take local_free). */
enum { FL_SIZE = 704, FL_BLOCKS = 40 };

/* Link blocks v[from..to) into a free list of page, tagged free. */
static sm_block_t *fl_list(sm_page_t *page, void **v, int from, int to)
{
  sm_block_t *head = NULL;
  for (int i = to - 1; i >= from; i--) {
    sm_block_t *b = v[i];
    b->next = sm_enc(page, head);
    b->tag = page->key;
    head = b;
  }
  return head;
}

/* free_n blocks on free, the next local_n on local_free, the owner's
 * frees going to the list free_to says; after the move, local_free holds
 * exactly those blocks, each once, and free none; and the head of the
 * list the frees went on is the head (the block freed last, where free's
 * test for a second free of it looks). */
static void fl_check_to(int free_n, int local_n, size_t free_to)
{
  void *v[FL_BLOCKS];
  sm_page_t *page = NULL;
  for (int i = 0; i < FL_BLOCKS; i++) {
    v[i] = smalloc_malloc(FL_SIZE);
    sm_segment_t *seg;
    sm_page_t *pg;
    ck_assert(sm_lookup(v[i], &seg, &pg));
    if (i == 0) page = pg;
    ck_assert_ptr_eq(pg, page);   /* one page holds them all */
  }
  sm_block_t *free0 = page->free, *local0 = page->local_free;
  size_t free_to0 = sm_page_free_to(page);
  uint32_t used0 = page->used;
  page->used = page->capacity - (uint32_t)local_n;   /* the blocks not on local_free (sm_page_t) */
  page->free = fl_list(page, v, 0, free_n);
  page->local_free = fl_list(page, v, free_n, free_n + local_n);
  sm_page_set_free_to(page, free_to);
  sm_page_free_to_local(page);
  /* the snapshot, with no call in between, then the page as it was */
  sm_block_t *free1 = page->free;
  sm_block_t *got[FL_BLOCKS + 1];
  int n = 0;
  for (sm_block_t *b = page->local_free; b && n <= FL_BLOCKS; b = sm_dec(page, b->next))
    got[n++] = b;
  uint32_t used1 = page->used;
  page->free = free0;
  page->local_free = local0;
  page->used = used0;
  sm_page_set_free_to(page, free_to0);
  ck_assert_ptr_null(free1);
  ck_assert_uint_eq(used1, page->capacity - (uint32_t)(free_n + local_n));
  ck_assert_int_eq(n, free_n + local_n);
  if (n > 0) {
    bool from_free = free_to == SM_FREE_TO_FREE ? free_n > 0 : local_n == 0;
    ck_assert_ptr_eq(got[0], v[from_free ? 0 : free_n]);
  }
  int seen[FL_BLOCKS] = {0};
  for (int j = 0; j < n; j++) {
    int k = -1;
    for (int i = 0; i < FL_BLOCKS; i++)
      if (v[i] == got[j]) k = i;
    ck_assert_int_ge(k, 0);
    ck_assert_int_lt(k, free_n + local_n);
    seen[k]++;
  }
  for (int i = 0; i < free_n + local_n; i++)
    ck_assert_int_eq(seen[i], 1);
  /* the blocks are live again, and freed as such */
  for (int i = 0; i < FL_BLOCKS; i++) {
    ((sm_block_t *)v[i])->tag = 0;
    smalloc_free(v[i]);
  }
}

static void fl_check(int free_n, int local_n)
{
  fl_check_to(free_n, local_n, SM_FREE_TO_FREE);    /* the first page of its class */
  fl_check_to(free_n, local_n, SM_FREE_TO_LOCAL);   /* any other */
}

START_TEST(a_demoted_pages_free_list_joins_local_free)
{
  smalloc_collect(true);
  fl_check(30, 3);    /* the longer on free */
  fl_check(2, 25);    /* the longer on local_free */
  fl_check(7, 7);
  fl_check(1, 1);
  fl_check(12, 0);    /* local_free empty */
  fl_check(0, 9);     /* nothing on free: nothing moves */
}
END_TEST

/* A page that becomes the first of its class with blocks on local_free
 * (one back from the full list, say) takes its owner's frees on
 * local_free until the slow path makes local_free its free list: the
 * block freed last stays at the head of the list where free looks for a
 * second free of it.  (The secure build frees onto local_free always.) */
START_TEST(a_page_put_first_frees_onto_local_free_until_refilled)
{
#ifndef SM_SECURE
  static sm_heap_t heap;   /* made up: its queues alone are used */
  static sm_block_t block;
  sm_page_t *p = &pages[0];
  memset(p, 0, sizeof *p);
  p->bin = POOL_BIN;
  p->block_size = (uint32_t)sm_bin_size(POOL_BIN);
  p->local_free = &block;
  sm_pq_push_back(&heap, POOL_BIN, p);
  ck_assert_ptr_eq(heap.queues[POOL_BIN].first, p);
  ck_assert_uint_eq(sm_page_free_to(p), SM_FREE_TO_LOCAL);
  p->free = p->local_free;   /* the slow path's swap */
  p->local_free = NULL;
  sm_pq_first_refilled(&heap, p);
  ck_assert_uint_eq(sm_page_free_to(p), SM_FREE_TO_FREE);
  /* behind the first no longer; first again with local_free empty */
  sm_pq_remove(&heap, POOL_BIN, p);
  ck_assert_uint_eq(sm_page_free_to(p), SM_FREE_TO_LOCAL);
  sm_pq_push_back(&heap, POOL_BIN, p);
  ck_assert_uint_eq(sm_page_free_to(p), SM_FREE_TO_FREE);
  sm_pq_remove(&heap, POOL_BIN, p);
#endif
}
END_TEST

/* ---- the free blocks of pages that wait give their memory back ------------ */

/* A thread allocates PB_N blocks of PB_SIZE, writes them whole, frees
 * all but every fourth and exits: each page of its blocks keeps a live
 * one and goes to the pool.  (Its first blocks of the class may be lent
 * elsewhere, page.c: only the pages in the pool are looked at.) */
enum { PB_N = 64, PB_KEEP = 4, PB_SIZE = SM_TEST_REQUEST_FOR(81920) };
static void *pb_blocks[PB_N];

static void *pb_worker(void *arg)
{
  for (int i = 0; i < PB_N; i++) {
    pb_blocks[i] = smalloc_malloc(PB_SIZE);
    ck_assert_ptr_nonnull(pb_blocks[i]);
    memset(pb_blocks[i], 0x5a, PB_SIZE);
  }
  if (arg) {   /* a pause of that many ms before the frees */
    struct timespec ts = {0, (long)(intptr_t)arg * 1000000L};
    nanosleep(&ts, NULL);
  }
  for (int i = 0; i < PB_N; i++)
    if (i % PB_KEEP)
      smalloc_free(pb_blocks[i]);
  return NULL;
}

static bool pb_resident(uintptr_t at)
{
  unsigned char v = 0;
  ck_assert_int_eq(mincore((void *)(at & ~(SM_OS_PAGE - 1)), SM_OS_PAGE, &v), 0);
  return v & 1;
}

/* The whole OS pages from lo to hi, rounded inwards. */
static size_t pb_inside(uintptr_t lo, uintptr_t hi, uintptr_t *from)
{
  *from = (lo + SM_OS_PAGE - 1) & ~(SM_OS_PAGE - 1);
  hi &= ~(SM_OS_PAGE - 1);
  return hi > *from ? hi - *from : 0;
}

/* The whole OS pages past the blocks a page has built, up to its end
 * (or guard page). */
static size_t pb_tail(const sm_page_t *page, uintptr_t *from)
{
  sm_segment_t *seg = sm_page_segment(page);
  size_t psize = (size_t)1 << seg->page_shift;
  uintptr_t end = (((uintptr_t)page->start - (uintptr_t)seg) / psize + 1) * psize + (uintptr_t)seg - SM_GUARD;
  return pb_inside((uintptr_t)page->start + (size_t)page->capacity * page->block_size, end, from);
}

/* Whether every OS page from `from` for len bytes is resident (want) or
 * none is. */
static bool pb_all(uintptr_t from, size_t len, bool want)
{
  for (size_t o = 0; o < len; o += SM_OS_PAGE)
    if (pb_resident(from + o) != want) return false;
  return true;
}

/* The page block i lies in, or NULL (freed, or not in a page). */
static sm_page_t *pb_page_of(int i)
{
  sm_segment_t *seg;
  sm_page_t *page;
  if (!sm_lookup(pb_blocks[i], &seg, &page) || seg->kind > SM_SEG_MEDIUM) return NULL;
  return page;
}

/* The page in the pool block i lies in, or NULL. */
static sm_page_t *pb_pooled(int i)
{
  sm_page_t *page = pb_page_of(i);
  return page && atomic_load(&page->pooled) ? page : NULL;
}

/* What giving back a pooled page's free blocks gives: the interiors of
 * the blocks freed (past the 32 bytes a free block keeps), and what lies
 * past the blocks built so far, up to the page's end (or guard page);
 * each checked with mincore, resident (before) or not (after). */
static size_t pb_page_bytes(sm_page_t *page, bool before)
{
  size_t bytes = 0, len;
  uintptr_t from;
  for (int i = 0; i < PB_N; i++) {
    if (pb_page_of(i) != page) continue;
    uintptr_t b = (uintptr_t)pb_blocks[i];
    if (i % PB_KEEP == 0) {   /* live: all of it stays */
      len = pb_inside(b & ~(SM_OS_PAGE - 1), b + page->block_size, &from);
      ck_assert_msg(pb_all(b & ~(SM_OS_PAGE - 1), len, true), "a live block lost its memory");
      continue;
    }
    len = pb_inside(b + 32, b + page->block_size, &from);
    ck_assert_uint_gt(len, 0);
    ck_assert_msg(pb_all(from, len, before), "free block %d: interior %s", i,
                  before ? "not resident before" : "still resident after");
    ck_assert_msg(pb_resident(b), "free block %d: the words it keeps were given back", i);
    bytes += len;
  }
  len = pb_tail(page, &from);
  if (!before) ck_assert_msg(pb_all(from, len, false), "the page's tail is still resident");
  return bytes + len;
}

/* What the pages give back, before (resident, checked) or after (gone,
 * checked, and each page's own count of it agrees), in all. */
static size_t pb_pages_bytes(sm_page_t **of, int n, bool before)
{
  size_t bytes = 0;
  for (int k = 0; k < n; k++) {
    size_t b = pb_page_bytes(of[k], before);
    if (!before) ck_assert_uint_eq(of[k]->free_purged, b);
    bytes += b;
  }
  return bytes;
}

/* The distinct pages in the pool that the worker's blocks lie in. */
static int pb_pool_pages(sm_page_t **pooled)
{
  int npooled = 0;
  for (int i = 0; i < PB_N; i++) {
    sm_page_t *page = pb_pooled(i);
    bool seen = page == NULL;
    for (int k = 0; k < npooled && !seen; k++) seen = pooled[k] == page;
    if (!seen) pooled[npooled++] = page;
  }
  return npooled;
}

START_TEST(the_free_blocks_of_a_page_in_the_pool_give_their_memory_back)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HEAP_CACHE, 0), 0);   /* taken apart at exit */
  /* this thread's heap, for its free below to claim a page with (where
   * malloc is not smalloc's, it may have none yet) */
  smalloc_free(smalloc_malloc(16));
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, pb_worker, NULL), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);

  sm_page_t *pooled[PB_N];
  int npooled = pb_pool_pages(pooled);
  ck_assert_int_ge(npooled, 2);
  size_t want = pb_pages_bytes(pooled, npooled, true);

  smalloc_stats_t s0, s1, s2;
  ck_assert_int_eq(sm_test_snap(&s0), 0);
  sm_pool_purge(sm_clock_ms(), 0);
  ck_assert_int_eq(sm_test_snap(&s1), 0);
  ck_assert_uint_eq(pb_pages_bytes(pooled, npooled, false), want);
  ck_assert_uint_eq(s1.bytes_purged - s0.bytes_purged, want);
  ck_assert_uint_eq(s0.bytes_committed - s1.bytes_committed, want);

  /* given back once */
  sm_pool_purge(sm_clock_ms(), 0);
  ck_assert_int_eq(sm_test_snap(&s2), 0);
  ck_assert_uint_eq(s2.bytes_purged, s1.bytes_purged);
  ck_assert_uint_eq(s2.bytes_committed, s1.bytes_committed);

  /* a block freed into a page that waits, by a thread that does not own
   * it, goes on its thread_free; the next purge takes it onto the page's
   * lists and gives back its interior, and no other block's again */
  sm_page_t *second = pooled[1];
  int k = 0;
  while (k < PB_N && !(k % PB_KEEP == 0 && pb_pooled(k) == second)) k++;
  ck_assert_int_lt(k, PB_N);
  sm_segment_t *seg;
  sm_page_t *page;
  ck_assert(sm_lookup(pb_blocks[k], &seg, &page) && page == second);
  uintptr_t b = (uintptr_t)pb_blocks[k], from;
  size_t len = pb_inside(b + 32, b + second->block_size, &from);
  ck_assert(pb_all(from, len, true));
  uint32_t used = sm_page_live(second), purged = second->free_purged;
  ck_assert(sm_free_block_xthread(second, (sm_block_t *)pb_blocks[k]));
  pb_blocks[k] = NULL;
  sm_pool_purge(sm_clock_ms(), 0);
  smalloc_stats_t s3;
  ck_assert_int_eq(sm_test_snap(&s3), 0);
  ck_assert_uint_eq(sm_page_live(second), used - 1);
  ck_assert_uint_eq(second->free_purged, purged + len);
  ck_assert_uint_eq(s3.bytes_purged - s2.bytes_purged, len);
  ck_assert_uint_eq(s2.bytes_committed - s3.bytes_committed, len);
  ck_assert(pb_all(from, len, false));
  ck_assert(pb_resident(b));
  s2 = s3;

  /* a page that leaves the pool counts what it gave back as committed
   * again: this thread's free into it claims it (page.c) */
  sm_page_t *first = pooled[0];
  size_t back = first->free_purged;
  for (int i = 0; i < PB_N; i++) {
    if (i % PB_KEEP == 0 && pb_pooled(i) == first) {
      smalloc_free(pb_blocks[i]);
      pb_blocks[i] = NULL;
      break;
    }
  }
  ck_assert_int_eq(sm_test_snap(&s0), 0);
  ck_assert_int_eq(atomic_load(&first->pooled), 0);
  ck_assert_uint_eq(first->free_purged, 0);
  ck_assert_uint_eq(s0.bytes_committed - s2.bytes_committed, back);
  for (int i = 0; i < PB_N; i += PB_KEEP)
    smalloc_free(pb_blocks[i]);   /* NULL: freed above */
}
END_TEST

/* Threads free the live blocks of the pages that wait (as other threads'
 * frees do, onto their thread_free) while this one gives back what the
 * pages free again and again: every block freed is given back once, and
 * each page ends empty. */
enum { PB_FREERS = 2 };

static void *pb_freer(void *arg)
{
  int id = (int)(intptr_t)arg;
  for (int i = id * PB_KEEP; i < PB_N; i += PB_FREERS * PB_KEEP) {
    sm_segment_t *seg;
    sm_page_t *page;
    ck_assert(sm_lookup(pb_blocks[i], &seg, &page));
    if (!atomic_load(&page->pooled)) continue;   /* lent elsewhere */
    ck_assert(sm_free_block_xthread(page, pb_blocks[i]));
    sched_yield();
  }
  return NULL;
}

START_TEST(blocks_freed_into_pages_that_wait_go_back_while_others_are_given_back)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HEAP_CACHE, 0), 0);   /* taken apart at exit */
  pthread_t t[PB_FREERS];
  ck_assert_int_eq(pthread_create(&t[0], NULL, pb_worker, NULL), 0);
  ck_assert_int_eq(pthread_join(t[0], NULL), 0);
  sm_page_t *pooled[PB_N];
  int npooled = pb_pool_pages(pooled);
  ck_assert_int_ge(npooled, 2);
  size_t want = 0;
  uintptr_t from;
  for (int i = 0; i < PB_N; i++) {
    sm_page_t *page = pb_pooled(i);
    if (page) {   /* every block of it will be free */
      uintptr_t b = (uintptr_t)pb_blocks[i];
      want += pb_inside(b + 32, b + page->block_size, &from);
    }
  }
  for (int k = 0; k < npooled; k++) want += pb_tail(pooled[k], &from);   /* and what lies past them */
  for (intptr_t id = 0; id < PB_FREERS; id++)
    ck_assert_int_eq(pthread_create(&t[id], NULL, pb_freer, (void *)id), 0);
  for (int round = 0; round < 200; round++) {
    sm_pool_purge(sm_clock_ms(), 0);
    sched_yield();
  }
  for (int id = 0; id < PB_FREERS; id++)
    ck_assert_int_eq(pthread_join(t[id], NULL), 0);
  sm_pool_purge(sm_clock_ms(), 0);
  size_t got = 0;
  for (int k = 0; k < npooled; k++) {
    ck_assert_uint_eq(sm_page_live(pooled[k]), 0);
    ck_assert_int_ne(atomic_load(&pooled[k]->pooled), 0);
    got += pooled[k]->free_purged;
  }
  ck_assert_uint_eq(got, want);
}
END_TEST

/* The first page of the blocks' class in heap's queue; the pages behind
 * it (two or more) in behind[0 .. *nbehind). */
static sm_page_t *pb_queue(sm_heap_t *heap, sm_page_t **behind, int *nbehind)
{
  int live = 0;   /* a block in a page (the first of the class may be lent elsewhere, page.c) */
  while (live < PB_N && pb_page_of(live) == NULL) live += PB_KEEP;
  ck_assert_int_lt(live, PB_N);
  ck_assert_ptr_eq(atomic_load(&pb_page_of(live)->owner), heap);
  sm_page_t *first = heap->queues[pb_page_of(live)->bin].first;
  *nbehind = 0;
  for (sm_page_t *page = first->next; page; page = page->next)
    behind[(*nbehind)++] = page;
  ck_assert_int_ge(*nbehind, 2);
  return first;
}

/* A live block from i on in a page behind `first` that holds another. */
static int pb_live_behind(const sm_page_t *first, int i)
{
  for (; i < PB_N; i++) {
    sm_page_t *page = i % PB_KEEP == 0 ? pb_page_of(i) : NULL;   /* the rest were freed */
    if (page && page != first && sm_page_live(page) >= 2) return i;
  }
  ck_abort_msg("no page behind the first holds two live blocks");
  return -1;
}

/* The same in a live thread's own pages, when it trims: the free blocks
 * of its pages behind the first of their class give back their memory
 * but the words they keep, and so do the tails; once, and a block freed
 * since at the next trim; counted as committed again when such a page
 * becomes the first of its class.  The first page keeps its blocks for
 * the next allocation. */
START_TEST(a_thread_that_trims_gives_back_the_free_blocks_of_its_sparse_pages)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  pb_worker(NULL);   /* this thread */
  sm_heap_t *heap = sm_heap();
  sm_page_t *behind[PB_N];
  int nbehind;
  sm_page_t *first = pb_queue(heap, behind, &nbehind);
  size_t first_bytes = pb_page_bytes(first, true);
  size_t want = pb_pages_bytes(behind, nbehind, true);

  smalloc_stats_t s0, s1, s2;
  ck_assert_int_eq(sm_test_snap(&s0), 0);
  sm_segments_purge_open(true);
  ck_assert_int_eq(sm_test_snap(&s1), 0);
  ck_assert_uint_eq(pb_pages_bytes(behind, nbehind, false), want);
  ck_assert_uint_eq(s1.bytes_purged - s0.bytes_purged, want);
  ck_assert_uint_eq(s0.bytes_committed - s1.bytes_committed, want);
  ck_assert_uint_eq(pb_page_bytes(first, true), first_bytes);   /* still resident */
  ck_assert_uint_eq(first->free_purged, 0);

  /* given back once */
  sm_segments_purge_open(true);
  ck_assert_int_eq(sm_test_snap(&s2), 0);
  ck_assert_uint_eq(s2.bytes_purged, s1.bytes_purged);
  ck_assert_uint_eq(s2.bytes_committed, s1.bytes_committed);

  /* a block this thread frees into such a page since goes back at the
   * next trim (malloc_trim, smalloc_collect(true)), and no other again */
  int k = pb_live_behind(first, 0);
  sm_page_t *page = pb_page_of(k);
  uintptr_t b = (uintptr_t)pb_blocks[k], from;
  size_t len = pb_inside(b + 32, b + page->block_size, &from);
  ck_assert(pb_all(from, len, true));
  uint32_t purged = page->free_purged;
  smalloc_free(pb_blocks[k]);
  pb_blocks[k] = NULL;
  sm_segments_purge_open(true);
  smalloc_stats_t s3;
  ck_assert_int_eq(sm_test_snap(&s3), 0);
  ck_assert_uint_eq(page->free_purged, purged + len);
  ck_assert_uint_eq(s3.bytes_purged - s2.bytes_purged, len);
  ck_assert_uint_eq(s2.bytes_committed - s3.bytes_committed, len);
  ck_assert(pb_all(from, len, false));
  ck_assert(pb_resident(b));
  /* and trim does it */
  k = pb_live_behind(first, k + 1);
  b = (uintptr_t)pb_blocks[k];
  len = pb_inside(b + 32, b + page->block_size, &from);
  ck_assert(pb_all(from, len, true));
  smalloc_free(pb_blocks[k]);
  pb_blocks[k] = NULL;
  ck_assert_int_eq(smalloc_malloc_trim(0), 1);   /* memory went back */
  ck_assert(pb_all(from, len, false));
  ck_assert(pb_resident(b));
  for (int i = 0; i < nbehind; i++)
    (void)pb_page_bytes(behind[i], false);

  /* allocating the class on, past the first page's free blocks, makes
   * the next page first: what it gave back counts as committed again */
  ck_assert_int_eq(sm_test_snap(&s0), 0);
  sm_page_t *next = first->next;
  size_t back = next->free_purged;
  ck_assert_uint_gt(back, 0);
  void *got_block[PB_N];
  int n = 0;
  while (heap->queues[first->bin].first != next) {
    ck_assert_int_lt(n, PB_N);
    got_block[n] = smalloc_malloc(PB_SIZE);
    ck_assert_ptr_nonnull(got_block[n]);
    memset(got_block[n], 0x3c, PB_SIZE);
    n++;
  }
  ck_assert_int_eq(sm_test_snap(&s1), 0);
  ck_assert_uint_eq(next->free_purged, 0);
  ck_assert_uint_eq(s1.bytes_committed - s0.bytes_committed, back);
  ck_assert_uint_eq(s1.bytes_purged, s0.bytes_purged);
  while (n > 0)
    smalloc_free(got_block[--n]);
  for (int i = 0; i < PB_N; i += PB_KEEP)
    smalloc_free(pb_blocks[i]);
}
END_TEST

/* A live thread that freed most of its blocks and waits: another
 * thread's trim gives back the free blocks of its pages behind the first
 * of their class (their gates are open, pool.c), and the thread goes on
 * with its live blocks intact. */
static pthread_mutex_t pb_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pb_cv = PTHREAD_COND_INITIALIZER;
static int pb_stage;
static sm_heap_t *pb_idle_heap;

static void pb_stage_wait(int want)
{
  pthread_mutex_lock(&pb_mu);
  while (pb_stage < want)
    pthread_cond_wait(&pb_cv, &pb_mu);
  pthread_mutex_unlock(&pb_mu);
}

static void pb_stage_set(int stage)
{
  pthread_mutex_lock(&pb_mu);
  pb_stage = stage;
  pthread_cond_broadcast(&pb_cv);
  pthread_mutex_unlock(&pb_mu);
}

/* Every byte of the n at p is c. */
static bool pb_filled(const void *p, unsigned char c, size_t n)
{
  const unsigned char *b = p;
  for (size_t i = 0; i < n; i++)
    if (b[i] != c) return false;
  return true;
}

static void *pb_idle_worker(void *arg)
{
  /* the first blocks of the class, lent mappings of their own (page.c),
   * freed last: their frees would wake the purge thread too */
  void *lent[PB_KEEP];
  for (int i = 0; i < PB_KEEP; i++)
    ck_assert_ptr_nonnull(lent[i] = smalloc_malloc(PB_SIZE));
  pb_worker(arg);
  pb_idle_heap = sm_heap();
  pb_stage_set(1);
  pb_stage_wait(2);
  /* at work again: its pages are allocated from, given back or not */
  void *again[PB_N];
  for (int i = 0; i < PB_N; i++) {
    again[i] = smalloc_malloc(PB_SIZE);
    ck_assert_ptr_nonnull(again[i]);
    memset(again[i], 0x3c, PB_SIZE);
  }
  for (int i = 0; i < PB_N; i++) {
    ck_assert(pb_filled(again[i], 0x3c, PB_SIZE));
    smalloc_free(again[i]);
    if (i % PB_KEEP == 0) {
      ck_assert(pb_filled(pb_blocks[i], 0x5a, PB_SIZE));
      smalloc_free(pb_blocks[i]);
    }
  }
  for (int i = 0; i < PB_KEEP; i++)
    smalloc_free(lent[i]);
  return NULL;
}

START_TEST(another_threads_trim_gives_back_the_free_blocks_of_an_idle_threads_sparse_pages)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  smalloc_free(smalloc_malloc(16));
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, pb_idle_worker, NULL), 0);
  pb_stage_wait(1);
  /* the worker waits: its queue stays as it is */
  sm_page_t *behind[PB_N];
  int nbehind;
  sm_page_t *first = pb_queue(pb_idle_heap, behind, &nbehind);
  size_t first_bytes = pb_page_bytes(first, true);
  size_t want = pb_pages_bytes(behind, nbehind, true);

  ck_assert_int_eq(smalloc_malloc_trim(0), 1);
  ck_assert_uint_eq(pb_pages_bytes(behind, nbehind, false), want);
  ck_assert_uint_eq(pb_page_bytes(first, true), first_bytes);   /* the first keeps its blocks */
  for (int i = 0; i < PB_N; i += PB_KEEP)
    ck_assert(pb_filled(pb_blocks[i], 0x5a, PB_SIZE));

  pb_stage_set(2);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
  smalloc_stats_t st;
  ck_assert_int_eq(sm_test_snap(&st), 0);
  ck_assert_uint_eq(st.errors_reported, 0);
}
END_TEST

/* Whether every OS page inside the free blocks of a page (past the 32
 * bytes each keeps) and past its built blocks is given back. */
static bool pb_page_given_back(sm_page_t *page)
{
  uintptr_t from;
  for (int i = 0; i < PB_N; i++) {
    if (i % PB_KEEP == 0 || pb_page_of(i) != page) continue;
    uintptr_t b = (uintptr_t)pb_blocks[i];
    size_t len = pb_inside(b + 32, b + page->block_size, &from);
    if (!pb_all(from, len, false)) return false;
  }
  size_t len = pb_tail(page, &from);
  return pb_all(from, len, false);
}

/* The same without trim: once the thread has been idle for the purge
 * delay, the purge thread gives the free blocks of its sparse pages back.
 * The thread pauses before its frees, long enough for the purge thread
 * to have parked: the frees into its pages wake it. */
START_TEST(the_purge_thread_gives_back_the_free_blocks_of_an_idle_threads_sparse_pages)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 100), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 1), 0);
  smalloc_free(smalloc_malloc(16));
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, pb_idle_worker, (void *)(intptr_t)1000), 0);
  pb_stage_wait(1);
  sm_page_t *behind[PB_N];
  int nbehind, done = 0;
  sm_page_t *first = pb_queue(pb_idle_heap, behind, &nbehind);
  size_t first_bytes = pb_page_bytes(first, true);
  for (long waited = 0; done < nbehind && waited < 20000; waited += 20) {
    struct timespec ts = {0, 20 * 1000000L};
    nanosleep(&ts, NULL);
    done = 0;
    for (int k = 0; k < nbehind; k++) done += pb_page_given_back(behind[k]);
  }
  ck_assert_msg(done == nbehind, "%d of %d sparse pages given back after 20 s idle", done, nbehind);
  for (int k = 0; k < nbehind; k++)
    (void)pb_page_bytes(behind[k], false);   /* and each free block keeps its first words */
  ck_assert_uint_eq(pb_page_bytes(first, true), first_bytes);
  for (int i = 0; i < PB_N; i += PB_KEEP)
    ck_assert(pb_filled(pb_blocks[i], 0x5a, PB_SIZE));
  pb_stage_set(2);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
}
END_TEST

/* Threads allocate, write, check and free blocks of their pages, three
 * in four at random each round, while this one trims again and again:
 * the free blocks of their pages behind the first go back while they
 * free more into them and take them first again.  No block handed out
 * loses a byte, and no list is found corrupted.  (ThreadSanitizer: the
 * gates, pool.c.) */
enum { PC_OWNERS = 2, PC_ROUNDS = 40, PC_N = 48, PC_SIZE = SM_TEST_REQUEST_FOR(24576) };
static _Atomic int pc_running;

static bool pc_intact(const unsigned char *p, unsigned char c)
{
  for (size_t o = 0; o < PC_SIZE; o += 509)
    if (p[o] != c) return false;
  return p[PC_SIZE - 1] == c;
}

static void *pc_owner(void *arg)
{
  uint64_t rng = 0x9e3779b97f4a7c15ull * (uint64_t)((intptr_t)arg + 1);
  unsigned char *v[PC_N] = {0};
  unsigned char tag[PC_N];
  for (int r = 0; r < PC_ROUNDS; r++) {
    for (int i = 0; i < PC_N; i++) {
      if (v[i]) continue;
      v[i] = smalloc_malloc(PC_SIZE);
      ck_assert_ptr_nonnull(v[i]);
      tag[i] = (unsigned char)(r * 31 + i) | 1;
      memset(v[i], tag[i], PC_SIZE);
    }
    for (int i = 0; i < PC_N; i++) {
      rng ^= rng << 13;
      rng ^= rng >> 7;
      rng ^= rng << 17;
      if (rng % 4 == 0) continue;
      ck_assert_msg(pc_intact(v[i], tag[i]), "round %d: block %d lost its bytes", r, i);
      smalloc_free(v[i]);
      v[i] = NULL;
    }
    sched_yield();
  }
  for (int i = 0; i < PC_N; i++) {
    if (!v[i]) continue;
    ck_assert(pc_intact(v[i], tag[i]));
    smalloc_free(v[i]);
  }
  atomic_fetch_sub(&pc_running, 1);
  return NULL;
}

START_TEST(threads_free_into_their_sparse_pages_while_another_trims)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  smalloc_free(smalloc_malloc(16));
  smalloc_stats_t s0, s1;
  ck_assert_int_eq(sm_test_snap(&s0), 0);
  pthread_t t[PC_OWNERS];
  atomic_store(&pc_running, PC_OWNERS);
  for (int k = 0; k < PC_OWNERS; k++)
    ck_assert_int_eq(pthread_create(&t[k], NULL, pc_owner, (void *)(intptr_t)k), 0);
  unsigned trims = 0;
  while (atomic_load(&pc_running) > 0) {
    smalloc_malloc_trim(0);
    trims++;
  }
  for (int k = 0; k < PC_OWNERS; k++)
    ck_assert_int_eq(pthread_join(t[k], NULL), 0);
  ck_assert_int_eq(sm_test_snap(&s1), 0);
  ck_assert_uint_gt(trims, 0);
  ck_assert_uint_gt(s1.bytes_purged, s0.bytes_purged);
  ck_assert_uint_eq(s1.errors_reported, s0.errors_reported);
}
END_TEST

/* ---- remote frees wait in a batch ------------------------------------------ */
enum { RB_BLOCKS = 3 };
static void *rb_blocks[RB_BLOCKS];
static sm_page_t *rb_page;
/* what the freeing thread saw: slots holding the page, the batch's count,
 * head and tail, its bit in xbuf_used, the page's thread_free count before
 * and after the collect, slots holding the page and batches left after */
static struct {
  unsigned slots, count, bit, slots_after, pending_after;
  void *head, *tail;
  uint32_t tf_before, tf_after;
} rb_seen;

static void *rb_freer(void *arg)
{
  (void)arg;
  smalloc_free(smalloc_malloc(16));   /* this thread's heap, and its slow path, first */
  for (int i = 0; i < RB_BLOCKS; i++)
    smalloc_free(rb_blocks[i]);
  sm_heap_t *heap = sm_heap();
  for (unsigned i = 0; i < SM_XBUF_SLOTS; i++) {
    const sm_xbuf_t *x = &heap->xbuf[i];
    if (x->page != rb_page) continue;
    rb_seen.slots++;
    rb_seen.count = x->count;
    rb_seen.head = x->head;
    rb_seen.tail = x->tail;
    rb_seen.bit = (unsigned)(atomic_load_explicit(&heap->xbuf_used[i / 64], memory_order_relaxed) >> (i % 64)) & 1;
  }
  rb_seen.tf_before = sm_tf_count(atomic_load(&rb_page->thread_free));
  smalloc_collect(false);
  for (unsigned i = 0; i < SM_XBUF_SLOTS; i++)
    rb_seen.slots_after += heap->xbuf[i].page == rb_page;
  rb_seen.pending_after = sm_xbuf_pending(heap);
  rb_seen.tf_after = sm_tf_count(atomic_load(&rb_page->thread_free));
  return NULL;
}

/* Three blocks of one page of main's, then freer run on a thread of its
 * own, which frees them. */
static void rb_run(void *(*freer)(void *))
{
  sm_segment_t *seg;
  for (int i = 0; i < RB_BLOCKS; i++) {
    rb_blocks[i] = smalloc_malloc(64);
    sm_page_t *page;
    ck_assert(sm_lookup(rb_blocks[i], &seg, &page));
    if (i == 0) rb_page = page;
    ck_assert_ptr_eq(page, rb_page);
  }
  ck_assert_uint_eq(sm_tf_count(atomic_load(&rb_page->thread_free)), 0);
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, freer, NULL), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
}

START_TEST(remote_frees_wait_in_one_batch_and_go_together)
{
  rb_run(rb_freer);
  ck_assert_uint_eq(rb_seen.slots, 1);
  ck_assert_uint_eq(rb_seen.count, RB_BLOCKS);
  ck_assert_ptr_eq(rb_seen.head, rb_blocks[RB_BLOCKS - 1]);
  ck_assert_ptr_eq(rb_seen.tail, rb_blocks[0]);
  ck_assert_uint_eq(rb_seen.bit, 1);
  ck_assert_uint_eq(rb_seen.tf_before, 0);
  ck_assert_uint_eq(rb_seen.slots_after, 0);
  ck_assert_uint_eq(rb_seen.pending_after, 0);
  ck_assert_uint_eq(rb_seen.tf_after, RB_BLOCKS);
}
END_TEST

/* A batch is sent at every SM_XBUF_BEATS-th slow path of the thread that
 * holds it, not at each: the freeing thread takes slow paths until its
 * count is at a multiple, frees three blocks of main's page, then
 * allocates blocks of classes it has no page for, one slow path each:
 * the batch waits through SM_XBUF_BEATS - 1 of them and goes, whole, at
 * the next. */
static struct {
  unsigned sent_at, beats_each, tf_on_send;
} rs_seen;

static void *rs_freer(void *arg)
{
  (void)arg;
  smalloc_free(smalloc_malloc(16));   /* this thread's heap first */
  sm_heap_t *heap = sm_heap();
  void *kept[2 * SM_XBUF_BEATS];
  unsigned n = 0;
  size_t bin = sm_bin_of(300);   /* classes new to this thread, a slow path each */
  while (heap->xbuf_beats % SM_XBUF_BEATS != 0)
    kept[n++] = smalloc_malloc(sm_bin_size(bin++));
  for (int i = 0; i < RB_BLOCKS; i++)
    smalloc_free(rb_blocks[i]);
  rs_seen.beats_each = 1;
  for (unsigned k = 1; k <= SM_XBUF_BEATS; k++) {
    uint32_t before = heap->xbuf_beats;
    kept[n++] = smalloc_malloc(sm_bin_size(bin++));
    if (heap->xbuf_beats != before + 1) rs_seen.beats_each = 0;
    uint32_t tf = sm_tf_count(atomic_load(&rb_page->thread_free));
    if (rs_seen.sent_at == 0 && tf != 0) {
      rs_seen.sent_at = k;
      rs_seen.tf_on_send = tf;
    }
  }
  while (n > 0)
    smalloc_free(kept[--n]);
  return NULL;
}

START_TEST(remote_frees_wait_for_the_eighth_slow_path)
{
  rb_run(rs_freer);
  ck_assert_uint_eq(rs_seen.beats_each, 1);
  ck_assert_uint_eq(rs_seen.sent_at, SM_XBUF_BEATS);
  ck_assert_uint_eq(rs_seen.tf_on_send, RB_BLOCKS);
}
END_TEST

/* ============================================================================
 * a_new_heap_struct_keeps_to_its_first_pages: a thread's heap struct is
 * whole pages of a fresh mapping, left as the OS gave them (zero), and a
 * thread that allocates and frees a few small blocks writes none of the
 * pages from its remote-free batches on (sm_heap_t puts them and the
 * profiler's memos last): mincore finds those pages absent, and the first
 * two (the direct table, the queues, the lock, the counts) present.
 * In the process check forks for each test, where no thread exited yet,
 * so the thread's heap is a new struct rather than one a thread left. */

enum { HS_PAGES = (sizeof(sm_heap_t) + SM_OS_PAGE - 1) / SM_OS_PAGE };

static struct {
  uintptr_t heap;
  unsigned char resident[HS_PAGES];
  int rc, failed;
} hs_seen;

static void *hs_thread(void *arg)
{
  (void)arg;
  static const size_t sizes[] = {16, 48, 200, 1000};
  void *p[4];
  for (int i = 0; i < 4; i++)
    hs_seen.failed += (p[i] = smalloc_malloc(sizes[i])) == NULL;
  for (int i = 0; i < 4; i++)
    smalloc_free(p[i]);
  hs_seen.heap = (uintptr_t)sm_heap_tls;
  hs_seen.rc = mincore(sm_heap_tls, HS_PAGES * SM_OS_PAGE, hs_seen.resident);
  return NULL;
}

START_TEST(a_new_heap_struct_keeps_to_its_first_pages)
{
  const char *fork_mode = getenv("CK_FORK");
  if (fork_mode && strcmp(fork_mode, "no") == 0) {
    printf("skipped: with CK_FORK=no, the heap struct may be one an earlier test's thread left\n");
    return;
  }
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, hs_thread, NULL), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
  ck_assert_int_eq(hs_seen.failed, 0);
  ck_assert_int_eq(hs_seen.rc, 0);
  ck_assert_uint_eq(hs_seen.heap % SM_OS_PAGE, 0);
  size_t cold = (offsetof(sm_heap_t, xbuf) + SM_OS_PAGE - 1) / SM_OS_PAGE;
  ck_assert_uint_lt(cold, HS_PAGES);
  for (size_t i = 0; i < 2; i++)
    ck_assert_msg(hs_seen.resident[i] & 1, "page %zu of the heap struct not resident", i);
  for (size_t i = cold; i < HS_PAGES; i++)
    ck_assert_msg(!(hs_seen.resident[i] & 1), "page %zu of the heap struct, past the remote-free batches, resident",
                  i);
}
END_TEST

/* ---- pages a live thread gives, emptied by frees ---------------------------- */

/* End to end, on real pages: a live thread's page that another thread
 * freed into goes to the pool once the thread has handed out all its
 * blocks, while another thread lives (page.c: sm_page_shares); a page
 * there that frees empty moves to the pool's front, ahead of pages
 * emptied before it, whether a thread's batch of frees (free.c: the
 * thread's own frees, remote ones now) or a single push emptied it. */
enum { PE_BLOCK = 1536, PE_PAGES = 3, PE_MAX = 512 };
static pthread_barrier_t pe_done;

static void *pe_sleeper(void *arg)
{
  (void)arg;
  smalloc_free(smalloc_malloc(16));   /* a heap: one more live thread */
  pthread_barrier_wait(&pe_done);
  pthread_barrier_wait(&pe_done);
  return NULL;
}

/* blocks freed by a thread that then exits, sending its batches */
struct pe_job {
  void **v;
  int n;
};
static void *pe_freer(void *arg)
{
  struct pe_job *job = arg;
  for (int i = 0; i < job->n; i++)
    smalloc_free(job->v[i]);
  return NULL;
}

static sm_page_t *pe_page(void *p)
{
  sm_segment_t *seg;
  sm_page_t *page;
  ck_assert(sm_lookup(p, &seg, &page));
  return page;
}

/* This thread allocates from the page *next lies in until a block lands
 * in another (the new *next); after the page's fourth block, a thread
 * frees its third and fourth.  The page's live blocks in v[0 .. *n). */
static sm_page_t *pe_give_page(void **next, void **v, int *n)
{
  sm_page_t *page = pe_page(*next);
  bool freed = false;
  *n = 0;
  v[(*n)++] = *next;
  for (;;) {
    void *p = smalloc_malloc(SM_TEST_REQUEST_FOR(PE_BLOCK));
    ck_assert_ptr_nonnull(p);
    if (pe_page(p) != page) {
      *next = p;
      return page;
    }
    ck_assert_int_lt(*n, PE_MAX);
    v[(*n)++] = p;
    if (*n == 4 && !freed) {
      freed = true;
      struct pe_job job = {v + 2, 2};
      pthread_t t;
      ck_assert_int_eq(pthread_create(&t, NULL, pe_freer, &job), 0);
      ck_assert_int_eq(pthread_join(t, NULL), 0);
      *n = 2;
    }
  }
}

START_TEST(pages_frees_empty_in_the_pool_go_to_its_front)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  pthread_barrier_init(&pe_done, NULL, 2);
  pthread_t sleeper;
  ck_assert_int_eq(pthread_create(&sleeper, NULL, pe_sleeper, NULL), 0);
  pthread_barrier_wait(&pe_done);   /* it has its heap */

  static void *v[PE_PAGES][PE_MAX];
  int n[PE_PAGES];
  sm_page_t *page[PE_PAGES];
  void *next = smalloc_malloc(SM_TEST_REQUEST_FOR(PE_BLOCK));
  for (int k = 0; k < PE_PAGES; k++) {
    page[k] = pe_give_page(&next, v[k], &n[k]);
    ck_assert_msg(atomic_load(&page[k]->pooled) != 0, "page %d not given to the pool", k);
    ck_assert_ptr_null(atomic_load(&page[k]->owner));
    ck_assert_uint_eq(sm_page_live(page[k]), (uint32_t)n[k]);
  }
  size_t bin = page[0]->bin;

  /* the first given, emptied by this thread's frees (sent as a batch) */
  for (int i = 0; i < n[0]; i++)
    smalloc_free(v[0][i]);
  smalloc_collect(false);
  /* the last given, by single pushes: it goes ahead of the first */
  for (int i = 0; i < n[2]; i++)
    ck_assert(sm_free_block_xthread(page[2], v[2][i]));
  ck_assert_ptr_eq(sm_pool_pop(bin, POOL_MIN, POOL_PART), page[2]);
  /* the second, by this thread's batch: ahead of the first */
  for (int i = 0; i < n[1]; i++)
    smalloc_free(v[1][i]);
  smalloc_collect(false);
  ck_assert_ptr_eq(sm_pool_pop(bin, POOL_MIN, POOL_PART), page[1]);
  ck_assert_ptr_eq(sm_pool_pop(bin, POOL_MIN, POOL_PART), page[0]);
  /* back where they were, empty, for any thread to take */
  for (int k = 0; k < PE_PAGES; k++)
    sm_pool_push(page[k]);
  smalloc_free(next);
  pthread_barrier_wait(&pe_done);
  ck_assert_int_eq(pthread_join(sleeper, NULL), 0);
  pthread_barrier_destroy(&pe_done);
}
END_TEST

static Suite *pool_suite(void)
{
  Suite *s = suite_create("pool");
  TCase *tc = sm_tcase("pool", 30);
  tcase_add_test(tc, blocks_never_handed_out_count);
  tcase_add_test(tc, a_page_with_few_blocks_is_taken_once_all_are_free);
  tcase_add_test(tc, a_large_page_needs_a_part_of_its_blocks_free);
  tcase_add_test(tc, a_ready_page_behind_waiting_ones_is_found);
  tcase_add_test(tc, a_page_its_frees_empty_is_taken_first);
  tcase_add_test(tc, pages_frees_empty_in_the_pool_go_to_its_front);
  tcase_add_test(tc, a_demoted_pages_free_list_joins_local_free);
  tcase_add_test(tc, a_page_put_first_frees_onto_local_free_until_refilled);
  tcase_add_test(tc, the_free_blocks_of_a_page_in_the_pool_give_their_memory_back);
  tcase_add_test(tc, blocks_freed_into_pages_that_wait_go_back_while_others_are_given_back);
  tcase_add_test(tc, a_thread_that_trims_gives_back_the_free_blocks_of_its_sparse_pages);
  tcase_add_test(tc, another_threads_trim_gives_back_the_free_blocks_of_an_idle_threads_sparse_pages);
  tcase_add_test(tc, threads_free_into_their_sparse_pages_while_another_trims);
  tcase_add_test(tc, the_purge_thread_gives_back_the_free_blocks_of_an_idle_threads_sparse_pages);
  tcase_add_test(tc, remote_frees_wait_in_one_batch_and_go_together);
  tcase_add_test(tc, remote_frees_wait_for_the_eighth_slow_path);
  tcase_add_test(tc, a_new_heap_struct_keeps_to_its_first_pages);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  return sm_run_suite(pool_suite());
}
