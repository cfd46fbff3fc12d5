/* Request sizes up to the largest size class (256 KiB), then a spread of
 * large and huge sizes up to 1 GiB. */
#include "common.h"

enum { WINDOW = 24 };

typedef struct live {
  unsigned char *p;
  size_t usable;
  unsigned char fill;
} live_t;

static unsigned char fill_byte(size_t n)
{
  return (unsigned char)(n * 131 + 7) | 1;
}

/* The contract's bound on internal waste for size classes (plus, in the
 * secure layout, the canary and the 16-byte minimum). */
static size_t class_waste_bound(size_t n)
{
  return (n / 8 > 16 ? n / 8 : 16) + SM_TEST_EXTRA_WASTE;
}

/* Every size up to 64 KiB; then, up to the largest class, a stride prime to
 * the class steps (writing every byte of every size up to 256 KiB would take
 * half a minute), ending exactly on the largest request a class serves
 * (256 KiB; less the canary in the secure layout). */
#define MAX_CLASS SM_TEST_CLASS_MAX_REQUEST

static size_t next_size(size_t n)
{
  if (n < 64 * KiB)
    return n + 1;
  if (n < MAX_CLASS && n + 61 > MAX_CLASS)
    return MAX_CLASS;
  return n + 61;
}

static void check_and_free(live_t *l)
{
  size_t bad = sm_find_not_byte(l->p, l->usable, l->fill);
  SM_CHECK(bad == SIZE_MAX,
           "block %p (usable %zu) byte %zu changed while live: %#x, want %#x",
           (void *)l->p, l->usable, bad, l->p[bad], l->fill);
  smalloc_free(l->p);
  l->p = NULL;
}

static void every_size(void *(*alloc)(size_t))
{
  static live_t win[WINDOW];
  uint64_t base = sm_blocks_in_use();
  memset(win, 0, sizeof win);
  unsigned step = 0;
  for (size_t n = 0; n <= MAX_CLASS; n = next_size(n), step++) {
    live_t *slot = &win[step % WINDOW];
    if (slot->p)
      check_and_free(slot);
    unsigned char *p = alloc(n);
    SM_CHECK(p != NULL, "malloc(%zu) returned NULL", n);
    size_t u = smalloc_malloc_usable_size(p);
    SM_CHECK(u >= n, "malloc(%zu): usable %zu", n, u);
    if (n == 0)
      SM_CHECK(u == sm_test_usable(0), "malloc(0): usable %zu, want %zu", u,
               sm_test_usable(0));
    else
      SM_CHECK(u - n < class_waste_bound(n),
               "malloc(%zu): usable %zu wastes %zu, bound %zu", n, u, u - n,
               class_waste_bound(n));
    /* and exactly the class of the contract's geometry */
    SM_CHECK(u == sm_test_usable(n), "malloc(%zu): usable %zu, want %zu (class %zu)",
             n, u, sm_test_usable(n), sm_test_class_size(n));
    if (n >= 16)
      SM_CHECK(sm_is_aligned(p, 16), "malloc(%zu) = %p not 16-byte aligned", n,
               (void *)p);
    else
      SM_CHECK(sm_is_aligned(p, 8), "malloc(%zu) = %p not 8-byte aligned", n,
               (void *)p);
    uintptr_t lo = (uintptr_t)p, hi = lo + u;
    for (int i = 0; i < WINDOW; i++) {
      live_t *o = &win[i];
      if (!o->p)
        continue;
      uintptr_t olo = (uintptr_t)o->p, ohi = olo + o->usable;
      SM_CHECK(hi <= olo || ohi <= lo,
               "malloc(%zu) = [%p, +%zu) overlaps live [%p, +%zu)", n, (void *)p,
               u, (void *)o->p, o->usable);
    }
    slot->p = p;
    slot->usable = u;
    slot->fill = fill_byte(n);
    memset(p, slot->fill, u);
  }
  for (int i = 0; i < WINDOW; i++)
    if (win[i].p)
      check_and_free(&win[i]);
  ck_assert_uint_eq(sm_blocks_in_use(), base);
}

static void *calloc_one(size_t n)
{
  void *p = smalloc_calloc(1, n);
  if (p) {
    size_t bad = sm_find_not_byte(p, n, 0);
    SM_CHECK(bad == SIZE_MAX, "calloc(1, %zu): byte %zu not zero", n, bad);
  }
  return p;
}

START_TEST(every_small_and_medium_size)
{
  every_size(smalloc_malloc);
}
END_TEST

START_TEST(every_small_and_medium_size_calloc)
{
  every_size(calloc_one);
}
END_TEST

/* Usable sizes only grow with the request: a class boundary never goes back. */
START_TEST(usable_size_is_monotonic)
{
  size_t last = 0;
  for (size_t n = 1; n <= MAX_CLASS + 4096; n++) {
    void *p = smalloc_malloc(n);
    SM_CHECK(p != NULL, "malloc(%zu)", n);
    size_t u = smalloc_malloc_usable_size(p);
    SM_CHECK(u >= last, "malloc(%zu): usable %zu below %zu of malloc(%zu)", n, u,
             last, n - 1);
    last = u;
    smalloc_free(p);
  }
}
END_TEST

/* Large (above 64 KiB) and huge (above 2 MiB) blocks: touch the first and
 * last byte and one byte per page.  Past 64 MiB one byte per 64 KiB keeps the
 * page faults (about 10 us each on these machines) within budget. */
static size_t touch_stride(size_t n)
{
  return n <= 64 * MiB ? 4096 : 64 * KiB;
}

static unsigned char touch_value(size_t n, size_t off)
{
  return (unsigned char)(sm_mix64(n ^ (off << 20)) | 1);
}

static void touch(unsigned char *p, size_t n)
{
  size_t stride = touch_stride(n);
  for (size_t off = 0; off < n; off += stride)
    p[off] = touch_value(n, off);
  p[n - 1] = touch_value(n, n - 1);
}

static void check_touched(const unsigned char *p, size_t n)
{
  size_t stride = touch_stride(n);
  for (size_t off = 0; off < n; off += stride)
    SM_CHECK(p[off] == touch_value(n, off), "block of %zu: byte %zu changed", n, off);
  SM_CHECK(p[n - 1] == touch_value(n, n - 1), "block of %zu: last byte changed", n);
}

START_TEST(spread_up_to_one_gib)
{
  enum { KEEP = 3 };
  struct {
    unsigned char *p;
    size_t n, u;
  } keep[KEEP] = {{0}};
  unsigned k_slot = 0;
  uint64_t base = sm_blocks_in_use();
  for (unsigned k = 4; k <= 30; k++) {
    for (int d = -1; d <= 1; d++) {
      size_t n = ((size_t)1 << k) + (size_t)(ptrdiff_t)d;
      /* One giant block at a time: three live GiB would have the kernel
       * compacting memory for the huge pages, seconds of system time. */
      for (int i = 0; i < KEEP; i++)
        if (keep[i].p && (i == (int)k_slot || n > 64 * MiB)) {
          check_touched(keep[i].p, keep[i].n);
          smalloc_free(keep[i].p);
          keep[i].p = NULL;
        }
      unsigned char *p = smalloc_malloc(n);
      SM_CHECK(p != NULL, "malloc(%zu) returned NULL", n);
      size_t u = smalloc_malloc_usable_size(p);
      SM_CHECK(u >= n, "malloc(%zu): usable %zu", n, u);
      SM_CHECK(u - n < n / 8 + 4 * MiB, "malloc(%zu): usable %zu", n, u);
      SM_CHECK(sm_is_aligned(p, 16), "malloc(%zu) = %p", n, (void *)p);
      for (int i = 0; i < KEEP; i++) {
        if (!keep[i].p || i == (int)k_slot)
          continue;
        uintptr_t lo = (uintptr_t)p, olo = (uintptr_t)keep[i].p;
        SM_CHECK(lo + u <= olo || olo + keep[i].u <= lo,
                 "malloc(%zu) overlaps a live block of %zu", n, keep[i].n);
      }
      touch(p, n);
      keep[k_slot].p = p;
      keep[k_slot].n = n;
      keep[k_slot].u = u;
      k_slot = (k_slot + 1) % KEEP;
    }
  }
  for (int i = 0; i < KEEP; i++)
    if (keep[i].p) {
      check_touched(keep[i].p, keep[i].n);
      smalloc_free(keep[i].p);
    }
  ck_assert_uint_eq(sm_blocks_in_use(), base);
}
END_TEST

int main(void)
{
  Suite *s = suite_create("sizes");
  TCase *tc = sm_tcase("classes", 60);
  tcase_add_test(tc, every_small_and_medium_size);
  tcase_add_test(tc, every_small_and_medium_size_calloc);
  tcase_add_test(tc, usable_size_is_monotonic);
  suite_add_tcase(s, tc);
  tc = sm_tcase("large-huge", 60);
  tcase_add_test(tc, spread_up_to_one_gib);
  suite_add_tcase(s, tc);
  return sm_run_suite(s);
}
