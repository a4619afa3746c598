#!/usr/bin/env bash
# divergence_test.sh MOETRAIN: a 4-rank run (pp 2 × dp 2, ep 2) driven to a NaN gradient (lr 1e3, no clipping)
# ends with one error line naming the step, a non-zero exit on every rank, and the last finite checkpoint intact:
# `latest` names the step before, keep_last 1 did not prune it, it verifies, holds no NaN or inf and loads.
. "$(dirname "$0")/../cli/lib.sh"
bin=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
base=(--config configs/tiny.yaml --set logging.dir="$dir" --set logging.name=nan --set train.eval_interval=0
      --set train.peak_flops=1e9 --set checkpoint.interval=1 --set checkpoint.keep_last=1)
run mpi -np 4 "$bin" train "${base[@]}" --set train.lr=1e3 --set train.grad_clip=0 --set train.warmup_steps=0 \
    --set train.steps=40
[ "$rc" -ne 0 ] || fail "the diverging run exited 0"
[ "$(printf '%s\n' "$err" | grep -c .)" -eq 1 ] || fail "expected one error line: $err"
step=$(sed -nE 's/^moetrain: error: step ([0-9]+): the (loss|gradient norm) is not finite .*/\1/p' <<<"$err")
[ -n "$step" ] || fail "no error naming the step: $err"
if [ -n "$step" ]; then
  [ "$step" -ge 2 ] || fail "diverged at step $step: no finite checkpoint to keep"
  want=$(printf 'step_%07d' $((step - 1)))
  [ "$(cat "$dir/nan/checkpoints/latest")" = "$want" ] || fail "latest is $(cat "$dir/nan/checkpoints/latest"), not $want"
  [ "$(ls -d "$dir"/nan/checkpoints/step_* | wc -l)" -eq 1 ] || fail "expected only $want: $(ls "$dir/nan/checkpoints")"
  run "$bin" ckpt verify "$dir/nan/checkpoints"
  [ "$rc" -eq 0 ] || fail "the last checkpoint does not verify: $err"
  # Every saved value is finite (h5dump prints NaN and inf as nan / inf), and the checkpoint loads.
  run "$bin" ckpt export "$dir/nan/checkpoints" --out "$dir/weights.h5"
  [ "$rc" -eq 0 ] || fail "export: $err"
  [ "$(h5dump -y "$dir/weights.h5" | grep -ciE '(^|[ ,])-?(nan|inf)')" -eq 0 ] || fail "the checkpoint holds NaN or inf"
  run mpi -np 4 "$bin" train "${base[@]}" --set train.steps=$((step - 1)) --resume auto
  [ "$rc" -eq 0 ] && grep -q "resumed from .*$want at step $((step - 1))" <<<"$out" ||
    fail "resume from $want: rc $rc: $out $err"
fi
finish
