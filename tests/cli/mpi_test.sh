#!/usr/bin/env bash
# mpi_test.sh MOETRAIN PROBE: commands under mpirun — output once, errors once, every rank non-zero, no hang.
. "$(dirname "$0")/lib.sh"
bin=$1 probe=$2

run mpi -np 4 "$bin" config check configs/tiny.yaml
[ "$rc" -eq 0 ] || fail "4 ranks, tiny: rc $rc: $err"
[ "$out" = "configs/tiny.yaml: ok (world 4 = pp 2 × dp 2, ep 2)" ] || fail "4 ranks: expected one ok line, got: $out"

# The launched world must match the config: 2 ranks for a pp 2 × dp 2 config.
run mpi -np 2 "$bin" config check configs/tiny.yaml
[ "$rc" -ne 0 ] || fail "2 ranks for a 4-rank config exited 0"
[ "$(printf '%s\n' "$err" | grep -c '^moetrain: error')" -eq 1 ] || fail "expected one error line: $err"
grep <<<"$err" -q "configs/tiny.yaml:31: world size 2 (ranks launched) ≠ pp·dp = 2·2 = 4" ||
  fail "wrong message: $err"

# dp derived from the launch.
run mpi -np 4 "$bin" plan configs/tiny.yaml --set parallel.dp=0 --set parallel.ep=1
[ "$rc" -eq 0 ] && grep <<<"$out" -q "world 4 = pp 2 × dp 2" || fail "derived dp: $out $err"

# A bad config on every rank: one message, non-zero exit.
run mpi -np 4 "$bin" config check tests/cli/bad/ep_not_dividing_dp.yaml
[ "$rc" -ne 0 ] || fail "bad config under mpirun exited 0"
[ "$(printf '%s\n' "$err" | grep -c '^moetrain: error')" -eq 1 ] || fail "expected one error line: $err"

# One rank fails: every rank exits 1 and only the failing rank reports.
run mpi -np 3 "$probe" 1
[ "$rc" -ne 0 ] || fail "probe: a failing rank left mpirun with 0"
! grep <<<"$out" -q "exit 0" && grep <<<"$out" -q "exit 1" || fail "probe: ranks should exit 1 (or be ended by mpirun): $out"
[ "$err" != "${err/moetrain: error on rank 1 of 3: probe failure on purpose/}" ] || fail "probe message: $err"
[ "$(printf '%s\n' "$err" | grep -c '^moetrain: error')" -eq 1 ] || fail "probe: one error line expected: $err"

# Nobody fails: all exit 0.
run mpi -np 3 "$probe" -1
[ "$rc" -eq 0 ] && [ "$(printf '%s\n' "$out" | grep -c 'exit 0')" -eq 3 ] || fail "probe ok path: $out $err"

# A rank that never arrives: the failing rank aborts the job after its timeout instead of hanging.
start=$(date +%s)
run timeout 60 bash -c "$(declare -f mpi); mpi -np 3 '$probe' 0 2 2"
elapsed=$(( $(date +%s) - start ))
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "hang case: rc $rc (124 means it hung)"
[ "$elapsed" -lt 30 ] || fail "hang case took ${elapsed}s"
grep <<<"$err" -q "moetrain: error: probe failure on purpose" || fail "hang case message: $err"
# Training on 4 ranks (pp 2 × dp 2, ep 2): progress from rank 0 only, metrics and the resolved config written.
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
run mpi -np 4 "$bin" train --config configs/tiny.yaml --set train.steps=3 --set train.eval_interval=3 \
    --set train.eval_batches=1 --set logging.dir="$runs" --set logging.interval=1
[ "$rc" -eq 0 ] || fail "4-rank training: rc $rc: $err"
[ "$(printf '%s\n' "$out" | grep -c '^step 3/3')" -eq 1 ] || fail "4-rank training: one progress line per step expected: $out"
[ "$(wc -l < "$runs/tiny/metrics.jsonl")" -eq 4 ] || fail "metrics.jsonl: 3 steps + 1 eval expected"
grep -q '^  pp: 2' "$runs/tiny/config.yaml" || fail "resolved config not written"
run mpi -np 4 "$bin" train --config configs/tiny.yaml --set train.steps=1 --set logging.dir="$runs"
[ "$rc" -ne 0 ] && grep <<<"$err" -q "pass --overwrite" || fail "an existing run must not be overwritten: $err"
# --resume auto on a run with metrics but no checkpoint (a requeued job that failed early) starts fresh.
run mpi -np 4 "$bin" train --config configs/tiny.yaml --set train.steps=2 --set logging.dir="$runs" --resume auto
[ "$rc" -eq 0 ] && grep -q "^--resume auto: no checkpoint in $runs/tiny/checkpoints yet; starting fresh" <<<"$out" ||
  fail "--resume auto without a checkpoint: rc $rc: $out $err"
[ "$(grep -c '"lm_loss"' "$runs/tiny/metrics.jsonl")" -eq 2 ] || fail "--resume auto fresh start: 2 steps expected"

# A rank that throws at step 2: every rank exits non-zero within 30 s and the message names the rank.
start=$(date +%s)
run timeout 60 bash -c "$(declare -f mpi); mpi -np 4 -x MOETRAIN_TEST_FAIL_STEP=2 -x MOETRAIN_TEST_FAIL_RANK=2 '$bin' \
    train --config configs/tiny.yaml --set train.steps=5 --set logging.dir='$runs' --set logging.name=fail"
elapsed=$(( $(date +%s) - start ))
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "injected failure: rc $rc (124: it hung)"
[ "$elapsed" -lt 30 ] || fail "injected failure took ${elapsed}s to end the job"
grep <<<"$err" -q "rank 2.*injected failure at step 2" || fail "injected failure message: $err"

# train.device = cuda under mpirun (the NCCL backend) where no GPU is visible: one clear line, every rank non-zero.
if ! nvidia-smi -L >/dev/null 2>&1; then
  run timeout 60 bash -c "$(declare -f mpi); mpi -np 2 '$bin' train --config configs/tiny.yaml --set parallel.pp=1 \
      --set parallel.dp=2 --set parallel.ep=1 --set train.device=cuda --set logging.dir='$runs' --set logging.name=gpu"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "cuda without a GPU under mpirun: rc $rc (124: it hung)"
  [ "$(printf '%s\n' "$err" | grep -c '^moetrain: error')" -eq 1 ] || fail "cuda without a GPU: one error line: $err"
  nccl_without_gpu="train.device = cuda \(the NCCL backend, world rank [01]\) but no CUDA device is visible"
  grep <<<"$err" -Eq "$nccl_without_gpu|needs a CUDA build" || fail "cuda without a GPU: $err"
fi

# An MPI library that grants less than MPI_THREAD_MULTIPLE (asked for here by the test hook): one line, exit 1.
run mpi -np 2 -x MOETRAIN_TEST_MPI_THREAD_LEVEL=1 "$bin" config check configs/tiny.yaml --set parallel.pp=1 \
    --set parallel.dp=2 --set parallel.ep=1
[ "$rc" -ne 0 ] || fail "MPI_THREAD_FUNNELED: exited 0"
[ "$(printf '%s\n' "$err" | grep -c '^moetrain: error')" -eq 1 ] || fail "MPI_THREAD_FUNNELED: one error line: $err"
grep <<<"$err" -q "grants MPI_THREAD_FUNNELED .*needs MPI_THREAD_MULTIPLE" || fail "MPI_THREAD_FUNNELED: $err"

# Ranks started with different configs are caught at start-up.
run mpi -np 1 "$bin" train --config configs/tiny.yaml --set parallel.pp=1 --set parallel.dp=2 --set parallel.ep=1 \
    --set train.lr=1e-3 --set logging.dir="$runs" --set logging.name=mixed : \
    -np 1 "$bin" train --config configs/tiny.yaml --set parallel.pp=1 --set parallel.dp=2 --set parallel.ep=1 \
    --set train.lr=2e-3 --set logging.dir="$runs" --set logging.name=mixed
[ "$rc" -ne 0 ] && grep <<<"$err" -q "different configs" || fail "different configs not detected: $err"
finish
