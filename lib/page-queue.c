/* Size-class page queues.  heap->queues[bin] lists the pages of one size
 * class, the page to allocate from first; heap->queues[SM_BIN_FULL] the
 * pages with no free block.  heap->direct caches each small size's first
 * page so the malloc fast path needs no queue walk. */
#include "internal.h"
#include "track.h"

/* Whether the owner's frees into the first page of its class go straight
 * back on its free list: not where emptied pages are released at once
 * (SMALLOC_RETIRE_CYCLES=0: a page that stayed first would never empty),
 * nor in the secure build, which delays the reuse of a freed block until
 * its page's list runs dry, so that a write after free is seen then; and
 * not before its local_free is empty.  The block the owner freed last
 * must head the list its frees go on, where free looks for a second free
 * of it (sm_free_owner_push): a page that becomes first with blocks on
 * local_free (one back from the full list, say) frees there until the
 * slow path takes local_free as its free list (sm_pq_first_refilled). */
static bool sm_pq_frees_to_free(const sm_page_t *page) {
#ifdef SM_SECURE
  (void)page;
  return false;
#else
  return page->local_free == NULL && sm_retire_cycles_for(page->block_size) != 0;
#endif
}

/* The bin's first page changed from old (NULL: none) to its first now:
 * the owner's frees go on the new one's free list (SM_FREE_TO_FREE, see
 * sm_pq_frees_to_free), on the old one's local_free again, and every
 * direct entry of the bin points at the new one. */
static void sm_pq_first_changed(sm_heap_t *heap, size_t bin, sm_page_t *old) {
  if (bin == SM_BIN_FULL) return;
  sm_page_t *first = heap->queues[bin].first;
  if (old) sm_page_set_free_to(old, SM_FREE_TO_LOCAL);
  if (first) {
    sm_page_unpurge(first);   /* allocated from again: its gate shuts (pool.c) */
    sm_page_set_free_to(first, sm_pq_frees_to_free(first) ? SM_FREE_TO_FREE : SM_FREE_TO_LOCAL);
  }
  sm_pq_update_direct(heap, bin);
}

/* The slow path found page, the first of its class, with a free list
 * (its local_free taken as that, maybe): where its frees go now. */
void sm_pq_first_refilled(sm_heap_t *heap, sm_page_t *page) {
  if (heap->queues[page->bin].first == page && sm_pq_frees_to_free(page))
    sm_page_set_free_to(page, SM_FREE_TO_FREE);
}

/* Point every direct entry of the bin at its first page. */
void sm_pq_update_direct(sm_heap_t *heap, size_t bin) {
  if (bin == SM_BIN_FULL || sm_bin_size(bin) > SM_DIRECT_MAX) return;
  sm_page_t *page = heap->queues[bin].first;
  if (!page || sm_track_on()) page = &sm_page_empty;   /* valgrind: no inline malloc */
  size_t lo = bin == 1 ? 0 : sm_bin_size(bin - 1) / 16 + 1;
  size_t hi = sm_bin_size(bin) / 16;
  for (size_t i = lo; i <= hi; i++) heap->direct[i] = page;
}

void sm_pq_push_back(sm_heap_t *heap, size_t qi, sm_page_t *page) {
  sm_page_queue_t *q = &heap->queues[qi];
  sm_assert_expensive(!page->retired && q->first != page);
  page->next = NULL;
  page->prev = q->last;
  if (q->last) q->last->next = page; else q->first = page;
  q->last = page;
  if (q->first == page) sm_pq_first_changed(heap, qi, NULL);
  else if (qi != SM_BIN_FULL) sm_page_gate_open(page);   /* behind the first (pool.c) */
}

/* The owner changed the lists of a page of a class's queue (its gate
 * shut for that, pool.c): behind the first, its gate opens again. */
void sm_pq_reopen(sm_heap_t *heap, sm_page_t *page) {
  if (heap->queues[page->bin].first != page) sm_page_gate_open(page);
}

/* The page goes first; the one it puts second keeps its free blocks on
 * local_free from now on (sm_page_free_to_local), so that only the first
 * page of a class has a free list: the fast path's free that empties a
 * page behind it sees free == NULL and retires it.  (A thread that freed
 * into the pages of exited threads, each claimed in front of the last,
 * kept 8 vacant pages of every class for good.) */
void sm_pq_push_front(sm_heap_t *heap, size_t qi, sm_page_t *page) {
  sm_page_queue_t *q = &heap->queues[qi];
  sm_assert_expensive(!page->retired && q->first != page);
  sm_page_t *old = q->first;
  if (old && qi != SM_BIN_FULL) sm_page_free_to_local(old);
  page->prev = NULL;
  page->next = old;
  if (old) old->prev = page; else q->last = page;
  q->first = page;
  sm_pq_first_changed(heap, qi, old);
  /* behind the first, its lists as they stay: its gate opens (pool.c) */
  if (old && qi != SM_BIN_FULL) sm_page_gate_open(old);
}

void sm_pq_remove(sm_heap_t *heap, size_t qi, sm_page_t *page) {
  sm_page_queue_t *q = &heap->queues[qi];
  /* the page is on this queue */
  sm_assert_expensive(!page->retired && (page->prev ? page->prev->next == page : q->first == page) &&
                      (page->next ? page->next->prev == page : q->last == page));
  bool was_first = q->first == page;
  sm_page_unpurge(page);   /* on its way to another state: its gate shuts (pool.c) */
  if (page->prev) page->prev->next = page->next; else q->first = page->next;
  if (page->next) page->next->prev = page->prev; else q->last = page->prev;
  page->next = page->prev = NULL;
  if (was_first) sm_pq_first_changed(heap, qi, page);
}
