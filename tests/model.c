/* A random model run: over a million malloc/calloc/realloc/free calls against
 * a shadow table that knows what every live block must hold. */
#include "common.h"

enum {
  SLOTS = 4096,
  OPS = 1200000,
  OVERLAP_EVERY = 50000,
  SWEEP_EVERY = 250000,
};

typedef struct slot {
  unsigned char *p;
  size_t n;      /* requested size */
  uint64_t seed; /* pattern of its bytes */
} slot_t;

static slot_t slots[SLOTS];
static sm_interval_t iv[SLOTS];
static size_t live;

typedef struct counts {
  unsigned long mallocs, callocs, reallocs, frees, aligned, sized, to_zero;
} counts_t;

/* Mostly small, a tail up to 256 KiB. */
static size_t random_size(sm_rng_t *r)
{
  size_t k = sm_rng_below(r, 1000);
  if (k < 780)
    return sm_rng_range(r, 0, 128);
  if (k < 970)
    return sm_rng_range(r, 129, 2048);
  if (k < 997)
    return sm_rng_range(r, 2049, 32 * KiB);
  return sm_rng_range(r, 32 * KiB + 1, 256 * KiB);
}

static void check_new(const slot_t *s, const char *what)
{
  SM_CHECK(s->p != NULL, "%s(%zu) returned NULL", what, s->n);
  size_t u = smalloc_malloc_usable_size(s->p);
  SM_CHECK(u >= s->n, "%s(%zu): usable %zu", what, s->n, u);
  SM_CHECK(sm_is_aligned(s->p, s->n >= 16 ? 16 : 8), "%s(%zu) = %p", what, s->n,
           (void *)s->p);
}

static void check_slot(const slot_t *s, size_t i, unsigned long op)
{
  size_t bad = sm_pattern_find_bad(s->p, s->n, s->seed);
  SM_CHECK(bad == SIZE_MAX,
           "op %lu: slot %zu block %p (size %zu): byte %zu is %#x, want %#x", op, i,
           (void *)s->p, s->n, bad, s->p[bad], sm_pattern_byte(s->seed, bad));
}

static void check_overlap(unsigned long op)
{
  size_t k = 0;
  for (size_t i = 0; i < SLOTS; i++)
    if (slots[i].p) {
      iv[k].lo = (uintptr_t)slots[i].p;
      iv[k].hi = iv[k].lo + smalloc_malloc_usable_size(slots[i].p);
      k++;
    }
  SM_CHECK(k == live, "op %lu: %zu live slots, counted %zu", op, live, k);
  size_t bad = sm_intervals_overlap(iv, k);
  SM_CHECK(bad == 0, "op %lu: live blocks [%#lx, %#lx) and [%#lx, %#lx) overlap", op,
           (unsigned long)iv[bad - 1].lo, (unsigned long)iv[bad - 1].hi,
           (unsigned long)iv[bad].lo, (unsigned long)iv[bad].hi);
}

static void allocate(slot_t *s, sm_rng_t *r, unsigned long op, counts_t *c)
{
  size_t n = random_size(r);
  size_t k = sm_rng_below(r, 100);
  s->n = n;
  if (k < 60) {
    s->p = smalloc_malloc(n);
    check_new(s, "malloc");
    c->mallocs++;
  } else if (k < 80) {
    size_t m = n >= 8 && n % 8 == 0 ? 8 : 1;
    s->p = smalloc_calloc(n / m, m);
    check_new(s, "calloc");
    size_t bad = sm_find_not_byte(s->p, n, 0);
    SM_CHECK(bad == SIZE_MAX, "op %lu: calloc(%zu) byte %zu is %#x", op, n, bad,
             s->p[bad]);
    c->callocs++;
  } else if (k < 90) {
    s->p = smalloc_realloc(NULL, n);
    check_new(s, "realloc(NULL)");
    c->reallocs++;
  } else {
    size_t al = (size_t)1 << sm_rng_range(r, 3, 12);
    void *q = NULL;
    if (k < 94) {
      int rc = smalloc_posix_memalign(&q, al, n);
      SM_CHECK(rc == 0, "op %lu: posix_memalign(%zu, %zu) returned %d", op, al, n, rc);
    } else if (k < 97) {
      q = smalloc_aligned_alloc(al, n);
    } else {
      q = smalloc_memalign(al, n);
    }
    s->p = q;
    check_new(s, "aligned allocation");
    SM_CHECK(sm_is_aligned(q, al), "op %lu: alignment %zu: %p", op, al, q);
    c->aligned++;
  }
  s->seed = sm_pattern_seed(s->p, op);
  sm_pattern_fill(s->p, n, s->seed);
  live++;
}

static void release(slot_t *s, sm_rng_t *r, counts_t *c)
{
  if (sm_rng_below(r, 4) == 0) {
    smalloc_free_sized(s->p, s->n);
    c->sized++;
  } else {
    smalloc_free(s->p);
    c->frees++;
  }
  s->p = NULL;
  live--;
}

static void reallocate(slot_t *s, sm_rng_t *r, unsigned long op, counts_t *c)
{
  size_t n;
  size_t k = sm_rng_below(r, 100);
  if (k < 2) {
    /* realloc(p, 0) frees p */
    void *q = smalloc_realloc(s->p, 0);
    SM_CHECK(q == NULL, "op %lu: realloc(p, 0) returned %p", op, q);
    s->p = NULL;
    live--;
    c->to_zero++;
    return;
  }
  if (k < 40) /* grow or shrink a little, as a buffer does */
    n = s->n + sm_rng_below(r, s->n / 4 + 16) - (k < 20 ? 0 : s->n / 8);
  else
    n = random_size(r);
  if (n > 512 * KiB)
    n = random_size(r);
  if (n == 0) /* realloc(p, 0) frees: that case is above */
    n = 1;
  unsigned char *q;
  if (k >= 95 && n % 4 == 0)
    q = smalloc_reallocarray(s->p, n / 4, 4);
  else
    q = smalloc_realloc(s->p, n);
  SM_CHECK(q != NULL, "op %lu: realloc(%zu -> %zu) returned NULL", op, s->n, n);
  size_t keep = n < s->n ? n : s->n;
  size_t bad = sm_pattern_find_bad(q, keep, s->seed);
  SM_CHECK(bad == SIZE_MAX, "op %lu: realloc(%p, %zu -> %zu) = %p lost byte %zu", op,
           (void *)s->p, s->n, n, (void *)q, bad);
  slot_t t = {q, n, s->seed};
  check_new(&t, "realloc");
  if (n > s->n)
    sm_pattern_fill_range(q, s->n, n, s->seed);
  s->p = q;
  s->n = n;
  c->reallocs++;
}

START_TEST(random_model)
{
  sm_rng_t r;
  counts_t c = {0};
  sm_rng_seed(&r, 0x5eed5eed);
  memset(slots, 0, sizeof slots);
  live = 0;
  uint64_t base = sm_blocks_in_use();
  size_t active = 256;

  for (unsigned long op = 1; op <= OPS; op++) {
    if (op % 20000 == 0) /* let the live set swell and shrink */
      active = sm_rng_range(&r, 16, SLOTS);
    size_t i = sm_rng_below(&r, active);
    slot_t *s = &slots[i];
    if (!s->p) {
      allocate(s, &r, op, &c);
    } else {
      check_slot(s, i, op);
      size_t k = sm_rng_below(&r, 100);
      if (k < 50)
        release(s, &r, &c);
      else if (k < 97)
        reallocate(s, &r, op, &c);
      /* else: checked only */
    }
    if (op % OVERLAP_EVERY == 0) {
      check_overlap(op);
      uint64_t b = sm_blocks_in_use();
      SM_CHECK(b == base + live, "op %lu: smalloc counts %llu live blocks, model %zu",
               op, (unsigned long long)(b - base), live);
    }
    if (op % SWEEP_EVERY == 0)
      for (size_t j = 0; j < SLOTS; j++)
        if (slots[j].p)
          check_slot(&slots[j], j, op);
  }
  check_overlap(OPS);
  for (size_t j = 0; j < SLOTS; j++)
    if (slots[j].p) {
      check_slot(&slots[j], j, OPS);
      smalloc_free(slots[j].p);
      slots[j].p = NULL;
    }
  ck_assert_uint_eq(sm_blocks_in_use(), base);
  /* the run did what it claims */
  unsigned long calls =
    c.mallocs + c.callocs + c.reallocs + c.frees + c.aligned + c.sized + c.to_zero;
  ck_assert_uint_ge(calls, 1000000);
  ck_assert_uint_gt(c.callocs, 10000);
  ck_assert_uint_gt(c.aligned, 10000);
  ck_assert_uint_gt(c.to_zero, 1000);
}
END_TEST

int main(void)
{
  Suite *s = suite_create("model");
  TCase *tc = sm_tcase("random", 120);
  tcase_add_test(tc, random_model);
  suite_add_tcase(s, tc);
  return sm_run_suite(s);
}
