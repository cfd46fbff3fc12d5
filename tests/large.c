/* Large and huge blocks are reused, not remapped: a freed mapping is kept
 * for the next request above the size classes, so steady replacement
 * makes no OS call after its first round (exact counters); kept memory is
 * purged after the purge delay and unmapped on request; and a block costs
 * about its size, so a program under an address-space limit can use
 * nearly all of it. */
#include "common.h"

#include <sched.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/sysinfo.h>

typedef struct lg_window {
  smalloc_stats_t s0, s1;
} lg_window_t;

#define LG_DELTA(w, f) ((w)->s1.f - (w)->s0.f)

static void lg_assert_no_os(const lg_window_t *w, const char *what)
{
#define LG_ZERO(f)                                                             \
  ck_assert_msg(LG_DELTA(w, f) == 0, "%s: %s grew by %llu", what, #f,          \
                (unsigned long long)LG_DELTA(w, f))
  LG_ZERO(os_mmap);
  LG_ZERO(os_munmap);
  LG_ZERO(os_madvise);
  LG_ZERO(os_mremap);
  LG_ZERO(segments_mapped);
#undef LG_ZERO
}

/* Rounds that each replace every one of `live` blocks by one of the same
 * size (sizes spread over lo..hi), writing every page; the window is the
 * rounds after the first. */
static void lg_replace(size_t live, size_t lo, size_t hi, unsigned rounds, lg_window_t *w)
{
  unsigned char *v[32];
  size_t sz[32];
  ck_assert_uint_le(live, 32);
  for (size_t i = 0; i < live; i++) {
    sz[i] = lo + (hi - lo) * i / (live - 1);
    v[i] = smalloc_malloc(sz[i]);
    ck_assert_ptr_nonnull(v[i]);
  }
  for (unsigned r = 0; r < rounds; r++) {
    if (r == 1)
      ck_assert_int_eq(sm_test_snap(&w->s0), 0);
    for (size_t k = 0; k < live; k++) {
      size_t i = (k * 7) % live;   /* not in allocation order */
      smalloc_free(v[i]);
      v[i] = smalloc_malloc(sz[i]);
      ck_assert_ptr_nonnull(v[i]);
      for (size_t o = 0; o < sz[i]; o += 4096)
        v[i][o] = (unsigned char)(o + r);
    }
  }
  ck_assert_int_eq(sm_test_snap(&w->s1), 0);
  for (size_t i = 0; i < live; i++)
    smalloc_free(v[i]);
}

/* 20 live blocks of 5-25 MiB */
START_TEST(huge_replacement_makes_no_os_calls)
{
  if (SM_TEST_SECURE)
    return;   /* the secure build keeps no huge mapping: a guard page ends each */
  lg_window_t w;
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 3600000), 0);
  lg_replace(20, 5 * MiB, 25 * MiB, 4, &w);
  lg_assert_no_os(&w, "huge replacement");
  ck_assert_uint_eq(LG_DELTA(&w, huge_allocs), 3 * 20);
  ck_assert_uint_eq(LG_DELTA(&w, huge_cache_hits), 3 * 20);
  ck_assert_uint_eq(LG_DELTA(&w, huge_cached), 3 * 20);
}
END_TEST

/* 8 live blocks of 300 KB, then 20 of 256 KiB-2 MiB: each has a mapping
 * of its own, which the cache keeps */
START_TEST(large_replacement_makes_no_os_calls)
{
  if (SM_TEST_SECURE)
    return;   /* the secure build keeps no mapping: a guard page ends each */
  lg_window_t w;
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 3600000), 0);
  lg_replace(8, 300 * 1000, 300 * 1000 + 7, 4, &w);
  lg_assert_no_os(&w, "300 KB replacement");
  ck_assert_uint_eq(LG_DELTA(&w, large_allocs), 3 * 8);
  ck_assert_uint_eq(LG_DELTA(&w, huge_cache_hits), 3 * 8);
  smalloc_collect(true);
  lg_replace(20, 256 * 1024 + 1, 2 * MiB, 4, &w);
  lg_assert_no_os(&w, "256 KiB-2 MiB replacement");
  ck_assert_uint_eq(LG_DELTA(&w, large_allocs), 3 * 20);
  ck_assert_uint_eq(LG_DELTA(&w, huge_cache_hits), 3 * 20);
}
END_TEST

/* ---- large blocks share segments (span.c) ----------------------------------
 * Blocks of 256 KiB-2 MiB take runs of 64 KiB units in shared 4 MiB
 * segments, advised for transparent huge pages before their first touch:
 * the first segment its upper half only, the next ones whole.  12 blocks
 * of 300 KB (5 units each, 63 units to a segment) map one segment, the
 * first (units 1-5) in its plain half, the last (units 56-60) in its
 * advised one; the 13th maps another, advised.  Not in the secure build
 * (a mapping each, ending in a guard page). */
enum { LG_UNIT = 64 * 1024, LG_300K = 300 * 1000 };

/* The same at SMALLOC_HUGEPAGES=level: at 2 (eager) the first segment is
 * advised whole, with the same one madvise. */
static void lg_share(long level)
{
  if (SM_TEST_SECURE)
    return;
  void *v[13];
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HUGEPAGES, level), 0);
  smalloc_collect(true);
  smalloc_stats_t a, b, c;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  for (int i = 0; i < 12; i++) {
    v[i] = smalloc_malloc(LG_300K);
    ck_assert_ptr_nonnull(v[i]);
    ck_assert_uint_eq(smalloc_malloc_usable_size(v[i]), 5 * LG_UNIT);
    ck_assert_uint_eq((uintptr_t)v[i] % LG_UNIT, 0);
  }
  ck_assert_int_eq(sm_test_snap(&b), 0);
  v[12] = smalloc_malloc(LG_300K);
  ck_assert_ptr_nonnull(v[12]);
  ck_assert_int_eq(sm_test_snap(&c), 0);
  /* (os_mmap may count a leaf of the segment map too, where a sanitizer
   * puts mappings far apart) */
  ck_assert_uint_eq(b.segments_mapped - a.segments_mapped, 1);
  ck_assert_uint_eq(b.os_madvise - a.os_madvise, 1);   /* MADV_HUGEPAGE, the upper half (eager: all) */
  ck_assert_uint_eq(c.os_madvise - b.os_madvise, 1);   /* MADV_HUGEPAGE, all of it */
  ck_assert(sm_test_vmflag(v[0], "hg") == (level == 2));
  ck_assert(sm_test_vmflag(v[11], "hg"));
  ck_assert(sm_test_vmflag(v[12], "hg"));
  ck_assert_uint_eq(b.huge_cache_hits - a.huge_cache_hits, 11);
  ck_assert_uint_eq(b.large_allocs - a.large_allocs, 12);
  ck_assert_uint_eq(b.bytes_in_use - a.bytes_in_use, 12 * 5 * LG_UNIT);
  ck_assert_uint_eq(c.segments_mapped - b.segments_mapped, 1);
  for (int i = 0; i < 12; i++)   /* all in one segment */
    ck_assert_uint_eq((uintptr_t)v[i] >> 22, (uintptr_t)v[0] >> 22);
  ck_assert_uint_ne((uintptr_t)v[12] >> 22, (uintptr_t)v[0] >> 22);
  for (int i = 0; i < 13; i++)
    smalloc_free(v[i]);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HUGEPAGES, 1), 0);
}

START_TEST(large_blocks_share_a_segment)
{
  lg_share(1);
}
END_TEST

/* SMALLOC_HUGEPAGES=0: segments of large blocks are mapped without
 * advice, the second one too. */
START_TEST(hugepages_off_gives_no_advice)
{
  if (SM_TEST_SECURE)
    return;
  void *v[13];
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HUGEPAGES, 0), 0);
  smalloc_collect(true);
  smalloc_stats_t a, b;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  for (int i = 0; i < 13; i++) {
    v[i] = smalloc_malloc(LG_300K);
    ck_assert_ptr_nonnull(v[i]);
  }
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_uint_eq(b.segments_mapped - a.segments_mapped, 2);
  ck_assert_uint_eq(b.os_madvise - a.os_madvise, 0);
  for (int i = 0; i < 13; i++)
    smalloc_free(v[i]);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HUGEPAGES, 1), 0);
}
END_TEST

/* SMALLOC_HUGEPAGES=2 (eager): the first segment of large blocks is
 * advised whole (lg_share); 3 is refused. */
START_TEST(eager_huge_pages_advise_the_first_large_segment_whole)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HUGEPAGES, 3), EINVAL);
  ck_assert_int_eq(smalloc_option_get(SMALLOC_OPTION_HUGEPAGES), 1);
  lg_share(2);
}
END_TEST

/* The shared segments, once they hold four of a kind, have their next
 * ones advised for huge pages before their first touch (one madvise
 * each), and the first four not: a thread of its own, its pages shared
 * ones (page.c: sm_page_borrow; the test's main thread took none, and
 * trim left no empty one), fills eight segments with 64-byte blocks (the
 * block that starts a ninth is freed at once).  Medium segments are
 * never advised (segment.c): the same fill with blocks of 200 KiB (the
 * thread's first four of them get mappings of their own, page.c:
 * sm_page_lends_large) gives no advice and no huge page.  With more
 * threads alive, the advice waits for a segment per thread: with six
 * (four idle ones, a block each), from the seventh; and, whatever the
 * threads, while the small pages are sparse (under 3/4 of their bytes
 * live blocks: see hp_sparse).  A segment that
 * gives memory back has the advice withdrawn ("nh": khugepaged would fill the hole
 * again), the others keep it.  Not in the secure build (its pages end in
 * guard pages), nor where the kernel has no huge pages. */
enum { HP_SEGS = 8, HP_BLOCK = 64, HP_IDLE_MAX = 4, HP_MEDIUM = 200 << 10, HP_LENT = 4 };
#define HP_MAX ((size_t)HP_SEGS * (4u << 20) / HP_BLOCK)
static size_t hp_size;
static void *hp_block[HP_MAX];
static size_t hp_first[HP_SEGS + 1];   /* hp_block index of each segment's first block */
static smalloc_stats_t hp_s[2];
static bool hp_advised[HP_SEGS], hp_withdrawn, hp_kept;
static const char *hp_fail;
static unsigned hp_from;               /* the first segment advised (HP_SEGS: none) */
static sm_test_phase_t hp_idle_ph = SM_TEST_PHASE_INIT;   /* 2: the idle threads go */
static _Atomic unsigned hp_idle_ready;

static void *hp_heap(void *arg)
{
  (void)arg;
  size_t n = 0;
  unsigned nseg = 0;
  /* a thread's first blocks of a larger medium class get mappings of
   * their own: taken before the fill (of a small class, they start it) */
  void *lent[HP_LENT];
  for (unsigned i = 0; i < HP_LENT; i++)
    lent[i] = smalloc_malloc(hp_size);
  hp_fail = sm_test_snap(&hp_s[0]) == 0 ? NULL : "stats";
  while (!hp_fail && n < HP_MAX) {
    void *p = smalloc_malloc(hp_size);
    if (p == NULL) {
      hp_fail = "malloc failed";
      break;
    }
    if (n == 0 || (uintptr_t)p >> 22 != (uintptr_t)hp_block[n - 1] >> 22) {
      for (unsigned i = 0; i < nseg; i++)
        if ((uintptr_t)p >> 22 == (uintptr_t)hp_block[hp_first[i]] >> 22)
          hp_fail = "a segment again after another";
      if (nseg == HP_SEGS) {
        smalloc_free(p);
        break;
      }
      hp_first[nseg++] = n;
    }
    hp_block[n++] = p;
  }
  hp_first[HP_SEGS] = n;
  if (!hp_fail && nseg < HP_SEGS)
    hp_fail = "too few segments";
  if (!hp_fail && sm_test_snap(&hp_s[1]) != 0)
    hp_fail = "stats";
  for (unsigned i = 0; i < HP_SEGS && !hp_fail; i++)
    hp_advised[i] = sm_test_vmflag(hp_block[hp_first[i]], "hg");
  if (!hp_fail && hp_from < HP_SEGS) {
    /* all but the first block of the first advised segment: its pages go back */
    size_t w = hp_from;
    for (size_t i = hp_first[w] + 1; i < hp_first[w + 1]; i++)
      smalloc_free(hp_block[i]);
    smalloc_collect(true);
    hp_withdrawn = sm_test_vmflag(hp_block[hp_first[w]], "nh") && !sm_test_vmflag(hp_block[hp_first[w]], "hg");
    hp_kept = sm_test_vmflag(hp_block[hp_first[w + 1]], "hg");
    for (size_t i = 0; i < n; i++)
      if (i <= hp_first[w] || i >= hp_first[w + 1])
        smalloc_free(hp_block[i]);
  } else {
    for (size_t i = 0; i < n; i++)
      smalloc_free(hp_block[i]);
  }
  for (unsigned i = 0; i < HP_LENT; i++)
    smalloc_free(lent[i]);
  return NULL;
}

/* A thread with a block (a page of the shared segments) that waits. */
static void *hp_idle(void *arg)
{
  (void)arg;
  void *p = smalloc_malloc(HP_BLOCK);
  atomic_fetch_add(&hp_idle_ready, 1);
  sm_test_phase_wait(&hp_idle_ph, 2);
  smalloc_free(p);
  return NULL;
}

/* What the fill found against what it should: NULL, or what differs. */
static const char *hp_verdict(void)
{
  static char why[96];
  if (hp_fail)
    return hp_fail;
  /* the segments from the first advised on, and the ninth, whose first
   * block ended the fill; not the first segment, mapped before the count
   * began (by the blocks taken before the fill) */
  uint64_t advised = hp_s[1].os_madvise - hp_s[0].os_madvise;
  unsigned want = hp_from < HP_SEGS ? HP_SEGS + 1 - (hp_from > 0 ? hp_from : 1) : 0;
  if (advised != want) {
    snprintf(why, sizeof why, "%llu segments advised, want %u", (unsigned long long)advised, want);
    return why;
  }
  for (unsigned i = 0; i < HP_SEGS; i++)
    if (hp_advised[i] != (i >= hp_from)) {
      snprintf(why, sizeof why, "segment %u: advised %d", i, hp_advised[i]);
      return why;
    }
  if (hp_from == HP_SEGS)
    return NULL;
  if (!hp_withdrawn)
    return "the advice of the segment that gave memory back is not withdrawn";
  if (!hp_kept)
    return "the next segment lost its advice";
  return NULL;
}

static bool hp_possible(void)
{
  return !SM_TEST_SECURE && access("/sys/kernel/mm/transparent_hugepage/enabled", F_OK) == 0;
}

/* Whether the kernel backs memory with huge pages unasked (THP "always"). */
static bool lg_thp_always(void)
{
  char buf[64] = {0};
  FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
  if (f == NULL)
    return false;
  if (fgets(buf, sizeof buf, f) == NULL)
    buf[0] = 0;
  fclose(f);
  return strstr(buf, "[always]") != NULL;
}

/* The fill on a thread of its own while `idle` threads wait with a block
 * each (the verdict: NULL, or what differs); first a trim, so that no
 * cached segment serves it (each one is mapped for the heap), unless the
 * process's first segments must keep their advice (a segment that gives
 * memory back loses it). */
static const char *hp_run(size_t size, unsigned idle, unsigned from, bool trim)
{
  hp_size = size;
  hp_from = from;
  hp_fail = NULL;
  atomic_store(&hp_idle_ready, 0);
  sm_test_phase_set(&hp_idle_ph, 1);
  pthread_t t, it[HP_IDLE_MAX];
  for (unsigned i = 0; i < idle; i++)
    if (pthread_create(&it[i], NULL, hp_idle, NULL) != 0)
      return "pthread_create failed";
  while (atomic_load(&hp_idle_ready) < idle)
    sched_yield();
  sm_test_heap_here();      /* the thread's pages are shared ones */
  if (trim)
    smalloc_collect(true);
  if (pthread_create(&t, NULL, hp_heap, NULL) != 0)
    return "pthread_create failed";
  pthread_join(t, NULL);
  sm_test_phase_set(&hp_idle_ph, 2);
  for (unsigned i = 0; i < idle; i++)
    pthread_join(it[i], NULL);
  return hp_verdict();
}

static void hp_check(size_t size, unsigned idle, unsigned from)
{
  if (!hp_possible())
    return;
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 3600000), 0);
  const char *verdict = hp_run(size, idle, from, true);
  ck_assert_msg(verdict == NULL, "%s", verdict);
}

/* The test program run again with argument mark, and var (NAME=value,
 * or NULL) in its environment; it says why it failed on its stderr. */
static void hp_run_again(const char *mark, const char *var)
{
  const char *argv[] = {"test_large", mark, NULL};
  const char *add[] = {"SMALLOC_BACKGROUND=0", var, NULL};
  (void)sm_test_rerun(argv, add, -1, -1);
}

/* A thread alone in its process fills segments of its own (page.c:
 * sm_page_borrow), and they too are advised from the fifth: the test
 * program run again (a process of one thread, whatever libcheck
 * started), the fill on its main thread, from the first segment it has
 * a free page in. */
#define HP_ALONE_MARK "--smalloc-large-alone"

static int hp_alone_main(void)
{
  smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 3600000);
  hp_size = HP_BLOCK;
  hp_from = 4;
  smalloc_collect(true);
  hp_heap(NULL);
  const char *verdict = hp_verdict();
  if (verdict)
    fprintf(stderr, "%s\n", verdict);
  return verdict ? 1 : 0;
}

START_TEST(a_thread_alone_gets_huge_pages_for_its_own_segments)
{
  if (hp_possible())
    hp_run_again(HP_ALONE_MARK, NULL);
}
END_TEST

/* SMALLOC_HUGEPAGES=2 (eager): every segment of small blocks from the
 * first, shared ones while idle threads live that make the fill wait for
 * a segment each at 1; medium segments still none.  The test program run
 * again with the option in its environment, so that the segments mapped
 * as it starts are advised too (memory mapped before a change keeps the
 * advice it got). */
#define HP_EAGER_MARK "--smalloc-large-eager"

static int hp_eager_main(void)
{
  if (smalloc_option_get(SMALLOC_OPTION_HUGEPAGES) != 2) {
    fprintf(stderr, "SMALLOC_HUGEPAGES=2 not taken\n");
    return 1;
  }
  smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 3600000);
  const char *verdict = hp_run(HP_BLOCK, HP_IDLE_MAX, 0, false);
  if (verdict == NULL)
    verdict = hp_run(HP_MEDIUM, 0, HP_SEGS, false);
  if (verdict)
    fprintf(stderr, "%s (blocks of %zu bytes)\n", verdict, hp_size);
  return verdict ? 1 : 0;
}

START_TEST(eager_huge_pages_advise_every_segment_of_small_blocks)
{
  if (hp_possible())
    hp_run_again(HP_EAGER_MARK, "SMALLOC_HUGEPAGES=2");
}
END_TEST

START_TEST(a_large_heap_of_small_blocks_gets_huge_pages)
{
  hp_check(HP_BLOCK, 0, 4);
}
END_TEST

START_TEST(a_large_heap_of_medium_blocks_gets_no_huge_pages)
{
  hp_check(HP_MEDIUM, 0, HP_SEGS);
}
END_TEST

START_TEST(many_threads_wait_longer_for_huge_pages)
{
  hp_check(HP_BLOCK, HP_IDLE_MAX, 6);
}
END_TEST

/* Pages that another thread keeps sparse hold the advice back: a thread
 * (its pages shared ones) carves HP_SPARSE_PAGES pages of 128-byte
 * blocks, keeps the first block of each, frees the rest and exits (its
 * pages wait in the pool, carved, with a block live each); the dense fill
 * that follows finds the small pages under 3/4 live (its 32 MiB of
 * 64-byte blocks beside 16 MiB of pages with a block each) and gets no
 * advice at all. */
enum { HP_SPARSE_SIZE = 128, HP_SPARSE_PAGES = 256, HP_SPARSE_ALL = HP_SPARSE_PAGES * (64 << 10) / HP_SPARSE_SIZE };
static void *hp_sparse_kept[HP_SPARSE_PAGES];
static unsigned hp_sparse_n;

/* The blocks are listed through their first word (an array of them
 * would add a MiB to every test's address space, which the tests under
 * a limit count); the list runs back through the pages. */
static void *hp_sparse(void *arg)
{
  (void)arg;
  void **list = NULL;
  for (size_t i = 0; i < HP_SPARSE_ALL; i++) {
    void **p = smalloc_malloc(HP_SPARSE_SIZE);
    if (p == NULL)
      break;
    *p = list;
    list = p;
  }
  uintptr_t page = 0;
  while (list != NULL) {
    void **next = *list;
    if ((uintptr_t)list >> 16 != page && hp_sparse_n < HP_SPARSE_PAGES) {
      page = (uintptr_t)list >> 16;
      hp_sparse_kept[hp_sparse_n++] = list;
    } else {
      smalloc_free(list);
    }
    list = next;
  }
  return NULL;
}

START_TEST(sparse_pages_of_another_thread_hold_back_huge_pages)
{
  if (!hp_possible())
    return;
  sm_test_heap_here();   /* a second heap: the sparse thread's pages are shared ones */
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, hp_sparse, NULL), 0);
  pthread_join(t, NULL);
  ck_assert_uint_ge(hp_sparse_n, HP_SPARSE_PAGES * 15 / 16);   /* pages 64 KiB apart, blocks in them */
  hp_check(HP_BLOCK, 0, HP_SEGS);
  for (unsigned i = 0; i < hp_sparse_n; i++)
    smalloc_free(hp_sparse_kept[i]);
}
END_TEST

/* With no purge delay, a freed block's units are purged at once with the
 * rest of the segment's free units (its unused tail, which may lie in a
 * huge page the blocks faulted in): two runs, 58 of its 63 units, while
 * the segment still holds another block; the last block freed, the
 * segment is unmapped. */
START_TEST(free_units_are_purged_and_empty_segments_unmapped)
{
  if (SM_TEST_SECURE)
    return;
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 0), 0);
  smalloc_collect(true);
  unsigned char *p = smalloc_malloc(LG_300K), *q = smalloc_malloc(LG_300K);
  ck_assert_ptr_nonnull(p);
  ck_assert_ptr_nonnull(q);
  ck_assert_uint_eq((uintptr_t)p >> 22, (uintptr_t)q >> 22);
  memset(p, 1, LG_300K);
  memset(q, 2, LG_300K);
  smalloc_stats_t a, b, c;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  smalloc_free(p);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  smalloc_free(q);
  ck_assert_int_eq(sm_test_snap(&c), 0);
  /* the runs; under THP "always", the advice against huge pages of the
   * half that keeps q (a_half_that_gives_memory_back_...) */
  ck_assert_uint_eq(b.os_madvise - a.os_madvise, 2 + lg_thp_always());
  ck_assert_uint_eq(b.bytes_purged - a.bytes_purged, 58 * LG_UNIT);
  ck_assert_uint_eq(a.bytes_committed - b.bytes_committed, 58 * LG_UNIT);
  ck_assert_uint_eq(b.os_munmap - a.os_munmap, 0);
  ck_assert_uint_eq(c.segments_unmapped - b.segments_unmapped, 1);
  ck_assert_uint_eq(c.os_munmap - b.os_munmap, 1);
  ck_assert_uint_eq(b.bytes_mapped - c.bytes_mapped, 4 * MiB);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 1000), 0);
}
END_TEST

/* A segment of large blocks advised for huge pages that gives memory back
 * beside a block (or its header) has the advice withdrawn from that half
 * ("nh"): khugepaged would fill the holes again, a whole huge page around
 * a single 4 KiB page in use.  A half left without a block keeps it
 * ("hg"), and its next block, faulting in the whole half, brings its
 * purged units back (committed, to be purged again).  Blocks of 7 units,
 * nine to a segment (units 1-63): the second segment, advised whole
 * (large_blocks_share_a_segment), gives back its second block (units
 * 8-14): the lower half is withdrawn, the upper one kept.  Then its last
 * five (29-63): one run, the upper half empty and kept.  A block of 14
 * units takes 29-42 and brings back 43-63 with them; purged again,
 * beside it, they withdraw the upper half. */
enum { LG_7U = 6 * LG_UNIT + LG_UNIT / 2, LG_14U = 13 * LG_UNIT + LG_UNIT / 2 };

START_TEST(a_segment_that_gives_memory_back_withdraws_its_huge_page_advice)
{
  if (!hp_possible())
    return;
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 3600000), 0);
  smalloc_collect(true);
  void *v[9], *w[9];
  for (int i = 0; i < 9; i++)
    ck_assert_ptr_nonnull(v[i] = smalloc_malloc(LG_7U));
  for (int i = 0; i < 9; i++) {
    ck_assert_ptr_nonnull(w[i] = smalloc_malloc(LG_7U));
    memset(w[i], 1, LG_7U);
  }
  uintptr_t seg = (uintptr_t)w[0] & ~(uintptr_t)(4 * MiB - 1);
  ck_assert_uint_ne(seg, (uintptr_t)v[0] & ~(uintptr_t)(4 * MiB - 1));
  for (int i = 0; i < 9; i++)
    ck_assert_uint_eq((uintptr_t)w[i], seg + (1 + 7 * (uintptr_t)i) * LG_UNIT);
  void *lower = (void *)(seg + LG_UNIT), *upper = (void *)(seg + 3 * MiB);
  ck_assert(sm_test_vmflag(lower, "hg"));
  ck_assert(sm_test_vmflag(upper, "hg"));

  smalloc_stats_t a, b, c, d, e;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  smalloc_free(w[1]);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 0), 0);
  smalloc_collect(false);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_uint_eq(b.bytes_purged - a.bytes_purged, 7 * LG_UNIT);
  ck_assert_uint_eq(b.os_madvise - a.os_madvise, 2);   /* the units; the half's advice */
  ck_assert(sm_test_vmflag(lower, "nh") && !sm_test_vmflag(lower, "hg"));
  ck_assert(sm_test_vmflag(upper, "hg") && !sm_test_vmflag(upper, "nh"));

  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 3600000), 0);
  for (int i = 4; i < 9; i++)
    smalloc_free(w[i]);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 0), 0);
  smalloc_collect(false);
  ck_assert_int_eq(sm_test_snap(&c), 0);
  ck_assert_uint_eq(c.bytes_purged - b.bytes_purged, 35 * LG_UNIT);
  ck_assert_uint_eq(c.os_madvise - b.os_madvise, 1);
  ck_assert(sm_test_vmflag(upper, "hg") && !sm_test_vmflag(upper, "nh"));

  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 3600000), 0);
  void *x = smalloc_malloc(LG_14U);
  ck_assert_ptr_eq(x, (void *)(seg + 29 * LG_UNIT));
  ck_assert_int_eq(sm_test_snap(&d), 0);
  ck_assert_uint_eq(d.bytes_committed - c.bytes_committed, 35 * LG_UNIT);
  memset(x, 1, LG_14U);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 0), 0);
  smalloc_collect(false);
  ck_assert_int_eq(sm_test_snap(&e), 0);
  ck_assert_uint_eq(e.bytes_purged - d.bytes_purged, 21 * LG_UNIT);
  ck_assert_uint_eq(d.bytes_committed - e.bytes_committed, 21 * LG_UNIT);
  ck_assert_uint_eq(e.os_madvise - d.os_madvise, 2);
  ck_assert(sm_test_vmflag(upper, "nh") && !sm_test_vmflag(upper, "hg"));
  ck_assert(sm_test_vmflag(lower, "nh"));

  smalloc_free(x);
  for (int i = 0; i < 9; i++)
    smalloc_free(v[i]);
  for (int i = 0; i < 4; i++)
    if (i != 1)
      smalloc_free(w[i]);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 1000), 0);
}
END_TEST

/* The lower half of the first segment of large blocks is not advised for
 * huge pages; but where the kernel backs memory with them unasked (THP
 * "always"), it too is advised against them when it purges units beside
 * a block, or khugepaged would fill it again: the second of two blocks
 * (units 6-10) freed and purged with the free units after it (one run,
 * 6-63), the first's half is advised against huge pages ("nh") exactly
 * under "always", with one more madvise. */
START_TEST(a_half_that_gives_memory_back_is_advised_against_huge_pages_under_thp_always)
{
  if (!hp_possible())
    return;
  bool always = lg_thp_always();
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 3600000), 0);
  smalloc_collect(true);
  void *p = smalloc_malloc(LG_300K), *q = smalloc_malloc(LG_300K);
  ck_assert_ptr_nonnull(p);
  ck_assert_ptr_eq(q, (char *)p + 5 * LG_UNIT);
  ck_assert_uint_eq((uintptr_t)p % (4 * MiB), LG_UNIT);
  memset(p, 1, LG_300K);
  memset(q, 1, LG_300K);
  smalloc_stats_t a, b;
  smalloc_free(q);
  ck_assert_int_eq(sm_test_snap(&a), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 0), 0);
  smalloc_collect(false);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_uint_eq(b.bytes_purged - a.bytes_purged, 58 * LG_UNIT);
  ck_assert_uint_eq(b.os_madvise - a.os_madvise, always ? 2 : 1);
  ck_assert_int_eq(sm_test_vmflag(p, "nh"), always);
  ck_assert(!sm_test_vmflag(p, "hg"));
  smalloc_free(p);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 1000), 0);
}
END_TEST

/* Units a freed block held serve the next block, old bytes and all:
 * calloc clears them; fresh units read as zero already. */
START_TEST(calloc_of_reused_units_is_zero)
{
  if (SM_TEST_SECURE)
    return;
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 3600000), 0);
  unsigned char *keep = smalloc_malloc(LG_300K);   /* the segment stays */
  unsigned char *p = smalloc_malloc(LG_300K);
  ck_assert_ptr_nonnull(keep);
  ck_assert_ptr_nonnull(p);
  memset(p, 0xa5, LG_300K);
  smalloc_free(p);
  smalloc_stats_t a, b;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  unsigned char *q = smalloc_calloc(1, LG_300K);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_ptr_eq(q, p);
  ck_assert_uint_eq(b.huge_cache_hits - a.huge_cache_hits, 1);
  ck_assert_uint_eq(b.os_mmap - a.os_mmap, 0);
  size_t bad = sm_find_not_byte(q, LG_300K, 0);
  ck_assert_msg(bad == SIZE_MAX, "calloc'd byte %zu is %#x", bad, q[bad]);
  smalloc_free(q);
  smalloc_free(keep);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 1000), 0);
}
END_TEST

/* realloc grows a large block into the free units after it (an eighth
 * more than asked, for the next step), without a copy or an OS call; once
 * those units are taken, it moves, contents kept. */
START_TEST(realloc_grows_a_large_block_in_place)
{
  if (SM_TEST_SECURE)
    return;
  smalloc_collect(true);
  unsigned char *p = smalloc_malloc(LG_300K);
  ck_assert_ptr_nonnull(p);
  uint64_t seed = sm_pattern_seed(p, 3);
  sm_pattern_fill(p, LG_300K, seed);
  smalloc_stats_t a, b;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  unsigned char *q = smalloc_realloc(p, 2 * LG_300K);   /* 10 units; 11 with the eighth */
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_ptr_eq(q, p);
  ck_assert_uint_eq(smalloc_malloc_usable_size(q), 11 * LG_UNIT);
  ck_assert_uint_eq(b.huge_remaps - a.huge_remaps, 1);
  ck_assert_uint_eq(b.os_mmap + b.os_mremap - a.os_mmap - a.os_mremap, 0);
  ck_assert_uint_eq(b.bytes_in_use - a.bytes_in_use, 6 * LG_UNIT);
  ck_assert(sm_pattern_ok(q, LG_300K, seed));
  unsigned char *next = smalloc_malloc(LG_300K);   /* the units right after it */
  ck_assert_ptr_eq(next, q + 11 * LG_UNIT);
  unsigned char *r = smalloc_realloc(q, 12 * LG_UNIT);
  ck_assert_ptr_nonnull(r);
  ck_assert_ptr_ne(r, q);
  ck_assert(sm_pattern_ok(r, LG_300K, seed));
  smalloc_free(r);
  smalloc_free(next);
}
END_TEST

/* realloc of a large block to a size no mapping can have fails with
 * ENOMEM and leaves the block as it was: its unit count (n / 64 KiB)
 * wrapped at 2^32 units, and a block of one unit took 2^48 + 4096 bytes
 * as "fitting" and came back unchanged (found by the fuzzer). */
START_TEST(realloc_of_a_large_block_to_an_impossible_size_fails)
{
  static const size_t absurd[] = {((size_t)1 << 48) + 4096, (size_t)3074457345618258602u};
  for (size_t i = 0; i < sizeof absurd / sizeof absurd[0]; i++) {
    unsigned char *p = smalloc_malloc(LG_300K);
    ck_assert_ptr_nonnull(p);
    uint64_t seed = sm_pattern_seed(p, 5);
    sm_pattern_fill(p, LG_300K, seed);
    size_t usable = smalloc_malloc_usable_size(p);
    errno = 0;
    ck_assert_ptr_null(smalloc_realloc(p, sm_opaque_size(absurd[i])));
    ck_assert_int_eq(errno, ENOMEM);
    ck_assert_uint_eq(smalloc_malloc_usable_size(p), usable);
    ck_assert(sm_pattern_ok(p, LG_300K, seed));
    smalloc_free(p);
  }
}
END_TEST

/* A huge block's mapping ends on a huge page (2 MiB) when that adds at
 * most 1 MiB, so that its tail can be one; with SMALLOC_HUGEPAGES=0, or
 * when rounding would add more, on the OS page. */
static size_t lg_usable_end(size_t n)
{
  void *p = smalloc_malloc(n);
  ck_assert_ptr_nonnull(p);
  size_t end = (uintptr_t)p + smalloc_malloc_usable_size(p);
  smalloc_free(p);
  return end;
}

START_TEST(huge_mappings_end_on_a_huge_page)
{
  if (SM_TEST_SECURE)
    return;   /* a guard page ends each mapping */
  /* rounded when that adds at most a quarter of the block: 7.5 MiB
   * (+0.5), 16.25 MiB (+1.75), 3.25 MiB (+0.75); not 6.25 MiB (+1.75),
   * 2.5 MiB (+1.5) */
  static const struct {
    size_t n;
    bool rounded;
  } c[] = {{7 * MiB + MiB / 2, true},  {16 * MiB + MiB / 4, true}, {3 * MiB + MiB / 4, true},
           {6 * MiB + MiB / 4, false}, {2 * MiB + MiB / 2, false}};
  for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
    smalloc_collect(true);   /* no kept mapping: each block is mapped afresh */
    size_t end = lg_usable_end(c[i].n);
    ck_assert_msg((end % (2 * MiB) == 0) == c[i].rounded, "%zu: ends at %#zx", c[i].n, end);
    ck_assert_uint_eq(end % 4096, 0);
  }
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HUGEPAGES, 0), 0);
  smalloc_collect(true);
  size_t end = lg_usable_end(7 * MiB + MiB / 2);
  ck_assert_uint_ne(end % (2 * MiB), 0);
  ck_assert_uint_eq(end % 4096, 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HUGEPAGES, 1), 0);
}
END_TEST

/* A mapping of its own is advised for huge pages from a block of 2 MiB
 * on (3 MiB here), and so is a block that grows past 2 MiB from below
 * (1 MiB aligned to 128 KiB, which is not packed with the other large
 * blocks); a block under 2 MiB is not.  Not in the secure build, nor
 * where the kernel has no huge pages. */
START_TEST(huge_mappings_are_advised_from_2_mib)
{
  if (SM_TEST_SECURE || access("/sys/kernel/mm/transparent_hugepage/enabled", F_OK) != 0)
    return;
  smalloc_collect(true);
  void *p = smalloc_malloc(3 * MiB);
  ck_assert_ptr_nonnull(p);
  ck_assert(sm_test_vmflag(p, "hg"));
  smalloc_free(p);
  smalloc_collect(true);
  p = smalloc_aligned_alloc(128 * 1024, MiB);
  ck_assert_ptr_nonnull(p);
  ck_assert(!sm_test_vmflag(p, "hg"));
  p = smalloc_realloc(p, 8 * MiB);
  ck_assert_ptr_nonnull(p);
  ck_assert(sm_test_vmflag(p, "hg"));
  smalloc_free(p);
}
END_TEST

/* A reused mapping holds the old block's bytes: calloc clears them. */
START_TEST(calloc_of_a_reused_huge_block_is_zero)
{
  if (SM_TEST_SECURE)
    return;   /* the secure build keeps no huge mapping: a guard page ends each */
  enum { N = 9 * 1024 * 1024 };
  unsigned char *p = smalloc_malloc(N);
  ck_assert_ptr_nonnull(p);
  memset(p, 0xa5, N);
  smalloc_free(p);
  smalloc_stats_t a, b;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  unsigned char *q = smalloc_calloc(1, N);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_ptr_nonnull(q);
  ck_assert_uint_eq(b.huge_cache_hits - a.huge_cache_hits, 1);
  ck_assert_uint_eq(b.os_mmap - a.os_mmap, 0);
  size_t bad = sm_find_not_byte(q, N, 0);
  ck_assert_msg(bad == SIZE_MAX, "calloc'd byte %zu is %#x", bad, q[bad]);
  smalloc_free(q);
}
END_TEST

/* Kept mappings are purged after the delay (here 0: at once) and unmapped
 * by malloc_trim; a stale pointer into a kept mapping is no block. */
START_TEST(kept_huge_mappings_are_purged_then_trimmed)
{
  if (SM_TEST_SECURE)
    return;   /* the secure build keeps no huge mapping: a guard page ends each */
  enum { N = 12 * 1024 * 1024 };
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 0), 0);
  smalloc_malloc_trim(0);
  smalloc_stats_t a, b, c;
  unsigned char *p = smalloc_malloc(N);
  ck_assert_ptr_nonnull(p);
  memset(p, 1, N);
  ck_assert_int_eq(sm_test_snap(&a), 0);
  smalloc_free(p);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_uint_eq(b.huge_cached - a.huge_cached, 1);
  ck_assert_uint_eq(b.os_munmap - a.os_munmap, 0);
  ck_assert_uint_eq(b.os_madvise - a.os_madvise, 1);
  ck_assert_uint_ge(b.bytes_purged - a.bytes_purged, N);
  ck_assert_uint_le(b.bytes_committed + N, a.bytes_committed);
  ck_assert_uint_eq(b.bytes_mapped, a.bytes_mapped);
  ck_assert_int_eq(smalloc_malloc_trim(0), 1);
  ck_assert_int_eq(sm_test_snap(&c), 0);
  ck_assert_uint_eq(c.os_munmap - b.os_munmap, 1);
  ck_assert_uint_le(c.bytes_mapped + N, b.bytes_mapped);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_PURGE_DELAY, 1000), 0);
}
END_TEST

/* ---- under an address-space limit ------------------------------------------- */

/* A small program under `ulimit -v 262144`: the test process maps about
 * 12 MiB of its own (libraries, stacks; more under UndefinedBehaviorSanitizer),
 * so the limit is what it maps plus LG_HEADROOM, 256 MiB less those 12.  A
 * block above the size classes costs its size rounded to the OS page (a
 * few hundred bytes of header included), so 300 KB blocks fill at least
 * 200 MiB and 1 MiB blocks at least 230 MiB (with a 4 MiB segment per
 * block, 16 MiB).  smalloc itself must map little up front: a flat 32 MiB
 * segment map made the process map 44 MiB before its first malloc.  Not
 * under ASan or TSan, whose runtimes reserve terabytes. */
#define LG_HEADROOM (244 * MiB)
#define LG_MAPPED_MAX (32 * MiB)

static void lg_fill_under_limit(size_t size, size_t want)
{
  enum { MAX = 4096 };
  void **v = mmap(NULL, MAX * sizeof *v, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  SM_CHILD_CHECK(v != MAP_FAILED, "mmap: %s", strerror(errno));
  size_t vm = sm_test_vm_bytes();
  SM_CHILD_CHECK(vm < LG_MAPPED_MAX, "the test process maps %zu MiB before the limit", vm / MiB);
  struct rlimit rl = {vm + LG_HEADROOM, vm + LG_HEADROOM};
  SM_CHILD_CHECK(setrlimit(RLIMIT_AS, &rl) == 0, "setrlimit: %s", strerror(errno));
  size_t n = 0;
  errno = 0;
  while (n < MAX && (v[n] = smalloc_malloc(size)) != NULL) {
    memset(v[n], 0x5a, 64);
    n++;
  }
  SM_CHILD_CHECK(n < MAX && errno == ENOMEM, "%zu blocks, errno %d", n, errno);
  SM_CHILD_CHECK(n * size >= want, "%zu-byte blocks: %zu MiB of %zu MiB of head room, want %zu",
                 size, n * size / MiB, LG_HEADROOM / MiB, want / MiB);
  for (size_t i = 0; i < n; i++)
    smalloc_free(v[i]);
}

/* A buffer grown by realloc under the limit reaches nearly all of it, as
 * with the C library: the move of a huge block counts only its growth
 * against the limit (plus 4 MiB to align it), not old and new together,
 * which stopped at 120 MiB of the 244.  The bound leaves that 4 MiB, a
 * step, and 12 MiB for what the process maps besides.  The bytes move
 * with the block, and the last, refused step leaves it as it was. */
static void lg_realloc_under_limit(void)
{
  size_t vm = sm_test_vm_bytes();
  SM_CHILD_CHECK(vm < LG_MAPPED_MAX, "the test process maps %zu MiB before the limit", vm / MiB);
  struct rlimit rl = {vm + LG_HEADROOM, vm + LG_HEADROOM};
  SM_CHILD_CHECK(setrlimit(RLIMIT_AS, &rl) == 0, "setrlimit: %s", strerror(errno));
  const size_t step = 8 * MiB;
  unsigned char *p = NULL, *q;
  size_t n = 0;
  errno = 0;
  while ((q = smalloc_realloc(p, n + step)) != NULL) {
    for (size_t i = 0; i < n; i += 4096)
      SM_CHILD_CHECK(q[i] == (unsigned char)(i / step + 1), "byte %zu of %zu MiB changed", i, n / MiB);
    for (size_t i = n; i < n + step; i += 4096)
      q[i] = (unsigned char)(i / step + 1);
    p = q;
    n += step;
  }
  SM_CHILD_CHECK(errno == ENOMEM, "errno %d", errno);
  SM_CHILD_CHECK(n >= LG_HEADROOM - 4 * MiB - step - 12 * MiB, "grew to %zu MiB of %zu MiB of head room",
                 n / MiB, LG_HEADROOM / MiB);
  for (size_t i = 0; i < n; i += 4096)
    SM_CHILD_CHECK(p[i] == (unsigned char)(i / step + 1), "byte %zu changed by the refused step", i);
  smalloc_free(p);
}

static void lg_limit_300k(void) { lg_fill_under_limit(300 * 1000, 200 * MiB); }
static void lg_limit_1m(void) { lg_fill_under_limit(MiB, 230 * MiB); }
/* blocks above 2 MiB cost their size rounded to the page, not to a huge
 * page as they may without a limit (up to a quarter more): 8 MiB + 1
 * fill 29 or 30 blocks (232 MiB and more), 24 when rounded to 10 MiB */
static void lg_limit_8m(void) { lg_fill_under_limit(8 * MiB + 1, 220 * MiB); }

START_TEST(large_blocks_fill_an_address_space_limit)
{
  if (SM_TEST_SANITIZED)
    return;
  sm_test_in_child(lg_limit_300k);
  sm_test_in_child(lg_limit_1m);
}
END_TEST

/* smalloc keeps its reading of the limit for 100 ms, where a huge block
 * asks for it on every call; the child of a fork reads it again, and sees
 * the limit it sets, though the parent has just read that there is none
 * (the huge block below). */
START_TEST(huge_blocks_fill_an_address_space_limit)
{
  if (SM_TEST_SANITIZED)
    return;
  void *p = smalloc_malloc(8 * MiB + 1);
  ck_assert_ptr_nonnull(p);
  smalloc_free(p);
  smalloc_collect(true);   /* its kept mapping would count against the child's limit */
  sm_test_in_child(lg_limit_8m);
}
END_TEST

START_TEST(realloc_grows_a_huge_block_to_an_address_space_limit)
{
  /* the secure build copies a huge block that grows (its guard page is
   * a mapping of its own, which mremap would not move with it) */
  if (SM_TEST_SANITIZED || SM_TEST_SECURE)
    return;
  sm_test_in_child(lg_realloc_under_limit);
}
END_TEST

/* A request for more than the machine's memory and swap fails at once with
 * ENOMEM, as with the C library, where the kernel checks what a mapping
 * commits (overcommit_memory 0, the default, or 2): a program that asks
 * for an absurd size to see whether it can have it must not get a block
 * that the OOM killer stops it for when it writes it.  Also realloc. */
START_TEST(a_request_beyond_memory_and_swap_fails)
{
  FILE *f = fopen("/proc/sys/vm/overcommit_memory", "r");
  int mode = -1;
  if (f) {
    if (fscanf(f, "%d", &mode) != 1)
      mode = -1;
    fclose(f);
  }
  struct sysinfo si;
  ck_assert_int_eq(sysinfo(&si), 0);
  unsigned long long all = ((unsigned long long)si.totalram + si.totalswap) * si.mem_unit;
  size_t size = (size_t)(2 * all) & ~(size_t)4095;
  if (mode == 1 || size == 0 || size > ((size_t)1 << 44))
    return;   /* the kernel grants any mapping, or the address space would refuse it anyway */
  errno = 0;
  ck_assert_ptr_null(smalloc_malloc(size));
  ck_assert_int_eq(errno, ENOMEM);
  errno = 0;
  ck_assert_ptr_null(smalloc_calloc(1, size));
  ck_assert_int_eq(errno, ENOMEM);
  unsigned char *p = smalloc_malloc(64 * MiB);
  ck_assert_ptr_nonnull(p);
  p[0] = 0x5a;
  errno = 0;
  ck_assert_ptr_null(smalloc_realloc(p, size));
  ck_assert_int_eq(errno, ENOMEM);
  ck_assert_int_eq(p[0], 0x5a);
  smalloc_free(p);
}
END_TEST

static Suite *large_suite(void)
{
  Suite *s = suite_create("large");
  TCase *tc = sm_tcase("large", 300);
  tcase_add_test(tc, huge_replacement_makes_no_os_calls);
  tcase_add_test(tc, large_replacement_makes_no_os_calls);
  tcase_add_test(tc, calloc_of_a_reused_huge_block_is_zero);
  tcase_add_test(tc, large_blocks_share_a_segment);
  tcase_add_test(tc, hugepages_off_gives_no_advice);
  tcase_add_test(tc, a_large_heap_of_small_blocks_gets_huge_pages);
  tcase_add_test(tc, a_large_heap_of_medium_blocks_gets_no_huge_pages);
  tcase_add_test(tc, many_threads_wait_longer_for_huge_pages);
  tcase_add_test(tc, sparse_pages_of_another_thread_hold_back_huge_pages);
  tcase_add_test(tc, a_thread_alone_gets_huge_pages_for_its_own_segments);
  tcase_add_test(tc, eager_huge_pages_advise_the_first_large_segment_whole);
  tcase_add_test(tc, eager_huge_pages_advise_every_segment_of_small_blocks);
  tcase_add_test(tc, huge_mappings_end_on_a_huge_page);
  tcase_add_test(tc, huge_mappings_are_advised_from_2_mib);
  tcase_add_test(tc, free_units_are_purged_and_empty_segments_unmapped);
  tcase_add_test(tc, a_segment_that_gives_memory_back_withdraws_its_huge_page_advice);
  tcase_add_test(tc, a_half_that_gives_memory_back_is_advised_against_huge_pages_under_thp_always);
  tcase_add_test(tc, calloc_of_reused_units_is_zero);
  tcase_add_test(tc, realloc_grows_a_large_block_in_place);
  tcase_add_test(tc, realloc_of_a_large_block_to_an_impossible_size_fails);
  tcase_add_test(tc, kept_huge_mappings_are_purged_then_trimmed);
  tcase_add_test(tc, large_blocks_fill_an_address_space_limit);
  tcase_add_test(tc, huge_blocks_fill_an_address_space_limit);
  tcase_add_test(tc, realloc_grows_a_huge_block_to_an_address_space_limit);
  tcase_add_test(tc, a_request_beyond_memory_and_swap_fails);
  suite_add_tcase(s, tc);
  return s;
}

int main(int argc, char **argv)
{
  if (argc == 2 && strcmp(argv[1], HP_ALONE_MARK) == 0)
    return hp_alone_main();
  if (argc == 2 && strcmp(argv[1], HP_EAGER_MARK) == 0)
    return hp_eager_main();
  return sm_run_suite(large_suite());
}
