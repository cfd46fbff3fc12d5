/* Large blocks (above the size classes, up to SM_LARGE_MAX) packed into
 * shared segments of 64 KiB units, backed by transparent huge pages where
 * the system offers them (THP "madvise" or "always").
 *
 * Why: a block of 256 KiB-2 MiB in a mapping of its own is faulted in
 * 4 KiB at a time, and a mapping under 2 MiB never gets a huge page.  In
 * a segment advised MADV_HUGEPAGE before its first touch (all but the
 * lower half of the first: sm_span_segment_new), the same blocks fault in
 * 2 MiB at a time: 64 live blocks of 256 KiB-2 MiB replaced at random
 * (make bench, largerep-mid) took 27,537 page faults and 0.096 s with a
 * mapping each, 168 faults and 0.057 s packed.
 *
 * Layout: unit 0 holds the segment header; a block takes a run of units
 * [i, i + k) and pages[i .. i + k - 1] all describe it (in_use, start = the
 * block, block_size = the run's bytes, limit 0 so that free goes out of
 * line), so free finds a block through the segment map like any other and
 * a pointer inside one is no block start.  A segment's free units are a
 * bit mask; a request takes the smallest run of free units that fits, in
 * any segment (a block replaced by one of its size takes its place back,
 * so steady replacement maps nothing).
 *
 * Memory goes back on the purge delay: once a segment has seen no free
 * for SMALLOC_PURGE_DELAY ms, its free units are purged (madvise), and a
 * segment without blocks is unmapped.  A half of a segment (2 MiB) that
 * purges units beside a block or the header loses its huge-page advice,
 * or khugepaged would fill it again within seconds (sm_span_halves).
 * Everything is under one lock: a large block costs far more to touch
 * than to find.
 *
 * Not used under an address-space limit (RLIMIT_AS) nor in the secure
 * build: a unit per block at most and a segment's tail are lost to
 * rounding, where a mapping of its own costs a block its size rounded to
 * 4 KiB (huge.c; in the secure build it also ends in a guard page). */
#include "internal.h"
#include "track.h"

#include <pthread.h>

#define SM_SPAN_SHIFT SM_SMALL_SHIFT                        /* 64 KiB units */
#define SM_SPAN_UNIT  ((size_t)1 << SM_SPAN_SHIFT)
#define SM_SPAN_UNITS (SM_SEGMENT_SIZE >> SM_SPAN_SHIFT)     /* 64: one mask word */
#define SM_SPAN_ALL   (~(uint64_t)1)                         /* every unit but the header's */
_Static_assert(SM_SPAN_UNITS == 64, "a segment's units fit one mask word");
_Static_assert(sizeof(sm_segment_t) <= SM_SPAN_UNIT, "the header fits unit 0");

static pthread_mutex_t sm_span_lock = PTHREAD_MUTEX_INITIALIZER;
static sm_segment_t *sm_span_first;   /* segments holding large blocks, newest first */

/* The mask of k units from unit i. */
static uint64_t sm_span_run(unsigned i, unsigned k) {
  return (k >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << k) - 1)) << i;
}

/* The first run of set bits in f (not 0): its first unit, and its
 * length in *len. */
static unsigned sm_span_first_run(uint64_t f, unsigned *len) {
  unsigned s = (unsigned)__builtin_ctzll(f);
  uint64_t rest = ~(f >> s);
  *len = rest ? (unsigned)__builtin_ctzll(rest) : 64 - s;
  return s;
}

/* The smallest run of at least k free units in mask f: its first unit,
 * and its length in *len (0 when none). */
static unsigned sm_span_best_run(uint64_t f, unsigned k, unsigned *len) {
  unsigned best = 0;
  *len = 0;
  while (f) {
    unsigned n, s = sm_span_first_run(f, &n);
    if (n >= k && (*len == 0 || n < *len)) {
      best = s;
      *len = n;
      if (n == k) break;
    }
    f &= ~sm_span_run(s, n);
  }
  return best;
}

/* Units holding blocks. */
static unsigned sm_span_used(const sm_segment_t *seg) {
  return (unsigned)__builtin_popcountll(SM_SPAN_ALL & ~seg->span_free);
}

/* The block that page describes: its first unit, and its units in *k. */
static unsigned sm_span_block(const sm_segment_t *seg, const sm_page_t *page, unsigned *k) {
  *k = page->block_size >> SM_SPAN_SHIFT;
  return (unsigned)(((uintptr_t)page->start - (uintptr_t)seg) >> SM_SPAN_SHIFT);
}

static void sm_span_list_remove(sm_segment_t *seg) {
  if (seg->prev) seg->prev->next = seg->next; else sm_span_first = seg->next;
  if (seg->next) seg->next->prev = seg->prev;
}

/* A fresh segment for large blocks; NULL when the OS refuses it or an
 * address-space limit makes packing the wrong choice.  Advised for huge
 * pages (not one for samples): the whole segment from the second on; the
 * first only its upper half, where blocks go once the lower one is full,
 * so that a program with a large block or two keeps to the bytes it
 * touches, and one with many faults its blocks in 2 MiB at a time after
 * the first 2 MiB.  64 live blocks of 256 KiB-2 MiB replaced at random
 * (bench_largerep mid): 1,173 page faults with the first segment not
 * advised, 662 with its upper half, 164 with all of it; python3 with one
 * 300 KB buffer: 16.3 MB resident in the first two cases, 17.5 MB in the
 * third.  SMALLOC_HUGEPAGES=2 advises the first whole too. */
static sm_segment_t *sm_span_segment_new(bool first, bool samples) {
  if (sm_os_space_limited()) return NULL;
  sm_segment_t *seg = sm_segment_map();
  if (!seg) return NULL;
  bool half = first && sm_opt(HUGEPAGES) < SM_HUGE_EAGER;   /* eager: the first whole too */
  unsigned advised = sm_segment_advise(seg, samples ? 0 : half ? SM_HALF_UPPER : SM_HALF_BOTH);
  sm_track_reuse(seg, SM_SPAN_UNIT);
  memset(seg, 0, sizeof *seg);
  sm_segment_hold_pages(seg, NULL);
  seg->huge_pages = (uint8_t)advised;
  seg->cookie = (uintptr_t)seg ^ sm_secret;
  seg->kind = SM_SEG_SPAN;
  seg->page_shift = SM_SPAN_SHIFT;
  seg->page_count = SM_SPAN_UNITS;
  seg->mapped = SM_SEGMENT_SIZE;
  seg->span_free = SM_SPAN_ALL;
  seg->span_samples = samples;
  sm_segmap_set((uintptr_t)seg, SM_SPAN_SHIFT);
  return seg;
}

/* Whether a request goes to a shared segment (else to a mapping of its
 * own, huge.c): the one place that decides.  A small request with a large
 * alignment comes here too; a mapping wastes less on it than a unit. */
bool sm_span_serves(size_t n, size_t alignment) {
  return !SM_GUARD && n > SM_MEDIUM_MAX - SM_CANARY && n <= SM_LARGE_MAX && alignment <= SM_SPAN_UNIT;
}

/* The halves of a segment (SM_HALF_*) that units lie in, and the units
 * of halves.  A half that huge pages may back (huge_pages) is faulted in
 * whole by the first touch of a block in it; one that purges units beside
 * a block or the header is advised against them (sm_segment_unadvise),
 * or khugepaged would fill the holes again around them. */
static const uint64_t sm_span_lower = ((uint64_t)1 << (SM_SPAN_UNITS / 2)) - 1;
static unsigned sm_span_halves(uint64_t units) {
  return ((units & sm_span_lower) ? SM_HALF_LOWER : 0u) | ((units & ~sm_span_lower) ? SM_HALF_UPPER : 0u);
}
static uint64_t sm_span_half_units(unsigned halves) {
  return ((halves & SM_HALF_LOWER) ? sm_span_lower : 0) | ((halves & SM_HALF_UPPER) ? ~sm_span_lower : 0);
}

/* Take the free units `run` of seg; under sm_span_lock.  Whether they
 * read as zero.  Purged units come back: the run's, and in a half that
 * huge pages may still back every one, faulted in with the block's first
 * touch (purged again beside it, they withdraw the advice). */
static bool sm_span_take(sm_segment_t *seg, uint64_t run) {
  seg->span_free &= ~run;
  unsigned whole = sm_span_halves(run) & seg->huge_pages &
                   ~(unsigned)atomic_load_explicit(&seg->huge_withdrawn, memory_order_relaxed);
  uint64_t purged = seg->span_purged & (run | sm_span_half_units(whole));
  if (purged) {
    size_t back = (size_t)__builtin_popcountll(purged) << SM_SPAN_SHIFT;
    sm_gadd(bytes_committed, back);
    seg->decommitted -= back;
    seg->span_purged &= ~purged;
  }
  bool zeroed = (seg->span_touched & run) == 0;
  seg->span_touched |= run;
  sm_gadd(huge_bytes, (size_t)__builtin_popcountll(run) << SM_SPAN_SHIFT);
  return zeroed;
}

/* Describe units i .. i + k - 1 of seg as one block; under sm_span_lock. */
static void sm_span_describe(sm_segment_t *seg, unsigned i, unsigned k) {
  uint8_t *start = (uint8_t *)seg + ((size_t)i << SM_SPAN_SHIFT);
  size_t bytes = (size_t)k << SM_SPAN_SHIFT;
  for (unsigned j = i; j < i + k; j++) {
    sm_page_t *page = &seg->pages[j];
    page->start = start;
    page->block_size = (uint32_t)bytes;
    page->in_use = 1;
  }
}

/* Carve k units at unit i of seg for a block; under sm_span_lock. */
static void *sm_span_carve(sm_segment_t *seg, unsigned i, unsigned k, bool *zeroed) {
  *zeroed = sm_span_take(seg, sm_span_run(i, k));
  sm_span_describe(seg, i, k);
  uint8_t *start = (uint8_t *)seg + ((size_t)i << SM_SPAN_SHIFT);
  sm_track_reuse(start, (size_t)k << SM_SPAN_SHIFT);   /* a freed block's bytes are addressable again */
  return start;
}

/* Grow the block that page describes in place to at least n bytes (at
 * most SM_LARGE_MAX), taking the free units right after it; false when
 * they are taken. */
bool sm_span_grow(sm_segment_t *seg, sm_page_t *page, size_t n) {
  /* first: the unit count of a larger n would wrap (realloc to 2^48 + 1
   * bytes "fitted" in a block of one unit and kept it) */
  if (n > SM_LARGE_MAX) return false;
  unsigned k, i = sm_span_block(seg, page, &k);
  unsigned want = (unsigned)((n + SM_SPAN_UNIT - 1) >> SM_SPAN_SHIFT);
  if (want <= k) return true;
  if (i + want > SM_SPAN_UNITS) return false;
  uint64_t more = sm_span_run(i + k, want - k);
  pthread_mutex_lock(&sm_span_lock);
  bool free = (seg->span_free & more) == more;
  if (free) {
    sm_span_take(seg, more);
    sm_span_describe(seg, i, want);
  }
  pthread_mutex_unlock(&sm_span_lock);
  return free;
}

/* A block of n bytes in a shared segment of the kind asked (samples or
 * not), or NULL.  *zeroed says whether it reads as zero. */
static void *sm_span_alloc_in(size_t n, bool samples, bool *zeroed) {
  unsigned k = (unsigned)((n + SM_SPAN_UNIT - 1) >> SM_SPAN_SHIFT);
  sm_segment_t *best = NULL;
  unsigned at = 0, best_len = 0;
  bool first = true;   /* no segment of this kind exists */
  pthread_mutex_lock(&sm_span_lock);
  for (sm_segment_t *s = sm_span_first; s; s = s->next) {
    if (s->span_samples != samples) continue;
    first = false;
    if ((unsigned)__builtin_popcountll(s->span_free) < k) continue;   /* too few free units */
    unsigned len, i = sm_span_best_run(s->span_free, k, &len);
    if (len && (best == NULL || len < best_len)) {
      best = s;
      at = i;
      best_len = len;
      if (len == k) break;
    }
  }
  void *p = NULL;
  if (best) {
    p = sm_span_carve(best, at, k, zeroed);
    sm_gadd(huge_cache_hits, 1);
  }
  pthread_mutex_unlock(&sm_span_lock);
  if (p) return p;
  sm_segment_t *seg = sm_span_segment_new(first, samples);   /* no lock held while the OS maps */
  if (!seg) return NULL;
  pthread_mutex_lock(&sm_span_lock);
  seg->next = sm_span_first;
  if (sm_span_first) sm_span_first->prev = seg;
  sm_span_first = seg;
  p = sm_span_carve(seg, 1, k, zeroed);
  pthread_mutex_unlock(&sm_span_lock);
  return p;
}

/* A large block of n bytes in a shared segment, or NULL (the caller maps
 * one of its own).  *zeroed says whether it reads as zero. */
void *sm_span_alloc(size_t n, bool *zeroed) {
  return sm_span_alloc_in(n, false, zeroed);
}

/* A block of n bytes (a medium class's) for a profile sample, in units of
 * its own (prof.c, sm_prof_move): in segments that hold only samples and
 * are never advised for huge pages, so that a sample costs the 4 KiB
 * pages it touches, not 2 MiB; NULL where shared segments are not used
 * (an address-space limit, the secure build). */
void *sm_span_alloc_sample(size_t n) {
  bool zeroed;
  return SM_GUARD ? NULL : sm_span_alloc_in(n, true, &zeroed);
}

/* Give the block that page describes back to its segment. */
void sm_span_free(sm_segment_t *seg, sm_page_t *page) {
  unsigned k, i = sm_span_block(seg, page, &k);
  pthread_mutex_lock(&sm_span_lock);
  for (unsigned j = i; j < i + k; j++) seg->pages[j].in_use = 0;
  seg->span_free |= sm_span_run(i, k);
  seg->cached_at_ms = sm_clock_ms();
  pthread_mutex_unlock(&sm_span_lock);
  sm_gadd(huge_bytes_freed, (size_t)k << SM_SPAN_SHIFT);
  sm_gadd(huge_cached, 1);
  if (sm_opt(PURGE_DELAY) == 0) sm_span_collect(false);
  else sm_background_wake();
}

/* Purge the free units of segments without a free for the purge delay
 * and unmap those without blocks; when forced, all of them now. */
void sm_span_collect(bool force) {
  uint64_t now = sm_clock_ms();
  uint64_t delay = sm_purge_delay(now);
  sm_segment_t *gone = NULL;
  pthread_mutex_lock(&sm_span_lock);
  for (sm_segment_t *s = sm_span_first, *next; s; s = next) {
    next = s->next;
    if (!force && !sm_aged(now, s->cached_at_ms, delay)) continue;
    if (sm_span_used(s) == 0) {
      sm_span_list_remove(s);
      s->next = gone;
      gone = s;
      continue;
    }
    /* each run of free units not purged yet */
    uint64_t f = s->span_free & ~s->span_purged;
    sm_segment_unadvise(s, sm_span_halves(f) & sm_span_halves(~s->span_free));   /* unit 0: the header */
    while (f) {
      unsigned n, i = sm_span_first_run(f, &n);
      uint64_t run = sm_span_run(i, n);
      size_t bytes = (size_t)n << SM_SPAN_SHIFT;
      sm_os_purge((uint8_t *)s + ((size_t)i << SM_SPAN_SHIFT), bytes);
      sm_gsub(bytes_committed, bytes);
      s->decommitted += bytes;
      s->span_purged |= run;
      s->span_touched &= ~run;
      f &= ~run;
    }
  }
  pthread_mutex_unlock(&sm_span_lock);
  while (gone) {
    sm_segment_t *next = gone->next;
    sm_gsub(segments_in_use, 1);
    sm_segment_unmap(gone);
    gone = next;
  }
}

/* Bytes of free units not purged yet, and of segments without blocks. */
size_t sm_span_unpurged(void) {
  size_t n = 0;
  pthread_mutex_lock(&sm_span_lock);
  for (sm_segment_t *s = sm_span_first; s; s = s->next)
    n += sm_span_used(s) == 0 ? SM_SEGMENT_SIZE
                            : (size_t)__builtin_popcountll(s->span_free & ~s->span_purged) << SM_SPAN_SHIFT;
  pthread_mutex_unlock(&sm_span_lock);
  return n;
}

/* fork (fork.c): a list a lost thread was changing is forgotten; its
 * segments stay mapped, unused, in the child */
void sm_span_fork_child(void) {
  if (!sm_fork_mutex_was_held(&sm_span_lock)) return;
  sm_span_first = NULL;
}
