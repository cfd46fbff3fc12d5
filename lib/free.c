/* Freeing: the out-of-line free path, pointer validation, double-free
 * detection and cross-thread frees.  The inline owner-thread fast path is
 * in internal.h. */
#include "internal.h"
#include "track.h"

#include <linux/membarrier.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

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
  sm_page_t *page = (seg->kind >= SM_SEG_LARGE) ? &seg->pages[0] : sm_segment_page_of(seg, p);
  if (!page->in_use) return false;
  *segp = seg;
  *pagep = page;
  return true;
}

/* The tag word of a block being freed holds the page's key: it may be
 * free already.  Look for it in the page's lists. */
static bool sm_page_lists_hold(sm_page_t *page, sm_block_t *b) {
  sm_block_t *lists[3] = {page->free, page->local_free,
                          sm_tf_head(page, memory_order_acquire)};
  for (int l = 0; l < 3; l++) {
    size_t guard = page->capacity + 1;
    for (sm_block_t *x = lists[l]; x && guard--; x = sm_dec(page, x->next)) {
      if (!sm_page_link_ok(page, x)) break;  /* corrupt: stop */
      sm_track_link(x);
      if (x == b) return true;
    }
  }
  return false;
}

bool sm_free_is_double(sm_page_t *page, sm_block_t *b) {
  if (!sm_page_lists_hold(page, b)) return false;
  sm_error("free(): double free of %p", (void *)b);
  return true;
}

/* Whether block b (a block start of page) is free already: its tag says
 * it travels back from another thread, or says it may be on the page's
 * lists and, where the caller owns the page, it is found there (another
 * thread's lists are the owner's: the tag is the answer there). */
bool sm_block_is_free(sm_page_t *page, sm_block_t *b) {
  sm_track_link(b);
  uintptr_t d = b->tag ^ page->key;
  if (d == SM_TAG_REMOTE) return true;
  if (d != 0) return false;
  if (atomic_load_explicit(&page->owner, memory_order_relaxed) != sm_heap()) return true;
  return sm_page_lists_hold(page, b);
}

/* The owner puts b on the list its frees go on (sm_page_free_list),
 * unless it is free already (reported); false then. */
static bool sm_free_local_push(sm_page_t *page, sm_block_t *b, void *p) {
  sm_track_link(b);
  sm_block_t **list = sm_page_free_list(page);
  if (b->tag == (page->key ^ SM_TAG_REMOTE) || *list == b) {
    /* another thread freed it already and it is on its way back, or it
     * was the last block freed here (its tag overwritten since): pushed
     * again, it would link to itself and be handed out twice.  The head
     * of the list gets its tag back, so that the list stays sound */
    sm_error("free(): double free of %p", (void *)b);
    if (*list == b) b->tag = page->key;
    return false;
  }
  if (b->tag == page->key && sm_free_is_double(page, b)) return false;
  sm_track_free(p, b);
  if (!sm_track_on()) sm_poison_set(page, b);
  b->next = sm_enc(page, *list);
  b->tag = page->key;
  sm_list_publish(list, b);
  /* on local_free it counts down used (sm_page_t), as on the fast path;
   * used is 0 only in a page found corrupted, and used_mark counts the
   * free instead (sm_page_local_frees) */
  if (!sm_page_push_counts(page, list) || sm_likely(page->used > 0)) --*sm_page_push_count(list);
  else page->used_mark++;
  return true;
}

/* The owner frees into a page the fast path does not handle: one on the
 * full list, a flagged one, or a block whose tag says it may be free.  A
 * page on the full list changes under heap->lock (another thread may
 * give it back once all its blocks are free, sm_heap_claim_full): if it
 * is gone from the list, every block of it was free, b too. */
void sm_free_local_slow(sm_page_t *page, sm_block_t *b, void *p) {
  sm_heap_t *heap = sm_heap();
  bool full = (atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_IN_FULL) != 0;
  if (full) {
    sm_lock(&heap->lock);
    if (!(atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_IN_FULL) ||
        atomic_load_explicit(&page->owner, memory_order_relaxed) != heap) {
      sm_unlock(&heap->lock);
      sm_error("free(): double free of %p", (void *)b);
      return;
    }
  }
  bool pushed = sm_free_local_push(page, b, p);
  if (full && pushed) sm_page_owner_freed_locked(heap, page);
  /* decided before the lock goes: a page still on the full list then is
   * the purge thread's to count down and give back (sm_heap_claim_full);
   * one emptied has left it (it wakes) */
  bool emptied = pushed && page->free == NULL && sm_page_vacant(page) &&
                 !(atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_IN_FULL);
  if (full) sm_unlock(&heap->lock);
  if (!pushed) return;
  sm_prof_page_check(heap, page);
  if (emptied) sm_page_retire(heap, page);
  sm_background_poll_free();
}

/* The fast path freed the last block of one of the thread's pages. */
void sm_free_emptied(sm_page_t *page) {
  sm_page_retire(sm_heap(), page);
  sm_background_poll_free();
}

static bool sm_tf_push(sm_page_t *page, sm_block_t *b);

/* The first free from another thread into a page on its owner's full list
 * hands the block to the owner's heap (xdelayed), so the owner learns
 * which page has room without scanning its full list.  A page in the pool
 * (no owner) or an exiting owner (list closed) takes it on thread_free;
 * an owner that gave the page away meanwhile sends it there too. */
static void sm_free_hand_over(sm_page_t *page, sm_block_t *b) {
  /* what was written before the full bit was set (xwatch, by a claim
   * that armed the page again) is seen */
  atomic_thread_fence(memory_order_acquire);
  sm_heap_t *heap = atomic_load_explicit(&page->owner, memory_order_acquire);
  if (heap == NULL || !sm_heap_hand_over(heap, b, b, 1)) sm_tf_push(page, b);
}

/* Push the chain head..tail of n blocks (linked xor sm_secret) onto the
 * heap's hand-over list; false, with nothing pushed, once the list is
 * closed.  SM_BG_NOTICES of them waiting want a purge thread, and so
 * does any of them while the heap is watched (xwatch). */
bool sm_heap_hand_over(sm_heap_t *heap, sm_block_t *head, sm_block_t *tail, uint32_t n) {
  sm_block_t *old = atomic_load_explicit(&heap->xdelayed, memory_order_relaxed);
  while (old != SM_XDELAYED_CLOSED) {
    tail->next = (sm_block_t *)((uintptr_t)old ^ sm_secret);
    if (atomic_compare_exchange_weak_explicit(&heap->xdelayed, &old, head, memory_order_release,
                                              memory_order_relaxed)) {
      uint32_t was = atomic_fetch_add_explicit(&heap->xnotices, n, memory_order_relaxed);
      if (was < SM_BG_NOTICES && was + n >= SM_BG_NOTICES) {
        sm_background_wake();
      } else if (atomic_load_explicit(&heap->xwatch, memory_order_relaxed)) {
        /* the count before the look at the purge thread, as it looks at
         * the count after it stops (sm_heaps_watched_notices) */
        atomic_thread_fence(memory_order_seq_cst);
        sm_background_wake();
      }
      return true;
    }
  }
  return false;
}

/* Push b (tagged free already) onto the page's thread_free with one CAS;
 * false when b is the list's head already (two threads freed it at once,
 * and the other one won: a link to itself would make the list endless).
 * A page of the pool that the push empties goes to its front
 * (sm_pool_freed_into), whichever free pushed.
 * While the page is on the full list (SM_TF_FULL), the CAS clears the bit
 * instead and the block is handed over: one notice per full page, and
 * later frees into it touch nothing but thread_free.  Nothing of the page
 * but two of its atomics (sm_pool_freed_into) is read after a push (the
 * owner may take the block and release the page at once; descriptors are
 * never unmapped); a handed-over block keeps the page in use until its
 * owner takes it, and heaps are never unmapped. */
static bool sm_tf_push(sm_page_t *page, sm_block_t *b) {
  uintptr_t old = atomic_load_explicit(&page->thread_free, memory_order_relaxed);
  uintptr_t val;
  do {
    if (sm_unlikely(sm_tf_ptr(page, old) == b)) return false;
    if (old & SM_TF_FULL) {
      val = old & ~SM_TF_FULL;
    } else {
      b->next = sm_enc(page, sm_tf_ptr(page, old));
      val = (sm_tf_off(b) | (old & ~SM_TF_OFF_MASK)) + SM_TF_COUNT_ONE;
    }
  } while (!atomic_compare_exchange_weak_explicit(&page->thread_free, &old, val, memory_order_release,
                                                  memory_order_relaxed));
  if (old & SM_TF_FULL) sm_free_hand_over(page, b);
  sm_pool_freed_into(page, val);
  return true;
}

/* A block handed over to a heap that no longer owns its segment. */
void sm_free_push_remote(sm_page_t *page, sm_block_t *b) {
  sm_tf_push(page, b);
}

/* A block freed by a thread that does not own its page sets out for its
 * owner, tagged key ^ SM_TAG_REMOTE; false when it was free already
 * (reported).  A block on any of the page's lists carries the key in its
 * tag, one on its way back the key ^ SM_TAG_REMOTE; the lists belong to
 * the owner, so this is as far as another thread looks. */
static bool sm_free_tag_remote(sm_page_t *page, sm_block_t *b) {
  sm_track_link(b);
  if (sm_unlikely((b->tag ^ page->key) <= SM_TAG_REMOTE)) {
    sm_error("free(): double free of %p", (void *)b);
    return false;
  }
  b->tag = page->key ^ SM_TAG_REMOTE;
  if (!sm_track_on()) sm_poison_set(page, b);
  return true;
}

/* Free from a thread that does not own the page; false when the block was
 * already free (reported). */
bool sm_free_block_xthread(sm_page_t *page, sm_block_t *b) {
  if (!sm_free_tag_remote(page, b)) return false;
  if (sm_unlikely(!sm_tf_push(page, b))) {
    sm_error("free(): double free of %p", (void *)b);
    return false;
  }
  return true;
}

/* ---- batched remote frees -------------------------------------------------
 * A free from another thread joins this thread's batch for the block's
 * page (in one slot of a pair among SM_XBUF_SLOTS, chosen by page),
 * already linked as it will sit on the page's thread_free; the batch goes
 * there with one CAS when it reaches SM_XBUF_MAX blocks, when its slot is
 * wanted for another page, at every SM_XBUF_BEATS-th slow path this
 * thread takes, and when it collects or exits.  The owner takes the list
 * and its length with one exchange, as before: a run of frees into one
 * page (a consumer freeing what a producer allocated) costs one atomic
 * operation, not one per block.  128 slots in pairs: a consumer of 16
 * size classes frees into about 40 pages by turns, and with 64 slots one
 * page in three sent its batch early (bench_churn f: 1.17 million sends
 * for 8 million frees, 0.102 s; now 0.081 s).  What a thread that stops
 * calling in can hold back is one batch per slot (SM_XBUF_MAX - 1 blocks
 * each); those pages stay in use until it is sent. */

/* Push the chain head..tail of n blocks (linked with the page's key) onto
 * the page's thread_free.  While the page is on the full list, its head
 * is handed over instead (sm_tf_push) and the rest pushed; a page of the
 * pool that the batch empties goes to its front (sm_pool_freed_into). */
static void sm_tf_push_chain(sm_page_t *page, sm_block_t *head, sm_block_t *tail, uint32_t n) {
  sm_block_t *rest = n > 1 ? sm_dec(page, head->next) : NULL;
  uintptr_t old = atomic_load_explicit(&page->thread_free, memory_order_relaxed);
  uintptr_t val;
  do {
    if (old & SM_TF_FULL) {
      if (rest == NULL) {
        val = old & ~SM_TF_FULL;
      } else {
        tail->next = sm_enc(page, sm_tf_ptr(page, old));
        val = ((sm_tf_off(rest) | (old & ~SM_TF_OFF_MASK)) & ~SM_TF_FULL) + (uintptr_t)(n - 1) * SM_TF_COUNT_ONE;
      }
    } else {
      tail->next = sm_enc(page, sm_tf_ptr(page, old));
      val = (sm_tf_off(head) | (old & ~SM_TF_OFF_MASK)) + (uintptr_t)n * SM_TF_COUNT_ONE;
    }
  } while (!atomic_compare_exchange_weak_explicit(&page->thread_free, &old, val, memory_order_release,
                                                  memory_order_relaxed));
  if (old & SM_TF_FULL) sm_free_hand_over(page, head);
  sm_pool_freed_into(page, val);
}

/* Send a batch.  Its blocks keep their page in use, so the page's key is
 * the one it had when the batch began; when it is not, the page emptied
 * and was carved anew meanwhile: every block of the batch was free
 * already when this thread freed it (its owner freed it and wrote over
 * its tag, where free looks), and may be live now.  Pushed, they would be
 * handed out twice and their links written into live data: the batch is
 * reported as the double free it was and left out.  Within one life of
 * the page, the push writes into one block, the tail (its link): a tail
 * whose tag is no longer the one this thread gave it was handed out
 * again, live, and the batch goes the same way.  Any other block of the
 * batch that was handed out again is found by malloc's check of its tag
 * when it reaches it, before it is handed out twice.  Either way its
 * blocks count as frees of counter, the heap of the thread that sends it
 * (its owner's, or the purge thread's: sm_stats_free_remote). */
static void sm_xbuf_send(sm_heap_t *counter, sm_xbuf_t *x) {
  sm_page_t *page = x->page;
  sm_stats_free_remote(counter, page->bin, x->count);   /* the page may be gone once pushed */
  sm_track_link(x->tail);
  sm_block_t *bad = (uint32_t)page->key != x->key ? x->head
                    : x->tail->tag != (page->key ^ SM_TAG_REMOTE) ? x->tail : NULL;
  if (sm_unlikely(bad != NULL)) sm_error("free(): double free of %p (handed out again since)", (void *)bad);
  else sm_tf_push_chain(page, x->head, x->tail, x->count);
  /* head stays, as the block this slot sent last (sm_xbuf_sent_again) */
  x->page = NULL;
  x->tail = NULL;
  x->count = 0;
}

/* fn(x, arg) for every slot x of the heap that holds a batch. */
static void sm_xbuf_each(sm_heap_t *heap, void (*fn)(sm_xbuf_t *x, void *arg), void *arg) {
  for (unsigned w = 0; w < SM_XBUF_SLOTS / 64; w++)
    for (uint64_t used = atomic_load_explicit(&heap->xbuf_used[w], memory_order_relaxed); used != 0;
         used &= used - 1)
      fn(&heap->xbuf[w * 64 + (unsigned)__builtin_ctzll(used)], arg);
}

static void sm_xbuf_send_to(sm_xbuf_t *x, void *counter) { sm_xbuf_send(counter, x); }

static void sm_xbuf_send_all(sm_heap_t *counter, sm_heap_t *heap) {
  sm_xbuf_each(heap, sm_xbuf_send_to, counter);
  for (unsigned w = 0; w < SM_XBUF_SLOTS / 64; w++)
    atomic_store_explicit(&heap->xbuf_used[w], 0, memory_order_relaxed);
}

/* ---- an idle thread's batches ---------------------------------------------
 * A thread that stops calling in (blocked, asleep, idle for the rest of
 * the program) keeps its batches, and with them every page they were
 * freed into, from everyone: 1600 threads handed blocks to main, which
 * freed them and slept with 126 batches unsent, and the pages those were
 * freed into stayed in use for good.  So the purge thread sends the
 * batches of a heap that took no slow path for a purge delay
 * (sm_free_steal_*, from background.c).
 *
 * The owner marks itself busy at its batches (xbuf_busy), then looks for
 * the purge thread's mark (xbuf_steal) and, if it finds one, waits until
 * the mark is gone; the purge thread marks the heap, makes every thread
 * of the process pass a full memory barrier (membarrier), and sends the
 * batches only if it then finds the owner not busy.  Either the owner sees
 * the mark or the purge thread sees the owner busy: the barrier orders
 * the owner's store before its load, as a fence of its own would, so a
 * free pays two plain stores and a load.  Without membarrier (a kernel
 * before 4.14, a filter that refuses it) idle threads' batches wait as
 * before.  ThreadSanitizer, which does not model that barrier, builds
 * both sides from sequentially consistent operations. */
#ifdef SM_TSAN
#define SM_XB_ORDER memory_order_seq_cst
#define SM_XB_ACQUIRE memory_order_seq_cst
#else
#define SM_XB_ORDER memory_order_relaxed
#define SM_XB_ACQUIRE memory_order_acquire
#endif

static SM_COLD void sm_xbuf_wait(sm_heap_t *heap) {
  while (atomic_load_explicit(&heap->xbuf_steal, memory_order_acquire)) sched_yield();
}

/* Mark the heap busy at its batches; false when the purge thread has
 * marked it (the caller leaves, or waits: sm_xbuf_enter). */
static inline bool sm_xbuf_try_enter(sm_heap_t *heap) {
  atomic_store_explicit(&heap->xbuf_busy, 1, SM_XB_ORDER);
  atomic_signal_fence(memory_order_seq_cst);
  return !atomic_load_explicit(&heap->xbuf_steal, SM_XB_ACQUIRE);
}

static inline void sm_xbuf_enter(sm_heap_t *heap) {
  if (sm_unlikely(!sm_xbuf_try_enter(heap))) sm_xbuf_wait(heap);
}

static inline void sm_xbuf_leave(sm_heap_t *heap) {
  atomic_store_explicit(&heap->xbuf_busy, 0, memory_order_release);
}

void sm_free_flush_remote(sm_heap_t *heap) {
  sm_xbuf_enter(heap);
  sm_xbuf_send_all(heap, heap);
  sm_xbuf_leave(heap);
}

/* The blocks of the heap's batches, not counted until sent, added to
 * frees by class: a thread's own figures include them (stats.c). */
static void sm_xbuf_count_into(sm_xbuf_t *x, void *frees) { ((uint64_t *)frees)[x->page->bin] += x->count; }

void sm_free_pending(sm_heap_t *heap, uint64_t *frees) {
  sm_xbuf_enter(heap);   /* the purge thread may be sending them */
  sm_xbuf_each(heap, sm_xbuf_count_into, frees);
  sm_xbuf_leave(heap);
}

/* The purge thread: whether it can send other threads' batches (the
 * process registered for membarrier; tried once). */
static _Atomic int sm_steal_cmd = -1;   /* -1 not tried, 0 none, else the membarrier command */

bool sm_free_steal_begin(void) {
  int cmd = atomic_load_explicit(&sm_steal_cmd, memory_order_relaxed);
  if (cmd < 0) {
    long have = syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
    cmd = 0;
    if (have > 0 && (have & MEMBARRIER_CMD_PRIVATE_EXPEDITED) &&
        syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0)
      cmd = MEMBARRIER_CMD_PRIVATE_EXPEDITED;
    else if (have > 0 && (have & MEMBARRIER_CMD_GLOBAL))
      cmd = MEMBARRIER_CMD_GLOBAL;
    atomic_store_explicit(&sm_steal_cmd, cmd, memory_order_relaxed);
  }
  return cmd != 0;
}

/* In a child after fork: the registration was the parent's process's. */
void sm_free_steal_fork_child(void) {
  atomic_store_explicit(&sm_steal_cmd, -1, memory_order_relaxed);
}

/* Mark a heap with batches waiting; false when it has none. */
bool sm_free_steal_mark(sm_heap_t *heap) {
  if (!sm_xbuf_pending(heap)) return false;
  atomic_store_explicit(&heap->xbuf_steal, 1, SM_XB_ORDER);
  return true;
}

/* After marking every heap: the barrier; false when it failed (then
 * sm_free_steal_send only unmarks, and no batch is sent from now on). */
bool sm_free_steal_barrier(void) {
  int cmd = atomic_load_explicit(&sm_steal_cmd, memory_order_relaxed);
  bool ok = cmd > 0 && syscall(SYS_membarrier, cmd, 0, 0) == 0;
  if (!ok) atomic_store_explicit(&sm_steal_cmd, 0, memory_order_relaxed);
  atomic_thread_fence(memory_order_seq_cst);
  return ok;
}

/* Send a marked heap's batches unless its owner is at them (or the
 * barrier failed: ok false), and unmark it; whether they were sent. */
bool sm_free_steal_send(sm_heap_t *heap, bool ok) {
  bool sent = false;
  if (ok && !atomic_load_explicit(&heap->xbuf_busy, SM_XB_ACQUIRE)) {
    sm_xbuf_send_all(sm_heap(), heap);
    sent = true;
  }
  atomic_store_explicit(&heap->xbuf_steal, 0, memory_order_release);
  return sent;
}

/* The first slot of the page's pair: the top bits of a multiplicative
 * hash of its address, shifted to the slot's offset in one step (x86-64:
 * imul, shr, and, lea), and the other slot of x's pair. */
_Static_assert(sizeof(sm_xbuf_t) == 32, "sm_xbuf_first: 32-byte slots");
static inline sm_xbuf_t *sm_xbuf_first(sm_heap_t *heap, const sm_page_t *page) {
  uintptr_t off = ((uintptr_t)page * 0x9E3779B97F4A7C15ull) >> (64 - SM_XBUF_SLOTS_LOG2 - 5) & ~(uintptr_t)31;
  return (sm_xbuf_t *)((char *)heap->xbuf + off);
}

static inline sm_xbuf_t *sm_xbuf_mate(sm_heap_t *heap, const sm_xbuf_t *x) {
  return &heap->xbuf[(x - heap->xbuf) ^ 1];
}

/* Link b (tagged) at the head of x, its page's open batch. */
static inline void sm_xbuf_push(sm_xbuf_t *x, const sm_page_t *page, sm_block_t *b) {
  b->next = sm_enc(page, x->head);
  x->head = b;
  x->count++;
}

/* A page's batch sits in one slot of a pair, so that two pages that a
 * thread frees into by turns (blocks of two classes) rarely send each
 * other's batch early: the slot that holds the page's batch, else a free
 * one of the pair, else the one with more blocks (sent first). */
static sm_xbuf_t *sm_xbuf_find(sm_heap_t *heap, const sm_page_t *page) {
  sm_xbuf_t *a = sm_xbuf_first(heap, page), *b = sm_xbuf_mate(heap, a);
  if (a->page == page) return a;
  if (b->page == page) return b;
  if (a->page == NULL) return a;
  if (b->page == NULL) return b;
  return a->count >= b->count ? a : b;
}

/* The empty slot of the page's pair, NULL when both hold batches. */
static inline sm_xbuf_t *sm_xbuf_vacant(sm_heap_t *heap, const sm_page_t *page) {
  sm_xbuf_t *a = sm_xbuf_first(heap, page);
  if (a->page == NULL) return a;
  sm_xbuf_t *b = sm_xbuf_mate(heap, a);
  return b->page == NULL ? b : NULL;
}

/* Whether b, whose tag says it is not free, was freed already: it is the
 * block a slot of its page's pair sent last, and it still heads the
 * page's thread_free or the owner's hand-over list.  The first free's
 * batch filled with it (or its slot was wanted) and went, and the program
 * wrote over its tag before it freed it again; pushed again, it would
 * link to itself.  A block sent last that heads neither may be live
 * again: it is not reported (if it was freed twice, malloc finds the
 * list it is on twice when it reaches it). */
static bool sm_xbuf_sent_again(sm_heap_t *heap, sm_page_t *page, sm_block_t *b) {
  sm_xbuf_t *x = sm_xbuf_first(heap, page);
  if (sm_likely(x->head != b && sm_xbuf_mate(heap, x)->head != b)) return false;
  if (sm_tf_ptr(page, atomic_load_explicit(&page->thread_free, memory_order_relaxed)) == b) return true;
  sm_heap_t *owner = atomic_load_explicit(&page->owner, memory_order_relaxed);
  return owner != NULL && atomic_load_explicit(&owner->xdelayed, memory_order_relaxed) == b;
}

/* Empty slot x begins the page's batch, whose first block (its tail once
 * sent) is b. */
static inline void sm_xbuf_begin(sm_heap_t *heap, sm_xbuf_t *x, const sm_page_t *page, sm_block_t *b) {
  unsigned i = (unsigned)(x - heap->xbuf);
  x->page = (sm_page_t *)page;
  x->key = (uint32_t)page->key;
  x->head = NULL;
  x->tail = b;
  atomic_store_explicit(&heap->xbuf_used[i / 64],
                        atomic_load_explicit(&heap->xbuf_used[i / 64], memory_order_relaxed) |
                            (uint64_t)1 << (i % 64),
                        memory_order_relaxed);
  sm_background_nudge();   /* to send it, should this thread go idle */
}

/* Add b (tagged) to this thread's batch for its page.  False when b heads
 * its batch already, or heads the batch this thread sent last for the
 * page and is still on its way: freed twice by this thread, its tag
 * overwritten in between (pushed again, it would link to itself). */
static bool sm_xbuf_add(sm_heap_t *heap, sm_page_t *page, sm_block_t *b) {
  sm_xbuf_t *x = sm_xbuf_find(heap, page);
  unsigned i = (unsigned)(x - heap->xbuf);
  if (x->page == page ? x->head == b : sm_xbuf_sent_again(heap, page, b)) return false;
  if (x->page != page) {
    if (x->page != NULL) sm_xbuf_send(heap, x);
    sm_xbuf_begin(heap, x, page, b);
  }
  sm_xbuf_push(x, page, b);
  if (x->count == SM_XBUF_MAX) {
    sm_xbuf_send(heap, x);
    atomic_store_explicit(&heap->xbuf_used[i / 64],
                          atomic_load_explicit(&heap->xbuf_used[i / 64], memory_order_relaxed) &
                              ~((uint64_t)1 << (i % 64)),
                          memory_order_relaxed);
  }
  return true;
}

/* A remote free by a thread with a heap: b (a checked block start) is
 * tagged and joins the thread's batch for its page (counted as the batch
 * is sent, sm_xbuf_send).  Not
 * into a page an exited thread left in the pool (SM_PAGE_ORPHAN; this
 * thread holds as many of its class as it claims): that is pushed at
 * once.  A batch waits for this thread's slow paths, and a thread
 * that frees what exited threads left and then waits, for the rest of
 * the program say, kept those pages and their segments from everyone:
 * under a 256 MiB address-space limit, four threads filled it and
 * exited, main freed their blocks and waited, and a new thread's
 * malloc(100 MiB) failed in 9 runs of 20 (main's own retry, which sent
 * its batches, succeeded).  Pages that live threads gave to the pool
 * stay batched: pushed block by block, mimalloc-bench's xmalloc-test
 * took 1.6 times as long and held 2.5 times the memory. */
static void sm_free_batch(sm_heap_t *heap, sm_page_t *page, sm_block_t *b, const char *who) {
  if (!sm_free_tag_remote(page, b)) return;
  bool pushed;
  if (atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_ORPHAN) {
    size_t bin = page->bin;   /* the page may be gone once b is pushed */
    pushed = sm_tf_push(page, b);
    if (pushed) sm_stats_free_remote(heap, bin, 1);
  } else {
    sm_xbuf_enter(heap);
    pushed = sm_xbuf_add(heap, page, b);
    sm_xbuf_leave(heap);
  }
  if (sm_unlikely(!pushed)) {
    sm_error("%s(): double free of %p", who, (void *)b);
    return;
  }
  sm_background_poll_free();   /* a batch sent may have asked for the purge thread */
}

/* From the inline free: a block start in one of the thread's pages on
 * its full list. */
void sm_free_full(sm_page_t *page, void *p) {
  if (sm_unlikely(!sm_canary_ok(page, (sm_block_t *)p))) { sm_free_generic(p, "free"); return; }
  sm_free_local_slow(page, (sm_block_t *)p, p);
}

/* From the inline free: a block start in another live thread's ordinary
 * page: batched (sm_free_batch). */
static __attribute__((noinline)) void sm_free_xthread_general(sm_heap_t *heap, sm_page_t *page, sm_block_t *b) {
  if (sm_unlikely(!heap->initialized || !sm_canary_ok(page, b))) { sm_free_generic(b, "free"); return; }
  sm_free_batch(heap, page, b, "free");
}

/* A remote free whose page has no open batch, the heap's batches entered
 * (sm_xbuf_try_enter): the block begins one in an empty slot of the
 * page's pair; when neither is empty (a batch to send first), when its
 * tag says it is free already, when it may be on its way already
 * (sm_xbuf_sent_again) or the thread has no heap, the general path takes
 * it.  A thread that frees into many pages between two of its
 * slow paths (each sends every batch) begins many batches:
 * bench_pipeline began 1.7 million of them for 6.1 million remote frees,
 * at 119 instructions each when the general path began them all. */
static __attribute__((noinline)) void sm_free_xthread_begin(sm_heap_t *heap, sm_page_t *page, sm_block_t *b) {
  sm_xbuf_t *x;
  uintptr_t key = page->key;
  if (sm_unlikely((b->tag ^ key) <= SM_TAG_REMOTE || !heap->initialized ||
                  (x = sm_xbuf_vacant(heap, page)) == NULL || sm_xbuf_sent_again(heap, page, b))) {
    sm_xbuf_leave(heap);
    sm_free_xthread_general(heap, page, b);
    return;
  }
  b->tag = key ^ SM_TAG_REMOTE;
  sm_xbuf_begin(heap, x, page, b);
  sm_xbuf_push(x, page, b);
  sm_xbuf_leave(heap);
}

/* The common remote free, a leaf of 32 instructions to its ret (x86-64,
 * gcc 12 -O2; counted when its batch is sent, it makes no call and
 * touches no counter): the block joins the open batch of its page, which
 * has room, and its tag says it is not free yet.  A page with no open
 * batch begins one (above); everything else (a full batch, the secure
 * build's checks, the purge thread at this heap's batches) takes the
 * general path.  heap is the caller's (sm_heap(),
 * which the inline free has read already).  Under valgrind no free comes
 * here: a tracked page's xtid is 0. */
void sm_free_xthread(sm_heap_t *heap, sm_page_t *page, sm_block_t *b) {
  /* the block's line, written last by the thread that allocated it: its
   * tag is read below and written after (bench_pipeline: 0.956 of the
   * time, bench_xchurn 16: 0.958, medians of 15 and 7 interleaved runs) */
  sm_prefetch_write(b);
  if (sm_unlikely(!sm_xbuf_try_enter(heap))) {   /* the purge thread is at the batches */
    sm_xbuf_leave(heap);
    sm_free_xthread_general(heap, page, b);
    return;
  }
  sm_xbuf_t *x = sm_xbuf_first(heap, page);
  if (sm_unlikely(x->page != page)) {   /* the pair's other slot, or none */
    x = sm_xbuf_mate(heap, x);
    if (!SM_CANARY && x->page != page) {
      sm_free_xthread_begin(heap, page, b);
      return;
    }
  }
  uintptr_t key = page->key;
  if (sm_unlikely(SM_CANARY || x->head == b || x->count >= SM_XBUF_MAX - 1 ||
                  (b->tag ^ key) <= SM_TAG_REMOTE)) {
    sm_xbuf_leave(heap);
    sm_free_xthread_general(heap, page, b);
    return;
  }
  b->tag = key ^ SM_TAG_REMOTE;
  sm_xbuf_push(x, page, b);
  sm_xbuf_leave(heap);
}

/* From the inline free: a block start in a page whose xtid is 0 (a
 * SM_PAGE_SLOW_FREE flag, or no live owner).  While profiling, most are
 * frees into a page flagged only for a sample it holds (every sample
 * flags its page until it is freed: in bench_churn e, one free in
 * eighteen): those skip the lookup and checks free did already.  The
 * common one, the owner's free of a block that is no sample into a page
 * off its full list, goes on the owner's list from sm_free_flagged, a
 * leaf (no frame: 14 instructions fewer a free than with the rest of the
 * cases in it); the rest of those frees go from sm_free_flagged_more to
 * the profile, the owner's slow free (a page on its full list: one in
 * twenty of them in bench_churn e, 256 instructions each the long way)
 * or this thread's batch for the page.  Everything else goes the long
 * way. */
static __attribute__((noinline)) void sm_free_flagged_more(sm_heap_t *heap, sm_page_t *page, void *p,
                                                          uint8_t flags) {
  if (SM_CANARY || sm_track_on() || !heap->initialized || (flags & ~SM_PAGE_IN_FULL) != SM_PAGE_SAMPLED) {
    /* an exited thread's page is the first freeing thread's (page.c);
     * the free itself checks the block as ever */
    if ((flags & SM_PAGE_ORPHAN) && heap->initialized) sm_page_claim(heap, page);
    sm_free_generic(p, "free");
    return;
  }
  if (sm_prof_may_be_sample(page, p)) sm_prof_forget(page, p);
  if (atomic_load_explicit(&page->owner, memory_order_relaxed) != heap) {
    sm_free_batch(heap, page, p, "free");
    return;
  }
  if (flags & SM_PAGE_IN_FULL) {   /* on the full list: checked again under the heap lock */
    sm_free_local_slow(page, (sm_block_t *)p, p);
    return;
  }
  if (atomic_load_explicit(&page->sampled, memory_order_relaxed) == 0) sm_prof_page_check(heap, page);
  sm_free_owner_push(page, p);
}

void sm_free_flagged(sm_page_t *page, void *p) {
  sm_heap_t *heap = sm_heap();
  uint8_t flags = atomic_load_explicit(&page->flags, memory_order_relaxed);
  if (SM_CANARY || sm_track_on() || flags != SM_PAGE_SAMPLED || !heap->initialized ||
      atomic_load_explicit(&page->owner, memory_order_relaxed) != heap || sm_prof_may_be_sample(page, p) ||
      atomic_load_explicit(&page->sampled, memory_order_relaxed) == 0) {
    sm_free_flagged_more(heap, page, p, flags);
    return;
  }
  sm_free_owner_push(page, p);
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
  if (seg->kind >= SM_SEG_SPAN) {
    if (p != (void *)page->start) {
      sm_error("%s(): invalid pointer %p (not the start of a block)", who, p);
      return;
    }
    if (sm_unlikely(!sm_large_canary_ok(seg, p))) {
      sm_error("%s(): heap overflow: the canary after block %p was overwritten", who, p);
      return;
    }
    sm_track_free(p, p);
    if (atomic_load_explicit(&sm_prof_live_n, memory_order_relaxed)) sm_prof_forget(NULL, p);
    if (seg->kind == SM_SEG_HUGE) SM_COUNT(heap, huge_frees, 1);
    else SM_COUNT(heap, large_frees, 1);
    if (seg->kind == SM_SEG_SPAN) sm_span_free(seg, page);
    else sm_huge_free(seg);
    sm_background_poll_free();
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
  if (sm_unlikely(page->limit == 0)) {   /* cleared: every block of it was freed (sm_page_clear) */
    sm_error("%s(): double free of %p", who, p);
    return;
  }
  sm_block_t *b = (sm_block_t *)((uint8_t *)p - rem);
  if (rem != 0) {
    /* an aligned pointer carries its mark; anything else inside a block
     * of a page that also holds aligned blocks is not a block start */
    sm_track_mark(p);
    if (sm_unlikely(!sm_aligned_mark_ok(page, p))) {
      if (sm_block_is_free(page, b)) sm_error("%s(): double free of %p", who, p);
      else sm_error("%s(): invalid pointer %p (not the start of a block)", who, p);
      return;
    }
    sm_aligned_mark_clear(p);
  }
  if (sm_unlikely(!sm_canary_ok(page, b))) {
    sm_error("%s(): heap overflow: the canary after block %p was overwritten", who, (void *)b);
    return;
  }
  /* a sampled block leaves the profile (a block freed twice is not found
   * the second time, and is reported below) */
  if ((atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_SAMPLED) && sm_prof_may_be_sample(page, b))
    sm_prof_forget(page, b);
  if (atomic_load_explicit(&page->owner, memory_order_relaxed) == heap) {
    sm_free_local_slow(page, b, p);
    return;
  }
  size_t bin = page->bin;   /* the page may be gone once the block is pushed */
  sm_track_free(p, b);
  if (heap->initialized && !sm_track_on()) {
    /* batched like the common remote free (a page with a sampled or an
     * aligned block, a page in the pool with such a flag) */
    sm_free_batch(heap, page, b, who);
    return;
  }
  if (!sm_free_block_xthread(page, b)) return;
  SM_COUNT(heap, class_frees[bin], 1);
  sm_stats_class_changed(heap, bin, -1, (uint32_t)sm_bin_size(bin));
}
