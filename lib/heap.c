/* Thread heaps: one per thread, reached through one initial-exec TLS
 * pointer that starts at a static empty heap (so the fast path has no
 * "initialised?" test), created on the first slow path, and abandoned at
 * thread exit through a pthread key destructor.  Also process start-up
 * and fork. */
#include "internal.h"
#include "track.h"

#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/single_threaded.h>

sm_page_t sm_page_empty;
sm_heap_t sm_heap_empty = {
  .direct = {[0 ... SM_DIRECT_COUNT - 1] = &sm_page_empty},
};
sm_heap_t sm_heap_exited = {
  .direct = {[0 ... SM_DIRECT_COUNT - 1] = &sm_page_empty},
};
static sm_heap_t *sm_heap_alloc_struct(void);
static sm_heap_t *sm_heap_unpark(void);
static void sm_heaps_parked_count_locked(void);
static sm_heap_t sm_heap_shared_first;
sm_heap_t *sm_heap_shared = &sm_heap_shared_first;
__thread sm_heap_t *sm_heap_tls __attribute__((tls_model("initial-exec"))) = &sm_heap_empty;
uintptr_t sm_secret;
#if SM_TRACK
bool sm_valgrind;

/* Only memcheck needs the blocks; under callgrind or cachegrind the fast
 * paths must stay what they are.  valgrind preloads its tool's library. */
bool sm_track_memcheck(void) {
  extern char **environ;
  for (char **e = environ; e && *e; e++) {
    if (strncmp(*e, "LD_PRELOAD=", 11) == 0 && strstr(*e, "vgpreload_memcheck")) return true;
  }
  return false;
}
#endif

static pthread_key_t sm_heap_key;
static pthread_mutex_t sm_heaps_mutex = PTHREAD_MUTEX_INITIALIZER;
static sm_heap_t *sm_heaps_all;      /* live heaps */
static sm_heap_t *sm_heaps_pool;     /* heaps of exited threads, for reuse (below) */
static _Atomic uint32_t sm_heaps_pool_whole;   /* those whose struct is resident (written under the lock) */
static void sm_heaps_pool_whole_add(int32_t n) {
  atomic_store_explicit(&sm_heaps_pool_whole, atomic_load_explicit(&sm_heaps_pool_whole, memory_order_relaxed) + (uint32_t)n,
                        memory_order_relaxed);
}
/* heaps of exited threads that wait for the next thread, newest first,
 * linked through pool_next (below: heaps that wait) */
static sm_heap_t *sm_heaps_parked;
static _Atomic uint32_t sm_heaps_parked_n;        /* their number (written under the lock) */
static _Atomic uint64_t sm_heaps_parked_oldest;   /* when the oldest began to wait (sm_clock_ms) */
static uint8_t *sm_heaps_chunk;      /* bump area for new heaps */
static size_t sm_heaps_chunk_left;
_Atomic uint64_t sm_heaps_live;      /* heaps on sm_heaps_all (read without the lock: a hint) */

_Atomic int sm_process_ready;        /* 0 no, 1 in progress, 2 done */
uint64_t sm_start_ms;                /* sm_clock_ms() at start-up (the reports' running time) */
static _Atomic uintptr_t sm_process_init_thread;

/* ---- the pool of heaps ------------------------------------------------------
 * A heap taken apart (sm_heap_abandon) waits in sm_heaps_pool for a later
 * thread, newest first, which the next thread takes (the warmest); its
 * address is never given back, for pages and blocks may name it still
 * (sm_heap_owner_id).  Its struct, 6 pages of 4 KiB, is resident as its thread
 * left it, 3 of them for a thread that allocated a little: 3,000 threads
 * that each allocated a 64-byte block and exited held 42.6 MB resident
 * after malloc_trim(0), against 10.8 MB with glibc.  Once a purge delay
 * has passed since its thread exited (the purge thread), and at once when
 * the process collects (trim, smalloc_collect(true), an allocation the OS
 * refused), the pages of its struct go back to the OS, but the one that
 * holds its link and what other threads may still touch (from xdelayed
 * to its lock, sm_heap_clear): the next thread it serves finds them zero,
 * as in a fresh struct, and touches only those it writes.  Threads take
 * heaps from the pool's head; a purge takes its tail, from the first heap
 * whose thread exited a delay ago on (those behind it went there before
 * it), off the pool while it gives them back.  sm_heaps_pool_whole counts
 * the pooled heaps not given back, a hint that spares the purge thread
 * the lock. */
#define SM_HEAP_BYTES (((sizeof(sm_heap_t) + SM_OS_PAGE - 1) & ~(SM_OS_PAGE - 1)))   /* a struct's pages */
#define SM_HEAP_KEPT_LO (offsetof(sm_heap_t, pool_next) & ~(SM_OS_PAGE - 1))
#define SM_HEAP_KEPT_HI ((offsetof(sm_heap_t, lock) + sizeof(sm_lock_t) + SM_OS_PAGE - 1) & ~(SM_OS_PAGE - 1))
#define SM_HEAP_PURGED_BYTES (SM_HEAP_BYTES - (SM_HEAP_KEPT_HI - SM_HEAP_KEPT_LO))
_Static_assert(offsetof(sm_heap_t, pool_next) < offsetof(sm_heap_t, pooled_ms) &&
                   offsetof(sm_heap_t, struct_purged) < offsetof(sm_heap_t, xdelayed) &&
                   offsetof(sm_heap_t, xdelayed) < offsetof(sm_heap_t, lock) &&
                   SM_HEAP_KEPT_HI <= sizeof(sm_heap_t),
               "a purged heap keeps its pool link, when it was pooled and its shared fields");

/* The contended case of sm_lock: heap locks are held for a few list
 * operations (or one OS call), so spin briefly, then yield. */
void sm_lock_wait(sm_lock_t *l) {
  for (unsigned i = 0;; i++) {
    if (atomic_load_explicit(&l->held, memory_order_relaxed) == 0 &&
        atomic_exchange_explicit(&l->held, 1, memory_order_acquire) == 0)
      return;
    if (i >= 64) sched_yield();
    else __builtin_ia32_pause();
  }
}

void sm_heaps_lock(void) { pthread_mutex_lock(&sm_heaps_mutex); }
void sm_heaps_unlock(void) { pthread_mutex_unlock(&sm_heaps_mutex); }
sm_heap_t *sm_heaps_first(void) { return sm_heaps_all; }

/* Whether a notice came into a watched heap (sm_heap_claim_full) since
 * its last claim: the purge thread's last look before it exits, made
 * after it said it stopped (a notice's thread looks at that after its
 * count, free.c: one of the two sees the other). */
bool sm_heaps_watched_notices(void) {
  bool any = false;
  atomic_thread_fence(memory_order_seq_cst);
  sm_heaps_lock();
  for (sm_heap_t *h = sm_heaps_all; h && !any; h = h->all_next)
    any = atomic_load_explicit(&h->xwatch, memory_order_relaxed) &&
          atomic_load_explicit(&h->xnotices, memory_order_relaxed) >
              atomic_load_explicit(&h->xkept, memory_order_relaxed);
  sm_heaps_unlock();
  return any;
}

/* A heap struct an exited thread left, set to zero for its next thread.
 * Heaps are reused, never unmapped, and another thread may still reach
 * this one through a page or segment it held (free.c: sm_free_hand_over,
 * pool.c: sm_page_send_home) and touch its lists for other threads,
 * closed since its thread exited, and its lock: those are written with
 * atomic stores, the lock not at all (it was left unlocked), and the
 * lists opened last.  A block or page that a thread pushes there for the
 * heap's last life is sent on by its next one, which does not hold it
 * (sm_heap_take_delayed, sm_heap_take_home). */
static void sm_heap_clear(sm_heap_t *heap) {
  size_t shared = offsetof(sm_heap_t, xdelayed), owned = offsetof(sm_heap_t, lock) + sizeof heap->lock;
  /* a purged struct reads as zero but in the pages it kept (below) */
  size_t lo = 0, hi = sizeof *heap;
  if (heap->struct_purged) {
    lo = SM_HEAP_KEPT_LO;
    hi = SM_HEAP_KEPT_HI;
    sm_gadd(bytes_committed, SM_HEAP_PURGED_BYTES);   /* touched again from now on */
  }
  memset((char *)heap + lo, 0, shared - lo);
  memset((char *)heap + owned, 0, hi - owned);
  atomic_store_explicit(&heap->xnotices, 0, memory_order_relaxed);
  atomic_store_explicit(&heap->xwatch, 0, memory_order_relaxed);
  atomic_store_explicit(&heap->xkept, 0, memory_order_relaxed);
  atomic_store_explicit(&heap->xhome, NULL, memory_order_release);
  atomic_store_explicit(&heap->xdelayed, NULL, memory_order_release);
}

/* fork (fork.c): in the child only the forking thread lives on.  The heap
 * list, and any heap whose lock a lost thread held, may be half-changed:
 * such a list is rebuilt from the caller's heap alone and such a heap is
 * dropped (its memory stays mapped, unused).  If the caller's own heap is
 * one, the caller starts a fresh heap: its old pages carry the old heap's
 * owner id, so frees of its blocks go to their pages' thread_free.  The
 * other threads' heaps stay listed, with their retired pages and segment
 * lists, for trim and the purge thread to release; their owner ids match
 * no heap of the child. */
void sm_heaps_fork_child(void) {
  sm_heap_t *me = sm_heap_tls;
  if (sm_fork_mutex_was_held(&sm_heaps_mutex)) {
    sm_heaps_all = NULL;
    sm_heaps_pool = NULL;
    sm_heaps_parked = NULL;
    sm_heaps_chunk = NULL;
    sm_heaps_chunk_left = 0;
    if (me->initialized) {
      me->all_next = me->all_prev = NULL;
      sm_heaps_all = me;
    }
  }
  for (sm_heap_t *h = sm_heaps_all, *next; h; h = next) {
    next = h->all_next;
    if (!sm_fork_lock_was_held(&h->lock)) continue;
    if (h->all_prev) h->all_prev->all_next = h->all_next; else sm_heaps_all = h->all_next;
    if (h->all_next) h->all_next->all_prev = h->all_prev;
    if (h == me) sm_heap_tls = &sm_heap_empty;
    h->parked_ms = UINT64_MAX;   /* dropped: off the waiting heaps below */
  }
  /* the pool's heaps: a tail that a purge had taken off it is lost to
   * the child with the purging thread */
  uint32_t whole = 0;
  for (sm_heap_t *h = sm_heaps_pool; h; h = h->pool_next) whole += !h->struct_purged;
  atomic_store_explicit(&sm_heaps_pool_whole, whole, memory_order_relaxed);
  /* the waiting heaps that are still listed wait on */
  for (sm_heap_t **at = &sm_heaps_parked; *at;) {
    if ((*at)->parked_ms == UINT64_MAX) *at = (*at)->pool_next;
    else at = &(*at)->pool_next;
  }
  sm_heaps_parked_count_locked();
  /* the shared segments' holder: its lists may be half-changed, so its
   * segments are left to it (the pages released into them are lost in
   * the child) and threads share new ones */
  sm_fork_mutex_was_held(&sm_shared_map_lock);   /* guards no data of its own */
  if (sm_heap_shared && sm_fork_lock_was_held(&sm_heap_shared->lock)) {
    sm_heap_shared = sm_heap_alloc_struct();
  }
  /* the child's one thread: the other heaps listed are of threads that
   * did not come along (their memory stays theirs, as an idle thread's);
   * counted live, they kept the child's purge thread from ending with
   * its last thread (sm_background_last_thread) */
  atomic_store_explicit(&sm_heaps_live, sm_heap_tls->initialized ? 1 : 0, memory_order_relaxed);
}

/* Idempotent; survives being entered before constructors run and
 * recursively from its own pthread calls (which do not allocate on glibc,
 * but a recursive entry simply goes on with defaults). */
void sm_process_init(void) {
  if (atomic_load_explicit(&sm_process_ready, memory_order_acquire) == 2) return;
  int expected = 0;
  if (atomic_compare_exchange_strong(&sm_process_ready, &expected, 1)) {
    atomic_store(&sm_process_init_thread, sm_thread_id());
    sm_start_ms = sm_clock_ms();
    uintptr_t secret;
    sm_os_random(&secret, sizeof secret);
    sm_secret = secret | 1;
    sm_track_detect();
    sm_options_init();
    sm_prof_init();
    pthread_key_create(&sm_heap_key, sm_heap_thread_done);
    sm_fork_init();
    atomic_store_explicit(&sm_process_ready, 2, memory_order_release);
    return;
  }
  if (atomic_load(&sm_process_init_thread) == sm_thread_id()) return;   /* recursion */
  while (atomic_load_explicit(&sm_process_ready, memory_order_acquire) != 2) {
  }
}

/* A heap struct for a new thread, set to zero: one an exited thread left
 * (cleared), else a new one, whole pages of a fresh mapping, which are
 * zero as the OS gave them and left untouched, so that a thread that
 * allocates a little keeps to the pages of the struct it writes: 3 of 5
 * for a thread that uses a few small classes (sm_heap_t puts what it
 * may never use last).  3,000 threads that each allocate a 1000-byte
 * block: 99 MB resident when each struct was cleared whole, 75.5 MB so
 * (glibc alone: 31 MB). */
static sm_heap_t *sm_heap_alloc_struct(void) {
  sm_heap_t *heap = NULL;
  bool reused = false;
  sm_heaps_lock();
  if (sm_heaps_pool) {
    heap = sm_heaps_pool;
    sm_heaps_pool = heap->pool_next;
    if (!heap->struct_purged) sm_heaps_pool_whole_add(-1);
    reused = true;
  } else {
    size_t size = SM_HEAP_BYTES;
    if (sm_heaps_chunk_left < size) {
      void *p;
      size_t chunk = 64 * size;
      if (sm_os_map(chunk, &p) == 0) {
        sm_heaps_chunk = p;
        sm_heaps_chunk_left = chunk;
      }
    }
    if (sm_heaps_chunk_left >= size) {
      heap = (sm_heap_t *)sm_heaps_chunk;
      sm_heaps_chunk += size;
      sm_heaps_chunk_left -= size;
    }
  }
  sm_heaps_unlock();
  if (reused) sm_heap_clear(heap);
  return heap;
}

/* xorshift64*: page keys, and free-list order in the secure build */
uint64_t sm_heap_random(sm_heap_t *heap) {
  uint64_t x = heap->rng;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  heap->rng = x;
  return x * 0x2545F4914F6CDD1Dull;
}

/* The calling thread's heap from now on, new or one that waited. */
static sm_heap_t *sm_heap_start(sm_heap_t *heap) {
  size_t live = atomic_fetch_add_explicit(&sm_heaps_live, 1, memory_order_relaxed) + 1;
  /* another thread lives, or has lived (a program that calls smalloc_*
   * from its threads only): the purge thread is started at the end of
   * this malloc, as a free may not start it (background.c) */
  if (live >= 2 || !__libc_single_threaded) sm_background_want();
  sm_heap_tls = heap;
  if (atomic_load(&sm_process_ready) == 2) pthread_setspecific(sm_heap_key, heap);
  return heap;
}

sm_heap_t *sm_heap_init_thread(void) {
  sm_process_init();
  sm_heap_t *heap = sm_heap_unpark();
  if (heap) return sm_heap_start(heap);
  heap = sm_heap_alloc_struct();
  if (!heap) return NULL;
  atomic_init(&heap->next_expire, SM_NO_EXPIRY);
  for (size_t i = 0; i < SM_DIRECT_COUNT; i++) heap->direct[i] = &sm_page_empty;
  /* a heap is reused by later threads: a count of seedings keeps it from
   * drawing the same page keys again */
  static _Atomic uint64_t seedings;
  uint64_t n = atomic_fetch_add_explicit(&seedings, 1, memory_order_relaxed) + 1;
  heap->rng = (sm_secret ^ (uintptr_t)heap ^ (n * 0x9E3779B97F4A7C15ull)) | 1;
  heap->serial = n;
  heap->initialized = 1;
  sm_stats_pub_reset(heap);
  heap->stats.threads_started = 1;
  sm_heaps_lock();
  heap->all_prev = NULL;
  heap->all_next = sm_heaps_all;
  if (sm_heaps_all) sm_heaps_all->all_prev = heap;
  sm_heaps_all = heap;
  sm_heaps_unlock();
  return sm_heap_start(heap);
}

/* ---- heaps that wait for the next thread ------------------------------------
 * A thread's heap outlives the thread for a while, whole: its pages,
 * their free lists, its retired pages and segments, as the thread left
 * them.  The next thread to start takes it as its own (the newest
 * first: its pages are the warmest) and allocates at once from pages
 * whose blocks are built and whose memory is resident.  A heap that
 * waits in vain is taken apart as an exiting thread's used to be
 * (sm_heap_abandon): once it has waited a purge delay (the purge thread,
 * or the slow path of any thread, as there may be no purge thread), when
 * more than
 * SMALLOC_HEAP_CACHE heaps wait (the oldest), and at once when the
 * process collects (trim, smalloc_collect(true), an allocation the OS
 * refused).  Meanwhile the purge thread treats it as an idle thread's
 * heap, idle since it began to wait: once it has waited a purge delay,
 * the memory of its free pages goes back, and then, in the same round,
 * the heap is taken apart (taken apart first, its pages would go back to
 * their segments and wait a delay more there).  A thread that freed a 64 MiB burst of 128-byte
 * blocks and exited: resident under 12 MB 1.2 s after its exit, as when
 * it was taken apart at once (purge delay 1 s).
 * Why: taking a heap apart walks the free list of every page it
 * allocated from (used alone counts the blocks handed out and those on
 * the free list: sm_page_t), sends its pages to the pool and its
 * segments to the abandoned list, and the next thread carved fresh
 * pages of its own meanwhile, each 4 KiB faulted in.  bench_server relay
 * (16 workers that each start a successor and exit): 7.3 % of the run
 * was spent taking heaps apart, 15 % in page faults; with heaps that
 * wait, 0.220 s against 0.257 s and 150 MB resident against 208 MB
 * (medians of 7 interleaved runs).
 * The invariants:
 *   - a heap is live (its thread's), waiting (on sm_heaps_parked, no
 *     thread's) or pooled (a struct for reuse); a waiting heap stays on
 *     sm_heaps_all, so its counts are read, trim and the purge thread
 *     treat it as an idle thread's, and its pages keep its owner id
 *     (the heap's address): other threads' frees reach it as they
 *     reached its thread, and the next thread's own frees are local;
 *   - it is taken off sm_heaps_parked under the heaps lock, by the one
 *     thread that then owns it: an adopting thread, or one that takes it
 *     apart; the lock orders everything its last thread wrote before
 *     everything the next one reads;
 *   - sm_heaps_live counts the heaps of live threads: a waiting heap is
 *     not one;
 *   - its counts were published when its thread exited; a statistics
 *     read folds its pages' pending counts (sm_heaps_fold_parked), as a
 *     thread's own read folds its own. */

/* sm_heaps_parked_n and sm_heaps_parked_oldest from the list, after each
 * change to it; under the heaps lock. */
static void sm_heaps_parked_count_locked(void) {
  uint32_t n = 0;
  uint64_t oldest = UINT64_MAX;
  for (sm_heap_t *h = sm_heaps_parked; h; h = h->pool_next, n++)
    if (h->parked_ms < oldest) oldest = h->parked_ms;
  atomic_store_explicit(&sm_heaps_parked_n, n, memory_order_relaxed);
  atomic_store_explicit(&sm_heaps_parked_oldest, oldest, memory_order_relaxed);
}

/* Take the heaps off sm_heaps_parked that began to wait before `before`
 * (all of them for UINT64_MAX), and the oldest while more than keep
 * wait; under the heaps lock.  Returns them, linked through pool_next. */
static sm_heap_t *sm_heaps_parked_take_locked(uint64_t before, uint32_t keep) {
  sm_heap_t **at = &sm_heaps_parked, *taken = NULL;
  uint32_t n = 0;
  while (*at) {
    sm_heap_t *h = *at;
    if (n >= keep || h->parked_ms < before) {
      *at = h->pool_next;
      h->pool_next = taken;
      taken = h;
      h->pooled_ms = h->parked_ms;   /* its thread's exit: when it began to wait */
      h->parked_ms = 0;
      continue;
    }
    n++;
    at = &h->pool_next;
  }
  sm_heaps_parked_count_locked();
  return taken;
}

/* The process takes a heap apart: empty pages go back to their segments
 * (those of the shared segments too, which a thread's pages mostly are),
 * pages with live blocks to the process's pool (any thread takes them),
 * the segments it held to the abandoned list; the counters are folded
 * into the process totals and the struct is kept for a later thread.
 * Run by its thread at exit, or by any thread for a heap that waited in
 * vain (then nobody's but the caller's, sm_heaps_parked_take_locked). */
static void sm_heap_abandon(sm_heap_t *heap) {
  sm_heap_close_delayed(heap);
  /* the free lists it allocated from go onto local_free, each walked
   * once: used alone says then which of its pages are empty
   * (sm_page_live), as the pool needs (bench_server relay: 4.8 % of the
   * run in the walks when each of the steps below walked them) */
  for (size_t bin = 1; bin < SM_BIN_COUNT; bin++)
    if (heap->queues[bin].first) sm_page_free_to_local(heap->queues[bin].first);
  sm_heap_collect_retired(heap, true);
  sm_heap_unfull_all(heap);
  for (size_t bin = 1; bin < SM_BIN_COUNT; bin++) {
    sm_page_t *page;
    while ((page = heap->queues[bin].first) != NULL) {
      /* what other threads sent, then whatever is on its free list (a
       * batch of theirs, often) onto local_free, walked once: used is
       * exact for the test and for the pool */
      sm_page_collect_thread_free(page);
      sm_page_free_to_local(page);
      if (!(sm_page_vacant(page) && sm_page_release(heap, page))) sm_page_donate(heap, page, true);
    }
  }
  sm_heap_take_home(heap);
  if (sm_heap_shared) sm_heap_take_home(sm_heap_shared);
  sm_segment_abandon_heap(heap);
  sm_heap_close_home(heap);
  uint64_t now = sm_clock_ms();
  sm_heaps_lock();
  if (heap->all_prev) heap->all_prev->all_next = heap->all_next; else sm_heaps_all = heap->all_next;
  if (heap->all_next) heap->all_next->all_prev = heap->all_prev;
  sm_stats_thread_exit(heap);   /* under the heaps lock: readers see it once */
  heap->initialized = 0;
  heap->pool_next = sm_heaps_pool;
  if (heap->pooled_ms == 0) heap->pooled_ms = now;   /* else it waited parked since then */
  sm_heaps_pool = heap;
  sm_heaps_pool_whole_add(1);
  sm_heaps_unlock();
}

/* Give back the struct of a pooled heap, but the pages it keeps (above);
 * nobody else holds it.  False when the OS refused (it stays whole). */
static bool sm_heap_purge_struct(sm_heap_t *heap) {
  uint8_t *p = (uint8_t *)heap;
  sm_assert(((uintptr_t)p & (SM_OS_PAGE - 1)) == 0);
  if (SM_HEAP_KEPT_LO > 0 && sm_os_purge(p, SM_HEAP_KEPT_LO) != 0) return false;
  if (SM_HEAP_BYTES > SM_HEAP_KEPT_HI && sm_os_purge(p + SM_HEAP_KEPT_HI, SM_HEAP_BYTES - SM_HEAP_KEPT_HI) != 0)
    return false;
  sm_gsub(bytes_committed, SM_HEAP_PURGED_BYTES);
  sm_gadd(heaps_purged, 1);
  heap->struct_purged = 1;
  return true;
}

/* Give back the structs of the pooled heaps whose threads exited a delay
 * ago or longer (every one for 0), outside the lock: the tail of the pool
 * they are is taken off it meanwhile, and a thread that starts meanwhile
 * takes a newer heap or a new struct.  Returns whether pooled heaps wait
 * for their delay still. */
bool sm_heaps_pool_purge(uint64_t now, uint64_t delay) {
  if (atomic_load_explicit(&sm_heaps_pool_whole, memory_order_relaxed) == 0) return false;
  sm_heaps_lock();
  sm_heap_t **at = &sm_heaps_pool;
  while (*at && now - (*at)->pooled_ms < delay) at = &(*at)->pool_next;
  sm_heap_t *tail = *at;
  *at = NULL;
  sm_heaps_unlock();
  uint32_t purged = 0;
  for (sm_heap_t *h = tail; h; h = h->pool_next)
    if (!h->struct_purged && sm_heap_purge_struct(h)) purged++;
  sm_heaps_lock();
  for (at = &sm_heaps_pool; *at;) at = &(*at)->pool_next;
  *at = tail;
  sm_heaps_pool_whole_add(-(int32_t)purged);
  bool left = atomic_load_explicit(&sm_heaps_pool_whole, memory_order_relaxed) != 0;
  sm_heaps_unlock();
  return left;
}

/* Take apart the heaps of a chain sm_heaps_parked_take_locked returned. */
static void sm_heaps_abandon_chain(sm_heap_t *h) {
  for (sm_heap_t *next; h; h = next) {
    next = h->pool_next;
    h->pool_next = NULL;
    sm_heap_abandon(h);
  }
}

/* Take apart the heaps that have waited a purge delay, or all of them;
 * returns whether any still waits.  Any thread, holding no lock. */
bool sm_heaps_parked_expire(uint64_t now, bool all) {
  if (atomic_load_explicit(&sm_heaps_parked_n, memory_order_relaxed) == 0) return false;
  uint64_t delay = sm_purge_delay(now);
  uint64_t before = all ? UINT64_MAX : now < delay ? 0 : now - delay + 1;
  if (!all && atomic_load_explicit(&sm_heaps_parked_oldest, memory_order_relaxed) >= before) return true;
  sm_heaps_lock();
  sm_heap_t *taken = sm_heaps_parked_take_locked(all ? UINT64_MAX : before, UINT32_MAX);
  bool left = sm_heaps_parked != NULL;
  sm_heaps_unlock();
  sm_heaps_abandon_chain(taken);
  return left;
}

/* Whether a heap waits; a hint, read without the lock. */
bool sm_heaps_parked_any(void) { return atomic_load_explicit(&sm_heaps_parked_n, memory_order_relaxed) != 0; }

/* Fold the pending counts of the pages of every waiting heap, under the
 * heaps lock (a statistics read): no thread owns them meanwhile. */
void sm_heaps_fold_parked(void) {
  for (sm_heap_t *h = sm_heaps_parked; h; h = h->pool_next) sm_stats_fold_heap(h);
}

/* An exiting thread's heap waits for the next thread, unless
 * SMALLOC_HEAP_CACHE or SMALLOC_PURGE_DELAY is 0; false when it does not.
 * The oldest waiting heap beyond SMALLOC_HEAP_CACHE is taken apart. */
static bool sm_heap_park(sm_heap_t *heap) {
  long keep = sm_opt(HEAP_CACHE);
  if (keep <= 0 || sm_opt(PURGE_DELAY) == 0) return false;
  sm_stats_publish_all(heap);
  uint64_t now = sm_clock_ms();
  sm_heaps_lock();
  heap->parked_ms = now;
  /* idle from now on, to the purge thread (background.c) */
  heap->bg_cycle = __atomic_load_n(&heap->cycle, __ATOMIC_RELAXED);
  heap->bg_seen_ms = now;
  heap->pool_next = sm_heaps_parked;
  sm_heaps_parked = heap;
  sm_heap_t *taken = sm_heaps_parked_take_locked(0, (uint32_t)keep);
  sm_heaps_unlock();
  sm_heaps_abandon_chain(taken);
  sm_background_wake();   /* to take it apart if no thread comes */
  return true;
}

/* A starting thread takes the newest waiting heap, or NULL. */
static sm_heap_t *sm_heap_unpark(void) {
  if (!sm_heaps_parked_any()) return NULL;
  sm_heaps_lock();
  sm_heap_t *heap = sm_heaps_parked;
  if (heap) {
    sm_heaps_parked = heap->pool_next;
    heap->pool_next = NULL;
    heap->parked_ms = 0;
    sm_heaps_parked_count_locked();
  }
  sm_heaps_unlock();
  if (heap) {
    /* the last thread's stacks: this thread's are elsewhere (prof.c) */
    memset(heap->prof_memo, 0, sizeof heap->prof_memo);
    sm_cnt_add(heap->stats.threads_started, 1);
  }
  return heap;
}

/* Thread exit: the batches of frees the thread holds for other threads'
 * pages are sent, and its heap waits for the next thread (above) or is
 * taken apart now. */
void sm_heap_thread_done(void *arg) {
  sm_heap_t *heap = arg;
  if (heap == NULL || !heap->initialized) return;
  sm_heap_tls = &sm_heap_exited;
  sm_free_flush_remote(heap);
  sm_cnt_add(heap->stats.threads_exited, 1);
  bool last = atomic_fetch_sub(&sm_heaps_live, 1) == 1;   /* before the flag (background.c) */
  if (!sm_heap_park(heap)) sm_heap_abandon(heap);
  if (last) sm_background_last_thread();
  else sm_background_poll();
}

/* Give back everything that holds no live block, whichever thread freed
 * it: the caller's own empty pages, the blocks handed to it and the
 * pages of its full list it freed blocks into (sm_heap_wake_full), every
 * abandoned segment (held by the caller from now on), the retired pages
 * of every other live heap and the pages of their full lists that other
 * threads freed (their owners may be idle or blocked), the
 * pages in the pool that other threads' frees emptied, the empty pages
 * sent home to every heap, the free pages left in every heap's segments
 * (decommitted), and then the whole segment cache, unmapped.  Memory
 * that other threads freed into the pages a live owner allocates from (at
 * most a page or so per size class) comes back when that owner next
 * allocates.  Returns whether the mapped bytes fell. */
bool sm_collect_process(sm_heap_t *self) {
  uint64_t before = atomic_load(&sm_gstats.bytes_mapped);
  sm_heaps_parked_expire(0, true);   /* the heaps that wait for a thread first */
  sm_heaps_pool_purge(0, 0);         /* and their structs, with those pooled before */
  if (self->initialized) {
    sm_free_flush_remote(self);
    sm_heap_collect_delayed(self);
    sm_heap_wake_full(self);
    sm_heap_reclaim_all(self);
    sm_heap_collect_retired(self, true);
  }
  sm_pool_collect(self);
  sm_pool_purge(sm_clock_ms(), 0);
  sm_heaps_lock();
  for (sm_heap_t *h = sm_heaps_all; h; h = h->all_next) {
    if (h != self) {
      sm_heap_claim_retired(h, self);
      sm_heap_claim_full(h, self);
    }
    sm_heap_take_home(h);
    sm_heap_decommit(h, true);
  }
  sm_heaps_unlock();
  sm_heap_shared_tidy(true);
  sm_segment_decommit_abandoned(sm_clock_ms(), 0);
  sm_segments_purge_open(true);
  sm_segment_cache_collect(true);
  return atomic_load(&sm_gstats.bytes_mapped) < before;
}

__attribute__((constructor)) static void sm_constructor(void) {
  sm_process_init();
  sm_options_init();
  sm_prof_init();
  sm_prof_init_late();
  /* the first allocation may have come before the environment was set:
   * pages made from now on are tracked (earlier ones stay consistently
   * untracked: their blocks never reach memcheck either way) */
  if (!sm_track_on()) sm_track_detect();
}
