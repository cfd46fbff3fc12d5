#!/bin/sh
# cost-claims.sh: the fast paths cost what lib/internal.h says.
#
# The comments above sm_malloc_small and sm_free_inline state how many
# instructions malloc and free execute to their ret.  callgrind counts
# them exactly (the same binary, inputs and environment give the same
# count, whatever else the machine does): a loop of N and of 2N
# malloc(32)+free pairs, and the instructions charged to malloc and to
# free themselves, (I(2N) - I(N)) / N each, are each call's cost (the
# rare slow-path entry adds a fraction).  The test fails when a measured
# cost exceeds its claim by more than two instructions, so a change that
# makes a fast path dearer must say so where the cost is stated.
#
#   cost-claims.sh            the check (make check)
#   cost-claims.sh --report   print measured and claimed, never fail
#                             (make bench-callgrind)
#
# Exit 0 on success, 1 on failure, 77 (skip) where the figures do not
# apply: no valgrind, a sanitizer or the secure build (whose fast paths
# do more), some of the fast paths' checks off but not all, 99 when the
# test cannot run.

top_srcdir=${top_srcdir:-$(dirname "$0")/..}
top_builddir=${top_builddir:-.}
CC=${CC:-cc}
libdir=$top_builddir/lib/.libs
lib=$libdir/libsmalloc.so
report=no
[ "${1:-}" = --report ] && report=yes
n=${N:-100000}

skip() { echo "cost-claims.sh: $*: skipped"; exit 77; }
hard() { echo "cost-claims.sh: $*" >&2; exit 99; }

command -v valgrind >/dev/null 2>&1 || skip "valgrind is not installed"
command -v callgrind_annotate >/dev/null 2>&1 || skip "callgrind_annotate is not installed"
[ -f "$top_builddir/config.h" ] || hard "$top_builddir/config.h not found"
grep -q '^#define SM_SECURE 1' "$top_builddir/config.h" && skip "secure build"
[ -f "$lib" ] || hard "$lib not found (build the library first)"
libdir=$(cd "$libdir" && pwd)
if nm -D "$lib" 2>/dev/null | grep -q -e '__asan_' -e '__tsan_' -e '__msan_' -e '__ubsan_'; then
  skip "smalloc was built with a sanitizer"
fi

# the claims: "malloc is N instructions to its ret", "Free on the owner
# thread: N instructions to its ret"
header=$top_srcdir/lib/internal.h
claim_malloc=$(sed -n 's/.*malloc is \([0-9][0-9]*\) instructions to its ret.*/\1/p' "$header" | head -n 1)
claim_free=$(sed -n 's/.*Free on the owner thread: \([0-9][0-9]*\) instructions to its ret.*/\1/p' "$header" | head -n 1)
[ -n "$claim_malloc" ] && [ -n "$claim_free" ] || hard "no cost claims found in $header"
# the fast paths' checks (configure --enable-checks): the claims above
# are for all of them; with none, "with --disable-checks malloc is N
# instructions" and "... free is N instructions" (the comment may break
# the line after "with"); a build with some of them has no claim
checks=$(sed -n 's/^#define SM_CHECK_[A-Z_]* \([01]\)$/\1/p' "$top_builddir/config.h" | sort -u | tr -d '\n')
case $checks in
  1|"") ;;
  0)
    nochecks=$(tr '\n' ' ' <"$header" | sed 's/ \* / /g; s/  */ /g')
    claim_malloc=$(echo "$nochecks" | sed -n 's/.*with --disable-checks malloc is \([0-9][0-9]*\) instructions.*/\1/p')
    claim_free=$(echo "$nochecks" | sed -n 's/.*with --disable-checks free is \([0-9][0-9]*\) instructions.*/\1/p')
    [ -n "$claim_malloc" ] && [ -n "$claim_free" ] || hard "no --disable-checks cost claims found in $header"
    ;;
  *)
    [ "$report" = yes ] || skip "some of the fast paths' checks are off (the claims are for all or none)"
    claim_malloc="no figure for some checks" claim_free="no figure for some checks"
    ;;
esac

tmp=$(mktemp -d "${TMPDIR:-/tmp}/smalloc-cost.XXXXXX") || hard "mktemp failed"
trap 'rm -rf "$tmp"' EXIT INT TERM

cat >"$tmp/loop.c" <<'EOF'
#include <stdlib.h>
#include <smalloc.h>
int main(int argc, char **argv)
{
  long n = argc > 1 ? atol(argv[1]) : 0;
  /* live throughout, so that no free empties the page (the path the
   * claim counts; an emptied page takes a few more) */
  void *anchor = smalloc_malloc(32);
  __asm__ volatile("" : : "r"(anchor) : "memory");
  for (long i = 0; i < n; i++) {
    void *p = smalloc_malloc(32);
    __asm__ volatile("" : : "r"(p) : "memory");
    smalloc_free(p);
  }
  return 0;
}
EOF
$CC -O2 -I"$top_srcdir/include" -o "$tmp/loop" "$tmp/loop.c" -L"$libdir" -lsmalloc \
  -Wl,-rpath,"$libdir" >"$tmp/cc.log" 2>&1 || { cat "$tmp/cc.log"; hard "cannot build the loop"; }

# self cost of the functions named $2 (a regex: the entry point and its
# aliases) in a run of $1 pairs
self_cost() {
  SMALLOC_BACKGROUND=0 valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.$1" \
    "$tmp/loop" "$1" >/dev/null 2>"$tmp/vg.log" || { cat "$tmp/vg.log"; hard "callgrind failed"; }
  callgrind_annotate --inclusive=no --threshold=100 "$tmp/cg.$1" 2>/dev/null |
    awk -v re="$2" '{ gsub(",", "", $1) }
      $1 ~ /^[0-9]+$/ { f = $NF; if (f ~ /^\[/) f = $(NF - 1); sub(/^.*:/, "", f)
                        if (f ~ re) s += $1 }
      END { print s + 0 }'
}

per_call() {   # REGEX: (I(2N) - I(N)) / N of those functions
  a=$(self_cost "$n" "$1")
  b=$(self_cost $((2 * n)) "$1")
  awk -v a="$a" -v b="$b" -v n="$n" 'BEGIN { printf "%.2f", (b - a) / n }'
}

m=$(per_call '^(__libc_malloc|malloc|smalloc_malloc)$')
f=$(per_call '^(__libc_free|free|smalloc_free|cfree)$')
echo "instructions per call, callgrind, malloc(32) and free in a loop (N=$n):"
echo "  malloc  $m  (internal.h says $claim_malloc)"
echo "  free    $f  (internal.h says $claim_free)"
[ "$report" = yes ] && exit 0

status=0
for pair in "malloc $m $claim_malloc" "free $f $claim_free"; do
  # shellcheck disable=SC2086 # split on purpose
  set -- $pair
  if awk -v got="$2" -v want="$3" 'BEGIN { exit !(got + 0 <= want + 2) }'; then :; else
    echo "cost-claims.sh: $1 costs $2 instructions per call, lib/internal.h says $3" >&2
    status=1
  fi
  if awk -v got="$2" 'BEGIN { exit !(got + 0 < 5) }'; then
    echo "cost-claims.sh: $1 measured at $2 instructions: the count is not attributed" >&2
    status=1
  fi
done
exit $status
