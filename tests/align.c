/* Aligned allocation: every power-of-two alignment from 1 byte to 4 MiB,
 * through posix_memalign, aligned_alloc and memalign. */
#include "common.h"

static const size_t sizes[] = {0,    1,    15,    16,     17,
                               100,  4095, 4096,  65536,  256 * KiB + 1,
                               MiB + 1};
#define NSIZES (sizeof sizes / sizeof sizes[0])
#define MAX_ALIGN (4 * MiB)

enum how { HOW_POSIX, HOW_ALIGNED_ALLOC, HOW_MEMALIGN, HOW_COUNT };
static const char *const how_name[] = {"posix_memalign", "aligned_alloc", "memalign"};

static void *aligned(enum how how, size_t al, size_t n)
{
  void *p = NULL;
  int rc;
  switch (how) {
  case HOW_POSIX:
    rc = smalloc_posix_memalign(&p, al, n);
    SM_CHECK(rc == 0, "posix_memalign(%zu, %zu) returned %d", al, n, rc);
    return p;
  case HOW_ALIGNED_ALLOC:
    return smalloc_aligned_alloc(al, n);
  case HOW_MEMALIGN:
  default:
    return smalloc_memalign(al, n);
  }
}

static void release(enum how how, void *p, size_t al, size_t n)
{
  switch (how) {
  case HOW_POSIX:
    smalloc_free_sized(p, n);
    break;
  case HOW_ALIGNED_ALLOC:
    smalloc_free_aligned_sized(p, al, n);
    break;
  case HOW_MEMALIGN:
  default:
    smalloc_free(p);
    break;
  }
}

/* The waste an aligned request may carry: the alignment padding plus the
 * size-class rounding (under 1/8) of the padded request (and in the secure
 * layout the canary and the 16-byte minimum); beyond the largest class
 * (256 KiB) only a sanity bound. */
static size_t waste_bound(size_t al, size_t n)
{
  if (n <= 256 * KiB)
    return al + (n + al) / 8 + 16 + SM_TEST_EXTRA_WASTE;
  return al + n / 8 + 4 * MiB;
}

static void check_all_sizes(enum how how, size_t al)
{
  void *p[NSIZES];
  uint64_t seed[NSIZES];
  sm_interval_t iv[NSIZES];
  const char *fn = how_name[how];

  for (size_t i = 0; i < NSIZES; i++) {
    size_t n = sizes[i];
    p[i] = aligned(how, al, n);
    SM_CHECK(p[i] != NULL, "%s(%zu, %zu) returned NULL (errno %d)", fn, al, n, errno);
    SM_CHECK(sm_is_aligned(p[i], al), "%s(%zu, %zu) = %p", fn, al, n, p[i]);
    SM_CHECK(sm_is_aligned(p[i], 16), "%s(%zu, %zu) = %p not 16-byte aligned", fn, al,
             n, p[i]);
    size_t u = smalloc_malloc_usable_size(p[i]);
    SM_CHECK(u >= n, "%s(%zu, %zu): usable %zu", fn, al, n, u);
    SM_CHECK(u - n < waste_bound(al, n), "%s(%zu, %zu): usable %zu, waste bound %zu",
             fn, al, n, u, waste_bound(al, n));
    iv[i].lo = (uintptr_t)p[i];
    iv[i].hi = (uintptr_t)p[i] + u;
    seed[i] = sm_pattern_seed(p[i], al);
    sm_pattern_fill(p[i], n, seed[i]);
    ((unsigned char *)p[i])[u - 1] = 0x77; /* the whole usable size is ours */
  }
  size_t bad = sm_intervals_overlap(iv, NSIZES);
  SM_CHECK(bad == 0, "%s(%zu, *): [%#lx, %#lx) overlaps [%#lx, %#lx)", fn, al,
           (unsigned long)iv[bad].lo, (unsigned long)iv[bad].hi,
           (unsigned long)iv[bad - 1].lo, (unsigned long)iv[bad - 1].hi);
  for (size_t i = 0; i < NSIZES; i++) {
    size_t n = sizes[i];
    size_t u = smalloc_malloc_usable_size(p[i]);
    SM_CHECK(((unsigned char *)p[i])[u - 1] == 0x77, "%s(%zu, %zu): last byte", fn, al,
             n);
    /* the last usable byte may lie inside the requested size */
    if (u == n)
      ((unsigned char *)p[i])[u - 1] = sm_pattern_byte(seed[i], u - 1);
    bad = sm_pattern_find_bad(p[i], n, seed[i]);
    SM_CHECK(bad == SIZE_MAX, "%s(%zu, %zu): byte %zu changed", fn, al, n, bad);
    release(how, p[i], al, n);
  }
}

static void every_alignment(enum how how)
{
  uint64_t base = sm_blocks_in_use();
  for (size_t al = 1; al <= MAX_ALIGN; al *= 2) {
    if (how == HOW_POSIX && al < sizeof(void *)) {
      void *sentinel = (void *)(uintptr_t)0x1234, *q = sentinel;
      int rc = smalloc_posix_memalign(&q, al, 16);
      SM_CHECK(rc == EINVAL, "posix_memalign(%zu, 16) returned %d", al, rc);
      SM_CHECK(q == sentinel, "posix_memalign(%zu, 16) wrote *memptr", al);
      continue;
    }
    check_all_sizes(how, al);
  }
  ck_assert_uint_eq(sm_blocks_in_use(), base);
}

START_TEST(posix_memalign_every_alignment)
{
  every_alignment(HOW_POSIX);
}
END_TEST

START_TEST(aligned_alloc_every_alignment)
{
  every_alignment(HOW_ALIGNED_ALLOC);
}
END_TEST

START_TEST(memalign_every_alignment)
{
  every_alignment(HOW_MEMALIGN);
}
END_TEST

/* Many live blocks of one alignment: distinct, disjoint, aligned, and the
 * allocator keeps serving them from reused memory after they are freed. */
START_TEST(many_aligned_blocks)
{
  enum { N = 200 };
  static void *p[N];
  static sm_interval_t iv[N];
  uint64_t base = sm_blocks_in_use();
  for (size_t al = 16; al <= 64 * KiB; al *= 4) {
    for (int round = 0; round < 3; round++) {
      size_t n = round == 0 ? 8 : round == 1 ? al / 2 + 1 : al + 24;
      for (int i = 0; i < N; i++) {
        p[i] = smalloc_aligned_alloc(al, n);
        SM_CHECK(p[i] != NULL, "aligned_alloc(%zu, %zu) #%d", al, n, i);
        SM_CHECK(sm_is_aligned(p[i], al), "aligned_alloc(%zu, %zu) = %p", al, n, p[i]);
        size_t u = smalloc_malloc_usable_size(p[i]);
        SM_CHECK(u >= n, "aligned_alloc(%zu, %zu): usable %zu", al, n, u);
        iv[i].lo = (uintptr_t)p[i];
        iv[i].hi = iv[i].lo + u;
        memset(p[i], i, n);
      }
      size_t bad = sm_intervals_overlap(iv, N);
      SM_CHECK(bad == 0, "aligned_alloc(%zu, %zu): blocks overlap", al, n);
      for (int i = 0; i < N; i++) {
        size_t off = sm_find_not_byte(p[i], n, (unsigned char)i);
        SM_CHECK(off == SIZE_MAX, "aligned_alloc(%zu, %zu) #%d: byte %zu changed", al,
                 n, i, off);
        smalloc_free(p[i]);
      }
    }
  }
  ck_assert_uint_eq(sm_blocks_in_use(), base);
}
END_TEST

/* Mixed with plain mallocs of the same sizes, so aligned and unaligned
 * blocks share pages. */
START_TEST(aligned_and_plain_blocks_mix)
{
  enum { N = 2000 };
  static void *p[N];
  static size_t sz[N];
  static sm_interval_t iv[N];
  sm_rng_t r;
  sm_rng_seed(&r, 12345);
  uint64_t base = sm_blocks_in_use();
  for (int i = 0; i < N; i++) {
    sz[i] = sm_rng_range(&r, 1, 3000);
    size_t al = (size_t)1 << sm_rng_range(&r, 3, 12);
    if (i % 2)
      p[i] = smalloc_malloc(sz[i]);
    else
      p[i] = smalloc_memalign(al, sz[i]);
    SM_CHECK(p[i] != NULL, "allocation %d", i);
    SM_CHECK(i % 2 || sm_is_aligned(p[i], al), "memalign(%zu, %zu) = %p", al, sz[i],
             p[i]);
    iv[i].lo = (uintptr_t)p[i];
    iv[i].hi = iv[i].lo + smalloc_malloc_usable_size(p[i]);
    sm_pattern_fill(p[i], sz[i], sm_pattern_seed(p[i], 5));
  }
  size_t bad = sm_intervals_overlap(iv, N);
  SM_CHECK(bad == 0, "blocks overlap");
  for (int i = 0; i < N; i++) {
    SM_CHECK(sm_pattern_ok(p[i], sz[i], sm_pattern_seed(p[i], 5)), "block %d", i);
    smalloc_free(p[i]);
  }
  ck_assert_uint_eq(sm_blocks_in_use(), base);
}
END_TEST

int main(void)
{
  Suite *s = suite_create("align");
  TCase *tc = sm_tcase("alignments", 60);
  tcase_add_test(tc, posix_memalign_every_alignment);
  tcase_add_test(tc, aligned_alloc_every_alignment);
  tcase_add_test(tc, memalign_every_alignment);
  tcase_add_test(tc, many_aligned_blocks);
  tcase_add_test(tc, aligned_and_plain_blocks_mix);
  suite_add_tcase(s, tc);
  return sm_run_suite(s);
}
