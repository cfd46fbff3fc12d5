/* Huge blocks (above SM_LARGE_MAX), and large ones that do not go to a
 * shared segment (span.c decides: under an address-space limit, in the
 * secure build, or with an alignment above 64 KiB): each block in a
 * mapping of its own, aligned to a segment, whose first bytes hold a
 * segment header (SM_MAPPED_HDR, a few hundred bytes), so free() finds it
 * with the same mask as any block.  A block costs its size rounded up to
 * the OS page in address space and memory, which lets a program under
 * RLIMIT_AS use nearly all of its limit.  realloc resizes the mapping in
 * place or moves it with mremap: the pages move, the bytes are never
 * copied.  Freed mappings are cached for the next request (below). */
#include "internal.h"
#include "track.h"

#include <pthread.h>


static size_t sm_huge_offset(size_t alignment) {
  if (alignment >= SM_SEGMENT_SIZE) return SM_SEGMENT_SIZE;   /* see sm_lookup */
  return (SM_MAPPED_HDR + alignment - 1) & ~(alignment - 1);
}

/* Whether a mapping for a block of n is advised for transparent huge
 * pages (before its first touch) and may be rounded to them: the one place
 * that decides, asked once per call.  From 2 MiB on: a smaller block
 * could never fill one.  Not under an address-space limit, where every
 * page counts, nor with guard pages, which split a huge page. */
#define SM_HUGE_PAGE ((size_t)2 << 20)
static bool sm_huge_pages_for(size_t n) {
  return !SM_GUARD && n >= SM_HUGE_PAGE && sm_opt(HUGEPAGES) && !sm_os_space_limited();
}

/* The bytes of a mapping for a block of n at offset (0 on overflow):
 * its end rounded to the OS page, or, where huge pages are advised
 * (huge: sm_huge_pages_for(n)), to a
 * huge page when that adds at most a quarter of the block (always from
 * 8 MiB on), so that its tail faults in as one huge page rather than up to
 * 511 small ones, and a realloc that grows it in place finds whole huge
 * pages after it.  A first touch of a 4 KiB page costs 10-20 us on the
 * virtual machines this is measured on, of a 2 MiB one about 100 us.
 * 20 live blocks of 5-25 MiB replaced at random, every page written
 * (bench_largerep huge, medians of 7): 7,624 page faults, 0.330 s, 586 MB
 * resident when only blocks of 4 MiB or more were advised and rounded
 * only when that added at most 1 MiB; 529 faults, 0.155 s, 592 MB with
 * this rule; 461 faults, 643 MB with every tail rounded (mimalloc 3.4.3:
 * 0.169 s, 606 MB). */
static size_t sm_huge_need(size_t offset, size_t n, bool huge) {
  size_t need = ((offset + n + SM_LARGE_CANARY + SM_OS_PAGE - 1) & ~(SM_OS_PAGE - 1)) + SM_GUARD;
  if (need < n) return 0;
  if (huge) {
    size_t r = (need + SM_HUGE_PAGE - 1) & ~(SM_HUGE_PAGE - 1);
    if (r > need && r - need <= n / 4) need = r;
  }
  return need;
}

static void sm_huge_header(sm_segment_t *seg, size_t mapped, size_t offset, size_t n) {
  sm_segment_clear_mapped(seg);
  seg->cookie = (uintptr_t)seg ^ sm_secret;
  seg->kind = n <= SM_LARGE_MAX ? SM_SEG_LARGE : SM_SEG_HUGE;
  seg->page_shift = SM_SEGMENT_SHIFT;
  seg->page_count = 1;
  seg->used_pages = 1;
  seg->mapped = mapped;
  seg->block_offset = offset;
  seg->block_size = mapped - offset - SM_GUARD - SM_LARGE_CANARY;
  sm_page_t *page = &seg->pages[0];
  page->in_use = 1;
  page->start = (uint8_t *)seg + offset;
  if (SM_CANARY) page->key = ((uintptr_t)seg ^ sm_secret) | 2;   /* the canary's */
}

/* ---- the huge cache ---------------------------------------------------------
 * A freed huge mapping is kept for the next huge request, the way a
 * retired page serves the next burst of small blocks: a program that
 * replaces big buffers then makes no mmap and, above all, no page faults
 * for the memory it touched before (a first touch costs 15-20 us per 4 KiB
 * page on the virtual machines this is measured on).  A request takes the
 * smallest cached mapping that fits (cutting its tail off when it is far
 * too big: sm_huge_cut), else grows the largest one with mremap, which moves
 * its pages without copying.  Entries unused for SMALLOC_PURGE_DELAY ms
 * are purged (madvise: the mapping stays, the memory goes back); the cache
 * holds at most SM_HUGE_CACHE_SLOTS mappings and SM_HUGE_CACHE_BYTES of
 * address space, the oldest are unmapped beyond that, and everything on
 * smalloc_collect(true), malloc_trim and when the OS refuses memory.
 * In the secure build every mapping keeps its guard page as its last
 * page: a cached one is reused whole or cut (the new last page is made
 * the guard), never grown (mremap cannot move a mapping whose guard
 * page splits it). */
#define SM_HUGE_CACHE_SLOTS 16
#define SM_HUGE_CACHE_BYTES ((size_t)512 << 20)
#define SM_HUGE_CACHE_GROW  16      /* from this many entries on, grow rather than map */

typedef struct sm_huge_entry_s {
  sm_segment_t *seg;     /* NULL: free slot */
  size_t mapped;
  uint64_t at_ms;        /* when it was cached */
  bool purged;
} sm_huge_entry_t;

static pthread_mutex_t sm_huge_lock = PTHREAD_MUTEX_INITIALIZER;
static sm_huge_entry_t sm_huge_cache[SM_HUGE_CACHE_SLOTS];
static size_t sm_huge_cached_bytes;

/* Unmap a mapping whose header is gone from the segment map's view. */
static void sm_huge_unmap(sm_segment_t *seg, size_t mapped, bool purged) {
  sm_segmap_set((uintptr_t)seg, 0);
  if (!purged) sm_gsub(bytes_committed, mapped);
  sm_os_unmap(seg, mapped);
}

static int sm_huge_cache_count(void) {
  int n = 0;
  for (int i = 0; i < SM_HUGE_CACHE_SLOTS; i++) n += sm_huge_cache[i].seg != NULL;
  return n;
}

/* Take the cached mapping that best serves `need` bytes: the smallest
 * that fits, else the largest.  Under sm_huge_lock. */
static bool sm_huge_cache_take(size_t need, sm_huge_entry_t *out) {
  int fit = -1, big = -1;
  for (int i = 0; i < SM_HUGE_CACHE_SLOTS; i++) {
    const sm_huge_entry_t *e = &sm_huge_cache[i];
    if (e->seg == NULL) continue;
    if (e->mapped >= need) {
      if (fit < 0 || e->mapped < sm_huge_cache[fit].mapped) fit = i;
    } else if (big < 0 || e->mapped > sm_huge_cache[big].mapped) {
      big = i;
    }
  }
  /* none fits: while the cache holds few mappings, map a fresh one (the
   * cache grows by one when a block is freed, so later requests find a
   * fit); once it holds several, grow the largest */
  int i = fit >= 0 ? fit : (!SM_GUARD && sm_huge_cache_count() >= SM_HUGE_CACHE_GROW ? big : -1);
  if (i < 0) return false;
  *out = sm_huge_cache[i];
  sm_huge_cache[i].seg = NULL;
  sm_huge_cached_bytes -= out->mapped;
  return true;
}

/* Whether a cached mapping is cut to the need before it serves: when it
 * is over twice the need, unless both are large (a request above the size
 * classes, a mapping up to twice SM_LARGE_MAX): a large block takes such
 * a mapping whole, since its tail was touched already and, cut off, would
 * fault in again for the next bigger block (64 live blocks of 256 KiB-
 * 2 MiB replaced at random ran 4.4 times slower with cutting). */
static bool sm_huge_cut(size_t mapped, size_t need, size_t n) {
  if (mapped <= 2 * need) return false;
  return n <= SM_MEDIUM_MAX || mapped > 2 * SM_LARGE_MAX;
}

/* A cached mapping resized to serve `need` bytes, for a block of n;
 * NULL when mremap fails (the mapping is then unmapped). */
static sm_segment_t *sm_huge_reuse(sm_huge_entry_t *e, size_t need, size_t n) {
  sm_segment_t *seg = e->seg;
  size_t mapped = e->mapped;
  if (e->purged) sm_gadd(bytes_committed, mapped);
  if (sm_huge_cut(mapped, need, n)) {
    sm_os_unmap((uint8_t *)seg + need, mapped - need);
    sm_gsub(bytes_committed, mapped - need);
    mapped = need;
    if (SM_GUARD) sm_os_protect((uint8_t *)seg + mapped - SM_GUARD, SM_GUARD, false);
  } else if (mapped < need) {
    void *base;
    sm_segmap_set((uintptr_t)seg, 0);
    if (sm_os_remap(seg, mapped, need, SM_SEGMENT_SIZE, 0, &base) != 0) {
      sm_huge_unmap(seg, mapped, false);
      return NULL;
    }
    seg = base;
    mapped = need;
  }
  /* the old block's bytes (after the header) are addressable again */
  sm_track_reuse((uint8_t *)seg + SM_MAPPED_HDR, mapped - SM_MAPPED_HDR);
  seg->mapped = mapped;
  return seg;
}

/* A huge block: from the cache when one fits, else in a fresh mapping
 * (which reads as zero); zeroed when asked.  *zeroed says whether the
 * block reads as zero. */
void *sm_huge_alloc(size_t n, size_t alignment, bool zero, bool *zeroed) {
  if (alignment < 16) alignment = 16;
  size_t offset = sm_huge_offset(alignment);
  bool huge = sm_huge_pages_for(n);
  size_t mapped = sm_huge_need(offset, n, huge);
  if (mapped == 0) return NULL;
  sm_segment_t *seg = NULL;
  if (offset < SM_SEGMENT_SIZE) {
    sm_huge_entry_t e;
    pthread_mutex_lock(&sm_huge_lock);
    bool got = sm_huge_cache_take(mapped, &e);
    pthread_mutex_unlock(&sm_huge_lock);
    if (got && (seg = sm_huge_reuse(&e, mapped, n)) != NULL) {
      sm_gadd(huge_cache_hits, 1);
      mapped = seg->mapped;
    }
  }
  bool fresh = seg == NULL;
  if (fresh) {
    void *base;
    size_t align = alignment > SM_SEGMENT_SIZE ? alignment : SM_SEGMENT_SIZE;
    size_t pre = offset == SM_SEGMENT_SIZE ? SM_SEGMENT_SIZE : 0;
    if (sm_os_map_aligned(mapped, align, pre, &base) != 0) {
      /* refused, under a limit set since the last reading (sm_os_space_limited
       * reads it again now): the exact size may fit where the rounded did not */
      if (!huge || sm_huge_pages_for(n)) return NULL;
      huge = false;
      mapped = sm_huge_need(offset, n, false);
      if (sm_os_map_aligned(mapped, align, pre, &base) != 0) return NULL;
    }
    seg = base;
    /* the whole mapping, so it stays one VMA that mremap can move; before
     * the header is written, whose first touch would fault its first
     * 2 MiB in 4 KiB pages */
    if (huge) sm_os_hugepage(seg, mapped);
  }
  sm_huge_header(seg, mapped, offset, n);
  if (fresh && SM_GUARD) sm_os_protect((uint8_t *)seg + mapped - SM_GUARD, SM_GUARD, false);
  sm_segmap_set((uintptr_t)seg, SM_SEGMENT_SHIFT);
  sm_gadd(huge_bytes, seg->block_size);
  void *p = (uint8_t *)seg + offset;
  sm_large_canary_set(seg, p);
  if (zero && !fresh) memset(p, 0, n);
  *zeroed = zero || fresh;
  return p;
}

void sm_huge_free(sm_segment_t *seg) {
  sm_gadd(huge_bytes_freed, seg->block_size);
  seg->cookie = 0;   /* a stale pointer into a cached mapping is caught */
  size_t mapped = seg->mapped;
  sm_huge_entry_t evict[SM_HUGE_CACHE_SLOTS];
  int nevict = 0;
  bool cached = false;
  if (mapped <= SM_HUGE_CACHE_BYTES &&
      (uintptr_t)seg->pages[0].start - (uintptr_t)seg < SM_SEGMENT_SIZE) {
    pthread_mutex_lock(&sm_huge_lock);
    /* make room: the oldest go first */
    for (;;) {
      int free_slot = -1, oldest = -1;
      for (int i = 0; i < SM_HUGE_CACHE_SLOTS; i++) {
        if (sm_huge_cache[i].seg == NULL) { if (free_slot < 0) free_slot = i; continue; }
        if (oldest < 0 || sm_huge_cache[i].at_ms < sm_huge_cache[oldest].at_ms) oldest = i;
      }
      if (free_slot >= 0 && sm_huge_cached_bytes + mapped <= SM_HUGE_CACHE_BYTES) {
        sm_huge_cache[free_slot] = (sm_huge_entry_t){seg, mapped, sm_clock_ms(), false};
        sm_huge_cached_bytes += mapped;
        cached = true;
        break;
      }
      if (oldest < 0) break;
      evict[nevict++] = sm_huge_cache[oldest];
      sm_huge_cache[oldest].seg = NULL;
      sm_huge_cached_bytes -= evict[nevict - 1].mapped;
    }
    pthread_mutex_unlock(&sm_huge_lock);
  }
  for (int i = 0; i < nevict; i++) sm_huge_unmap(evict[i].seg, evict[i].mapped, evict[i].purged);
  if (cached) {
    sm_gadd(huge_cached, 1);
    if (sm_opt(PURGE_DELAY) == 0) sm_huge_cache_collect(false);
    else sm_background_wake();
  } else {
    sm_huge_unmap(seg, mapped, false);
  }
}

/* Purge cached mappings older than the purge delay; when forced, unmap
 * every one. */
void sm_huge_cache_collect(bool force) {
  uint64_t now = sm_clock_ms();
  uint64_t delay = sm_purge_delay(now);
  sm_huge_entry_t gone[SM_HUGE_CACHE_SLOTS];
  int ngone = 0;
  pthread_mutex_lock(&sm_huge_lock);
  for (int i = 0; i < SM_HUGE_CACHE_SLOTS; i++) {
    sm_huge_entry_t *e = &sm_huge_cache[i];
    if (e->seg == NULL) continue;
    if (force) {
      gone[ngone++] = *e;
      sm_huge_cached_bytes -= e->mapped;
      e->seg = NULL;
    } else if (!e->purged && sm_aged(now, e->at_ms, delay)) {
      /* the header's page too: a kept mapping's header is rewritten when
       * it is reused, and reads as no block meanwhile (its cookie is 0).
       * Kept, that page would pin the whole first huge page of a mapping
       * backed by transparent huge pages, 2 MiB, until memory ran short */
      sm_os_purge(e->seg, e->mapped);
      sm_gsub(bytes_committed, e->mapped);
      e->purged = true;
    }
  }
  pthread_mutex_unlock(&sm_huge_lock);
  for (int i = 0; i < ngone; i++) sm_huge_unmap(gone[i].seg, gone[i].mapped, gone[i].purged);
}

/* Bytes of kept mappings not purged yet. */
size_t sm_huge_cache_unpurged(void) {
  size_t n = 0;
  pthread_mutex_lock(&sm_huge_lock);
  for (int i = 0; i < SM_HUGE_CACHE_SLOTS; i++)
    if (sm_huge_cache[i].seg != NULL && !sm_huge_cache[i].purged) n += sm_huge_cache[i].mapped;
  pthread_mutex_unlock(&sm_huge_lock);
  return n;
}

/* fork (fork.c): a list a lost thread was changing is forgotten; its
 * mappings stay mapped, unused, in the child */
void sm_huge_fork_child(void) {
  if (!sm_fork_mutex_was_held(&sm_huge_lock)) return;
  memset(sm_huge_cache, 0, sizeof sm_huge_cache);
  sm_huge_cached_bytes = 0;
}

void *sm_huge_realloc(sm_segment_t *seg, void *p, size_t n) {
  if (SM_GUARD || p != (uint8_t *)seg + seg->block_offset) return NULL;
  size_t offset = seg->block_offset;
  bool huge = sm_huge_pages_for(n);
  size_t mapped = sm_huge_need(offset, n, huge);
  if (mapped == 0) return NULL;
  if (mapped == seg->mapped) return p;
  size_t old_block = seg->block_size;
  void *base;
  sm_segmap_set((uintptr_t)seg, 0);
  if (sm_os_remap(seg, seg->mapped, mapped, SM_SEGMENT_SIZE, 0, &base) != 0) {
    sm_segmap_set((uintptr_t)seg, SM_SEGMENT_SHIFT);
    return NULL;
  }
  seg = base;
  /* a block that grew into huge pages from below them (a large one that
   * has a mapping of its own) is advised as if it had been mapped so */
  if (huge && old_block < SM_HUGE_PAGE) sm_os_hugepage(seg, mapped);
  sm_segment_hold_pages(seg, NULL);   /* its header moved with it */
  seg->cookie = (uintptr_t)seg ^ sm_secret;
  seg->mapped = mapped;
  seg->block_size = mapped - offset;
  seg->pages[0].start = (uint8_t *)seg + offset;
  sm_segmap_set((uintptr_t)seg, SM_SEGMENT_SHIFT);
  sm_gadd(huge_bytes, seg->block_size);
  sm_gadd(huge_bytes_freed, old_block);
  return (uint8_t *)seg + offset;
}
