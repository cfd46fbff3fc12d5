/* When the OS refuses memory: smalloc gives back what it holds and tries
 * again, for as long as memory comes back, a bounded number of times.
 *
 * The refusals are made by this program: it defines mmap, which the
 * library's calls reach before the C library's (the executable comes
 * first in the symbol search), and refuses as many as a test asks for
 * with ENOMEM, running the test's hook at each.  Not in the
 * AddressSanitizer and ThreadSanitizer builds, whose runtimes intercept
 * mmap themselves: the suite is skipped there. */
#include "common.h"

#include <limits.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#if !SM_TEST_SANITIZED
static _Atomic int oom_refuse;        /* mmaps still to refuse */
static _Atomic int oom_refused;       /* refused so far */
static void (*oom_hook)(void);        /* run at each refusal */
static __thread bool oom_exempt;      /* a thread whose mmaps pass */

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
  int left = oom_exempt ? 0 : atomic_load(&oom_refuse);
  while (left > 0 && !atomic_compare_exchange_weak(&oom_refuse, &left, left - 1)) {
  }
  if (left > 0) {
    atomic_fetch_add(&oom_refused, 1);
    if (oom_hook)
      oom_hook();
    errno = ENOMEM;
    return MAP_FAILED;
  }
  return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
}

/* A huge block above what smalloc keeps cached (512 MiB): its free gives
 * its address space back at once (never touched: no memory). */
#define OOM_GIVER_SIZE (600 * MiB)
/* What the test allocates: above the spans' 2 MiB, a mapping of its own. */
#define OOM_REQUEST (8 * MiB)

/* The other thread, whose mmaps are never refused: each time it is
 * asked, it maps a huge block and frees it, which gives that address
 * space back; it says when it has. */
static struct {
  pthread_mutex_t m;
  pthread_cond_t c;
  int asked, done;
  bool quit, failed;
} giver = {.m = PTHREAD_MUTEX_INITIALIZER, .c = PTHREAD_COND_INITIALIZER};

static void *giver_main(void *arg)
{
  (void)arg;
  oom_exempt = true;
  pthread_mutex_lock(&giver.m);
  for (;;) {
    while (giver.asked == giver.done && !giver.quit)
      pthread_cond_wait(&giver.c, &giver.m);
    if (giver.asked == giver.done)
      break;
    void *p = smalloc_malloc(OOM_GIVER_SIZE);   /* no assert: see oom_keep */
    giver.failed = giver.failed || p == NULL;
    smalloc_free(p);
    giver.done++;
    pthread_cond_broadcast(&giver.c);
  }
  pthread_mutex_unlock(&giver.m);
  return NULL;
}

/* The hook: the other thread gives address space back while this one's
 * try fails (no smalloc lock is held around mmap), and this waits until
 * it has. */
static void giver_gives(void)
{
  pthread_mutex_lock(&giver.m);
  int want = ++giver.asked;
  pthread_cond_broadcast(&giver.c);
  while (giver.done < want)
    pthread_cond_wait(&giver.c, &giver.m);
  pthread_mutex_unlock(&giver.m);
}

static pthread_t giver_start(void)
{
  pthread_t t;
  pthread_mutex_lock(&giver.m);
  giver.asked = giver.done = 0;
  pthread_mutex_unlock(&giver.m);
  giver.quit = false;
  ck_assert_int_eq(pthread_create(&t, NULL, giver_main, NULL), 0);
  return t;
}

static void giver_stop(pthread_t t)
{
  pthread_mutex_lock(&giver.m);
  giver.quit = true;
  pthread_cond_broadcast(&giver.c);
  pthread_mutex_unlock(&giver.m);
  ck_assert_int_eq(pthread_join(t, NULL), 0);
  ck_assert_msg(!giver.failed, "the other thread's malloc(%zu) failed", (size_t)OOM_GIVER_SIZE);
}

/* Allocate blocks of `size` until one of them asks the OS for memory
 * (an mmap refused, or served once refusals are off): that one's result,
 * the blocks before it kept in oom_kept for oom_release. */
enum { OOM_KEPT = 1 << 20 };
static void *oom_kept[OOM_KEPT];
static size_t oom_nkept;

static bool oom_overflow;

/* While mmaps are refused nothing here may allocate, libcheck's asserts
 * included (each notes its place in a block of its own): the checks wait
 * until the refusals are off. */
static void oom_keep(void *p)
{
  if (oom_nkept < OOM_KEPT)
    oom_kept[oom_nkept++] = p;
  else
    oom_overflow = true;
}

static void *oom_alloc_until_mapped(size_t size)
{
  for (;;) {
    int refused = atomic_load(&oom_refused);
    void *p = smalloc_malloc(size);
    if (atomic_load(&oom_refused) != refused || p == NULL || oom_overflow)
      return p;
    oom_keep(p);
  }
}

static void oom_release(void)
{
  ck_assert_msg(!oom_overflow, "more than %d blocks and no mmap", OOM_KEPT);
  while (oom_nkept > 0)
    smalloc_free(oom_kept[--oom_nkept]);
}

/* Allocate blocks of `size` while every mmap is refused, until NULL:
 * the mmaps refused to that last try, whose errno is ENOMEM; the collects
 * made on the way in *collects. */
static int oom_one_try(size_t size, uint64_t *collects)
{
  smalloc_stats_t a, b;
  /* nothing left to give back: the figures first, as an assert (which
   * allocates) could leave a page to give back after the collect */
  int snapped = sm_test_snap(&a);
  smalloc_collect(true);
  oom_hook = NULL;
  atomic_store(&oom_refused, 0);
  atomic_store(&oom_refuse, INT_MAX);
  int before;
  void *p;
  do {
    before = atomic_load(&oom_refused);
    errno = 0;
    p = oom_alloc_until_mapped(size);
    if (p)
      oom_keep(p);
  } while (p && !oom_overflow);
  int e = errno;
  atomic_store(&oom_refuse, 0);
  int n = atomic_load(&oom_refused) - before;
  ck_assert_int_eq(snapped, 0);
  ck_assert_int_eq(e, ENOMEM);
  ck_assert_int_gt(n, 0);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  *collects = b.oom_collects - a.oom_collects;
  oom_release();
  return n;
}

/* The same try, while another thread gives address space back at its
 * first refusal and nothing else is left to give: served at the second
 * try, after one collect. */
static void oom_served_after_another_gave(size_t size)
{
  /* the other thread's heap is made first: the try's steps depend on
   * the threads there are */
  pthread_t t = giver_start();
  giver_gives();
  uint64_t collects;
  int per_try = oom_one_try(size, &collects);
  pthread_mutex_lock(&giver.m);
  giver.asked = giver.done = 0;
  pthread_mutex_unlock(&giver.m);
  smalloc_stats_t a, b;
  int snapped = sm_test_snap(&a);
  smalloc_collect(true);
  oom_hook = giver_gives;
  atomic_store(&oom_refused, 0);
  atomic_store(&oom_refuse, per_try);   /* the first try, whole */
  void *p = oom_alloc_until_mapped(size);
  atomic_store(&oom_refuse, 0);
  oom_hook = NULL;
  ck_assert_int_eq(snapped, 0);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_msg(p != NULL, "malloc(%zu) failed after another thread gave back", size);
  ck_assert_msg(atomic_load(&oom_refused) == per_try && giver.done == per_try &&
                    b.oom_collects - a.oom_collects == 1,
                "malloc(%zu): %d mmaps refused, %d given back, %llu collects (a try: %d)", size,
                atomic_load(&oom_refused), giver.done, (unsigned long long)(b.oom_collects - a.oom_collects),
                per_try);
  memset(p, 1, size);
  smalloc_free(p);
  oom_release();
  giver_stop(t);
}
#endif

/* Nothing to give back, nobody giving: one collect, then NULL and
 * ENOMEM (a program that keeps asking pays one collect a call). */
START_TEST(a_refusal_with_nothing_to_give_back_collects_once)
{
#if SM_TEST_SANITIZED
  printf("skipped: the sanitizer intercepts mmap\n");
#else
  static const size_t sizes[] = {OOM_REQUEST, 64};
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    /* a first refused try, uncounted: the ones after it start from a
     * process whose every refusal has been collected */
    uint64_t collects;
    oom_one_try(sizes[i], &collects);
    for (int k = 0; k < 2; k++) {
      oom_one_try(sizes[i], &collects);
      ck_assert_msg(collects == 1, "malloc(%zu): %llu collects", sizes[i], (unsigned long long)collects);
    }
  }
#endif
}
END_TEST

/* Two threads fail together: the first to collect gives back what there
 * was, and the second's collect finds nothing left, while what the first
 * gave is there for it.  Here another thread gives address space back
 * while this one's try is failing, and this one's collect finds nothing:
 * it tries again, and is served, a huge block as a small one (a new
 * segment).  Before, only what its own collect gave counted: it returned
 * NULL (50 threads under a 3 GiB limit with 450 MiB live got NULL in 4
 * runs of 25). */
START_TEST(a_refusal_tries_again_when_another_thread_gave_back)
{
#if SM_TEST_SANITIZED
  printf("skipped: the sanitizer intercepts mmap\n");
#else
  oom_served_after_another_gave(OOM_REQUEST);
  oom_served_after_another_gave(64);
#endif
}
END_TEST

/* Memory keeps coming back and every try is still refused: the tries
 * stop after four collects. */
START_TEST(refusals_stop_after_four_collects)
{
#if SM_TEST_SANITIZED
  printf("skipped: the sanitizer intercepts mmap\n");
#else
  pthread_t t = giver_start();
  smalloc_stats_t a, b;
  ck_assert_int_eq(sm_test_snap(&a), 0);
  oom_hook = giver_gives;
  atomic_store(&oom_refuse, INT_MAX);
  errno = 0;
  void *p = smalloc_malloc(OOM_REQUEST);
  atomic_store(&oom_refuse, 0);
  oom_hook = NULL;
  ck_assert_ptr_null(p);
  ck_assert_int_eq(errno, ENOMEM);
  ck_assert_int_eq(sm_test_snap(&b), 0);
  ck_assert_uint_eq(b.oom_collects - a.oom_collects, 4);
  giver_stop(t);
#endif
}
END_TEST

static Suite *oom_suite(void)
{
  Suite *s = suite_create("oom");
  TCase *tc = sm_tcase("oom", 60);
  tcase_add_test(tc, a_refusal_with_nothing_to_give_back_collects_once);
  tcase_add_test(tc, a_refusal_tries_again_when_another_thread_gave_back);
  tcase_add_test(tc, refusals_stop_after_four_collects);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  return sm_run_suite(oom_suite());
}
