#!/usr/bin/env bash
# report_test.sh MOETRAIN PYTHON: `moetrain report` of two real runs (aux_free with per-expert loads every second
# step, and none) is one well-formed, self-contained page whose plots hold the points metrics.jsonl holds
# (tests/cli/report_check.py); a run whose last line was cut short is reported without it and with a note; a
# directory that is not a run, one without records, one with a broken line before the last, or an --out that cannot
# be written each give one clear error line and a non-zero exit.
. "$(dirname "$0")/lib.sh"
bin=$1
python=$2
scratch

train() {
  tiny1 "$bin" --set train.eval_interval=4 --set checkpoint.interval=4 --set logging.dir="$tmp/runs" "$@"
}
run train --set train.steps=8 --set logging.name=aux_free --set logging.expert_loads_interval=2
[ "$rc" -eq 0 ] || fail "train aux_free: $err"
run train --set train.steps=6 --set logging.name=none --set model.balance_mode=none --set logging.tensorboard=false
[ "$rc" -eq 0 ] || fail "train none: $err"
[ "$(grep -c '"tokens"' "$tmp/runs/aux_free/metrics.jsonl")" -eq 4 ] || fail "per-expert loads every 2nd step"

run "$bin" report "$tmp/runs/aux_free" "$tmp/runs/none" --out "$tmp/report.html"
[ "$rc" -eq 0 ] || fail "report: $err"
case "$out" in "wrote $tmp/report.html (2 runs, 18 records, "*) ;; *) fail "report said: $out" ;; esac
grep -q "aux_free</b>: summary: 8 steps (0 → 8), 8192 tokens in .* 2 checkpoint(s), the last of step 8 in $tmp/runs/aux_free/checkpoints" \
  "$tmp/report.html" || fail "no summary of aux_free in the report"
run "$python" tests/cli/report_check.py "$tmp/report.html" "$tmp/runs/aux_free" "$tmp/runs/none"
echo "$out"
[ "$rc" -eq 0 ] || fail "report check: $out $err"

# A last line cut short (a run killed while writing it): reported without it, with a note.
cp -r "$tmp/runs/none" "$tmp/runs/torn"
python_cut='import sys; p = sys.argv[1]; s = open(p).read(); open(p, "w").write(s[:len(s) - 40])'
"$python" -c "$python_cut" "$tmp/runs/torn/metrics.jsonl"
run "$bin" report "$tmp/runs/torn" --out "$tmp/torn.html"
[ "$rc" -eq 0 ] || fail "report of a torn run: $err"
grep <<<"$out" -q "^note: $tmp/runs/torn/metrics.jsonl:8: the last line is not a whole record" ||
  fail "no note of the torn line: $out"
grep -q "the last line is not a whole record" "$tmp/torn.html" || fail "the torn line is not noted in the report"
run "$python" tests/cli/report_check.py "$tmp/torn.html" "$tmp/runs/torn"
[ "$rc" -eq 0 ] || fail "report check of the torn run: $out $err"

# bad DIR... expected-error-regex: one "moetrain: error:" line naming what is wrong, a non-zero exit, no crash.
bad() {
  local want=$1
  shift
  run "$bin" report "$@"
  [ "$rc" -ne 0 ] && [ "$rc" -lt 128 ] || fail "report $*: exit $rc"
  [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] || fail "report $*: expected one stderr line, got: $err"
  grep <<<"$err" -Eq -- "^moetrain: error: $want" || fail "report $*: '$err' does not match '$want'"
  echo "$err"
}
mkdir -p "$tmp/empty_dir" "$tmp/no_records" "$tmp/broken"
: >"$tmp/no_records/metrics.jsonl"
cp "$tmp/runs/none/metrics.jsonl" "$tmp/broken/metrics.jsonl"
sed -i '3s/.*/{"step": 3, "loss": 1.0,/' "$tmp/broken/metrics.jsonl"
bad "$tmp/missing: not a directory" "$tmp/missing"
bad "$tmp/empty_dir/metrics.jsonl: not found: $tmp/empty_dir is not a run directory" "$tmp/empty_dir"
bad "$tmp/no_records/metrics.jsonl: no records" "$tmp/no_records"
bad "$tmp/broken/metrics.jsonl:3: not a metrics record" "$tmp/runs/aux_free" "$tmp/broken"
bad "$tmp/nowhere/r.html: cannot write the report" "$tmp/runs/none" --out "$tmp/nowhere/r.html"
[ ! -e "$tmp/report.html.tmp" ] || fail "a temporary file left behind"
finish
