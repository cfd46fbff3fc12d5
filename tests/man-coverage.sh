#!/bin/sh
# man-coverage.sh: every function declared in include/smalloc.h has a manual
# page man/NAME.3 that documents it: either the page itself, or the page its
# ".so" line points to, lists NAME in its NAME section and shows it in its
# SYNOPSIS.
#
# Run by make check (top_srcdir comes from tests/Makefile.am); by hand:
#   top_srcdir=. tests/man-coverage.sh
# Exit 0 when every function is covered, 1 otherwise, 99 when it cannot run.

top_srcdir=${top_srcdir:-$(dirname "$0")/..}
header=$top_srcdir/include/smalloc.h
mandir=$top_srcdir/man

[ -f "$header" ] || { echo "man-coverage: $header not found" >&2; exit 99; }
[ -d "$mandir" ] || { echo "man-coverage: $mandir not found" >&2; exit 99; }

# The header without its comments, on one line, so that a declaration split
# over lines is still seen and a name mentioned in a comment is not.
strip_comments() {
  awk '
    BEGIN { incomment = 0 }
    {
      line = $0; out = ""
      while (line != "") {
        if (incomment) {
          i = index(line, "*/")
          if (i == 0) { line = ""; break }
          line = substr(line, i + 2); incomment = 0
          continue
        }
        b = index(line, "/*"); l = index(line, "//")
        if (l > 0 && (b == 0 || l < b)) { out = out substr(line, 1, l - 1); line = ""; break }
        if (b == 0) { out = out line; line = ""; break }
        out = out substr(line, 1, b - 1) " "
        line = substr(line, b + 2); incomment = 1
      }
      printf "%s ", out
    }
    END { print "" }' "$1"
}

functions=$(strip_comments "$header" |
  grep -oE 'smalloc_[a-z0-9_]+[[:space:]]*\(' | sed 's/[[:space:](]//g' | sort -u)
[ -n "$functions" ] || { echo "man-coverage: no function found in $header" >&2; exit 99; }

# Print the text of section $2 of page $1 (up to the next .SH), without
# comment lines and with font escapes and macro names removed.
section() {
  awk -v want="$2" '
    /^\.SH[ \t]/ {
      name = $0; sub(/^\.SH[ \t]+/, "", name); gsub(/"/, "", name)
      insec = (name == want); next
    }
    insec && !/^\.\\"/ && !/^'"'"'\\"/ { print }' "$1" |
  sed -e 's/\\f[BIRP]//g' -e 's/\\f(..//g' -e 's/\\f\[[^]]*\]//g' \
      -e 's/^\.[A-Za-z]*[ \t]*//' -e 's/\\-/-/g' -e 's/\\&//g' -e 's/"//g'
}

# Does page $1 document function $2?  Prints why not, if it does not.
documents() {
  names=$(section "$1" NAME | tr '\n' ' ' | sed 's/[[:space:]]-[[:space:]].*//')
  printf '%s\n' "$names" | tr ', ' '\n\n' | grep -qx "$2" ||
    { echo "not listed in the NAME section of ${1#"$top_srcdir"/}"; return 1; }
  section "$1" SYNOPSIS | grep -q "$2(" ||
    { echo "not shown in the SYNOPSIS of ${1#"$top_srcdir"/}"; return 1; }
  return 0
}

failed=0 passed=0
for f in $functions; do
  page=$mandir/$f.3
  if [ ! -f "$page" ]; then
    echo "man-coverage: FAIL: $f: no manual page man/$f.3"
    failed=$((failed + 1))
    continue
  fi
  doc=$page
  first=$(sed -n '1p' "$page")
  case $first in
    .so\ *)
      doc=$mandir/${first#.so }
      doc=$mandir/${doc##*/}
      if [ ! -f "$doc" ]; then
        echo "man-coverage: FAIL: $f: man/$f.3 links to missing ${first#.so }"
        failed=$((failed + 1))
        continue
      fi
      ;;
  esac
  if why=$(documents "$doc" "$f"); then
    passed=$((passed + 1))
  else
    echo "man-coverage: FAIL: $f: $why"
    failed=$((failed + 1))
  fi
done

echo "man-coverage: $passed functions documented, $failed not"
[ $failed -eq 0 ]
