#!/bin/sh
# check-pages.sh: every manual page formats without a single warning.
#
# Run by make check from man/ (srcdir and MAN_PAGES come from Makefile.am);
# by hand: MAN_PAGES='smalloc.3 ...' srcdir=man man/check-pages.sh
#
#   full pages  groff -man -ww -z, for the typesetter and for a terminal,
#               must print nothing; mandoc -Tlint (when installed) may print
#               STYLE notes only.
#   link pages  one line, ".so man3/PAGE.3", naming a full page of this
#               directory (mandoc's note that .so is fragile is expected:
#               Debian installs these links as they are).
#   the list    every *.1, *.3 and *.7 file here is in MAN_PAGES, so make install
#               and make dist miss none.
# Exit 0 when all pass, 1 otherwise, 99 when it cannot run.

srcdir=${srcdir:-$(dirname "$0")}
pages=${MAN_PAGES:-}
if [ -z "$pages" ]; then
  pages=$(cd "$srcdir" && ls -- *.[137] 2>/dev/null)
fi
command -v groff >/dev/null 2>&1 || { echo "check-pages: groff not found" >&2; exit 99; }
have_mandoc=no
command -v mandoc >/dev/null 2>&1 && have_mandoc=yes

tmp=$(mktemp -d "${TMPDIR:-/tmp}/smalloc-man.XXXXXX") || exit 99
trap 'rm -rf "$tmp"' EXIT
failed=0 checked=0

fail() {
  printf 'check-pages: %s\n' "$*" >&2
  failed=$((failed + 1))
}

# $1: file, $2..: command; fails the page when the command prints anything
# or exits non-zero.
quiet() {
  q_page=$1; shift
  "$@" >"$tmp/out" 2>&1 || printf '%s: exit status %s\n' "$*" "$?" >>"$tmp/out"
  if [ -s "$tmp/out" ]; then
    fail "$q_page: $1 complains:"
    sed 's/^/    /' "$tmp/out" >&2
  fi
}

for page in $pages; do
  f=$srcdir/$page
  if [ ! -f "$f" ]; then
    fail "$page: listed but missing"
    continue
  fi
  checked=$((checked + 1))
  first=$(sed -n '1p' "$f")
  case $first in
    .so\ *)
      target=${first#.so }
      case $target in
        man[1-9]/*) ;;
        *) fail "$page: .so target '$target' is not of the form manN/PAGE"; continue ;;
      esac
      [ "$(wc -l <"$f")" -eq 1 ] || fail "$page: a link page holds one .so line only"
      tf=$srcdir/${target#*/}
      if [ ! -f "$tf" ]; then
        fail "$page: .so target $target does not exist"
      elif sed -n '1p' "$tf" | grep -q '^\.so '; then
        fail "$page: .so target $target is itself a link"
      else
        case " $pages " in
          *" ${target#*/} "*) ;;
          *) fail "$page: .so target $target is not installed" ;;
        esac
      fi
      continue
      ;;
  esac
  grep -q '^\.TH ' "$f" || fail "$page: no .TH line"
  grep -q '^\.SH NAME' "$f" || fail "$page: no NAME section"
  quiet "$page" groff -man -ww -z "$f"
  quiet "$page" groff -man -ww -z -Tutf8 "$f"
  if [ $have_mandoc = yes ]; then
    mandoc -Tlint "$f" >"$tmp/lint" 2>&1
    grep -v ': STYLE: ' "$tmp/lint" >"$tmp/out"
    if [ -s "$tmp/out" ]; then
      fail "$page: mandoc -Tlint complains:"
      sed 's/^/    /' "$tmp/out" >&2
    fi
  fi
done

for f in "$srcdir"/*.[137]; do
  [ -f "$f" ] || continue
  case " $pages " in
    *" ${f##*/} "*) ;;
    *) fail "${f##*/}: not listed in man/Makefile.am, so neither installed nor distributed" ;;
  esac
done

[ $have_mandoc = yes ] || echo "check-pages: mandoc not installed; groff checks only"
echo "check-pages: $checked pages checked, $failed problems"
[ $failed -eq 0 ]
