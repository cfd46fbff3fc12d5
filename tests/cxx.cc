// C++'s operator new and delete are smalloc's (lib/override.c): every form
// reaches smalloc's heap and counters, the aligned forms align, a request
// that cannot be served calls the new handler and then throws
// std::bad_alloc, and the nothrow forms return nullptr.
#include "config.h"

#include <check.h>
#include <dlfcn.h>
#include <signal.h>
#include <sys/resource.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>

#include "smalloc.h"

static smalloc_stats_t stats()
{
  smalloc_stats_t s;
  std::memset(&s, 0, sizeof s);
  s.size = sizeof s;
  smalloc_stats_get(&s);
  return s;
}

// Blocks of one size class nothing else in the process uses (the counts
// are the process's: libcheck's threads allocate too).
struct odd {
  char bytes[2900];   // the class of 3072 bytes
};

static const smalloc_class_stats_t *odd_class(const smalloc_stats_t &s)
{
  for (uint32_t c = 0; c < s.nclasses; c++)
    if (s.classes[c].block_size == 3072)
      return &s.classes[c];
  ck_abort_msg("no class of 3072 bytes");
  return nullptr;
}

// The compiler may drop a new whose block goes nowhere (C++14): make it go.
template <typename T> static T *escape(T *p)
{
  __asm__ volatile("" : : "r"(p) : "memory");
  return p;
}

// A size no allocator can serve; volatile, so the compiler sees no constant.
static volatile std::size_t impossible = std::size_t(1) << 62;

// The program binds operator new and delete to smalloc's definitions, not
// to the C++ library's (which would reach smalloc too, through malloc).
static bool in_smalloc(void *f)
{
  Dl_info info;
  return dladdr(f, &info) != 0 && info.dli_fname && std::strstr(info.dli_fname, "libsmalloc");
}

START_TEST(the_operators_are_smallocs)
{
  void *(*plain)(std::size_t) = &::operator new;
  void *(*array)(std::size_t) = &::operator new[];
  void *(*nothrow)(std::size_t, const std::nothrow_t &) noexcept = &::operator new;
  void *(*aligned)(std::size_t, std::align_val_t) = &::operator new;
  void (*del)(void *) noexcept = &::operator delete;
  void (*sized)(void *, std::size_t) noexcept = &::operator delete;
  void (*del_aligned)(void *, std::align_val_t) noexcept = &::operator delete[];
  ck_assert(in_smalloc(reinterpret_cast<void *>(plain)));
  ck_assert(in_smalloc(reinterpret_cast<void *>(array)));
  ck_assert(in_smalloc(reinterpret_cast<void *>(nothrow)));
  ck_assert(in_smalloc(reinterpret_cast<void *>(aligned)));
  ck_assert(in_smalloc(reinterpret_cast<void *>(del)));
  ck_assert(in_smalloc(reinterpret_cast<void *>(sized)));
  ck_assert(in_smalloc(reinterpret_cast<void *>(del_aligned)));
}
END_TEST

START_TEST(new_and_delete_are_smallocs)
{
  smalloc_stats_t a = stats();
  odd *p = escape(new odd);
  // smalloc knows the block (it would report a pointer it does not own)
  ck_assert_uint_ge(smalloc_malloc_usable_size(p), sizeof(odd));
  smalloc_stats_t b = stats();
  ck_assert_uint_eq(odd_class(b)->allocs, odd_class(a)->allocs + 1);
  delete p;
  smalloc_stats_t c = stats();
  ck_assert_uint_eq(odd_class(c)->frees, odd_class(b)->frees + 1);

  odd *q = escape(new odd[1]);
  delete[] q;
  void *r = escape(::operator new(sizeof(odd)));
  ::operator delete(r, sizeof(odd));   // sized
  void *s = escape(::operator new[](sizeof(odd), std::nothrow));
  ck_assert_ptr_nonnull(s);
  ::operator delete[](s, std::nothrow);
  void *t = escape(::operator new[](sizeof(odd)));
  ::operator delete[](t, sizeof(odd));
  smalloc_stats_t d = stats();
  ck_assert_uint_eq(odd_class(d)->allocs, odd_class(c)->allocs + 4);
  ck_assert_uint_eq(odd_class(d)->frees, odd_class(c)->frees + 4);
  ck_assert_uint_eq(odd_class(d)->blocks_in_use, odd_class(a)->blocks_in_use);
}
END_TEST

// Sized delete checks its size: one larger than the block holds means the
// program has the block's type wrong (it may have written past its end),
// and is reported as misuse (abort by default).  The sizes the operators
// were given pass, above.
START_TEST(sized_delete_of_a_larger_size_aborts)
{
  struct rlimit no_core = {0, 0};
  setrlimit(RLIMIT_CORE, &no_core);   // the abort is expected
  ck_assert_int_eq(smalloc_option_set(SMALLOC_OPTION_ON_ERROR, 0), 0);
  void *p = escape(::operator new(100));
  ::operator delete(p, smalloc_malloc_usable_size(p) + 1);
}
END_TEST

struct alignas(256) wide {
  char bytes[300];
};

START_TEST(aligned_new_aligns)
{
  smalloc_stats_t a = stats();   // aligned_alloc: nothing else calls it
  wide *w = escape(new wide);
  ck_assert_uint_eq(reinterpret_cast<std::uintptr_t>(w) % 256, 0);
  ck_assert_uint_ge(smalloc_malloc_usable_size(w), sizeof(wide));
  std::memset(w, 1, sizeof *w);
  delete w;
  wide *v = escape(new wide[3]);
  ck_assert_uint_eq(reinterpret_cast<std::uintptr_t>(v) % 256, 0);
  delete[] v;
  void *x = escape(::operator new(100, std::align_val_t(4096), std::nothrow));
  ck_assert_uint_eq(reinterpret_cast<std::uintptr_t>(x) % 4096, 0);
  ::operator delete(x, 100, std::align_val_t(4096));
  smalloc_stats_t b = stats();
  ck_assert_uint_eq(b.calls_aligned_alloc, a.calls_aligned_alloc + 3);
}
END_TEST

START_TEST(new_throws_bad_alloc)
{
  bool thrown = false;
  try {
    char *p = new char[impossible];
    delete[] p;
  } catch (const std::bad_alloc &) {
    thrown = true;
  }
  ck_assert(thrown);
  thrown = false;
  try {
    void *p = ::operator new(impossible, std::align_val_t(64));
    ::operator delete(p, std::align_val_t(64));
  } catch (const std::bad_alloc &) {
    thrown = true;
  }
  ck_assert(thrown);
}
END_TEST

START_TEST(nothrow_new_returns_null)
{
  ck_assert_ptr_null(new (std::nothrow) char[impossible]);
  ck_assert_ptr_null(::operator new(impossible, std::nothrow));
  ck_assert_ptr_null(::operator new[](impossible, std::align_val_t(128), std::nothrow));
}
END_TEST

static int handler_calls;

// Gives up after its second call, as a handler with nothing left to free.
static void handler()
{
  if (++handler_calls == 2)
    std::set_new_handler(nullptr);
}

START_TEST(new_calls_the_new_handler)
{
  handler_calls = 0;
  std::set_new_handler(handler);
  bool thrown = false;
  try {
    void *p = ::operator new(impossible);
    ::operator delete(p);
  } catch (const std::bad_alloc &) {
    thrown = true;
  }
  ck_assert(thrown);
  ck_assert_int_eq(handler_calls, 2);

  handler_calls = 0;
  std::set_new_handler(handler);
  ck_assert_ptr_null(::operator new(impossible, std::nothrow));
  ck_assert_int_eq(handler_calls, 2);
}
END_TEST

int main()
{
  Suite *s = suite_create("cxx");
  TCase *tc = tcase_create("core");
  tcase_add_test(tc, the_operators_are_smallocs);
  tcase_add_test(tc, new_and_delete_are_smallocs);
  tcase_add_test_raise_signal(tc, sized_delete_of_a_larger_size_aborts, SIGABRT);
  tcase_add_test(tc, aligned_new_aligns);
  tcase_add_test(tc, new_throws_bad_alloc);
  tcase_add_test(tc, nothrow_new_returns_null);
  tcase_add_test(tc, new_calls_the_new_handler);
  suite_add_tcase(s, tc);
  SRunner *sr = srunner_create(s);
  srunner_set_fork_status(sr, CK_FORK);   /* as sm_run_suite (common.h) */
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? 0 : 1;
}
