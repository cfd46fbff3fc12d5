/* Huge blocks: more than half a segment, each in its own mapping whose
 * first OS page holds a segment header, so free() finds it with the same
 * mask as any block.  realloc resizes the mapping in place or moves it
 * with mremap: the pages move, the bytes are never copied. */
#include "internal.h"

#define SM_HUGE_HDR SM_SEGMENT_HDR

static size_t sm_huge_offset(size_t alignment) {
  if (alignment >= SM_SEGMENT_SIZE) return SM_SEGMENT_SIZE;   /* see sm_lookup */
  return alignment > SM_HUGE_HDR ? alignment : SM_HUGE_HDR;
}

static void sm_huge_header(sm_segment_t *seg, size_t mapped, size_t offset) {
  sm_segment_clear_single(seg);
  seg->cookie = (uintptr_t)seg ^ sm_secret;
  seg->kind = SM_SEG_HUGE;
  seg->page_shift = SM_SEGMENT_SHIFT;
  seg->page_count = 1;
  seg->used_pages = 1;
  seg->mapped = mapped;
  seg->block_offset = offset;
  seg->block_size = mapped - offset - SM_GUARD;
  sm_page_t *page = &seg->pages[0];
  page->in_use = 1;
  page->start = (uint8_t *)seg + offset;
}

/* A huge block in a fresh mapping: it reads as zero. */
void *sm_huge_alloc(size_t n, size_t alignment) {
  if (alignment < 16) alignment = 16;
  size_t offset = sm_huge_offset(alignment);
  size_t mapped = ((offset + n + SM_OS_PAGE - 1) & ~(SM_OS_PAGE - 1)) + SM_GUARD;
  if (mapped < n) return NULL;
  void *base;
  size_t align = alignment > SM_SEGMENT_SIZE ? alignment : SM_SEGMENT_SIZE;
  size_t pre = offset == SM_SEGMENT_SIZE ? SM_SEGMENT_SIZE : 0;
  if (sm_os_map_aligned(mapped, align, pre, &base) != 0) return NULL;
  sm_segment_t *seg = base;
  sm_huge_header(seg, mapped, offset);
  if (SM_GUARD) sm_os_protect((uint8_t *)base + mapped - SM_GUARD, SM_GUARD, false);
  /* the whole mapping, so it stays one VMA that mremap can move */
  if (n >= SM_SEGMENT_SIZE) sm_os_hugepage(base, mapped);
  sm_segmap_set((uintptr_t)seg, SM_SEGMENT_SHIFT);
  sm_gadd(huge_bytes, seg->block_size);
  return (uint8_t *)seg + offset;
}

void sm_huge_free(sm_segment_t *seg) {
  sm_gadd(huge_bytes_freed, seg->block_size);
  seg->cookie = 0;
  sm_segmap_set((uintptr_t)seg, 0);
  sm_os_unmap(seg, seg->mapped);
}

void *sm_huge_realloc(sm_segment_t *seg, void *p, size_t n) {
  if (SM_GUARD || p != (uint8_t *)seg + seg->block_offset) return NULL;
  size_t offset = seg->block_offset;
  size_t mapped = (offset + n + SM_OS_PAGE - 1) & ~(SM_OS_PAGE - 1);
  if (mapped < n) return NULL;
  if (mapped == seg->mapped) return p;
  size_t old_block = seg->block_size;
  void *base;
  sm_segmap_set((uintptr_t)seg, 0);
  if (sm_os_remap(seg, seg->mapped, mapped, SM_SEGMENT_SIZE, 0, &base) != 0) {
    sm_segmap_set((uintptr_t)seg, SM_SEGMENT_SHIFT);
    return NULL;
  }
  seg = base;
  seg->cookie = (uintptr_t)seg ^ sm_secret;
  seg->mapped = mapped;
  seg->block_size = mapped - offset;
  seg->pages[0].start = (uint8_t *)seg + offset;
  sm_segmap_set((uintptr_t)seg, SM_SEGMENT_SHIFT);
  sm_gadd(huge_bytes, seg->block_size);
  sm_gadd(huge_bytes_freed, old_block);
  return (uint8_t *)seg + offset;
}
