/* Freeing: the out-of-line free path, pointer validation, double-free
 * detection and cross-thread frees.  The inline owner-thread fast path is
 * in internal.h. */
#include "internal.h"
#include "track.h"

/* Where a free's counters go: the thread's heap, or for a thread without
 * one (it never allocated, or it has exited) the process-wide orphan
 * counters, atomically. */
#define SM_COUNT(heap, field, n)                                              \
  do {                                                                        \
    if (sm_likely((heap)->initialized)) sm_cnt_add((heap)->stats.field, (n)); \
    else sm_stats_orphan_add(offsetof(sm_tstats_t, field), (n));              \
  } while (0)

/* Map a pointer to its segment and page, validating that smalloc handed it
 * out: the segment map says a header lives there, and the header's cookie
 * matches.  Never faults on a foreign pointer. */
bool sm_lookup(const void *p, sm_segment_t **segp, sm_page_t **pagep) {
  sm_segment_t *seg = sm_ptr_segment(p);
  if (((uintptr_t)p & SM_SEGMENT_MASK) == 0) {
    /* only a huge block aligned to 4 MiB or more starts at a unit: its
     * header is one unit below */
    seg = (sm_segment_t *)((uintptr_t)p - SM_SEGMENT_SIZE);
  }
  if (!sm_segmap_contains((uintptr_t)seg)) return false;
  if (seg->cookie != ((uintptr_t)seg ^ sm_secret)) return false;
  sm_page_t *page = (seg->kind >= SM_SEG_SINGLE) ? &seg->pages[0] : sm_segment_page_of(seg, p);
  if (!page->in_use) return false;
  *segp = seg;
  *pagep = page;
  return true;
}

/* The tag word of a block being freed holds the page's key: it may be
 * free already.  Look for it in the page's lists. */
bool sm_free_is_double(sm_page_t *page, sm_block_t *b) {
  sm_block_t *lists[3] = {page->free, page->local_free,
                          sm_tf_head(page, memory_order_acquire)};
  for (int l = 0; l < 3; l++) {
    size_t guard = page->capacity + 1;
    for (sm_block_t *x = lists[l]; x && guard--; x = sm_dec(page, x->next)) {
      if (((uintptr_t)x ^ (uintptr_t)page) >> SM_SEGMENT_SHIFT) break;  /* corrupt: stop */
      sm_track_link(x);
      if (x == b) {
        sm_error("free(): double free of %p", (void *)b);
        return true;
      }
    }
  }
  return false;
}

/* The owner frees into a page the fast path does not handle: one on the
 * full list, a flagged one, or a block whose tag says it may be free. */
void sm_free_local_slow(sm_page_t *page, sm_block_t *b, void *p) {
  sm_heap_t *heap = atomic_load_explicit(&sm_ptr_segment(page)->heap, memory_order_relaxed);
  sm_track_link(b);
  if (b->tag == page->key && sm_free_is_double(page, b)) return;
  sm_track_free(p, b);
  b->next = sm_enc(page, page->local_free);
  b->tag = page->key;
  page->local_free = b;
  sm_cnt_add(page->frees, 1);
  page->used--;
  sm_page_unfull(heap, page);
  if (page->used == 0 && page->free == NULL) sm_page_retire(heap, page);
}

/* The fast path freed the last block of one of the thread's pages. */
void sm_free_emptied(sm_page_t *page) {
  sm_page_retire(sm_heap(), page);
}

/* Free from a thread that does not own the page: one CAS onto thread_free;
 * false when the block was already free (reported).
 * The word's full bit, seen in the same CAS, says the owner must be told.
 * Nothing of the page or segment is read after the CAS (the owner may
 * take the block and release the page at once); the owner's heap is read
 * before, and heaps are never unmapped, so telling it stays safe. */
bool sm_free_block_xthread(sm_segment_t *seg, sm_page_t *page, sm_block_t *b) {
  uintptr_t old = atomic_load_explicit(&page->thread_free, memory_order_relaxed);
  sm_heap_t *owner = NULL;
  uintptr_t key = page->key;
  sm_track_link(b);
  /* a block on any of the page's lists carries the key in its tag; the
   * lists belong to the owner, so this is as far as another thread looks */
  if (sm_unlikely(b->tag == key)) {
    sm_error("free(): double free of %p", (void *)b);
    return false;
  }
  b->tag = key;
  do {
    if (sm_unlikely(sm_tf_ptr(old) == b)) {
      /* two threads freed it at once, and the other one won the CAS: a
       * link to itself would make the list endless */
      sm_error("free(): double free of %p", (void *)b);
      return false;
    }
    if ((old & SM_TF_FULL) && owner == NULL) owner = atomic_load_explicit(&seg->heap, memory_order_acquire);
    b->next = sm_enc(page, sm_tf_ptr(old));
  } while (!atomic_compare_exchange_weak_explicit(&page->thread_free, &old,
                                                  ((uintptr_t)b | (old & ~SM_TF_PTR_MASK)) + SM_TF_COUNT_ONE,
                                                  memory_order_release, memory_order_relaxed));
  if ((old & SM_TF_FULL) && owner != NULL)
    atomic_fetch_add_explicit(&owner->xfree_full, 1, memory_order_release);
  return true;
}

/* From the inline free: a block start in another live thread's ordinary
 * page.  Count it here and push it with one CAS. */
void sm_free_xthread(sm_page_t *page, sm_block_t *b, uintptr_t xtid) {
  if ((xtid & ~(uintptr_t)1) == sm_thread_id()) {
    /* our own page, on the full list */
    if (sm_unlikely(!sm_canary_ok(page, b))) { sm_free_generic(b, "free"); return; }
    sm_free_local_slow(page, b, b);
    return;
  }
  sm_heap_t *heap = sm_heap();
  if (sm_unlikely(!heap->initialized || !sm_canary_ok(page, b))) { sm_free_generic(b, "free"); return; }
  size_t bin = page->bin;   /* the page may be gone once the block is pushed */
  if (sm_free_block_xthread(sm_ptr_segment(page), page, b)) sm_cnt_add(heap->stats.class_frees[bin], 1);
}

void sm_free_generic(void *p, const char *who) {
  sm_heap_t *heap = sm_heap();
  /* a thread that frees blocks gets a heap, so its counts stay plain
   * integers; one that has exited counts into the orphan totals */
  if (sm_unlikely(heap == &sm_heap_empty) && p != NULL) {
    sm_heap_t *h = sm_heap_init_thread();
    if (h) heap = h;
  }
  if (p == NULL) {
    SM_COUNT(heap, calls[SM_CALL_FREE_NULL], 1);
    return;
  }
  sm_segment_t *seg;
  sm_page_t *page;
  if (sm_unlikely(!sm_lookup(p, &seg, &page))) {
    sm_error("%s(): invalid pointer %p (not allocated by smalloc)", who, p);
    return;
  }
  if (seg->kind >= SM_SEG_SINGLE) {
    if (p != (void *)page->start) {
      sm_error("%s(): invalid pointer %p (not the start of a block)", who, p);
      return;
    }
    sm_track_free(p, p);
    if (seg->kind == SM_SEG_HUGE) {
      SM_COUNT(heap, huge_frees, 1);
      sm_huge_free(seg);
    } else {
      SM_COUNT(heap, large_frees, 1);
      SM_COUNT(heap, large_bytes_freed, seg->block_size);
      sm_segment_single_free(seg);
    }
    return;
  }
  size_t diff = (size_t)((uint8_t *)p - page->start);
  size_t rem = sm_page_is_block(page, p) ? 0 : diff % page->block_size;
  if (sm_unlikely(diff >= (size_t)page->reserved * page->block_size ||
                  (rem != 0 && !(atomic_load_explicit(&page->flags, memory_order_relaxed) &
                                 SM_PAGE_HAS_ALIGNED)))) {
    sm_error("%s(): invalid pointer %p (not the start of a block)", who, p);
    return;
  }
  sm_block_t *b = (sm_block_t *)((uint8_t *)p - rem);
  if (sm_unlikely(!sm_canary_ok(page, b))) {
    sm_error("%s(): heap overflow: the canary after block %p was overwritten", who, (void *)b);
    return;
  }
  if (atomic_load_explicit(&seg->thread_id, memory_order_relaxed) == sm_thread_id()) {
    sm_free_local_slow(page, b, p);
    return;
  }
  size_t bin = page->bin;   /* the page may be gone once the block is pushed */
  sm_track_free(p, b);
  if (sm_free_block_xthread(seg, page, b)) SM_COUNT(heap, class_frees[bin], 1);
}
