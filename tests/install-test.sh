#!/bin/bash
# install-test.sh: install the smalloc Debian packages and use them the way a
# user of the system would, then purge them and check nothing is left.
#
#   tests/install-test.sh                 build the packages from this tree first
#   tests/install-test.sh DEB... | DIR    use libsmalloc0_*.deb, libsmalloc-dev_*.deb
#                                         and smalloc_*.deb given (or found in DIR)
#
# Needs root (apt-get install/purge), a C compiler, pkg-config, python3 and
# man-db.  Not part of make check: it changes the system.  Exits non-zero on
# the first failure.
set -euo pipefail

srcdir=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/smalloc-install.XXXXXX")
chmod 755 "$work"   # apt's _apt user reads local .debs from here
installed=no

say()  { printf 'install-test: %s\n' "$*"; }
fail() { printf 'install-test: FAIL: %s\n' "$*" >&2; exit 1; }
pass() { printf 'install-test: ok: %s\n' "$*"; }

cleanup() {
  local rc=$?
  if [ "$installed" = yes ]; then
    say "purging the packages after a failure"
    apt-get purge -y -q smalloc libsmalloc-dev libsmalloc0 >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || fail "must run as root (it installs and purges packages)"
for tool in apt-get dpkg cc pkg-config python3; do
  command -v "$tool" >/dev/null || fail "$tool not found (run ./bootstrap as root)"
done

# Copy the source tree (tracked files and new, not ignored ones; no build
# products) so the package build never writes into the work tree.
export_tree() {
  local from=$1 to=$2
  mkdir -p "$to"
  if git -C "$from" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$from" && git ls-files -z --cached --others --exclude-standard) |
      while IFS= read -r -d '' f; do
        [ -f "$from/$f" ] || [ -L "$from/$f" ] || continue
        mkdir -p "$to/$(dirname "$f")"
        cp -a "$from/$f" "$to/$f"
      done
  else
    (cd "$from" && tar --exclude=.git -cf - .) | (cd "$to" && tar -xf -)
  fi
}

# ---- the packages --------------------------------------------------------
debs=()
if [ $# -eq 0 ]; then
  command -v dpkg-buildpackage >/dev/null || fail "dpkg-buildpackage not found (run ./bootstrap as root)"
  say "building the packages in $work/build"
  export_tree "$srcdir" "$work/build/smalloc"
  (cd "$work/build/smalloc" && dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1 ||
    { tail -n 60 "$work/build.log" >&2; fail "dpkg-buildpackage failed"; }
  set -- "$work/build"
fi
for arg in "$@"; do
  if [ -d "$arg" ]; then
    for f in "$arg"/libsmalloc0_*.deb "$arg"/libsmalloc-dev_*.deb "$arg"/smalloc_*.deb; do
      [ -e "$f" ] && debs+=("$f")
    done
  else
    [ -f "$arg" ] || fail "no such file: $arg"
    debs+=("$arg")
  fi
done
lib_deb='' dev_deb='' cmd_deb=''
for f in "${debs[@]}"; do
  case $(basename "$f") in
    libsmalloc0_*.deb)    lib_deb=$f ;;
    libsmalloc-dev_*.deb) dev_deb=$f ;;
    smalloc_*.deb)        cmd_deb=$f ;;
    *) say "ignoring $f" ;;
  esac
done
[ -n "$lib_deb" ] || fail "no libsmalloc0_*.deb given"
[ -n "$dev_deb" ] || fail "no libsmalloc-dev_*.deb given"
[ -n "$cmd_deb" ] || fail "no smalloc_*.deb given"
cp "$lib_deb" "$dev_deb" "$cmd_deb" "$work/"
chmod 644 "$work"/*.deb
lib_deb=$work/$(basename "$lib_deb")
dev_deb=$work/$(basename "$dev_deb")
cmd_deb=$work/$(basename "$cmd_deb")
say "packages: $(basename "$lib_deb") $(basename "$dev_deb") $(basename "$cmd_deb")"

# ---- install -------------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
installed=yes
apt-get install -y -q "$lib_deb" "$dev_deb" "$cmd_deb" >"$work/install.log" 2>&1 ||
  { cat "$work/install.log" >&2; fail "apt-get install"; }
for p in libsmalloc0 libsmalloc-dev smalloc; do
  [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p")" = "ii " ] || fail "$p is not installed"
done
pass "apt-get install of the three packages"

# Record what the packages own, to check the purge afterwards.
dpkg -L libsmalloc0 libsmalloc-dev smalloc | sort -u >"$work/owned"
grep -q '^/usr/bin/smalloc$' "$work/owned" || fail "smalloc ships no /usr/bin/smalloc"
grep -q '^/usr/share/doc/libsmalloc0/README' "$work/owned" || fail "libsmalloc0 ships no README"
grep -q '/libsmalloc\.so\.0$' "$work/owned" || fail "libsmalloc0 ships no libsmalloc.so.0"
grep -q '/libsmalloc\.so$' "$work/owned" || fail "libsmalloc-dev ships no libsmalloc.so"
grep -q '/smalloc\.pc$' "$work/owned" || fail "libsmalloc-dev ships no smalloc.pc"
grep -q '^/usr/include/smalloc\.h$' "$work/owned" || fail "libsmalloc-dev ships no smalloc.h"
if grep -q '\.la$' "$work/owned"; then fail "a libtool .la file is shipped"; fi

version=$(dpkg-query -W -f='${Version}' libsmalloc0)
version=${version%-*}
modversion=$(pkg-config --modversion smalloc) || fail "pkg-config does not find smalloc"
[ "$modversion" = "$version" ] ||
  fail "pkg-config --modversion smalloc says '$modversion', package version is '$version'"
pass "pkg-config --modversion smalloc = $modversion"
[ "$(pkg-config --static --libs smalloc)" = "$(pkg-config --libs smalloc)" ] ||
  fail "pkg-config --static --libs differs from --libs, but no static library is shipped"
if grep -q '\.a$' "$work/owned"; then fail "a static library is shipped"; fi

# ---- a consumer program --------------------------------------------------
cat >"$work/consumer.c" <<'EOF'
/* Links with -lsmalloc: the libc malloc names now reach smalloc. */
#include <smalloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void)
{
  enum { N = 100 };
  smalloc_stats_t before = { .size = sizeof before };
  smalloc_stats_t after = { .size = sizeof after };
  void *p[N];

  if (smalloc_stats_get(&before) != 0) {
    fprintf(stderr, "consumer: smalloc_stats_get failed\n");
    return 1;
  }
  for (int i = 0; i < N; i++) {
    p[i] = malloc(16 + (size_t)i * 8);
    if (p[i] == NULL)
      return 1;
    memset(p[i], 0xa5, 16 + (size_t)i * 8);
  }
  size_t usable = smalloc_malloc_usable_size(p[0]);
  for (int i = 0; i < N; i++)
    free(p[i]);
  if (smalloc_stats_get(&after) != 0)
    return 1;

  printf("version=%u calls_malloc=%llu calls_free=%llu usable=%zu\n",
         (unsigned)after.version,
         (unsigned long long)(after.calls_malloc - before.calls_malloc),
         (unsigned long long)(after.calls_free - before.calls_free), usable);
  if (after.version != SMALLOC_STATS_VERSION)
    return 2;
  if (after.calls_malloc - before.calls_malloc < N)
    return 3;
  if (after.calls_free - before.calls_free < N)
    return 4;
  if (usable < 16)
    return 5;
  return 0;
}
EOF
# shellcheck disable=SC2046 # pkg-config output is split on purpose
cc -Wall -Wextra -Werror -o "$work/consumer" "$work/consumer.c" \
  $(pkg-config --cflags --libs smalloc) || fail "compiling a consumer with pkg-config flags"
linked=$(ldd "$work/consumer" | awk '$1 == "libsmalloc.so.0" { print $3 }')
shipped=$(grep '/libsmalloc\.so\.0$' "$work/owned" | head -n 1)
[ -n "$linked" ] && [ "$(readlink -f "$linked")" = "$(readlink -f "$shipped")" ] ||
  { ldd "$work/consumer" >&2; fail "consumer is not linked to the installed $shipped"; }
out=$("$work/consumer") || fail "consumer exited $? ($out): smalloc did not serve its malloc/free calls"
pass "consumer linked with -lsmalloc: $out"

if command -v c++ >/dev/null; then
  printf '#include <smalloc.h>\nint main() { smalloc_stats_t s = {}; s.size = sizeof s;\n  return smalloc_stats_get(&s); }\n' \
    >"$work/consumer.cc"
  # shellcheck disable=SC2046
  c++ -Wall -Werror -o "$work/consumer-cxx" "$work/consumer.cc" $(pkg-config --cflags --libs smalloc) ||
    fail "compiling smalloc.h as C++"
  "$work/consumer-cxx" || fail "C++ consumer exited $?"
  pass "smalloc.h compiles and links from C++"
fi

# ---- LD_PRELOAD into programs that know nothing of smalloc ---------------
# The figures come as one JSON object on stderr at exit; find it and read
# calls_malloc from it.
check_json() {   # NAME FILE
  python3 - "$1" "$2" <<'EOF'
import json, sys
name, path = sys.argv[1], sys.argv[2]
text = open(path, encoding="utf-8", errors="replace").read()
dec = json.JSONDecoder()
def find(o, key):
    if isinstance(o, dict):
        if key in o:
            return o[key]
        for v in o.values():
            r = find(v, key)
            if r is not None:
                return r
    elif isinstance(o, list):
        for v in o:
            r = find(v, key)
            if r is not None:
                return r
    return None
i = text.find("{")
while i >= 0:
    try:
        obj, _ = dec.raw_decode(text[i:])
    except ValueError:
        i = text.find("{", i + 1)
        continue
    n = find(obj, "calls_malloc")
    if isinstance(n, int):
        print(f"{name}: calls_malloc={n}")
        sys.exit(0 if n > 0 else 1)
    i = text.find("{", i + 1)
print(f"{name}: no JSON object with calls_malloc on stderr:\n{text[-2000:]}")
sys.exit(1)
EOF
}
run_preloaded() {   # NAME CMD...
  local name=$1; shift
  SMALLOC_STATS=json LD_PRELOAD=libsmalloc.so.0 "$@" >"$work/$name.out" 2>"$work/$name.err" ||
    { cat "$work/$name.err" >&2; fail "$name exited non-zero under LD_PRELOAD"; }
  msg=$(check_json "$name" "$work/$name.err") || { echo "$msg" >&2; fail "$name: smalloc served no malloc"; }
  pass "LD_PRELOAD=libsmalloc.so.0 $msg"
}
run_preloaded ls ls -l /usr/bin
py=$(command -v /usr/bin/python3 python3 | head -n 1)
run_preloaded python3 "$py" -c 'import json; d = {str(i): list(range(i % 50)) for i in range(20000)}; print(len(json.dumps(d)))'

# ---- the smalloc command, with the installed library ---------------------
[ "$(smalloc version)" = "smalloc $version" ] || fail "smalloc version says '$(smalloc version)'"
smalloc stats --top -o "$work/cmd.report" ls -l /usr/bin >/dev/null || fail "smalloc stats ls exited $?"
grep -q '^smalloc .* statistics: ls (pid [0-9]*)$' "$work/cmd.report" ||
  { cat "$work/cmd.report" >&2; fail "smalloc stats printed no report"; }
grep -q '^  calls_malloc  *[1-9]' "$work/cmd.report" || fail "smalloc stats: no malloc counted"
smalloc run sh -c 'exit 7' && rc=0 || rc=$?
[ $rc -eq 7 ] || fail "smalloc run: exit status $rc, want 7"
pass "smalloc stats and run with the installed library"

# ---- manual pages --------------------------------------------------------
mapfile -t pages < <(grep -E '^/usr/share/man/man[0-9][^/]*/[^/]+$' "$work/owned" || true)
[ ${#pages[@]} -gt 0 ] || fail "libsmalloc-dev ships no manual page"
dpkg-deb -c "$dev_deb" | grep -E '/usr/share/man/man[0-9]/smalloc\.[0-9]' >/dev/null ||
  fail "the package holds no smalloc manual page"
excluded=$(grep -lsE '^[[:space:]]*path-exclude[[:space:]=]+/usr/share/man' /etc/dpkg/dpkg.cfg.d/* || true)
if [ -n "$excluded" ]; then
  say "SKIP man -w: dpkg is set to drop /usr/share/man (path-exclude in: $excluded)."
  say "      The pages are in the package; remove that line and reinstall to get them."
elif ! command -v man >/dev/null; then
  fail "man not found (install man-db)"
else
  for f in "${pages[@]}"; do
    [ -e "$f" ] || fail "$f listed by dpkg but not on disk"
  done
  where=$(man -w smalloc) || fail "man -w smalloc finds no page"
  pass "man -w smalloc: $where"
  n=0
  for f in "${pages[@]}"; do
    b=$(basename "$f"); b=${b%.gz}; sect=${b##*.}; name=${b%.*}
    man -w "$sect" "$name" >/dev/null || fail "man -w $sect $name finds no page"
    n=$((n + 1))
  done
  pass "man -w finds all $n installed pages"
fi

# ---- purge ---------------------------------------------------------------
apt-get purge -y -q smalloc libsmalloc-dev libsmalloc0 >"$work/purge.log" 2>&1 ||
  { cat "$work/purge.log" >&2; fail "apt-get purge"; }
installed=no
for p in libsmalloc0 libsmalloc-dev smalloc; do
  st=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
  case $st in ''|'un '|'pn ') ;; *) fail "$p still known to dpkg after purge (status '$st')" ;; esac
done
left=0
while IFS= read -r f; do
  [ "$f" = "/." ] && continue
  if [ -d "$f" ] && [ ! -L "$f" ]; then
    # Shared directories (/usr/lib/...) stay; the packages' own must go.
    case $f in *smalloc*) say "left behind: $f/"; left=$((left + 1)) ;; esac
  elif [ -e "$f" ] || [ -L "$f" ]; then
    say "left behind: $f"; left=$((left + 1))
  fi
done <"$work/owned"
[ $left -eq 0 ] || fail "$left file(s) left after purge"
if ldconfig -p | grep libsmalloc >/dev/null; then fail "ldconfig cache still lists libsmalloc"; fi
pass "purge removed all $(wc -l <"$work/owned") paths the packages owned"

say "all checks passed"
