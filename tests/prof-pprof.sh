#!/bin/sh
# prof-pprof.sh: google-pprof reads the heap profile smalloc writes
# (smalloc_prof(3)) and names the functions that allocated, with their
# shares: test_prof --dump allocates 3 bytes in prof_site_a for each byte
# in prof_site_b.
#
# Exit 0 on success, 1 on failure, 77 (skip) without google-pprof
# (Debian package google-perftools) or in a sanitizer build, 99 when the
# test cannot run.

top_builddir=${top_builddir:-.}
tests=$top_builddir/tests

command -v google-pprof >/dev/null 2>&1 || { echo "prof-pprof.sh: google-pprof not installed: skipped"; exit 77; }
[ -x "$tests/test_prof" ] || { echo "prof-pprof.sh: $tests/test_prof not found" >&2; exit 99; }
# the program itself, not libtool's wrapper script, for the symbols
prog=$tests/.libs/test_prof
[ -x "$prog" ] || prog=$tests/test_prof
if nm "$prog" 2>/dev/null | grep -q -e '__asan_' -e '__tsan_'; then
  echo "prof-pprof.sh: sanitizer build: skipped"
  exit 77
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/smalloc-pprof.XXXXXX") || exit 99
trap 'rm -rf "$tmp"' EXIT
"$tests/test_prof" --dump "$tmp/p.heap" || { echo "prof-pprof.sh: FAIL: test_prof --dump failed" >&2; exit 1; }
google-pprof --text "$prog" "$tmp/p.heap" >"$tmp/text" 2>"$tmp/err" ||
  { echo "prof-pprof.sh: FAIL: google-pprof failed:" >&2; cat "$tmp/err" >&2; exit 1; }
cat "$tmp/text"
# "flat flat% sum% cum cum% name": each site's flat share of the total
a=$(awk '$6 == "prof_site_a" { sub("%", "", $2); print $2 }' "$tmp/text")
b=$(awk '$6 == "prof_site_b" { sub("%", "", $2); print $2 }' "$tmp/text")
[ -n "$a" ] && [ -n "$b" ] || { echo "prof-pprof.sh: FAIL: google-pprof does not name prof_site_a and prof_site_b" >&2; exit 1; }
# 75 % and 25 %, within a fifth either way (4 MiB in site b: ~500 samples)
if awk -v a="$a" -v b="$b" 'BEGIN { exit !(a > 60 && a < 90 && b > 10 && b < 40) }'; then
  echo "prof-pprof.sh: prof_site_a $a %, prof_site_b $b % (allocated 75 %, 25 %)"
  exit 0
fi
echo "prof-pprof.sh: FAIL: prof_site_a $a %, prof_site_b $b %, want about 75 % and 25 %" >&2
exit 1
