#!/usr/bin/env bash
# expect_config_error.sh MOETRAIN BAD.yaml: `moetrain config check` and `moetrain plan` on a broken config exit
# non-zero with exactly one stderr line, "moetrain: error: <file>:<line>: <message>", where the message matches
# the file's "# expect: <regex>" line (its line number is checked too when given as "# expect-line: N"), within
# 30 seconds (absurd sizes once made `plan` loop for ever).
. "$(dirname "$0")/lib.sh"
bin=$1 file=$2
want=$(sed -n 's/^# expect: //p' "$file")
line=$(sed -n 's/^# expect-line: //p' "$file")
[ -n "$want" ] || { echo "no '# expect:' line in $file" >&2; exit 2; }
prefix="moetrain: error: $file:${line:+$line: }"
for cmd in "config check" "plan"; do
  run timeout 30 "$bin" $cmd "$file"
  [ "$rc" -ne 0 ] || fail "$cmd $file exited 0"
  [ "$rc" -ne 124 ] || fail "$cmd $file did not finish within 30 s"
  [ -z "$out" ] || fail "$cmd $file printed to stdout: $out"
  [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] || fail "$cmd: expected one stderr line, got: $err"
  case "$err" in "$prefix"*) ;; *) fail "$cmd: expected prefix '$prefix', got: $err" ;; esac
  grep <<<"$err" -Eq -- "$want" || fail "$cmd: '$err' does not match '$want'"
done
echo "$err"
finish
