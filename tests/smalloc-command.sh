#!/bin/sh
# smalloc-command.sh: the smalloc command (tools/smalloc.c, smalloc(1)).
#
#   version       prints the package's version
#   run           preloads the library first, keeps the program's exit
#                 status, 127 for a program that cannot run, 2 for usage
#   stats         one report for the process tree: the sum of its
#                 processes' reports, exactly (two runs of ls add up to
#                 twice one run's calls), --top the program's alone, -o a
#                 file, the program's stdout left alone, the command's own
#                 allocations in no report, the exit status kept
#
# Exit 0 on success, 1 on failure, 77 (skip) in a sanitizer build (its
# library cannot be preloaded into a program built without the sanitizer),
# 99 when the test cannot run.

top_builddir=${top_builddir:-.}
cmd=$top_builddir/tools/smalloc
lib=$(cd "$top_builddir/lib/.libs" 2>/dev/null && pwd)/libsmalloc.so

hard() { echo "smalloc-command.sh: $*" >&2; exit 99; }
[ -x "$cmd" ] || hard "$cmd not found (build it first)"
[ -f "$lib" ] || hard "$lib not found"
if nm -D "$lib" 2>/dev/null | grep -q -e '__asan_' -e '__tsan_' -e '__msan_' -e '__ubsan_'; then
  echo "smalloc-command.sh: sanitizer build: skipped"
  exit 77
fi
command -v ls >/dev/null 2>&1 || hard "ls not found"
ls=$(command -v ls)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/smalloc-cmd.XXXXXX") || hard "mktemp failed"
trap 'rm -rf "$tmp"' EXIT
failed=0
fail() { echo "smalloc-command.sh: FAIL: $*" >&2; failed=$((failed + 1)); }

# the figure NAME of a report (the table's "  NAME   value" line)
figure() { sed -n "s/^  $1  *\\([0-9][0-9]*\\)\$/\\1/p" "$2"; }

# version
v=$("$cmd" version) || fail "version: exit status $?"
want=$(sed -n 's/^#define PACKAGE_VERSION "\(.*\)"/\1/p' "$top_builddir/config.h")
[ "$v" = "smalloc $want" ] || fail "version printed '$v', want 'smalloc $want'"

# run: the exit status, LD_PRELOAD with the library first
"$cmd" run --lib "$lib" sh -c 'exit 3'
rc=$?; [ $rc -eq 3 ] || fail "run: exit status $rc, want 3"
p=$(LD_PRELOAD=/nonexistent-other.so "$cmd" run --lib "$lib" sh -c 'echo "$LD_PRELOAD"' 2>/dev/null)
[ "$p" = "$lib:/nonexistent-other.so" ] || fail "run: LD_PRELOAD is '$p'"
"$cmd" run --lib "$lib" "$tmp/no-such-program" 2>"$tmp/err"
rc=$?; [ $rc -eq 127 ] || fail "run of a missing program: exit status $rc, want 127"
grep -q "cannot run" "$tmp/err" || fail "run of a missing program: no message"
"$cmd" frobnicate 2>/dev/null
rc=$?; [ $rc -eq 2 ] || fail "unknown command: exit status $rc, want 2"
"$cmd" stats --lib "$lib" 2>/dev/null
rc=$?; [ $rc -eq 2 ] || fail "stats without a program: exit status $rc, want 2"

# stats --top: one process's report; the program's output untouched
"$cmd" stats --lib "$lib" --top -o "$tmp/one" "$ls" / >"$tmp/out" 2>"$tmp/err"
rc=$?; [ $rc -eq 0 ] || fail "stats --top ls: exit status $rc"
"$ls" / >"$tmp/want"
cmp -s "$tmp/out" "$tmp/want" || fail "stats --top ls: the program's output changed"
[ -s "$tmp/err" ] && fail "stats --top ls: stderr: $(cat "$tmp/err")"
grep -q "statistics: ls (pid [0-9]*)" "$tmp/one" || fail "stats --top: no title line: $(head -1 "$tmp/one")"
one=$(figure calls_malloc "$tmp/one")
[ -n "$one" ] && [ "$one" -gt 0 ] || fail "stats --top ls: calls_malloc '$one'"

# stats: the tree's sum, exactly; the command's own report never appears
# (sh runs one ls and becomes the other, so whatever shell sh is, the
# tree's reports are those of the two ls)
SMALLOC_STATS=1 "$cmd" stats --lib "$lib" -o "$tmp/two" sh -c "'$ls' / >/dev/null; exec '$ls' / >/dev/null" 2>"$tmp/err"
rc=$?; [ $rc -eq 0 ] || fail "stats: exit status $rc"
[ -s "$tmp/err" ] && fail "stats: stderr: $(cat "$tmp/err")"
grep -q "statistics: ls and the processes it started (2 reports, summed)" "$tmp/two" ||
  fail "stats: title line: $(head -1 "$tmp/two")"
two=$(figure calls_malloc "$tmp/two")
[ "$two" = $((2 * one)) ] || fail "stats: calls_malloc $two for two runs of ls, one run $one"
[ "$(grep -c '^smalloc .* statistics' "$tmp/two")" -eq 1 ] || fail "stats: more than one report"

# a program ended by a signal: 128 + its number, and no report, said (on
# stderr, where reports go by default)
"$cmd" stats --lib "$lib" --top sh -c 'kill -KILL $$' >/dev/null 2>"$tmp/err"
rc=$?; [ $rc -eq 137 ] || fail "stats of a killed program: exit status $rc, want 137"
grep -q "no report from sh itself" "$tmp/err" || fail "stats of a killed program: $(cat "$tmp/err")"
"$cmd" stats --lib "$lib" sh -c 'exit 6' >/dev/null 2>"$tmp/err"
rc=$?; [ $rc -eq 6 ] || fail "stats: exit status $rc, want 6"

echo "smalloc-command.sh: $failed failures"
[ $failed -eq 0 ]
