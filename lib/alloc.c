/* Allocation: the generic (out-of-line) malloc path, large blocks, calloc,
 * realloc and aligned allocation.  The inline fast path is in internal.h. */
#include "internal.h"
#include "track.h"

static SM_COLD void *sm_fail_enomem(sm_heap_t *heap) {
  if (heap->initialized) heap->stats.calls[SM_CALL_FAILED]++;
  errno = ENOMEM;
  return NULL;
}

/* Pop from a page found by the slow path.  The block pointer is checked
 * against the segment like on the fast path. */
static inline void *sm_page_pop(sm_page_t *page) {
  sm_block_t *b = page->free;
  sm_track_link(b);
  page->free = sm_dec(page, b->next);
  b->tag = 0;
  sm_canary_set(page, b);
  page->used++;
  return b;
}

/* A thread's first allocation, or one after its exit: give it a heap.
 * Returns NULL only when the OS refuses memory. */
static sm_heap_t *sm_heap_for_alloc(sm_heap_t *heap) {
  if (sm_likely(heap->initialized)) return heap;
  return sm_heap_init_thread();
}

/* Blocks above the largest size class: a single segment of their own
 * (cached like any segment), or a huge mapping. */
static void *sm_malloc_large(sm_heap_t *heap, size_t n, size_t alignment, bool zero) {
  if (n > SM_MAX_REQUEST || alignment > SM_MAX_REQUEST) return sm_fail_enomem(heap);
  size_t offset;
  if (n <= SM_LARGE_MAX && alignment <= SM_LARGE_MAX) {
    sm_segment_t *seg = sm_segment_single_alloc(n, alignment, &offset);
    if (seg) {
      void *p = (uint8_t *)seg + offset;
      heap->stats.large_allocs++;
      sm_cnt_add(heap->stats.large_bytes, seg->block_size);
      sm_heap_grew(heap);
      sm_track_malloc(p, n, false);
      if (zero) memset(p, 0, n);
      return p;
    }
  }
  void *p = sm_huge_alloc(n, alignment, zero);
  if (!p) return sm_fail_enomem(heap);
  heap->stats.huge_allocs++;
  sm_heap_grew(heap);
  sm_track_malloc(p, n, true);
  return p;
}

void *sm_malloc_generic(sm_heap_t *heap, size_t n) {
  heap = sm_heap_for_alloc(heap);
  if (sm_unlikely(heap == NULL)) { errno = ENOMEM; return NULL; }
  if (n > SM_MEDIUM_MAX - SM_CANARY) {
    void *p = sm_malloc_large(heap, n, 16, false);
    if (p) heap->stats.requested += n;
    else heap->stats.calls[SM_CALL_MALLOC_FAILED]++;
    return p;
  }
  size_t bin = sm_bin_of(sm_class_size(n));
  sm_page_t *page = heap->queues[bin].first;
  if (page && page->free) {
    if (sm_unlikely(((uintptr_t)page->free ^ (uintptr_t)page) >> SM_SEGMENT_SHIFT)) {
      sm_error("corrupted free list in page at %p", (void *)page->start);
      page->free = NULL;   /* leak the rest of the list rather than follow it */
    } else {
      heap->stats.requested += n;
      void *p = sm_page_pop(page);
      sm_track_malloc(p, n, false);
      return p;
    }
  }
  if (page && page->local_free && !page->free) {
    /* the churn case, kept short: swap local_free in (step 1) */
    heap->cycle++;
    page->free = page->local_free;
    page->local_free = NULL;
    int step = SMALLOC_STEP_LOCAL_SWAP;
    if (page->retired) {
      sm_page_unretire(heap, page);
      heap->stats.pages_reused++;
      step = SMALLOC_STEP_RETIRED_PAGE;
    }
    heap->stats.class_steps[bin][step]++;
    sm_page_fold_stats(heap, page);
    if (heap->retired_first && sm_cycle_reached(heap->cycle, heap->retired_first->retire_expire))
      sm_heap_collect_retired(heap, false);
    heap->stats.requested += n;
    void *p = sm_page_pop(page);
    sm_track_malloc(p, n, false);
    return p;
  }
  page = sm_page_find(heap, bin);
  if (sm_unlikely(page == NULL)) {
    heap->stats.calls[SM_CALL_MALLOC_FAILED]++;
    return sm_fail_enomem(heap);
  }
  heap->stats.requested += n;
  void *p = sm_page_pop(page);
  sm_track_malloc(p, n, false);
  return p;
}

void *sm_malloc(size_t n) {
  sm_heap_t *heap = sm_heap();
  if (sm_likely(n <= SM_DIRECT_MAX - SM_CANARY)) return sm_malloc_small(heap, n);
  return sm_malloc_generic(heap, n);
}

/* Allocate for an entry point other than malloc: counted apart so that
 * calls_malloc stays exact. */
static void *sm_malloc_other(size_t n) {
  void *p = sm_malloc(n);
  if (p) sm_heap()->stats.alloc_other++;
  return p;
}

void *sm_calloc(size_t count, size_t size) {
  size_t n;
  sm_heap_t *heap = sm_heap_for_alloc(sm_heap());
  if (sm_unlikely(heap == NULL)) { errno = ENOMEM; return NULL; }
  heap->stats.calls[SM_CALL_CALLOC]++;
  if (sm_unlikely(__builtin_mul_overflow(count, size, &n) || n > SM_MAX_REQUEST))
    return sm_fail_enomem(heap);
  void *p;
  if (n > SM_MEDIUM_MAX - SM_CANARY) {
    p = sm_malloc_large(heap, n, 16, true);   /* huge mappings are zero already */
    if (p) { heap->stats.requested += n; heap->stats.alloc_other++; }
    return p;
  }
  p = sm_malloc_other(n);
  if (p) memset(p, 0, n);
  return p;
}

/* Aligned allocation: a size class whose blocks are already aligned when
 * possible, else a block with room to place the result at an aligned
 * offset (the page is flagged so free finds the block start). */
void *sm_malloc_aligned(size_t alignment, size_t n) {
  sm_heap_t *heap = sm_heap_for_alloc(sm_heap());
  if (sm_unlikely(heap == NULL)) { errno = ENOMEM; return NULL; }
  if (n > SM_MAX_REQUEST || alignment > SM_MAX_REQUEST) return sm_fail_enomem(heap);
  if (alignment <= 16) return sm_malloc_other(n);
  if (n == 0) n = 1;   /* the aligned result must still point into its block */
  if (n <= SM_MEDIUM_MAX - SM_CANARY && alignment <= SM_SEGMENT_HDR) {
    size_t bin = sm_bin_of(sm_class_size(n));
    if ((sm_bin_size(bin) & (alignment - 1)) == 0) {
      /* page starts are 16 KiB aligned, so these blocks are aligned too */
      void *p = sm_malloc_other(n);
      sm_assert(p == NULL || ((uintptr_t)p & (alignment - 1)) == 0);
      return p;
    }
    size_t padded = n + alignment - 16;
    if (padded <= SM_MEDIUM_MAX - SM_CANARY) {
      uint8_t *b = sm_malloc_other(padded);
      if (!b) return NULL;
      heap->stats.requested -= padded - n;
      uint8_t *p = (uint8_t *)(((uintptr_t)b + alignment - 1) & ~(uintptr_t)(alignment - 1));
      if (p != b) {
        sm_track_free(b, b);
        sm_track_malloc(p, n, false);
        sm_page_t *page = sm_segment_page_of(sm_ptr_segment(b), b);
        uint8_t flags = atomic_load_explicit(&page->flags, memory_order_relaxed);
        if (!(flags & SM_PAGE_HAS_ALIGNED)) sm_page_set_flags(page, flags | SM_PAGE_HAS_ALIGNED, 0);
      }
      return p;
    }
  }
  void *p = sm_malloc_large(heap, n, alignment, false);
  if (p) { heap->stats.requested += n; heap->stats.alloc_other++; }
  return p;
}

/* Bytes usable from p to the end of its block (p may be an aligned
 * pointer inside it); no division when p starts the block. */
static size_t sm_usable_in(const sm_segment_t *seg, const sm_page_t *page, const void *p) {
  if (seg->kind >= SM_SEG_SINGLE)
    return (size_t)(((const uint8_t *)seg + seg->block_offset + seg->block_size) - (const uint8_t *)p);
  size_t diff = (size_t)((const uint8_t *)p - page->start);
  if (sm_page_is_block(page, p)) return page->block_size - SM_CANARY;
  size_t block = diff - diff % page->block_size;
  return block + page->block_size - SM_CANARY - diff;
}

size_t sm_usable_size(const void *p, const char *who) {
  sm_segment_t *seg;
  sm_page_t *page;
  if (p == NULL) return 0;
  if (!sm_lookup(p, &seg, &page)) {
    sm_error("%s(): invalid pointer %p (not allocated by smalloc)", who, p);
    return 0;
  }
  return sm_usable_in(seg, page, p);
}

void *sm_realloc(void *p, size_t n, enum sm_call who) {
  sm_heap_t *heap = sm_heap_for_alloc(sm_heap());
  if (sm_unlikely(heap == NULL)) { errno = ENOMEM; return NULL; }
  heap->stats.calls[who]++;
  if (p == NULL) {
    if (n > SM_MAX_REQUEST) return sm_fail_enomem(heap);
    return sm_malloc_other(n);
  }
  if (n == 0) {
    /* glibc's behaviour: free the block, return NULL */
    heap->stats.free_other++;
    sm_free_generic(p, who == SM_CALL_REALLOC ? "realloc" : "reallocarray");
    return NULL;
  }
  if (n > SM_MAX_REQUEST) return sm_fail_enomem(heap);
  sm_segment_t *seg;
  sm_page_t *page;
  const char *name = who == SM_CALL_REALLOC ? "realloc" : "reallocarray";
  if (!sm_lookup(p, &seg, &page)) {
    sm_error("%s(): invalid pointer %p (not allocated by smalloc)", name, p);
    errno = EINVAL;
    return NULL;
  }
  size_t usable = sm_usable_in(seg, page, p);
  if (sm_track_on() || SM_GUARD) {
    /* copy: memcheck sees one block die and another start; in the secure
     * build the guard page after a large or huge block stays put */
    if (!sm_track_on() && n <= usable && (seg->kind >= SM_SEG_SINGLE || n >= usable / 2)) {
      heap->stats.requested += n;
      return p;
    }
  } else if (seg->kind == SM_SEG_HUGE) {
    if (n > SM_LARGE_MAX) {
      /* grows or shrinks in place or moves with mremap: never copies */
      void *q = sm_huge_realloc(seg, p, n);
      if (q) { heap->stats.huge_remaps++; heap->stats.requested += n; return q; }
    }
  } else if (seg->kind == SM_SEG_SINGLE) {
    if ((uint8_t *)p == (uint8_t *)seg + seg->block_offset && n > SM_MEDIUM_MAX &&
        n <= SM_SEGMENT_SIZE - seg->block_offset) {
      /* a large block grows or shrinks inside its own segment */
      size_t bs = (n + SM_OS_PAGE - 1) & ~(SM_OS_PAGE - 1);
      if (bs > SM_SEGMENT_SIZE - seg->block_offset) bs = SM_SEGMENT_SIZE - seg->block_offset;
      sm_cnt_add(heap->stats.large_bytes, bs);
      sm_cnt_add(heap->stats.large_bytes_freed, seg->block_size);
      seg->block_size = bs;
      seg->pages[0].block_size = (uint32_t)bs;
      seg->pages[0].span = (uint32_t)bs;
      heap->stats.requested += n;
      return p;
    }
  } else if (n <= usable && n >= usable / 2) {
    heap->stats.requested += n;
    return p;   /* fits, and not wastefully */
  }
  /* A block that grows by realloc usually grows again: give it an eighth
   * more (one size class) so small steps copy half as often. */
  size_t want = n;
  if (n > usable && n <= SM_MEDIUM_MAX / 2) want = n + n / 8;
  void *q = sm_malloc_other(want);
  if (!q) return NULL;   /* p is untouched, errno is ENOMEM */
  heap->stats.requested -= want - n;
#if SM_TRACK
  if (sm_track_on()) VALGRIND_MAKE_MEM_DEFINED(p, n < usable ? n : usable);
#endif
  memcpy(q, p, n < usable ? n : usable);
  heap->stats.free_other++;
  sm_free_inline(p);   /* p was checked above */
  return q;
}
