#!/bin/sh
# Instructions per malloc(32)+free pair (churn case a), counted by callgrind
# for the fresh library, glibc, mimalloc (when installed), BASELINE (when
# set), the null allocator (NULLLIB, when set: nullalloc.c, the least an
# allocator behind a call can do) and the ideal floor (the same loop on a
# plain free list, no malloc).
# Start-up and exit cost cancel out: each figure is (I(2N) - I(N)) / N.
# The loop itself is in every figure; "above floor" is the allocator alone
# minus what the cheapest possible list costs.
#
#   callgrind.sh [BENCH_CHURN [FRESH_LIB]]      N=iterations (default 200000)
set -eu

churn=${1:-./bench_churn}
fresh=${2:-${FRESH:-../lib/.libs/libsmalloc.so.0}}
n=${N:-200000}

if ! command -v valgrind >/dev/null 2>&1; then
  echo "callgrind.sh: valgrind is not installed (apt-get install valgrind)"
  exit 77
fi
if [ ! -x "$churn" ]; then
  echo "callgrind.sh: $churn not found (make bench_churn first)"
  exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

# instructions PRELOAD MODE COUNT: total Ir of one run
instructions() {
  LD_PRELOAD=$1 valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out" \
    "$churn" "$2" "$3" >"$tmp/stdout" 2>"$tmp/stderr" || {
    echo "callgrind.sh: run failed: $churn $2 $3 (preload '${1:-none}')" >&2
    tail -5 "$tmp/stderr" >&2
    return 1
  }
  awk '/^(summary|totals):/ { print $2; exit }' "$tmp/cg.out"
}

# per_pair PRELOAD MODE: (I(2N) - I(N)) / N with two decimals
per_pair() {
  i1=$(instructions "$1" "$2" "$n") || return 1
  i2=$(instructions "$1" "$2" $((2 * n))) || return 1
  awk -v a="$i1" -v b="$i2" -v n="$n" 'BEGIN { printf "%.2f", (b - a) / n }'
}

lookup() {
  ldconfig -p 2>/dev/null | awk -v so="$1" '$1 == so && /x86-64|64bit/ { print $NF; exit }'
}

unset SMALLOC_STATS SMALLOC_VERBOSE 2>/dev/null || true

echo "instructions per malloc(32)+free pair, callgrind, (I(2N)-I(N))/N with N=$n"
floor=$(per_pair "" floor)
printf '  %-10s %8s\n' floor "$floor"

report() {
  if v=$(per_pair "$2" a); then
    printf '  %-10s %8s   (%s above floor)\n' "$1" "$v" \
      "$(awk -v a="$v" -v f="$floor" 'BEGIN { printf "%.2f", a - f }')"
  else
    printf '  %-10s %8s\n' "$1" failed
    status=1
  fi
}

status=0
if [ -e "$fresh" ]; then
  report fresh "$fresh"
else
  echo "  fresh      (not built: $fresh)"
fi
if [ -n "${BASELINE:-}" ]; then
  report baseline "$BASELINE"
fi
if [ -n "${NULLLIB:-}" ] && [ -e "$NULLLIB" ]; then
  report null "$NULLLIB"
fi
report glibc ""
mi=$(lookup libmimalloc.so.2)
if [ -n "$mi" ]; then
  report mimalloc "$mi"
else
  echo "  mimalloc   (not installed)"
fi
exit $status
