/* Pages: the malloc slow path and the page life cycle.
 *
 * When the first page of a size class has no free block the slow path
 * tries, cheapest first (DESIGN.md), and counts the step that served:
 *   1. swap local_free into free                 O(1), the churn case
 *   2. collect thread_free                       one atomic exchange
 *   3. extend into untouched capacity            a bounded chunk
 *   4. the next page of the class with blocks
 *   5. a retired page (empty, kept warm)
 *   6. a fresh page of a segment the heap owns
 *   7. a new segment (cache, abandoned, then the OS)
 * A page whose last block is freed is retired, not released: it serves the
 * next burst and goes back to its segment only after its retire cycles. */
#include "internal.h"
#include "track.h"

/* Blocks built per extension step: about 4 KiB (at least 4 blocks), so a
 * class used for a few blocks touches little more than one OS page. */
#define SM_EXTEND_BYTES 4096

void sm_page_init(sm_heap_t *heap, sm_segment_t *seg, sm_page_t *page, size_t bin) {
  size_t idx = (size_t)(page - seg->pages);
  size_t psize = (size_t)1 << seg->page_shift;
  uint8_t *start = (uint8_t *)seg + idx * psize;
  size_t area = psize;
  if (idx == 0) { start += SM_SEGMENT_HDR; area -= SM_SEGMENT_HDR; }
  area -= SM_GUARD;   /* the page's last OS page is a guard in the secure build */
  size_t bsize = sm_bin_size(bin);
  page->free = NULL;
  page->local_free = NULL;
  atomic_store_explicit(&page->thread_free, 0, memory_order_relaxed);
  page->used = 0;
  sm_page_set_flags(page, sm_track_on() ? SM_PAGE_TRACKED : 0, heap->thread_id);
  page->bin = (uint8_t)bin;
  page->retired = 0;
#ifdef SM_SECURE
  page->key = sm_heap_random(heap);
#else
  page->key = sm_secret ^ ((uintptr_t)page * 0x9E3779B97F4A7C15ull);
#endif
  page->start = start;
  page->block_size = (uint32_t)bsize;
  sm_page_set_geometry(page, bsize, area / bsize);
  page->capacity = 0;
  page->frees = 0;
  page->used_folded = 0;
  page->retire_expire = 0;
  page->next = page->prev = page->rnext = page->rprev = NULL;
  atomic_fetch_add_explicit(&sm_gstats.class_pages[bin], 1, memory_order_relaxed);
}

/* Block size, block count and the constants of sm_page_is_block. */
void sm_page_set_geometry(sm_page_t *page, size_t bsize, size_t reserved) {
  sm_assert(bsize >= 16 && bsize <= SM_MEDIUM_MAX && reserved * bsize <= SM_SEGMENT_SIZE);
  page->block_size = (uint32_t)bsize;
  page->reserved = (uint32_t)reserved;
  sm_block_test_consts(bsize, reserved, &page->mul, &page->limit);
}

static void sm_page_extend(sm_page_t *page) {
  size_t bsize = page->block_size;
  size_t n = SM_EXTEND_BYTES / bsize;
  if (n < 4) {
    /* 1-3 KiB blocks: four per step, not one per slow path; medium
     * blocks: up to 16 KiB, and always at least one */
    n = 16384 / bsize;
    if (n > 4) n = 4;
    if (n < 1) n = 1;
  }
  if (n > page->reserved - page->capacity) n = page->reserved - page->capacity;
#ifdef SM_SECURE
  {
    /* random order, so the next block's address cannot be predicted */
    uint16_t order[SM_EXTEND_BYTES / 16];
    uint8_t *base = page->start + (size_t)page->capacity * bsize;
    sm_heap_t *heap = sm_heap();
    sm_track_reuse(base, n * bsize);
    for (size_t i = 0; i < n; i++) order[i] = (uint16_t)i;
    for (size_t i = n - 1; i > 0; i--) {
      size_t j = sm_heap_random(heap) % (i + 1);
      uint16_t t = order[i]; order[i] = order[j]; order[j] = t;
    }
    sm_block_t *head = page->free;
    for (size_t i = 0; i < n; i++) {
      sm_block_t *b = (sm_block_t *)(base + (size_t)order[i] * bsize);
      b->next = sm_enc(page, head);
      b->tag = page->key;
      head = b;
    }
    page->free = head;
    page->capacity += (uint32_t)n;
    return;
  }
#endif
  uint8_t *first = page->start + (size_t)page->capacity * bsize;
  sm_track_reuse(first, n * bsize);
  uint8_t *p = first;
  for (size_t i = 1; i < n; i++, p += bsize) {
    ((sm_block_t *)p)->next = sm_enc(page, (sm_block_t *)(p + bsize));
    ((sm_block_t *)p)->tag = page->key;
  }
  ((sm_block_t *)p)->next = sm_enc(page, page->free);
  ((sm_block_t *)p)->tag = page->key;
  page->free = (sm_block_t *)first;
  page->capacity += (uint32_t)n;
}

/* Move thread_free onto local_free, with one exchange that also yields the
 * list's length (used must be exact for the retire decision).  When
 * local_free is empty, as in the slow path's collect step, the list is
 * taken whole; otherwise it is walked to its tail. */
void sm_page_collect_thread_free(sm_page_t *page) {
  if (sm_tf_head(page, memory_order_relaxed) == NULL) return;
  /* take the list, keep the full bit */
  uintptr_t v = atomic_fetch_and_explicit(&page->thread_free, SM_TF_FULL, memory_order_acquire);
  sm_block_t *head = sm_tf_ptr(v);
  if (!head) return;
  uint32_t n = sm_tf_count(v);
  if (page->local_free) {
    sm_block_t *tail = head;
    sm_track_link(tail);
    for (uint32_t i = 1; i < n; i++) {
      sm_block_t *next = sm_dec(page, tail->next);
      /* a link out of the segment: stop there, as malloc would */
      if (sm_unlikely(((uintptr_t)next ^ (uintptr_t)page) >> SM_SEGMENT_SHIFT)) {
        sm_error("corrupted free list in page at %p (thread_free)", (void *)page->start);
        break;
      }
      sm_track_link(next);
      tail = next;
    }
    tail->next = sm_enc(page, page->local_free);
  }
  page->local_free = head;
  if (sm_unlikely(n > page->used)) n = page->used;   /* only after a reported corruption */
  page->used -= n;
  page->used_folded -= (int32_t)n;   /* keeps the fold's allocation count exact */
}

/* Merge the page's pending counts into the heap's class counters. */
void sm_page_fold_stats(sm_heap_t *heap, sm_page_t *page) {
  size_t bin = page->bin;
  int64_t allocs = (int64_t)page->frees + (int64_t)page->used - page->used_folded;
  sm_cnt_add(heap->stats.class_allocs[bin], (uint64_t)allocs);
  sm_cnt_add(heap->stats.class_frees[bin], page->frees);
  page->frees = 0;
  page->used_folded = (int32_t)page->used;
}

/* Expensive invariant check (--enable-debug): the owner lists plus the
 * blocks in use (thread_free counts as in use until collected) add up to
 * the blocks built so far (fewer once a corrupted list was cut off).
 * A list that reaches a link which is not a block of the page was
 * corrupted by the program (a write to a freed block); malloc reports
 * that when it gets there, so the page is not judged here. */
#define SM_LIST_CORRUPT SIZE_MAX
static size_t sm_list_len(const sm_page_t *page, sm_block_t *b) {
  size_t n = 0;
  for (; b != NULL && n <= page->capacity; b = sm_dec(page, b->next), n++)
    if (!sm_page_is_block(page, b)) return SM_LIST_CORRUPT;
  return n;
}

bool sm_page_valid(const sm_page_t *page) {
  sm_assert(page->in_use && page->capacity <= page->reserved && page->used <= page->capacity);
  size_t a = sm_list_len(page, page->free), b = sm_list_len(page, page->local_free);
  if (a == SM_LIST_CORRUPT || b == SM_LIST_CORRUPT) return true;
  /* after a reported misuse, lists cut off at a corrupted link hold fewer */
  return sm_errors_seen() ? a + b + page->used <= page->capacity
                          : a + b + page->used == page->capacity;
}

/* ---- retire ------------------------------------------------------------- */

static void sm_retired_unlink(sm_heap_t *heap, sm_page_t *page) {
  if (page->rprev) page->rprev->rnext = page->rnext; else heap->retired_first = page->rnext;
  if (page->rnext) page->rnext->rprev = page->rprev; else heap->retired_last = page->rprev;
  page->rnext = page->rprev = NULL;
  page->retired = 0;
}

void sm_page_unretire(sm_heap_t *heap, sm_page_t *page) {
  if (page->retired) sm_retired_unlink(heap, page);
}

/* The page's last block was freed.  Keep it warm for its retire cycles on
 * the heap's retired list (ordered by expiry), or release it now. */
void sm_page_retire(sm_heap_t *heap, sm_page_t *page) {
  sm_assert_expensive(sm_page_valid(page));
  size_t cycles = sm_retire_cycles_for(page->block_size);
  if (cycles == 0) { sm_page_release(heap, page); return; }
  sm_cnt_add(heap->stats.pages_retired, 1);
  if (page->retired) sm_retired_unlink(heap, page);
  page->retired = 1;
  page->retire_expire = heap->cycle + (uint32_t)cycles;
  sm_page_t *after = heap->retired_last;
  while (after && !sm_cycle_reached(page->retire_expire, after->retire_expire)) after = after->rprev;
  page->rprev = after;
  page->rnext = after ? after->rnext : heap->retired_first;
  if (page->rnext) page->rnext->rprev = page; else heap->retired_last = page;
  if (after) after->rnext = page; else heap->retired_first = page;
}

/* Give an empty page back to its segment. */
void sm_page_release(sm_heap_t *heap, sm_page_t *page) {
  sm_assert(page->used == 0);
  sm_assert(sm_tf_head(page, memory_order_relaxed) == NULL);
  sm_page_unretire(heap, page);
  uint8_t flags = atomic_load_explicit(&page->flags, memory_order_relaxed);
  sm_pq_remove(heap, (flags & SM_PAGE_IN_FULL) ? SM_BIN_FULL : page->bin, page);
  sm_page_fold_stats(heap, page);
  atomic_fetch_sub_explicit(&sm_gstats.class_pages[page->bin], 1, memory_order_relaxed);
  sm_cnt_add(heap->stats.pages_released, 1);
  page->free = page->local_free = NULL;
  page->capacity = 0;
  sm_page_set_flags(page, 0, 0);
  sm_segment_page_free(heap, sm_ptr_segment(page), page);
}

/* Release retired pages whose cycles ran out (all of them when forced;
 * then also empty pages that are still the first of their class). */
void sm_heap_collect_retired(sm_heap_t *heap, bool force) {
  while (heap->retired_first && (force || sm_cycle_reached(heap->cycle, heap->retired_first->retire_expire))) {
    sm_page_t *page = heap->retired_first;
    sm_retired_unlink(heap, page);
    if (page->used == 0) sm_page_release(heap, page);
  }
  if (!force) return;
  for (size_t bin = 1; bin < SM_BIN_COUNT; bin++) {
    sm_page_t *page = heap->queues[bin].first;
    while (page) {
      sm_page_t *next = page->next;
      sm_page_collect_thread_free(page);
      if (page->used == 0) sm_page_release(heap, page);
      page = next;
    }
  }
}

/* ---- flags --------------------------------------------------------------- */

/* Flags and xtid change together (owner thread only): xtid is the owner's
 * thread id unless a flag needs every free out of line, so free's fast
 * path needs one compare.  Sequentially consistent: see sm_page_to_full. */
void sm_page_set_flags(sm_page_t *page, uint8_t flags, uintptr_t tid) {
  bool slow = (flags & SM_PAGE_SLOW_FREE) != 0 || tid == 0;
  if (slow) atomic_store_explicit(&page->xtid, 0, memory_order_seq_cst);
  atomic_store_explicit(&page->flags, flags, memory_order_seq_cst);
  if (!slow) atomic_store_explicit(&page->xtid, tid | ((flags & SM_PAGE_IN_FULL) ? 1 : 0), memory_order_seq_cst);
}

/* A new owner (tid, 0 for none) for a page, off the full list: the flags
 * that send frees out of line stay, the full bits go. */
void sm_page_set_owner(sm_page_t *page, uintptr_t tid) {
  sm_page_set_flags(page, atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_SLOW_FREE, tid);
  atomic_fetch_and_explicit(&page->thread_free, ~SM_TF_FULL, memory_order_relaxed);
}

/* ---- full pages ------------------------------------------------------------ */

/* Move an exhausted page to the full list.  The full bit goes into the
 * thread_free word with one atomic operation that also shows whether a
 * block arrived meanwhile: either we see that block here (and keep the
 * page), or a later pusher sees the bit and tells the heap. */
void sm_page_to_full(sm_heap_t *heap, sm_page_t *page) {
  uintptr_t v = atomic_fetch_or_explicit(&page->thread_free, SM_TF_FULL, memory_order_acq_rel);
  if (sm_tf_ptr(v) != NULL) {
    atomic_fetch_and_explicit(&page->thread_free, ~SM_TF_FULL, memory_order_relaxed);
    return;
  }
  uint8_t flags = atomic_load_explicit(&page->flags, memory_order_relaxed);
  sm_page_set_flags(page, flags | SM_PAGE_IN_FULL, heap->thread_id);
  sm_pq_remove(heap, page->bin, page);
  sm_pq_push_back(heap, SM_BIN_FULL, page);
  sm_cnt_add(heap->stats.pages_full, 1);
}

void sm_page_unfull(sm_heap_t *heap, sm_page_t *page) {
  uint8_t flags = atomic_load_explicit(&page->flags, memory_order_relaxed);
  if (!(flags & SM_PAGE_IN_FULL)) return;
  sm_page_set_owner(page, heap->thread_id);
  sm_pq_remove(heap, SM_BIN_FULL, page);
  sm_pq_push_back(heap, page->bin, page);
  sm_cnt_add(heap->stats.pages_unfull, 1);
}

/* Other threads freed into full pages: bring those pages back. */
void sm_heap_collect_full(sm_heap_t *heap) {
  if (atomic_exchange_explicit(&heap->xfree_full, 0, memory_order_acq_rel) == 0) return;
  sm_page_t *page = heap->queues[SM_BIN_FULL].first;
  while (page) {
    sm_page_t *next = page->next;
    if (sm_tf_head(page, memory_order_acquire) != NULL) {
      sm_page_collect_thread_free(page);
      sm_page_unfull(heap, page);
    }
    page = next;
  }
}

/* ---- the slow path ---------------------------------------------------------- */

static void sm_count_step(sm_heap_t *heap, size_t bin, int step) {
  sm_cnt_add(heap->stats.class_steps[bin][step], 1);
}

/* Whether the page has a block to hand out.  A free-list head outside the
 * page's segment was written by the program (a use after free): report it
 * and leak the rest of the list rather than follow it. */
bool sm_page_has_free(sm_page_t *page) {
  sm_block_t *b = page->free;
  if (b == NULL) return false;
  if (sm_unlikely(((uintptr_t)b ^ (uintptr_t)page) >> SM_SEGMENT_SHIFT)) {
    sm_error("corrupted free list in page at %p", (void *)page->start);
    page->free = NULL;
    return false;
  }
  return true;
}

/* Make the page's free list non-empty by steps 1-3; returns the step or -1. */
static int sm_page_refill(sm_page_t *page) {
  if (page->local_free) {
    page->free = page->local_free;   /* both lists use the page's key */
    page->local_free = NULL;
    return SMALLOC_STEP_LOCAL_SWAP;
  }
  if (sm_tf_head(page, memory_order_relaxed) != NULL) {
    sm_page_collect_thread_free(page);
    page->free = page->local_free;
    page->local_free = NULL;
    return SMALLOC_STEP_THREAD_COLLECT;
  }
  if (page->capacity < page->reserved) {
    sm_page_extend(page);
    return SMALLOC_STEP_EXTEND;
  }
  return -1;
}

/* Find a page of the bin with a free block, counting how it was found.
 * Returns NULL only when the OS refuses memory. */
sm_page_t *sm_page_find(sm_heap_t *heap, size_t bin) {
  heap->cycle++;
  if (heap->retired_first && sm_cycle_reached(heap->cycle, heap->retired_first->retire_expire))
    sm_heap_collect_retired(heap, false);
  if (atomic_load_explicit(&heap->xfree_full, memory_order_relaxed)) sm_heap_collect_full(heap);
  if (sm_cycle_reached(heap->cycle, heap->next_purge_check)) {
    heap->next_purge_check = heap->cycle + 1024;
    sm_segment_cache_collect(false);
  }

  sm_page_queue_t *q = &heap->queues[bin];
  sm_page_t *first = q->first;
  for (sm_page_t *page = first; page; ) {
    sm_page_t *next = page->next;
    int step = sm_page_has_free(page) ? SMALLOC_STEP_NEXT_PAGE : sm_page_refill(page);
    if (step >= 0) {
      if (page->retired) {
        sm_page_unretire(heap, page);
        sm_cnt_add(heap->stats.pages_reused, 1);
        step = SMALLOC_STEP_RETIRED_PAGE;
      } else if (page != first) {
        step = SMALLOC_STEP_NEXT_PAGE;
      }
      if (page != q->first) {
        sm_pq_remove(heap, bin, page);
        sm_pq_push_front(heap, bin, page);
      }
      sm_count_step(heap, bin, step);
      sm_page_fold_stats(heap, page);   /* keeps the 32-bit frees count small */
      sm_assert_expensive(sm_page_valid(page));
      return page;
    }
    sm_page_to_full(heap, page);
    if (!(atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_IN_FULL)) {
      continue;   /* blocks arrived from another thread: refill it again */
    }
    page = next;
  }

  /* 6. a fresh page; 7. a new segment, after reclaiming abandoned ones */
  int kind = bin <= SM_BIN_SMALL_LAST ? SM_SEG_SMALL : SM_SEG_MEDIUM;
  bool new_segment = false;
  sm_page_t *page = sm_segment_page_alloc(heap, kind, &new_segment);
  /* Before mapping: segments of exited threads, of the kind needed, until
   * one gives a page.  Each is taken once, so the work is paid for by the
   * segments it frees (their blocks were often all freed meanwhile). */
  while (!page && sm_segment_reclaim_one(heap, kind)) {
    /* the reclaimed pages may serve this class already */
    if (q->first && (sm_page_has_free(q->first) || sm_page_refill(q->first) >= 0)) {
      sm_count_step(heap, bin, SMALLOC_STEP_NEXT_PAGE);
      return q->first;
    }
    page = sm_segment_page_alloc(heap, kind, &new_segment);
  }
  if (!page) {
    /* also drain the other kind's list, one segment per new segment, so
     * it cannot grow without bound in a program that never asks for it
     * (what it reclaims is of the other kind: it cannot serve this page) */
    sm_segment_reclaim_one(heap, 1 - kind);
    new_segment = true;
    page = sm_segment_page_alloc(heap, kind, &new_segment);
    if (!page) return NULL;
  }
  sm_page_init(heap, sm_ptr_segment(page), page, bin);
  sm_page_extend(page);
  sm_pq_push_front(heap, bin, page);
  sm_count_step(heap, bin, new_segment ? SMALLOC_STEP_NEW_SEGMENT : SMALLOC_STEP_FRESH_PAGE);
  sm_heap_grew(heap);
  return page;
}
