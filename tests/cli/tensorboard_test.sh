#!/usr/bin/env bash
# tensorboard_test.sh MOETRAIN PYTHON: a run's TensorBoard event file, read by the tensorboard package (PYTHON: the
# LibTorch virtual environment's), holds every scalar of metrics.jsonl at every step and the tokens-per-expert
# histograms (tests/cli/tb_events.py); a run resumed from an earlier checkpoint cuts what the first run wrote after
# it, in the event file and in metrics.jsonl, so no step appears twice; logging.tensorboard=false writes none. The
# end-of-run summary line counts what this process trained.
. "$(dirname "$0")/lib.sh"
bin=$1
python=$2
scratch

train() {
  tiny1 "$bin" --set train.steps=6 --set train.eval_interval=3 --set checkpoint.interval=3 \
    --set logging.dir="$tmp/runs" --set logging.name=tb "$@"
}
run train
[ "$rc" -eq 0 ] || fail "train: $err"
[ -f "$tmp/runs/tb/events.out.tfevents.moetrain" ] || fail "no event file in $tmp/runs/tb"
grep <<<"$out" -q "^summary: 6 steps (0 → 6), 6144 tokens in .* | val loss .* at step 6 (gap .* to the entropy rate) | 2 checkpoint(s), the last of step 6 in $tmp/runs/tb/checkpoints | peak mem" ||
  fail "no end-of-run summary: $out"
# tiny: 16 sequences × 64 tokens per step, top-2 of 8 routed experts.
run "$python" tests/cli/tb_events.py "$tmp/runs/tb" 8 2048
echo "$out"
[ "$rc" -eq 0 ] || fail "event file: $out $err"

# Resumed from step 3 after the run reached step 6: steps 4-6 are written again, once.
run train --resume "$tmp/runs/tb/checkpoints/step_0000003"
[ "$rc" -eq 0 ] || fail "resume: $err"
grep <<<"$out" -q "^summary: 3 steps (3 → 6), 3072 tokens" || fail "summary after the resume: $out"
[ "$(grep -c '"loss"' "$tmp/runs/tb/metrics.jsonl")" -eq 6 ] || fail "metrics.jsonl after the resume: $(cat "$tmp/runs/tb/metrics.jsonl")"
run "$python" tests/cli/tb_events.py "$tmp/runs/tb" 8 2048
echo "after the resume: $out"
[ "$rc" -eq 0 ] || fail "event file after the resume: $out $err"

run train --set logging.name=off --set logging.tensorboard=false
[ "$rc" -eq 0 ] && [ ! -e "$tmp/runs/off/events.out.tfevents.moetrain" ] || fail "logging.tensorboard=false: $rc $err"
finish
