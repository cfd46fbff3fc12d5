/* The heap profiler: sampled allocations by call site, written as a
 * profile that google-pprof reads (smalloc_prof(3)).
 *
 * Sampling.  Every byte has the same chance to be sampled: each thread
 * counts down the bytes to its next sample (heap->stats.prof_left), and
 * the allocation that takes the count below zero is the sample; the next
 * distance is drawn from an exponential distribution with mean
 * SMALLOC_PROF_RATE, so periodic patterns do not bias the profile, and an
 * allocation of s bytes is sampled with probability 1 - exp(-s / rate)
 * (which pprof's heap_v2 format undoes).  The count-down is the malloc
 * fast path's only cost: it replaces the requested-bytes counter it had
 * (one subtraction, as the addition was) and adds one branch; requested
 * bytes are derived from it (stats.c).  While profiling is off a thread
 * still reaches sm_prof_sampled every SM_PROF_IDLE bytes, which is how it
 * learns that profiling started, and its heartbeat (sm_heap_heartbeat).
 *
 * Live heap.  A sampled block's page gets SM_PAGE_SAMPLED, one of the
 * flags that send every free of the page out of line (free's fast path
 * is unchanged), and free.c asks sm_prof_forget about each block of such
 * a page; page->sampled counts the page's sampled blocks, and the owner
 * clears the flag when it is 0 again.  page->prof_marks holds the marks
 * of the page's live samples, up to SM_PROF_MARKS of them (SM_PROF_MANY
 * once there were more at a time, until the flag goes), so that the other
 * blocks' frees skip the table and its lock (bench_longlived 1e5 with
 * profiling: 5.5 % of the run in the lookup) with a few instructions on
 * the page's own line; past that, a count of live samples by address
 * hash (sm_prof_filter), a load that misses the cache (bench_churn e,
 * where a 512 KiB page of 1-8 KiB blocks holds a sample or two most of
 * the time: half of sm_prof_forget's time, when a page kept one mark).
 * Blocks above the size classes always free out of line; they are looked
 * up while any sample lives.
 *
 * Stacks.  The libgcc unwinder (_Unwind_Backtrace, which reads the
 * binaries' unwind tables, so programs built without frame pointers
 * unwind too) from inside malloc, loaded when profiling starts
 * (sm_prof_prepare); a thread-local flag keeps the profiler from sampling
 * what loading it allocates.  Frames inside this library are left out.  Identical stacks
 * are stored once.
 * An unwind costs about 0.6 us, and a program that allocates in a loop
 * asks for the same stack again and again: on x86-64 each thread keeps
 * its last few stacks (heap->prof_memo) with the stack slots their
 * return addresses sat in, and a stack taken from the same frame address
 * whose slots still hold the same return addresses is that stack again
 * (the return addresses are the stack; the slots are checked, not
 * trusted), with its number in the table of stacks once it has one.
 * A stack through a signal frame, or deeper than SM_PROF_MEMO_MAX
 * frames, is always unwound.
 *
 * Memory.  The tables live in their own mappings, never in the heap being
 * profiled, under one spin lock (sm_lock_t) that is never held while
 * allocating or writing a report: the reports work on a copy.  A sample
 * takes it twice (recorded, forgotten); a pthread mutex cost 54
 * instructions a pair under callgrind, this lock 5 inline. */
#include "internal.h"
#include "track.h"

#include <dlfcn.h>
#include <sched.h>
#include <execinfo.h>
#include <unwind.h>
#include <stdarg.h>
#include <stdio.h>
#include <fcntl.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#define SM_PROF_IDLE   ((uint64_t)1 << 20)   /* bytes between looks while off */
#define SM_PROF_DEPTH  64
#define SM_PROF_STACKS (1u << 16)             /* distinct stacks kept (the last one takes the rest) */

typedef struct sm_prof_stack_s {
  uint64_t hash;
  uint64_t live_count, live_bytes;     /* sampled blocks not freed yet */
  uint64_t alloc_count, alloc_bytes;   /* every sample since the start or reset */
  uint64_t events[SM_PROF_EVENTS];     /* churn events (estimated) since the start or reset */
  uint32_t depth;
  void *frames[SM_PROF_DEPTH];
} sm_prof_stack_t;

typedef struct sm_prof_live_s {
  uintptr_t addr;                      /* 0 empty, 1 deleted */
  uint64_t size;
  uint32_t stack;
} sm_prof_live_t;

_Atomic int sm_prof_active;            /* sampling */
_Atomic uint64_t sm_prof_live_n;       /* live samples */
static sm_lock_t sm_prof_lock;
static sm_prof_stack_t *sm_prof_stacks;   /* SM_PROF_STACKS of them, touched as used */
static uint32_t *sm_prof_index;           /* 2 * SM_PROF_STACKS slots: stack number + 1 */
static uint32_t sm_prof_nstacks;
static uint32_t sm_prof_gen;              /* the stack table's: a memo's stack number holds within one */
static sm_prof_live_t *sm_prof_live;
static size_t sm_prof_live_cap, sm_prof_live_slots;   /* slots used, deleted ones included */
/* Live samples counted by a hash of their address, read without the
 * lock: a free whose slot counts 0 holds no sample, so it neither takes
 * the lock nor searches (a page with two samples at once, and every block
 * above the size classes while any sample lives, used to do both: in
 * bench_churn e, 50 instructions a free into a flagged page).  A count is
 * raised before malloc returns the block, so any thread that frees it
 * sees it; a sample is counted in it until it leaves sm_prof_live. */
#define SM_PROF_FILTER (1u << 16)
typedef _Atomic uint32_t sm_prof_count_t;
static sm_prof_count_t *_Atomic sm_prof_filter;
/* this library's code, found once outside the lock (dl_iterate_phdr takes
 * the loader's lock, which a thread in dlopen holds when it allocates) */
static _Atomic uintptr_t sm_prof_text_lo, sm_prof_text_hi;
__thread int sm_prof_busy __attribute__((tls_model("initial-exec")));
/* the unwinder has run once (sm_prof_prepare, or a sample): it is loaded,
 * and taking a stack allocates nothing any more (an OS call under an
 * allocator lock may) */
static _Atomic int sm_prof_unwinder_ready;
static const char *const sm_prof_event_names[SM_PROF_EVENTS] = {
  "local_swap", "thread_collect", "extend", "next_page", "retired_page", "fresh_page",
  "new_segment", "os_mmap", "os_munmap", "os_madvise", "os_mremap",
};

/* ---- the count-down -------------------------------------------------- */

/* ln(x) for 0 < x <= 1, to about 1e-7: x = m 2^e, ln m by its series in
 * (m-1)/(m+1).  No libm. */
static double sm_ln(double x) {
  union { double d; uint64_t u; } v = {x};
  int e = (int)((v.u >> 52) & 0x7ff) - 1023;
  v.u = (v.u & ~((uint64_t)0x7ff << 52)) | ((uint64_t)1023 << 52);   /* m in [1, 2) */
  double t = (v.d - 1) / (v.d + 1), t2 = t * t;
  double s = t * (1 + t2 * (1.0 / 3 + t2 * (1.0 / 5 + t2 * (1.0 / 7 + t2 * (1.0 / 9 + t2 / 11)))));
  return e * 0.69314718055994531 + 2 * s;
}

/* The distances between samples come from a generator of each heap's
 * own, seeded at its first draw: from SMALLOC_PROF_SEED when set, with
 * the heap's serial number (the same allocations give the same samples:
 * profiles that can be compared run to run, tests that are not
 * statistical), else from the heap's random generator.  The churn
 * events draw from the heap's generator, so that slow work, which
 * differs between runs that allocate alike, does not move the samples. */
static uint64_t sm_prof_random(sm_heap_t *heap) {
  uint64_t x = heap->prof_rng;
  if (x == 0) {
    uint64_t seed = (uint64_t)sm_opt(PROF_SEED);
    x = seed ? (seed * 0x9E3779B97F4A7C15ull) ^ (heap->serial * 0xBF58476D1CE4E5B9ull) : sm_heap_random(heap);
    x |= 1;
  }
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  heap->prof_rng = x;
  return x * 0x2545F4914F6CDD1Dull;
}

/* Uniform in (0, 1], from 64 random bits. */
static double sm_prof_uniform(uint64_t r) {
  return (double)((r >> 11) + 1) / 9007199254740992.0;
}

/* The bytes to the next sample: exponential with mean rate. */
static uint64_t sm_prof_draw(sm_heap_t *heap) {
  double d = -sm_ln(sm_prof_uniform(sm_prof_random(heap))) * (double)sm_opt(PROF_RATE);
  return d < 1 ? 1 : d > 1e15 ? (uint64_t)1e15 : (uint64_t)d;
}

/* Draw again (far, while profiling is off).  requested is credited with
 * the whole distance as it is drawn, so that requested - prof_left stays
 * the bytes requested (sm_tstats_t). */
static void sm_prof_rearm(sm_heap_t *heap) {
  uint64_t left = sm_cnt_read(heap->stats.prof_left);
  uint64_t d = atomic_load_explicit(&sm_prof_active, memory_order_relaxed) ? sm_prof_draw(heap) : SM_PROF_IDLE;
  sm_cnt_add(heap->stats.requested, d - left);
  sm_cnt_add(heap->stats.prof_left, d - left);
}

/* ---- tables ---------------------------------------------------------- */

static void *sm_prof_map(size_t size) {
  void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? NULL : p;
}

static int sm_prof_text_of(struct dl_phdr_info *info, size_t size, void *arg) {
  (void)size;
  uintptr_t at = (uintptr_t)arg;
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
    if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_X)) continue;
    uintptr_t lo = info->dlpi_addr + ph->p_vaddr, hi = lo + ph->p_memsz;
    if (at >= lo && at < hi) {
      atomic_store_explicit(&sm_prof_text_lo, lo, memory_order_relaxed);
      atomic_store_explicit(&sm_prof_text_hi, hi, memory_order_release);
      return 1;
    }
  }
  return 0;
}

/* This library's code range, found once (outside the lock). */
static void sm_prof_text_find(void) {
  if (atomic_load_explicit(&sm_prof_text_hi, memory_order_acquire) == 0)
    dl_iterate_phdr(sm_prof_text_of, (void *)(uintptr_t)&sm_prof_text_of);
}

/* Under the lock: the tables exist.  False when they cannot be mapped. */
static bool sm_prof_tables_locked(void) {
  if (sm_prof_stacks) return true;
  sm_prof_stack_t *stacks = sm_prof_map(SM_PROF_STACKS * sizeof *stacks);
  uint32_t *index = sm_prof_map(2 * SM_PROF_STACKS * sizeof *index);
  sm_prof_live_t *live = sm_prof_map(1024 * sizeof *live);
  sm_prof_count_t *filter = sm_prof_map(SM_PROF_FILTER * sizeof *filter);
  if (!stacks || !index || !live || !filter) {
    if (stacks) munmap(stacks, SM_PROF_STACKS * sizeof *stacks);
    if (index) munmap(index, 2 * SM_PROF_STACKS * sizeof *index);
    if (live) munmap(live, 1024 * sizeof *live);
    if (filter) munmap(filter, SM_PROF_FILTER * sizeof *filter);
    return false;
  }
  atomic_store_explicit(&sm_prof_filter, filter, memory_order_release);
  sm_prof_stacks = stacks;
  sm_prof_index = index;
  sm_prof_live = live;
  sm_prof_live_cap = 1024;
  return true;
}

static uint64_t sm_prof_hash(void *const *frames, uint32_t depth) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ depth;
  for (uint32_t i = 0; i < depth; i++) h = (h ^ (uintptr_t)frames[i]) * 0xff51afd7ed558ccdull;
  return h ^ (h >> 29);
}

/* Under the lock: the number of the stack at frames, the one its memo
 * (NULL: none) holds when it has one: a stack taken again from the same
 * place is not hashed and compared again (bench_churn e with profiling:
 * about 200 instructions a sample). */
static uint32_t sm_prof_intern_locked(void *const *frames, uint32_t depth);
static uint32_t sm_prof_stack_number_locked(sm_prof_memo_t *memo, void *const *frames, uint32_t depth) {
  if (memo && memo->stack != 0 && memo->gen == sm_prof_gen) return memo->stack - 1;
  uint32_t s = sm_prof_intern_locked(frames, depth);
  if (memo) {
    memo->stack = s + 1;
    memo->gen = sm_prof_gen;
  }
  return s;
}

/* Under the lock: the number of the stack, stored if it is new. */
static uint32_t sm_prof_intern_locked(void *const *frames, uint32_t depth) {
  uint64_t h = sm_prof_hash(frames, depth);
  uint32_t mask = 2 * SM_PROF_STACKS - 1;
  for (uint32_t i = (uint32_t)h & mask;; i = (i + 1) & mask) {
    uint32_t s = sm_prof_index[i];
    if (s == 0) {
      if (sm_prof_nstacks == SM_PROF_STACKS) return SM_PROF_STACKS - 1;   /* full: the last takes the rest */
      sm_prof_stack_t *st = &sm_prof_stacks[sm_prof_nstacks];
      st->hash = h;
      st->depth = depth;
      memcpy(st->frames, frames, depth * sizeof *frames);
      sm_prof_index[i] = ++sm_prof_nstacks;
      return sm_prof_nstacks - 1;
    }
    sm_prof_stack_t *st = &sm_prof_stacks[s - 1];
    if (st->hash == h && st->depth == depth && memcmp(st->frames, frames, depth * sizeof *frames) == 0)
      return s - 1;
  }
}

/* ---- a page's marks (internal.h) -------------------------------------- */

/* w with mark m put in a free lane (add) or taken out of its lane;
 * SM_PROF_MANY when no lane is free. */
static uint64_t sm_prof_marks_with(uint64_t w, uint64_t m, bool add) {
  for (unsigned i = 0; i < SM_PROF_MARKS; i++) {
    uint64_t lane = (w >> (16 * i)) & 0xffff;
    if (add && lane == 0) return w | m << (16 * i);
    if (!add && lane == m) return w & ~((uint64_t)0xffff << (16 * i));
  }
  return add ? SM_PROF_MANY : w;
}
/* Change page's marks: m added (the owner, as it samples) or taken out
 * (the thread that frees the sample, any); SM_PROF_MANY stays. */
static void sm_prof_marks_update(sm_page_t *page, uint64_t m, bool add) {
  uint64_t w = atomic_load_explicit(&page->prof_marks, memory_order_relaxed);
  while (w != SM_PROF_MANY &&
         !atomic_compare_exchange_weak_explicit(&page->prof_marks, &w, sm_prof_marks_with(w, m, add),
                                                memory_order_relaxed, memory_order_relaxed)) {
  }
}

static size_t sm_prof_slot(uintptr_t addr, size_t cap) {
  return (size_t)((addr * 0x9E3779B97F4A7C15ull) >> 20) & (cap - 1);
}

static sm_prof_count_t *sm_prof_filter_at(sm_prof_count_t *filter, uintptr_t addr) {
  return &filter[(addr * 0xBF58476D1CE4E5B9ull) >> 48];
}

/* Under the lock: room for one more live sample (the table at most half
 * used, deleted slots included).  False when it cannot grow. */
static bool sm_prof_live_room_locked(void) {
  if (2 * (sm_prof_live_slots + 1) <= sm_prof_live_cap) return true;
  uint64_t n = atomic_load_explicit(&sm_prof_live_n, memory_order_relaxed);
  size_t cap = sm_prof_live_cap;
  while (4 * (n + 1) > cap) cap *= 2;   /* a quarter full after the rehash */
  sm_prof_live_t *t = sm_prof_map(cap * sizeof *t);
  if (!t) return false;
  for (size_t i = 0; i < sm_prof_live_cap; i++) {
    sm_prof_live_t *e = &sm_prof_live[i];
    if (e->addr <= 1) continue;
    size_t j = sm_prof_slot(e->addr, cap);
    while (t[j].addr) j = (j + 1) & (cap - 1);
    t[j] = *e;
  }
  munmap(sm_prof_live, sm_prof_live_cap * sizeof *sm_prof_live);
  sm_prof_live = t;
  sm_prof_live_cap = cap;
  sm_prof_live_slots = n;
  return true;
}

/* ---- sampling ------------------------------------------------------ */

typedef struct sm_prof_unwind_s {
  void **frames;
  uintptr_t *cfa;
  int n, cap;   /* n -1 until the first frame, _Unwind_Backtrace's own */
} sm_prof_unwind_t;

/* libgcc_s's unwinder, loaded when profiling starts, as the C library's
 * backtrace(3) loads it at its first call (a library every process linked
 * to smalloc loaded at start-up would cost each of them 0.2 ms); NULL
 * when it cannot be loaded, and backtrace(3) serves. */
typedef struct sm_prof_unwinder_s {
  _Unwind_Reason_Code (*backtrace)(_Unwind_Trace_Fn, void *);
  _Unwind_Ptr (*ip)(struct _Unwind_Context *);
  _Unwind_Word (*cfa)(struct _Unwind_Context *);
} sm_prof_unwinder_t;
static sm_prof_unwinder_t sm_prof_unw;
static _Atomic int sm_prof_unw_state;   /* 0 not tried, 1 loaded, 2 not there, 3 being written */

/* Under sm_prof_busy: its allocations are not sampled.  Threads that
 * sample first at the same time each load it (no lock is held across
 * dlopen, which takes the loader's lock: a thread in dlopen may be
 * sampling); the first to finish writes sm_prof_unw, the others wait
 * the few stores that takes (ThreadSanitizer saw two threads write it). */
static bool sm_prof_unwinder_load(void) {
  int state = atomic_load_explicit(&sm_prof_unw_state, memory_order_acquire);
  if (state == 1 || state == 2) return state == 1;
  void *h = dlopen("libgcc_s.so.1", RTLD_NOW | RTLD_LOCAL);
  sm_prof_unwinder_t u = {0};
  if (h) {
    *(void **)&u.backtrace = dlsym(h, "_Unwind_Backtrace");
    *(void **)&u.ip = dlsym(h, "_Unwind_GetIP");
    *(void **)&u.cfa = dlsym(h, "_Unwind_GetCFA");
  }
  bool ok = u.backtrace && u.ip && u.cfa;
  int expect = 0;
  if (atomic_compare_exchange_strong_explicit(&sm_prof_unw_state, &expect, 3, memory_order_acquire,
                                              memory_order_acquire)) {
    if (ok) sm_prof_unw = u;
    atomic_store_explicit(&sm_prof_unw_state, ok ? 1 : 2, memory_order_release);
    return ok;
  }
  while ((state = atomic_load_explicit(&sm_prof_unw_state, memory_order_acquire)) == 3) sched_yield();
  return state == 1;
}

/* Each frame's return address, and the unwinder's CFA for it: the stack
 * pointer of the frame at its call, so on x86-64 the return address sits
 * just below it. */
static _Unwind_Reason_Code sm_prof_frame(struct _Unwind_Context *ctx, void *arg) {
  sm_prof_unwind_t *u = arg;
  if (u->n == u->cap) return _URC_END_OF_STACK;
  if (u->n >= 0) {
    u->frames[u->n] = (void *)sm_prof_unw.ip(ctx);
    u->cfa[u->n] = sm_prof_unw.cfa(ctx);
  }
  u->n++;
  return _URC_NO_REASON;
}

/* The memo of the stack taken from frame address sp, when its slots
 * still hold its return addresses; else NULL.  The slots of a stack that
 * is not that one any more may be anything in the frames above: a
 * sanitizer's red zone, a local memcheck sees as undefined (no memo
 * under valgrind, sm_prof_unwind). */
/* The memo of frame address sp, or SM_PROF_MEMOS: any of the four (one
 * place per address made two addresses that met there unwind every
 * time). */
#if defined(__x86_64__)
static int sm_prof_memo_of(const sm_heap_t *heap, uintptr_t sp) {
  int k = 0;
  while (k < SM_PROF_MEMOS && heap->prof_memo[k].sp != sp) k++;
  return k;
}
#endif

__attribute__((no_sanitize("address")))
static sm_prof_memo_t *sm_prof_memo_find(sm_heap_t *heap, uintptr_t sp) {
#if defined(__x86_64__)
  int k = sm_prof_memo_of(heap, sp);
  if (k == SM_PROF_MEMOS || heap->prof_memo[k].n == 0) return NULL;
  sm_prof_memo_t *m = &heap->prof_memo[k];
  for (uint32_t i = 0; i < m->n; i++)
    if (*(const uintptr_t *)(sp + m->slot[i]) != m->ip[i]) return NULL;
  return m;
#else
  (void)heap; (void)sp;
  return NULL;
#endif
}

/* Remember the n frames just unwound from frame address sp, when each
 * return address sits where x86-64 puts it, just below the unwinder's CFA
 * for it (a signal frame breaks that). */
static sm_prof_memo_t *sm_prof_memo_keep(sm_heap_t *heap, uintptr_t sp, void *const *frames, const uintptr_t *cfa,
                                          int n) {
#if defined(__x86_64__)
  /* the one from this frame address again, else the one kept longest ago */
  int k = sm_prof_memo_of(heap, sp);
  if (k == SM_PROF_MEMOS) k = (int)(heap->prof_memo_next++ % SM_PROF_MEMOS);
  sm_prof_memo_t *m = &heap->prof_memo[k];
  m->sp = 0;
  m->stack = 0;
  if (n < 1 || n > SM_PROF_MEMO_MAX) return NULL;
  for (int i = 0; i < n; i++) {
    uintptr_t at = cfa[i] - sizeof(uintptr_t);
    if (at < sp || at - sp > UINT32_MAX || *(const uintptr_t *)at != (uintptr_t)frames[i]) return NULL;
    m->slot[i] = (uint32_t)(at - sp);
  }
  for (int i = 0; i < n; i++) m->ip[i] = (uintptr_t)frames[i];
  m->n = (uint32_t)n;
  m->sp = sp;
  return m;
#else
  (void)heap; (void)sp; (void)frames; (void)cfa; (void)n;
  return NULL;
#endif
}

/* The calling thread's stack (frames[0] in this function), unwound or
 * as remembered: the number of frames, and in *memo the memo that holds
 * it (NULL: none); no frames when the memo knows the stack's number. */
static __attribute__((noinline)) int sm_prof_unwind(sm_heap_t *heap, void **frames, int cap, sm_prof_memo_t **memo) {
  uintptr_t sp = (uintptr_t)__builtin_frame_address(0);
  sm_prof_memo_t *m = sm_track_on() ? NULL : sm_prof_memo_find(heap, sp);
  *memo = NULL;
  if (m && (int)m->n <= cap) {
    *memo = m;
    /* its number known (sm_prof_stack_number_locked): no frames needed */
    if (m->stack != 0 && m->gen == sm_prof_gen) return 0;
    for (uint32_t i = 0; i < m->n; i++) frames[i] = (void *)m->ip[i];
    return (int)m->n;
  }
  if (!sm_prof_unwinder_load()) return backtrace(frames, cap);
  uintptr_t cfa[SM_PROF_DEPTH + 8];
  sm_prof_unwind_t u = {frames, cfa, -1, cap < SM_PROF_DEPTH + 8 ? cap : SM_PROF_DEPTH + 8};
  sm_prof_unw.backtrace(sm_prof_frame, &u);
  if (u.n > 0 && frames[u.n - 1] == NULL) u.n--;   /* the outermost frame's end mark */
  if (u.n < 0) u.n = 0;
  *memo = sm_prof_memo_keep(heap, sp, frames, cfa, u.n);
  return u.n;
}

/* The caller's stack, this library's frames left out: the number of
 * frames at *start, and the memo that holds it (sm_prof_unwind). */
static int sm_prof_stack(sm_heap_t *heap, void **frames, int cap, void ***start, sm_prof_memo_t **memo) {
  int busy = sm_prof_hush(SM_PROF_QUIET);
  sm_prof_text_find();
  int depth = sm_prof_unwind(heap, frames, cap, memo);
  sm_prof_hush_end(busy);
  uintptr_t lo = atomic_load_explicit(&sm_prof_text_lo, memory_order_relaxed);
  uintptr_t hi = atomic_load_explicit(&sm_prof_text_hi, memory_order_relaxed);
  /* past the last of this library's frames, however deep the event
   * (a segment mapped for a malloc is a dozen of them in); up to 7 frames
   * of others between two of ours are crossed: a sanitizer's interceptor
   * of backtrace, or the unwinder's own, may come first */
  int skip = 0;
  for (int i = 0; i < depth && i < skip + 8; i++)
    if ((uintptr_t)frames[i] >= lo && (uintptr_t)frames[i] < hi) skip = i + 1;
  *start = frames + skip;
  return depth - skip > SM_PROF_DEPTH ? SM_PROF_DEPTH : depth - skip;
}

/* What profiling costs once, paid where it starts (the constructor with
 * SMALLOC_PROF or SMALLOC_PROF_LEAKS set, smalloc_prof_start) rather than
 * at its first sample, in the middle of the program's work: the tables,
 * this library's code range, the unwinder and a first stack (libgcc finds
 * the unwind tables then); nothing allocated meanwhile is sampled.  False
 * when the tables cannot be mapped. */
static bool sm_prof_prepare(void) {
  sm_lock(&sm_prof_lock);
  bool ok = sm_prof_tables_locked();
  sm_unlock(&sm_prof_lock);
  if (!ok) return false;
  int busy = sm_prof_hush(SM_PROF_QUIET);
  sm_prof_text_find();
  if (sm_prof_unwinder_load()) {
    void *frames[4];
    uintptr_t cfa[4];
    sm_prof_unwind_t u = {frames, cfa, -1, 4};
    sm_prof_unw.backtrace(sm_prof_frame, &u);
    atomic_store_explicit(&sm_prof_unwinder_ready, 1, memory_order_relaxed);
  }
  sm_prof_hush_end(busy);
  return true;
}

/* Record block b (n bytes; page NULL above the size classes) as a sample
 * with the calling stack. */
static void sm_prof_record(sm_heap_t *heap, sm_page_t *page, void *b, size_t n) {
  void *frames[SM_PROF_DEPTH + 8], **at;
  sm_prof_memo_t *memo;
  int depth = sm_prof_stack(heap, frames, SM_PROF_DEPTH + 8, &at, &memo);
  atomic_store_explicit(&sm_prof_unwinder_ready, 1, memory_order_relaxed);
  sm_lock(&sm_prof_lock);
  bool kept = false;
  if (sm_prof_tables_locked() && sm_prof_live_room_locked()) {
    uint32_t s = sm_prof_stack_number_locked(memo, at, (uint32_t)depth);
    sm_prof_stack_t *st = &sm_prof_stacks[s];
    st->live_count++;
    st->live_bytes += n;
    st->alloc_count++;
    st->alloc_bytes += n;
    size_t j = sm_prof_slot((uintptr_t)b, sm_prof_live_cap);
    while (sm_prof_live[j].addr > 1) j = (j + 1) & (sm_prof_live_cap - 1);
    if (sm_prof_live[j].addr == 0) sm_prof_live_slots++;
    sm_prof_live[j] = (sm_prof_live_t){(uintptr_t)b, n, s};
    atomic_fetch_add_explicit(sm_prof_filter_at(sm_prof_filter, (uintptr_t)b), 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&sm_prof_live_n, 1, memory_order_relaxed);
    kept = true;
  }
  sm_unlock(&sm_prof_lock);
  if (kept && page) {
    /* with no sample live in the page, no free is taking a mark out
     * (sm_prof_forget takes its mark out before it counts the sample
     * gone): SM_PROF_MANY may go */
    uint16_t before = atomic_fetch_add_explicit(&page->sampled, 1, memory_order_acq_rel);
    if (before == 0) atomic_store_explicit(&page->prof_marks, sm_prof_mark(page, b), memory_order_relaxed);
    else sm_prof_marks_update(page, sm_prof_mark(page, b), true);
    uint8_t flags = atomic_load_explicit(&page->flags, memory_order_relaxed);
    if (!(flags & SM_PAGE_SAMPLED)) sm_page_set_sampled(page, heap, true);
  }
}

/* A sample gets units of its own (span.c), and block b goes back to its
 * page: a page that holds a sample is flagged (SM_PAGE_SAMPLED), and every
 * free into it leaves the fast path.  At the default rate a 512 KiB
 * medium page held one most of the time (bench_churn e: 440,000 of 8
 * million frees out of line), and in bench_churn f one free in eleven
 * went out of line into the producer's flagged small pages: profiling
 * took 1.20 and 1.19 times the time without it, now 1.10 and 1.03
 * (medians of 7-11 interleaved; f: 7.2 % more instructions, now 0.6 %).
 * A sample costs its unit in address space (and in the statistics: a
 * large block) and the 4 KiB pages the program touches.  Only where a
 * 64 KiB unit is at most an eighth of the bytes a sample stands for
 * (SMALLOC_PROF_RATE of 512 KiB or more), and not in the secure build,
 * under valgrind or an address-space limit: there the page is flagged.
 * Returns the block the caller hands out, and its page (NULL for units). */
static void *sm_prof_move(sm_heap_t *heap, sm_page_t **page, void *b, size_t n) {
  if (*page == NULL || SM_CANARY || sm_track_on() ||
      (uint64_t)sm_opt(PROF_RATE) < ((uint64_t)8 << SM_SMALL_SHIFT))
    return b;
  void *s = sm_span_alloc_sample(n);
  if (s == NULL) return b;
  sm_page_unpop(*page, (sm_block_t *)b);
  *page = NULL;
  sm_cnt_add(heap->stats.large_allocs, 1);
  return s;
}

/* The count-down went below zero at block b of page (NULL above the size
 * classes), n bytes, just handed out: draw again, and sample it when
 * profiling.  This is also the thread's heartbeat (sm_heap_heartbeat):
 * the caller holds no lock and no page state.  Returns b. */
void *sm_prof_sampled(sm_heap_t *heap, sm_page_t *page, void *b, size_t n) {
  sm_prof_rearm(heap);
  if (!heap->initialized) return b;
  if (atomic_load_explicit(&sm_prof_active, memory_order_relaxed) && !(sm_prof_busy & SM_PROF_NO_SAMPLE)) {
    int busy = sm_prof_hush(SM_PROF_QUIET);   /* a segment mapped for it is the profiler's doing, not a churn event */
    b = sm_prof_move(heap, &page, b, n);
    sm_prof_hush_end(busy);
    sm_prof_record(heap, page, b, n);
  }
  sm_heap_heartbeat(heap);
  sm_background_poll();
  return b;
}

/* A churn event of the calling thread (prof.c's SM_PROF_* kinds): the
 * slow-path steps are sampled, one in SMALLOC_PROF_EVENT_RATE on average
 * (each sample stands for that many), the OS calls all taken.  Not before
 * the unwinder is loaded: the first stack is taken from malloc, where it
 * may allocate; an event can come with an allocator lock held. */
void sm_prof_event_slow(int kind) {
  sm_heap_t *heap = sm_heap();
  if (!heap->initialized || (sm_prof_busy & SM_PROF_NO_EVENT) ||
      !atomic_load_explicit(&sm_prof_unwinder_ready, memory_order_relaxed))
    return;
  uint64_t weight = 1;
  if (kind < SMALLOC_STEP_COUNT) {
    if (--heap->prof_events_left > 0) return;
    /* geometric with mean rate: each event is taken with probability
     * 1 / rate, whatever came before */
    long rate = sm_opt(PROF_EVENT_RATE);
    double d = rate == 1 ? 0 : sm_ln(sm_prof_uniform(sm_heap_random(heap))) / sm_ln(1 - 1.0 / (double)rate);
    heap->prof_events_left = d > 1e12 ? (int64_t)1e12 : (int64_t)d + 1;
    weight = (uint64_t)rate;
  }
  void *frames[SM_PROF_DEPTH + 8], **at;
  sm_prof_memo_t *memo;
  int depth = sm_prof_stack(heap, frames, SM_PROF_DEPTH + 8, &at, &memo);
  sm_lock(&sm_prof_lock);
  if (sm_prof_tables_locked())
    sm_prof_stacks[sm_prof_stack_number_locked(memo, at, (uint32_t)depth)].events[kind] += weight;
  sm_unlock(&sm_prof_lock);
}

/* Block b (its start) is freed, and may be a sample (sm_prof_may_be_sample):
 * if it is, it leaves the live profile, and its page (NULL above the size
 * classes) counts one fewer. */
void sm_prof_forget(sm_page_t *page, const void *b) {
  sm_prof_count_t *filter = atomic_load_explicit(&sm_prof_filter, memory_order_acquire);
  if (filter == NULL || atomic_load_explicit(sm_prof_filter_at(filter, (uintptr_t)b), memory_order_relaxed) == 0)
    return;
  bool found = false;
  sm_lock(&sm_prof_lock);
  if (sm_prof_live) {
    for (size_t j = sm_prof_slot((uintptr_t)b, sm_prof_live_cap); sm_prof_live[j].addr != 0;
         j = (j + 1) & (sm_prof_live_cap - 1)) {
      if (sm_prof_live[j].addr != (uintptr_t)b) continue;
      sm_prof_stack_t *st = &sm_prof_stacks[sm_prof_live[j].stack];
      st->live_count--;
      st->live_bytes -= sm_prof_live[j].size;
      sm_prof_live[j].addr = 1;
      atomic_fetch_sub_explicit(sm_prof_filter_at(filter, (uintptr_t)b), 1, memory_order_relaxed);
      atomic_fetch_sub_explicit(&sm_prof_live_n, 1, memory_order_relaxed);
      found = true;
      break;
    }
  }
  sm_unlock(&sm_prof_lock);
  if (found && page) {
    sm_prof_marks_update(page, sm_prof_mark(page, b), false);
    atomic_fetch_sub_explicit(&page->sampled, 1, memory_order_release);
  }
}

/* The owner, of a flagged page with no sample left (sm_prof_page_check):
 * its frees may take the fast path again. */
void sm_prof_page_unflag(sm_heap_t *heap, sm_page_t *page) {
  atomic_store_explicit(&page->prof_marks, 0, memory_order_relaxed);
  sm_page_set_sampled(page, heap, false);
}

/* fork (fork.c): a lock a lost thread held is free in the child, and the
 * tables it was changing are not to be trusted: profiling stops there and
 * its samples are forgotten (their pages keep their flag: their frees
 * take the long way, and find nothing). */
void sm_prof_fork_child(void) {
  if (!sm_fork_lock_was_held(&sm_prof_lock)) return;
  atomic_store(&sm_prof_active, 0);
  sm_prof_stacks = NULL;
  sm_prof_index = NULL;
  sm_prof_live = NULL;
  atomic_store(&sm_prof_filter, NULL);
  sm_prof_nstacks = 0;
  sm_prof_gen++;   /* the stack numbers memos hold are gone */
  sm_prof_live_cap = sm_prof_live_slots = 0;
  atomic_store(&sm_prof_live_n, 0);
}

/* ---- the profile ----------------------------------------------------- */

typedef struct sm_out_s {
  int fd, err;
  size_t len;
  char buf[4096];
} sm_out_t;

static void sm_out_flush(sm_out_t *o) {
  for (size_t off = 0; off < o->len && o->err == 0;) {
    ssize_t w = write(o->fd, o->buf + off, o->len - off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) { o->err = w < 0 ? errno : EIO; break; }
    off += (size_t)w;
  }
  o->len = 0;
}

static void sm_out(sm_out_t *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sm_out(sm_out_t *o, const char *fmt, ...) {
  char line[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n >= sizeof line) n = sizeof line - 1;
  if (o->len + (size_t)n > sizeof o->buf) sm_out_flush(o);
  memcpy(o->buf + o->len, line, (size_t)n);
  o->len += (size_t)n;
}

/* A copy of the stack table in a mapping of its own (NULL when empty or
 * unmappable), for the reports, which write files and name frames without
 * the lock: dladdr takes the loader's lock, which a thread in dlopen holds
 * while it allocates, and may then wait for the profiler's.  The table
 * only grows: the copy holds the stacks there were before it was mapped. */
static sm_prof_stack_t *sm_prof_copy(uint32_t *n, size_t *size) {
  sm_lock(&sm_prof_lock);
  *n = sm_prof_nstacks;
  sm_unlock(&sm_prof_lock);
  *size = (size_t)*n * sizeof(sm_prof_stack_t);
  sm_prof_stack_t *copy = *n ? sm_prof_map(*size) : NULL;
  if (copy) {
    sm_lock(&sm_prof_lock);
    memcpy(copy, sm_prof_stacks, *size);
    sm_unlock(&sm_prof_lock);
  }
  return copy;
}

/* The heap profile in pprof's legacy text format (heap_v2, which pprof
 * scales back from the samples by the rate), then the process's mappings
 * for symbolisation. */
static int sm_prof_write(int fd) {
  sm_out_t o = {.fd = fd};
  uint32_t n;
  size_t size;
  sm_prof_stack_t *copy = sm_prof_copy(&n, &size);
  if (n && !copy) return ENOMEM;
  uint64_t lc = 0, lb = 0, ac = 0, ab = 0;
  for (uint32_t s = 0; s < n; s++) {
    lc += copy[s].live_count;
    lb += copy[s].live_bytes;
    ac += copy[s].alloc_count;
    ab += copy[s].alloc_bytes;
  }
  sm_out(&o, "heap profile: %llu: %llu [%llu: %llu] @ heap_v2/%ld\n", (unsigned long long)lc,
         (unsigned long long)lb, (unsigned long long)ac, (unsigned long long)ab, sm_opt(PROF_RATE));
  for (uint32_t s = 0; s < n; s++) {
    const sm_prof_stack_t *st = &copy[s];
    if (st->alloc_count == 0 && st->live_count == 0) continue;
    sm_out(&o, "%llu: %llu [%llu: %llu] @", (unsigned long long)st->live_count,
           (unsigned long long)st->live_bytes, (unsigned long long)st->alloc_count,
           (unsigned long long)st->alloc_bytes);
    for (uint32_t i = 0; i < st->depth; i++) sm_out(&o, " %p", st->frames[i]);
    sm_out(&o, "\n");
  }
  if (copy) munmap(copy, size);
  sm_out(&o, "\nMAPPED_LIBRARIES:\n");
  sm_out_flush(&o);
  int maps = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
  if (maps >= 0) {
    ssize_t r;
    while (o.err == 0 && (r = read(maps, o.buf, sizeof o.buf)) > 0) {
      o.len = (size_t)r;
      sm_out_flush(&o);
    }
    close(maps);
  }
  return o.err;
}

/* A frame's name for the reports: the symbol dladdr finds for the call
 * (the return address less one), else the address, in buf. */
static const char *sm_prof_frame_name(void *ret, char *buf, size_t cap) {
  Dl_info info;
  void *pc = (char *)ret - 1;
  if (dladdr(pc, &info) && info.dli_sname) return info.dli_sname;
  snprintf(buf, cap, "%p", pc);
  return buf;
}

/* The churn profile: folded stacks ("root;...;leaf;event count", the
 * input of flame-graph tools), symbolised with dladdr (on a copy). */
static int sm_prof_write_churn(int fd) {
  sm_out_t o = {.fd = fd};
  uint32_t n;
  size_t size;
  sm_prof_stack_t *copy = sm_prof_copy(&n, &size);
  if (n && !copy) return ENOMEM;
  for (uint32_t s = 0; s < n; s++) {
    const sm_prof_stack_t *st = &copy[s];
    for (int k = 0; k < SM_PROF_EVENTS; k++) {
      if (st->events[k] == 0) continue;
      for (uint32_t i = st->depth; i-- > 0;) {
        char name[64];
        sm_out(&o, "%s;", sm_prof_frame_name(st->frames[i], name, sizeof name));
      }
      sm_out(&o, "%s %llu\n", sm_prof_event_names[k], (unsigned long long)st->events[k]);
    }
  }
  sm_out_flush(&o);
  if (copy) munmap(copy, size);
  return o.err;
}

/* ---- API ------------------------------------------------------------- */

SM_EXPORT int smalloc_prof_start(void) {
  sm_process_init();
  if (!sm_prof_prepare()) return ENOMEM;
  atomic_store(&sm_prof_active, 1);
  sm_heap_t *heap = sm_heap();
  if (heap->initialized) {
    heap->prof_rng = 0;   /* with SMALLOC_PROF_SEED: its draws start again from the seed */
    sm_prof_rearm(heap);  /* this thread samples from now on */
  }
  return 0;
}

SM_EXPORT void smalloc_prof_stop(void) {
  atomic_store(&sm_prof_active, 0);
}

SM_EXPORT void smalloc_prof_reset(void) {
  sm_lock(&sm_prof_lock);
  for (uint32_t s = 0; s < sm_prof_nstacks; s++) {
    sm_prof_stacks[s].alloc_count = sm_prof_stacks[s].live_count;
    sm_prof_stacks[s].alloc_bytes = sm_prof_stacks[s].live_bytes;
    memset(sm_prof_stacks[s].events, 0, sizeof sm_prof_stacks[s].events);
  }
  sm_unlock(&sm_prof_lock);
}

static int sm_prof_write_file(const char *path, int (*write_fn)(int)) {
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return errno;
  int err = write_fn(fd);
  if (close(fd) != 0 && err == 0) err = errno;
  return err;
}

SM_EXPORT int smalloc_prof_dump(const char *path) {
  char name[4096];
  if (path == NULL) {
    snprintf(name, sizeof name, "smalloc.%ld.heap", (long)getpid());
    path = name;
  }
  int err = sm_prof_write_file(path, sm_prof_write);
  char churn[4096 + 8];
  if (snprintf(churn, sizeof churn, "%s.churn", path) >= (int)sizeof churn) return err ? err : ENAMETOOLONG;
  int err2 = sm_prof_write_file(churn, sm_prof_write_churn);
  return err ? err : err2;
}

/* SMALLOC_PROF=1 or SMALLOC_PROF_LEAKS=1: profiling from the start. */
void sm_prof_init(void) {
  if (sm_opt(PROF) || sm_opt(PROF_LEAKS)) atomic_store(&sm_prof_active, 1);
}

/* The library's constructor: where profiling was switched on by the
 * environment, it is made ready now (sm_prof_prepare). */
void sm_prof_init_late(void) {
  if (atomic_load(&sm_prof_active)) sm_prof_prepare();
}

/* The stack's callers for a report line: the innermost six, named with
 * dladdr where the program exports a name. */
static void sm_prof_where(const sm_prof_stack_t *st, char *where, size_t cap) {
  size_t len = 0;
  where[0] = '\0';
  for (uint32_t i = 0; i < st->depth && i < 6 && len + 80 < cap; i++) {
    char name[64];
    int w = snprintf(where + len, cap - len, "%s%s", i ? " < " : "",
                     sm_prof_frame_name(st->frames[i], name, sizeof name));
    if (w > 0) len += (size_t)w;
  }
}

static uint64_t sm_prof_event_sum(const sm_prof_stack_t *st) {
  uint64_t n = 0;
  for (int k = 0; k < SM_PROF_EVENTS; k++) n += st->events[k];
  return n;
}

/* The unsampled estimate of a stack's live bytes (pprof's heap_v2). */
static double sm_prof_live_estimate(const sm_prof_stack_t *st) {
  if (st->live_count == 0) return 0;
  double avg = (double)st->live_bytes / (double)st->live_count;
  double rate = (double)sm_opt(PROF_RATE);
  /* 1 - exp(-x), x = avg / rate, by exp(-x) = 1 / e^x with e^x's series
   * for small x and halving for large: no libm */
  double x = avg / rate, e = 1, term = 1;
  int halvings = 0;
  while (x > 0.5) { x /= 2; halvings++; }
  for (int i = 1; i < 12; i++) { term *= x / i; e += term; }
  while (halvings-- > 0) e *= e;
  return (double)st->live_bytes / (1 - 1 / e);
}

/* The copied stack with the most live bytes (estimated) not reported yet,
 * or NULL; the caller marks it reported (live_count 0). */
static sm_prof_stack_t *sm_prof_top_live(sm_prof_stack_t *copy, uint32_t n, double *bytes) {
  sm_prof_stack_t *top = NULL;
  *bytes = 0;
  for (uint32_t s = 0; s < n; s++) {
    double b = sm_prof_live_estimate(&copy[s]);
    if (copy[s].live_count && b > *bytes) { top = &copy[s]; *bytes = b; }
  }
  return top;
}

/* SMALLOC_PROF_LEAKS=1: the sampled blocks still live at exit, the stacks
 * that hold the most bytes first (the top SM_PROF_LEAK_LINES), through the
 * smalloc: printer.  Works on a copy of the table (dladdr, see above). */
#define SM_PROF_LEAK_LINES 20
static void sm_prof_leak_report(void) {
  uint32_t n;
  size_t size;
  sm_prof_stack_t *copy = sm_prof_copy(&n, &size);
  uint64_t blocks = 0, stacks = 0;
  double bytes = 0;
  for (uint32_t s = 0; copy && s < n; s++) {
    if (copy[s].live_count == 0) continue;
    blocks += copy[s].live_count;
    bytes += sm_prof_live_estimate(&copy[s]);
    stacks++;
  }
  sm_message("leak report: %llu sampled blocks live at exit, about %.0f bytes from %llu call stacks "
             "(SMALLOC_PROF_RATE %ld)", (unsigned long long)blocks, bytes, (unsigned long long)stacks,
             sm_opt(PROF_RATE));
  for (int line = 0; line < SM_PROF_LEAK_LINES && copy; line++) {
    double top_bytes;
    sm_prof_stack_t *top = sm_prof_top_live(copy, n, &top_bytes);
    if (!top) break;
    char where[400];
    sm_prof_where(top, where, sizeof where);
    sm_message("  about %.0f bytes in %llu sampled blocks, allocated at %s", top_bytes,
               (unsigned long long)top->live_count, where);
    top->live_count = 0;   /* done */
  }
  if (copy) munmap(copy, size);
}

/* The stats table's last part while anything was sampled: the ten call
 * stacks with the most live bytes (estimated) and the ten that caused the
 * most slow work. */
void sm_prof_print_top(FILE *out) {
  uint32_t n;
  size_t size;
  sm_prof_stack_t *copy = sm_prof_copy(&n, &size);
  if (!copy) return;
  char where[400];
  fprintf(out, "  heap profile: the call sites with the most live bytes (estimated from samples)\n");
  for (int line = 0; line < 10; line++) {
    double top_bytes;
    sm_prof_stack_t *top = sm_prof_top_live(copy, n, &top_bytes);
    if (!top) break;
    sm_prof_where(top, where, sizeof where);
    fprintf(out, "  %14.0f B  %s\n", top_bytes, where);
    top->live_count = 0;
  }
  fprintf(out, "  churn profile: the call sites that caused the most slow-path steps and OS calls\n");
  for (int line = 0; line < 10; line++) {
    sm_prof_stack_t *top = NULL;
    for (uint32_t s = 0; s < n; s++)
      if (sm_prof_event_sum(&copy[s]) && (!top || sm_prof_event_sum(&copy[s]) > sm_prof_event_sum(top)))
        top = &copy[s];
    if (!top) break;
    sm_prof_where(top, where, sizeof where);
    fprintf(out, "  %14llu    %s\n", (unsigned long long)sm_prof_event_sum(top), where);
    memset(top->events, 0, sizeof top->events);
  }
  munmap(copy, size);
}

/* SMALLOC_PROF_DUMP: where the profiles at exit go ("%p" the process id);
 * empty: smalloc.PID.heap in the current directory. */
static char sm_prof_dump_path[SM_STATS_FILE_MAX];

void sm_prof_set_dump(const char *path) {
  snprintf(sm_prof_dump_path, sizeof sm_prof_dump_path, "%s", path);
}

/* At exit: the profiles, with SMALLOC_PROF=1, or with SMALLOC_PROF_DUMP
 * when the program profiled (smalloc_prof_start). */
void sm_prof_at_exit(void) {
  if (sm_opt(PROF_LEAKS)) sm_prof_leak_report();
  bool profiled = atomic_load_explicit(&sm_prof_filter, memory_order_acquire) != NULL;
  if (!sm_opt(PROF) && !(sm_prof_dump_path[0] && profiled)) return;
  char path[512];
  if (sm_prof_dump_path[0]) sm_path_expand(sm_prof_dump_path, path, sizeof path);
  int err = smalloc_prof_dump(sm_prof_dump_path[0] ? path : NULL);
  if (err) sm_message("SMALLOC_PROF: cannot write the profile to %s: %s",
                      sm_prof_dump_path[0] ? path : "smalloc.PID.heap", strerror(err));
}
