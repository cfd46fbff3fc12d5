/* Pages that belong to the process, and pages that go home.
 *
 * A page is owned by one heap at a time (page->owner): its thread alone
 * allocates from it and touches its free lists.  A heap gives a page to
 * the process when it holds it without using it (page.c: a sparse page
 * behind the first of its class, when other threads live; every page with
 * live blocks at thread exit): the page goes on the pool of its size
 * class, ownerless, and any thread that needs a page of that class takes
 * it (sm_page_find) before it carves a fresh one.  While it waits, frees
 * into it from any thread (its former owner's too) go to its thread_free,
 * batched like every remote free (its xtid is SM_XTID_POOLED).
 *
 * The page stays in its segment, whose holder (seg->heap) alone gives
 * pages back to the segment, under its lock.  So an empty page owned by
 * another heap is sent home: pushed on the holder's xhome list with one
 * CAS, and released by whoever next takes that list (the holder on its
 * slow path; trim and the purge thread for every heap).  A page of an
 * abandoned segment (its holder exited) is released under the abandoned
 * list's lock instead (segment.c).
 *
 * Invariants: a page in the pool has owner NULL, is on no queue and no
 * retired list, its counts are folded, and only thread_free changes while
 * it waits; a page on an xhome list is empty, cleared (sm_page_clear) and
 * still in_use in its segment.  The pool's lock orders the donor's writes
 * to the page before the adopter's reads (lock order: heap, pool).
 * Homing never waits for the holder: a holder that exits abandons its
 * segments (seg->heap becomes NULL) before it closes its list, so a
 * sender that finds the list closed finds the segment's new state. */
#include "internal.h"

typedef struct sm_pool_s {
  sm_lock_t lock;
  sm_page_t *first, *last;       /* oldest first, linked through next/prev */
  _Atomic uint64_t count;
  uint32_t epoch;                /* lists forgotten in a child of fork (under the lock) */
} __attribute__((aligned(64))) sm_pool_t;

static sm_pool_t sm_pool[SM_BIN_COUNT];

/* What page->pooled holds while the page is on this pool's list: never
 * 0, and a page the child of a fork forgot is not on the list any more. */
static uint32_t sm_pool_mark(const sm_pool_t *pool) {
  return (uint32_t)(pool - sm_pool) | (pool->epoch << 8) | 0x80;
}

void sm_pool_push(sm_page_t *page) {
  sm_pool_t *pool = &sm_pool[page->bin];
  sm_lock(&pool->lock);
  page->next = NULL;
  page->prev = pool->last;
  if (pool->last) pool->last->next = page; else pool->first = page;
  pool->last = page;
  atomic_store_explicit(&page->pooled, sm_pool_mark(pool), memory_order_relaxed);
  atomic_store_explicit(&pool->count, atomic_load_explicit(&pool->count, memory_order_relaxed) + 1,
                        memory_order_relaxed);
  sm_unlock(&pool->lock);
}

static void sm_pool_unlink_locked(sm_pool_t *pool, sm_page_t *page) {
  if (page->prev) page->prev->next = page->next; else pool->first = page->next;
  if (page->next) page->next->prev = page->prev; else pool->last = page->prev;
  page->next = page->prev = NULL;
  atomic_store_explicit(&page->pooled, 0, memory_order_relaxed);
  atomic_store_explicit(&pool->count, atomic_load_explicit(&pool->count, memory_order_relaxed) - 1,
                        memory_order_relaxed);
}

/* Whether every block of a page in the pool has been freed (onto its
 * thread_free: nothing else changes while it waits).  Under the lock. */
static bool sm_pool_page_empty(const sm_page_t *page) {
  uintptr_t tf = atomic_load_explicit(&page->thread_free, memory_order_acquire);
  return sm_tf_count(tf) == page->used &&
         !(atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_CORRUPT);
}

/* Of the pages given longest ago for the class (other threads' frees had
 * the most time to come back to them), the one with the most free
 * blocks (on its thread_free, or not handed out since the page was
 * given), at least min and a part-th of the page's, or all of its
 * blocks; NULL when none has
 * (one relaxed load when the pool is empty).  An empty page qualifies
 * whatever its size: threads that each leave a block or two behind for
 * others to free (mimalloc-bench's mleak: 20,000 threads) left as many
 * pages in the pool, each with fewer than min blocks, and took fresh
 * ones (85 MB resident for 6 live blocks).  The pages looked at and
 * passed over go to the back, so that pages that wait for their frees do
 * not hide the rest. */
#define SM_POOL_LOOK 8
/* When none of those will do, it looks on, up to this many, before the
 * caller carves a fresh page: the pages that wait longest may be the
 * last whose blocks come back (mimalloc-bench's xmalloc-test frees its
 * batches last in, first out: 195 MB resident for 28 MB live when only
 * the first 8 were looked at, ready pages further back passed by). */
#define SM_POOL_FAR 64
sm_page_t *sm_pool_pop(size_t bin, uint32_t min, uint32_t part) {
  sm_pool_t *pool = &sm_pool[bin];
  if (atomic_load_explicit(&pool->count, memory_order_relaxed) == 0) return NULL;
  sm_lock(&pool->lock);
  sm_page_t *best = NULL, *page = pool->first;
  uint32_t most = 0;
  for (unsigned seen = 0; page && seen < SM_POOL_FAR && !(best && seen >= SM_POOL_LOOK);
       page = page->next, seen++) {
    uint32_t n = sm_tf_count(atomic_load_explicit(&page->thread_free, memory_order_relaxed)) +
                 (page->reserved - page->used);
    if (n > most && ((n >= min && n >= page->reserved / part) || sm_pool_page_empty(page))) {
      best = page;
      most = n;
    }
  }
  if (best) {
    sm_pool_unlink_locked(pool, best);
  } else if (page) {   /* move the ones looked at (first .. before page) to the back */
    sm_page_t *last_seen = page->prev;
    pool->last->next = pool->first;
    pool->first->prev = pool->last;
    pool->first = page;
    page->prev = NULL;
    pool->last = last_seen;
    last_seen->next = NULL;
  }
  sm_unlock(&pool->lock);
  return best;
}

/* Take this page off the pool, for the caller to own; false when it is
 * not there (taken by another thread, or not pushed yet).  The caller
 * holds a live block of the page, so its class cannot change. */
bool sm_pool_take(sm_page_t *page) {
  sm_pool_t *pool = &sm_pool[page->bin];
  sm_lock(&pool->lock);
  bool there = atomic_load_explicit(&page->pooled, memory_order_relaxed) == sm_pool_mark(pool);
  if (there) sm_pool_unlink_locked(pool, page);
  sm_unlock(&pool->lock);
  return there;
}

/* Pages in the pool whose blocks other threads have all freed go home
 * (trim, the purge thread).  Counted in self's heap. */
void sm_pool_collect(sm_heap_t *self) {
  for (size_t bin = 1; bin < SM_BIN_COUNT; bin++) {
    sm_pool_t *pool = &sm_pool[bin];
    if (atomic_load_explicit(&pool->count, memory_order_relaxed) == 0) continue;
    sm_page_t *empty = NULL;
    sm_lock(&pool->lock);
    for (sm_page_t *page = pool->first, *next; page; page = next) {
      next = page->next;
      if (!sm_pool_page_empty(page)) continue;
      sm_pool_unlink_locked(pool, page);
      page->next = empty;
      empty = page;
    }
    sm_unlock(&pool->lock);
    /* taken off the pool, each is the caller's alone */
    uint64_t n = 0;
    while (empty) {
      sm_page_t *page = empty;
      empty = page->next;
      sm_page_collect_thread_free(page);
      if (!sm_page_vacant(page)) {
        /* its thread_free held a link the program wrote over (a free
         * block written after its free, then freed again): the page is
         * corrupt and kept for good, in the pool (found by the fuzzer) */
        sm_pool_push(page);
        continue;
      }
      if (!sm_page_clear(page)) continue;
      sm_page_send_home(page);
      n++;
    }
    if (n) SM_COUNT(self, pages_released, n);
  }
}

/* In the child of fork: a pool whose lock a lost thread held is
 * forgotten (its pages leak in the child). */
void sm_pool_fork_child(void) {
  for (size_t bin = 0; bin < SM_BIN_COUNT; bin++) {
    sm_pool_t *pool = &sm_pool[bin];
    if (!sm_fork_lock_was_held(&pool->lock)) continue;
    pool->first = pool->last = NULL;
    pool->epoch++;
    atomic_store_explicit(&pool->count, 0, memory_order_relaxed);
  }
}

/* ---- home -------------------------------------------------------------- */

/* An empty, cleared page owned by no heap goes back to its segment
 * through the segment's holder, or at once when the segment is
 * abandoned.  Any thread, any lock held but the abandoned list's. */
void sm_page_send_home(sm_page_t *page) {
  sm_segment_t *seg = sm_ptr_segment(page);
  for (;;) {
    sm_heap_t *holder = atomic_load_explicit(&seg->heap, memory_order_acquire);
    if (holder == NULL) {
      if (sm_segment_page_free_abandoned(seg, page)) return;
      continue;   /* reclaimed meanwhile: it has a holder again */
    }
    sm_page_t *old = atomic_load_explicit(&holder->xhome, memory_order_relaxed);
    while (old != SM_XHOME_CLOSED) {
      page->next = old;
      if (atomic_compare_exchange_weak_explicit(&holder->xhome, &old, page, memory_order_release,
                                                memory_order_relaxed))
        return;
    }
    /* closed: the holder exited and abandoned the segment first */
  }
}

/* Give the pages sent home to the heap back to their segments, under its
 * lock: its owner on the slow path, or any thread (trim, the purge
 * thread) for a heap whose owner may not call in.  A page whose segment
 * is no longer the heap's (the list may outlive a holder: heaps are
 * reused) is sent on. */
void sm_heap_take_home(sm_heap_t *heap) {
  sm_page_t *list = atomic_load_explicit(&heap->xhome, memory_order_relaxed);
  while (list != NULL && list != SM_XHOME_CLOSED &&
         !atomic_compare_exchange_weak_explicit(&heap->xhome, &list, NULL, memory_order_acquire,
                                                memory_order_relaxed)) {
  }
  if (list == NULL || list == SM_XHOME_CLOSED) return;
  sm_page_t *astray = NULL;
  sm_lock(&heap->lock);
  while (list) {
    sm_page_t *page = list;
    list = page->next;
    sm_segment_t *seg = sm_ptr_segment(page);
    if (atomic_load_explicit(&seg->heap, memory_order_relaxed) == heap) {
      sm_segment_page_free_locked(heap, seg, page);
    } else {
      page->next = astray;
      astray = page;
    }
  }
  sm_unlock(&heap->lock);
  while (astray) {
    sm_page_t *page = astray;
    astray = page->next;
    sm_page_send_home(page);
  }
}

/* Thread exit, after the heap abandoned its segments: close the list and
 * send what came meanwhile to the segments' new state. */
void sm_heap_close_home(sm_heap_t *heap) {
  sm_page_t *list = atomic_exchange_explicit(&heap->xhome, SM_XHOME_CLOSED, memory_order_acquire);
  while (list != NULL && list != SM_XHOME_CLOSED) {
    sm_page_t *page = list;
    list = page->next;
    sm_page_send_home(page);
  }
}
