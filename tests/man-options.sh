#!/bin/sh
# man-options.sh: the options as documented are the options as coded.
#
# lib/options.c holds the one table of options (SM_OPTION_LIST: the id, the
# variable, the default, the range and the accepted words).  For each
# option this checks that
#   - include/smalloc.h declares SMALLOC_OPTION_<ID>, in the table's order;
#   - smalloc(7) describes the variable in TUNING, with its range ("MIN to
#     MAX", or "0 or 1", or every accepted word) and its default as a user
#     writes it ("default D"), and lists it under ENVIRONMENT;
#   - smalloc_option_get(3) lists SMALLOC_OPTION_<ID> in its synopsis and
#     describes it.
# So a changed default or range, or a new option, fails make check until
# the pages say the same.
#
# Exit 0 when all agree, 1 otherwise, 99 when it cannot run.

top_srcdir=${top_srcdir:-$(dirname "$0")/..}
table=$top_srcdir/lib/options.c
header=$top_srcdir/include/smalloc.h
guide=$top_srcdir/man/smalloc.7
api=$top_srcdir/man/smalloc_option_get.3
for f in "$table" "$header" "$guide" "$api"; do
  [ -f "$f" ] || { echo "man-options: $f not found" >&2; exit 99; }
done

failed=0 checked=0
fail() { echo "man-options: $*" >&2; failed=$((failed + 1)); }

# A man page's text without roff: macro lines keep their arguments, quotes
# and \-escapes of spaces go, everything on one line, single spaces.
flat() {
  sed -e 's/^\.[A-Z][A-Z]* *//' -e 's/^\.[a-z][a-z]* .*//' -e 's/"//g' -e 's/\\ / /g' \
      -e 's/\\-/-/g' | tr '\n' ' ' | tr -s ' '
}

# The TUNING entry of variable $1 in smalloc(7): from ".B VAR" after a
# ".TP" to the next ".TP", ".PP" or section.
entry() {
  awk -v var="$1" '
    /^\.SH / { tuning = ($2 == "TUNING") }
    !tuning { next }
    on && /^\.(TP|PP|SH|SS)/ { exit }
    on { print; next }
    prev == ".TP" && $0 == ".B " var { on = 1 }
    { prev = $0 }' "$guide" | flat
}

# The words array named $1 in options.c, space-separated.
words() {
  sed -n "s/^static const char \*const $1\[\] = {\(.*\)};/\1/p" "$table" |
    tr -d '"' | tr ',' '\n' | sed 's/^ *//; s/ *$//' | grep -v '^NULL$' | tr '\n' ' '
}

# The table: one line per option, "ID ENV DEF MIN MAX WORDS".
rows=$(sed -n 's/^ *X(\([A-Z_]*\), "\(SMALLOC_[A-Z_]*\)", \([0-9]*\), \([0-9]*\), \([0-9]*\), \([a-z_A-Z]*\)).*/\1 \2 \3 \4 \5 \6/p' "$table")
[ -n "$rows" ] || { echo "man-options: no option table found in $table" >&2; exit 99; }

enum=$(sed -n 's/^ *SMALLOC_OPTION_\([A-Z_]*\)[ ,=].*/\1/p' "$header" | grep -v '^COUNT$' | tr '\n' ' ')
ids=$(echo "$rows" | awk '{ print $1 }' | tr '\n' ' ')
[ "$enum" = "$ids" ] || fail "smalloc.h declares options '$enum', the table has '$ids'"

env_section=$(awk '/^\.SH /{ on = ($2 == "ENVIRONMENT") } on' "$guide" | flat)
api_text=$(flat <"$api")

echo "$rows" | {
  while read -r id var def min max wordsname; do
    checked=$((checked + 1))
    text=$(entry "$var")
    if [ -z "$text" ]; then
      fail "smalloc(7) TUNING has no entry for $var"
      continue
    fi
    if [ "$wordsname" != NULL ]; then
      set -- $(words "$wordsname")
      shift "$def"
      want_default=$1
      for w in $(words "$wordsname"); do
        case " $text " in *" $w "*|*" $w,"*|*" $w;"*|*"($w"*) ;; *) fail "$var: the word '$w' is not in smalloc(7)" ;; esac
      done
    else
      want_default=$def
      if [ "$min $max" = "0 1" ]; then
        case $text in *"0 or 1"*) ;; *) fail "$var: smalloc(7) does not say 0 or 1" ;; esac
      else
        case $text in *"$min to $max"*) ;; *) fail "$var: smalloc(7) does not give the range $min to $max: $text" ;; esac
      fi
    fi
    case $text in
      *"default $want_default."*|*"default $want_default "*|*"default $want_default;"*) ;;
      *) fail "$var: smalloc(7) does not say 'default $want_default': $text" ;;
    esac
    case " $env_section " in *" $var "*|*" $var,"*) ;; *) fail "$var is not under ENVIRONMENT in smalloc(7)" ;; esac
    case " $api_text " in
      *"SMALLOC_OPTION_$id"*"smalloc_option_t"*"SMALLOC_OPTION_$id ( $var )"*) ;;
      *) fail "smalloc_option_get(3) does not list and describe SMALLOC_OPTION_$id ($var)" ;;
    esac
  done
  echo "man-options: $checked options checked, $failed problems"
  [ $failed -eq 0 ]
}
