/* Allocation: the generic (out-of-line) malloc path, large blocks, calloc,
 * realloc and aligned allocation.  The inline fast path is in internal.h. */
#include "internal.h"
#include "track.h"
#include "probes.h"

/* A call that fails with err (errno, or posix_memalign's result): counted
 * in calls_failed and traced, here alone. */
SM_COLD void sm_call_failed(sm_heap_t *heap, int err) {
  if (heap->initialized) sm_cnt_add(heap->stats.calls[SM_CALL_FAILED], 1);
  SM_PROBE(alloc_failed, err);
}

/* A call answered with NULL and errno err. */
static SM_COLD void *sm_fail(sm_heap_t *heap, int err) {
  sm_call_failed(heap, err);
  errno = err;
  return NULL;
}
static SM_COLD void *sm_fail_enomem(sm_heap_t *heap) { return sm_fail(heap, ENOMEM); }

/* Pop from a page that sm_page_has_free approved (the fast path's check
 * of the block pointer against the segment). */
static inline void *sm_page_pop(sm_page_t *page) {
  sm_block_t *b = page->free;
  sm_track_link(b);
  page->free = sm_dec(page, b->next);
  sm_block_clear(b);
  sm_canary_set(page, b);
  return b;
}

/* A thread's first allocation, or one after its exit: give it a heap.
 * Returns NULL only when the OS refuses memory. */
static sm_heap_t *sm_heap_for_alloc(sm_heap_t *heap) {
  if (sm_likely(heap->initialized)) return heap;
  return sm_heap_init_thread();
}

/* The OS refused memory to the tries-th try (from 0), begun when
 * sm_os_unmapped() was `unmapped`: before answering ENOMEM, give back
 * everything the process holds without a live block (heap.c).  Returns
 * whether to try again: this gave something back, or another thread gave
 * address space back since the try began.  Threads that fail together
 * collect one after another, and the later ones find nothing left to
 * give while what the first gave is there for them: 50 threads with 450
 * MiB live under a 3 GiB limit (probeA thr) got NULL in 4 runs of 25
 * when only what a thread's own collect gave counted, at an address
 * space that the program's next malloc found.  At most SM_OOM_TRIES
 * collects for one allocation: each costs a walk of every heap. */
#define SM_OOM_TRIES 4
static SM_COLD bool sm_oom_collect(sm_heap_t *heap, uint64_t unmapped, int tries) {
  if (tries >= SM_OOM_TRIES) return false;
  sm_cnt_add(heap->stats.oom_collects, 1);
  sm_os_space_short();   /* under a limit, free pages give back their address space */
  uint64_t released = heap->stats.pages_released;
  bool gave = sm_collect_process(heap);
  return gave || heap->stats.pages_released != released || sm_os_unmapped() != unmapped;
}

/* Blocks above the largest size class: up to 2 MiB in a shared segment
 * (span.c), else a mapping of their own, reused from the cache of freed
 * ones when one fits (huge.c). */
static void *sm_malloc_large_once(sm_heap_t *heap, size_t n, size_t alignment, bool zero) {
  bool zeroed;
  void *p = sm_span_serves(n, alignment) ? sm_span_alloc(n, &zeroed) : NULL;
  if (p && zero && !zeroed) {
    memset(p, 0, n);
    zeroed = true;
  }
  if (!p) p = sm_huge_alloc(n, alignment, zero, &zeroed);
  if (!p) return NULL;
  if (n <= SM_LARGE_MAX) sm_cnt_add(heap->stats.large_allocs, 1);
  else sm_cnt_add(heap->stats.huge_allocs, 1);
  sm_stats_peak_large();
  sm_track_malloc(p, n, zeroed);
  return p;
}

static void *sm_malloc_large(sm_heap_t *heap, size_t n, size_t alignment, bool zero) {
  if (n > SM_MAX_REQUEST || alignment > SM_MAX_REQUEST) return sm_fail_enomem(heap);
  for (int tries = 0;; tries++) {
    uint64_t unmapped = sm_os_unmapped();
    void *p = sm_malloc_large_once(heap, n, alignment, zero);
    if (p) return p;
    if (!sm_oom_collect(heap, unmapped, tries)) return sm_fail_enomem(heap);
  }
}

/* may_lend: a medium block may be served as a large one
 * (sm_page_lends_large); not for the aligned functions, which place
 * their result inside a class's block (sm_malloc_paged). */
static void *sm_malloc_slow(sm_heap_t *heap, size_t n, bool may_lend) {
  heap = sm_heap_for_alloc(heap);
  if (sm_unlikely(heap == NULL)) { errno = ENOMEM; return NULL; }
  bool large = n > SM_MEDIUM_MAX - SM_CANARY;
  size_t bin = large ? 0 : sm_bin_of(sm_class_size(n));
  sm_page_t *page = large ? NULL : heap->queues[bin].first;
  if (large || (page == NULL && may_lend && sm_page_lends_large(heap, bin))) {
    void *p = sm_malloc_large(heap, n, 16, false);
    if (p) return sm_prof_count(heap, NULL, p, n);
    sm_cnt_add(heap->stats.calls[SM_CALL_MALLOC_FAILED], 1);
    return p;
  }
  /* the head of the list a page found has its checks too: a list whose
   * head fails them is dropped, and the slow path runs again */
  for (int tries = 0; !page || !sm_page_has_free(page);) {
    uint64_t unmapped = sm_os_unmapped();
    page = sm_page_find(heap, bin);   /* the slow path, cheapest step first */
    if (sm_unlikely(page == NULL) && !sm_oom_collect(heap, unmapped, tries++)) {
      sm_cnt_add(heap->stats.calls[SM_CALL_MALLOC_FAILED], 1);
      return sm_fail_enomem(heap);
    }
  }
  void *p = sm_page_pop(page);
  sm_track_malloc(p, n, false);
  return sm_prof_count(heap, page, p, n);
}

void *sm_malloc_generic(size_t n, sm_heap_t *heap) {
  void *p = sm_malloc_slow(heap, n, true);
  sm_background_poll();   /* the block is out: no page state is held */
  return p;
}

/* Allocate for an entry point other than malloc: counted apart so that
 * calls_malloc stays exact. */
static void *sm_malloc_other(size_t n) {
  void *p = sm_malloc(n);
  if (p) sm_cnt_add(sm_heap()->stats.alloc_other, 1);
  return p;
}

void *sm_calloc(size_t count, size_t size) {
  size_t n;
  bool over = __builtin_mul_overflow(count, size, &n);
  sm_heap_t *heap = sm_heap_for_alloc(sm_heap());
  if (sm_unlikely(heap == NULL)) { errno = ENOMEM; return NULL; }
  sm_cnt_add(heap->stats.calls[SM_CALL_CALLOC], 1);
  void *p;
  if (sm_likely(n <= SM_DIRECT_MAX - SM_CANARY && !over)) {
    p = sm_malloc_small(heap, n);   /* malloc's fast path, inline */
  } else if (over || n > SM_MAX_REQUEST) {
    return sm_fail_enomem(heap);
  } else if (n > SM_MEDIUM_MAX - SM_CANARY) {
    p = sm_malloc_large(heap, n, 16, true);   /* huge mappings are zero already */
    if (!p) return NULL;
    sm_cnt_add(heap->stats.alloc_other, 1);
    return sm_prof_count(heap, NULL, p, n);
  } else {
    p = sm_malloc_generic(n, heap);
  }
  if (!p) return NULL;
  sm_cnt_add(heap->stats.alloc_other, 1);
  return memset(p, 0, n);
}

/* A block of n's class from a page, for the aligned functions: never
 * lent (with a page of the class at hand, malloc lends nothing). */
static void *sm_malloc_paged(sm_heap_t *heap, size_t n) {
  if (heap->queues[sm_bin_of(sm_class_size(n))].first) return sm_malloc_other(n);
  void *p = sm_malloc_slow(heap, n, false);
  sm_background_poll();
  if (p) sm_cnt_add(heap->stats.alloc_other, 1);
  return p;
}

/* Aligned allocation: a size class whose blocks are already aligned when
 * possible, else a block with room to place the result at an aligned
 * offset (the page is flagged so free finds the block start). */
static __attribute__((noinline)) void *sm_malloc_aligned_general(sm_heap_t *heap, size_t alignment, size_t n);

/* Whether the blocks of n's class (n at most SM_MEDIUM_MAX) are aligned
 * at alignment (at most SM_SEGMENT_HDR): page starts are 16 KiB aligned,
 * so they are when the class size is a multiple of it. */
static inline bool sm_class_aligned(size_t n, size_t alignment) {
  return (sm_bin_size(sm_bin_of(sm_class_size(n))) & (alignment - 1)) == 0;
}

void *sm_malloc_aligned(size_t alignment, size_t n) {
  sm_heap_t *heap = sm_heap();
  if (n == 0) n = 1;   /* the aligned result must still point into its block */
  /* the common case: malloc's fast path, inline, for a size of the
   * direct table whose class is aligned enough (malloc lends no block of
   * these sizes, sm_page_lends_large) */
  if (sm_likely(heap->initialized && n <= SM_DIRECT_MAX - SM_CANARY && alignment <= SM_SEGMENT_HDR)) {
    if (alignment <= 16 || sm_class_aligned(n, alignment)) {
      void *p = sm_malloc_small(heap, n);
      if (p) sm_cnt_add(heap->stats.alloc_other, 1);
      return p;
    }
  }
  return sm_malloc_aligned_general(heap, alignment, n);
}

static void *sm_malloc_aligned_general(sm_heap_t *heap, size_t alignment, size_t n) {
  heap = sm_heap_for_alloc(heap);
  if (sm_unlikely(heap == NULL)) { errno = ENOMEM; return NULL; }
  if (n > SM_MAX_REQUEST || alignment > SM_MAX_REQUEST) return sm_fail_enomem(heap);
  if (alignment <= 16) return sm_malloc_other(n);
  if (n <= SM_MEDIUM_MAX - SM_CANARY && alignment <= SM_SEGMENT_HDR) {
    if (sm_class_aligned(n, alignment)) {
      void *p = sm_malloc_paged(heap, n);
      sm_assert(p == NULL || ((uintptr_t)p & (alignment - 1)) == 0);
      return p;
    }
    size_t padded = n + alignment - 16;
    if (padded <= SM_MEDIUM_MAX - SM_CANARY) {
      uint8_t *b = sm_malloc_paged(heap, padded);
      if (!b) return NULL;
      heap->stats.requested -= padded - n;
      uint8_t *p = (uint8_t *)(((uintptr_t)b + alignment - 1) & ~(uintptr_t)(alignment - 1));
      if (p != b) {
        sm_track_free(b, b);
        sm_track_malloc(p, n, false);
        sm_page_t *page = sm_segment_page_of(sm_ptr_segment(b), b);
        uint8_t flags = atomic_load_explicit(&page->flags, memory_order_relaxed);
        if (!(flags & SM_PAGE_HAS_ALIGNED)) sm_page_set_flags(page, flags | SM_PAGE_HAS_ALIGNED, 0);
        sm_track_mark(p);
        sm_aligned_mark_set(page, p);
      }
      return p;
    }
  }
  void *p = sm_malloc_large(heap, n, alignment, false);
  if (!p) return NULL;
  sm_cnt_add(heap->stats.alloc_other, 1);
  return sm_prof_count(heap, NULL, p, n);
}

/* The common case of realloc and malloc_usable_size, found as free's
 * fast path finds its page: p a block start in a small or medium page
 * whose frees take no detour (xtid not 0: no aligned block, no sample,
 * not under valgrind), and not free by its tag.  Its page then, else
 * NULL: anything else, a tag that says the block may be free included,
 * goes the general way, which checks it fully.  The general way cost
 * bench_realloc quick 165 instructions a realloc kept in place (the
 * segment map, then one function each for the block's state, place and
 * size), and a malloc_usable_size 138. */
static inline sm_page_t *sm_live_block_page(const void *p) {
  if (SM_CANARY || SM_GUARD) return NULL;   /* the secure build's blocks hold more */
  uintptr_t slice = sm_pagemap_index(p);
  if (slice >= SM_PAGEMAP_SLICES) return NULL;   /* NULL too */
  sm_page_t *page = sm_pagemap_at(slice);
  if (atomic_load_explicit(&page->xtid, memory_order_relaxed) != 0 && sm_page_is_block(page, p) &&
      (((const sm_block_t *)p)->tag ^ page->key) > SM_TAG_REMOTE)
    return page;
  return NULL;
}

/* Bytes usable from p to the end of its block (p may be an aligned
 * pointer inside it); no division when p starts the block. */
static size_t sm_usable_in(const sm_segment_t *seg, const sm_page_t *page, const void *p) {
  if (seg->kind == SM_SEG_SPAN) return (size_t)(page->start + page->block_size - (const uint8_t *)p);
  if (seg->kind >= SM_SEG_LARGE)
    return (size_t)(((const uint8_t *)seg + seg->block_offset + seg->block_size) - (const uint8_t *)p);
  size_t diff = (size_t)((const uint8_t *)p - page->start);
  if (sm_page_is_block(page, p)) return page->block_size - SM_CANARY;
  size_t block = diff - diff % page->block_size;
  return block + page->block_size - SM_CANARY - diff;
}

/* What realloc may resize and malloc_usable_size may measure, as free
 * would accept it: a block start, the start of a large or huge block, or
 * an aligned pointer with its mark. */
static bool sm_realloc_target_ok(const sm_segment_t *seg, const sm_page_t *page, const void *p);
static __attribute__((noinline)) size_t sm_usable_size_general(const void *p, const char *who);

/* The usable bytes of block p, checked as realloc checks it (a pointer
 * into the middle of a block, or a block that is free, is reported, and
 * is 0 bytes: what it returned before, the bytes to the block's end, led
 * a program that trusted it to write over the next block). */
size_t sm_usable_size(const void *p, const char *who) {
  sm_page_t *page = sm_live_block_page(p);
  if (page) return page->block_size;
  return sm_usable_size_general(p, who);
}

/* Why p is not a block that free would accept, as a message with its
 * caller's name and p to fill in (NULL: it is one, of *usable bytes). */
static const char *sm_usable_checked(const void *p, size_t *usable) {
  sm_segment_t *seg;
  sm_page_t *page;
  *usable = 0;
  if (!sm_lookup(p, &seg, &page)) return "%s(): invalid pointer %p (not allocated by smalloc)";
  if (seg->kind < SM_SEG_SPAN && sm_page_is_block(page, p) && sm_block_is_free(page, (sm_block_t *)p))
    return "%s(): pointer %p was freed";
  if (!sm_realloc_target_ok(seg, page, p)) return "%s(): invalid pointer %p (not the start of a block)";
  *usable = sm_usable_in(seg, page, p);
  return NULL;
}

static size_t sm_usable_size_general(const void *p, const char *who) {
  if (p == NULL) return 0;
  size_t usable;
  const char *why = sm_usable_checked(p, &usable);
  if (why) sm_error(why, who, p);
  return usable;
}

/* A size larger than the block is reported, and the block leaked (the
 * program's idea of it is wrong: it may have written past its end); a
 * pointer free would not accept is left to free to report. */
void sm_free_sized_general(void *p, size_t size, const char *who) {
  size_t usable;
  if (p != NULL && sm_usable_checked(p, &usable) == NULL && size > usable) {
    sm_error("%s(): size %zu given for %p, whose block holds %zu bytes", who, size, p, usable);
    return;
  }
  sm_free_generic(p, who);
}

static bool sm_realloc_target_ok(const sm_segment_t *seg, const sm_page_t *page, const void *p) {
  if (seg->kind >= SM_SEG_SPAN) return p == (const void *)page->start;
  if (sm_page_is_block(page, p)) return true;
  size_t diff = (size_t)((const uint8_t *)p - page->start);
  if (diff >= (size_t)page->reserved * page->block_size ||
      !(atomic_load_explicit(&page->flags, memory_order_relaxed) & SM_PAGE_HAS_ALIGNED))
    return false;
  sm_track_mark(p);
  return sm_aligned_mark_ok(page, p);
}

/* A block of usable bytes that realloc(n) keeps in place: it fits, and
 * not wastefully. */
static inline bool sm_realloc_fits(size_t n, size_t usable) { return n <= usable && n >= usable / 2; }

static __attribute__((noinline)) void *sm_realloc_general(void *p, size_t n, enum sm_call who);

void *sm_realloc(void *p, size_t n, enum sm_call who) {
  sm_page_t *page = sm_live_block_page(p);
  if (page && n != 0 && sm_realloc_fits(n, page->block_size)) {
    sm_heap_t *heap = sm_heap();
    if (sm_likely(heap->initialized)) {
      sm_cnt_add(heap->stats.calls[who], 1);
      sm_cnt_add(heap->stats.requested, n);
      return p;
    }
  }
  return sm_realloc_general(p, n, who);
}

static void *sm_realloc_general(void *p, size_t n, enum sm_call who) {
  sm_heap_t *heap = sm_heap_for_alloc(sm_heap());
  if (sm_unlikely(heap == NULL)) { errno = ENOMEM; return NULL; }
  sm_cnt_add(heap->stats.calls[who], 1);
  if (p == NULL) {
    if (n > SM_MAX_REQUEST) return sm_fail_enomem(heap);
    return sm_malloc_other(n);
  }
  sm_segment_t *seg;
  sm_page_t *page;
  const char *name = who == SM_CALL_REALLOC ? "realloc" : "reallocarray";
  if (!sm_lookup(p, &seg, &page)) {
    sm_error("%s(): invalid pointer %p (not allocated by smalloc)", name, p);
    return sm_fail(heap, EINVAL);
  }
  if (seg->kind < SM_SEG_SPAN && sm_page_is_block(page, p) &&
      sm_unlikely(sm_block_is_free(page, (sm_block_t *)p))) {
    /* resized in place, it would be handed out while free */
    sm_error("%s(): pointer %p was freed", name, p);
    return sm_fail(heap, EINVAL);
  }
  if (sm_unlikely(!sm_realloc_target_ok(seg, page, p))) {
    sm_error("%s(): invalid pointer %p (not the start of a block)", name, p);
    return sm_fail(heap, EINVAL);
  }
  if (n == 0) {
    /* glibc's behaviour: free the block, return NULL */
    sm_cnt_add(heap->stats.free_other, 1);
    sm_free_generic(p, name);
    return NULL;
  }
  if (n > SM_MAX_REQUEST) return sm_fail_enomem(heap);
  size_t usable = sm_usable_in(seg, page, p);
  if (sm_track_on() || SM_GUARD) {
    /* copy: memcheck sees one block die and another start; in the secure
     * build the guard page after a large or huge block stays put */
    if (!sm_track_on() && n <= usable && (seg->kind >= SM_SEG_SPAN || sm_realloc_fits(n, usable))) {
      sm_cnt_add(heap->stats.requested, n);
      return p;
    }
  } else if (seg->kind >= SM_SEG_SPAN) {
    /* fits, and not wastefully: up to 2 MiB, any block above the classes
     * keeps its place (the memory it gives back would fault in again
     * when it grows) */
    if (sm_realloc_fits(n, usable) ||
        (n <= usable && n > SM_MEDIUM_MAX - SM_CANARY && usable <= SM_LARGE_MAX)) {
      sm_cnt_add(heap->stats.requested, n);
      return p;
    }
    if (n > SM_MEDIUM_MAX - SM_CANARY) {
      /* never copies: a block in a shared segment grows into the free
       * units after it, a mapping grows or shrinks in place or moves with
       * mremap.  A block that grows usually grows again: an eighth more
       * when it can, so that growing by small steps resizes once per
       * eighth, not per step; just n when the eighth does not fit (near
       * an address-space limit, or a neighbour in the segment) */
      size_t want = n > usable && n <= SM_MAX_REQUEST / 2 ? n + n / 8 : n;
      void *q;
      if (seg->kind != SM_SEG_SPAN) {
        q = sm_huge_realloc(seg, p, want);
        if (!q && want != n) q = sm_huge_realloc(seg, p, n);
      } else {
        q = sm_span_grow(seg, page, want) || sm_span_grow(seg, page, n) ? p : NULL;
      }
      if (q) {
        /* a sample there moves with its block: forgotten (the estimate
         * for its call site loses it; the block is no longer what it was) */
        if (q != p && atomic_load_explicit(&sm_prof_live_n, memory_order_relaxed)) sm_prof_forget(NULL, p);
        sm_cnt_add(heap->stats.huge_remaps, 1);
        sm_cnt_add(heap->stats.requested, n);
        return q;
      }
    }
  } else if (sm_realloc_fits(n, usable)) {
    sm_cnt_add(heap->stats.requested, n);
    return p;
  }
  /* A block that grows by realloc usually grows again: give it an eighth
   * more (one size class, or a unit or more of a large block) so small
   * steps copy half as often. */
  size_t want = n;
  if (n > usable && (n <= SM_MEDIUM_MAX / 2 || sm_span_serves(n + n / 8, 16))) want = n + n / 8;
  void *q = sm_malloc_other(want);
  if (!q) return NULL;   /* p is untouched, errno is ENOMEM */
  heap->stats.requested -= want - n;
#if SM_TRACK
  if (sm_track_on()) VALGRIND_MAKE_MEM_DEFINED(p, n < usable ? n : usable);
#endif
  memcpy(q, p, n < usable ? n : usable);
  sm_cnt_add(heap->stats.free_other, 1);
  sm_free_inline(p);   /* p was checked above */
  return q;
}
