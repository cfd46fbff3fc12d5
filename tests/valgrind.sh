#!/bin/sh
# valgrind.sh: memcheck understands smalloc's blocks.  Built with
# valgrind/valgrind.h, the library describes its blocks to memcheck with
# client requests, so that
#   (a) a clean program doing many allocations, reallocations and frees
#       (and a cross-thread free) runs with no error reported;
#   (b) a read and a write of a block after its free are reported as
#       "Invalid read" and "Invalid write";
#   (c) a branch on the contents of a fresh malloc block is reported as
#       depending on uninitialised values, and one on a calloc block is not.
#
# Run by make check (tests/Makefile.am exports top_srcdir and top_builddir);
# by hand from the build directory:
#   top_srcdir=/path/to/src top_builddir=. sh /path/to/src/tests/valgrind.sh
# Exit 0 on success, 1 on failure, 77 (skip) when valgrind is missing or
# the library was built without valgrind support or with a sanitizer,
# 99 when the test cannot run.

top_srcdir=${top_srcdir:-$(dirname "$0")/..}
top_builddir=${top_builddir:-.}
CC=${CC:-cc}
libdir=$top_builddir/lib/.libs
lib=$libdir/libsmalloc.so

skip() { echo "valgrind.sh: $*: skipped"; exit 77; }
hard() { echo "valgrind.sh: $*" >&2; exit 99; }

command -v valgrind >/dev/null 2>&1 || skip "valgrind is not installed"
[ -f "$top_builddir/config.h" ] || hard "$top_builddir/config.h not found"
grep -q '^#define HAVE_VALGRIND_VALGRIND_H 1' "$top_builddir/config.h" ||
  skip "smalloc was built without valgrind/valgrind.h"
[ -f "$lib" ] || hard "$lib not found (build the library first)"
libdir=$(cd "$libdir" && pwd)
# memcheck and the sanitizers each want the process to themselves
if nm -D "$lib" 2>/dev/null | grep -q -e '__asan_' -e '__tsan_' -e '__msan_'; then
  skip "smalloc was built with a sanitizer"
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/smalloc-vg.XXXXXX") || hard "mktemp failed"
trap 'rm -rf "$tmp"' EXIT INT TERM

cat >"$tmp/clean.c" <<'EOF'
/* Many allocations of every kind, all used correctly. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <smalloc.h>

static uint64_t rng = 88172645463325252u;
static size_t next(size_t n)
{
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (size_t)(rng % n);
}

static size_t size(void)
{
  size_t k = next(100);
  return k < 85 ? next(300) : k < 98 ? next(40000) : next(3 << 20);
}

static void *other_thread(void *p)
{
  smalloc_free(p);
  return smalloc_malloc(100);
}

int main(void)
{
  enum { N = 256 };
  static unsigned char *v[N];
  static size_t n[N];
  unsigned long sum = 0;
  for (int round = 0; round < 20000; round++) {
    int i = (int)next(N);
    if (v[i]) {
      for (size_t j = 0; j < n[i]; j += 61)
        sum += v[i][j];
      if (next(4) == 0) {
        size_t m = size() + 1;
        unsigned char *q = smalloc_realloc(v[i], m);
        if (!q)
          return 2;
        if (m > n[i])
          memset(q + n[i], 1, m - n[i]);
        v[i] = q;
        n[i] = m;
        continue;
      }
      smalloc_free(v[i]);
      v[i] = NULL;
      continue;
    }
    n[i] = size();
    switch (next(5)) {
    case 0:
      v[i] = smalloc_calloc(1, n[i]);
      break;
    case 1:
      v[i] = smalloc_aligned_alloc((size_t)16 << next(9), n[i]);
      if (v[i])
        memset(v[i], 2, n[i]);
      break;
    default:
      v[i] = smalloc_malloc(n[i]);
      if (v[i])
        memset(v[i], 3, n[i]);
    }
    if (!v[i])
      return 2;
    if (smalloc_malloc_usable_size(v[i]) < n[i])
      return 3;
  }
  pthread_t t;
  void *back;
  void *p = smalloc_malloc(48);
  if (!p || pthread_create(&t, NULL, other_thread, p) || pthread_join(t, &back))
    return 4;
  smalloc_free(back);
  for (int i = 0; i < N; i++)
    smalloc_free(v[i]);
  char *s = strdup("through the C library");
  printf("%lu %s\n", sum % 7, s);
  free(s);
  smalloc_collect(true);
  /* memcheck did not put its own allocator in smalloc's place */
  smalloc_stats_t st;
  memset(&st, 0, sizeof st);
  st.size = sizeof st;
  if (smalloc_stats_get(&st) != 0 || st.calls_malloc < 1000) {
    fprintf(stderr, "smalloc did not serve the allocations\n");
    return 5;
  }
  return 0;
}
EOF

cat >"$tmp/uaf.c" <<'EOF'
/* A block used after its free: one read, one write. */
#include <stdio.h>
#include <string.h>
#include <smalloc.h>

int main(void)
{
  unsigned char *keep = smalloc_malloc(64);
  volatile unsigned char *p = smalloc_malloc(64);
  if (!keep || !p)
    return 2;
  memset((void *)p, 7, 64);
  smalloc_free((void *)p);
  unsigned char c = p[40];   /* Invalid read */
  p[48] = 9;                 /* Invalid write */
  printf("%d\n", c == 7);
  smalloc_free(keep);
  return 0;
}
EOF

cat >"$tmp/undef.c" <<'EOF'
/* Branches on fresh malloc memory (undefined) and on calloc memory
 * (defined).  The argument decides which. */
#include <stdio.h>
#include <string.h>
#include <smalloc.h>

int main(int argc, char **argv)
{
  (void)argc;
  /* recycle a block first: stale bytes must read as undefined again */
  unsigned char *old = smalloc_malloc(200);
  if (!old)
    return 2;
  memset(old, 0, 200);
  smalloc_free(old);
  int zeroed = argv[1] && strcmp(argv[1], "calloc") == 0;
  volatile unsigned char *p = zeroed ? smalloc_calloc(1, 200) : smalloc_malloc(200);
  if (!p)
    return 2;
  if (p[100] == 0)           /* undefined unless calloc */
    puts("zero");
  smalloc_free((void *)p);
  return 0;
}
EOF

build() {
  $CC -g -O1 -I"$top_srcdir/include" -o "$tmp/$1" "$tmp/$1.c" \
    -L"$libdir" -lsmalloc -Wl,-rpath,"$libdir" -pthread >"$tmp/$1.cc.log" 2>&1 ||
    { cat "$tmp/$1.cc.log" >&2; hard "cannot compile $1.c with $CC"; }
}
build clean
build uaf
build undef

# vg NAME LOG [ARGS]: run under memcheck, print valgrind's exit status.
# By default memcheck replaces a malloc and free exported by any library,
# smalloc's too (smalloc_malloc is the same function as its malloc), and
# smalloc would not run at all: somalloc=NONE confines the replacement to
# the main program, which defines none.
vg() {
  prog=$1 log=$2
  shift 2
  valgrind --tool=memcheck --error-exitcode=99 --soname-synonyms=somalloc=NONE \
    --log-file="$log" "$tmp/$prog" "$@" >"$log.out" 2>&1
  echo $?
}

fail=0
show() { sed 's/^/    /' "$1" >&2; }

# (a) a clean program: no error
rc=$(vg clean "$tmp/clean.log")
if [ "$rc" -ne 0 ] || ! grep -q 'ERROR SUMMARY: 0 errors' "$tmp/clean.log"; then
  echo "FAIL (a): memcheck reported errors in a clean program (exit $rc):" >&2
  show "$tmp/clean.log"
  show "$tmp/clean.log.out"
  fail=1
else
  echo "PASS (a): clean program, no memcheck error"
fi

# (b) use after free: an invalid read and an invalid write
rc=$(vg uaf "$tmp/uaf.log")
if [ "$rc" -ne 99 ] || ! grep -q 'Invalid read of size' "$tmp/uaf.log" ||
  ! grep -q 'Invalid write of size' "$tmp/uaf.log"; then
  echo "FAIL (b): memcheck did not report the use after free (exit $rc):" >&2
  show "$tmp/uaf.log"
  fail=1
else
  echo "PASS (b): use after free reported as invalid read and write"
fi

# (c) uninitialised malloc memory is undefined, calloc memory is not
rc=$(vg undef "$tmp/undef.log" malloc)
if [ "$rc" -ne 99 ] || ! grep -q 'depends on uninitialised value' "$tmp/undef.log"; then
  echo "FAIL (c): a branch on fresh malloc memory was not reported (exit $rc):" >&2
  show "$tmp/undef.log"
  fail=1
else
  echo "PASS (c): fresh malloc memory reads as uninitialised"
fi
rc=$(vg undef "$tmp/undef-calloc.log" calloc)
if [ "$rc" -ne 0 ]; then
  echo "FAIL (c): memcheck reported errors on calloc memory (exit $rc):" >&2
  show "$tmp/undef-calloc.log"
  fail=1
else
  echo "PASS (c): calloc memory reads as defined"
fi

exit $fail
