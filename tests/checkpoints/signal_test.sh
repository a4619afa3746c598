#!/usr/bin/env bash
# signal_test.sh MOETRAIN: checkpoint.save_on_signal.
#  - one process, SIGTERM: the run stops after its step with a checkpoint of that step, exit status 0, and
#    --resume auto continues from it;
#  - two ranks under mpirun, SIGUSR1 to one rank only: both agree, save the same step (2 shards) and exit 0;
#  - train.exit_duration_mins (a time budget, no signal) on two ranks: the same, at the step the budget ran out in,
#    with --exit-code-on-stop 75 exit status 75 (a launcher's cue to requeue), and 0 once the resumed run finishes;
#  - SIGUSR1 while the run starts up (after its config is read, before training): not fatal, the run stops after
#    its first step with a checkpoint;
#  - checkpoint.save_on_signal: false: SIGTERM ends the process as usual, nothing saved.
. "$(dirname "$0")/../cli/lib.sh"
bin=$1
dir=$(mktemp -d)
trap 'pkill -f "logging.dir=$dir" 2>/dev/null; rm -rf "$dir"' EXIT
base=(--config configs/tiny.yaml --set logging.dir="$dir" --set train.eval_interval=0 --set train.eval_batches=1
      --set train.micro_batch_size=2 --set train.peak_flops=1e9 --set parallel.pp=1 --set parallel.ep=1
      --set train.steps=100000)
one=(--set parallel.dp=1)  # one process; under mpirun dp is the world size
two=(--set parallel.dp=2)
# wait_steps NAME N: until the run's metrics have N steps (60 s at most).
wait_steps() {
  for _ in $(seq 600); do
    [ "$(cat "$dir/$1/metrics.jsonl" 2>/dev/null | grep -c '"lm_loss"')" -ge "$2" ] && return 0
    sleep 0.1
  done
  return 1
}

# One process, SIGTERM.
"$bin" train "${base[@]}" "${one[@]}" --set logging.name=term >"$dir/term.log" 2>&1 &
pid=$!
wait_steps term 3 || fail "the run never reached step 3: $(cat "$dir/term.log")"
kill -TERM "$pid"
wait "$pid"
rc=$?
[ "$rc" -eq 0 ] || fail "SIGTERM: exit status $rc: $(tail -3 "$dir/term.log")"
line=$(grep "stopped at step" "$dir/term.log")
step=$(printf '%s' "$line" | sed -n 's/stopped at step \([0-9]*\) of 100000 on SIGTERM.*/\1/p')
[ -n "$step" ] || fail "SIGTERM: no stop message: $(tail -3 "$dir/term.log")"
[ "$(cat "$dir/term/checkpoints/latest" 2>/dev/null)" = "$(printf 'step_%07d' "${step:-0}")" ] ||
  fail "SIGTERM: latest is not the step it stopped at ($step)"
[ "$(grep -c '"lm_loss"' "$dir/term/metrics.jsonl")" -eq "${step:-0}" ] || fail "SIGTERM: metrics and step disagree"
run "$bin" ckpt verify "$dir/term/checkpoints"
[ "$rc" -eq 0 ] || fail "SIGTERM: the checkpoint does not verify: $err"
run "$bin" train "${base[@]}" "${one[@]}" --set logging.name=term --set train.steps=$((step + 2)) --resume auto
[ "$rc" -eq 0 ] && grep <<<"$out" -q "resumed from .*step_$(printf '%07d' "$step") at step $step" ||
  fail "SIGTERM: did not resume from step $step: rc $rc: $out $err"

# Two ranks, SIGUSR1 to one of them.
mpi -np 2 "$bin" train "${base[@]}" "${two[@]}" --set logging.name=usr1 >"$dir/usr1.log" 2>&1 &
job=$!
wait_steps usr1 3 || fail "the 2-rank run never reached step 3: $(cat "$dir/usr1.log")"
rank=$(pgrep -f "logging.name=usr1" | while read -r p; do
  [ "$(cat "/proc/$p/comm" 2>/dev/null)" = moetrain ] && echo "$p"; done | head -1)
[ -n "$rank" ] || fail "no rank process found"
kill -USR1 "$rank"
wait "$job"
rc=$?
[ "$rc" -eq 0 ] || fail "SIGUSR1 to one rank: exit status $rc: $(tail -5 "$dir/usr1.log")"
grep -q "stopped at step [0-9]* of 100000 on" "$dir/usr1.log" || fail "SIGUSR1: no stop message: $(tail -5 "$dir/usr1.log")"
latest=$(cat "$dir/usr1/checkpoints/latest" 2>/dev/null)
[ -n "$latest" ] && python3 - "$dir/usr1/checkpoints/$latest/index.json" <<'PY' || fail "SIGUSR1: no 2-shard checkpoint"
import json, sys
assert json.load(open(sys.argv[1]))["shards"] == 2
PY

# A time budget (train.exit_duration_mins: 3 s here) on two ranks and no signal: both stop at the same step after it,
# save it (2 shards), exit 0, and --resume auto continues.
run mpi -np 2 "$bin" train "${base[@]}" "${two[@]}" --set logging.name=budget --set train.exit_duration_mins=0.05 \
  --exit-code-on-stop 75
[ "$rc" -eq 75 ] || fail "time budget with --exit-code-on-stop 75: exit status $rc: $err"
step=$(printf '%s\n' "$out" | sed -n 's/^stopped at step \([0-9]*\) of 100000 at its time budget (train.exit_duration_mins = 0.05).*/\1/p')
[ -n "$step" ] || fail "time budget: no stop message: $out"
[ "$(cat "$dir/budget/checkpoints/latest" 2>/dev/null)" = "$(printf 'step_%07d' "$step")" ] ||
  fail "time budget: latest is not the step it stopped at ($step)"
run "$bin" ckpt verify "$dir/budget/checkpoints"
[ "$rc" -eq 0 ] || fail "time budget: the checkpoint does not verify: $err"
run mpi -np 2 "$bin" train "${base[@]}" "${two[@]}" --set logging.name=budget --set train.steps=$((step + 1)) --resume auto \
  --exit-code-on-stop 75
[ "$rc" -eq 0 ] && grep <<<"$out" -q "resumed from .*step_$(printf '%07d' "$step") at step $step" ||
  fail "time budget: did not resume from step $step: rc $rc: $out $err"

# SIGUSR1 during start-up (the handler is in place once the config is read: SigCgt has bit 10; the peak measurement
# and the model still to come): the run is not killed, it stops after step 1 with its checkpoint.
"$bin" train "${base[@]}" "${one[@]}" --set logging.name=early --set train.peak_flops=0 >"$dir/early.log" 2>&1 &
pid=$!
for _ in $(seq 500); do
  mask=$(sed -n 's/^SigCgt:\s*//p' "/proc/$pid/status" 2>/dev/null)
  [ -n "$mask" ] && (( (16#$mask >> 9) & 1 )) && break
  sleep 0.01
done
grep -q "^training " "$dir/early.log" && fail "SIGUSR1 at start-up: no handler before the training loop began"
kill -USR1 "$pid"
wait "$pid"
rc=$?
[ "$rc" -eq 0 ] || fail "SIGUSR1 at start-up: exit status $rc: $(tail -3 "$dir/early.log")"
grep -q "stopped at step 1 of 100000 on SIGUSR1" "$dir/early.log" ||
  fail "SIGUSR1 at start-up: no stop after step 1: $(tail -3 "$dir/early.log")"
[ "$(cat "$dir/early/checkpoints/latest" 2>/dev/null)" = step_0000001 ] || fail "SIGUSR1 at start-up: no checkpoint"

# save_on_signal off: SIGTERM is the default, immediate end.
"$bin" train "${base[@]}" "${one[@]}" --set logging.name=off --set checkpoint.save_on_signal=false >"$dir/off.log" 2>&1 &
pid=$!
wait_steps off 2 || fail "the run never reached step 2: $(cat "$dir/off.log")"
kill -TERM "$pid"
wait "$pid"
rc=$?
[ "$rc" -eq 143 ] || fail "save_on_signal off: exit status $rc, expected 143 (SIGTERM)"
[ ! -e "$dir/off/checkpoints/latest" ] || fail "save_on_signal off: a checkpoint was saved"
finish
