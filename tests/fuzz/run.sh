#!/bin/sh
# run.sh: build the libFuzzer target tests/fuzz/fuzz_alloc.c with the
# library compiled in (lib/*.c, libc names not exported) and run it.
#
#   tests/fuzz/run.sh                 from the source or a build directory
#   FUZZ_SECONDS=600 tests/fuzz/run.sh
#   tests/fuzz/run.sh crash-1234...   replay inputs instead of fuzzing
#
# Environment:
#   FUZZ_SECONDS   how long to fuzz (default 60)
#   FUZZ_JOBS      parallel fuzzing processes (default 1)
#   FUZZ_BUILDDIR  a configured build directory whose config.h to use
#                  (default: $top_builddir, the current directory, or a
#                  fresh configure in the work directory)
#   FUZZ_CORPUS    a directory that keeps the corpus between runs (default:
#                  a copy of tests/fuzz/corpus in the work directory)
#   FUZZ_ARTIFACTS where crash and timeout inputs go (default ./fuzz-artifacts)
#   CLANG          the compiler (default clang)
# Prints the number of executions.  Exit 0 when nothing was found, 1 on a
# finding (the input is kept in FUZZ_ARTIFACTS and the work directory is
# kept for replay), 77 when clang or libFuzzer is missing, 99 when the
# fuzzer cannot be built.

here=$(cd "$(dirname "$0")" && pwd)
srcdir=$(cd "$here/../.." && pwd)
CLANG=${CLANG:-clang}
seconds=${FUZZ_SECONDS:-60}
jobs=${FUZZ_JOBS:-1}
artifacts=${FUZZ_ARTIFACTS:-$(pwd)/fuzz-artifacts}

skip() { echo "fuzz: $*: skipped"; exit 77; }
hard() { echo "fuzz: $*" >&2; exit 99; }

command -v "$CLANG" >/dev/null 2>&1 || skip "$CLANG is not installed"

work=$(mktemp -d "${TMPDIR:-/tmp}/smalloc-fuzz.XXXXXX") || hard "mktemp failed"
keep_work=no
# shellcheck disable=SC2317 # called by the trap
cleanup() { [ "$keep_work" = yes ] || rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n)\n{ (void)d; (void)n; return 0; }\n' \
  >"$work/probe.c"
"$CLANG" -fsanitize=fuzzer -o "$work/probe" "$work/probe.c" >/dev/null 2>&1 ||
  skip "$CLANG cannot build with -fsanitize=fuzzer (libFuzzer missing)"

# config.h of a configured tree, without SM_OVERRIDE: the fuzzer keeps the
# system malloc for itself and libFuzzer, and only smalloc_* reach smalloc.
config=
for d in "${FUZZ_BUILDDIR:-}" "${top_builddir:-}" . "$srcdir"; do
  if [ -n "$d" ] && [ -f "$d/config.h" ]; then
    config=$d/config.h
    break
  fi
done
mkdir -p "$work/inc"
if [ -n "$config" ]; then
  grep -v 'define SM_OVERRIDE' "$config" >"$work/inc/config.h"
else
  echo "fuzz: no configured build found; running configure in $work/cfg"
  mkdir -p "$work/cfg"
  (cd "$work/cfg" && "$srcdir/configure" -q --disable-override >/dev/null) ||
    hard "configure failed"
  cp "$work/cfg/config.h" "$work/inc/config.h"
fi

echo "fuzz: building with $CLANG (config.h from ${config:-configure})"
"$CLANG" -g -O1 -std=gnu11 -pthread -ftls-model=initial-exec \
  -fsanitize=fuzzer,undefined -fno-sanitize-recover=undefined \
  -I"$work/inc" -I"$srcdir/include" -I"$srcdir/lib" \
  "$srcdir"/lib/*.c "$here/fuzz_alloc.c" -o "$work/fuzz_alloc" >"$work/build.log" 2>&1 || {
  cat "$work/build.log" >&2
  hard "building the fuzzer failed"
}

mkdir -p "$artifacts"
if [ $# -gt 0 ]; then
  # replay
  "$work/fuzz_alloc" -runs=1 "$@"
  rc=$?
  if [ $rc -ne 0 ]; then
    keep_work=yes
    echo "fuzz: reproduced (exit $rc); the fuzzer is kept at $work/fuzz_alloc"
    exit 1
  fi
  exit 0
fi

corpus=${FUZZ_CORPUS:-$work/corpus}
mkdir -p "$corpus"
cp "$here"/corpus/* "$corpus"/ 2>/dev/null

echo "fuzz: running for $seconds s with $jobs job(s)"
log=$work/fuzz.log
touch "$work/start"
t0=$(date +%s)
if [ "$jobs" -gt 1 ]; then
  (cd "$work" && ./fuzz_alloc -max_len=4096 -timeout=30 -max_total_time="$seconds" \
    -print_final_stats=1 -artifact_prefix="$artifacts/" -fork="$jobs" \
    "$corpus") >"$log" 2>&1
else
  "$work/fuzz_alloc" -max_len=4096 -timeout=30 -max_total_time="$seconds" \
    -print_final_stats=1 -artifact_prefix="$artifacts/" "$corpus" >"$log" 2>&1
fi
rc=$?
elapsed=$(( $(date +%s) - t0 ))

execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | awk '{s += $1} END {print s + 0}')
if [ "$execs" -eq 0 ]; then
  # fork mode reports progress lines only
  execs=$(sed -n 's/^#\([0-9][0-9]*\).*/\1/p' "$log" | tail -n 1)
fi
echo "fuzz: ${execs:-0} executions in ${elapsed} s, corpus $(find "$corpus" -type f | wc -l) inputs"

found=$(find "$artifacts" -type f -newer "$work/start" | sort)
if [ $rc -ne 0 ] || [ -n "$found" ]; then
  keep_work=yes
  echo "fuzz: FINDING (libFuzzer exit $rc); the log ends:" >&2
  tail -n 40 "$log" >&2
  echo "fuzz: new inputs: ${found:-none}" >&2
  echo "fuzz: replay with $work/fuzz_alloc -runs=1 <input>" >&2
  exit 1
fi
exit 0
