#!/usr/bin/env bash
# launch_test.sh MOETRAIN: launch/mpirun.sh — a rank killed by a signal is reported (not a silent exit 137); two
# -np or an MPMD ':' are refused; a signal to the script reaches the ranks (save_on_signal: saved and exit 0).
. "$(dirname "$0")/lib.sh"
bin=$1
launch=launch/mpirun.sh
dir=$(mktemp -d)
trap 'pkill -f "logging.dir=$dir" 2>/dev/null; rm -rf "$dir"' EXIT

run "$launch" -np 2 -- bash -c 'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then kill -9 $$; fi; sleep 5'
[ "$rc" -eq 137 ] || fail "killed rank: exit status $rc, expected 137"
grep -q "^moetrain: a rank ended by SIGKILL without a message (SIGKILL from the system usually means a rank ran out of memory" <<<"$err" ||
  fail "killed rank: no message: $err"

run "$launch" -np 2 -np 4 -- true
[ "$rc" -eq 2 ] && grep -q "\-np given twice (2 and 4)" <<<"$err" || fail "two -np: rc $rc: $err"
run "$launch" -np 2 -- true : -np 2 true
[ "$rc" -eq 2 ] && grep -q "MPMD) is not supported" <<<"$err" || fail "MPMD: rc $rc: $err"
run "$launch" -np x -- true
[ "$rc" -eq 2 ] && grep -q "not a positive number" <<<"$err" || fail "-np x: rc $rc: $err"
run "$launch" -np 2 -- true
[ "$rc" -eq 0 ] || fail "a plain launch: rc $rc: $err"
# A hostfile and ranks per node (here one node, this one): the ranks' node-local index is their index on it.
printf 'localhost slots=4\n' >"$dir/hosts"
run "$launch" -np 4 --hostfile "$dir/hosts" --ranks-per-node 4 -- bash -c 'echo "$OMPI_COMM_WORLD_LOCAL_RANK/$OMPI_COMM_WORLD_LOCAL_SIZE"'
[ "$rc" -eq 0 ] && [ "$(printf '%s\n' "$out" | sort | tr '\n' ' ')" = "0/4 1/4 2/4 3/4 " ] ||
  fail "hostfile launch: rc $rc: $out $err"
run "$launch" -np 4 --hostfile "$dir/hosts" --ranks-per-node 4 -- "$bin" config check configs/tiny.yaml
[ "$rc" -eq 0 ] || fail "hostfile launch of moetrain: rc $rc: $out $err"
run "$launch" -np 2 --ranks-per-node 0 -- true
[ "$rc" -eq 2 ] && grep -q "ranks-per-node '0' is not a positive number" <<<"$err" || fail "--ranks-per-node 0: rc $rc: $err"
run "$launch" -np 2 --ranks-per-node 2 --map-by core -- true
[ "$rc" -eq 2 ] && grep -q "ranks-per-node 2 is a --map-by; give one of them" <<<"$err" || fail "two mappings: rc $rc: $err"
run "$launch" -np 2 --hostfile "$dir/none" -- true
[ "$rc" -eq 2 ] && grep -q "hostfile $dir/none: no such readable file" <<<"$err" || fail "missing hostfile: rc $rc: $err"

# SIGUSR1 to the launch script: passed on, every rank saves its step and the job exits 0.
"$launch" -np 2 -- "$bin" train --config configs/tiny.yaml --set logging.dir="$dir" --set logging.name=sig \
  --set parallel.pp=1 --set parallel.ep=1 --set parallel.dp=0 --set train.steps=100000 --set train.eval_interval=0 \
  --set train.peak_flops=1e9 --set train.micro_batch_size=2 >"$dir/sig.log" 2>&1 &
job=$!
for _ in $(seq 600); do
  [ "$(grep -c '"lm_loss"' "$dir/sig/metrics.jsonl" 2>/dev/null)" -ge 2 ] && break
  sleep 0.1
done
kill -USR1 "$job"
rc=0
wait "$job" || rc=$?
[ "$rc" -eq 0 ] || fail "SIGUSR1 to the launch script: exit status $rc: $(tail -3 "$dir/sig.log")"
grep -q "stopped at step [0-9]* of 100000 on SIGUSR1" "$dir/sig.log" || fail "SIGUSR1: no stop: $(tail -3 "$dir/sig.log")"
finish
