/* The purge thread: memory goes back while the program is idle.
 *
 * Everything else in smalloc gives memory back on its slow paths, which
 * a program that has stopped calling the allocator never takes.  So once
 * there is something to give back (a cached segment, a kept huge mapping,
 * a retired page), the next slow path or free that sees no purge thread
 * running starts one.  Every quarter of SMALLOC_PURGE_DELAY it
 *   - releases the retired pages of every heap whose thread ran no
 *     slow-path step for a whole purge delay, and the pages of its full
 *     list that other threads freed (sm_heap_claim_retired and
 *     sm_heap_claim_full, as trim does: that thread may be busy
 *     elsewhere, blocked or sleeping); blocks freed into the full pages
 *     of a heap, SM_BG_NOTICES of its pages or more, also start the
 *     thread, which waits for that heap to take them or go idle,
 *     then purges the segments this left empty at once (they have been
 *     idle that long already), and gives back the memory of the free pages
 *     left in that heap's segments;
 *   - releases the pages of the other heaps that have been retired for
 *     the purge delay (sm_heap_release_stale): a thread that calls in
 *     now and then is not idle, but its burst is over;
 *   - gives back to their segments the pages that other threads' frees
 *     emptied in the pool, and the empty pages sent home to each heap
 *     (pool.c);
 *   - gives back the memory of free pages that have been free in any
 *     heap's segments for the delay;
 *   - purges cached segments and kept huge mappings older than the delay.
 * When nothing is left to purge it exits, so a program that has gone
 * quiet has no extra thread, and the next free of a large block or the
 * next slow path starts another.  Measured on this design's target, a
 * burst of 64 MiB of small blocks freed and then idle: resident size back
 * within 1.5 purge delays (tests/large.c).
 *
 * Why a thread and not a timer signal: a signal interrupts the program's
 * own system calls and could land inside smalloc; the thread needs no
 * cooperation.  What it costs: one thread while there is memory to give
 * back, detached (exit never waits for it), all signals blocked, and a
 * 64 KiB stack.  It never allocates (its heap stays the static empty one)
 * and is not running in a child after fork until the child gives memory
 * back itself.  SMALLOC_BACKGROUND=0 turns it off: then memory goes back
 * only when the program calls in, as before. */
#include "internal.h"

#include <pthread.h>
#include <signal.h>
#include <time.h>

/* 0 no thread, 1 running (or being started) */
static _Atomic int sm_bg_running;
/* after pthread_create failed (a thread limit, say): no new try before */
static _Atomic uint64_t sm_bg_retry_ms;

static uint64_t sm_bg_tick_ms(void) {
  uint64_t d = (uint64_t)sm_opt(PURGE_DELAY) / 4;
  return d < 10 ? 10 : d > 1000 ? 1000 : d;
}

static void sm_bg_sleep(uint64_t ms) {
  struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0) {
  }
}

/* One round; returns whether anything is left to purge later. */
static bool sm_bg_round(void) {
  uint64_t now = sm_clock_ms();
  uint64_t delay = (uint64_t)sm_opt(PURGE_DELAY);
  bool left = false, claimed = false;
  sm_heap_t *self = sm_heap();   /* the static empty heap: counts go to the orphan totals */
  sm_heaps_lock();
  for (sm_heap_t *h = sm_heaps_first(); h; h = h->all_next) {
    uint32_t cycle = __atomic_load_n(&h->cycle, __ATOMIC_RELAXED);
    if (cycle != h->bg_cycle || h->bg_seen_ms == 0) {
      h->bg_cycle = cycle;
      h->bg_seen_ms = now;
    }
    bool idle = now - h->bg_seen_ms >= delay;
    if (sm_heap_has_retired(h)) {
      if (idle) {
        sm_heap_claim_retired(h, self);
        claimed = true;
      } else {
        sm_heap_release_stale(h, self, now, delay);
        left = left || sm_heap_has_retired(h);
      }
    }
    if (idle) {
      if (sm_heap_claim_full(h, self)) claimed = true;
    } else if (atomic_load_explicit(&h->xnotices, memory_order_relaxed) >= SM_BG_NOTICES) {
      left = true;   /* full pages freed for a thread that may be going idle */
    }
    sm_heap_take_home(h);
    sm_heap_decommit(h, idle);
  }
  sm_heaps_unlock();
  sm_heap_shared_tidy(false);
  sm_pool_collect(self);
  if (claimed) sm_segment_cache_purge_all();
  sm_segment_cache_collect(false);
  return left || sm_segment_cache_pending();
}

static void *sm_bg_main(void *arg) {
  (void)arg;
  for (;;) {
    sm_bg_sleep(sm_bg_tick_ms());
    if (sm_bg_round()) continue;
    atomic_store_explicit(&sm_bg_running, 0, memory_order_seq_cst);
    /* memory that came meanwhile found the thread still running: take it
     * on, unless another thread has started meanwhile */
    int expected = 0;
    if (!(sm_segment_cache_pending() || sm_heaps_watched_notices()) ||
        !atomic_compare_exchange_strong(&sm_bg_running, &expected, 1))
      return NULL;
  }
}

/* There may be something to give back: a purge thread is wanted.  It is
 * started later, at the end of the malloc or free that asked
 * (sm_background_poll): pthread_create allocates (the new thread's TLS
 * vector), and a malloc nested inside the slow path, in the middle of a
 * walk over the heap's queues, could retire or move the very pages that
 * walk holds on to. */
_Atomic int sm_bg_wanted;

void sm_background_wake(void) {
  if (sm_likely(atomic_load_explicit(&sm_bg_running, memory_order_relaxed) != 0)) return;
  atomic_fetch_or_explicit(&sm_bg_wanted, SM_WANT_PURGE_THREAD, memory_order_relaxed);
}

/* Do what was asked (sm_bg_wanted): print the report that came due, start
 * the purge thread if it is not running.  Only where the calling thread
 * holds no smalloc lock and no page state. */
void sm_background_act(void) {
  int wanted = atomic_exchange_explicit(&sm_bg_wanted, 0, memory_order_relaxed);
  if (wanted & SM_WANT_REPORT) sm_stats_periodic();
  if (!(wanted & SM_WANT_PURGE_THREAD)) return;
  if (sm_likely(atomic_load_explicit(&sm_bg_running, memory_order_relaxed) != 0)) return;
  if (!sm_opt(BACKGROUND) || atomic_load_explicit(&sm_process_ready, memory_order_acquire) != 2)
    return;
  uint64_t retry = atomic_load_explicit(&sm_bg_retry_ms, memory_order_relaxed);
  if (retry != 0 && sm_clock_ms() < retry) return;
  int expected = 0;
  if (!atomic_compare_exchange_strong(&sm_bg_running, &expected, 1)) return;
  pthread_attr_t attr;
  pthread_t t;
  sigset_t all, old;
  sigfillset(&all);
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_attr_setstacksize(&attr, 64 << 10);
  pthread_sigmask(SIG_SETMASK, &all, &old);   /* the thread inherits: no signal lands there */
  /* what glibc allocates for the thread (its TLS vector, live for good)
   * is no call site's doing: not sampled, where the profile named the
   * caller whose free started the thread */
  int busy = sm_prof_hush(SM_PROF_NO_SAMPLE);
  int err = pthread_create(&t, &attr, sm_bg_main, NULL);
  sm_prof_hush_end(busy);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  pthread_attr_destroy(&attr);
  if (err != 0) {
    atomic_store_explicit(&sm_bg_retry_ms, sm_clock_ms() + 1000, memory_order_relaxed);
    atomic_store_explicit(&sm_bg_running, 0, memory_order_relaxed);
    return;
  }
  sm_gadd(background_threads, 1);
}

/* In a child after fork no purge thread runs. */
void sm_background_fork_child(void) {
  atomic_store_explicit(&sm_bg_running, 0, memory_order_relaxed);
  atomic_store_explicit(&sm_bg_wanted, 0, memory_order_relaxed);
}
