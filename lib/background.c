/* The purge thread: memory goes back while the program is idle.
 *
 * Everything else in smalloc gives memory back on its slow paths, which
 * a program that has stopped calling the allocator never takes.  So one
 * thread does it for the process.  It is started at the end of a malloc:
 * a second thread's first one (sm_background_want), or, in a program
 * that has had no other thread, the first malloc or free after there is
 * something to give back (a cached segment, a kept huge mapping, retired
 * pages).  Every quarter of SMALLOC_PURGE_DELAY while it has work it
 *   - releases the retired pages of every heap whose thread ran no
 *     slow-path step for a whole purge delay, and the pages of its full
 *     list that other threads freed (sm_heap_claim_retired and
 *     sm_heap_claim_full, as trim does: that thread may be busy
 *     elsewhere, blocked or sleeping); blocks freed into the full pages
 *     of a heap, SM_BG_NOTICES of its pages or more, also wake the
 *     thread, which waits for that heap to take them or go idle,
 *     then purges the segments this left empty at once (they have been
 *     idle that long already), and gives back the memory of the free pages
 *     left in that heap's segments;
 *   - sends the batches of remote frees that such a heap holds (free.c:
 *     its thread may never call in again, and they keep other threads'
 *     pages in use);
 *   - releases the pages of the other heaps that have been retired for
 *     the purge delay (sm_heap_release_stale): a thread that calls in
 *     now and then is not idle, but its burst is over;
 *   - gives back to their segments the pages that other threads' frees
 *     emptied in the pool, and the empty pages sent home to each heap
 *     (pool.c);
 *   - gives back the memory of free pages that have been free in any
 *     heap's segments, or in an exited thread's, for the delay;
 *   - purges cached segments and kept huge mappings older than the delay.
 * When nothing is left it parks on a futex, and whatever gives it work
 * wakes it (sm_background_wake, one system call, no lock).  Measured on
 * this design's target, a burst of 64 MiB of small blocks freed and then
 * idle: resident size back within 1.5 purge delays (tests/large.c).
 *
 * It ends only when the program has no other thread left: a process
 * whose last thread calls pthread_exit must exit
 * (sm_background_last_thread).  It looks when the last thread with a
 * heap ends, and then, while a thread that never allocated (a main
 * thread where smalloc is linked, not preloaded) runs on, again after 1
 * ms, then twice as long each time, up to a second, until a look finds
 * a thread with a heap or none at all (the kernel's workers among the
 * process's tasks, io_uring's, are not the program's: sm_bg_worker_flags).
 * Alone, it hands the process's exit to a thread of the program's signal
 * mask and default stack (sm_bg_hand_exit).  Where /proc cannot tell, it
 * ends when the last thread with a heap has ended, after giving back what
 * those threads left; the next one to allocate starts another.
 *
 * Why it parks rather than exits: starting a thread takes a lock of
 * glibc's that glibc holds while it frees a dead thread's TLS vector (in
 * pthread_join), so a free that started the thread could wait for
 * itself; the thread exited and was started again from frees, and a
 * program whose threads came and went hung.  Now a free starts no thread
 * in a program that has had others, and the one thread, once started,
 * stays.
 *
 * Why a thread and not a timer signal: a signal interrupts the program's
 * own system calls and could land inside smalloc; the thread needs no
 * cooperation.  What it costs: one thread (exit never waits for it),
 * all signals blocked, a 64 KiB stack (the default size when the
 * program's thread-local data does not fit in that), asleep while there
 * is nothing to give back.  It never allocates (its heap stays the
 * static empty one), but for glibc's TLS vector of the thread it hands
 * the process's exit to, at the very end, and is not running in a child
 * after fork until the child starts its own.  SMALLOC_BACKGROUND=0
 * turns it off: then memory goes back only when the program calls in.
 *
 * Why it steps aside: the kernel refuses some calls to a process of more
 * than one thread (unshare(CLONE_NEWUSER) and setns into a user or mount
 * namespace fail with EINVAL), and a program of one thread that freed a
 * few MiB has a second one, this.  Those calls go through
 * sm_background_aside (override.c): one the kernel refuses stops the
 * thread, waits until it is gone, and is made again.  The next malloc
 * starts a new one. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/single_threaded.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

/* The thread's state, and the futex word it parks on. */
_Atomic int sm_bg_state;
/* Held while the thread is started or stopped, so that a stop joins the
 * thread a start made: sm_bg_thread is the running one's. */
static pthread_mutex_t sm_bg_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_t sm_bg_thread;
/* after pthread_create failed (a thread limit, say): no new try before */
static _Atomic uint64_t sm_bg_retry_ms;

static uint64_t sm_bg_tick_ms(void) {
  uint64_t d = (uint64_t)sm_opt(PURGE_DELAY) / 4;
  return d < 10 ? 10 : d > 1000 ? 1000 : d;
}

static void sm_bg_futex_timed(int val, const struct timespec *timeout) {
  syscall(SYS_futex, (int *)&sm_bg_state, FUTEX_WAIT_PRIVATE, val, timeout, NULL, 0);
}

static void sm_bg_futex_wake(void) {
  syscall(SYS_futex, (int *)&sm_bg_state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* Sleep for ms, or less: a stop cuts it short (and a signal, but the
 * thread blocks them all); a round that comes early does no harm. */
static void sm_bg_sleep(uint64_t ms) {
  struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
  sm_bg_futex_timed(SM_BG_AWAKE, &ts);
}

/* The thread moves its own state from `from` to `to`; false if a stop
 * came first (SM_BG_EXITING): then it returns.  While the thread is
 * awake only a stop changes its state; while it is parked a wake may
 * also have made it awake, which is where it goes anyway. */
static bool sm_bg_move(int from, int to) {
  if (atomic_compare_exchange_strong(&sm_bg_state, &from, to)) return true;
  return from != SM_BG_EXITING;
}

/* ---- the purge delay in force ------------------------------------------- */

/* Memory given back and then used again costs a fault for every 4 KiB
 * of it (10-20 us each on the VMs smalloc is measured on), and a program
 * that works in phases with pauses a little longer than the purge delay
 * would pay that at every phase.  So the delay in force is
 * SMALLOC_PURGE_DELAY doubled up to SM_PURGE_SHIFT_MAX times: once more
 * each time memory comes back into use within the delay in force of the
 * purge that gave it back for having been unused that long (its stamp,
 * sm_purge_stamp: had the delay been twice as long, it would have
 * stayed), and once less each time SM_PURGE_CALM delays in force pass
 * with no such reuse (sm_purge_delay, as it is read).  What trim, a
 * thread's exit or a delay of 0 gave back says nothing of the delay.
 * The stamps are kept where a page of a segment or a cached segment is
 * given back whole (segment.c); the free blocks of pages given back
 * (pool.c), and large and huge blocks' memory, follow the delay in force
 * without feeding it.  Each wait is at most 8 times
 * SMALLOC_PURGE_DELAY, so a program that goes idle for good still gets
 * its memory back.  Two threads that allocate 27 MB of small blocks
 * each, free them and exit, six times, 1.5 s apart (bench_phases): 40,700
 * page faults and 0.78 s of CPU with the fixed delay (220 MiB purged),
 * 12,200 faults and 0.31 s with this (42 MiB), medians of 3 interleaved
 * runs on a 2-core VM; idle 12 s after that, both were back at 2.2 MB
 * resident.
 * The shift and the time of its last change are one word
 * (sm_purge_state: the time in ms above SM_PURGE_SHIFT_BITS), so that
 * two threads that both see a calm spell halve the delay once, and a
 * reuse doubles it only for memory given back after that time. */
#define SM_PURGE_SHIFT_MAX 3
#define SM_PURGE_SHIFT_BITS 2
#define SM_PURGE_CALM 8
static _Atomic uint64_t sm_purge_state;

static unsigned sm_purge_shift_of(uint64_t state) {
  return (unsigned)(state & ((1u << SM_PURGE_SHIFT_BITS) - 1));
}

uint64_t sm_purge_delay(uint64_t now) {
  uint64_t base = (uint64_t)sm_opt(PURGE_DELAY);
  uint64_t state = atomic_load_explicit(&sm_purge_state, memory_order_relaxed);
  unsigned shift = sm_purge_shift_of(state);
  if (shift == 0) return base;
  if (sm_aged(now, state >> SM_PURGE_SHIFT_BITS, SM_PURGE_CALM * (base << shift)) &&
      atomic_compare_exchange_strong_explicit(&sm_purge_state, &state,
                                              (now << SM_PURGE_SHIFT_BITS) | (shift - 1),
                                              memory_order_relaxed, memory_order_relaxed))
    shift--;
  return base << shift;
}

void sm_purge_reused(uint64_t stamp) {
  if (stamp == 0) return;
  uint64_t now = sm_clock_ms();
  if (sm_aged(now, stamp, sm_purge_delay(now))) return;
  /* a doubling answers every purge made before it: the pages of one
   * pass that come back one by one (or of two passes a moment apart)
   * double the delay once */
  uint64_t state = atomic_load_explicit(&sm_purge_state, memory_order_relaxed), next;
  do {
    if (stamp <= state >> SM_PURGE_SHIFT_BITS) return;
    unsigned shift = sm_purge_shift_of(state);
    next = (now << SM_PURGE_SHIFT_BITS) | (shift < SM_PURGE_SHIFT_MAX ? shift + 1 : shift);
  } while (!atomic_compare_exchange_weak_explicit(&sm_purge_state, &state, next, memory_order_relaxed,
                                                  memory_order_relaxed));
}

/* A new SMALLOC_PURGE_DELAY (smalloc_option_set): in force as it is. */
void sm_purge_delay_reset(void) {
  atomic_store_explicit(&sm_purge_state, 0, memory_order_relaxed);
}

/* What a round leaves: nothing; only batches of remote frees held by
 * threads that are not idle yet (worth a look in a purge delay, when
 * they may be); work for the next tick. */
enum { SM_BG_DONE, SM_BG_BATCHES, SM_BG_MORE };

/* One round; returns what is left (SM_BG_*). */
static int sm_bg_round(void) {
  uint64_t now = sm_clock_ms();
  uint64_t delay = sm_purge_delay(now);
  bool left = false, claimed = false, batches = false;
  sm_heap_t *self = sm_heap();   /* the static empty heap: counts go to the orphan totals */
  sm_heaps_lock();
  for (sm_heap_t *h = sm_heaps_first(); h; h = h->all_next) {
    uint32_t cycle = __atomic_load_n(&h->cycle, __ATOMIC_RELAXED);
    if (cycle != h->bg_cycle || h->bg_seen_ms == 0) {
      h->bg_cycle = cycle;
      h->bg_seen_ms = now;
    }
    bool idle = now - h->bg_seen_ms >= delay;
    h->bg_idle = idle;
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
    /* free pages that wait for their delay, such as those just released
     * above for a thread not idle yet: the thread that goes idle keeps
     * them otherwise (an idle thread's all go now) */
    if (sm_heap_decommit(h, idle)) left = true;
  }
  /* the batches of remote frees that idle threads hold (free.c); a heap
   * not idle yet brings the thread back */
  if (sm_free_steal_begin()) {
    bool marked = false;
    for (sm_heap_t *h = sm_heaps_first(); h; h = h->all_next) {
      if (now - h->bg_seen_ms < delay) batches = batches || sm_xbuf_pending(h);
      else marked = sm_free_steal_mark(h) || marked;
    }
    if (marked) {
      bool ok = sm_free_steal_barrier();
      for (sm_heap_t *h = sm_heaps_first(); h; h = h->all_next)
        if (atomic_load_explicit(&h->xbuf_steal, memory_order_relaxed) && !sm_free_steal_send(h, ok) && ok)
          left = true;
    }
  }
  sm_heaps_unlock();
  /* heaps that waited a purge delay for a thread (heap.c), after the
   * loop above gave back the memory they held free, as an idle thread's */
  if (sm_heaps_parked_expire(now, false)) left = true;
  if (sm_heaps_pool_purge(now, delay)) left = true;   /* and the structs of those taken apart */
  if (sm_segments_purge_open(false)) left = true;   /* idle threads' sparse pages */
  sm_pool_collect(self);   /* its emptied pages go home: to the shared segments, mostly */
  if (sm_pool_purge(now, delay)) left = true;
  if (sm_heap_shared_tidy(false)) left = true;
  if (sm_segment_decommit_abandoned(now, delay)) left = true;
  if (claimed) sm_segment_cache_purge_all(sm_purge_stamp(now, delay));   /* idle for the delay */
  sm_segment_cache_collect(false);
  if (left || sm_segment_cache_pending()) return SM_BG_MORE;
  return batches ? SM_BG_BATCHES : SM_BG_DONE;
}

/* Set when the last thread with a heap exits (sm_background_last_thread). */
static _Atomic int sm_bg_leave;

/* Field k of a /proc stat line read into buf, counted from the state
 * (0) after the command's closing parenthesis (a command may hold one):
 * 6 the flags, 17 the thread count; NULL where the line ends before. */
static const char *sm_bg_stat_field(const char *buf, int k) {
  const char *p = strrchr(buf, ')');
  if (!p || p[1] != ' ') return NULL;
  for (p += 2; p && k > 0; k--) p = (p = strchr(p, ' ')) ? p + 1 : NULL;
  return p;
}

/* The process's threads (/proc/self/stat, without allocating), and in
 * *state its main thread's state: 'Z' once it has ended while other
 * threads run (it stays a zombie until the last one ends).  0 when that
 * cannot be read (no /proc in a sandbox, say). */
static int sm_bg_proc_threads(char *state) {
  char buf[1024];
  *state = '?';
  if (sm_os_read_file("/proc/self/stat", buf, sizeof buf) == 0) return 0;
  const char *st = sm_bg_stat_field(buf, 0), *count = sm_bg_stat_field(buf, 17);
  if (st) *state = *st;
  return count ? atoi(count) : 0;
}

/* The process's threads that still run, besides the purge thread, as
 * the kernel counts them (unshare's refusal does); -1 when unknown. */
static int sm_bg_others(void) {
  char state;
  int n = sm_bg_proc_threads(&state);
  return n == 0 ? -1 : n - 1 - (state == 'Z');
}

/* Tasks that the kernel runs among a process's threads for its own work:
 * io_uring's (iou-wrk, iou-sqp; since Linux 5.12) and vhost's (6.4),
 * flagged PF_IO_WORKER and PF_USER_WORKER in field 9 of their /proc
 * stat.  They never run the program's code and may outlive all of its
 * threads (an SQPOLL ring's iou-sqp lives while its descriptor is open),
 * so they are not the program's: a purge thread that waited for them
 * kept a process whose main thread called pthread_exit from ever ending,
 * and with every signal blocked on it, SIGTERM never landed.  Before
 * those versions the bits meant other things, set on threads of the
 * program (0x10 PF_VCPU, 0x4000 PF_USED_ASYNC), and the workers were the
 * kernel's own threads, outside the process: the flags looked at are the
 * running kernel's (uname). */
enum { SM_PF_IO_WORKER = 0x10, SM_PF_USER_WORKER = 0x4000 };
static unsigned long sm_bg_worker_flags(void) {
  struct utsname u;
  if (uname(&u) != 0) return 0;
  char *end;
  unsigned long major = strtoul(u.release, &end, 10);
  unsigned long minor = *end == '.' ? strtoul(end + 1, NULL, 10) : 0;
  unsigned long version = major * 1000 + minor;
  return version >= 6004 ? SM_PF_IO_WORKER | SM_PF_USER_WORKER : version >= 5012 ? SM_PF_IO_WORKER : 0;
}

/* Whether task `name` of the process (a directory of /proc/self/task)
 * runs the program's code, this thread included: not ended, not a
 * kernel worker (flags `workers`).  False when it is gone. */
static bool sm_bg_program_task(const char *name, unsigned long workers) {
  char path[64] = "/proc/self/task/", buf[512];
  size_t len = strlen(path), n = strlen(name);
  if (n + len + sizeof "/stat" > sizeof path) return false;
  memcpy(path + len, name, n);
  memcpy(path + len + n, "/stat", sizeof "/stat");
  if (sm_os_read_file(path, buf, sizeof buf) == 0) return false;
  const char *st = sm_bg_stat_field(buf, 0), *flags = sm_bg_stat_field(buf, 6);
  if (!st || *st == 'Z' || *st == 'X' || *st == 'x') return false;
  return !(flags && (strtoul(flags, NULL, 10) & workers));
}

/* The program's threads that still run besides the purge thread: the
 * process's (sm_bg_others) less the kernel's workers, read task by task
 * without allocating.  The tasks are not told apart by id (where /proc
 * is an outer PID namespace's, its ids are not this thread's): the
 * purge thread counts among those that run the program's code, and a
 * listing that finds another (or others run) stops there.  None besides
 * it is believed only when the listing held as many tasks as the
 * process has after it: the kernel ends a listing early when a task
 * ends as it is listed.  Else, and where the tasks cannot be listed, the
 * process's count stands (kernel workers count, as they did). */
static int sm_bg_program_others(void) {
  int n = sm_bg_others();
  unsigned long workers = n > 0 ? sm_bg_worker_flags() : 0;
  if (workers == 0) return n;
  int saved = errno;
  int dir = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0) {
    errno = saved;
    return n;
  }
  int listed = 0, program = 0;
  char ents[2048] __attribute__((aligned(8)));
  long got = 0;
  while (program < 2 && (got = syscall(SYS_getdents64, dir, ents, sizeof ents)) > 0) {
    for (long at = 0; at < got && program < 2;) {
      /* struct linux_dirent64: ino, off, reclen, type, name */
      unsigned short reclen;
      memcpy(&reclen, ents + at + 16, sizeof reclen);
      const char *name = ents + at + 19;
      if (name[0] >= '0' && name[0] <= '9') {
        listed++;
        program += sm_bg_program_task(name, workers);
      }
      at += reclen;
    }
  }
  close(dir);
  errno = saved;
  if (program >= 2) return 1;
  char state;
  return got == 0 && program == 1 && listed == sm_bg_proc_threads(&state) ? 0 : n;
}

/* What the thread does when no thread with a heap is left: it ends when
 * no other thread of the program runs either (or when that cannot be
 * known), and watches while some do: a main thread that never allocates
 * from smalloc (linked, not preloaded) may be running on, or may be
 * ending with pthread_exit.  Alone, it ends even if a heap still counts
 * as live (a thread that ended with a bare exit system call). */
enum { SM_BG_STAY, SM_BG_WATCH, SM_BG_END, SM_BG_ALONE };
/* the watch looks again after 1 ms, then twice as long each time, up to */
enum { SM_BG_WATCH_MAX_MS = 1000 };

/* What the thread does, given the threads that run besides it
 * (sm_bg_others).  Ending, it takes itself off (detached, state none)
 * unless a thread with a heap came since, or, alone, leaves that to
 * sm_bg_hand_exit; when a stop is joining it, it just ends.  The stop
 * holds sm_bg_lock while it joins, so the lock is only tried. */
static int sm_bg_leave_now(int others) {
  while (pthread_mutex_trylock(&sm_bg_lock) != 0) {
    if (atomic_load_explicit(&sm_bg_state, memory_order_acquire) == SM_BG_EXITING) return SM_BG_END;
    sched_yield();
  }
  /* the flag cleared before the count is read, sequentially consistent
   * as the exiting thread's count and flag: a last thread's flag is seen
   * by this look or the next */
  atomic_exchange(&sm_bg_leave, 0);
  bool stopping = atomic_load_explicit(&sm_bg_state, memory_order_relaxed) == SM_BG_EXITING;
  int r = stopping                         ? SM_BG_END
        : others == 0                      ? SM_BG_ALONE   /* nothing can start a thread now */
        : atomic_load(&sm_heaps_live) > 0  ? SM_BG_STAY
        : others > 0                       ? SM_BG_WATCH
                                           : SM_BG_END;
  if (r == SM_BG_END && !stopping) {
    pthread_detach(pthread_self());
    atomic_store_explicit(&sm_bg_state, SM_BG_NONE, memory_order_release);
  }
  pthread_mutex_unlock(&sm_bg_lock);
  return r;
}

/* The watch: its interval, and when it looks next (0: no watch). */
typedef struct {
  uint64_t interval_ms, look_at_ms;
} sm_bg_watch_t;

/* The look, when the last thread with a heap has ended since the last
 * one or the watch's time has come: SM_BG_END or SM_BG_ALONE when the
 * thread ends, else SM_BG_STAY (and the watch set or cleared).  Where
 * the other threads cannot be known, the memory the exited ones held
 * goes back first, all of it (as trim gives it back: no thread is left
 * to want it warm, and none to wait a delay for); where none run, the
 * process ends with this thread. */
static int sm_bg_look(sm_bg_watch_t *w) {
  if (!atomic_load(&sm_bg_leave) && (w->look_at_ms == 0 || sm_clock_ms() < w->look_at_ms))
    return SM_BG_STAY;
  int others = sm_bg_program_others();
  if (others < 0 && atomic_load(&sm_heaps_live) == 0) sm_collect_process(sm_heap());
  int r = sm_bg_leave_now(others);
  if (r == SM_BG_END || r == SM_BG_ALONE) return r;
  if (r == SM_BG_WATCH) {
    uint64_t next = w->interval_ms == 0 ? 1 : 2 * w->interval_ms;
    w->interval_ms = next < SM_BG_WATCH_MAX_MS ? next : SM_BG_WATCH_MAX_MS;
    w->look_at_ms = sm_clock_ms() + w->interval_ms;
  } else {
    w->interval_ms = w->look_at_ms = 0;
  }
  return SM_BG_STAY;
}

/* How long the thread may sleep: max, or less when the watch looks
 * sooner. */
static uint64_t sm_bg_until(const sm_bg_watch_t *w, uint64_t max) {
  if (w->look_at_ms == 0) return max;
  uint64_t now = sm_clock_ms();
  uint64_t left = w->look_at_ms > now ? w->look_at_ms - now : 0;
  return left < max ? left : max;
}

/* The signal mask (the purge thread blocks them all) and the name of
 * the last thread with a heap to end, for the thread that exits the
 * process (which would otherwise take the purge thread's).  Written
 * before the flag (sm_background_last_thread), read after it
 * (sequentially consistent): every end of the purge thread's watch
 * begins with the flag. */
static sigset_t sm_bg_program_mask;
static char sm_bg_program_name[16];

/* Set on the purge thread: it never starts another (sm_background_act),
 * not even from the heap that glibc's TLS vector for the exit thread
 * gives it at the end (its exit then wakes and polls). */
static __thread bool sm_bg_self __attribute__((tls_model("initial-exec")));

/* The purge thread, alone in the process, has ended: this thread waits
 * until it is gone and returns, the process's last thread, so that glibc
 * exits the process (exit(0), as POSIX has it for a last thread that
 * ends) here: the program's exit handlers and destructors run on a
 * thread of the default stack size with the program's signal mask, not
 * on the purge thread's 64 KiB with every signal blocked. */
static void *sm_bg_exit_main(void *purge) {
  prctl(PR_SET_NAME, sm_bg_program_name, 0, 0, 0);
  pthread_join(*(pthread_t *)purge, NULL);
  return NULL;
}

/* The purge thread is the process's last: it starts the thread that
 * exits the process with the program's signal mask (signals pending for
 * the process land there, not here), or, where none can start, takes
 * that mask and exits the process itself.  Its state is none only once
 * that thread is started: nothing else runs to start or stop a purge
 * thread meanwhile; the exit handlers may. */
static void sm_bg_hand_exit(void) {
  static pthread_t self;
  self = pthread_self();
  pthread_attr_t attr;
  pthread_t t;
  bool handed = false;
  if (pthread_attr_init(&attr) == 0) {
    int busy = sm_prof_hush(SM_PROF_NO_SAMPLE);   /* glibc's TLS vector for it: no call site's */
    handed = pthread_attr_setsigmask_np(&attr, &sm_bg_program_mask) == 0 &&
             pthread_create(&t, &attr, sm_bg_exit_main, &self) == 0;
    sm_prof_hush_end(busy);
    pthread_attr_destroy(&attr);
  }
  if (handed) {
    pthread_detach(t);
  } else {
    pthread_detach(self);
    pthread_sigmask(SIG_SETMASK, &sm_bg_program_mask, NULL);
  }
  atomic_store_explicit(&sm_bg_state, SM_BG_NONE, memory_order_release);
}

/* The last thread with a heap exits (heap.c): the purge thread looks
 * whether the program is over.  Else it would be the thread that keeps
 * the process alive: a program whose main thread calls pthread_exit
 * after its other threads end must then exit, as if by exit(0) (POSIX),
 * and under smalloc it ran on for good, deaf to SIGTERM (the purge
 * thread blocks every signal; Python's test_threading hung in two
 * tests).  It ends once no thread of the program runs (sm_bg_look).
 * (The state read sequentially consistent after the flag's store, as
 * the thread's park writes its state and then reads the flag.) */
void sm_background_last_thread(void) {
  if (sm_bg_self) return;   /* its heap from the exit thread's TLS vector */
  pthread_sigmask(SIG_BLOCK, NULL, &sm_bg_program_mask);
  prctl(PR_GET_NAME, sm_bg_program_name, 0, 0, 0);
  atomic_store(&sm_bg_leave, 1);
  int s = atomic_load(&sm_bg_state);
  if (s == SM_BG_NONE || s == SM_BG_EXITING) return;
  /* cuts a sleep between rounds short (unless it comes just before one:
   * the look then waits for the sleep) */
  if (s == SM_BG_AWAKE) sm_bg_futex_wake();
  else sm_background_wake();
}

static void *sm_bg_main(void *arg) {
  (void)arg;
  prctl(PR_SET_NAME, "smalloc-purge", 0, 0, 0);
  sm_bg_self = true;
  sm_bg_watch_t watch = {0, 0};
  int end = SM_BG_END;
  for (;;) {
    if ((end = sm_bg_look(&watch)) != SM_BG_STAY) break;
    sm_bg_sleep(sm_bg_until(&watch, sm_bg_tick_ms()));
    if (atomic_load_explicit(&sm_bg_state, memory_order_acquire) == SM_BG_EXITING) break;
    if ((end = sm_bg_look(&watch)) != SM_BG_STAY) break;
    int left = sm_bg_round();
    if (left == SM_BG_MORE) continue;
    /* Park: for good when nothing is left, for a purge delay when only
     * busy threads' batches are (a thread's next batch does not wake it
     * then), until the next look while the watch is on.  A wake that
     * saw the thread awake before this store had made its work pending
     * first (sm_background_wake), and the round after the store finds
     * it; one that comes later sees the thread parked and wakes it. */
    int park = left == SM_BG_BATCHES || watch.look_at_ms ? SM_BG_DOZING : SM_BG_PARKED;
    if (!sm_bg_move(SM_BG_AWAKE, park)) break;
    atomic_thread_fence(memory_order_seq_cst);
    left = sm_bg_round();
    /* batches that came since the first round: a park for good would
     * never send them, should their thread go idle (its later batches
     * see the thread parked, but not these) */
    if (left == SM_BG_MORE || (left == SM_BG_BATCHES && park == SM_BG_PARKED) ||
        sm_heaps_watched_notices() || atomic_load(&sm_bg_leave)) {   /* (the last thread's wake saw it awake) */
      if (!sm_bg_move(park, SM_BG_AWAKE)) break;
      continue;
    }
    if (park == SM_BG_DOZING) {
      uint64_t ms = sm_bg_until(&watch, (uint64_t)sm_opt(PURGE_DELAY));
      struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
      sm_bg_futex_timed(SM_BG_DOZING, &ts);
    } else {
      while (atomic_load_explicit(&sm_bg_state, memory_order_acquire) == SM_BG_PARKED)
        sm_bg_futex_timed(SM_BG_PARKED, NULL);
    }
    if (!sm_bg_move(park, SM_BG_AWAKE)) break;
  }
  if (end == SM_BG_ALONE) sm_bg_hand_exit();
  /* glibc may free other threads' cached stacks' data as this one ends:
   * those frees count as an exited thread's, and give it no heap that
   * would then count as live for good */
  sm_heap_tls = &sm_heap_exited;
  return NULL;
}

/* There may be something to give back.  A parked thread is woken (one
 * system call, no lock: this may run anywhere, in free too); with no
 * thread yet, one is wanted, started later at the end of a malloc
 * (sm_background_act). */
_Atomic int sm_bg_wanted;

void sm_background_wake(void) {
  /* the work made pending before the look at the thread (the thread
   * looks for work after it parks) */
  atomic_thread_fence(memory_order_seq_cst);
  int s = atomic_load_explicit(&sm_bg_state, memory_order_relaxed);
  if (sm_likely(s == SM_BG_AWAKE)) return;
  if (s == SM_BG_PARKED || s == SM_BG_DOZING) {
    if (atomic_compare_exchange_strong(&sm_bg_state, &s, SM_BG_AWAKE))
      sm_bg_futex_wake();
    return;
  }
  atomic_fetch_or_explicit(&sm_bg_wanted, SM_WANT_PURGE_THREAD, memory_order_relaxed);
}

/* A second thread allocates: the purge thread is started now, parked
 * until there is work, so that a free never has to start it. */
void sm_background_want(void) {
  if (atomic_load_explicit(&sm_bg_state, memory_order_relaxed) == SM_BG_NONE)
    atomic_fetch_or_explicit(&sm_bg_wanted, SM_WANT_PURGE_THREAD, memory_order_relaxed);
}

/* Do what was asked (sm_bg_wanted): print the report that came due, start
 * the purge thread if there is none.  Only where the calling thread holds
 * no smalloc lock and no page state.  Where glibc frees (a dead thread's
 * TLS vector, from pthread_join) it may hold the lock that pthread_create
 * takes: a free (from_free) starts no thread once the process has had
 * others, and leaves the wish to the next malloc. */
void sm_background_act(bool from_free) {
  int wanted = atomic_exchange_explicit(&sm_bg_wanted, 0, memory_order_relaxed);
  if (wanted & SM_WANT_REPORT) sm_stats_periodic();
  if (!(wanted & SM_WANT_PURGE_THREAD)) return;
  if (sm_likely(atomic_load_explicit(&sm_bg_state, memory_order_relaxed) != SM_BG_NONE)) return;
  if (sm_bg_self) return;
  if (!sm_opt(BACKGROUND) || atomic_load_explicit(&sm_process_ready, memory_order_acquire) != 2)
    return;
  uint64_t retry = atomic_load_explicit(&sm_bg_retry_ms, memory_order_relaxed);
  if ((from_free && !__libc_single_threaded) || (retry != 0 && sm_clock_ms() < retry)) {
    atomic_fetch_or_explicit(&sm_bg_wanted, SM_WANT_PURGE_THREAD, memory_order_relaxed);
    return;
  }
  /* (a malloc in pthread_create finds the thread awake before the lock) */
  pthread_mutex_lock(&sm_bg_lock);
  int expected = SM_BG_NONE;
  if (!atomic_compare_exchange_strong(&sm_bg_state, &expected, SM_BG_AWAKE)) {
    pthread_mutex_unlock(&sm_bg_lock);
    return;
  }
  pthread_attr_t attr;
  sigset_t all, old;
  sigfillset(&all);
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 64 << 10);
  pthread_sigmask(SIG_SETMASK, &all, &old);   /* the thread inherits: no signal lands there */
  /* what glibc allocates for the thread (its TLS vector, live for good)
   * is no call site's doing: not sampled, where the profile named the
   * caller whose free started the thread */
  int busy = sm_prof_hush(SM_PROF_NO_SAMPLE);
  int err = pthread_create(&sm_bg_thread, &attr, sm_bg_main, NULL);
  if (err == EINVAL) {
    /* the program's thread-local data leaves no room in 64 KiB (glibc
     * puts it on the stack): the default size then */
    err = pthread_create(&sm_bg_thread, NULL, sm_bg_main, NULL);
  }
  sm_prof_hush_end(busy);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  pthread_attr_destroy(&attr);
  if (err != 0) {
    atomic_store_explicit(&sm_bg_retry_ms, sm_clock_ms() + 1000, memory_order_relaxed);
    atomic_store_explicit(&sm_bg_state, SM_BG_NONE, memory_order_relaxed);
    atomic_fetch_or_explicit(&sm_bg_wanted, SM_WANT_PURGE_THREAD, memory_order_relaxed);   /* tried again in a second */
  } else {
    sm_gadd(background_threads, 1);
  }
  pthread_mutex_unlock(&sm_bg_lock);
}

/* Stop the purge thread and wait until it has returned; false if there
 * was none.  It is joinable for this alone: nothing else waits for it.
 * For the calls it steps aside for, and SMALLOC_OPTION_BACKGROUND set to
 * 0 (smalloc_option_set). */
bool sm_background_stop(void) {
  pthread_mutex_lock(&sm_bg_lock);
  bool had = atomic_exchange(&sm_bg_state, SM_BG_EXITING) != SM_BG_NONE;
  if (had) {
    sm_bg_futex_wake();
    pthread_join(sm_bg_thread, NULL);
  }
  atomic_store_explicit(&sm_bg_state, SM_BG_NONE, memory_order_release);
  pthread_mutex_unlock(&sm_bg_lock);
  /* what it left to do: the next malloc starts another */
  if (had) atomic_fetch_or_explicit(&sm_bg_wanted, SM_WANT_PURGE_THREAD, memory_order_relaxed);
  return had;
}

enum { SM_BG_ASIDE_MS = 200 };

/* System call nr(a, b), as the C library's wrapper makes it (-1 and
 * errno on failure), for a call the kernel refuses with EINVAL to a
 * process of more than one thread: refused, with a purge thread running,
 * it stops the thread and is made again until the kernel has let the
 * thread go (pthread_join returns before the kernel has taken it off the
 * process's threads), for at most SM_BG_ASIDE_MS (0.2-0.5 ms in all
 * here).  Where the program has threads of its own the call fails
 * anyway: the purge thread stays.  A call refused for another reason (a
 * wrong argument) returns EINVAL at the end of that time. */
long sm_background_aside(long nr, long a, long b) {
  int saved = errno;
  long r = syscall(nr, a, b);
  if (r == 0 || errno != EINVAL || sm_bg_others() > 1 || !sm_background_stop()) return r;
  struct timespec tick = {0, 100000};   /* 0.1 ms */
  for (uint64_t until = sm_clock_ms() + SM_BG_ASIDE_MS;;) {
    r = syscall(nr, a, b);
    if (r == 0) errno = saved;   /* as the call that succeeded at once leaves it */
    if (r == 0 || errno != EINVAL || sm_clock_ms() > until) return r;
    nanosleep(&tick, NULL);
  }
}

/* In a child after fork no purge thread runs. */
void sm_background_fork_child(void) {
  sm_fork_mutex_was_held(&sm_bg_lock);
  atomic_store_explicit(&sm_bg_state, SM_BG_NONE, memory_order_relaxed);
  atomic_store_explicit(&sm_bg_leave, 0, memory_order_relaxed);
  sm_free_steal_fork_child();
  atomic_store_explicit(&sm_bg_wanted, 0, memory_order_relaxed);
}
