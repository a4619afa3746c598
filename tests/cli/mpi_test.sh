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
printf '%s' "$err" | grep -q "configs/tiny.yaml:30: world size 2 (ranks launched) ≠ pp·dp = 2·2 = 4" ||
  fail "wrong message: $err"

# dp derived from the launch.
run mpi -np 4 "$bin" plan configs/tiny.yaml --set parallel.dp=0 --set parallel.ep=1
[ "$rc" -eq 0 ] && printf '%s' "$out" | grep -q "world 4 = pp 2 × dp 2" || fail "derived dp: $out $err"

# A bad config on every rank: one message, non-zero exit.
run mpi -np 4 "$bin" config check tests/cli/bad/ep_not_dividing_dp.yaml
[ "$rc" -ne 0 ] || fail "bad config under mpirun exited 0"
[ "$(printf '%s\n' "$err" | grep -c '^moetrain: error')" -eq 1 ] || fail "expected one error line: $err"

# One rank fails: every rank exits 1 and only the failing rank reports.
run mpi -np 3 "$probe" 1
[ "$rc" -ne 0 ] || fail "probe: a failing rank left mpirun with 0"
! printf "%s" "$out" | grep -q "exit 0" && printf "%s" "$out" | grep -q "exit 1" || fail "probe: ranks should exit 1 (or be ended by mpirun): $out"
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
printf '%s' "$err" | grep -q "moetrain: error: probe failure on purpose" || fail "hang case message: $err"
finish
