#!/usr/bin/env bash
# control_test.sh PROBE: the control plane's agreements over 3 ranks (the per-step vote, the config-hash check, the
# gather a checkpoint commit uses), the node-local rank from MPI_COMM_TYPE_SHARED even when the launcher's
# variable says otherwise, and a rank that never arrives at the vote: the others end within the timeout, and one
# of them names it.
. "$(dirname "$0")/../cli/lib.sh"
probe=$1

# OMPI_COMM_WORLD_LOCAL_RANK overwritten after mpirun set it: the local rank must not come from it.
run mpi -np 3 env OMPI_COMM_WORLD_LOCAL_RANK=7 "$probe" agree
[ "$rc" -eq 0 ] || fail "agree: rc $rc: $err"
for r in 0 1 2; do
  grep -q "^rank $r local $r of 3 stop 1 writers_done 0 same 1 differ 1 gathered " <<<"$out" ||
    fail "rank $r: wrong agreement or local rank: $out"
done
grep -q "^rank 0 .* gathered r0r1r2$" <<<"$out" || fail "rank 0 did not gather every rank's string: $out"

# Rank 2 never votes: the others fail with the control group named, within the 3 s timeout (not 60 s).
start=$(date +%s)
run timeout 50 bash -c "$(declare -f mpi); mpi -np 3 '$probe' hang 2 3"
elapsed=$(($(date +%s) - start))
[ "$rc" -ne 0 ] || fail "hang: a missing rank went unnoticed"
[ "$rc" -ne 124 ] || fail "hang: the job hung"
grep -q "group control" <<<"$err" || fail "hang: the error does not name the control group: $err"
# The rank that never arrived is named (the others answer a liveness ping), once, by the lowest rank that answered.
grep -q "^moetrain: error: .* world rank 2 did not answer within 3 s: stopped or hung$" <<<"$err" ||
  fail "hang: the silent rank is not named: $err"
[ "$(grep -c . <<<"$err")" -eq 1 ] || fail "hang: expected one error line: $err"
[ "$elapsed" -lt 40 ] || fail "hang: took ${elapsed} s"
finish
