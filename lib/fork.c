/* fork: the child can allocate at once, and fork never waits for a lock.
 *
 * smalloc takes no lock around fork.  Holding its locks across fork (the
 * usual pthread_atfork prepare handler) deadlocks against glibc's own
 * locks: glibc runs the prepare handlers first and only then takes the
 * stdio list lock, so a thread that holds a FILE lock and waits in malloc
 * for a smalloc lock, and a thread in fflush(NULL) that holds the list
 * lock and waits for that FILE, stop the forking thread for good.  A
 * signal handler that forks while a fork's prepare handler holds a lock
 * deadlocks on it too, even in a program with one thread.
 *
 * Instead the child repairs what it cannot trust, the way a fresh thread
 * would start.  Every structure that more than one thread changes is
 * changed only under its lock, or with single atomic operations (the
 * thread_free and hand-over lists, the segment map, the counters).  So
 * for each lock: if it is free in the child, nobody was changing what it
 * guards when the process forked, and that is consistent; if it is held,
 * a thread that does not exist in the child was in the middle of a
 * change: the lock is made free again and the structure forgotten (a
 * cache or list emptied, a heap dropped), leaking what it held in the
 * child only.  The child's heap is the forking thread's, which was not
 * inside smalloc (fork from a signal handler that interrupted malloc is
 * outside what malloc promises; the repair then resets what that call was
 * changing).  The parent does nothing at all, so a fork costs smalloc one
 * handler in the child: a handful of trylocks and a walk of the heap list. */
#include "internal.h"

/* In the child: whether a lost thread held m; m is free afterwards. */
bool sm_fork_mutex_was_held(pthread_mutex_t *m) {
  if (pthread_mutex_trylock(m) == 0) {
    pthread_mutex_unlock(m);
    return false;
  }
  pthread_mutex_init(m, NULL);
  return true;
}

/* The same for one of smalloc's spin locks. */
bool sm_fork_lock_was_held(sm_lock_t *l) {
  if (atomic_load_explicit(&l->held, memory_order_relaxed) == 0) return false;
  sm_unlock(l);
  return true;
}

static void sm_fork_child(void) {
  sm_background_fork_child();
  sm_stats_fork_child();
  sm_segment_fork_child();
  sm_pool_fork_child();
  sm_heaps_fork_child();
  sm_page_gate_fork_child(sm_heap_tls);
  sm_prof_fork_child();
  sm_os_limit_forget();   /* the child may set a limit of its own */
}

void sm_fork_init(void) {
  pthread_atfork(NULL, NULL, sm_fork_child);
}
