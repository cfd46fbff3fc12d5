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
 * it waits (and, under the pool's lock, the memory of its free blocks
 * goes back: see below); its pool_live is its live blocks as of the last
 * change of its lists, so the free that makes thread_free hold as many
 * knows that it emptied the page (sm_pool_freed_into: the page moves to
 * the pool's front, the first to be taken); a page on an xhome list is
 * empty, cleared (sm_page_clear) and still in_use in its segment.  The
 * pool's lock orders the donor's writes to the page before the adopter's
 * reads (lock order: heap, pool).
 * Homing never waits for the holder: a holder that exits abandons its
 * segments (seg->heap becomes NULL) before it closes its list, so a
 * sender that finds the list closed finds the segment's new state.
 *
 * What the pool cannot share is the page each heap allocates from in
 * each class: a 64 KiB page a class a thread, however few blocks of it
 * the thread keeps, is the floor of this design's resident size.
 * bench_xchurn 256 (16 classes, 148 MB live) holds 4,128 such pages,
 * 236 MB resident, and 2,524 in the pool, 161 MB; with 20,000 blocks a
 * thread (690 MB live) it keeps 1.36 times the live bytes (smalloc(7),
 * Threads).  Pages of 16 KiB for the smallest classes would lower that
 * floor fourfold, at four times the page map. */
#include "internal.h"

typedef struct sm_pool_s {
  sm_lock_t lock;
  sm_page_t *first, *last;       /* oldest first, linked through next/prev */
  _Atomic uint64_t count;
  uint32_t epoch;                /* lists forgotten in a child of fork (under the lock) */
} __attribute__((aligned(64))) sm_pool_t;

static sm_pool_t sm_pool[SM_BIN_COUNT];

/* Free blocks of pages that wait give their interiors back (see below). */
#define SM_POOL_KEEP 32   /* bytes at a free block's start: link, tag, poison */
_Static_assert(SM_POOL_KEEP >= 2 * sizeof(sm_block_t), "a free block keeps its link, tag and poison");

/* Whether a page's free blocks may hold a whole OS page past what they keep. */
static bool sm_pool_may_purge(const sm_page_t *page) {
  return page->block_size >= SM_OS_PAGE + SM_POOL_KEEP;
}

/* What page->pooled holds while the page is on this pool's list: never
 * 0, and a page the child of a fork forgot is not on the list any more. */
_Static_assert(SM_BIN_COUNT <= 0x80, "a pool's index fits below the mark's bit");
static uint32_t sm_pool_mark(const sm_pool_t *pool) {
  return (uint32_t)(pool - sm_pool) | (pool->epoch << 8) | 0x80;
}
/* The pool a mark names (its list, if the epoch is still the pool's). */
static sm_pool_t *sm_pool_of_mark(uint32_t mark) {
  return &sm_pool[mark & 0x7f];
}

/* The page's lists changed in the pool (or it went there): its live
 * blocks, those on thread_free included, for the frees that push there
 * (sm_pool_freed_into).  Under the pool's lock. */
static void sm_pool_note_live(sm_page_t *page) {
  atomic_store_explicit(&page->pool_live, sm_page_live(page), memory_order_relaxed);
}

void sm_pool_push(sm_page_t *page) {
  sm_pool_t *pool = &sm_pool[page->bin];
  uint64_t now = sm_clock_ms();
  sm_lock(&pool->lock);
  sm_assert(!page->free_scanned && page->free_purged == 0);   /* sm_page_unpurge on its way */
  page->empty_since_ms = now;
  page->next = NULL;
  page->prev = pool->last;
  if (pool->last) pool->last->next = page; else pool->first = page;
  pool->last = page;
  atomic_store_explicit(&page->pooled, sm_pool_mark(pool), memory_order_relaxed);
  sm_pool_note_live(page);
  atomic_store_explicit(&pool->count, atomic_load_explicit(&pool->count, memory_order_relaxed) + 1,
                        memory_order_relaxed);
  sm_unlock(&pool->lock);
  if (sm_pool_may_purge(page)) sm_background_wake();
}

/* Off the pool: what its free blocks gave back is counted as committed
 * again, for its new owner to fault in as it hands them out (or for its
 * segment's holder to give back with the page). */
/* The page out of the pool's list, under its lock (its mark stays). */
static void sm_pool_detach(sm_pool_t *pool, sm_page_t *page) {
  if (page->prev) page->prev->next = page->next; else pool->first = page->next;
  if (page->next) page->next->prev = page->prev; else pool->last = page->prev;
  page->next = page->prev = NULL;
}

static void sm_pool_unlink_locked(sm_pool_t *pool, sm_page_t *page) {
  sm_page_unpurge(page);
  sm_pool_detach(pool, page);
  atomic_store_explicit(&page->pooled, 0, memory_order_relaxed);
  atomic_store_explicit(&page->claim_notices, 0, memory_order_relaxed);   /* no pool_live now */
  atomic_store_explicit(&pool->count, atomic_load_explicit(&pool->count, memory_order_relaxed) - 1,
                        memory_order_relaxed);
}

/* Whether every block of a page in the pool has been freed (onto its
 * thread_free: nothing else changes while it waits).  Under the lock. */
static bool sm_pool_page_empty(const sm_page_t *page) {
  uintptr_t tf = atomic_load_explicit(&page->thread_free, memory_order_acquire);
  return sm_tf_count(tf) == sm_page_live(page) &&
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
                 (page->reserved - sm_page_live(page));
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

/* A free made thread_free hold as many blocks as page, with mark, had
 * live when it went to the pool or its lists last changed there
 * (sm_pool_freed_into): if it still waits there and all are free, it
 * moves to the front of its pool, where the next thread that looks for
 * a page of its class takes it (its blocks built, as a retired page's
 * are) before any page that waits for frees still; trim and the purge thread send it
 * home if none does (sm_pool_collect).  Behind the rest, such pages held
 * memory no one used: mimalloc-bench's xmalloc-test (16 threads allocate
 * batches of 64-byte blocks that 16 others free, last batch first) had
 * 190-660 empty pages in a pool of 600-1,500 at any time, and carved
 * fresh pages where 980 of its 4,100 empty-handed looks at the pool's
 * first pages had an empty one further back.  Sent home at once
 * instead, they were carved again, block by block: seven times the
 * fresh pages, 1.15 times the time.  The mark and live count the free
 * read may be another life's (the page left the pool since): a hint,
 * tested again here, under the pool's lock.  Page descriptors are never
 * unmapped, so the page may be read after the push. */
void sm_pool_emptied(sm_page_t *page, uint32_t mark) {
  sm_pool_t *pool = sm_pool_of_mark(mark);
  sm_lock(&pool->lock);
  if (atomic_load_explicit(&page->pooled, memory_order_relaxed) == sm_pool_mark(pool) &&
      page != pool->first && sm_pool_page_empty(page)) {
    sm_pool_detach(pool, page);   /* not first: the list stays non-empty */
    page->next = pool->first;
    pool->first->prev = page;
    pool->first = page;
  }
  sm_unlock(&pool->lock);
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

/* ---- the free blocks of sparse pages -------------------------------------- */

/* A page in the pool keeps its free blocks while it waits for a thread
 * to take it, and a page of medium blocks that stays sparse (a block or
 * two still in use) is never emptied, so its memory would stay resident
 * for good: 1,000 blocks of 100 KB written by a thread that freed three
 * in four and exited kept 128 MB resident.  Once a page has waited for
 * the purge delay, the whole OS pages inside each block of its free lists
 * go back (madvise), all but the words a free block keeps: its link, its
 * tag and (secure build) its poison; and so does what lies past the
 * blocks built so far.  Blocks freed into it later, onto its thread_free,
 * are taken onto its lists and go back the same way, a purge delay after
 * the last time.  Under the pool's lock, so that no thread takes the page
 * meanwhile.
 *
 * A live thread's own pages that stay sparse are the same, and trim
 * (malloc_trim, smalloc_collect(true)) gives back the free blocks of
 * every page behind the first of its class, from any thread, whatever
 * the owner does (segment.c: sm_segments_purge_open); the first keeps
 * its blocks for its thread's next allocation.  The purge thread does
 * the same for the pages of a thread that has taken no slow path for the
 * purge delay (bg_idle), and an owner that opens a page with free blocks
 * wakes it.  Such a page keeps its
 * free blocks on local_free alone (page-queue.c), where its owner's frees
 * push them, and the owner allocates from it only once it is first.  So
 * its purge gate (page->purge_gate) is open while it is behind the first
 * (the owner opens it once the page's lists are as they stay); a purge
 * takes it busy, walks local_free from the head it reads down to where
 * the last purge began (purged_to), and opens it again; the owner shuts
 * it, waiting while it is busy, before the page becomes first, leaves
 * its queue, or has its lists changed other than by a push
 * (sm_page_unpurge).  A free of the owner's meanwhile pushes a block
 * whose link is written before the block heads the list
 * (sm_list_publish), and no block below the head the purge read is
 * taken while the gate is open.
 *
 * What went back counts as committed again when the page is next in use:
 * when it leaves the pool, or becomes the first of its class or leaves
 * its queue (sm_page_unpurge, the one place); a block handed out again
 * faults its pages back in, zeroed.  The segment's half the page lies in
 * is advised against huge pages first, as every purge beside memory in
 * use is (sm_segment_unadvise). */

/* The whole OS pages of free block b of bsize bytes past what it keeps:
 * their start, and their bytes (0: none). */
static size_t sm_pool_interior(const sm_block_t *b, size_t bsize, uint8_t **from) {
  uintptr_t lo = ((uintptr_t)b + SM_POOL_KEEP + SM_OS_PAGE - 1) & ~(SM_OS_PAGE - 1);
  uintptr_t hi = ((uintptr_t)b + bsize) & ~(SM_OS_PAGE - 1);
  *from = (uint8_t *)lo;
  return hi > lo ? hi - lo : 0;
}

/* Give back the interiors of the blocks on one of the page's free lists,
 * up to block `stop`; the bytes.  A link out of the page ends the walk
 * (its next owner finds and reports it), and so does a cycle. */
static size_t sm_pool_purge_list(sm_page_t *page, sm_block_t *b, sm_block_t *stop, uint32_t *left) {
  size_t bytes = 0;
  for (; b != stop && *left > 0 && sm_page_is_block(page, b); (*left)--) {
    uint8_t *from;
    size_t len = sm_pool_interior(b, page->block_size, &from);
    if (len && sm_os_purge(from, len) == 0) bytes += len;
    b = sm_dec(page, b->next);
  }
  return bytes;
}

/* Give back the interiors of the free blocks on list a (whole) and on
 * list b down to b_stop, and, at the page's first scan since it was in
 * use, what no list holds yet: the blocks not built into one, and the
 * bytes past the last block (up to the guard page, secure build),
 * resident where a huge page brought them in.  Counted here. */
static void sm_page_purge_free(sm_page_t *page, sm_block_t *a, sm_block_t *b, sm_block_t *b_stop) {
  bool first = !page->free_scanned;
  page->free_scanned = 1;
  sm_segment_t *seg = sm_page_segment(page);
  uintptr_t at = (uintptr_t)page->start - (uintptr_t)seg;
  uintptr_t end = (uintptr_t)page->start + sm_segment_page_len(seg, page) - SM_GUARD;
  uintptr_t lo = ((uintptr_t)page->start + (size_t)page->capacity * page->block_size + SM_OS_PAGE - 1) &
                 ~(SM_OS_PAGE - 1);
  if (!first) end = lo;   /* given back already */
  if (a == NULL && b == b_stop && end <= lo) return;   /* nothing: a full page, say */
  sm_segment_unadvise(seg, at < SM_SEGMENT_SIZE / 2 ? SM_HALF_LOWER : SM_HALF_UPPER);
  uint32_t left = page->reserved;   /* no list holds more blocks than the page */
  size_t bytes = sm_pool_purge_list(page, a, NULL, &left);
  bytes += sm_pool_purge_list(page, b, b_stop, &left);
  if (end > lo && sm_os_purge((void *)lo, end - lo) == 0) bytes += end - lo;
  page->free_purged += (uint32_t)bytes;
  sm_gsub(bytes_committed, bytes);
}

/* The owner opens the gate of a page it put behind the first of its
 * class (page-queue.c), its lists as they stay: any thread may give its
 * free blocks back from now on. */
void sm_page_gate_open(sm_page_t *page) {
  if (!sm_pool_may_purge(page) || atomic_load_explicit(&page->purge_gate, memory_order_relaxed) != SM_GATE_SHUT)
    return;
  atomic_fetch_add_explicit(&sm_page_segment(page)->open_pages, 1, memory_order_relaxed);
  atomic_store_explicit(&page->purge_gate, SM_GATE_OPEN, memory_order_release);
  /* blocks to give back once its thread goes idle: the purge thread
   * looks (it runs where other threads live) */
  if (page->local_free && atomic_load_explicit(&sm_heaps_live, memory_order_relaxed) > 1) sm_background_wake();
}

/* What the page's free blocks gave back counts as committed again, and
 * its next purge looks at all of them. */
static void sm_page_purged_forget(sm_page_t *page) {
  if (page->free_purged) {
    sm_gadd(bytes_committed, page->free_purged);
    page->free_purged = 0;
  }
  page->free_scanned = 0;
  page->purged_to = NULL;
}

/* The page is in use again (see above), its owner's to allocate from or
 * change: its gate shuts, once a purge under way is done, and what its
 * free blocks gave back counts as committed; its next purge looks at
 * all of them.  The owner, or whoever takes it off the pool. */
void sm_page_unpurge(sm_page_t *page) {
  uint8_t gate = atomic_load_explicit(&page->purge_gate, memory_order_relaxed);
  if (gate != SM_GATE_SHUT) {
    for (;;) {
      gate = SM_GATE_OPEN;
      if (atomic_compare_exchange_weak_explicit(&page->purge_gate, &gate, SM_GATE_SHUT, memory_order_acquire,
                                                memory_order_relaxed))
        break;
      if (gate == SM_GATE_BUSY) sched_yield();
    }
    atomic_fetch_sub_explicit(&sm_page_segment(page)->open_pages, 1, memory_order_relaxed);
  }
  sm_page_purged_forget(page);
}

/* Give back the free blocks of a page whose gate is open, those freed
 * since the last time alone: all such pages (trim), or those whose owner
 * has taken no slow path for a purge delay (the purge thread, which set
 * bg_idle); whether the page has blocks to give back and waits for its
 * owner to go idle.  Under the lock of its segment's holder (segment.c),
 * from any thread, its owner's too.  The owner may keep freeing into it
 * meanwhile: each block it pushes on local_free is linked before it
 * heads the list (sm_list_publish), and no block below the head read
 * here is taken while the gate is open. */
bool sm_page_purge_open(sm_page_t *page, bool all) {
  if (atomic_load_explicit(&page->purge_gate, memory_order_relaxed) != SM_GATE_OPEN) return false;
  uint8_t gate = SM_GATE_OPEN;
  if (!atomic_compare_exchange_strong_explicit(&page->purge_gate, &gate, SM_GATE_BUSY, memory_order_acquire,
                                               memory_order_relaxed))
    return false;
  bool waits = false;
  sm_block_t *head = __atomic_load_n(&page->local_free, __ATOMIC_ACQUIRE);
  if (!(page->free_scanned && head == page->purged_to) &&
      !(atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_CORRUPT)) {
    sm_heap_t *owner = atomic_load_explicit(&page->owner, memory_order_relaxed);
    if (all || owner->bg_idle) {
      sm_page_purge_free(page, NULL, head, page->purged_to);
      page->purged_to = head;
    } else {
      waits = true;
    }
  }
  atomic_store_explicit(&page->purge_gate, SM_GATE_OPEN, memory_order_release);
  return waits;
}

/* In the child of fork: a purge that a lost thread had under way on one
 * of the heap's pages is over. */
void sm_page_gate_fork_child(sm_heap_t *heap) {
  for (size_t bin = 1; bin < SM_BIN_COUNT; bin++)
    for (sm_page_t *page = heap->queues[bin].first; page; page = page->next)
      if (atomic_load_explicit(&page->purge_gate, memory_order_relaxed) == SM_GATE_BUSY) {
        /* how much went back is not known: counted committed, and all of
         * it goes back again at the next purge */
        sm_page_purged_forget(page);
        atomic_store_explicit(&page->purge_gate, SM_GATE_OPEN, memory_order_relaxed);
      }
}

/* Whether the page has blocks to give back: never looked at in this
 * stay, or blocks freed into it since. */
static bool sm_pool_purge_due(const sm_page_t *page) {
  return !page->free_scanned || sm_tf_head((sm_page_t *)page, memory_order_relaxed) != NULL;
}

static void sm_pool_purge_page(sm_page_t *page, uint64_t now) {
  page->empty_since_ms = now;
  if (!page->free_scanned) {
    sm_page_collect_thread_free(page);
    sm_pool_note_live(page);
    sm_page_purge_free(page, page->free, page->local_free, NULL);
    return;
  }
  /* blocks freed into it since: onto its lists, ahead of those given
   * back before (sm_page_collect_thread_free: the whole free list when it
   * had none, else local_free down to its old head) */
  sm_block_t *free0 = page->free, *local0 = page->local_free;
  sm_page_collect_thread_free(page);
  sm_pool_note_live(page);
  if (page->free != free0) sm_page_purge_free(page, page->free, NULL, NULL);
  else sm_page_purge_free(page, NULL, page->local_free, local0);
}

/* Pages this many at a time per lock hold: a thread that wants a page of
 * the class waits no longer than their madvise calls take. */
#define SM_POOL_PURGE_BATCH 8

/* Give back the free blocks of the pages that have waited in the pool
 * for delay ms (0: all of them, trim); whether some wait still. */
bool sm_pool_purge(uint64_t now, uint64_t delay) {
  bool waiting = false;
  for (size_t bin = 1; bin < SM_BIN_COUNT; bin++) {
    sm_pool_t *pool = &sm_pool[bin];
    if (atomic_load_explicit(&pool->count, memory_order_relaxed) == 0) continue;
    bool more = true;
    while (more) {
      more = false;
      unsigned done = 0;
      sm_lock(&pool->lock);
      for (sm_page_t *page = pool->first; page; page = page->next) {
        if (!sm_pool_purge_due(page) || !sm_pool_may_purge(page) ||
            (atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_CORRUPT))
          continue;
        if (!sm_aged(now, page->empty_since_ms, delay)) {
          waiting = true;
          continue;
        }
        if (done == SM_POOL_PURGE_BATCH) {
          more = true;
          break;
        }
        sm_pool_purge_page(page, now);
        done++;
      }
      sm_unlock(&pool->lock);
    }
  }
  return waiting;
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
  sm_segment_t *seg = sm_page_segment(page);
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
    sm_segment_t *seg = sm_page_segment(page);
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
