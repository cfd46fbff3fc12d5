#!/bin/sh
# probes.sh: the USDT tracepoints (lib/probes.h, smalloc(7) TRACEPOINTS).
#
#   - the probes in the built library (readelf -n) are the probes that
#     smalloc(7) lists, no more and no fewer;
#   - where perf can attach to them (root, a kernel with uprobes), each
#     fires exactly as often as the counter its entry in smalloc(7) names
#     is incremented, in a python3 program that allocates, frees, trims
#     and asks for more than the machine has.
#
# Exit 0 on success, 1 on failure, 77 (skip) in a build without
# <sys/sdt.h>, 99 when the test cannot run.

top_srcdir=${top_srcdir:-$(dirname "$0")/..}
top_builddir=${top_builddir:-.}
guide=$top_srcdir/man/smalloc.7
lib=$(cd "$top_builddir/lib/.libs" 2>/dev/null && pwd)/libsmalloc.so

hard() { echo "probes.sh: $*" >&2; exit 99; }
[ -f "$guide" ] || hard "$guide not found"
[ -f "$lib" ] || hard "$lib not found"
[ -f "$top_builddir/config.h" ] || hard "$top_builddir/config.h not found"
command -v readelf >/dev/null 2>&1 || hard "readelf not found"

failed=0
fail() { echo "probes.sh: FAIL: $*" >&2; failed=$((failed + 1)); }

# "probe counter" per entry of TRACEPOINTS: ".BR smalloc:NAME (args)" and
# the counter, the entry's last ".IR name ." line
documented=$(awk '
  /^\.SH / { in_tp = ($2 == "TRACEPOINTS"); next }
  !in_tp { next }
  /^\.BR smalloc:/ { if (probe != "") print probe, counter; sub(/^\.BR smalloc:/, ""); probe = $1; counter = ""; next }
  /^\.IR [a-z_]+ \.$/ && probe != "" { counter = $2 }
  /^\.PP/ { if (probe != "") print probe, counter; probe = "" }
  END { if (probe != "") print probe, counter }' "$guide")
[ -n "$documented" ] || hard "no probes listed in smalloc(7) TRACEPOINTS"

built=$(readelf -n "$lib" 2>/dev/null | awk '
  /Provider:/ { provider = $2 }
  /Name:/ && provider == "smalloc" { print $2 }' | sort -u)

if ! grep -q '^#define HAVE_SYS_SDT_H 1' "$top_builddir/config.h"; then
  [ -z "$built" ] || fail "built without <sys/sdt.h>, yet the library has probes: $built"
  [ "$failed" = 0 ] || exit 1
  echo "probes.sh: built without <sys/sdt.h> (systemtap-sdt-dev): skipped"
  exit 77
fi

names=$(echo "$documented" | awk '{ print $1 }' | sort -u)
for p in $names; do
  echo "$built" | grep -qx "$p" || fail "smalloc(7) lists smalloc:$p, the library has no such probe"
done
for p in $built; do
  echo "$names" | grep -qx "$p" || fail "the library has probe smalloc:$p, smalloc(7) does not list it"
done
echo "$documented" | while read -r p c; do
  [ -n "$c" ] || echo "probes.sh: FAIL: smalloc(7) names no counter for smalloc:$p" >&2
done | grep -q . && failed=$((failed + 1))
echo "probes.sh: $(echo "$names" | wc -l) probes, as documented"

# Do they fire?  Only where perf may attach uprobes; elsewhere say why.
why=
if [ "$(id -u)" != 0 ]; then why="not root"
elif ! command -v perf >/dev/null 2>&1; then why="perf not installed"
elif ! command -v python3 >/dev/null 2>&1; then why="python3 not installed"
elif nm -D "$lib" 2>/dev/null | grep -q -e '__asan_' -e '__tsan_' -e '__ubsan_'; then
  why="sanitizer build (cannot be preloaded)"
fi
if [ -n "$why" ]; then
  echo "probes.sh: firing not checked: $why"
  [ "$failed" = 0 ] && exit 0 || exit 1
fi

if perf probe -l 2>/dev/null | grep -q 'sdt_smalloc:'; then
  echo "probes.sh: firing not checked: sdt_smalloc events exist already (perf probe -l)"
  [ "$failed" = 0 ] && exit 0 || exit 1
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/smalloc-probes.XXXXXX") || hard "mktemp failed"
real=$(readlink -f "$lib")
added=
cleanup() {
  for e in $added; do perf probe -q -d "$e" >/dev/null 2>&1; done
  rm -rf "$tmp"
}
trap cleanup EXIT
perf buildid-cache -a "$real" >/dev/null 2>&1
events=
for p in $names; do
  if ! perf probe -q -x "$real" -a "sdt_smalloc:$p" >"$tmp/probe.log" 2>&1; then
    echo "probes.sh: firing not checked: perf cannot attach here ($(head -n 1 "$tmp/probe.log"))"
    [ "$failed" = 0 ] && exit 0 || exit 1
  fi
  added="$added sdt_smalloc:$p"
  events="$events${events:+,}sdt_smalloc:$p"
done

cat >"$tmp/load.py" <<'EOF'
import ctypes
keep = []
for r in range(20):
    batch = [bytearray(i % 3000 + 1) for i in range(20000)]
    big = [bytearray(1 << 20) for i in range(8)]
    huge = bytearray(64 << 20)
    del big, huge
    keep.append(batch[::50])
    del batch
try:
    bytearray(1 << 44)
except MemoryError:
    pass
import os, sys
libc = ctypes.CDLL(None)
libc.malloc_trim(0)
# the figures now, and nothing after them: fclose or exit-time frees
# would fire probes that the report at exit would count, or not
libc.fopen.restype = ctypes.c_void_p
f = libc.fopen(sys.argv[1].encode(), b"w")
libc.smalloc_stats_print_json(ctypes.c_void_p(f))
libc.fflush(ctypes.c_void_p(f))
os._exit(0)
EOF
# the interpreter itself, not a wrapper script that runs other programs
# first (their probes would count, their figures not); perf runs on
# smalloc too, but counts only what runs after the exec
py=$(python3 -c 'import sys; print(sys.executable)') || hard "python3 does not run"
# (no purge thread: its work would land between the figures and the exit)
report=$tmp/stats.json
if ! LD_PRELOAD="$lib" SMALLOC_BACKGROUND=0 perf stat -x, -o "$tmp/counts" -e "$events" \
       "$py" "$tmp/load.py" "$report"; then
  fail "python3 under perf stat failed"
  exit 1
fi
[ -s "$report" ] || { fail "python3 wrote no figures"; exit 1; }
echo "$documented" | while read -r p c; do
  fired=$(awk -F, -v e="sdt_smalloc:$p" '$3 == e { print $1 }' "$tmp/counts")
  counted=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' \
              "$report" "$c" 2>/dev/null)
  if [ -z "$fired" ] || [ -z "$counted" ] || [ "$fired" != "$counted" ]; then
    echo "probes.sh: FAIL: smalloc:$p fired ${fired:-?} times, $c is ${counted:-?}" >&2
  else
    echo "probes.sh: smalloc:$p fired $fired times = $c"
  fi
done >"$tmp/result" 2>&1
cat "$tmp/result"
grep -q FAIL "$tmp/result" && failed=$((failed + 1))
# the workload must have reached the probes that matter most
for p in slow_path page_retire os_mmap os_munmap alloc_failed; do
  n=$(awk -F, -v e="sdt_smalloc:$p" '$3 == e { print $1 }' "$tmp/counts")
  [ "${n:-0}" -gt 0 ] 2>/dev/null || fail "smalloc:$p never fired: the workload does not reach it"
done

[ "$failed" = 0 ] || exit 1
exit 0
