/* Memory a thread has freed belongs to the process: another thread can
 * use it, malloc_trim from any thread gives it back, and an allocation the
 * OS refuses first collects it (page.c, "Who owns free memory").
 *
 * The tests that need an address-space limit run in a child process of
 * their own with RLIMIT_AS set to its current size plus SH_LIMIT, so the
 * limit binds on the heap and nothing else (sm_test_in_child, common.h). */
#include "common.h"

#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/resource.h>

#define SH_LIMIT (256 * MiB)
/* What a refill after free-all may fall short of the first fill under the
 * same limit: two segments' worth of address space.  The limit binds at a
 * segment (4 MiB) boundary, and a sanitizer runtime maps memory of its own
 * under the same limit (ThreadSanitizer about 4 MiB for this test).
 * Without the collection the shortfall is over 98 %. */
#define SH_SLACK (8 * MiB)


/* ---- a child under an address-space limit ---------------------------------- */


/* Set the limit: the address space in use now plus SH_LIMIT. */
static void sh_limit(void)
{
  struct rlimit rl;
  rl.rlim_cur = rl.rlim_max = sm_test_vm_bytes() + SH_LIMIT;
  SM_CHILD_CHECK(setrlimit(RLIMIT_AS, &rl) == 0, "setrlimit: %s", strerror(errno));
}

/* Pointers for a fill, mapped before the limit is set. */
static void **sh_ptrs(size_t n)
{
  void **v = mmap(NULL, n * sizeof *v, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  SM_CHILD_CHECK(v != MAP_FAILED, "mmap: %s", strerror(errno));
  return v;
}

/* malloc(size) until NULL or max blocks; returns the count. */
static size_t sh_fill(void **v, size_t max, size_t size)
{
  size_t n = 0;
  while (n < max && (v[n] = smalloc_malloc(size)) != NULL) {
    memset(v[n], 0x5a, size < 64 ? size : 64);
    n++;
  }
  return n;
}

static void sh_free_all(void **v, size_t n)
{
  for (size_t i = 0; i < n; i++)
    smalloc_free(v[i]);
}

/* Bytes of blocks of a class that one segment holds (in either layout: the
 * secure one gives each page's last 4 KiB to a guard). */
static size_t sh_segment_bytes(size_t block)
{
  size_t pages = 4 * MiB / sm_test_page_size(block), n = 0;
  for (size_t i = 0; i < pages; i++)
    n += sm_test_page_capacity(block, i);
  return n * block;
}

enum { SH_BIG = SM_TEST_REQUEST_FOR(4096), SH_SMALL = SM_TEST_REQUEST_FOR(64) };

/* The bytes of `small`-class blocks that fit where `from` bytes of
 * `big`-class blocks were. */
static size_t sh_same_room(size_t from, size_t big, size_t small)
{
  return (size_t)((double)from * sh_segment_bytes(small) / sh_segment_bytes(big));
}

/* ---- an idle thread's freed memory serves another thread ------------------ */

typedef struct sh_idle {
  sm_test_phase_t ph;   /* 0 wait, 1 go, 2 filled and freed, 3 exit */
  void **v;
  size_t max, size, n;
  smalloc_stats_t s0, s1;   /* around the worker's frees */
} sh_idle_t;

static sh_idle_t sh_idle = {SM_TEST_PHASE_INIT, NULL, 0, 0, 0, {0}, {0}};

static void sh_set_phase(int phase)
{
  sm_test_phase_set(&sh_idle.ph, phase);
}

static void sh_wait_phase(int phase)
{
  sm_test_phase_wait(&sh_idle.ph, phase);
}

/* Fills sh_idle.v with up to sh_idle.max blocks of sh_idle.size bytes
 * (until malloc fails, under a limit), frees them all, then waits (alive,
 * idle) until told to exit. */
static void *sh_idle_worker(void *arg)
{
  (void)arg;
  sh_wait_phase(1);
  sh_idle.n = sh_fill(sh_idle.v, sh_idle.max, sh_idle.size);
  sm_test_snap(&sh_idle.s0);
  sh_free_all(sh_idle.v, sh_idle.n);
  sm_test_snap(&sh_idle.s1);
  sh_set_phase(2);
  sh_wait_phase(3);
  return NULL;
}

static void sh_idle_body(void)
{
  sh_idle.max = SH_LIMIT / 4096;
  sh_idle.size = SH_BIG;
  sh_idle.v = sh_ptrs(sh_idle.max);
  size_t max64 = SH_LIMIT / 64;
  void **w = sh_ptrs(max64);
  pthread_t t;
  SM_CHILD_CHECK(pthread_create(&t, NULL, sh_idle_worker, NULL) == 0, "pthread_create failed");
  sh_limit();
  sh_set_phase(1);
  sh_wait_phase(2);
  SM_CHILD_CHECK(sh_idle.n > SH_LIMIT / 4096 / 2, "the worker got only %zu blocks of 4 KiB", sh_idle.n);

  /* as much again (as many segments), in 64-byte blocks, from this thread */
  smalloc_stats_t a, b;
  sm_test_snap(&a);
  size_t want = sh_same_room(sh_idle.n * 4096, 4096, 64) / 64;
  size_t got = sh_fill(w, want, SH_SMALL);
  sm_test_snap(&b);
  SM_CHILD_CHECK(got * 64 + SH_SLACK >= want * 64, "malloc(64) returned NULL after %zu of %zu blocks "
           "(%zu of the idle worker's %zu KiB)", got, want, got * 64 / 1024, sh_idle.n * 4);
  /* the worker's retired pages were taken from its heap, all of them and
   * exactly once */
  uint64_t retired = sh_idle.s1.pages_retired - sh_idle.s0.pages_retired;
  SM_CHILD_CHECK(retired > 0, "the worker retired no page");
  SM_CHILD_CHECK(b.pages_claimed - a.pages_claimed == retired,
           "%llu pages claimed, the idle worker retired %llu",
           (unsigned long long)(b.pages_claimed - a.pages_claimed), (unsigned long long)retired);
  SM_CHILD_CHECK(b.oom_collects > a.oom_collects, "no allocation was refused by the OS");
  sh_free_all(w, got);
  sh_set_phase(3);
  pthread_join(t, NULL);
}

START_TEST(idle_threads_memory_serves_another_thread)
{
#if SM_TEST_TSAN
  /* ThreadSanitizer maps memory of its own as threads run, under the same
   * limit, and exits 66 without a word when it cannot; the claims this
   * test makes run under it in trim_from_main_releases_idle_workers_pages
   * and the background suite. */
  return;
#endif
  sm_test_in_child(sh_idle_body);
}
END_TEST

/* ---- the same thread, another size, after freeing everything -------------- */

static void sh_sizes_body(void)
{
  size_t max64 = SH_LIMIT / 64;
  void **v = sh_ptrs(max64);
  sh_limit();
  size_t n64 = sh_fill(v, max64, SH_SMALL);
  SM_CHILD_CHECK(n64 > max64 / 2, "only %zu blocks of 64 bytes under a 256 MiB limit", n64);
  sh_free_all(v, n64);
  size_t bytes = n64 * 64;

  /* as much in 4 KiB blocks (as many segments): not one NULL */
  size_t room = sh_same_room(bytes, 64, 4096);
  size_t want = room / 4096;
  size_t got = sh_fill(v, want, SH_BIG);
  SM_CHILD_CHECK(got * 4096 + SH_SLACK >= room, "after freeing %zu KiB of 64-byte blocks, "
           "malloc(4096) returned NULL after %zu of %zu", bytes / 1024, got, want);
  sh_free_all(v, got);

  /* 1 MiB blocks take a segment each (4 MiB of address space) */
  want = (bytes - SH_SLACK) / (4 * MiB);
  got = sh_fill(v, want, MiB);
  SM_CHILD_CHECK(got == want, "after freeing, malloc(1 MiB) returned NULL after %zu of %zu", got, want);
  sh_free_all(v, got);

  /* and the first size again */
  got = sh_fill(v, n64, SH_SMALL);
  SM_CHILD_CHECK(got * 64 + SH_SLACK >= bytes, "malloc(64) returned NULL after %zu of the %zu blocks "
           "it served before", got, n64);
  sh_free_all(v, got);
}

START_TEST(same_thread_other_sizes_after_free_all)
{
#if SM_TEST_TSAN
  /* One thread, nothing for ThreadSanitizer to check; and under the
   * limit it can starve the runtime's own mappings (see above). */
  return;
#endif
  sm_test_in_child(sh_sizes_body);
}
END_TEST

/* ---- free pages of segments that keep a live block ------------------------ */

/* 4 KiB blocks fill the limit, and all are freed but the first of each
 * segment: every segment stays, and so would the address space of its
 * free pages, given back with madvise but still mapped (the limit counts
 * mappings).  The first huge block the OS refuses unmaps them, and the
 * program gets nearly all it freed back in huge blocks; then, the huge
 * blocks freed, in 4 KiB blocks again, from the same pages mapped anew,
 * the live blocks untouched. */
enum { SH_HUGE = 3 * MiB, SH_SEGS = SH_LIMIT / (4 * MiB) + 8 };
static void sh_holes_body(void)
{
  size_t max = SH_LIMIT / 4096;
  void **v = sh_ptrs(max), **w = sh_ptrs(max);
  sh_limit();
  size_t n = sh_fill(v, max, SH_BIG);
  SM_CHILD_CHECK(n > max / 2, "only %zu blocks of 4 KiB under a 256 MiB limit", n);
  size_t psize = sm_test_page_size(4096);
  uintptr_t segs[SH_SEGS];
  unsigned char *keep[SH_SEGS];
  uint64_t used[SH_SEGS];   /* bit i: page i of the segment held blocks */
  size_t nsegs = 0, freed = 0, hole_pages = 0;
  for (size_t i = 0; i < n; i++) {
    uintptr_t seg = (uintptr_t)v[i] >> 22;
    size_t k = 0;
    while (k < nsegs && segs[k] != seg)
      k++;
    uint64_t bit = (uint64_t)1 << ((uintptr_t)v[i] % (4 * MiB) / psize);
    if (k == nsegs) {
      SM_CHILD_CHECK(nsegs < SH_SEGS, "more than %d segments", (int)SH_SEGS);
      segs[nsegs] = seg;
      used[nsegs] = bit;
      keep[nsegs++] = v[i];
    } else {
      used[k] |= bit;
      smalloc_free(v[i]);
      freed++;
    }
  }
  /* the pages that hold no kept block: free, their segments not */
  for (size_t k = 0; k < nsegs; k++)
    hole_pages += (size_t)__builtin_popcountll(used[k] & ~((uint64_t)1 << ((uintptr_t)keep[k] % (4 * MiB) / psize)));
  size_t room = hole_pages * psize;
  SM_CHILD_CHECK(room >= SH_LIMIT / 2, "%zu free pages of %zu KiB in %zu segments", hole_pages,
                 psize / 1024, nsegs);
  size_t got = sh_fill(w, max, SH_HUGE);
  SM_CHILD_CHECK((got + 1) * SH_HUGE + SH_SLACK >= room,
                 "%zu free pages (%zu MiB) in %zu segments that keep a block each, and "
                 "malloc(%d MiB) returned NULL after %zu", hole_pages, room / MiB, nsegs,
                 (int)(SH_HUGE / MiB), got);
  sh_free_all(w, got);

  /* Holes taken by mappings of the program's: in a segment that stays
   * (its page is never used again), and in segments that then empty,
   * until one is given back (around the hole; a segment also holds
   * blocks that others allocated, the test framework's). */
  enum { SH_TAKEN = 8 };
  unsigned char *taken[SH_TAKEN];
  size_t ntaken = 0;
  bool emptied = false;
  for (size_t k = 0; k < nsegs && !emptied && ntaken < SH_TAKEN; k++) {
    uint64_t free_pages = used[k] & ~(uint64_t)1 & ~((uint64_t)1 << ((uintptr_t)keep[k] % (4 * MiB) / psize));
    if (free_pages == 0)
      continue;
    unsigned char *seg = (unsigned char *)(segs[k] << 22);
    unsigned char *at = seg + (size_t)__builtin_ctzll(free_pages) * psize;
    taken[ntaken] = mmap(at, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    SM_CHILD_CHECK(taken[ntaken] == at, "the free page at %p is still mapped (mmap: %p, %s)", (void *)at,
                   (void *)taken[ntaken], strerror(errno));
    memset(taken[ntaken], 0xc3 + (int)ntaken, 4096);
    if (ntaken++ == 0)
      continue;   /* the first one's segment stays */
    smalloc_free(keep[k]);
    keep[k] = NULL;
    smalloc_collect(true);
    emptied = msync(seg, 4096, MS_ASYNC) == -1 && errno == ENOMEM;
  }
  SM_CHILD_CHECK(emptied, "none of %zu segments went back once emptied", ntaken - 1);

  size_t again = sh_fill(w, max, SH_BIG);
  SM_CHILD_CHECK(again + SH_SLACK / 4096 >= freed, "malloc(4096) returned NULL after %zu "
                 "of the %zu blocks it served before", again, freed);
  for (size_t i = 0; i < again; i++)
    for (size_t t = 0; t < ntaken; t++)
      SM_CHILD_CHECK((unsigned char *)w[i] + 4096 <= taken[t] || (unsigned char *)w[i] >= taken[t] + 4096,
                     "malloc(4096) = %p, over the program's mapping at %p", w[i], (void *)taken[t]);
  for (size_t k = 0; k < nsegs; k++)
    for (size_t j = 0; keep[k] && j < 64; j++)
      SM_CHILD_CHECK(keep[k][j] == 0x5a, "live block %p changed", (void *)keep[k]);
  sh_free_all(w, again);
  for (size_t k = 0; k < nsegs; k++)
    smalloc_free(keep[k]);
  smalloc_collect(true);
  for (size_t t = 0; t < ntaken; t++)
    for (size_t j = 0; j < 4096; j++)
      SM_CHILD_CHECK(taken[t][j] == (unsigned char)(0xc3 + t), "the program's mapping at %p changed",
                     (void *)taken[t]);
}

START_TEST(free_pages_give_back_their_address_space_under_a_limit)
{
#if SM_TEST_TSAN
  return;   /* one thread; the limit can starve the runtime (see above) */
#endif
  sm_test_in_child(sh_holes_body);
}
END_TEST

/* ---- posix_memalign leaves errno as glibc does ---------------------------- */

static void sh_memalign_body(void)
{
  sh_limit();
  void *p = (void *)1;
  errno = 0;
  int rc = smalloc_posix_memalign(&p, 64, 2 * SH_LIMIT);
  SM_CHILD_CHECK(rc == ENOMEM, "posix_memalign under a limit returned %d", rc);
  SM_CHILD_CHECK(errno == ENOMEM, "posix_memalign failed with ENOMEM but errno is %d", errno);
  SM_CHILD_CHECK(p == (void *)1, "posix_memalign changed *memptr on failure");
  errno = EINTR;
  rc = smalloc_posix_memalign(&p, 64, 100);
  SM_CHILD_CHECK(rc == 0 && errno == EINTR, "a successful posix_memalign changed errno to %d", errno);
  smalloc_free(p);
  errno = 0;
  rc = smalloc_posix_memalign(&p, 24, 100);
  SM_CHILD_CHECK(rc == EINVAL && errno == 0, "posix_memalign(24): %d, errno %d", rc, errno);
}

START_TEST(posix_memalign_enomem_sets_errno)
{
  sm_test_in_child(sh_memalign_body);
}
END_TEST

/* ---- malloc_trim from main releases an idle worker's pages ---------------- */

enum { SH_TRIM_BLOCKS = 1 << 20, SH_TRIM_SIZE = 64 };   /* 64 MiB */

typedef struct sh_trim {
  size_t rss0, rss1, rss2;   /* before the worker, after the frees, after malloc_trim */
  smalloc_stats_t a, b;      /* around malloc_trim */
} sh_trim_t;

/* Run a worker that fills sh_idle.v with SH_TRIM_BLOCKS blocks (and frees
 * them, or leaves them for this thread to free when main_frees), stays
 * alive and idle, and call malloc_trim(0) from here. */
static void sh_trim_run(void *(*worker)(void *), bool main_frees, sh_trim_t *r)
{
  /* no purge thread: it would claim the idle worker's pages itself */
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  sh_idle.v = mmap(NULL, SH_TRIM_BLOCKS * sizeof(void *), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ck_assert(sh_idle.v != MAP_FAILED);
  pthread_t t;
  sh_idle.max = SH_TRIM_BLOCKS;
  sh_idle.size = SH_TRIM_SIZE;
  ck_assert_int_eq(pthread_create(&t, NULL, worker, NULL), 0);
  smalloc_malloc_trim(0);
  r->rss0 = sm_test_rss();
  sh_set_phase(1);
  sh_wait_phase(2);
  ck_assert_uint_eq(sh_idle.n, SH_TRIM_BLOCKS);
  if (main_frees)
    sh_free_all(sh_idle.v, sh_idle.n);
  r->rss1 = sm_test_rss();
  ck_assert_int_eq(sm_test_snap(&r->a), 0);
  smalloc_malloc_trim(0);
  ck_assert_int_eq(sm_test_snap(&r->b), 0);
  r->rss2 = sm_test_rss();
  sh_set_phase(3);
  pthread_join(t, NULL);
  munmap(sh_idle.v, SH_TRIM_BLOCKS * sizeof(void *));
}

/* The worker's blocks took resident memory, and malloc_trim gave it back. */
static void sh_trim_check_rss(const sh_trim_t *r)
{
  ck_assert_msg(r->rss1 > r->rss0 + 48 * MiB, "resident %zu MiB before the worker, %zu after its fill",
                r->rss0 / MiB, r->rss1 / MiB);
#if SM_TEST_SANITIZED   /* the sanitizers' shadow of the freed blocks stays resident */
  (void)r;
#else
  ck_assert_msg(r->rss2 <= r->rss0 + 10 * MiB,
                "resident %zu MiB after malloc_trim; %zu MiB before the worker allocated",
                r->rss2 / MiB, r->rss0 / MiB);
#endif
}

START_TEST(trim_from_main_releases_idle_workers_pages)
{
  sh_trim_t r;
  sh_trim_run(sh_idle_worker, false, &r);
  uint64_t retired = sh_idle.s1.pages_retired - sh_idle.s0.pages_retired;
  ck_assert_msg(retired >= SH_TRIM_BLOCKS * SH_TRIM_SIZE / SM_TEST_SMALL_PAGE - 1,
                "the worker retired %llu pages", (unsigned long long)retired);
  ck_assert_msg(r.b.pages_claimed - r.a.pages_claimed == retired,
                "malloc_trim claimed %llu of the idle worker's %llu retired pages",
                (unsigned long long)(r.b.pages_claimed - r.a.pages_claimed),
                (unsigned long long)retired);
  ck_assert_uint_ge(r.b.pages_released - r.a.pages_released, retired);
  sh_trim_check_rss(&r);
}
END_TEST

/* The same, but this thread frees the blocks the worker allocated (and
 * keeps alive and idle): the worker's exhausted pages, on its full list,
 * hold nothing but blocks that another thread freed, and the worker will
 * not allocate again to take them.  malloc_trim(0) claims every one of
 * them (only the page the worker allocates from stays with it) and the
 * resident size falls. */
static void *sh_fill_worker(void *arg)
{
  (void)arg;
  sh_wait_phase(1);
  sm_test_snap(&sh_idle.s0);
  sh_idle.n = sh_fill(sh_idle.v, sh_idle.max, sh_idle.size);
  sm_test_snap(&sh_idle.s1);
  sh_set_phase(2);
  sh_wait_phase(3);
  return NULL;
}

START_TEST(trim_from_main_releases_pages_it_freed_for_an_idle_worker)
{
  sh_trim_t r;
  sh_trim_run(sh_fill_worker, true, &r);
  const smalloc_stats_t *s0 = &sh_idle.s0, *s1 = &sh_idle.s1;
  int k = sm_test_class_index(s0, SH_TRIM_SIZE);
  ck_assert_int_ge(k, 0);
  uint64_t full = s1->pages_full - s0->pages_full;
  uint64_t pages = s1->classes[k].pages_in_use - s0->classes[k].pages_in_use;
  ck_assert_msg(full >= SH_TRIM_BLOCKS * SH_TRIM_SIZE / SM_TEST_SMALL_PAGE - 1 && full == pages - 1,
                "the worker filled %llu pages of %llu", (unsigned long long)full,
                (unsigned long long)pages);
  ck_assert_uint_eq(r.b.pages_claimed - r.a.pages_claimed, full);
  ck_assert_uint_ge(r.b.pages_released - r.a.pages_released, full);   /* this thread's own too */
  ck_assert_uint_eq(r.b.classes[k].pages_in_use, s0->classes[k].pages_in_use + 1);
  sh_trim_check_rss(&r);
}
END_TEST

/* The same, with this thread's frees in two halves (every other block,
 * then the rest) and a malloc_trim(0) after each: the first finds every
 * page with blocks still out and claims none; each page then has two
 * notices for the second, which claims every one, exactly. */
static void sh_free_every_other(void **v, size_t n, size_t first)
{
  for (size_t i = first; i < n; i += 2)
    smalloc_free(v[i]);
}

START_TEST(trim_claims_pages_freed_in_two_halves_for_an_idle_worker)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  sh_idle.v = mmap(NULL, SH_TRIM_BLOCKS * sizeof(void *), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ck_assert(sh_idle.v != MAP_FAILED);
  sh_idle.max = SH_TRIM_BLOCKS;
  sh_idle.size = SH_TRIM_SIZE;
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, sh_fill_worker, NULL), 0);
  sh_set_phase(1);
  sh_wait_phase(2);
  ck_assert_uint_eq(sh_idle.n, SH_TRIM_BLOCKS);
  smalloc_stats_t a, b, c;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  sh_free_every_other(sh_idle.v, sh_idle.n, 0);
  smalloc_malloc_trim(0);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  sh_free_every_other(sh_idle.v, sh_idle.n, 1);
  smalloc_malloc_trim(0);
  ck_assert_int_eq(sm_test_snap(&c), 0);
  sh_set_phase(3);
  pthread_join(t, NULL);
  munmap(sh_idle.v, SH_TRIM_BLOCKS * sizeof(void *));
  const smalloc_stats_t *s0 = &sh_idle.s0, *s1 = &sh_idle.s1;
  int k = sm_test_class_index(s0, SH_TRIM_SIZE);
  ck_assert_int_ge(k, 0);
  uint64_t full = s1->pages_full - s0->pages_full;
  ck_assert_uint_ge(full, SH_TRIM_BLOCKS * SH_TRIM_SIZE / SM_TEST_SMALL_PAGE - 1);
  ck_assert_uint_eq(b.pages_claimed - a.pages_claimed, 0);
  ck_assert_msg(c.pages_claimed - b.pages_claimed == full,
                "the second malloc_trim claimed %llu of the idle worker's %llu full pages",
                (unsigned long long)(c.pages_claimed - b.pages_claimed), (unsigned long long)full);
  ck_assert_uint_eq(c.classes[k].pages_in_use, s0->classes[k].pages_in_use + 1);
}
END_TEST

/* ---- pages emptied by another thread's frees ------------------------------ */

enum { SH_X_SIZE = SM_TEST_REQUEST_FOR(64), SH_X_PAGES = 6 };

typedef struct sh_x {
  void **v;
  size_t n, full_pages;
  smalloc_stats_t s[4];
} sh_x_t;

static void *sh_x_freer(void *arg)
{
  sh_x_t *x = arg;
  sh_free_all(x->v, x->n);
  return NULL;
}

static void *sh_x_owner(void *arg)
{
  sh_x_t *x = arg;
  size_t cap = sm_test_page_capacity(sm_test_class_size(SH_X_SIZE), 1);
  x->n = SH_X_PAGES * cap + cap / 2;
  x->v = mmap(NULL, x->n * sizeof *x->v, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
              -1, 0);
  smalloc_collect(true);
  sm_test_snap(&x->s[0]);
  for (size_t i = 0; i < x->n; i++)
    x->v[i] = smalloc_malloc(SH_X_SIZE);
  sm_test_snap(&x->s[1]);
  x->full_pages = x->s[1].pages_full - x->s[0].pages_full;
  pthread_t t;
  if (pthread_create(&t, NULL, sh_x_freer, x) == 0)
    pthread_join(t, NULL);
  /* the other thread sent its frees when it exited; the next slow path
   * takes them */
  void *p = smalloc_malloc(2000);
  sm_test_snap(&x->s[2]);
  smalloc_free(p);
  smalloc_collect(true);
  sm_test_snap(&x->s[3]);
  munmap(x->v, x->n * sizeof *x->v);
  return NULL;
}

START_TEST(pages_emptied_by_remote_frees_retire)
{
  static sh_x_t x;
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, sh_x_owner, &x), 0);
  pthread_join(t, NULL);
  const smalloc_stats_t *s = x.s;
  int c = sm_test_class_index(&s[0], SH_X_SIZE);
  ck_assert_int_ge(c, 0);
  /* every page but the last was exhausted and moved to the full list */
  ck_assert_msg(x.full_pages >= SH_X_PAGES, "%zu pages went full", x.full_pages);
  ck_assert_uint_eq(s[1].classes[c].blocks_in_use - s[0].classes[c].blocks_in_use, x.n);
  /* each full page came back once, and emptied, retired */
  ck_assert_uint_eq(s[2].pages_unfull - s[1].pages_unfull, x.full_pages);
  ck_assert_uint_eq(s[2].pages_retired - s[1].pages_retired, x.full_pages);
  ck_assert_uint_eq(s[2].classes[c].blocks_in_use, s[0].classes[c].blocks_in_use);
  /* and the last page, emptied through thread_free, goes back with them */
  ck_assert_uint_eq(s[3].classes[c].pages_in_use, s[0].classes[c].pages_in_use);
  ck_assert_uint_ge(s[3].pages_released - s[2].pages_released, x.full_pages + 1);
}
END_TEST

/* ---- queued pages emptied by another thread's frees ------------------------ */

/* Pages of the owner's queue behind its first page of a class: the owner
 * freed one block of each (which brought each back from the full list to
 * the end of the queue), another thread freed all the others.  The owner's
 * slow path does not walk to them while its first page has blocks; the
 * periodic sweep retires them and they expire (RETIRE_CYCLES 8): exactly
 * those pages go back, and the class keeps only its first page. */
enum { SH_Q_SIZE = SM_TEST_REQUEST_FOR(64), SH_Q_OTHER = 200, SH_Q_PAGES = 3, SH_Q_EXPIRE = 8 };

typedef struct sh_q {
  void **v, **remote;
  size_t n, nremote, pages;
  unsigned rounds;
  smalloc_stats_t s[3];
} sh_q_t;

static void *sh_q_freer(void *arg)
{
  sh_q_t *q = arg;
  sh_free_all(q->remote, q->nremote);
  return NULL;
}

static void *sh_q_owner(void *arg)
{
  sh_q_t *q = arg;
  size_t bsize = sm_test_class_size(SH_Q_SIZE);
  uintptr_t pmask = ~(uintptr_t)(sm_test_page_size(bsize) - 1);
  size_t cap = sm_test_page_capacity(bsize, 1);
  q->n = SH_Q_PAGES * cap + cap / 2;
  q->v = mmap(NULL, 2 * q->n * sizeof *q->v, PROT_READ | PROT_WRITE,
              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (q->v == MAP_FAILED)
    return NULL;
  q->remote = q->v + q->n;
  smalloc_collect(true);
  sm_test_snap(&q->s[0]);
  for (size_t i = 0; i < q->n; i++)
    q->v[i] = smalloc_malloc(SH_Q_SIZE);
  /* blocks come in address order, a page at a time: the first block of
   * each exhausted page is freed here, the rest by the other thread */
  uintptr_t first = (uintptr_t)q->v[q->n - 1] & pmask, prev = 0;
  size_t live = 0;
  for (size_t i = 0; i < q->n; i++) {
    uintptr_t page = (uintptr_t)q->v[i] & pmask;
    if (page == first) {
      q->v[live++] = q->v[i];
    } else if (page != prev) {
      smalloc_free(q->v[i]);
      q->pages++;
    } else {
      q->remote[q->nremote++] = q->v[i];
    }
    prev = page;
  }
  pthread_t t;
  if (pthread_create(&t, NULL, sh_q_freer, q) == 0)
    pthread_join(t, NULL);   /* its batches are sent when it exits */
  sm_test_snap(&q->s[1]);
  /* slow-path entries of another class, until the sweep and the expiry
   * ran; none of its pages goes back */
  enum { OTHER_N = 3 * 65536 / SH_Q_OTHER, ANCHORS = 16 };   /* three pages */
  static void *other[OTHER_N], *anchors[ANCHORS];
  size_t nanchors = 0;
  for (q->rounds = 0; q->rounds < 4000; q->rounds++) {
    if (!sm_test_round_anchored(other, OTHER_N, SH_Q_OTHER, anchors, &nanchors, ANCHORS))
      break;
    sm_test_snap(&q->s[2]);
    if (q->s[2].pages_released - q->s[1].pages_released >= q->pages)
      break;
  }
  sh_free_all(anchors, nanchors);
  sh_free_all(q->v, live);
  munmap(q->v, 2 * q->n * sizeof *q->v);
  return NULL;
}

START_TEST(queued_pages_emptied_by_remote_frees_expire)
{
  static sh_q_t q;
  long old = smalloc_option_get(SMALLOC_OPTION_RETIRE_CYCLES);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, SH_Q_EXPIRE), 0);
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, sh_q_owner, &q), 0);
  pthread_join(t, NULL);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_RETIRE_CYCLES, old), 0);
  ck_assert_ptr_ne(q.v, MAP_FAILED);
  const smalloc_stats_t *s = q.s;
  int c = sm_test_class_index(&s[0], SH_Q_SIZE);
  ck_assert_int_ge(c, 0);
  ck_assert_msg(q.pages >= SH_Q_PAGES, "the blocks filled %zu pages", q.pages);
  ck_assert_uint_eq(s[1].classes[c].pages_in_use - s[0].classes[c].pages_in_use, q.pages + 1);
  ck_assert_msg(s[2].pages_released - s[1].pages_released == q.pages,
                "%llu pages released of %zu emptied by the other thread, after %u rounds",
                (unsigned long long)(s[2].pages_released - s[1].pages_released), q.pages,
                q.rounds);
  ck_assert_uint_eq(s[2].classes[c].pages_in_use - s[0].classes[c].pages_in_use, 1);
}
END_TEST

/* ---- many threads freeing each other's blocks ---------------------------- */

/* 64 threads keep 4096 live blocks each of one class and replace 1024 of
 * them per round, handing one in four to another thread, which frees it
 * after the round's barrier.  The heap does not grow with the rounds: once
 * warmed up, the class's pages hold at most 1.5 times its live bytes
 * (live 4 pages per thread; the rest is each owner's partly used pages and
 * the blocks other threads freed into them since it last ran), checked at
 * every tenth round. */
enum { SH_M_THREADS = 64, SH_M_POOL = 4096, SH_M_STEPS = 1024, SH_M_ROUNDS = 40,
       SH_M_WARM = 10, SH_M_SIZE = SM_TEST_REQUEST_FOR(64) };

typedef struct sh_m {
  pthread_barrier_t round, drained;
  _Atomic(void *) inbox[SH_M_THREADS];
  double worst;          /* the highest page bytes / live bytes seen */
  unsigned worst_round;
  int failed;
} sh_m_t;

static sh_m_t sh_m;

static void sh_m_push(unsigned to, void *p)
{
  void *old = atomic_load(&sh_m.inbox[to]);
  do
    *(void **)p = old;
  while (!atomic_compare_exchange_weak(&sh_m.inbox[to], &old, p));
}

static void *sh_m_worker(void *arg)
{
  unsigned self = (unsigned)(uintptr_t)arg;
  sm_rng_t rng;
  sm_rng_seed(&rng, 0x5eed0000u + self);
  void **pool = mmap(NULL, SH_M_POOL * sizeof *pool, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (pool == MAP_FAILED) {
    sh_m.failed = 1;
    pool = NULL;
  }
  for (int i = 0; pool && i < SH_M_POOL; i++)
    pool[i] = smalloc_malloc(SH_M_SIZE);
  for (unsigned r = 0; r < SH_M_ROUNDS; r++) {
    for (int k = 0; pool && k < SH_M_STEPS; k++) {
      uint64_t x = sm_rng_next(&rng);
      unsigned i = (unsigned)(x % SH_M_POOL);
      if ((x >> 32) % 4 == 0)
        sh_m_push((self + 1 + (unsigned)(x >> 40) % (SH_M_THREADS - 1)) % SH_M_THREADS, pool[i]);
      else
        smalloc_free(pool[i]);
      pool[i] = smalloc_malloc(SH_M_SIZE);
    }
    pthread_barrier_wait(&sh_m.round);
    for (void *p = atomic_exchange(&sh_m.inbox[self], NULL); p != NULL;) {
      void *next = *(void **)p;
      smalloc_free(p);
      p = next;
    }
    if (pthread_barrier_wait(&sh_m.drained) == PTHREAD_BARRIER_SERIAL_THREAD &&
        r >= SH_M_WARM && r % 10 == 0) {
      smalloc_stats_t st;
      int c = sm_test_snap(&st) == 0 ? sm_test_class_index(&st, SH_M_SIZE) : -1;
      if (c < 0) {
        sh_m.failed = 1;
      } else {
        double ratio = (double)st.classes[c].pages_in_use * SM_TEST_SMALL_PAGE /
                       ((double)st.classes[c].blocks_in_use * sm_test_class_size(SH_M_SIZE));
        if (ratio > sh_m.worst) {
          sh_m.worst = ratio;
          sh_m.worst_round = r;
        }
      }
    }
    pthread_barrier_wait(&sh_m.round);
  }
  for (int i = 0; pool && i < SH_M_POOL; i++)
    smalloc_free(pool[i]);
  if (pool)
    munmap(pool, SH_M_POOL * sizeof *pool);
  return NULL;
}

START_TEST(many_threads_freeing_each_others_blocks_stay_bounded)
{
  pthread_t t[SH_M_THREADS];
  ck_assert_int_eq(pthread_barrier_init(&sh_m.round, NULL, SH_M_THREADS), 0);
  ck_assert_int_eq(pthread_barrier_init(&sh_m.drained, NULL, SH_M_THREADS), 0);
  for (unsigned i = 0; i < SH_M_THREADS; i++)
    ck_assert_int_eq(pthread_create(&t[i], NULL, sh_m_worker, (void *)(uintptr_t)i), 0);
  for (unsigned i = 0; i < SH_M_THREADS; i++)
    pthread_join(t[i], NULL);
  ck_assert_int_eq(sh_m.failed, 0);
  ck_assert_msg(sh_m.worst > 1.0 && sh_m.worst <= 1.5,
                "the class's pages held %.2f times its live bytes (round %u)", sh_m.worst,
                sh_m.worst_round);
}
END_TEST

/* ---- a consumer freeing into many pages by turns --------------------------- */

/* One thread allocates five pages' worth of blocks in each of the 32
 * classes up to 1 KiB (about 160 pages; 31 classes in the secure layout,
 * whose smallest block is 32 bytes), another frees them all in a
 * random order, so that its frees go to every page by turns: more pages
 * than the freeing thread has batch slots, so batches are sent early to
 * make room for one another.  No block may be lost on the way: once the
 * freeing thread has exited and the owner collected, every class holds
 * exactly the pages and blocks it held before (and every block still
 * held the owner's pattern when it was freed). */
enum { SH_P_PAGES = 5, SH_P_CLASSES = 32, SH_P_MAX = SH_P_CLASSES * SH_P_PAGES * 4096 };

typedef struct sh_p {
  uint64_t **v;
  size_t n;
  size_t bad;          /* blocks whose pattern was overwritten */
} sh_p_t;

static size_t sh_p_class(unsigned k)   /* block size of the k-th class up to 1 KiB */
{
  if (k < 16)
    return 16 * (size_t)(k + 1);
  k -= 16;
  size_t base = k < 8 ? 256 : 512;
  return base + (base / 8) * (size_t)(k % 8 + 1);
}

static void *sh_p_consumer(void *arg)
{
  sh_p_t *x = arg;
  for (size_t i = 0; i < x->n; i++) {
    uint64_t *b = x->v[i];
    if (b[0] != (uint64_t)(uintptr_t)b)
      x->bad++;
    smalloc_free(b);
  }
  return NULL;
}

START_TEST(a_consumer_freeing_into_many_pages_loses_no_block)
{
  /* no purge thread: starting one, pthread_create allocates (its
   * thread-local storage) between the snapshots */
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  sh_p_t x = {0};
  x.v = mmap(NULL, SH_P_MAX * sizeof *x.v, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ck_assert(x.v != MAP_FAILED);
  /* a thread started and joined before: the consumer reuses its stack and
   * thread-local storage, which glibc allocates once and keeps */
  sh_p_t none = {0};
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, sh_p_consumer, &none), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
  smalloc_collect(true);
  smalloc_stats_t s0, s1;
  ck_assert_int_eq(sm_test_snap(&s0), 0);
  /* no libcheck assertion between the snapshots: each one allocates */
  size_t failed = 0;
  for (unsigned k = 0; k < SH_P_CLASSES; k++) {
    size_t bs = sh_p_class(k);
    if (sm_test_class_size(SM_TEST_REQUEST_FOR(bs)) != bs)
      continue;   /* 16 B in the secure layout: no request gets it */
    for (size_t j = 0; j < SH_P_PAGES * (SM_TEST_SMALL_PAGE / bs); j++) {
      uint64_t *b = smalloc_malloc(SM_TEST_REQUEST_FOR(bs));
      if (b == NULL) { failed++; continue; }
      b[0] = (uint64_t)(uintptr_t)b;
      x.v[x.n++] = b;
    }
  }
  sm_rng_t rng;
  sm_rng_seed(&rng, 0x5eedf00d);
  for (size_t i = x.n - 1; i > 0; i--) {
    size_t j = sm_rng_below(&rng, i + 1);
    uint64_t *tmp = x.v[i];
    x.v[i] = x.v[j];
    x.v[j] = tmp;
  }
  if (pthread_create(&t, NULL, sh_p_consumer, &x) != 0 || pthread_join(t, NULL) != 0)
    failed++;
  smalloc_collect(true);
  ck_assert_int_eq(sm_test_snap(&s1), 0);
  ck_assert_uint_eq(failed, 0);
  ck_assert_uint_eq(x.bad, 0);
  for (unsigned k = 0; k < SH_P_CLASSES; k++) {
    if (sm_test_class_size(SM_TEST_REQUEST_FOR(sh_p_class(k))) != sh_p_class(k))
      continue;
    int c = sm_test_class_index(&s0, SM_TEST_REQUEST_FOR(sh_p_class(k)));
    ck_assert_int_ge(c, 0);
    ck_assert_msg(s1.classes[c].blocks_in_use == s0.classes[c].blocks_in_use &&
                  s1.classes[c].pages_in_use == s0.classes[c].pages_in_use,
                  "class %zu: %llu blocks in %llu pages, before %llu in %llu", sh_p_class(k),
                  (unsigned long long)s1.classes[c].blocks_in_use,
                  (unsigned long long)s1.classes[c].pages_in_use,
                  (unsigned long long)s0.classes[c].blocks_in_use,
                  (unsigned long long)s0.classes[c].pages_in_use);
  }
  munmap(x.v, SH_P_MAX * sizeof *x.v);
}
END_TEST

/* ---- a page handed from one thread to another ------------------------------ */

/* Thread A fills one page of a class (every block handed out) and another
 * thread frees `freed` of its blocks.  A takes them back, and when the
 * page is exhausted again it gives it to the process's pool (other threads
 * free into it, and other threads live) instead of its full list, and
 * carves a fresh page.  Another thread frees `freed` more of the page's
 * blocks; then thread C, which has no page of the class, takes the page
 * from the pool with those blocks rather than carving a fresh one, and its
 * block is one of that page's.  (`freed` is at least 8 and a 16th of the
 * page's blocks: a page with fewer free is not worth taking, page.c.)
 * C then takes the rest of those blocks and one more.  The page, exhausted
 * with no block freed into it while C held it, goes back to the pool if
 * it has many blocks (those it waited for say that others free into it)
 * and to C's full list if it has few (page.c: sm_page_take_over, fewer
 * than 256 blocks: 64 blocks of 1 KiB). */
enum { SH_S_MAX_FREED = 40 };

typedef struct sh_s {
  pthread_barrier_t step;
  size_t size, freed;
  void **v;                 /* the blocks of A's first page */
  size_t cap;
  void *more[SH_S_MAX_FREED + 1];
  void *taken[SH_S_MAX_FREED + 1];   /* C's blocks */
  smalloc_stats_t s[6];
  int rc;
} sh_s_t;

static sh_s_t sh_s;

static void *sh_s_freer(void *arg)
{
  size_t lo = (size_t)(uintptr_t)arg;
  for (size_t i = lo; i < lo + sh_s.freed; i++)
    smalloc_free(sh_s.v[i]);
  return NULL;
}

static void sh_s_free_from_another_thread(size_t lo)
{
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, sh_s_freer, (void *)(uintptr_t)lo), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
}

static void *sh_s_owner(void *arg)
{
  (void)arg;
  void *first = smalloc_malloc(sh_s.size);
  size_t block = sm_test_class_size(sh_s.size);
  size_t index = ((uintptr_t)first & (4 * MiB - 1)) / sm_test_page_size(block);
  sh_s.cap = sm_test_page_capacity(block, index);
  sh_s.v = mmap(NULL, sh_s.cap * sizeof *sh_s.v, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                -1, 0);
  if (sh_s.v == MAP_FAILED) {
    sh_s.rc = -1;
    sh_s.v = NULL;
  }
  for (size_t i = 0; sh_s.v && i < sh_s.cap; i++)
    sh_s.v[i] = i == 0 ? first : smalloc_malloc(sh_s.size);
  pthread_barrier_wait(&sh_s.step);   /* another thread frees v[0..freed) */
  pthread_barrier_wait(&sh_s.step);
  sh_s.rc |= sm_test_snap(&sh_s.s[0]);
  for (size_t i = 0; i <= sh_s.freed; i++)
    sh_s.more[i] = smalloc_malloc(sh_s.size);
  sh_s.rc |= sm_test_snap(&sh_s.s[1]);
  pthread_barrier_wait(&sh_s.step);   /* C takes the page */
  pthread_barrier_wait(&sh_s.step);
  for (size_t i = 0; i <= sh_s.freed; i++)
    smalloc_free(sh_s.more[i]);
  return NULL;
}

static void *sh_s_taker(void *arg)
{
  (void)arg;
  sh_s.rc |= sm_test_snap(&sh_s.s[2]);
  sh_s.taken[0] = smalloc_malloc(sh_s.size);
  sh_s.rc |= sm_test_snap(&sh_s.s[3]);
  for (size_t i = 1; i < sh_s.freed; i++)
    sh_s.taken[i] = smalloc_malloc(sh_s.size);
  sh_s.rc |= sm_test_snap(&sh_s.s[4]);
  sh_s.taken[sh_s.freed] = smalloc_malloc(sh_s.size);   /* the page is exhausted */
  sh_s.rc |= sm_test_snap(&sh_s.s[5]);
  for (size_t i = 0; i <= sh_s.freed; i++)
    smalloc_free(sh_s.taken[i]);
  return NULL;
}

static void sh_s_run(size_t size, size_t freed, bool shared_again)
{
  memset(&sh_s, 0, sizeof sh_s);
  sh_s.size = size;
  sh_s.freed = freed;
  void *mine = smalloc_malloc(1000);   /* this thread lives, with a heap */
  ck_assert_ptr_nonnull(mine);
  ck_assert_int_eq(pthread_barrier_init(&sh_s.step, NULL, 2), 0);
  pthread_t a, c;
  ck_assert_int_eq(pthread_create(&a, NULL, sh_s_owner, NULL), 0);
  pthread_barrier_wait(&sh_s.step);
  ck_assert_ptr_nonnull(sh_s.v);
  size_t page_size = sm_test_page_size(sm_test_class_size(size));
  ck_assert_uint_ge(freed, 8);
  ck_assert_uint_ge(freed * 16, sh_s.cap);
  ck_assert_uint_lt(2 * freed, sh_s.cap);
  ck_assert((sh_s.cap < 256) == !shared_again);   /* the case the caller means */
  for (size_t i = 1; i < sh_s.cap; i++)
    ck_assert_msg((uintptr_t)sh_s.v[i] / page_size == (uintptr_t)sh_s.v[0] / page_size,
                  "block %zu of %zu is not in the first block's page", i, sh_s.cap);
  sh_s_free_from_another_thread(0);
  pthread_barrier_wait(&sh_s.step);
  pthread_barrier_wait(&sh_s.step);   /* A took the freed blocks and one more */
  sh_s_free_from_another_thread(freed);
  ck_assert_int_eq(pthread_create(&c, NULL, sh_s_taker, NULL), 0);
  ck_assert_int_eq(pthread_join(c, NULL), 0);
  pthread_barrier_wait(&sh_s.step);
  ck_assert_int_eq(pthread_join(a, NULL), 0);
  ck_assert_int_eq(sh_s.rc, 0);
  const smalloc_stats_t *s = sh_s.s;
  int k = sm_test_class_index(&s[0], size);
  ck_assert_int_ge(k, 0);
  const uint64_t *a0 = s[0].classes[k].slow_steps, *a1 = s[1].classes[k].slow_steps;
  /* A: the freed blocks collected, the page given away, a fresh one */
  ck_assert_uint_eq(a1[SMALLOC_STEP_THREAD_COLLECT] - a0[SMALLOC_STEP_THREAD_COLLECT], 1);
  ck_assert_uint_eq(a1[SMALLOC_STEP_FRESH_PAGE] + a1[SMALLOC_STEP_NEW_SEGMENT] -
                    a0[SMALLOC_STEP_FRESH_PAGE] - a0[SMALLOC_STEP_NEW_SEGMENT], 1);
  ck_assert_uint_eq(s[1].pages_abandoned - s[0].pages_abandoned, 1);
  ck_assert_uint_eq(s[1].pages_full - s[0].pages_full, 0);
  /* C: the page from the pool, nothing carved */
  const uint64_t *c2 = s[2].classes[k].slow_steps, *c3 = s[3].classes[k].slow_steps;
  ck_assert_uint_eq(s[3].pages_reclaimed - s[2].pages_reclaimed, 1);
  ck_assert_uint_eq(c3[SMALLOC_STEP_NEXT_PAGE] - c2[SMALLOC_STEP_NEXT_PAGE], 1);
  ck_assert_uint_eq(c3[SMALLOC_STEP_FRESH_PAGE] + c3[SMALLOC_STEP_NEW_SEGMENT], 
                    c2[SMALLOC_STEP_FRESH_PAGE] + c2[SMALLOC_STEP_NEW_SEGMENT]);
  ck_assert_uint_eq(s[3].classes[k].pages_in_use, s[2].classes[k].pages_in_use);
  for (size_t i = 0; i < freed; i++)
    ck_assert_msg((uintptr_t)sh_s.taken[i] / page_size == (uintptr_t)sh_s.v[0] / page_size,
                  "the taking thread's block %zu (%p) is not in the given page (%p)", i, sh_s.taken[i],
                  sh_s.v[0]);
  /* C's malloc past the page's blocks: the page exhausted, shared again
   * or kept (on the full list), and a page carved for the block */
  const uint64_t *c4 = s[4].classes[k].slow_steps, *c5 = s[5].classes[k].slow_steps;
  ck_assert_uint_eq(c4[SMALLOC_STEP_NEXT_PAGE], c3[SMALLOC_STEP_NEXT_PAGE]);
  ck_assert_uint_eq(s[5].pages_abandoned - s[4].pages_abandoned, shared_again ? 1 : 0);
  ck_assert_uint_eq(s[5].pages_full - s[4].pages_full, shared_again ? 0 : 1);
  ck_assert_uint_eq(s[5].pages_reclaimed, s[4].pages_reclaimed);
  ck_assert_uint_eq(c5[SMALLOC_STEP_FRESH_PAGE] + c5[SMALLOC_STEP_NEW_SEGMENT] -
                    c4[SMALLOC_STEP_FRESH_PAGE] - c4[SMALLOC_STEP_NEW_SEGMENT], 1);
  for (size_t i = 2 * freed; i < sh_s.cap; i++)
    smalloc_free(sh_s.v[i]);
  munmap(sh_s.v, sh_s.cap * sizeof *sh_s.v);
  smalloc_free(mine);
}

START_TEST(an_exhausted_page_other_threads_free_into_serves_another_thread)
{
  sh_s_run(SM_TEST_REQUEST_FOR(112), 40, true);   /* 585 blocks */
}
END_TEST

START_TEST(a_page_of_few_blocks_taken_from_the_pool_stays_with_its_taker)
{
  sh_s_run(SM_TEST_REQUEST_FOR(1024), 8, false);   /* 64 blocks */
}
END_TEST

/* ---- an exited thread's pages, freed by another, go back on trim ----------- */

/* A thread allocates SH_E_PAGES pages' worth of blocks of a class and
 * exits: its pages (each with live blocks) go to the process's pool.  This
 * thread frees every block: its first free into each page claims it, so
 * that the rest are local frees (page.c, sm_page_claim); the pages empty
 * and smalloc_collect(true) gives them back: exactly the pages the thread
 * left, the class holds the pages it held before, and the segments in use
 * are those in use before. */
enum { SH_E_SIZE = SM_TEST_REQUEST_FOR(176), SH_E_PAGES = 5 };

typedef struct sh_e {
  void **v;
  size_t n;
} sh_e_t;

static void *sh_e_maker(void *arg)
{
  sh_e_t *e = arg;
  for (size_t i = 0; i < e->n; i++)
    e->v[i] = smalloc_malloc(SH_E_SIZE);
  return NULL;
}

/* A thread allocates pages' worth of blocks of SH_E_SIZE and exits;
 * s0 and s1 are the counters before and after.  No purge thread: what it
 * gives back would be counted too. */
static void sh_e_leave_pages(sh_e_t *e, size_t pages, smalloc_stats_t *s0, smalloc_stats_t *s1)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HEAP_CACHE, 0), 0);   /* taken apart at exit */
  e->n = pages * (SM_TEST_SMALL_PAGE / sm_test_class_size(SH_E_SIZE));
  e->v = mmap(NULL, e->n * sizeof *e->v, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ck_assert(e->v != MAP_FAILED);
  smalloc_collect(true);
  ck_assert_int_eq(sm_test_snap(s0), 0);
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, sh_e_maker, e), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
  ck_assert_int_eq(sm_test_snap(s1), 0);
}

START_TEST(an_exited_threads_pages_freed_by_another_go_back_on_trim)
{
  sh_e_t e;
  smalloc_stats_t s0, s1, s2;
  sh_e_leave_pages(&e, SH_E_PAGES, &s0, &s1);
  size_t bad = 0;
  for (size_t i = 0; i < e.n; i++) {
    bad += e.v[i] == NULL;
    smalloc_free(e.v[i]);
  }
  smalloc_collect(true);
  ck_assert_int_eq(sm_test_snap(&s2), 0);
  ck_assert_uint_eq(bad, 0);
  int k = sm_test_class_index(&s0, SH_E_SIZE);
  ck_assert_int_ge(k, 0);
  uint64_t pages = s1.classes[k].pages_in_use - s0.classes[k].pages_in_use;
  ck_assert_uint_ge(pages, SH_E_PAGES);
  ck_assert_uint_eq(s1.classes[k].blocks_in_use - s0.classes[k].blocks_in_use, e.n);
  /* every page with live blocks went to the pool when the thread exited */
  ck_assert_uint_eq(s1.pages_abandoned - s0.pages_abandoned, pages);
  /* and came back empty */
  ck_assert_uint_eq(s2.classes[k].blocks_in_use, s0.classes[k].blocks_in_use);
  ck_assert_uint_eq(s2.classes[k].pages_in_use, s0.classes[k].pages_in_use);
  /* (the collection may release other pages too: this thread's, of
   * what the C library allocated for the other thread) */
  ck_assert_uint_ge(s2.pages_released - s1.pages_released, pages);
  ck_assert_uint_eq(s2.pages_reclaimed - s1.pages_reclaimed, pages);
  /* the thread's segment, left without pages, is unmapped */
  ck_assert_uint_eq(s2.segments_in_use, s0.segments_in_use);
  munmap(e.v, e.n * sizeof *e.v);
}
END_TEST

/* The same, without the collection: each page this thread claims goes
 * in front of the one it claimed before, which has just emptied (the
 * blocks are freed in the order they were allocated, a page at a time):
 * that page retires then, as a page emptied behind the first of its
 * class does, and expires and goes back like any other.  Before, it kept
 * the rest of its free list where the free fast path looks (free !=
 * NULL), so it never retired: a thread that freed for threads that came
 * and went kept 8 vacant pages of every class for good.  The last page
 * retires too: the exited thread's current page went to the pool with
 * the blocks it never handed out on local_free (sm_page_donate), where
 * this thread's frees go as well, so the free that empties it sees it
 * empty. */
START_TEST(an_exited_threads_pages_freed_by_another_retire_as_they_empty)
{
  sh_e_t e;
  smalloc_stats_t s0, s1, s2;
  sh_e_leave_pages(&e, SH_E_PAGES, &s0, &s1);
  for (size_t i = 0; i < e.n; i++)
    smalloc_free(e.v[i]);
  ck_assert_int_eq(sm_test_snap(&s2), 0);
  int k = sm_test_class_index(&s0, SH_E_SIZE);
  ck_assert_int_ge(k, 0);
  uint64_t pages = s1.classes[k].pages_in_use - s0.classes[k].pages_in_use;
  ck_assert_uint_ge(pages, SH_E_PAGES);
  ck_assert_uint_eq(s2.pages_reclaimed - s1.pages_reclaimed, pages);
  ck_assert_uint_eq(s2.pages_retired - s1.pages_retired, pages);
  ck_assert_uint_eq(s2.classes[k].blocks_in_use, s0.classes[k].blocks_in_use);
  munmap(e.v, e.n * sizeof *e.v);
}
END_TEST

/* The same with more pages than a thread claims (SM_CLAIM_MAX, 8 of a
 * class), and the collection made by another thread while this one
 * waits: the frees into the pages it does not claim, which stay in the
 * pool without an owner, are pushed at once, not kept in this thread's
 * batches until its next slow path.  Before, they pinned those pages
 * and their segments: under an address-space limit, another thread's
 * allocation failed although every block was free. */
enum { SH_W_PAGES = 40, SH_CLAIM_MAX = 8 /* page.c */ };

static void *sh_w_collect(void *arg)
{
  smalloc_stats_t *s = arg;
  smalloc_collect(true);
  ck_assert_int_eq(sm_test_snap(s), 0);
  return NULL;
}

START_TEST(an_exited_threads_pages_freed_by_a_thread_that_waits_go_back)
{
  sh_e_t e;
  smalloc_stats_t s0, s1, s2;
  sh_e_leave_pages(&e, SH_W_PAGES, &s0, &s1);
  for (size_t i = 0; i < e.n; i++)
    smalloc_free(e.v[i]);
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, sh_w_collect, &s2), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
  int k = sm_test_class_index(&s0, SH_E_SIZE);
  ck_assert_int_ge(k, 0);
  uint64_t pages = s1.classes[k].pages_in_use - s0.classes[k].pages_in_use;
  ck_assert_uint_ge(pages, SH_W_PAGES);
  ck_assert_uint_eq(s1.pages_abandoned - s0.pages_abandoned, pages);
  /* this thread claimed as many as it may hold of a class, queued or
   * retired (its frees into them were local ones, and they wait for its
   * next slow path or the purge delay); every other page went back to
   * its segment.  (Before retired pages counted, the secure build, which
   * retires each page as it empties, claimed every one.) */
  uint64_t claimed = s2.pages_reclaimed - s1.pages_reclaimed;
  /* less the pages of the class this thread held already (after the
   * collection, on its queue alone): check's runner, which this test's
   * process is forked from, allocates through smalloc too */
  uint64_t held = s0.classes[k].pages_in_use;
  ck_assert_uint_lt(held, SH_CLAIM_MAX);
  ck_assert_uint_eq(claimed, SH_CLAIM_MAX - held);
  ck_assert_uint_le(s2.classes[k].pages_in_use, s0.classes[k].pages_in_use + claimed);
  ck_assert_uint_ge(s2.pages_released - s1.pages_released, pages - claimed);
  munmap(e.v, e.n * sizeof *e.v);
}
END_TEST

/* Threads that each leave a block behind for the next one to free, as
 * mimalloc-bench's mleak does: a thread's page goes to the pool when it
 * exits, and once the next thread has freed its last block (sent when
 * that thread exits), a later thread takes it from there: the class
 * keeps a page or two, not one per thread (20,000 pages for 6 live
 * blocks before). */
enum { SH_LV_THREADS = 400, SH_LV_SIZE = 200 };
static void *sh_lv_prev;

static void *sh_lv_leaver(void *arg)
{
  (void)arg;
  void *mine = smalloc_malloc(SH_LV_SIZE);
  smalloc_free(sh_lv_prev);
  sh_lv_prev = mine;
  return mine;
}

START_TEST(pages_exited_threads_left_serve_later_threads_once_freed)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HEAP_CACHE, 0), 0);   /* taken apart at exit */
  smalloc_collect(true);
  smalloc_stats_t s0, s1;
  ck_assert_int_eq(sm_test_snap(&s0), 0);
  for (int i = 0; i < SH_LV_THREADS; i++) {
    pthread_t t;
    void *got;
    ck_assert_int_eq(pthread_create(&t, NULL, sh_lv_leaver, NULL), 0);
    ck_assert_int_eq(pthread_join(t, &got), 0);
    ck_assert_ptr_nonnull(got);
  }
  ck_assert_int_eq(sm_test_snap(&s1), 0);
  int k = sm_test_class_index(&s0, SH_LV_SIZE);
  ck_assert_int_ge(k, 0);
  ck_assert_uint_eq(s1.classes[k].blocks_in_use - s0.classes[k].blocks_in_use, 1);
  /* the last thread's page, and one other at most (a thread may take a
   * fresh page while the page before waits for its block) */
  ck_assert_uint_le(s1.classes[k].pages_in_use - s0.classes[k].pages_in_use, 2);
  ck_assert_uint_ge(s1.pages_reclaimed - s0.pages_reclaimed, SH_LV_THREADS - 3);
  smalloc_free(sh_lv_prev);
}
END_TEST

/* A thread that exits leaving a page with a few live blocks: the next
 * thread that needs a page of the class takes that one, for the blocks
 * it has free (not only those others freed into it), rather than a fresh
 * page.  mimalloc-bench's larson left hundreds of such pages in the pool
 * of one class, 64 KiB each for four live blocks. */
enum { SH_F_SIZE = SM_TEST_REQUEST_FOR(896), SH_F_LIVE = 3 };
static void *sh_f_blocks[SH_F_LIVE];

static void *sh_f_leaver(void *arg)
{
  (void)arg;
  for (int i = 0; i < SH_F_LIVE; i++)
    sh_f_blocks[i] = smalloc_malloc(SH_F_SIZE);
  return NULL;
}

START_TEST(a_page_an_exited_thread_left_serves_the_next_thread)
{
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0), 0);
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_HEAP_CACHE, 0), 0);   /* taken apart at exit */
  pthread_t t;
  ck_assert_int_eq(pthread_create(&t, NULL, sh_f_leaver, NULL), 0);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
  smalloc_stats_t s0, s1;
  ck_assert_int_eq(sm_test_snap(&s0), 0);
  void *p = smalloc_malloc(SH_F_SIZE);
  ck_assert_ptr_nonnull(p);
  ck_assert_int_eq(sm_test_snap(&s1), 0);
  int k = sm_test_class_index(&s0, SH_F_SIZE);
  ck_assert_int_ge(k, 0);
  ck_assert_uint_eq(s1.classes[k].pages_in_use, s0.classes[k].pages_in_use);
  ck_assert_uint_eq(s1.pages_reclaimed - s0.pages_reclaimed, 1);
  ck_assert_uint_eq((uintptr_t)p / SM_TEST_SMALL_PAGE, (uintptr_t)sh_f_blocks[0] / SM_TEST_SMALL_PAGE);
  smalloc_free(p);
  for (int i = 0; i < SH_F_LIVE; i++)
    smalloc_free(sh_f_blocks[i]);
}
END_TEST

/* ---- many threads with a few blocks each ----------------------------------- */

/* 256 threads start, each allocates a block of 48 bytes and one of
 * 40,000 and waits until all have: their pages come from the segments
 * all threads share, 64 KiB pages for either (not 512 KiB for the
 * 40,000-byte class: 128 MiB for 256 threads), 64 pages to a segment, so
 * the process maps 8 segments for them, not 512 (2 GiB of address
 * space).  In a child under a limit of 96 MiB above its size (thread
 * stacks of 64 KiB included): with 512 KiB shared pages for the larger
 * block, the 204th to 246th thread could not start (with segments of its
 * own for every thread, far fewer did).  Under a sanitizer, whose runtime
 * maps memory of its own for every thread, without the limit: the
 * counters tell the same. */
enum {
  SH_T_THREADS = 256, SH_T_PER_SEGMENT = 64,
  SH_T_SIZE = SM_TEST_REQUEST_FOR(48), SH_T_MEDIUM = SM_TEST_REQUEST_FOR(40000)
};

static pthread_barrier_t sh_t_all_in;
static _Atomic unsigned sh_t_failed;

static void *sh_t_worker(void *arg)
{
  (void)arg;
  char *p = smalloc_malloc(SH_T_SIZE), *q = smalloc_malloc(SH_T_MEDIUM);
  if (p == NULL || q == NULL)
    atomic_fetch_add(&sh_t_failed, 1);
  if (p)
    memset(p, 0x5a, SH_T_SIZE);
  if (q)
    memset(q, 0x5a, SH_T_MEDIUM);
  pthread_barrier_wait(&sh_t_all_in);   /* all blocks live at once */
  pthread_barrier_wait(&sh_t_all_in);   /* counted */
  smalloc_free(p);
  smalloc_free(q);
  return NULL;
}

/* In a child: n threads start with 64 KiB stacks, under a limit of 96
 * MiB above the process's size (none under a sanitizer, whose runtime
 * maps memory of its own for every thread): about 48 MiB more than 256
 * threads with their blocks need, since a thread's aligned mapping takes
 * 4 MiB more for a moment (os.c), and other threads' may take it then;
 * with a page or a segment of their own each, they need 150 MiB and
 * more.  Each runs worker, which
 * allocates its blocks, waits at all_in until every one has, then again
 * until they are counted, and frees them.  *a holds the stats from before
 * the threads start, *b from while all their blocks are live. */
static void sh_threads_under_limit(unsigned n, void *(*worker)(void *), pthread_barrier_t *all_in,
                                   smalloc_stats_t *a, smalloc_stats_t *b)
{
  static pthread_t t[256];
  SM_CHILD_CHECK(n <= sizeof t / sizeof t[0], "%u threads", n);
  pthread_attr_t attr;
  SM_CHILD_CHECK(pthread_attr_init(&attr) == 0 &&
                 pthread_attr_setstacksize(&attr, SM_TEST_SANITIZED ? 1 * MiB : 64 * 1024) == 0,
                 "pthread_attr");
  SM_CHILD_CHECK(pthread_barrier_init(all_in, NULL, n + 1) == 0, "barrier");
  /* no purge thread: it would start with the first worker, and what the
   * C library allocates for it takes a page of a class of its own */
  SM_CHILD_CHECK(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0) == 0, "option");
  sm_test_heap_here();      /* every worker's pages are shared ones */
  smalloc_collect(true);   /* no shared segment with a free page left */
  SM_CHILD_CHECK(sm_test_snap(a) == 0, "stats");
  if (!SM_TEST_SANITIZED) {
    struct rlimit rl;
    rl.rlim_cur = rl.rlim_max = sm_test_vm_bytes() + 96 * MiB;
    SM_CHILD_CHECK(setrlimit(RLIMIT_AS, &rl) == 0, "setrlimit: %s", strerror(errno));
  }
  for (unsigned i = 0; i < n; i++) {
    int rc = pthread_create(&t[i], &attr, worker, NULL);
    SM_CHILD_CHECK(rc == 0, "pthread_create failed at thread %u: %s", i, strerror(rc));
  }
  pthread_barrier_wait(all_in);
  SM_CHILD_CHECK(sm_test_snap(b) == 0, "stats");
  pthread_barrier_wait(all_in);
  for (unsigned i = 0; i < n; i++)
    pthread_join(t[i], NULL);
}

static void sh_t_body(void)
{
  smalloc_stats_t a, b;
  sh_threads_under_limit(SH_T_THREADS, sh_t_worker, &sh_t_all_in, &a, &b);
  SM_CHILD_CHECK(atomic_load(&sh_t_failed) == 0, "malloc returned NULL in %u threads",
                 atomic_load(&sh_t_failed));
  size_t sizes[2] = {SH_T_SIZE, SH_T_MEDIUM};
  for (int i = 0; i < 2; i++) {
    int k = sm_test_class_index(&a, sizes[i]);
    SM_CHILD_CHECK(k >= 0, "class");
    SM_CHILD_CHECK(b.classes[k].pages_in_use - a.classes[k].pages_in_use == SH_T_THREADS,
                   "%llu pages of %zu-byte blocks for %d threads",
                   (unsigned long long)(b.classes[k].pages_in_use - a.classes[k].pages_in_use),
                   sizes[i], SH_T_THREADS);
  }
  SM_CHILD_CHECK(b.segments_mapped - a.segments_mapped == 2 * SH_T_THREADS / SH_T_PER_SEGMENT,
                 "%llu segments mapped for %d threads' pages",
                 (unsigned long long)(b.segments_mapped - a.segments_mapped), SH_T_THREADS);
  SM_CHILD_CHECK(b.slow_steps[SMALLOC_STEP_NEW_SEGMENT] - a.slow_steps[SMALLOC_STEP_NEW_SEGMENT] ==
                     2 * SH_T_THREADS / SH_T_PER_SEGMENT,
                 "%llu new segments",
                 (unsigned long long)(b.slow_steps[SMALLOC_STEP_NEW_SEGMENT] -
                                      a.slow_steps[SMALLOC_STEP_NEW_SEGMENT]));
}

START_TEST(many_threads_with_a_few_blocks_share_segments)
{
  sm_test_in_child(sh_t_body);
}
END_TEST

/* ---- a thread's first blocks of a class no small page holds ---------------- */

/* 256 threads start, each allocates a block of 100,000 bytes (a class of
 * 512 KiB pages, too big for a shared small page) and waits until all
 * have: each block is lent a mapping of its own, its size rounded to the
 * OS page (large_allocs), and no page of the class is carved.  In a child
 * under a limit of 96 MiB above its size (thread stacks of 64 KiB
 * included): with a shared 512 KiB page for each thread (128 MiB), the
 * 204th to 246th thread could not start.  Under a sanitizer, without the
 * limit. */
enum { SH_L_THREADS = 256, SH_L_SIZE = 100000 };

static pthread_barrier_t sh_l_all_in;
static _Atomic unsigned sh_l_failed;

static void *sh_l_worker(void *arg)
{
  (void)arg;
  char *p = smalloc_malloc(SH_L_SIZE);
  if (p == NULL)
    atomic_fetch_add(&sh_l_failed, 1);
  else
    memset(p, 0x5a, SH_L_SIZE);
  pthread_barrier_wait(&sh_l_all_in);   /* all blocks live at once */
  pthread_barrier_wait(&sh_l_all_in);   /* counted */
  smalloc_free(p);
  return NULL;
}

static void sh_l_body(void)
{
  smalloc_stats_t a, b;
  sh_threads_under_limit(SH_L_THREADS, sh_l_worker, &sh_l_all_in, &a, &b);
  SM_CHILD_CHECK(atomic_load(&sh_l_failed) == 0, "malloc returned NULL in %u threads",
                 atomic_load(&sh_l_failed));
  SM_CHILD_CHECK(b.large_allocs - a.large_allocs == SH_L_THREADS, "%llu blocks lent for %d threads",
                 (unsigned long long)(b.large_allocs - a.large_allocs), SH_L_THREADS);
  int k = sm_test_class_index(&a, SH_L_SIZE);
  SM_CHILD_CHECK(k >= 0, "class");
  SM_CHILD_CHECK(b.classes[k].pages_in_use == a.classes[k].pages_in_use,
                 "%llu pages of the class carved",
                 (unsigned long long)(b.classes[k].pages_in_use - a.classes[k].pages_in_use));
}

START_TEST(many_threads_with_a_medium_block_each_are_lent_mappings)
{
  sm_test_in_child(sh_l_body);
}
END_TEST

/* ---- a thread with many medium blocks ------------------------------------- */

/* A thread's medium blocks take shared small pages (64 KiB) while they
 * are few: one block of each of 12 classes of 1-48 KiB, a small page
 * each.  A class of which it has taken two small pages (4 KiB blocks
 * here) takes a medium page (512 KiB) next, which serves the next 100
 * blocks with no other page.  Then the thread fills the shared medium
 * segment (8 pages) and the OS refuses another (a limit of 1 MiB above
 * the process's size): a free small page of the shared segments serves
 * the next page of the class, and no segment is mapped.  A thread under
 * an address-space limit from its start (256 MiB above the process's
 * size) keeps to small pages: its third of the class is one.  In a
 * child; under a sanitizer, without the limits. */
enum { SH_D_SIZE = 4096, SH_D_SMALL = 2, SH_D_MEDIUM_PAGES = 8, SH_D_FEW = 12 };
static const size_t sh_d_few[SH_D_FEW] = {1200, 2000, 3000, 5000, 6000, 7000,
                                          9000, 11000, 14000, 20000, 28000, 40000};

static void sh_d_pages(int k, uint64_t *pages, uint64_t *bytes)
{
  smalloc_stats_t s;
  SM_CHILD_CHECK(sm_test_snap(&s) == 0, "stats");
  *pages = s.classes[k].pages_in_use;
  *bytes = s.class_page_bytes[k];
}

/* Allocate blocks of SH_D_SIZE into list (from *n on) until the class
 * has want pages; false when malloc failed. */
static bool sh_d_fill(void **list, size_t max, size_t *n, int k, uint64_t want)
{
  uint64_t pages, bytes;
  for (sh_d_pages(k, &pages, &bytes); pages < want; sh_d_pages(k, &pages, &bytes)) {
    SM_CHILD_CHECK(*n < max, "%zu blocks and %llu pages", *n, (unsigned long long)pages);
    if ((list[*n] = smalloc_malloc(SH_D_SIZE)) == NULL)
      return false;
    memset(list[(*n)++], 0x5a, SH_D_SIZE);
  }
  return true;
}

static void *sh_d_worker(void *arg)
{
  bool limited = arg != NULL;
  enum { MAX = 4096 };
  static void *list[MAX];
  size_t n = 0;
  smalloc_stats_t a;
  SM_CHILD_CHECK(sm_test_snap(&a) == 0, "stats");
  int k = sm_test_class_index(&a, SH_D_SIZE);
  SM_CHILD_CHECK(k >= 0, "class");
  uint64_t pages0 = a.classes[k].pages_in_use, bytes0 = a.class_page_bytes[k], pages, bytes, more;
  if (!limited) {
    void *few[SH_D_FEW];
    int fk[SH_D_FEW];
    for (int i = 0; i < SH_D_FEW; i++) {
      fk[i] = sm_test_class_index(&a, sh_d_few[i]);
      SM_CHILD_CHECK(fk[i] >= 0 && fk[i] != k && (i == 0 || fk[i] != fk[i - 1]), "class of %zu", sh_d_few[i]);
      SM_CHILD_CHECK((few[i] = smalloc_malloc(sh_d_few[i])) != NULL, "malloc failed");
    }
    smalloc_stats_t b;
    SM_CHILD_CHECK(sm_test_snap(&b) == 0, "stats");
    for (int i = 0; i < SH_D_FEW; i++)
      SM_CHILD_CHECK(b.classes[fk[i]].pages_in_use - a.classes[fk[i]].pages_in_use == 1 &&
                         b.class_page_bytes[fk[i]] - a.class_page_bytes[fk[i]] == 64u << 10,
                     "a block of %zu: %llu bytes of pages", sh_d_few[i],
                     (unsigned long long)(b.class_page_bytes[fk[i]] - a.class_page_bytes[fk[i]]));
    for (int i = 0; i < SH_D_FEW; i++)
      smalloc_free(few[i]);
  }
  SM_CHILD_CHECK(sh_d_fill(list, MAX, &n, k, pages0 + SH_D_SMALL), "malloc failed");
  sh_d_pages(k, &pages, &bytes);
  SM_CHILD_CHECK(bytes - bytes0 == SH_D_SMALL * (64u << 10), "the first %d pages: %llu bytes", SH_D_SMALL,
                 (unsigned long long)(bytes - bytes0));
  SM_CHILD_CHECK(sh_d_fill(list, MAX, &n, k, pages0 + SH_D_SMALL + 1), "malloc failed");
  sh_d_pages(k, &more, &bytes);
  SM_CHILD_CHECK(bytes - bytes0 == SH_D_SMALL * (64u << 10) + (limited ? 64u << 10 : 512u << 10),
                 "the next page%s: %llu bytes", limited ? " under a limit" : "",
                 (unsigned long long)(bytes - bytes0 - SH_D_SMALL * (64u << 10)));
  if (limited)
    goto out;
  for (int i = 0; i < 100; i++) {
    SM_CHILD_CHECK((list[n] = smalloc_malloc(SH_D_SIZE)) != NULL, "malloc failed");
    memset(list[n++], 0x5a, SH_D_SIZE);
  }
  sh_d_pages(k, &pages, &bytes);
  SM_CHILD_CHECK(pages == more, "%llu pages more for 100 blocks", (unsigned long long)(pages - more));
  if (!SM_TEST_SANITIZED) {
    /* the shared medium segment's eight pages in use, the last one with
     * room for more blocks */
    SM_CHILD_CHECK(sh_d_fill(list, MAX, &n, k, pages0 + SH_D_SMALL + SH_D_MEDIUM_PAGES), "malloc failed");
    struct rlimit rl;
    SM_CHILD_CHECK(getrlimit(RLIMIT_AS, &rl) == 0, "getrlimit");
    rlim_t was = rl.rlim_cur;
    rl.rlim_cur = sm_test_vm_bytes() + 1 * MiB;
    SM_CHILD_CHECK(setrlimit(RLIMIT_AS, &rl) == 0, "setrlimit: %s", strerror(errno));
    sh_d_pages(k, &pages, &bytes);
    smalloc_stats_t m0, m1;
    SM_CHILD_CHECK(sm_test_snap(&m0) == 0, "stats");
    bool ok = sh_d_fill(list, MAX, &n, k, pages + 1);
    SM_CHILD_CHECK(sm_test_snap(&m1) == 0, "stats");
    rl.rlim_cur = was;
    SM_CHILD_CHECK(setrlimit(RLIMIT_AS, &rl) == 0, "setrlimit: %s", strerror(errno));
    SM_CHILD_CHECK(ok, "malloc(%d) failed under the limit, %zu blocks live", SH_D_SIZE, n);
    uint64_t after;
    sh_d_pages(k, &more, &after);
    SM_CHILD_CHECK(more == pages + 1 && after - bytes == 64u << 10, "%llu pages of %llu bytes under the limit",
                   (unsigned long long)(more - pages), (unsigned long long)(after - bytes));
    SM_CHILD_CHECK(m1.segments_mapped == m0.segments_mapped, "%llu segments mapped under the limit",
                   (unsigned long long)(m1.segments_mapped - m0.segments_mapped));
  }
out:
  while (n > 0)
    smalloc_free(list[--n]);
  return NULL;
}

static void sh_d_body(void)
{
  SM_CHILD_CHECK(smalloc_option_set(SMALLOC_OPTION_BACKGROUND, 0) == 0, "option");
  sm_test_heap_here();     /* another heap lives: the worker borrows its pages */
  smalloc_collect(true);   /* no shared segment with a free page left */
  pthread_t t;
  SM_CHILD_CHECK(pthread_create(&t, NULL, sh_d_worker, NULL) == 0, "pthread_create");
  pthread_join(t, NULL);
  if (SM_TEST_SANITIZED)
    return;
  smalloc_collect(true);
  struct rlimit rl;
  SM_CHILD_CHECK(getrlimit(RLIMIT_AS, &rl) == 0, "getrlimit");
  rl.rlim_cur = sm_test_vm_bytes() + 256 * MiB;
  SM_CHILD_CHECK(setrlimit(RLIMIT_AS, &rl) == 0, "setrlimit: %s", strerror(errno));
  SM_CHILD_CHECK(pthread_create(&t, NULL, sh_d_worker, &rl) == 0, "pthread_create");
  pthread_join(t, NULL);
}

START_TEST(a_thread_with_many_medium_blocks_takes_medium_pages)
{
  sm_test_in_child(sh_d_body);
}
END_TEST

/* The aligned functions place their result inside a block of a class
 * (at an offset, or at its start when the class is a multiple of the
 * alignment): a thread's first aligned block of such a size comes from
 * a page, never from a lent mapping.  Both ways, from a thread whose
 * medium blocks would be lent. */
static void *sh_a_worker(void *arg)
{
  size_t *align = arg;
  void *p = NULL;
  smalloc_stats_t a, b;
  if (sm_test_snap(&a) != 0 || smalloc_posix_memalign(&p, *align, SH_L_SIZE) != 0 || sm_test_snap(&b) != 0)
    return NULL;
  memset(p, 0x5a, SH_L_SIZE);
  bool ok = ((uintptr_t)p & (*align - 1)) == 0 && b.large_allocs == a.large_allocs;
  smalloc_free(p);
  return ok ? p : NULL;
}

START_TEST(aligned_medium_blocks_come_from_pages)
{
  sm_test_heap_here();
  size_t aligns[2] = {4096, 16384};   /* the class's multiple (106,496); an offset */
  for (int i = 0; i < 2; i++) {
    pthread_t t;
    void *res = NULL;
    ck_assert_int_eq(pthread_create(&t, NULL, sh_a_worker, &aligns[i]), 0);
    ck_assert_int_eq(pthread_join(t, &res), 0);
    ck_assert_msg(res != NULL, "alignment %zu: not aligned, or served as a large block", aligns[i]);
  }
}
END_TEST

/* ---- huge pages for the shared segments only where their pages are live -- */

/* SH_H_THREADS threads (each with a heap, so the shared segments serve
 * them) each allocate 6 MiB of 1 KiB blocks, then 2 MiB of 512-byte
 * ones: 32 MiB of pages, in more shared segments than there are threads,
 * so that the last ones may be advised for huge pages.  Kept dense, they
 * are ("hg" in smaps); with all but one block of each page of 1 KiB
 * blocks freed before the second round (by main: a thread counts the
 * blocks of others it frees at once, its own when it next folds a page's
 * counts), the small pages in use hold far less than 3/4 of their bytes
 * in live blocks, and the segments that round maps are not.  Not in the
 * secure build (guard pages, no huge pages). */
enum { SH_H_THREADS = 4, SH_H_BIG = 1024, SH_H_BIGS = (6 << 20) / SH_H_BIG,
       SH_H_SMALL = 512, SH_H_SMALLS = (2 << 20) / SH_H_SMALL };

static pthread_barrier_t sh_h_sync;
static void *sh_h_big[SH_H_THREADS][SH_H_BIGS];
static void *sh_h_small[SH_H_THREADS][SH_H_SMALLS];
static bool sh_h_sparse;

static void *sh_h_worker(void *arg)
{
  void **big = sh_h_big[(intptr_t)arg], **small = sh_h_small[(intptr_t)arg];
  intptr_t failed = 0;
  for (int i = 0; i < SH_H_BIGS; i++)
    failed |= (big[i] = smalloc_malloc(SH_H_BIG)) == NULL;
  pthread_barrier_wait(&sh_h_sync);   /* the first round done everywhere */
  pthread_barrier_wait(&sh_h_sync);   /* main freed what it frees */
  for (int i = 0; i < SH_H_SMALLS; i++)
    failed |= (small[i] = smalloc_malloc(SH_H_SMALL)) == NULL;
  pthread_barrier_wait(&sh_h_sync);   /* all held while main looks */
  pthread_barrier_wait(&sh_h_sync);
  for (int i = 0; i < SH_H_BIGS; i++)
    smalloc_free(big[i]);
  for (int i = 0; i < SH_H_SMALLS; i++)
    smalloc_free(small[i]);
  return (void *)failed;
}

static bool sh_h_in(const uintptr_t *segs, int n, const void *p)
{
  for (int i = 0; i < n; i++)
    if (segs[i] == ((uintptr_t)p & ~(SM_TEST_SEGMENT - 1)))
      return true;
  return false;
}

/* Add p's segment to segs (n of them, room for 64); the new count. */
static int sh_h_note(uintptr_t *segs, int n, const void *p)
{
  if (sh_h_in(segs, n, p))
    return n;
  ck_assert_int_lt(n, 64);
  segs[n] = (uintptr_t)p & ~(SM_TEST_SEGMENT - 1);
  return n + 1;
}

/* How many of the segments the second round mapped (*segments) are
 * advised for huge pages. */
static int sh_h_run(bool sparse, int *segments)
{
  pthread_t t[SH_H_THREADS];
  sh_h_sparse = sparse;
  ck_assert_int_eq(pthread_barrier_init(&sh_h_sync, NULL, SH_H_THREADS + 1), 0);
  for (intptr_t i = 0; i < SH_H_THREADS; i++)
    ck_assert_int_eq(pthread_create(&t[i], NULL, sh_h_worker, (void *)i), 0);
  pthread_barrier_wait(&sh_h_sync);
  /* the segments of the first round, with a block each at least */
  uintptr_t first[64];
  int nfirst = 0;
  for (int w = 0; w < SH_H_THREADS; w++)
    for (int i = 0; i < SH_H_BIGS; i += 64)
      nfirst = sh_h_note(first, nfirst, sh_h_big[w][i]);
  if (sparse)
    for (int w = 0; w < SH_H_THREADS; w++)
      for (int i = 0; i < SH_H_BIGS; i++)
        if (i % 64 != 0) {   /* one block a page stays (64 KiB pages) */
          smalloc_free(sh_h_big[w][i]);
          sh_h_big[w][i] = NULL;
        }
  pthread_barrier_wait(&sh_h_sync);
  pthread_barrier_wait(&sh_h_sync);
  /* the segments the second round mapped: those of its blocks that hold
   * none of the first's */
  uintptr_t second[64];
  int nsecond = 0;
  for (int w = 0; w < SH_H_THREADS; w++)
    for (int i = 0; i < SH_H_SMALLS; i += 128)
      if (!sh_h_in(first, nfirst, sh_h_small[w][i]))
        nsecond = sh_h_note(second, nsecond, sh_h_small[w][i]);
  ck_assert_int_ge(nsecond, 1);
  *segments = nsecond;
  int advised = 0;
  for (int i = 0; i < nsecond; i++)
    advised += sm_test_vmflag((void *)(second[i] + SM_TEST_SEGMENT / 2), "hg");
  pthread_barrier_wait(&sh_h_sync);
  for (int i = 0; i < SH_H_THREADS; i++) {
    void *failed;
    ck_assert_int_eq(pthread_join(t[i], &failed), 0);
    ck_assert_ptr_null(failed);
  }
  pthread_barrier_destroy(&sh_h_sync);
  return advised;
}

START_TEST(shared_segments_take_huge_pages_where_their_pages_are_live)
{
  if (SM_TEST_SECURE)
    return;
  sm_test_heap_here();
  int segments;
  ck_assert_int_eq(sh_h_run(false, &segments), segments);
}
END_TEST

START_TEST(shared_segments_of_sparse_pages_keep_to_small_pages)
{
  if (SM_TEST_SECURE)
    return;
  sm_test_heap_here();
  int segments;
  ck_assert_int_eq(sh_h_run(true, &segments), 0);
}
END_TEST

static Suite *shared_suite(void)
{
  Suite *s = suite_create("shared");
  TCase *tc = sm_tcase("shared", 300);
  tcase_add_test(tc, idle_threads_memory_serves_another_thread);
  tcase_add_test(tc, same_thread_other_sizes_after_free_all);
  tcase_add_test(tc, free_pages_give_back_their_address_space_under_a_limit);
  tcase_add_test(tc, posix_memalign_enomem_sets_errno);
  tcase_add_test(tc, trim_from_main_releases_idle_workers_pages);
  tcase_add_test(tc, trim_from_main_releases_pages_it_freed_for_an_idle_worker);
  tcase_add_test(tc, trim_claims_pages_freed_in_two_halves_for_an_idle_worker);
  tcase_add_test(tc, pages_emptied_by_remote_frees_retire);
  tcase_add_test(tc, queued_pages_emptied_by_remote_frees_expire);
  tcase_add_test(tc, many_threads_freeing_each_others_blocks_stay_bounded);
  tcase_add_test(tc, a_consumer_freeing_into_many_pages_loses_no_block);
  tcase_add_test(tc, an_exhausted_page_other_threads_free_into_serves_another_thread);
  tcase_add_test(tc, a_page_of_few_blocks_taken_from_the_pool_stays_with_its_taker);
  tcase_add_test(tc, an_exited_threads_pages_freed_by_another_go_back_on_trim);
  tcase_add_test(tc, an_exited_threads_pages_freed_by_another_retire_as_they_empty);
  tcase_add_test(tc, an_exited_threads_pages_freed_by_a_thread_that_waits_go_back);
  tcase_add_test(tc, pages_exited_threads_left_serve_later_threads_once_freed);
  tcase_add_test(tc, a_page_an_exited_thread_left_serves_the_next_thread);
  tcase_add_test(tc, many_threads_with_a_few_blocks_share_segments);
  tcase_add_test(tc, many_threads_with_a_medium_block_each_are_lent_mappings);
  tcase_add_test(tc, a_thread_with_many_medium_blocks_takes_medium_pages);
  tcase_add_test(tc, aligned_medium_blocks_come_from_pages);
  tcase_add_test(tc, shared_segments_take_huge_pages_where_their_pages_are_live);
  tcase_add_test(tc, shared_segments_of_sparse_pages_keep_to_small_pages);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  return sm_run_suite(shared_suite());
}
