/* Segments: 4 MiB regions aligned to their size, carved into pages.
 *
 * A thread heap holds its small and medium segments (its lists of them are
 * under heap->lock, see page.c; their pages may be owned by other heaps,
 * pool.c); empty ones go to a small process-wide cache (purged after
 * SMALLOC_PURGE_DELAY, unmapped when the cache is full); segments of
 * exited threads are abandoned and reclaimed by threads that need pages.
 * While other threads live, a thread's fresh pages come from segments
 * that all threads share (page.c: sm_page_borrow).  A heap's small
 * segments from the fifth on, and the shared small ones once there are
 * enough of them for the threads alive and the small pages in use are
 * mostly live blocks, are advised for huge pages until they first give
 * memory back (sm_segment_wants_huge).  Once
 * an allocation was refused under an address-space limit, a free page
 * gives back its range, not only its memory: the segment keeps a hole
 * there until it carves the page again (sm_os_holes), a segment with
 * holes is never cached, and it goes back to the OS around them.  Blocks
 * above the size classes have mappings of their own (huge.c).  The page
 * descriptors of small and medium segments live apart from them, in the
 * descriptor area (below). */
#include "internal.h"
#include "track.h"
#include "probes.h"

#include <pthread.h>
#include <time.h>


static pthread_mutex_t sm_cache_lock = PTHREAD_MUTEX_INITIALIZER;
static sm_segment_t *sm_cache_first;          /* most recently cached first */
static size_t sm_cache_count;
/* abandoned segments, one list per kind (small, medium) */
static pthread_mutex_t sm_abandoned_lock = PTHREAD_MUTEX_INITIALIZER;
static sm_segment_t *sm_abandoned_first[2];
static _Atomic size_t sm_abandoned_count[2];
/* when a thread last took an abandoned segment over (sm_clock_ms) */
static _Atomic uint64_t sm_abandoned_taken_ms;

_Atomic uint8_t *sm_segmap_slot(uintptr_t seg) {
  uintptr_t unit = seg >> SM_SEGMENT_SHIFT;
  uintptr_t i = unit - __atomic_load_n(&sm_segmap_base, __ATOMIC_RELAXED);
  if (i < SM_SEGMAP_WINDOW) return &sm_segmap_window[i];
  uintptr_t r = sm_segmap_root_of(unit);
  if (r >= SM_SEGMAP_ROOTS) return NULL;
  sm_segmap_mid_t *mid = atomic_load_explicit(&sm_segmap_root[r], memory_order_acquire);
  if (mid == NULL) return NULL;
  _Atomic uint8_t *leaf = atomic_load_explicit(&(*mid)[sm_segmap_mid_of(unit)], memory_order_acquire);
  return leaf ? &leaf[sm_segmap_leaf_of(unit)] : NULL;
}

/* Outside the window: a free of a block there, or a foreign pointer. */
unsigned sm_segmap_shift_far(uintptr_t seg) {
  _Atomic uint8_t *slot = sm_segmap_slot(seg);
  return slot ? atomic_load_explicit(slot, memory_order_relaxed) : 0;
}

/* Record (or with 0 erase) the segment at seg in the map; os.c gave its
 * unit a place when it mapped the segment.  Where the page map's window
 * holds the segment, each of its slices gets the page it lies in (free's
 * fast path), before the segment map says the segment is there. */
void sm_segmap_set(uintptr_t seg, unsigned shift) {
  sm_segmap_set_pages(seg, shift, NULL);
}

/* The same for a segment whose descriptors are pages (NULL: those its
 * header names, read only where the page map's window holds it). */
void sm_segmap_set_pages(uintptr_t seg, unsigned shift, sm_page_t *pages) {
  _Atomic uint8_t *slot = sm_segmap_slot(seg);
  sm_assert(slot != NULL || shift == 0);
  sm_assert(shift == 0 || shift >= SM_PAGEMAP_SHIFT);
  if (slot == NULL) return;
  uintptr_t first = sm_pagemap_index((const void *)seg);
  if (first - SM_PAGEMAP_UNIT < SM_PAGEMAP_SLICES - SM_PAGEMAP_UNIT) {   /* not none's */
    if (shift && !pages) pages = ((sm_segment_t *)seg)->pages;
    for (uintptr_t j = 0; j < SM_PAGEMAP_UNIT; j++) {
      sm_page_t *page = shift ? &pages[j >> (shift - SM_PAGEMAP_SHIFT)] : NULL;
      atomic_store_explicit(&sm_pagemap.slice[first + j], sm_pagemap_entry(page), memory_order_release);
    }
  }
  atomic_store_explicit(slot, (uint8_t)shift, memory_order_release);
}

uint64_t sm_clock_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* ---- huge pages ---------------------------------------------------------- */

/* A heap that holds this many segments of small pages (16 MiB) has its
 * next ones advised for transparent huge pages (SMALLOC_HUGEPAGES),
 * before their first touch: a large heap of small blocks is faulted in
 * 2 MiB at a time and takes a 512th of the TLB entries.  bench_longlived
 * 1e7 (10 million live blocks of 16-64 bytes, 550 MB, replaced at
 * random) on this 2-core VM: 117,210 page faults and 2.2-8.3 s of
 * replacement without, 4,561 faults and 1.5-1.6 s with.
 * Not before: a program or a thread with a small heap keeps to the 4 KiB
 * pages it touches (a huge page comes whole at its first touch), and so
 * do the many threads of a server, each with a segment or two.  Not for
 * medium pages (blocks of 8-256 KiB, a few to a page): the program may
 * never write most of a block, and python3 on bench/py-alloc.py, whose
 * heap holds a dozen sparse segments, went from 45 to 62 MB resident
 * when they were advised too (small pages alone: no change).  Small
 * pages are written as they are carved, 4 KiB at a time. */
#define SM_SEGMENT_HUGE_AFTER 4

/* The segments of the kind the heap holds, counted on its lists; under
 * its lock.  segs_held keeps the count, as the shared segments' holder
 * (sm_heap_shared) may hold thousands: 4,000 threads that each allocated
 * one block in 60 classes spent 17 % of their time walking them. */
static uint32_t sm_heap_segs_counted(const sm_heap_t *heap, int kind) {
  uint32_t k = 0;
  for (const sm_segment_t *s = heap->free_segs[kind]; s; s = s->next) k++;
  for (const sm_segment_t *s = heap->full_segs; s; s = s->next) k += s->kind == kind;
  return k;
}

/* Whether the heap holds at least n segments of the kind; under its lock. */
static bool sm_heap_holds(const sm_heap_t *heap, int kind, unsigned n) {
  sm_assert_expensive(heap->segs_held[kind] == sm_heap_segs_counted(heap, kind));
  return heap->segs_held[kind] >= n;
}

/* The shared segments (page.c: sm_page_borrow) hold the pages of every
 * thread, side by side: their small ones are advised like a heap's own
 * from the fifth on, but not before they hold a segment (4 MiB) for
 * every live thread.  A huge page brings in the part of each page not
 * carved yet, and every thread carves a page of each class it uses: up
 * to 64 KiB a class and thread that 4 KiB pages would not hold.
 * bench_xchurn, 20,000 blocks of 16-256 bytes live per thread: resident
 * 1.43-1.45x the live bytes at 64 threads and 1.32x at 256 with none
 * advised, 1.52-1.57x and 1.54-1.58x advised from a segment per four
 * threads; with this rule, 1.41-1.52x (none advised: 60 segments for 65
 * threads) and 1.27-1.46x.  The density of the small pages (below) is
 * no substitute: it is read as each segment is mapped, and does not
 * bound what its huge pages hold later.  Advised on it alone from the
 * fifth segment, 256 threads with 20,000 blocks each ran 0.87 times as
 * long (medians of 3 interleaved runs of 8 million steps), but after
 * 60 s of churn were resident at 1.69 times the live bytes, flat from
 * 10 s on, against 1.37 with this rule.
 * Their medium segments never are, as a heap's own are not: every thread
 * keeps a 512 KiB page of each medium class it uses, and a huge page
 * brings in four of them whole.  A probe of ours, 200 threads exchanging
 * blocks through a table of slots (16-256 bytes, one in eight up to 8
 * KB, one in sixteen up to 300 KB, the first 72 bytes of each written):
 * 7.4 s and 3.4 GB resident when shared medium segments were advised,
 * 0.51 s and 418 MB when not (glibc: 1.6 s, 320 MB); with 8 threads, 2.5
 * s and 1.2 GB against 0.19 s and 271 MB.  bench_server (8 threads, its
 * blocks of 8-32 KiB written at both ends) runs 1.1 times as long
 * without the advice. */
static unsigned sm_segment_huge_after(const sm_heap_t *heap) {
  if (heap != sm_heap_shared) return SM_SEGMENT_HUGE_AFTER;
  uint64_t live = atomic_load_explicit(&sm_heaps_live, memory_order_relaxed);
  return live > SM_SEGMENT_HUGE_AFTER ? (unsigned)live : SM_SEGMENT_HUGE_AFTER;
}

/* Whether the small pages in use are mostly live blocks: the small-class
 * bytes the heaps published (stats.c; each thread's lag is small beside
 * a segment) come to 3/4 of the pages' bytes.  The shared segments take
 * huge pages only then.  A program whose threads each hold a few blocks
 * of many classes keeps most of each page it carved unwritten, and a
 * huge page writes it all: bench_server (8 threads, 2,000 live blocks of
 * 16 B-32 KiB each) held 1.9-3.5 MB of small blocks in 166-288 pages
 * (10-18 MB) when it mapped its shared segments, and took 141 MB
 * resident with them advised, 74 MB without (tcmalloc 66 MB), in 0.164 s
 * against 0.144 s (medians of 11 interleaved runs; its slowest run 0.414
 * s against 0.163 s: a huge page's fault may wait for the kernel to
 * compact memory).  Dense heaps keep them: bench_xchurn 8 with 100,000
 * blocks a thread reads 0.89-0.99 at each of its new segments.  The one
 * loser measured: bench_server relay, whose workers come and go and,
 * carving each other's pages again, touch all of the segments: 0.257 s
 * without the advice against 0.242 s with it (44,000 page faults
 * against 22,000).  A thread's own segments are not held to it: one
 * thread carves its pages as it fills them, so what its pages hold
 * unwritten is at most a page per class in use, and a heap whose blocks
 * were freed keeps its pages written (the share of live blocks falls,
 * not what a huge page would bring in). */
#define SM_DENSE_NUM 3
#define SM_DENSE_DEN 4
static bool sm_small_pages_dense(void) {
  uint64_t live = 0, page_bytes = 0;
  for (size_t bin = 1; bin <= SM_BIN_SMALL_LAST; bin++) {
    int64_t n = atomic_load_explicit(&sm_gstats.class_live[bin], memory_order_relaxed);
    int64_t pb = atomic_load_explicit(&sm_gstats.class_page_bytes[bin], memory_order_relaxed);
    if (n > 0) live += (uint64_t)n * sm_bin_size(bin);
    if (pb > 0) page_bytes += (uint64_t)pb;
  }
  return live * SM_DENSE_DEN >= page_bytes * SM_DENSE_NUM;
}

/* Whether the heap's next segment of the kind is advised (the one place
 * that decides); under its lock.  SMALLOC_HUGEPAGES=2 (SM_HUGE_EAGER)
 * advises every segment of small pages, from a heap's first, dense or
 * not: for machines where a 4 KiB page fault costs far more than a
 * share of a huge one.  On a 2-core VM whose 4 KiB faults took 10-14 us
 * each (a huge page's, once the host had backed its memory, 120-180 us:
 * 0.3 us per 4 KiB), bench_server ran in 0.57 times the time at 1.49
 * times the resident size, bench_server relay 0.76 and 1.57, bench_xchurn
 * 16 0.91 and 1.14; bench_longlived 1000 grew from 1.8 to 3.7 MB
 * (medians of 7 interleaved runs).  Not the default: the memory is
 * certain, the time depends on the machine (where a 4 KiB fault costs
 * what zeroing it does, there is little to gain).  Medium segments stay
 * unadvised. */
static bool sm_segment_wants_huge(const sm_heap_t *heap, int kind) {
  /* medium segments, a thread's own or shared: see above */
  if (SM_GUARD || !sm_opt(HUGEPAGES) || kind != SM_SEG_SMALL || sm_os_space_limited()) return false;
  if (sm_opt(HUGEPAGES) >= SM_HUGE_EAGER) return true;
  if (!sm_heap_holds(heap, kind, sm_segment_huge_after(heap))) return false;
  return heap != sm_heap_shared || sm_small_pages_dense();
}

/* Where halves of seg (SM_HALF_*, not 0) start; their bytes in *len. */
static uint8_t *sm_segment_halves_at(sm_segment_t *seg, unsigned halves, size_t *len) {
  *len = halves == SM_HALF_BOTH ? SM_SEGMENT_SIZE : SM_SEGMENT_SIZE / 2;
  return (uint8_t *)seg + (halves == SM_HALF_UPPER ? SM_SEGMENT_SIZE / 2 : 0);
}

/* Advise the halves of a freshly mapped segment for huge pages, before
 * the header's first touch (or the header's first 2 MiB fault in 4 KiB
 * pages): the halves that huge pages may back, which the caller records
 * in huge_pages once the header is written.  Those advised, or all of
 * them where the kernel backs memory with huge pages unasked (THP
 * "always"); 0 where the advice is off or refused. */
unsigned sm_segment_advise(sm_segment_t *seg, unsigned halves) {
  unsigned backed = sm_os_thp_always() ? SM_HALF_BOTH : 0;
  if (halves == 0) return backed;
  size_t len;
  uint8_t *from = sm_segment_halves_at(seg, halves, &len);
  return (sm_os_hugepage(from, len) == 0 ? halves : 0) | backed;
}

/* Halves of a segment give memory back (madvise) for the first time since
 * huge pages may back them (advised, or mapped under THP "always"): they
 * are advised against huge pages, or the kernel's khugepaged would fill
 * the hole again with a huge page around the 4 KiB pages still in use
 * next to it (by default it does so with one page of 512 resident).
 * Small segments give that advice for both halves at their first purge,
 * span ones (span.c) for each half that purges units beside a block or
 * the header. */
void sm_segment_unadvise(sm_segment_t *seg, unsigned halves) {
  halves &= seg->huge_pages;
  if (halves == 0) return;
  /* any thread may (pool.c: the pages of a segment held by another) */
  halves &= ~(unsigned)atomic_fetch_or_explicit(&seg->huge_withdrawn, (uint8_t)halves, memory_order_relaxed);
  if (halves == 0) return;
  size_t len;
  uint8_t *from = sm_segment_halves_at(seg, halves, &len);
  sm_os_nohugepage(from, len);
}

/* ---- page descriptors: the descriptor area ----------------------------------
 * A small or medium segment's page descriptors are kept apart from it, in
 * a slot of SM_DESC_ALIGN bytes that it holds from its first use until it
 * goes back to the OS (cached, it keeps it).  Slots are carved one after
 * another from mappings of SM_DESC_CHUNK bytes.  In its header, page i's
 * descriptor would sit at the same offset in every segment (each is
 * aligned to its 4 MiB), and a cache indexed by address, as L2 and L3 are
 * (with huge pages the physical offset within 2 MiB is the virtual one),
 * would put descriptor i of every segment in one set: with more segments
 * than the set has ways, a free into a page of a large heap missed on
 * both lines of the descriptor it reads.  bench_longlived 1e6 (13
 * segments) under cachegrind with this machine's L2 (512 KiB, 8-way):
 * 3.86 L2 misses per replacement with the descriptors in the headers,
 * 3.13 now; 11 interleaved runs, median 0.774 s then, 0.744 s now (1e7:
 * 1.45 s and 1.34 s, 5 runs).  Slots of one mapping lie at distinct
 * offsets within it: in a cache whose ways span 1 MiB or more, the
 * descriptors of its segments share no set, and in L2 (64 KiB ways) a
 * set holds a quarter of them.  The mappings count as mapped; a slot,
 * like the header it stands in for, counts as committed with its
 * segment (whose header keeps its 16 KiB).
 * Where no slot can be had (the OS refused a mapping), a segment keeps
 * its descriptors in its header (hdr_pages), as large and huge blocks'
 * headers and span segments always do. */
#define SM_DESC_CHUNK ((size_t)1 << 20)
typedef struct sm_desc_slot_s {
  sm_segment_t *seg;                /* first (sm_page_segment) */
  struct sm_desc_slot_s *next;      /* while free */
  sm_page_t pages[SM_SMALL_PAGES] __attribute__((aligned(64)));
} sm_desc_slot_t;
_Static_assert(offsetof(sm_desc_slot_t, seg) == 0 && sizeof(sm_desc_slot_t) <= SM_DESC_ALIGN,
               "a slot is a block of descriptors");

static pthread_mutex_t sm_desc_lock = PTHREAD_MUTEX_INITIALIZER;
static sm_desc_slot_t *sm_desc_free;          /* slots given back, last first */
static uintptr_t sm_desc_next, sm_desc_end;   /* the rest of the last mapping */

/* The slot whose descriptors seg holds; NULL when it holds none (its
 * descriptors in its header, or a header never written). */
static sm_desc_slot_t *sm_desc_slot_of(const sm_segment_t *seg) {
  if (seg->self != seg || seg->pages == NULL || seg->pages == seg->hdr_pages) return NULL;
  return (sm_desc_slot_t *)((uintptr_t)seg->pages & ~(SM_DESC_ALIGN - 1));
}

/* A slot for seg (NULL: none to be had); the caller clears its descriptors. */
static sm_page_t *sm_desc_get(sm_segment_t *seg) {
  pthread_mutex_lock(&sm_desc_lock);
  sm_desc_slot_t *slot = sm_desc_free;
  if (slot) {
    sm_desc_free = slot->next;
  } else {
    if (sm_desc_next == sm_desc_end) {
      void *chunk;
      if (sm_os_map(SM_DESC_CHUNK, &chunk) != 0) {
        pthread_mutex_unlock(&sm_desc_lock);
        return NULL;
      }
      sm_desc_next = ((uintptr_t)chunk + SM_DESC_ALIGN - 1) & ~(SM_DESC_ALIGN - 1);
      sm_desc_end = ((uintptr_t)chunk + SM_DESC_CHUNK) & ~(SM_DESC_ALIGN - 1);
    }
    slot = (sm_desc_slot_t *)sm_desc_next;
    sm_desc_next += SM_DESC_ALIGN;
  }
  pthread_mutex_unlock(&sm_desc_lock);
  slot->seg = seg;
  return slot->pages;
}

/* A segment going back to the OS gives its slot back, its memory too
 * (one whose header was never written has none). */
static void sm_desc_put(sm_segment_t *seg) {
  sm_desc_slot_t *slot = sm_desc_slot_of(seg);
  if (slot == NULL) return;
  sm_assert(slot->seg == seg);
  sm_os_purge(slot, SM_DESC_ALIGN);
  pthread_mutex_lock(&sm_desc_lock);
  slot->next = sm_desc_free;
  sm_desc_free = slot;
  pthread_mutex_unlock(&sm_desc_lock);
}

/* ---- raw segments: cache first, then the OS ------------------------------ */

/* A segment from the cache (*cached set) or the OS. */
static sm_segment_t *sm_segment_raw_alloc(bool *cached) {
  pthread_mutex_lock(&sm_cache_lock);
  sm_segment_t *seg = sm_cache_first;
  if (seg) {
    sm_cache_first = seg->next;
    __atomic_store_n(&sm_cache_count, sm_cache_count - 1, __ATOMIC_RELAXED);
  }
  pthread_mutex_unlock(&sm_cache_lock);
  *cached = seg != NULL;
  if (seg) {
    sm_gadd(segments_cache_hits, 1);
    if (seg->purged) sm_purge_reused(seg->cached_at_ms);
    /* its pages will be carved afresh: all of it counts as committed again */
    sm_gadd(bytes_committed, seg->purged ? SM_SEGMENT_SIZE : seg->decommitted);
    sm_gadd(segments_in_use, 1);
    return seg;
  }
  return sm_segment_map();
}

/* A segment from the OS, counted in use; its header untouched, and not in
 * the segment map until its owner writes the header. */
sm_segment_t *sm_segment_map(void) {
  void *p;
  if (sm_os_map_aligned(SM_SEGMENT_SIZE, SM_SEGMENT_SIZE, 0, &p) != 0) return NULL;
  sm_gadd(segments_mapped, 1);
  SM_PROBE(segment_map, p);
  sm_gadd(segments_in_use, 1);
  return p;
}

/* Back to the OS (a segment no longer counted in use).  One with holes
 * is unmapped around them: another mapping may have taken one. */
void sm_segment_unmap(sm_segment_t *seg) {
  sm_segmap_set((uintptr_t)seg, 0);
  uint64_t holes = 0;   /* bit i: page i is a hole (at most 64 pages) */
  if (seg->unmapped != 0)
    for (unsigned i = 0; i < seg->page_count; i++) holes |= (uint64_t)(seg->pages[i].unmapped != SM_HOLE_NONE) << i;
  unsigned shift = seg->page_shift, count = seg->page_count;
  sm_desc_put(seg);   /* the descriptors are not read from here on */
  if (!seg->purged) sm_gsub(bytes_committed, SM_SEGMENT_SIZE - seg->decommitted);
  uint8_t *base = (uint8_t *)seg;
  size_t run = 0;   /* where the mapped run that reaches page i starts: the header always is */
  bool in_run = true;
  for (unsigned i = 0; holes != 0 && i < count; i++) {
    size_t from = i == 0 ? SM_SEGMENT_HDR : (size_t)i << shift;
    if (holes >> i & 1) {
      if (in_run) sm_os_unmap(base + run, from - run);
      in_run = false;
    } else if (!in_run) {
      run = from;
      in_run = true;
    }
  }
  if (in_run) sm_os_unmap(base + run, SM_SEGMENT_SIZE - run);
  sm_gadd(segments_unmapped, 1);
  SM_PROBE(segment_unmap, seg);
}

/* Under sm_cache_lock: give a cached segment's memory back, with the
 * purge's stamp (sm_purge_stamp); the header stays (it holds the cache
 * link). */
static void sm_segment_purge_cached_locked(sm_segment_t *s, uint64_t stamp) {
  sm_segment_unadvise(s, SM_HALF_BOTH);
  sm_os_purge((uint8_t *)s + SM_SEGMENT_HDR, SM_SEGMENT_SIZE - SM_SEGMENT_HDR);
  s->purged = 1;
  s->cached_at_ms = stamp;
  sm_gsub(bytes_committed, SM_SEGMENT_SIZE - s->decommitted);
  sm_gadd(segments_purged, 1);
  SM_PROBE(segment_purge, s);
}

/* Purge cached segments, huge mappings and free span units older than
 * the delay (all of them when forced, and then unmap them too). */
void sm_segment_cache_collect(bool force) {
  sm_huge_cache_collect(force);
  sm_span_collect(force);
  sm_segment_t *unmap = NULL;
  pthread_mutex_lock(&sm_cache_lock);
  uint64_t now = sm_clock_ms();
  uint64_t delay = sm_purge_delay(now);
  if (force) {
    unmap = sm_cache_first;
    sm_cache_first = NULL;
    __atomic_store_n(&sm_cache_count, 0, __ATOMIC_RELAXED);
  } else {
    for (sm_segment_t *s = sm_cache_first; s; s = s->next) {
      if (!s->purged && sm_aged(now, s->cached_at_ms, delay))
        sm_segment_purge_cached_locked(s, sm_purge_stamp(now, delay));
    }
  }
  pthread_mutex_unlock(&sm_cache_lock);
  while (unmap) {
    sm_segment_t *next = unmap->next;
    sm_segment_unmap(unmap);
    unmap = next;
  }
}

/* Purge every cached segment now, whatever its age (the purge thread,
 * after releasing pages that were idle for a whole delay), with the
 * purge's stamp. */
void sm_segment_cache_purge_all(uint64_t stamp) {
  pthread_mutex_lock(&sm_cache_lock);
  for (sm_segment_t *s = sm_cache_first; s; s = s->next)
    if (!s->purged) sm_segment_purge_cached_locked(s, stamp);
  pthread_mutex_unlock(&sm_cache_lock);
}

/* Bytes cached and not purged yet (segments, huge mappings, span units). */
static uint64_t sm_cache_unpurged_bytes(void) {
  uint64_t n = 0;
  pthread_mutex_lock(&sm_cache_lock);
  for (sm_segment_t *s = sm_cache_first; s; s = s->next)
    if (!s->purged) n += SM_SEGMENT_SIZE;
  pthread_mutex_unlock(&sm_cache_lock);
  return n + sm_huge_cache_unpurged() + sm_span_unpurged();
}

/* Whether cached memory still waits to be purged. */
bool sm_segment_cache_pending(void) {
  return sm_cache_unpurged_bytes() != 0;
}

/* Whether enough cached memory waits for the purge thread to be worth
 * starting (read without the lock: a hint). */
bool sm_segment_cache_wants_purge(void) {
  return __atomic_load_n(&sm_cache_count, __ATOMIC_RELAXED) * (uint64_t)SM_SEGMENT_SIZE >= SM_BG_THRESHOLD &&
         sm_cache_unpurged_bytes() >= SM_BG_THRESHOLD;
}

static void sm_segment_raw_free(sm_segment_t *seg) {
  seg->cookie = 0;   /* a stale pointer into a cached segment is caught */
  atomic_store_explicit(&seg->heap, NULL, memory_order_relaxed);
  seg->purged = 0;
  seg->cached_at_ms = sm_clock_ms();
  sm_gsub(segments_in_use, 1);
  size_t max = (size_t)sm_opt(SEGMENT_CACHE);
  bool cached = false;
  pthread_mutex_lock(&sm_cache_lock);
  if (sm_cache_count < max && seg->unmapped == 0) {   /* the cache hands out whole mappings */
    seg->next = sm_cache_first;
    sm_cache_first = seg;
    __atomic_store_n(&sm_cache_count, sm_cache_count + 1, __ATOMIC_RELAXED);
    cached = true;
  }
  pthread_mutex_unlock(&sm_cache_lock);
  if (cached) {
    sm_gadd(segments_cached, 1);
    if (sm_opt(PURGE_DELAY) == 0) sm_segment_cache_collect(false);
  } else {
    sm_segment_unmap(seg);
  }
}

/* Where the page's blocks begin (the first page's after the header). */
uint8_t *sm_segment_page_start(sm_segment_t *seg, const sm_page_t *page) {
  size_t idx = (size_t)(page - seg->pages);
  return (uint8_t *)seg + (idx << seg->page_shift) + (idx == 0 ? SM_SEGMENT_HDR : 0);
}

/* Secure build: the page's last OS page made inaccessible (a guard). */
static void sm_segment_page_guard(sm_segment_t *seg, const sm_page_t *page) {
  if (SM_GUARD)
    sm_os_protect(sm_segment_page_start(seg, page) + sm_segment_page_len(seg, page) - SM_GUARD, SM_GUARD, false);
}

/* Secure build: the last OS page of every page is inaccessible, so a linear overflow faults before it reaches
 * the next page.  A segment from the cache may have had another layout. */
static void sm_segment_guard(sm_segment_t *seg) {
#ifdef SM_SECURE
  sm_os_protect((uint8_t *)seg + SM_SEGMENT_HDR, SM_SEGMENT_SIZE - SM_SEGMENT_HDR, true);
  for (size_t i = 0; i < seg->page_count; i++) sm_segment_page_guard(seg, &seg->pages[i]);
#else
  (void)seg;
#endif
}

/* ---- owned segments and their pages ---------------------------------------- */

static void sm_seg_list_remove(sm_segment_t **first, sm_segment_t *seg) {
  if (seg->prev) seg->prev->next = seg->next; else *first = seg->next;
  if (seg->next) seg->next->prev = seg->prev;
  seg->next = seg->prev = NULL;
}
static void sm_seg_list_push(sm_segment_t **first, sm_segment_t *seg) {
  seg->prev = NULL;
  seg->next = *first;
  if (*first) (*first)->prev = seg;
  *first = seg;
}

/* heap->free_segs[kind] holds owned segments with a free page;
 * heap->full_segs those without. */
static sm_segment_t **sm_seg_list_of(sm_heap_t *heap, sm_segment_t *seg) {
  return seg->in_free_list ? &heap->free_segs[seg->kind] : &heap->full_segs;
}

/* Under heap->lock. */
static void sm_segment_adopt(sm_heap_t *heap, sm_segment_t *seg) {
  atomic_store_explicit(&seg->heap, heap, memory_order_release);
  seg->in_free_list = seg->used_pages < seg->page_count;
  sm_seg_list_push(sm_seg_list_of(heap, seg), seg);
  heap->segs_held[seg->kind]++;
}

static sm_segment_t *sm_segment_alloc(int kind, bool huge) {
  bool cached;
  sm_segment_t *seg = sm_segment_raw_alloc(&cached);
  if (!seg) return NULL;
  unsigned advised = sm_segment_advise(seg, huge ? SM_HALF_BOTH : 0);
  /* A fresh mapping is not read before the header's first write: a read
   * would fault in the zero page (2 MiB of it where the header's half is
   * advised) and the write fault again to replace it. */
  if (cached && !huge) sm_segment_unadvise(seg, SM_HALF_BOTH);   /* it may have been advised */
  /* a cached one keeps its slot; a fresh mapping, or one that had none,
   * asks for one, and keeps its descriptors in its header without */
  sm_desc_slot_t *slot = cached ? sm_desc_slot_of(seg) : NULL;
  sm_page_t *pages = slot ? slot->pages : sm_desc_get(seg);
  sm_track_reuse(seg, SM_SEGMENT_SIZE);
  memset(seg, 0, offsetof(sm_segment_t, hdr_pages));
  sm_segment_hold_pages(seg, pages);
  memset(seg->pages, 0, SM_SMALL_PAGES * sizeof *seg->pages);
  seg->huge_pages = (uint8_t)advised;
  seg->cookie = (uintptr_t)seg ^ sm_secret;
  seg->kind = (uint8_t)kind;
  seg->page_shift = kind == SM_SEG_SMALL ? SM_SMALL_SHIFT : SM_MEDIUM_SHIFT;
  seg->page_count = kind == SM_SEG_SMALL ? SM_SMALL_PAGES : SM_MEDIUM_PAGES;
  seg->mapped = SM_SEGMENT_SIZE;
  sm_segment_guard(seg);
  sm_segmap_set((uintptr_t)seg, seg->page_shift);
  return seg;
}

/* Bytes of a page that its blocks may use: the first page of a segment
 * starts after the header. */
size_t sm_segment_page_len(const sm_segment_t *seg, const sm_page_t *page) {
  size_t psize = (size_t)1 << seg->page_shift;
  return page == &seg->pages[0] ? psize - SM_SEGMENT_HDR : psize;
}

/* Under the holder's lock: a page the segment no longer holds counts as
 * used, and a segment with all its pages used leaves the free list. */
static void sm_segment_page_taken(sm_heap_t *heap, sm_segment_t *seg) {
  if (++seg->used_pages == seg->page_count) {
    sm_seg_list_remove(&heap->free_segs[seg->kind], seg);
    seg->in_free_list = 0;
    sm_seg_list_push(&heap->full_segs, seg);
  }
}

/* A hole's range mapped again for its page (under the holder's lock:
 * one mmap).  False when the OS refuses (the limit), and for good when
 * another mapping took the range: the page is lost to the segment, and
 * counts as used so that the segment is never given back whole. */
static bool sm_segment_fill_hole(sm_heap_t *heap, sm_segment_t *seg, sm_page_t *page) {
  uint8_t *start = sm_segment_page_start(seg, page);
  size_t len = sm_segment_page_len(seg, page);
  int err = sm_os_map_hole(start, len);
  if (err == EEXIST) {
    page->unmapped = SM_HOLE_LOST;
    sm_segment_page_taken(heap, seg);
  }
  if (err) return false;
  page->unmapped = SM_HOLE_NONE;
  seg->unmapped -= len;
  sm_segment_page_guard(seg, page);
  return true;
}

/* Under heap->lock: the first free page of one of its segments, in use
 * from now on, or NULL when the segment has none it can use. */
static sm_page_t *sm_segment_take_page(sm_heap_t *heap, sm_segment_t *seg) {
  for (size_t i = 0; i < seg->page_count; i++) {
    sm_page_t *page = &seg->pages[i];
    if (page->in_use || page->unmapped == SM_HOLE_LOST) continue;
    if (page->unmapped == SM_HOLE && !sm_segment_fill_hole(heap, seg, page)) {
      if (!seg->in_free_list) return NULL;   /* its last free page was lost */
      continue;
    }
    page->in_use = 1;
    if (page->decommitted) {   /* faulted in again as it is used */
      size_t len = sm_segment_page_len(seg, page);
      sm_purge_reused(page->empty_since_ms);   /* its purge's stamp */
      page->decommitted = 0;
      seg->decommitted -= len;
      sm_gadd(bytes_committed, len);
    }
    sm_segment_page_taken(heap, seg);
    return page;
  }
  return NULL;
}

/* A free page of an owned segment; of a new segment only when
 * *new_segment says so (it is cleared when an owned one served).  The
 * heap's segment lists are under heap->lock: another thread releasing a
 * retired page of the heap changes them too.  No lock is held while the
 * OS is asked for memory. */
sm_page_t *sm_segment_page_alloc(sm_heap_t *heap, int kind, bool *new_segment) {
  sm_segment_t *fresh = NULL;
  if (*new_segment) {
    sm_lock(&heap->lock);
    bool have = heap->free_segs[kind] != NULL;
    bool huge = !have && sm_segment_wants_huge(heap, kind);
    sm_unlock(&heap->lock);
    if (!have && (fresh = sm_segment_alloc(kind, huge)) == NULL) return NULL;
  }
  sm_lock(&heap->lock);
  if (fresh) sm_segment_adopt(heap, fresh);
  sm_segment_t *seg = heap->free_segs[kind];
  if (!seg) {
    sm_unlock(&heap->lock);
    return NULL;
  }
  sm_page_t *page = NULL;
  for (sm_segment_t *next; seg != NULL; seg = next) {
    next = seg->next;   /* a segment whose last free page was lost leaves the list */
    if ((page = sm_segment_take_page(heap, seg)) != NULL) break;
  }
  *new_segment = page != NULL && seg == fresh;
  sm_unlock(&heap->lock);
  return page;
}

/* A free page gives its memory back: its range is unmapped where the
 * address space runs short (a hole, sm_os_holes), else madvised away;
 * its empty_since_ms becomes the purge's stamp (sm_purge_stamp).  One
 * given back before becomes a hole then. */
static void sm_segment_decommit_page(sm_segment_t *seg, sm_page_t *page, uint64_t stamp) {
  size_t len = sm_segment_page_len(seg, page);
  uint8_t *start = sm_segment_page_start(seg, page);
  bool hole = sm_os_holes() && page->unmapped == SM_HOLE_NONE && sm_os_unmap(start, len) == 0;
  if (hole) {
    page->unmapped = SM_HOLE;
    seg->unmapped += len;
  }
  if (page->decommitted) return;
  sm_segment_unadvise(seg, SM_HALF_BOTH);
  if (!hole) sm_os_purge(start, len);
  page->decommitted = 1;
  page->empty_since_ms = stamp;
  seg->decommitted += len;
  sm_gsub(bytes_committed, len);
  sm_gadd(pages_purged, 1);
}

/* Give back the memory of the segment's free pages that went back at
 * least `delay` ms ago, under the lock of whoever holds it (its heap's,
 * or the abandoned list's); returns whether a free page still waits for
 * its delay.  The pages stay mapped and are faulted in again when used. */
static bool sm_segment_decommit_pages(sm_segment_t *seg, uint64_t now, uint64_t delay) {
  bool waiting = false;
  for (size_t i = 0; i < seg->page_count; i++) {
    sm_page_t *page = &seg->pages[i];
    /* empty_since_ms 0: never used since the segment was mapped, so
     * never touched either: nothing to give back, but in a segment
     * advised for huge pages, where the huge page of a page used
     * brought in its neighbours; those go back when all is asked
     * (trim), not after the delay, as the heap is about to carve
     * them (only its newest segment has pages never used).  A page
     * in use is its owner's, who may be another heap and writes
     * empty_since_ms when it retires it (under its own lock). */
    if (page->in_use) continue;
    if (page->decommitted) {   /* a hole, now that the address space runs short */
      if (page->unmapped == SM_HOLE_NONE && sm_os_holes()) sm_segment_decommit_page(seg, page, 0);
      continue;
    }
    bool unused = page->empty_since_ms == 0;
    if (unused ? seg->huge_pages && delay == 0 : sm_aged(now, page->empty_since_ms, delay))
      sm_segment_decommit_page(seg, page, sm_purge_stamp(now, delay));
    else if (!unused)
      waiting = true;
  }
  return waiting;
}

/* Under heap->lock: the free pages of the heap's segments, so that
 * committed and resident bytes follow the live bytes and not the most
 * pages a segment ever held (sm_segment_decommit_pages); returns whether
 * a free page still waits for its delay. */
bool sm_segment_decommit_free_locked(sm_heap_t *heap, uint64_t now, uint64_t delay) {
  bool waiting = false;
  for (int kind = 0; kind < 2; kind++)
    for (sm_segment_t *seg = heap->free_segs[kind]; seg; seg = seg->next)
      waiting = sm_segment_decommit_pages(seg, now, delay) || waiting;
  return waiting;
}

/* Under heap->lock: the page goes back to its segment, and a segment left
 * without pages to the cache. */
void sm_segment_page_free_locked(sm_heap_t *heap, sm_segment_t *seg, sm_page_t *page) {
  page->in_use = 0;
  page->empty_since_ms = sm_clock_ms();
  if (!seg->in_free_list) {
    sm_seg_list_remove(&heap->full_segs, seg);
    seg->in_free_list = 1;
    sm_seg_list_push(&heap->free_segs[seg->kind], seg);
  }
  if (--seg->used_pages == 0) {
    sm_seg_list_remove(&heap->free_segs[seg->kind], seg);
    seg->in_free_list = 0;
    heap->segs_held[seg->kind]--;
    sm_segment_raw_free(seg);
  } else if (sm_opt(PURGE_DELAY) == 0) {
    sm_segment_decommit_page(seg, page, 0);
  }
}

/* ---- abandonment and reclaim ------------------------------------------------ */

/* The heap's thread exited: its remaining segments (each with pages in
 * use, owned by other heaps or in the pool) wait on the abandoned list,
 * with no holder.  Under the heap's lock and the list's: a segment's
 * holder is NULL exactly while it is on the list, and a thread holding
 * heap->lock that finds seg->heap == heap knows the segment stays its. */
void sm_segment_abandon_heap(sm_heap_t *heap) {
  sm_lock(&heap->lock);
  pthread_mutex_lock(&sm_abandoned_lock);
  sm_segment_t *lists[3] = {heap->free_segs[0], heap->free_segs[1], heap->full_segs};
  heap->free_segs[0] = heap->free_segs[1] = heap->full_segs = NULL;
  heap->segs_held[0] = heap->segs_held[1] = 0;
  for (int l = 0; l < 3; l++) {
    sm_segment_t *seg = lists[l];
    while (seg) {
      sm_segment_t *next = seg->next;
      atomic_store_explicit(&seg->heap, NULL, memory_order_release);
      seg->in_free_list = 0;
      seg->prev = NULL;
      seg->next = sm_abandoned_first[seg->kind];
      if (seg->next) seg->next->prev = seg;
      sm_abandoned_first[seg->kind] = seg;
      atomic_fetch_add(&sm_abandoned_count[seg->kind], 1);
      seg = next;
    }
  }
  pthread_mutex_unlock(&sm_abandoned_lock);
  sm_unlock(&heap->lock);
}

static void sm_abandoned_unlink_locked(sm_segment_t *seg) {
  if (seg->prev) seg->prev->next = seg->next; else sm_abandoned_first[seg->kind] = seg->next;
  if (seg->next) seg->next->prev = seg->prev;
  seg->next = seg->prev = NULL;
  atomic_fetch_sub(&sm_abandoned_count[seg->kind], 1);
}

/* Take one abandoned segment of the kind: the heap becomes its holder and
 * may carve its free pages. */
sm_segment_t *sm_segment_reclaim_one(sm_heap_t *heap, int kind) {
  if (atomic_load_explicit(&sm_abandoned_count[kind], memory_order_relaxed) == 0) return NULL;
  sm_lock(&heap->lock);
  pthread_mutex_lock(&sm_abandoned_lock);
  sm_segment_t *seg = sm_abandoned_first[kind];
  if (seg) {
    sm_abandoned_unlink_locked(seg);
    sm_segment_adopt(heap, seg);
    atomic_store_explicit(&sm_abandoned_taken_ms, sm_clock_ms(), memory_order_relaxed);
  }
  pthread_mutex_unlock(&sm_abandoned_lock);
  sm_unlock(&heap->lock);
  return seg;
}

/* An empty page of an abandoned segment goes back to it (sm_page_send_home);
 * a segment left without pages leaves the list for the cache.  False when
 * the segment has a holder again (send the page there). */
bool sm_segment_page_free_abandoned(sm_segment_t *seg, sm_page_t *page) {
  pthread_mutex_lock(&sm_abandoned_lock);
  if (atomic_load_explicit(&seg->heap, memory_order_relaxed) != NULL) {
    pthread_mutex_unlock(&sm_abandoned_lock);
    return false;
  }
  page->in_use = 0;
  page->empty_since_ms = sm_clock_ms();
  bool gone = --seg->used_pages == 0;
  if (gone) sm_abandoned_unlink_locked(seg);
  pthread_mutex_unlock(&sm_abandoned_lock);
  if (gone) sm_segment_raw_free(seg);
  return true;
}

/* The same for abandoned segments (the purge thread): the pages that
 * others released into an exited thread's segment stayed committed until
 * a thread took the segment, which an idle program never does (200
 * rounds of 8 threads that left blocks to main: 27 such segments, 90 MB
 * resident for 6 KB live).  Not while threads take them over, though:
 * a new thread carves those pages first, and each page given back would
 * be faulted in again (that probe, during its churn: 11,600 pages given
 * back and 7 times the page faults).  Returns whether a page waits. */
bool sm_segment_decommit_abandoned(uint64_t now, uint64_t delay) {
  if (atomic_load_explicit(&sm_abandoned_count[0], memory_order_relaxed) +
          atomic_load_explicit(&sm_abandoned_count[1], memory_order_relaxed) == 0)
    return false;
  if (atomic_load_explicit(&sm_abandoned_taken_ms, memory_order_relaxed) + delay > now) return true;   /* maybe after now */
  bool waiting = false;
  pthread_mutex_lock(&sm_abandoned_lock);
  for (int kind = 0; kind < 2; kind++)
    for (sm_segment_t *seg = sm_abandoned_first[kind]; seg; seg = seg->next)
      waiting = sm_segment_decommit_pages(seg, now, delay) || waiting;
  pthread_mutex_unlock(&sm_abandoned_lock);
  return waiting;
}

/* ---- the free blocks of pages behind the first of their class ----------- */

/* The pages of seg whose gate is open give back their free blocks
 * (pool.c: all, or those of idle owners); under the lock of its holder.
 * Whether one waits for its owner to go idle. */
static bool sm_segment_purge_open(sm_segment_t *seg, bool all) {
  if (atomic_load_explicit(&seg->open_pages, memory_order_relaxed) == 0) return false;
  bool waits = false;
  for (size_t i = 0; i < seg->page_count; i++)
    if (seg->pages[i].in_use && sm_page_purge_open(&seg->pages[i], all)) waits = true;
  return waits;
}

static bool sm_segment_purge_open_held(sm_heap_t *heap, bool all) {
  bool waits = false;
  sm_lock(&heap->lock);
  for (int kind = 0; kind < 2; kind++)
    for (sm_segment_t *seg = heap->free_segs[kind]; seg; seg = seg->next)
      waits = sm_segment_purge_open(seg, all) || waits;
  for (sm_segment_t *seg = heap->full_segs; seg; seg = seg->next) waits = sm_segment_purge_open(seg, all) || waits;
  sm_unlock(&heap->lock);
  return waits;
}

/* Every page behind the first of its class gives back its free blocks
 * (all: trim), or every such page of a thread idle for a purge delay
 * (the purge thread), whatever the owner does, and wherever the page
 * lies: in a segment its owner holds, another thread's, the shared ones
 * or an abandoned one.  Whether a page waits for its owner to go idle. */
bool sm_segments_purge_open(bool all) {
  bool waits = false;
  sm_heaps_lock();
  for (sm_heap_t *h = sm_heaps_first(); h; h = h->all_next) waits = sm_segment_purge_open_held(h, all) || waits;
  sm_heaps_unlock();
  if (sm_heap_shared) waits = sm_segment_purge_open_held(sm_heap_shared, all) || waits;
  pthread_mutex_lock(&sm_abandoned_lock);
  for (int kind = 0; kind < 2; kind++)
    for (sm_segment_t *seg = sm_abandoned_first[kind]; seg; seg = seg->next)
      waits = sm_segment_purge_open(seg, all) || waits;
  pthread_mutex_unlock(&sm_abandoned_lock);
  return waits;
}

/* ---- fork (fork.c): repair in the child what a lost thread held --------- */
void sm_segment_fork_child(void) {
  if (sm_fork_mutex_was_held(&sm_cache_lock)) {
    sm_cache_first = NULL;   /* may be half-linked: its segments stay mapped, unused */
    __atomic_store_n(&sm_cache_count, 0, __ATOMIC_RELAXED);
  }
  if (sm_fork_mutex_was_held(&sm_desc_lock)) {
    sm_desc_free = NULL;   /* may be half-linked: those slots are lost */
    sm_desc_next = sm_desc_end = 0;
  }
  if (sm_fork_mutex_was_held(&sm_abandoned_lock)) {
    sm_abandoned_first[0] = sm_abandoned_first[1] = NULL;
    atomic_store(&sm_abandoned_count[0], 0);
    atomic_store(&sm_abandoned_count[1], 0);
  }
  sm_huge_fork_child();
  sm_span_fork_child();
}
