/* Pages: the malloc slow path and the page life cycle.
 *
 * The first page of a size class is its current page: malloc takes
 * blocks from it, and its owner's frees go back on its free list (LIFO:
 * a burst freed and allocated again never leaves the fast path).  When it
 * has no free block the slow path tries, cheapest first (DESIGN.md), and
 * counts the step that served:
 *   1. swap local_free into free                 O(1): a page freed into
 *                                                while it was not current
 *   2. collect thread_free                       one atomic exchange
 *   3. extend into untouched capacity            a bounded chunk
 *   4. the next page of the class with blocks
 *   5. a retired page (empty, kept warm)
 *      a page from the process's pool (pool.c)
 *   6. a fresh page of a segment the heap holds
 *   7. a new segment (cache, abandoned, then the OS)
 * A page whose last block is freed is retired, not released: it serves the
 * next burst and goes back to its segment only after its retire cycles.
 * The current page is not retired while it is current (its emptied free
 * list serves the next burst); the sweep retires it once its class has
 * seen no slow path for a sweep period.
 *
 * Who owns free memory.  A heap's owner thread alone touches its page
 * queues, its direct table and the free lists of its pages: that is what
 * keeps malloc and free free of atomics.  Memory the owner is done with is
 * the process's:
 *   - a retired page leaves its queue (the fast path can no longer reach
 *     it) for the heap's retired lists, which heap->lock guards together
 *     with the heap's segment lists and their pages' in_use; the owner
 *     takes the lock to retire, reuse (step 5) and release pages and to
 *     carve fresh ones, once per event, never per block;
 *   - any thread may therefore release another heap's retired pages
 *     (sm_heap_claim_retired): malloc_trim, smalloc_collect(true) and an
 *     allocation the OS refused do, for every live heap, even one whose
 *     owner is blocked and never calls in again (heap.c,
 *     sm_collect_process); a segment left without pages goes to the
 *     process-wide cache, from which any thread takes it;
 *   - a page with live blocks that its owner has exhausted and other
 *     threads free into goes to the process's pool of its class, and
 *     every page with live blocks of an exited thread: any thread that
 *     needs a page of the class takes it before carving a fresh one
 *     (pool.c: the hand-over and its invariants);
 *   - the heap of an exited thread releases its empty pages and abandons
 *     its segments to a process-wide list (segment.c); any thread that
 *     needs a page reclaims them, and a page of a segment another heap
 *     holds goes home to that heap when it empties (pool.c).
 * Invariants: a retired page has used == 0, free == NULL (all its blocks
 * on local_free), an empty thread_free, its counts folded, and is on
 * exactly the two retired lists of its heap; a queued page is never
 * retired.  A page another thread frees into while it is on the full list
 * is handed back through the heap's xdelayed list (sm_page_to_full). */
#include "internal.h"
#include "track.h"
#include "probes.h"

/* Blocks built per extension step: about 4 KiB (at least 4 blocks), so a
 * class used for a few blocks touches little more than one OS page. */
#define SM_EXTEND_BYTES 4096

static bool sm_page_state_ok(const sm_heap_t *heap, const sm_page_t *page);

/* The bytes the page takes in its segment, its header's share included. */
static size_t sm_page_bytes(const sm_page_t *page) {
  return (size_t)1 << sm_page_segment(page)->page_shift;
}

/* The page joins its class (+1) or leaves it (-1), in the process-wide
 * counts of the class's pages and their bytes. */
static void sm_page_class_count(const sm_page_t *page, int64_t dir) {
  atomic_fetch_add_explicit(&sm_gstats.class_pages[page->bin], dir, memory_order_relaxed);
  atomic_fetch_add_explicit(&sm_gstats.class_page_bytes[page->bin], dir * (int64_t)sm_page_bytes(page),
                            memory_order_relaxed);
}
static int sm_page_refill(sm_page_t *page, bool may_extend);
static void sm_page_unfull_move(sm_heap_t *heap, sm_page_t *page);

void sm_page_init(sm_heap_t *heap, sm_segment_t *seg, sm_page_t *page, size_t bin) {
  uint8_t *start = sm_segment_page_start(seg, page);
  /* the page's last OS page is a guard in the secure build */
  size_t area = sm_segment_page_len(seg, page) - SM_GUARD;
  size_t bsize = sm_bin_size(bin);
  page->free = NULL;
  page->local_free = NULL;
  atomic_store_explicit(&page->thread_free, 0, memory_order_relaxed);
  page->used = 0;
  sm_page_frees_restart(page);
  page->bin = (uint8_t)bin;
  atomic_store_explicit(&page->owner, heap, memory_order_relaxed);
  sm_page_set_flags(page, sm_track_on() ? SM_PAGE_TRACKED : 0, sm_heap_owner_id(heap));
  page->retired = 0;
  sm_page_set_free_to(page, SM_FREE_TO_LOCAL);
  page->xfreed = 0;
  atomic_store_explicit(&page->sampled, 0, memory_order_relaxed);
  atomic_store_explicit(&page->prof_marks, 0, memory_order_relaxed);
  /* a new key for every life of the page: blocks of an earlier life (of
   * another size class) leave links and tags in memory that blocks of
   * this one hand out; they must tell nothing about this life's key.  At
   * least 2: a handed-out block's tag is 0, one on its way back key ^ 1 */
  page->key = sm_heap_random(heap) | 2;
  page->start = start;
  page->block_size = (uint32_t)bsize;
  sm_page_set_geometry(page, bsize, area / bsize);
  page->capacity = 0;
  page->used_folded = 0;
  page->retire_expire = 0;
  page->next = page->prev = page->rnext = page->rprev = NULL;
  sm_page_class_count(page, 1);
}

/* Block size, block count and the constants of sm_page_is_block. */
void sm_page_set_geometry(sm_page_t *page, size_t bsize, size_t reserved) {
  sm_assert(bsize >= 16 && bsize <= SM_MEDIUM_MAX && reserved * bsize <= SM_SEGMENT_SIZE);
  page->block_size = (uint32_t)bsize;
  page->reserved = (uint32_t)reserved;
  sm_block_test_consts(bsize, reserved, &page->mul, &page->limit);
}

/* The page's free list walked as malloc takes blocks off it, up to most
 * blocks: how many, the last of them in *last, and in *past where the
 * walk stopped: NULL at the list's end, else a link that is not a block
 * start of the page, a block not tagged free (written after its free),
 * or the block after the most-th.  Every walk of a free list that counts
 * it goes here, so that all agree on where a damaged list ends: the
 * blocks past that point are out of reach and count as in use (malloc
 * reports the damage when it gets there). */
static uint32_t sm_free_list_walk(const sm_page_t *page, uint32_t most, sm_block_t **last,
                                  sm_block_t **past) {
  uint32_t n = 0;
  sm_block_t *b = page->free;
  *last = NULL;
  for (; b != NULL && n < most; n++) {
    if (sm_unlikely(!sm_page_is_block(page, b))) break;
    sm_track_link(b);
    if (sm_unlikely((b->tag ^ page->key) > SM_TAG_REMOTE)) break;
    *last = b;
    b = sm_dec(page, b->next);
  }
  *past = b;
  return n;
}

/* The blocks on the page's free list (see sm_page_live), counted up to
 * most, which is at most used (that counts them all).  A list that goes
 * on past used blocks (a cycle: a block freed twice where free could not
 * tell) counts one fewer than used, so that its page never looks empty
 * and goes back with a block live in it. */
uint32_t sm_page_free_count(const sm_page_t *page, uint32_t most) {
  sm_block_t *last, *past;
  uint32_t n = sm_free_list_walk(page, most, &last, &past);
  if (sm_unlikely(past != NULL && n == most && n == page->used && n > 0)) return n - 1;
  return n;
}

/* Whether the page holds at least want built blocks its owner can hand
 * out once it takes its lists (those other threads freed count once it
 * collects them): for a page of the full list, those freed into it since
 * it went there.  Those on local_free first, the free list's walked only
 * for the rest (a page behind the first of its class has one when the
 * blocks another thread sent became it, sm_page_collect_thread_free). */
static bool sm_page_free_at_least(const sm_page_t *page, uint32_t want) {
  uint32_t local = page->capacity - page->used;   /* used counts all the rest (sm_page_t) */
  if (local >= want) return true;
  return page->free != NULL && sm_page_free_count(page, want - local) == want - local;
}

/* How many blocks the page's next extension builds (0: none left). */
static size_t sm_page_extend_count(const sm_page_t *page) {
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
  return n;
}

static void sm_page_extend(sm_page_t *page) {
  size_t bsize = page->block_size;
  size_t n = sm_page_extend_count(page);
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
      if (!sm_track_on()) sm_poison_set(page, b);
      head = b;
    }
    page->free = head;
    page->capacity += (uint32_t)n;
    sm_page_used_set(page, page->used + (uint32_t)n);   /* on the free list */
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
  sm_page_used_set(page, page->used + (uint32_t)n);   /* on the free list */
}

/* Move thread_free onto local_free, with one exchange that also yields the
 * list's length (used must be exact for the retire decision).  Returns
 * how many blocks became the free list (they stay in used, sm_page_t),
 * 0 when they went on local_free (they leave it).  When
 * local_free is empty, as in the slow path's collect step, the list is
 * taken whole; when free is, it becomes free (a page behind the first of
 * its class, or on the full list: the list is taken whole too); only
 * otherwise is it walked to its tail, a cache miss per block (bench_server:
 * 5 % of the run when every collect walked). */
uint32_t sm_page_collect_thread_free(sm_page_t *page) {
  if (sm_tf_head(page, memory_order_relaxed) == NULL) return 0;
  /* take the list, keep the full bit */
  uintptr_t v = atomic_fetch_and_explicit(&page->thread_free, SM_TF_FULL, memory_order_acquire);
  sm_block_t *head = sm_tf_ptr(page, v);
  if (!head) return 0;
  uint32_t n = sm_tf_count(v);
  page->xfreed = 1;
  page->used_folded -= (int32_t)n;   /* keeps the fold's allocation count exact */
  if (page->local_free && page->free == NULL) {
    page->free = head;   /* counted in used, as they were on thread_free */
    return n;
  }
  if (page->local_free) {
    sm_block_t *tail = head;
    sm_track_link(tail);
    for (uint32_t i = 1; i < n; i++) {
      sm_block_t *next = sm_dec(page, tail->next);
      /* a link out of the page: stop there, as malloc would */
      if (sm_unlikely(!sm_page_link_ok(page, next))) {
        sm_page_corrupt(page, " (thread_free)", NULL);
        break;
      }
      sm_track_link(next);
      tail = next;
    }
    tail->next = sm_enc(page, page->local_free);
    page->local_free = head;
  } else {
    page->local_free = head;
  }
  if (sm_unlikely(n > page->used)) n = page->used;   /* only after a reported corruption */
  sm_page_used_set(page, page->used - n);
  return 0;
}

/* Whether the page is empty after a collect that put onto_free blocks
 * on its free list (sm_page_collect_thread_free): a page that had no
 * free list before has those alone, and used says it with no walk. */
static bool sm_page_vacant_after_collect(const sm_page_t *page, bool had_free, uint32_t onto_free) {
  if (had_free) return sm_page_vacant(page);
  return sm_page_vacant_with(page, onto_free);
}

/* Take the page's thread_free and say whether the page is empty now. */
bool sm_page_collect_vacant(sm_page_t *page) {
  bool had_free = page->free != NULL;
  uint32_t onto_free = sm_page_collect_thread_free(page);
  return sm_page_vacant_after_collect(page, had_free, onto_free);
}

/* Merge the page's pending counts into the heap's class counters. */
void sm_page_fold_stats(sm_heap_t *heap, sm_page_t *page) {
  size_t bin = page->bin;
  uint32_t live = sm_page_live(page);
  uint32_t frees = sm_page_local_frees(page);
  int64_t allocs = (int64_t)frees + (int64_t)live - page->used_folded;
  /* heap may be the purge thread's (a claim): then the orphan totals */
  SM_COUNT(heap, class_allocs[bin], (uint64_t)allocs);
  SM_COUNT(heap, class_frees[bin], frees);
  if (allocs != (int64_t)frees) sm_stats_class_changed(heap, bin, allocs - (int64_t)frees, page->block_size);
  sm_page_frees_restart(page);
  page->used_folded = (int32_t)live;
}

/* Expensive invariant check (--enable-debug): the owner lists plus the
 * blocks in use (thread_free counts as in use until collected) add up to
 * the blocks built so far (fewer once a corrupted list was cut off).
 * A list that reaches a link which is not a block of the page, or holds
 * a block twice (a double free after a stale write), was corrupted by the
 * program; malloc reports that when it gets there, so the page is not
 * judged here. */
#define SM_LIST_CORRUPT SIZE_MAX
static size_t sm_list_len(const sm_page_t *page, sm_block_t *b, uint64_t *seen) {
  size_t n = 0;
  for (; b != NULL && n <= page->capacity; b = sm_dec(page, b->next), n++) {
    if (!sm_page_is_block(page, b)) return SM_LIST_CORRUPT;
    size_t i = (size_t)((uint8_t *)b - page->start) / page->block_size;
    if (seen[i / 64] & ((uint64_t)1 << (i % 64))) return SM_LIST_CORRUPT;
    seen[i / 64] |= (uint64_t)1 << (i % 64);
  }
  return n;
}

bool sm_page_valid(const sm_page_t *page) {
  sm_assert(page->in_use && page->capacity <= page->reserved && page->used <= page->capacity);
  /* used counts the free list's blocks (sm_page_t) */
  uint64_t seen[((1u << SM_MEDIUM_SHIFT) / 16 + 63) / 64] = {0};   /* a bit per block */
  size_t a = sm_list_len(page, page->free, seen), b = sm_list_len(page, page->local_free, seen);
  if (a == SM_LIST_CORRUPT || b == SM_LIST_CORRUPT) return true;
  /* after a reported misuse, lists cut off at a corrupted link hold fewer */
  return sm_errors_seen() ? b + page->used <= page->capacity
                          : b + page->used == page->capacity && a <= page->used;
}

/* ---- retire ------------------------------------------------------------- */

/* Retired pages sit on two lists of their heap, both under heap->lock:
 * heap->retired[bin] (warmest first, for reuse) and the expiry list
 * retired_first..last (for release).  They are on no page queue, so the
 * malloc fast path cannot reach them and another thread may release them. */

static void sm_retired_unlink_locked(sm_heap_t *heap, sm_page_t *page) {
  sm_page_queue_t *q = &heap->retired[page->bin];
  sm_gsub(retired_bytes, sm_page_bytes(page));
  if (page->prev) page->prev->next = page->next; else q->first = page->next;
  if (page->next) page->next->prev = page->prev; else q->last = page->prev;
  if (page->rprev) page->rprev->rnext = page->rnext; else heap->retired_first = page->rnext;
  if (page->rnext) page->rnext->rprev = page->rprev; else heap->retired_last = page->rprev;
  page->next = page->prev = page->rnext = page->rprev = NULL;
  page->retired = 0;
}

bool sm_heap_has_retired(sm_heap_t *heap) {
  sm_lock(&heap->lock);
  bool any = heap->retired_first != NULL;
  sm_unlock(&heap->lock);
  return any;
}

/* The earliest expiry among the heap's retired pages, recomputed under the
 * lock whenever the lists change (by the owner, trim or the purge thread),
 * so that the owner's slow path tests one field without the lock. */
static void sm_retired_note_expiry_locked(sm_heap_t *heap) {
  uint64_t e = heap->retired_first ? heap->retired_first->retire_expire : SM_NO_EXPIRY;
  atomic_store_explicit(&heap->next_expire, e, memory_order_relaxed);
}

/* The page's last block was freed (its blocks are all on local_free).
 * Keep it warm for its retire cycles, or release it now. */
void sm_page_retire(sm_heap_t *heap, sm_page_t *page) {
  sm_assert(page->used == 0 && page->free == NULL && !page->retired);
  sm_assert_expensive(sm_page_valid(page));
  size_t cycles = sm_retire_cycles_for(page->block_size);
  if (cycles == 0) { sm_page_release(heap, page); return; }
  sm_cnt_add(heap->stats.pages_retired, 1);
  SM_PROBE(page_retire, page->start, page->block_size);
  sm_page_fold_stats(heap, page);   /* nothing pending: anyone may release it */
  sm_pq_remove(heap, page->bin, page);
  page->retire_expire = heap->cycle + (uint32_t)cycles;
  sm_page_queue_t *q = &heap->retired[page->bin];
  uint64_t now = sm_clock_ms();
  sm_lock(&heap->lock);
  page->empty_since_ms = now;
  page->prev = NULL;
  page->next = q->first;
  if (q->first) q->first->prev = page; else q->last = page;
  q->first = page;
  sm_page_t *after = heap->retired_last;
  while (after && !sm_cycle_reached(page->retire_expire, after->retire_expire)) after = after->rprev;
  page->rprev = after;
  page->rnext = after ? after->rnext : heap->retired_first;
  if (page->rnext) page->rnext->rprev = page; else heap->retired_last = page;
  if (after) after->rnext = page; else heap->retired_first = page;
  page->retired = 1;
  sm_retired_note_expiry_locked(heap);
  /* worth a purge thread, whichever heaps hold them: 100 threads that
   * each retired 1 MiB and went idle kept 120 MiB resident for good when
   * each heap's own bytes were weighed */
  uint64_t bytes = sm_page_bytes(page);
  bool wake = sm_gadd(retired_bytes, bytes) + bytes >= SM_BG_THRESHOLD;
  /* checked before the lock goes: from then on another thread may take
   * the retired page and release it (sm_heap_claim_retired) */
  sm_assert_expensive(sm_page_state_ok(heap, page));
  sm_unlock(&heap->lock);
  if (wake) sm_background_wake();
}

/* Step 5: the warmest retired page of the class, taken off the retired
 * lists (the caller queues it). */
static sm_page_t *sm_page_take_retired(sm_heap_t *heap, size_t bin) {
  sm_lock(&heap->lock);
  sm_page_t *page = heap->retired[bin].first;
  if (page) {
    sm_retired_unlink_locked(heap, page);
    sm_retired_note_expiry_locked(heap);
  }
  sm_unlock(&heap->lock);
  return page;
}

/* Whether every block the page built is tagged free, as the counts say:
 * a block freed twice after a write over its tag (where free could not
 * tell) went on a list again and was counted twice, so the page looked
 * empty with one of its blocks still live, which would have gone to
 * another class or back to the OS with the page (probe: two blocks
 * freed, the first's tag overwritten and freed again, the rest of the
 * page freed but one, which the next class's blocks then overwrote).
 * Read in address order, one word a block (no list to follow), and only
 * where the page leaves its class: a program that frees its heap at exit
 * pays nothing, and a page that empties and fills again in its class
 * never hands that block out (it is on no list; malloc finds the block
 * freed twice where it comes off the list the second time). */
static bool sm_page_all_free(const sm_page_t *page) {
  const uint8_t *at = page->start;
  for (uint32_t i = 0; i < page->capacity; i++, at += page->block_size) {
    const sm_block_t *b = (const sm_block_t *)at;
    sm_track_link(b);
    if (sm_unlikely((b->tag ^ page->key) > SM_TAG_REMOTE)) return false;
  }
  return true;
}

/* An empty page on no queue leaves its class and its owner, on its way
 * back to its segment; any thread may do it, so no owner counter is
 * touched (the page's counts were folded).  False, with nothing done,
 * when a block came to its thread_free since it was found empty: every
 * block of it was free, so that one was freed twice (by another thread,
 * after the block was written over where free looks for its mark, or
 * racing the first free): reported, and the page is kept for good, on
 * no list, as a corrupted page is. */
bool sm_page_clear(sm_page_t *page) {
  sm_assert(!page->retired && sm_page_local_frees(page) == 0);
  sm_assert_expensive(sm_page_live(page) == 0);
  if (sm_unlikely(sm_tf_head(page, memory_order_acquire) != NULL || !sm_page_all_free(page))) {
    sm_page_corrupt(page, ": a block of it was freed twice", NULL);
    return false;
  }
  sm_page_class_count(page, -1);
  SM_PROBE(page_release, page->start, page->block_size);
  page->free = page->local_free = NULL;
  page->capacity = 0;
  sm_page_used_set(page, 0);
  /* no block of it is live: every free into it fails the block test and
   * is reported (sm_free_generic), also while it waits for its segment's
   * holder to take it home */
  page->limit = 0;
  sm_page_set_flags(page, 0, 0);
  atomic_store_explicit(&page->owner, NULL, memory_order_relaxed);
  return true;
}

/* Give an empty page that is on no queue back to its segment, under
 * heap->lock: at once when the heap holds the segment (which then stays
 * its while the lock is held), else through the holder (pool.c). */
static void sm_page_release_locked(sm_heap_t *heap, sm_page_t *page) {
  if (!sm_page_clear(page)) return;
  sm_segment_t *seg = sm_page_segment(page);
  if (atomic_load_explicit(&seg->heap, memory_order_relaxed) == heap) sm_segment_page_free_locked(heap, seg, page);
  else sm_page_send_home(page);
}

/* A vacant page's free list, which holds every block used counts
 * (sm_page_t), onto local_free: the page has the shape of one emptied by
 * free.  False when its lists turn out corrupted on the way (reported:
 * the page is kept for good). */
static bool sm_page_vacate(sm_page_t *page) {
  sm_assert_expensive(sm_page_live(page) == 0);
  sm_page_free_to_local(page);
  return sm_page_vacant_with(page, 0);
}

/* The owner gives an empty page back to its segment: from its queue or
 * from the retired lists.  False, with nothing done, when its lists turn
 * out corrupted (sm_page_vacate). */
bool sm_page_release(sm_heap_t *heap, sm_page_t *page) {
  if (!sm_page_vacate(page)) return false;
  sm_assert(!(atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_IN_FULL));
  if (!page->retired) {
    sm_pq_remove(heap, page->bin, page);
    sm_page_fold_stats(heap, page);
  }
  sm_lock(&heap->lock);
  if (page->retired) {
    sm_retired_unlink_locked(heap, page);
    sm_retired_note_expiry_locked(heap);
  }
  sm_page_release_locked(heap, page);
  sm_unlock(&heap->lock);
  sm_cnt_add(heap->stats.pages_released, 1);
  return true;
}

/* Under heap->lock: release the heap's retired pages, the expired ones or
 * (all) every one; returns how many.  Any thread: no owner counter moves. */
static uint64_t sm_release_retired_locked(sm_heap_t *heap, bool all) {
  uint64_t n = 0;
  sm_page_t *page;
  while ((page = heap->retired_first) != NULL &&
         (all || sm_cycle_reached(heap->cycle, page->retire_expire))) {
    sm_retired_unlink_locked(heap, page);
    sm_page_release_locked(heap, page);
    n++;
  }
  sm_retired_note_expiry_locked(heap);
  return n;
}

/* The owner takes the thread_free of a page of its class queues: its
 * gate shuts for the lists' change (pool.c) and, behind the first and
 * still holding blocks, opens again. */
static bool sm_page_take_thread_free(sm_heap_t *heap, sm_page_t *page) {
  sm_page_unpurge(page);
  bool vacant = sm_page_collect_vacant(page);
  if (!vacant) sm_pq_reopen(heap, page);
  return vacant;
}

/* Release retired pages whose cycles ran out; when forced, all of them
 * and every other empty page of the heap (thread_free collected first). */
void sm_heap_collect_retired(sm_heap_t *heap, bool force) {
  sm_lock(&heap->lock);
  uint64_t n = sm_release_retired_locked(heap, force);
  sm_unlock(&heap->lock);
  sm_cnt_add(heap->stats.pages_released, n);
  if (!force) return;
  sm_page_t *page;
  for (size_t bin = 1; bin < SM_BIN_COUNT; bin++) {
    for (page = heap->queues[bin].first; page; ) {
      sm_page_t *next = page->next;
      bool vacant = sm_tf_head(page, memory_order_relaxed) != NULL ? sm_page_take_thread_free(heap, page)
                                                                   : sm_page_vacant(page);
      if (vacant) sm_page_release(heap, page);
      page = next;
    }
  }
  n = 0;
  sm_lock(&heap->lock);   /* the full list's pages change under it */
  for (page = heap->queues[SM_BIN_FULL].first; page; ) {
    sm_page_t *next = page->next;
    if (sm_page_collect_vacant(page)) {
      sm_pq_remove(heap, SM_BIN_FULL, page);
      sm_page_fold_stats(heap, page);
      sm_page_release_locked(heap, page);
      n++;
    }
    page = next;
  }
  sm_unlock(&heap->lock);
  sm_cnt_add(heap->stats.pages_released, n);
}

/* Thread exit: every page of the full list back in its class's queue. */
void sm_heap_unfull_all(sm_heap_t *heap) {
  sm_page_t *page;
  sm_lock(&heap->lock);
  while ((page = heap->queues[SM_BIN_FULL].first) != NULL) sm_page_unfull_move(heap, page);
  sm_unlock(&heap->lock);
}

/* Another thread gives back the pages of the owner's full list whose
 * blocks other threads have all freed: trim, smalloc_collect(true), an
 * allocation the OS refused, the purge thread for an idle heap.  Without
 * it, memory that one thread allocated and others freed stays with the
 * first for as long as it does not allocate again.  The full list, and
 * the lists and counts of its pages, change under owner->lock (the owner
 * takes it at each move to or from the list and at each free into such a
 * page; the fast paths never touch one).
 *
 * It learns of those pages from the notices (blocks handed over to the
 * owner's xdelayed, sm_page_to_full): a page on the full list is free
 * when its blocks in use are those on its thread_free plus its notices
 * on the list taken.  A page with blocks still out keeps one notice,
 * handed back so that its owner learns of the room when it calls in, and
 * is armed again (SM_TF_FULL): the next free into it sends a new notice.
 * From then on every notice into the owner's pages wakes the purge
 * thread (xwatch), not only the SM_BG_NOTICES-th, until the owner takes
 * them itself.  Without that, a page whose last blocks were freed after
 * the purge thread looked (a consumer slower than its rounds, or held up)
 * would wait for its idle owner forever, and so would the pages noticed
 * after the thread exited, fewer than SM_BG_NOTICES.  A page armed
 * again has two notices on the next list; the extra ones go onto its
 * local_free as the owner would take them (sm_page_take_notice).
 * Counted in the caller's heap, the page's pending counts too; returns
 * the pages given back. */
enum {
  SM_CLAIM_DECIDED = 1u << 31,   /* claim_notices: the page's first notice was seen */
  SM_CLAIM_FREE = 1u << 30,      /* ... and every block of it is free */
  SM_CLAIM_LEFT = SM_CLAIM_FREE - 1,
};

static bool sm_page_on_full_list_of(const sm_heap_t *heap, const sm_page_t *page) {
  return atomic_load_explicit(&page->owner, memory_order_relaxed) == heap &&
         (atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_IN_FULL);
}

static void sm_page_take_notice(sm_page_t *page, sm_block_t *b);

uint64_t sm_heap_claim_full(sm_heap_t *owner, sm_heap_t *self) {
  sm_block_t *list = atomic_load_explicit(&owner->xdelayed, memory_order_relaxed);
  if (list == NULL || list == SM_XDELAYED_CLOSED) return 0;
  /* the count first: a notice that comes between is counted and taken */
  atomic_store_explicit(&owner->xnotices, 0, memory_order_relaxed);
  while (list != NULL && list != SM_XDELAYED_CLOSED &&
         !atomic_compare_exchange_weak_explicit(&owner->xdelayed, &list, NULL, memory_order_acquire,
                                                memory_order_relaxed)) {
  }
  if (list == NULL || list == SM_XDELAYED_CLOSED) return 0;
  sm_block_t *back = NULL, *back_tail = NULL;
  uint64_t n = 0;
  uint32_t nback = 0;
  sm_lock(&owner->lock);
  /* watched before any page is armed */
  atomic_store_explicit(&owner->xwatch, 1, memory_order_relaxed);
  /* each page's notices: those of the owner's full list (no other heap
   * touches the count of such a page, nor moves it, without this lock) */
  for (sm_block_t *b = list; b; b = (sm_block_t *)((uintptr_t)b->next ^ sm_secret)) {
    sm_page_t *page = sm_segment_page_of(sm_ptr_segment(b), b);
    if (sm_page_on_full_list_of(owner, page) &&
        !(atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_CORRUPT))
      atomic_store_explicit(&page->claim_notices,
                            atomic_load_explicit(&page->claim_notices, memory_order_relaxed) + 1,
                            memory_order_relaxed);
  }
  for (sm_block_t *b = list, *next; b; b = next) {
    next = (sm_block_t *)((uintptr_t)b->next ^ sm_secret);
    sm_page_t *page = sm_segment_page_of(sm_ptr_segment(b), b);
    uint32_t c = sm_page_on_full_list_of(owner, page)
                     ? atomic_load_explicit(&page->claim_notices, memory_order_relaxed) : 0;
    bool keep = false;
    if (c == 0) {
      keep = true;   /* not on the full list (or corrupted): the owner sorts it out */
    } else if (!(c & SM_CLAIM_DECIDED)) {
      /* armed first: a block freed after this is noticed, one before it
       * is counted in v */
      uintptr_t v = atomic_fetch_or_explicit(&page->thread_free, SM_TF_FULL, memory_order_acq_rel);
      bool free = sm_page_live(page) == sm_tf_count(v) + c;
      if (free && !(v & SM_TF_FULL))
        atomic_fetch_and_explicit(&page->thread_free, ~SM_TF_FULL, memory_order_relaxed);
      keep = !free;   /* the one notice handed back */
      c |= SM_CLAIM_DECIDED | (free ? SM_CLAIM_FREE : 0);
    }
    if (keep) {
      b->next = (sm_block_t *)((uintptr_t)back ^ sm_secret);
      back = b;
      if (!back_tail) back_tail = b;
      nback++;
    } else {
      sm_page_take_notice(page, b);
    }
    if (c == 0) continue;
    c--;   /* this notice done */
    atomic_store_explicit(&page->claim_notices, (c & SM_CLAIM_LEFT) ? c : 0, memory_order_relaxed);
    if ((c & SM_CLAIM_LEFT) || !(c & SM_CLAIM_FREE)) continue;
    /* the page's last notice, and every block free: give it back */
    sm_pq_remove(owner, SM_BIN_FULL, page);
    sm_page_collect_thread_free(page);
    if (!sm_page_vacate(page)) continue;   /* kept for good, on no list */
    sm_page_fold_stats(self, page);   /* into the caller's counts */
    sm_page_release_locked(owner, page);
    n++;
  }
  sm_unlock(&owner->lock);
  atomic_store_explicit(&owner->xkept, nback, memory_order_relaxed);
  /* the other notices go back to the owner, or to their pages if it
   * exited meanwhile */
  if (back && !sm_heap_hand_over(owner, back, back_tail, nback)) {
    back_tail->next = (sm_block_t *)sm_secret;   /* the chain ends there */
    for (sm_block_t *b = back, *next; b; b = next) {
      next = (sm_block_t *)((uintptr_t)b->next ^ sm_secret);
      sm_segment_t *seg = sm_ptr_segment(b);
      sm_free_push_remote(sm_segment_page_of(seg, b), b);
    }
  }
  if (n == 0) return 0;
  SM_COUNT(self, pages_released, n);
  SM_COUNT(self, pages_claimed, n);
  return n;
}

/* Give back the memory of free pages in the heap's segments: those free
 * for at least the purge delay, or (all) every one; returns whether a
 * free page still waits for its delay.  Any thread. */
bool sm_heap_decommit(sm_heap_t *heap, bool all) {
  sm_lock(&heap->lock);
  uint64_t now = sm_clock_ms();   /* after the lock: pages freed meanwhile are older */
  uint64_t delay = all ? 0 : sm_purge_delay(now);
  bool waiting = sm_segment_decommit_free_locked(heap, now, delay);
  sm_unlock(&heap->lock);
  return waiting;
}

/* Another thread (trim, smalloc_collect(true), an allocation the OS
 * refused) releases every retired page of the owner's heap, whether the
 * owner is busy, idle or blocked.  Counted in the caller's heap. */
void sm_heap_claim_retired(sm_heap_t *owner, sm_heap_t *self) {
  sm_lock(&owner->lock);
  uint64_t n = sm_release_retired_locked(owner, true);
  sm_unlock(&owner->lock);
  if (n == 0) return;
  SM_COUNT(self, pages_released, n);
  SM_COUNT(self, pages_claimed, n);
}

/* The purge thread, for a heap whose thread is not idle: release the
 * retired pages that have waited for the purge delay.  Retired pages
 * expire after their thread's slow-path cycles; a thread that takes a
 * slow path now and then (a server between rare requests, a program
 * that samples something every 100 ms) would keep a burst's pages for
 * minutes, and never look idle to the purge thread either.  Counted in
 * the caller's heap, as a claim. */
void sm_heap_release_stale(sm_heap_t *owner, sm_heap_t *self, uint64_t now, uint64_t delay) {
  uint64_t n = 0;
  sm_lock(&owner->lock);
  for (sm_page_t *page = owner->retired_first; page;) {
    sm_page_t *next = page->rnext;
    if (now - page->empty_since_ms >= delay) {
      sm_retired_unlink_locked(owner, page);
      sm_page_release_locked(owner, page);
      n++;
    }
    page = next;
  }
  if (n) sm_retired_note_expiry_locked(owner);
  sm_unlock(&owner->lock);
  if (n == 0) return;
  SM_COUNT(self, pages_released, n);
  SM_COUNT(self, pages_claimed, n);
}

/* Move a page's free list onto local_free, so the page has the shape of
 * one emptied by free (free == NULL).  The free list is walked whole to
 * count it (sm_free_list_walk), and the tail found on the way joins the
 * lists with no other walk: local_free goes behind it, or it right
 * behind local_free's head, whichever head the owner's frees went on:
 * that head is the block freed last, and freeing it again after a write
 * over its tag is caught only there (sm_free_owner_push).  A list the
 * walk stops short of its end is cut there
 * (reported: the page is kept for good), so that what moves is what used
 * is lowered by (the blocks past the cut stay in it, as in use). */
void sm_page_free_to_local(sm_page_t *page) {
  if (!sm_page_has_free(page)) return;
  sm_block_t *a = page->free, *b = page->local_free, *tail, *past;
  uint32_t n = sm_free_list_walk(page, page->used, &tail, &past);
  if (sm_unlikely(past != NULL)) {
    sm_page_corrupt(page, "", NULL);
    if (n == 0) {   /* the head itself */
      page->free = NULL;
      return;
    }
    tail->next = sm_enc(page, NULL);
  }
  sm_page_used_set(page, page->used - n);   /* on local_free, they leave used (sm_page_t) */
  page->free = NULL;
  if (b == NULL || sm_page_free_to(page) == SM_FREE_TO_FREE) {
    tail->next = sm_enc(page, b);
    page->local_free = a;
  } else {
    sm_track_link(b);
    tail->next = b->next;
    b->next = sm_enc(page, a);
  }
}

/* Housekeeping, every SM_SWEEP_CYCLES slow-path entries: pages of the
 * queues that emptied without the free fast path seeing it are retired
 * here, so they expire and go back like any other:
 *   - a page whose free list was never all handed out;
 *   - a page behind the first of its class whose blocks other threads
 *     freed, all of them: the owner walks to it only when the pages before
 *     it run dry, and meanwhile it held memory nobody could use (with many
 *     threads per core, most of the pages of a program that frees across
 *     threads).  Its thread_free is taken only when that empties it, so a
 *     sweep walks no list that stays.
 * The first page of a class is the one the class allocates from.  It is
 * not examined when the class's slow path ran since the last sweep, nor
 * when the head of its free list is not the one the last sweep saw (a
 * malloc or a free changed it since): whether a page with a free list is
 * vacant takes a walk of the whole list, a cache miss per block, and a
 * class that its first page served on the fast path alone had it walked
 * at every sweep.  larson (mimalloc-bench, 8 threads, 8-1000 bytes)
 * walked 30,930 first pages, 64 blocks each, in 3 s; the walk's share of
 * perf's samples fell from 2.15 % to 0.26 %.  An idle class's first page
 * is examined by the second sweep after its last malloc or free at the
 * latest. */
#define SM_SWEPT_ACTIVE ((const sm_block_t *)1)   /* no block's address */
static size_t sm_heap_sweep(sm_heap_t *heap) {
  size_t visited = 0;
  for (size_t bin = 1; bin < SM_BIN_COUNT; bin++) {
    sm_page_t *first = heap->queues[bin].first;
    const sm_block_t *head = first ? first->free : NULL;
    bool active = head != heap->swept_head[bin];
    heap->swept_head[bin] = head;
    for (sm_page_t *page = first; page; visited++) {
      sm_page_t *next = page->next;
      if (!(active && page == first)) {
        uintptr_t tf = atomic_load_explicit(&page->thread_free, memory_order_relaxed);
        if (sm_tf_ptr(page, tf) != NULL && sm_tf_count(tf) == sm_page_live(page)) sm_page_take_thread_free(heap, page);
        if (sm_page_vacant(page) && sm_tf_head(page, memory_order_relaxed) == NULL) {
          sm_page_unpurge(page);
          if (sm_page_vacate(page)) sm_page_retire(heap, page);
          else sm_pq_reopen(heap, page);
        }
      }
      page = next;
    }
  }
  return visited;
}

/* ---- flags --------------------------------------------------------------- */

/* The page-state facts and their one source each (--enable-debug checks
 * that the copies agree after every transition):
 *   on the full list      flags & SM_PAGE_IN_FULL (sm_page_to_full,
 *                         sm_page_unfull_locked), under heap->lock with
 *                         the full list itself; bit 0 of xtid is its copy
 *                         for free's one compare
 *   owner                 page->owner (NULL in the pool); xtid caches it
 *   segment holder        seg->heap (NULL while abandoned)
 *   retired               page->retired, with membership of the heap's
 *                         retired lists (heap->lock)
 *   others may purge it   page->purge_gate, open only behind the first of
 *                         its class (sm_pq_push_*, sm_page_unpurge)
 * SM_TF_FULL is not a copy: it asks the first other thread that frees
 * into the page to hand its block over, and that thread clears it. */
static bool sm_page_state_ok(const sm_heap_t *heap, const sm_page_t *page) {
  uint8_t flags = atomic_load_explicit(&page->flags, memory_order_relaxed);
  uintptr_t xtid = atomic_load_explicit(&page->xtid, memory_order_relaxed);
  bool full = (flags & SM_PAGE_IN_FULL) != 0;
  if (xtid != 0 && ((xtid & 1) != full || (xtid & ~(uintptr_t)1) != sm_heap_owner_id(heap))) return false;
  if (xtid == 0 && !(flags & SM_PAGE_SLOW_FREE)) return false;
  if (atomic_load_explicit(&page->owner, memory_order_relaxed) != heap) return false;
  if (page->retired && (full || page->used != 0 || page->free != NULL)) return false;
  /* the page it allocates from is its own alone (pool.c) */
  if (heap->queues[page->bin].first == page &&
      atomic_load_explicit(&page->purge_gate, memory_order_relaxed) != SM_GATE_SHUT)
    return false;
  return page->in_use;
}

/* Flags and xtid change together (owner thread only): xtid is the owner's
 * thread id unless a flag needs every free out of line, so free's fast
 * path needs one compare.  Sequentially consistent: see sm_page_to_full. */
static void sm_page_store_flags(sm_page_t *page, uint8_t flags, uintptr_t tid, memory_order mo) {
  bool slow = (flags & SM_PAGE_SLOW_FREE) != 0 || tid == 0;
  if (slow) atomic_store_explicit(&page->xtid, 0, mo);
  atomic_store_explicit(&page->flags, flags, mo);
  if (!slow) atomic_store_explicit(&page->xtid, tid | ((flags & SM_PAGE_IN_FULL) ? 1 : 0), mo);
}

void sm_page_set_flags(sm_page_t *page, uint8_t flags, uintptr_t tid) {
  sm_page_store_flags(page, flags, tid, memory_order_seq_cst);
}

/* The profiler's flag (prof.c), set by the owner as it samples a block of
 * the page and cleared by the owner once none is live: the same stores as
 * sm_page_set_flags, release ones (a locked instruction each on x86-64,
 * four a sample, where these are plain moves).  Nothing depends on the
 * order of this change against another thread's stores, as the full
 * list's does (sm_page_to_full): a free of a sampled block is ordered
 * after the flag by the program's own hand-over of the block, and a free
 * of another block that sees the state before is right either way
 * (sm_free_flagged, sm_free_generic). */
void sm_page_set_sampled(sm_page_t *page, sm_heap_t *heap, bool on) {
  uint8_t flags = atomic_load_explicit(&page->flags, memory_order_relaxed);
  flags = on ? flags | SM_PAGE_SAMPLED : flags & ~SM_PAGE_SAMPLED;
  sm_page_store_flags(page, flags, sm_heap_owner_id(heap), memory_order_release);
}

/* A page's owner (NULL: the pool) and its copy for free, off the full
 * list: the flags that send frees out of line stay, the full bits go. */
void sm_page_set_owner(sm_page_t *page, sm_heap_t *heap) {
  atomic_store_explicit(&page->owner, heap, memory_order_relaxed);
  sm_page_set_flags(page, atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_SLOW_FREE &
                    ~SM_PAGE_ORPHAN, heap ? sm_heap_owner_id(heap) : SM_XTID_POOLED);
  atomic_fetch_and_explicit(&page->thread_free, ~SM_TF_FULL, memory_order_relaxed);
}

/* ---- full pages ------------------------------------------------------------ */

/* Move an exhausted page to the full list; false when blocks arrived
 * meanwhile and the page stays.  The full bit goes into the
 * thread_free word with one atomic operation that also shows whether a
 * block arrived meanwhile: either we see that block here (and keep the
 * page), or the first later free from another thread sees the bit, clears
 * it and hands its block to the heap's xdelayed list (free.c), which the
 * owner takes on its next slow path: one notice per page, no scan. */
bool sm_page_to_full(sm_heap_t *heap, sm_page_t *page) {
  uintptr_t v = atomic_fetch_or_explicit(&page->thread_free, SM_TF_FULL, memory_order_acq_rel);
  if (sm_tf_ptr(page, v) != NULL) {
    atomic_fetch_and_explicit(&page->thread_free, ~SM_TF_FULL, memory_order_relaxed);
    return false;
  }
  uint8_t flags = atomic_load_explicit(&page->flags, memory_order_relaxed);
  sm_pq_remove(heap, page->bin, page);
  sm_lock(&heap->lock);
  sm_page_set_flags(page, flags | SM_PAGE_IN_FULL, sm_heap_owner_id(heap));
  sm_pq_push_back(heap, SM_BIN_FULL, page);
  sm_assert_expensive(sm_page_state_ok(heap, page));
  sm_unlock(&heap->lock);
  /* from here on the page may be claimed (sm_heap_claim_full): not
   * touched again */
  sm_cnt_add(heap->stats.pages_full, 1);
  return true;
}

/* Under heap->lock: a page of the full list goes back to its class's
 * queue (the owner only). */
static void sm_page_unfull_move(sm_heap_t *heap, sm_page_t *page) {
  sm_page_set_owner(page, heap);
  sm_pq_remove(heap, SM_BIN_FULL, page);
  sm_pq_push_back(heap, page->bin, page);
  sm_assert_expensive(sm_page_state_ok(heap, page));
}

/* Under heap->lock: the same after a free into the page, counted. */
void sm_page_unfull_locked(sm_heap_t *heap, sm_page_t *page) {
  if (!(atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_IN_FULL)) return;
  sm_page_unfull_move(heap, page);
  sm_cnt_add(heap->stats.pages_unfull, 1);
}

/* How many of its blocks the owner frees into a page of its full list
 * before the page goes back to its class's queue: SM_WAKE_BLOCKS, or a
 * sixteenth of the page when that is fewer (at least one), so that no
 * more of a full page than that waits unused (and the page is back
 * before its last block is freed, so it retires as ever).  Back at the
 * first free, a page among thousands whose blocks are freed at random
 * gave malloc a block or two and was full again: bench_longlived 1e7
 * entered the slow path at three of five mallocs (3.0 million next-page
 * steps, as many moves to and from the full list), against 0.23 million
 * with 16.  The OS refusing memory and trim take every page with a
 * block freed (sm_heap_wake_full).  Blocks other threads free bring a
 * page back at their first batch (the owner learns of those only then). */
#define SM_WAKE_BLOCKS 16

static bool sm_page_wakes(const sm_page_t *page) {
  uint32_t want = page->capacity / 16;
  if (want > SM_WAKE_BLOCKS) want = SM_WAKE_BLOCKS;
  if (want == 0) want = 1;
  return sm_page_free_at_least(page, want);
}

/* Under heap->lock: the owner freed a block into a page of its full list
 * (on its local_free). */
void sm_page_owner_freed_locked(sm_heap_t *heap, sm_page_t *page) {
  if (sm_page_wakes(page)) sm_page_unfull_locked(heap, page);
}

/* Every page of the full list that its owner freed blocks into goes back
 * to its class's queue, however few: the OS refused memory, or trim was
 * asked for.  The owner only. */
void sm_heap_wake_full(sm_heap_t *heap) {
  sm_lock(&heap->lock);
  for (sm_page_t *page = heap->queues[SM_BIN_FULL].first, *next; page; page = next) {
    next = page->next;
    if (sm_page_free_at_least(page, 1)) sm_page_unfull_locked(heap, page);
  }
  sm_unlock(&heap->lock);
}

/* Under the owner's lock: a block another thread freed into the page
 * and handed over (tagged, and counted by that thread) goes on its
 * local_free.  Like a collected thread_free block, it leaves used and the
 * fold's baseline together. */
static void sm_page_take_notice(sm_page_t *page, sm_block_t *b) {
  sm_track_link(b);
  b->next = sm_enc(page, page->local_free);
  page->local_free = b;
  page->xfreed = 1;
  if (sm_likely(page->used > 0)) {   /* 0: only in a page found corrupted */
    sm_page_used_set(page, page->used - 1);
    page->used_folded--;
  }
}

/* The owner takes back a handed-over block; the page comes back from the
 * full list with what else other threads freed into it, and retires if
 * that empties it. */
void sm_page_free_delayed(sm_heap_t *heap, sm_page_t *page, sm_block_t *b) {
  sm_page_unpurge(page);   /* its lists change: its gate shuts (pool.c) */
  sm_lock(&heap->lock);   /* the page may be on the full list */
  sm_page_take_notice(page, b);
  bool had_free = page->free != NULL;   /* none when it comes from the full list */
  /* the rest of that thread's batch, often; on the free list when the
   * page had none, and those are all it has then (not walked to count) */
  uint32_t onto_free = sm_page_collect_thread_free(page);
  sm_page_unfull_locked(heap, page);   /* behind the first of its class: its gate opens */
  sm_unlock(&heap->lock);
  if (sm_page_vacant_after_collect(page, had_free, onto_free)) {
    sm_page_unpurge(page);
    if (sm_page_vacate(page)) sm_page_retire(heap, page);
    else sm_pq_reopen(heap, page);
  }
}

/* Whether a link of a hand-over list leads to a block handed over: a
 * block start of a size class's page in use, tagged as on its way back.
 * The links sit in the first word of freed blocks, where a write after
 * the free lands: followed as they were, one such write sent the owner
 * to an address outside its heap (SIGBUS). */
static bool sm_delayed_link_ok(sm_block_t *b, sm_page_t **pagep) {
  sm_segment_t *seg;
  sm_page_t *page;
  if (!sm_lookup(b, &seg, &page) || seg->kind >= SM_SEG_SPAN || !sm_page_is_block(page, b)) return false;
  sm_track_link(b);
  if (b->tag != (page->key ^ SM_TAG_REMOTE)) return false;
  *pagep = page;
  return true;
}

/* The blocks of a hand-over list go home: each to its page, the owner's
 * or its thread_free.  A link that leads elsewhere is reported as its
 * block's page's corruption, and the rest of the list dropped (leaked:
 * their pages keep them as in use). */
static void sm_heap_take_delayed(sm_heap_t *heap, sm_block_t *b) {
  sm_page_t *page = b ? sm_segment_page_of(sm_ptr_segment(b), b) : NULL;
  while (b != NULL) {
    sm_track_link(b);
    sm_block_t *next = (sm_block_t *)((uintptr_t)b->next ^ sm_secret);
    sm_page_t *next_page = NULL;
    if (next != NULL && sm_unlikely(!sm_delayed_link_ok(next, &next_page))) {
      sm_page_corrupt(page, ": block ", b);
      next = NULL;
    }
    if (atomic_load_explicit(&page->owner, memory_order_relaxed) == heap) sm_page_free_delayed(heap, page, b);
    else sm_free_push_remote(page, b);
    b = next;
    page = next_page;
  }
}

/* Take the blocks other threads handed over (see sm_page_to_full).  A
 * block whose page is no longer this heap's (given to the pool since, or
 * the list outlived an owner: heaps are reused) goes to its page's
 * thread_free instead. */
void sm_heap_collect_delayed(sm_heap_t *heap) {
  if (atomic_load_explicit(&heap->xdelayed, memory_order_relaxed) == NULL) return;
  atomic_store_explicit(&heap->xnotices, 0, memory_order_relaxed);
  atomic_store_explicit(&heap->xwatch, 0, memory_order_relaxed);   /* its owner takes them */
  sm_heap_take_delayed(heap, atomic_exchange_explicit(&heap->xdelayed, NULL, memory_order_acquire));
}

/* Thread exit: take the last blocks and close the list; hand-overs that
 * still come go to their pages' thread_free (free.c). */
void sm_heap_close_delayed(sm_heap_t *heap) {
  atomic_store_explicit(&heap->xwatch, 0, memory_order_relaxed);
  sm_heap_take_delayed(heap, atomic_exchange_explicit(&heap->xdelayed, SM_XDELAYED_CLOSED, memory_order_acquire));
}

/* ---- pages shared with the process (pool.c) ----------------------------- */

/* Whether an exhausted page goes to the pool rather than to the full
 * list: when other threads live and have freed blocks of it.  Its blocks
 * come back from anywhere, so any thread may as well allocate from it
 * once they have, and the heaps' surges share pages rather than each
 * keeping the most it ever used (bench_xchurn 64: resident 2.2 times the
 * live bytes with full lists, 1.45 with the pool).  A page only its owner
 * frees into stays: its frees are local and cheapest there, and a
 * program whose other threads are idle keeps its own pages (giving them
 * away made a single thread's build-then-free 1.2 and random replacement
 * 1.8 times slower: its frees became remote ones). */
static bool sm_page_shares(const sm_page_t *page) {
  return page->xfreed && atomic_load_explicit(&sm_heaps_live, memory_order_relaxed) > 1 &&
         !(atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_CORRUPT);
}

/* The owner gives a page with live blocks to the process: off its
 * class's queue, counts folded, ownerless, on the pool of its class for
 * any thread to take.  Its lists go with it.  An orphan (its owner
 * exits) goes to the first thread that frees into it, or takes it from
 * the pool (sm_page_claim). */
void sm_page_donate(sm_heap_t *heap, sm_page_t *page, bool orphan) {
  sm_assert(!page->retired && atomic_load_explicit(&page->owner, memory_order_relaxed) == heap);
  sm_assert(!(atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_IN_FULL));
  /* in the pool, used is exact: the slow path gives a page whose lists
   * ran dry, thread exit one it took the free list of */
  sm_assert(page->free == NULL);
  sm_pq_remove(heap, page->bin, page);
  sm_page_fold_stats(heap, page);
  sm_page_set_owner(page, NULL);
  if (orphan)
    sm_page_set_flags(page, atomic_load_explicit(&page->flags, memory_order_relaxed) | SM_PAGE_ORPHAN, 0);
  sm_pool_push(page);
  sm_cnt_add(heap->stats.pages_abandoned, 1);
}

/* A page taken off the pool becomes the heap's, at the front of its
 * class's queue, with the blocks other threads freed into it.
 *
 * Whether those blocks make it shared again once it is exhausted
 * (sm_page_shares) depends on how many it holds.  A page of fewer than
 * SM_RESHARE_BLOCKS blocks (a 16th of it fewer than 16: blocks over 256
 * bytes in a 64 KiB page, over 2 KiB in a 512 KiB one) is taken with a
 * handful of blocks free and exhausted a handful of mallocs later; given
 * again at once, it went round the pool every few mallocs, and the frees
 * of the thread whose blocks fill it became remote ones for good.
 * mimalloc-bench's larson at 16 threads (workers that come and go, blocks
 * of 8-1000 bytes) gave 2.7 million pages to the pool in a run of 5 s and
 * took 1.6 times mimalloc 3.4.3's time.  Such a page is shared again only
 * if other threads free into it while this heap holds it: 31,000 pages
 * given, 1.00 times mimalloc 3.4.3's time (medians of 5 interleaved runs).
 * A page of many blocks serves many mallocs a turn, and the frees it
 * waited for say that other threads free into it (bench_xchurn 64:
 * resident 2.1 times the live bytes when they did not count, 1.35 as they
 * do). */
#define SM_RESHARE_BLOCKS 256
static void sm_page_take_over(sm_heap_t *heap, sm_page_t *page) {
  sm_page_set_owner(page, heap);
  sm_cnt_add(heap->stats.pages_reclaimed, 1);
  sm_page_collect_thread_free(page);
  if (page->reserved < SM_RESHARE_BLOCKS) page->xfreed = 0;
  sm_page_t *second = heap->queues[page->bin].first;
  sm_pq_push_front(heap, page->bin, page);
  /* the page it puts second may have emptied while it was first: it
   * retires now, as it would have if it had emptied second */
  if (second && sm_page_vacant(second)) sm_page_retire(heap, second);
}

/* A page of the class from the pool with at least SM_ADOPT_MIN blocks
 * free and an SM_ADOPT_PART-th of its blocks (or all), made the heap's,
 * at the front of its queue; NULL when the pool has none.  Each page
 * taken costs the pool's lock twice and its owner's change, and the
 * frees its former owner still makes into it become remote ones; a page
 * taken with a few blocks free is soon exhausted and given again.  With
 * 8 blocks alone (an 8th of a 256-byte page, a 512th of a 16-byte one),
 * bench_xchurn 64 moved 104,000-151,000 pages a run; with a 16th of the
 * page too, 52,000-90,000, in 0.95 times the time (medians of 7
 * interleaved runs, twice), resident 1.32 against 1.31 times the live
 * bytes.  An 8th was faster still (0.91) but kept 1.36 times the live
 * bytes at 64 threads and 2.84 against 2.62 at 256 (a 16th: 2.61),
 * where threads carved fresh pages rather than take sparse ones.  With
 * 1 block, a page taken gave a block or two before it went back (0.66 s
 * in a single run, when 8 blocks took 0.42 s). */
#define SM_ADOPT_MIN 8
#define SM_ADOPT_PART 16
static sm_page_t *sm_page_adopt(sm_heap_t *heap, size_t bin) {
  sm_page_t *page;
  while ((page = sm_pool_pop(bin, SM_ADOPT_MIN, SM_ADOPT_PART)) != NULL) {
    sm_page_take_over(heap, page);
    if (sm_page_has_free(page) || sm_page_refill(page, true) >= 0) {
      sm_assert_expensive(sm_page_valid(page) && sm_page_state_ok(heap, page));
      return page;
    }
    sm_page_to_full(heap, page);
  }
  return NULL;
}

/* A free into an orphan (a page its owner left in the pool at exit) by
 * a thread with a heap: the page becomes that heap's, at the front of
 * its class's queue, so that the frees that follow are local ones, while
 * the heap holds fewer than SM_CLAIM_MAX pages of the class, queued or
 * retired (so that a thread that frees much and allocates little of a
 * class does not keep many of its pages from the rest: claimed pages
 * that emptied and retired let it claim 1.4-1.8 GB in a probe whose
 * threads came and went, when only its queues were counted).  A thread
 * that takes over an exited thread's blocks (mimalloc-bench's larson, a
 * server whose worker threads come and go) otherwise freed every one
 * into a page nobody owned, batched and pushed with a CAS each time a
 * batch was sent, and the pages went back and forth between the heaps and the pool: larson
 * 2.5 times mimalloc 3.4.3's time (with the claim, bounds of 4, 8 and
 * none: 62-100, 73-99 and 80-108 M operations a second, 28-36, 32-35 and
 * 28-34 MB peak resident).  Returns whether the page was taken (not if
 * another thread took it first, or it is not in the pool yet). */
#define SM_CLAIM_MAX 8
bool sm_page_claim(sm_heap_t *heap, sm_page_t *page) {
  unsigned n = 0;
  for (const sm_page_t *q = heap->queues[page->bin].first; q && n < SM_CLAIM_MAX; q = q->next) n++;
  if (n == SM_CLAIM_MAX) return false;   /* the common case once it holds them: no lock */
  sm_lock(&heap->lock);   /* the purge thread releases retired pages */
  for (const sm_page_t *q = heap->retired[page->bin].first; q && n < SM_CLAIM_MAX; q = q->next) n++;
  sm_unlock(&heap->lock);
  if (n == SM_CLAIM_MAX || !sm_pool_take(page)) return false;
  sm_page_take_over(heap, page);
  page->xfreed = 0;   /* what others freed before is the claimer's to free now */
  sm_assert_expensive(sm_page_valid(page) && sm_page_state_ok(heap, page));
  return true;
}

/* Take one abandoned segment of the kind: its free pages are the heap's
 * to carve (its pages in use are other heaps' or the pool's).  Returns
 * whether a segment was taken. */
static bool sm_heap_reclaim_one(sm_heap_t *heap, int kind) {
  if (!sm_segment_reclaim_one(heap, kind)) return false;
  sm_cnt_add(heap->stats.segments_reclaimed, 1);
  return true;
}

/* Reclaim every abandoned segment (trim, smalloc_collect(true)). */
void sm_heap_reclaim_all(sm_heap_t *heap) {
  while (sm_heap_reclaim_one(heap, SM_SEG_SMALL) || sm_heap_reclaim_one(heap, SM_SEG_MEDIUM)) {
  }
}

/* ---- the slow path ---------------------------------------------------------- */

static void sm_count_step(sm_heap_t *heap, size_t bin, int step) {
  sm_cnt_add(heap->stats.class_steps[bin][step], 1);
  SM_PROBE(slow_path, step, sm_bin_size(bin));
  if (step != SMALLOC_STEP_LOCAL_SWAP) sm_prof_event(step);
}

/* Whether the page has a block to hand out.  A free-list head outside the
 * page's segment was written by the program (a use after free): report it
 * and leak the rest of the list rather than follow it. */
/* A corrupted free list found in the owner's page: report it; from now
 * on the page is never emptied (its used count may be wrong: a block
 * freed twice is counted twice) and every free of it goes out of line. */
void sm_page_corrupt(sm_page_t *page, const char *what, const void *b) {
  if (b) sm_error("corrupted free list in page at %p%s%p%s", (void *)page->start, what, b,
                  " was written after its free (or freed twice)");
  else sm_error("corrupted free list in page at %p%s", (void *)page->start, what);
  uint8_t flags = atomic_load_explicit(&page->flags, memory_order_relaxed);
  sm_heap_t *owner = atomic_load_explicit(&page->owner, memory_order_relaxed);
  if (!(flags & SM_PAGE_CORRUPT))
    sm_page_set_flags(page, flags | SM_PAGE_CORRUPT, owner ? sm_heap_owner_id(owner) : SM_XTID_POOLED);
}

bool sm_page_has_free(sm_page_t *page) {
  sm_block_t *b = page->free;
  if (b == NULL) return false;
  if (sm_unlikely(!sm_page_link_ok(page, b))) {
    page->free = NULL;
    sm_page_corrupt(page, "", NULL);
    return false;
  }
  sm_track_link(b);
  if (sm_unlikely((b->tag ^ page->key) > SM_TAG_REMOTE ||
                  (SM_CANARY && !sm_track_on() && !sm_poison_ok(page, b)))) {
    /* not tagged free: handed out already and on the list again (freed
     * twice after its tag was overwritten), or written after its free
     * (the secure build also checks the pattern after the tag); the rest
     * of the list is dropped (leaked) */
    page->free = NULL;
    sm_page_corrupt(page, ": block ", b);
    return false;
  }
  return true;
}

/* Make the page's free list non-empty by steps 1-3 (3 only if
 * may_extend); returns the step or -1. */
static int sm_page_refill(sm_page_t *page, bool may_extend) {
  /* local_free becomes the free list: used counts every block then */
  if (page->local_free) {
    page->free = page->local_free;   /* both lists use the page's key */
    page->local_free = NULL;
    sm_page_used_set(page, page->capacity);
    return SMALLOC_STEP_LOCAL_SWAP;
  }
  if (sm_tf_head(page, memory_order_relaxed) != NULL) {
    sm_page_collect_thread_free(page);
    page->free = page->local_free;
    page->local_free = NULL;
    sm_page_used_set(page, page->capacity);
    return SMALLOC_STEP_THREAD_COLLECT;
  }
  if (may_extend && page->capacity < page->reserved) {
    sm_page_extend(page);
    return SMALLOC_STEP_EXTEND;
  }
  return -1;
}

/* The periodic part of the slow path: this thread's batched frees for
 * other heaps sent (at every SM_XBUF_BEATS-th entry), blocks other
 * threads sent or handed over taken (one load each when there are none),
 * expired retired pages when one is due, and every SM_SWEEP_CYCLES (or
 * the retire cycles, when fewer) the sweep and the segment cache's
 * purge. */
#define SM_SWEEP_CYCLES 1024

/* The periodic work that is not counted in cycles: this thread's batched
 * frees for other heaps sent (every SM_XBUF_BEATS-th entry), the blocks
 * other threads handed over or sent home taken, a report that came due
 * asked for, the purge thread woken for the segment cache.  Every
 * slow-path entry does it, and so, every SM_PROF_IDLE bytes a thread
 * allocates, does its heartbeat (prof.c): a thread whose bursts its
 * current pages serve may not enter the slow path for a long time.  Not
 * counted as a cycle (those retire and sweep pages): the purge thread
 * takes such a heap for idle, and releases its retired pages
 * (background.c). */
void sm_heap_heartbeat(sm_heap_t *heap) {
  if (++heap->xbuf_beats % SM_XBUF_BEATS == 0 && sm_xbuf_pending(heap)) sm_free_flush_remote(heap);
  sm_heap_collect_delayed(heap);
  if (atomic_load_explicit(&heap->xhome, memory_order_relaxed) != NULL) sm_heap_take_home(heap);
  if (sm_unlikely(sm_opt(STATS_INTERVAL) != 0)) sm_stats_tick();
  if (sm_unlikely(sm_segment_cache_wants_purge())) sm_background_wake();
  /* heaps that waited a purge delay for a thread are taken apart here
   * too: no purge thread may run (heap.c) */
  if (sm_unlikely(sm_heaps_parked_any())) sm_heaps_parked_expire(sm_clock_ms(), false);
}

static void sm_heap_housekeeping(sm_heap_t *heap) {
  sm_heap_heartbeat(heap);
  uint64_t expire = atomic_load_explicit(&heap->next_expire, memory_order_relaxed);
  if (expire != SM_NO_EXPIRY && sm_cycle_reached(heap->cycle, (uint32_t)expire))
    sm_heap_collect_retired(heap, false);
  if (sm_cycle_reached(heap->cycle, heap->next_sweep)) {
    /* as often as pages expire, within [16, SM_SWEEP_CYCLES], and never
     * more often than one page visited per 8 slow-path entries: a heap of
     * thousands of pages must not pay a walk of them every 1024 entries
     * (1e7 live blocks: 7260 pages, 3.2 million slow-path entries; a
     * walk every 1024 of them cost 12 % of the run) */
    long c = sm_opt(RETIRE_CYCLES);
    if (c <= 0 || c > SM_SWEEP_CYCLES) c = SM_SWEEP_CYCLES;
    size_t period = c < 16 ? 16 : (size_t)c;
    size_t visited = sm_heap_sweep(heap);
    if (period < 8 * visited) period = 8 * visited;
    heap->next_sweep = heap->cycle + (uint32_t)(period < UINT32_MAX / 2 ? period : UINT32_MAX / 2);
    sm_heap_decommit(heap, false);
    sm_segment_cache_collect(false);
  }
}

/* While other threads live, a thread's fresh pages come from segments
 * that all threads share (held by sm_heap_shared) rather than from 4 MiB
 * segments of its own; the first thread maps its own from the start, and
 * a thread keeps carving the own segments it holds.
 *
 * Shared, the pages of all threads lie side by side, the first free page
 * of a segment with one first: a thread with a few blocks costs the
 * process a page, not a mapping, and the shared segments of small pages
 * are dense enough to take huge pages once they are many (segment.c:
 * sm_segment_wants_huge; not those of medium pages).  Each thread
 * mapping its own, a program of 1000 threads with a small block each
 * mapped 4 GiB, and under `ulimit -v 262144` no more than 63 to 164
 * threads could start, many of them without their block.  And with
 * every thread's fifth page on in segments of its own (a few pages used
 * in each, too sparse for huge pages), bench_server (8 threads) took
 * 31,900 page faults for 125 MB: 0.32 s on a 2-core VM where a 4 KiB
 * fault costs 10-20 us, against 0.26 s shared (medians of 5).
 *
 * A shared page for blocks of up to SM_BORROW_SMALL_PAGE bytes is a
 * small one (64 KiB), whatever their class, until the thread takes its
 * first medium page: a thread with a few blocks of 4 KiB does not take
 * 512 KiB of address space either.  That is every class of which even a
 * segment's first page (behind the header) holds a block: 48 KiB (44 KiB
 * in the secure build, whose pages end in a guard).  With 32 KiB, 1000
 * threads with a block of 40,000 bytes each took a 512 KiB page apiece,
 * and under the same limit only 534 of them could start.
 *
 * A medium class of which the thread has taken SM_BORROW_SMALL_MEDIUM
 * small pages (two: its blocks outgrew one) takes medium pages from
 * then on, as larger blocks do, except under an address-space limit
 * (RLIMIT_AS, sm_os_space_limited), where a page of 512 KiB in place of
 * one of 64 KiB would cost.  The medium page it takes switches the
 * thread's every class, as any medium page does; before, a thread with
 * a few blocks of each of many classes keeps to small pages.  Where no
 * medium page is to be had (none free, and the OS refuses a new
 * segment), a free small page of the shared segments serves.
 *
 * A small page holds 1-16 blocks of 4-32 KiB, and a thread that kept
 * taking them took the slow path every few of its blocks: bench_server
 * (8 threads, about one block in six of 1-32 KiB) took 103,902 slow
 * paths in 4 million calls, 68,529 of them to the next page of a class;
 * 41,843 and 11,092 now (medians of 5), 4.9 % fewer instructions
 * (callgrind, its quick run), 0.91 times the time (medians of 11
 * interleaved runs).  Not switching the other classes: 51,906 slow
 * paths rather than 35,809 (medians of 5 of one set), 1.9 % more
 * instructions.  Counting the thread's small pages of all classes
 * (eight switched it): 0.89 times the time, but one block of each of 44
 * classes took 18.5 MiB of pages rather than 2.8. */
#define SM_BORROW_SMALL_PAGE (((size_t)1 << SM_SMALL_SHIFT) - SM_SEGMENT_HDR - SM_GUARD)
#define SM_BORROW_SMALL_MEDIUM 2

pthread_mutex_t sm_shared_map_lock = PTHREAD_MUTEX_INITIALIZER;

static bool sm_page_may_borrow(void) {
  return atomic_load_explicit(&sm_heaps_live, memory_order_relaxed) > 1;
}

/* A free page for bin of the shared segments, of a new one only if
 * may_map (*new_segment says whether one was); the one place that
 * decides which kind of page serves a thread's medium blocks. */
static sm_page_t *sm_page_borrow(sm_heap_t *heap, size_t bin, int kind, bool may_map, bool *new_segment) {
  sm_heap_t *shared = sm_heap_shared;
  if (shared == NULL) return NULL;
  bool fits_small = kind == SM_SEG_MEDIUM && sm_bin_size(bin) <= SM_BORROW_SMALL_PAGE;
  bool small = fits_small && !heap->borrowed_medium &&
               (heap->borrowed_small[bin] < SM_BORROW_SMALL_MEDIUM || sm_os_space_limited());
  int from = kind == SM_SEG_MEDIUM && !small ? SM_SEG_MEDIUM : SM_SEG_SMALL;
  sm_heap_take_home(shared);   /* pages their owners gave back */
  *new_segment = false;
  sm_page_t *page = sm_segment_page_alloc(shared, from, new_segment);
  if (!page && may_map) {
    /* one thread maps at a time: the others find its segment (which
     * sm_segment_page_alloc looks for first) rather than map one each */
    pthread_mutex_lock(&sm_shared_map_lock);
    *new_segment = true;
    page = sm_segment_page_alloc(shared, from, new_segment);
    pthread_mutex_unlock(&sm_shared_map_lock);
  }
  if (!page && from == SM_SEG_MEDIUM && fits_small) {
    /* no medium page to be had: a small one that is free already */
    *new_segment = false;
    return sm_segment_page_alloc(shared, SM_SEG_SMALL, new_segment);
  }
  if (page && from == SM_SEG_MEDIUM) heap->borrowed_medium = true;
  if (page && small && heap->borrowed_small[bin] < SM_BORROW_SMALL_MEDIUM) heap->borrowed_small[bin]++;
  return page;
}

/* Whether a block of a medium class too big for a shared small page
 * (above SM_BORROW_SMALL_PAGE), for a thread without a page of its class
 * that would borrow a medium page, is served as a large block instead: a
 * mapping of its own, its size rounded to the OS page (huge.c), not a
 * 512 KiB page.  Up to SM_LEND_LARGE of them a thread; its next ones come
 * from a shared page, then its own segments, as ever.  With a 512 KiB
 * page each, 500 threads with a block of 60,000-200,000 bytes each took
 * 256 MiB of address space, and under `ulimit -v 262144` only 474-492 of
 * them could start.  The one place that decides; called only when the class's
 * queue is empty, it counts what it lends. */
enum { SM_LEND_LARGE = 4 };

bool sm_page_lends_large(sm_heap_t *heap, size_t bin) {
  if (sm_bin_size(bin) <= SM_BORROW_SMALL_PAGE || heap->lent >= SM_LEND_LARGE ||
      heap->borrowed_medium || !sm_page_may_borrow())
    return false;
  heap->lent++;
  return true;
}

/* Give the pages sent home to the shared segments back to them and
 * decommit their free pages, those free for the purge delay or (all) every
 * one: trim and the purge thread, which visit the thread heaps the same
 * way. */
bool sm_heap_shared_tidy(bool all) {
  sm_heap_t *shared = sm_heap_shared;
  if (shared == NULL) return false;
  sm_heap_take_home(shared);
  return sm_heap_decommit(shared, all);
}

/* Steps 6 and 7: a page from a segment, held, else an abandoned one
 * reclaimed, else a shared one (sm_page_may_borrow), else a new one. */
static sm_page_t *sm_page_fresh(sm_heap_t *heap, size_t bin, int *step) {
  int kind = bin <= SM_BIN_SMALL_LAST ? SM_SEG_SMALL : SM_SEG_MEDIUM;
  bool new_segment = false;
  sm_page_t *page = sm_segment_page_alloc(heap, kind, &new_segment);
  /* Before mapping: segments of exited threads, of the kind needed, until
   * one gives a page */
  while (!page && sm_heap_reclaim_one(heap, kind)) page = sm_segment_page_alloc(heap, kind, &new_segment);
  if (!page && sm_page_may_borrow()) page = sm_page_borrow(heap, bin, kind, true, &new_segment);
  if (!page) {
    /* also drain the other kind's list, one segment per new segment, so
     * it cannot grow without bound in a program that never asks for it */
    sm_heap_reclaim_one(heap, 1 - kind);
    new_segment = true;
    page = sm_segment_page_alloc(heap, kind, &new_segment);
    /* the OS refused: a free page of the shared segments will do */
    if (!page) page = sm_page_borrow(heap, bin, kind, false, &new_segment);
    if (!page) return NULL;
  }
  *step = new_segment ? SMALLOC_STEP_NEW_SEGMENT : SMALLOC_STEP_FRESH_PAGE;
  return page;
}

/* A page of the class's queue that the slow path found with no free
 * block anywhere (its lists empty, nothing to collect, nothing to
 * build): the first time since it last served, it goes to the back of
 * the queue, where the owner's frees into it stay on the fast path (onto
 * local_free) and the slow path takes them when the class comes round to
 * it; found so again, or when it is the queue's last page, it goes to
 * the full list (sm_page_to_full), off the walk.  The one place that
 * decides.  Sent to the full list each time it ran out, a page left the
 * queue and came back: heap->lock taken twice, an atomic or on
 * thread_free, and the owner's frees into it out of the fast path until
 * they brought it back.  bench_longlived 100000: 47,301 round trips, 72
 * now, 0.93 times the time (medians of 9 interleaved runs); 10000000:
 * 240,808, 8,815 now, 0.85 times (medians of 7).  Random replacement
 * among 5,000 blocks of 8-1,000 bytes a thread (larson, 2 threads): 1.34
 * million in 126 million calls, 4,600 now, and no change in time that
 * its spread (62-78 million operations a second, either way) would
 * show.  A page is passed over once before it leaves the walk, so a walk
 * is no longer than the pages it moves.  False: blocks arrived from
 * another thread meanwhile (the caller refills it again). */
static bool sm_page_exhausted(sm_heap_t *heap, sm_page_t *page) {
  sm_page_queue_t *q = &heap->queues[page->bin];
  if (!page->requeued && page != q->last) {
    page->requeued = 1;
    sm_pq_remove(heap, page->bin, page);
    sm_pq_push_back(heap, page->bin, page);
    return true;
  }
  return sm_page_to_full(heap, page);
}

/* Find a page of the bin with a free block, counting how it was found.
 * Returns NULL only when the OS refuses memory. */
static sm_page_t *sm_page_find_step(sm_heap_t *heap, size_t bin) {
  sm_cnt_add(heap->cycle, 1);   /* the purge thread reads it */
  sm_heap_housekeeping(heap);
  heap->swept_head[bin] = SM_SWEPT_ACTIVE;   /* its first page stays (sm_heap_sweep) */

  /* 1-4: the class's queue, first page first; exhausted pages go to the
   * full list on the way, or to the pool (sm_page_shares).  A page with
   * capacity never used (the one a class carves at a time) is extended
   * only when the pages behind it hold fewer free blocks than that would
   * build: they are used first, so a thread's pages fill before it
   * touches memory it never did.  Extending first, every page of a class
   * was carved whole however few of its blocks were live:
   * bench_xchurn with no block handed to another thread, 20,000 blocks
   * of 16-256 bytes live in each of 64 threads, was resident 1.44 times
   * its live bytes, 1.28 times now; `bench_longlived 100000 quick`
   * takes 4,815 slow paths rather than 4,045, and 0.8 % more
   * instructions. */
  sm_page_queue_t *q = &heap->queues[bin];
  sm_page_t *first = q->first, *page, *extendable = NULL;
  size_t extend_blocks = 0;   /* what extending it would build */
  int step = -1;
  for (page = first; page; ) {
    sm_page_t *next = page->next;
    if (!sm_page_free_at_least(page, (uint32_t)extend_blocks)) break;
    if (page != q->first) sm_page_unpurge(page);   /* its lists change: its gate shuts (pool.c) */
    if (sm_page_has_free(page)) {
      step = SMALLOC_STEP_NEXT_PAGE;
      break;
    }
    /* its free list empty, used is exact (sm_page_live): its counts are
     * folded before a refill counts the new list's blocks in used, which
     * keeps the 32-bit frees count small */
    sm_page_fold_stats(heap, page);
    step = sm_page_refill(page, false);
    if (step >= 0) break;
    if (page->capacity < page->reserved) {
      if (!extendable) {
        extendable = page;
        extend_blocks = sm_page_extend_count(page);
      }
      sm_pq_reopen(heap, page);   /* its lists did not change */
    } else if (sm_page_shares(page)) {
      sm_page_donate(heap, page, false);
    } else if (!sm_page_exhausted(heap, page)) {
      continue;   /* blocks arrived from another thread: refill it again */
    }
    page = next;
  }
  if (step < 0 && extendable) {
    page = extendable;
    sm_page_extend(page);
    step = SMALLOC_STEP_EXTEND;
  }
  if (step >= 0) {
    if (page != first) {
      if (step != SMALLOC_STEP_EXTEND) step = SMALLOC_STEP_NEXT_PAGE;
      /* first already when the ones before it went to the full list:
       * moved, it would put the page after it first for a moment */
      if (page != q->first) {
        sm_pq_remove(heap, bin, page);
        sm_pq_push_front(heap, bin, page);
      }
    }
    sm_count_step(heap, bin, step);
    /* a page whose sampled blocks were all freed, by other threads too,
     * frees on the fast path again (the owner may never free into it) */
    sm_prof_page_check(heap, page);
    sm_assert_expensive(sm_page_valid(page));
    return page;
  }

  /* 5. a retired page of the class */
  page = sm_page_take_retired(heap, bin);
  if (page) {
    sm_pq_push_front(heap, bin, page);
    sm_page_refill(page, true);   /* local_free holds every block */
    sm_cnt_add(heap->stats.pages_reused, 1);
    sm_count_step(heap, bin, SMALLOC_STEP_RETIRED_PAGE);
    sm_assert_expensive(sm_page_valid(page));
    return page;
  }

  /* a page another heap gave to the process, with its free blocks */
  page = sm_page_adopt(heap, bin);
  if (page) {
    sm_count_step(heap, bin, SMALLOC_STEP_NEXT_PAGE);
    return page;
  }

  /* 6. a fresh page; 7. a new segment */
  page = sm_page_fresh(heap, bin, &step);
  if (page == NULL) return NULL;
  sm_count_step(heap, bin, step);
  sm_page_init(heap, sm_page_segment(page), page, bin);
  sm_page_extend(page);
  sm_pq_push_front(heap, bin, page);
  return page;
}

/* The same; the page found is the first of its class, and its local_free
 * may have become its free list on the way (page-queue.c decides where
 * its frees go from now on). */
sm_page_t *sm_page_find(sm_heap_t *heap, size_t bin) {
  sm_page_t *page = sm_page_find_step(heap, bin);
  if (page) {
    page->requeued = 0;   /* it serves (sm_page_exhausted) */
    sm_pq_first_refilled(heap, page);
  }
  return page;
}
