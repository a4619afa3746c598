#!/usr/bin/env bash
# slurm_test.sh MOETRAIN: launch/slurm/moetrain.sbatch on a real Slurm — a private single-node cluster started
# here (munge, slurmctld, slurmd; config, state, sockets and logs in a temporary directory, on ports of its own;
# each daemon stopped at the end by the PID it recorded, never by name). Checks:
#  1. a 16-step run under sbatch (4 tasks, srun --mpi=pmix) has the losses of the same run under mpirun, bit for bit;
#  2. a job whose time limit interrupts it (--time=2, SIGUSR1 to the batch shell 90 s before the limit) saves,
#     exits 75, requeues itself, and — its limit then raised so that the second segment can finish — resumes and ends
#     with every step's loss equal to an uninterrupted mpirun run's; its output file holds both segments;
#  3. `scancel --batch -s USR1` (the batch shell, whose trap forwards it) and plain `scancel -s USR1` (the tasks)
#     both make the run save a checkpoint and requeue the job;
#  4. a rank killed with SIGKILL ends the job within 30 s, FAILED, with the template's message naming the failure.
# Exit 77 (skipped) when Slurm or munge is not installed (scripts/setup.sh installs them).
. "$(dirname "$0")/../cli/lib.sh"
bin=$(realpath "$1")
repo=$(pwd)
for tool in munged slurmctld slurmd sbatch scontrol scancel squeue; do
  command -v "$tool" >/dev/null ||
    { echo "SKIP: $tool not found (Slurm and munge: apt install slurm-wlm munge, as scripts/setup.sh does)"; exit 77; }
done

tmp=$(mktemp -d)
mkdir -p "$tmp/state" "$tmp/spool" "$tmp/munge" "$tmp/runs"
stop_daemons() {
  local pidfile pid
  for pidfile in "$tmp/slurmd.pid" "$tmp/slurmctld.pid" "$tmp/munge/munged.pid"; do
    [ -s "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null
  done
}
trap 'stop_daemons; rm -rf "$tmp"' EXIT

# --- the private cluster -----------------------------------------------------------------------------------------
host=$(hostname -s)
port=$((20000 + RANDOM % 20000))
dd if=/dev/urandom of="$tmp/munge/munge.key" bs=1024 count=1 status=none
chmod 700 "$tmp/munge"
chmod 400 "$tmp/munge/munge.key"
munged --force --socket="$tmp/munge/munge.socket" --key-file="$tmp/munge/munge.key" \
  --pid-file="$tmp/munge/munged.pid" --log-file="$tmp/munge/munged.log" --seed-file="$tmp/munge/seed" ||
  { echo "FAIL: munged did not start: $(cat "$tmp/munge/munged.log" 2>/dev/null)"; exit 1; }
cat >"$tmp/slurm.conf" <<EOF
ClusterName=moetraintest
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$tmp/munge/munge.socket,cred_expire=20
CredType=cred/munge
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/slurmctld.log
SlurmdLogFile=$tmp/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
JobRequeue=1
NodeName=$host CPUs=16 RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES OverSubscribe=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$tmp/slurm.conf
slurmctld -c -f "$SLURM_CONF" || { echo "FAIL: slurmctld did not start"; cat "$tmp/slurmctld.log"; exit 1; }
slurmd -c -f "$SLURM_CONF" || { echo "FAIL: slurmd did not start"; cat "$tmp/slurmd.log"; exit 1; }
for _ in $(seq 60); do
  [ "$(sinfo -h -o %t 2>/dev/null)" = "idle" ] && break
  sleep 0.5
done
[ "$(sinfo -h -o %t 2>/dev/null)" = "idle" ] ||
  { echo "FAIL: the node never became idle: $(sinfo 2>&1)"; tail -20 "$tmp/slurmctld.log" "$tmp/slurmd.log"; exit 1; }

# --- helpers -----------------------------------------------------------------------------------------------------
base=(configs/tiny.yaml --set logging.dir="$tmp/runs" --set train.eval_interval=0 --set train.micro_batch_size=2
      --set parallel.dp=0 --set train.peak_flops=1e9 --set logging.interval=100)
submit() {  # submit NAME [sbatch options] -- [train options]: prints the job id
  local name=$1 opts=()
  shift
  while [ "$1" != "--" ]; do opts+=("$1"); shift; done
  shift
  MOETRAIN_BIN=$bin sbatch --parsable -n 4 --chdir="$repo" --output="$tmp/$name.out" "${opts[@]}" \
    launch/slurm/moetrain.sbatch "${base[@]}" --set logging.name="$name" "$@"
}
field() { scontrol show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1; }
wait_until() {  # wait_until SECONDS DESCRIPTION CMD...: polls CMD every second
  local limit=$1 what=$2
  shift 2
  for _ in $(seq "$limit"); do "$@" && return 0; sleep 1; done
  fail "$what (not within $limit s)"
  return 1
}
ended() { case $(field "$1" JobState) in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | "") return 0 ;; esac; return 1; }
requeued() { [ "$(field "$1" Restarts)" -ge 1 ] 2>/dev/null; }
steps_logged() { [ -f "$tmp/runs/$1/metrics.jsonl" ] && [ "$(grep -c '"lm_loss"' "$tmp/runs/$1/metrics.jsonl")" -ge "$2" ]; }
losses() { grep '"lm_loss"' "$1" | sed 's/.*"loss":\([^,]*\),.*/\1/'; }
reference() {  # reference NAME STEPS: the same run under mpirun
  run mpi -np 4 "$bin" train --config "${base[@]}" --set logging.name="$1" --set train.steps="$2"
  [ "$rc" -eq 0 ] || fail "mpirun reference $1: rc $rc: $err"
}

# --- 2 (started first: its time limit and Slurm's requeue delay are the long pole) -------------------------------
# A requeued job waits AuthInfo's cred_expire before it starts again (120 s by default, 20 s here). slurmctld looks
# at time limits every 30 s and signals a job whose limit falls before its next look plus the --signal margin: here
# at its first look, about 30 s after it started, so 27 s into the job (measured). 600 steps take about 40 s on
# 2 cores alone, and longer beside parts 1, 3 and 4, so the signal comes before the end.
long_steps=600
timed=$(submit timed --time=2 --signal=B:USR1@90 -- --set train.steps=$long_steps --set checkpoint.interval=0)

# --- 1: sbatch = mpirun ------------------------------------------------------------------------------------------
job=$(submit equal -- --set train.steps=16)
reference equal_ref 16
wait_until 120 "sbatch job $job (16 steps) ended" ended "$job"
[ "$(field "$job" JobState)" = COMPLETED ] || fail "16-step job: $(field "$job" JobState): $(cat "$tmp/equal.out")"
[ "$(losses "$tmp/runs/equal/metrics.jsonl")" = "$(losses "$tmp/runs/equal_ref/metrics.jsonl")" ] ||
  fail "sbatch and mpirun losses differ: $(paste <(losses "$tmp/runs/equal/metrics.jsonl") \
<(losses "$tmp/runs/equal_ref/metrics.jsonl"))"
[ "$(losses "$tmp/runs/equal/metrics.jsonl" | wc -l)" -eq 16 ] || fail "sbatch run: expected 16 step losses"
grep -q "training finished" "$tmp/equal.out" || fail "no 'training finished' line: $(cat "$tmp/equal.out")"
[ "$(field "$job" Restarts)" = 0 ] || fail "a finished run was requeued"

# --- 3: a stop asked with scancel, to the batch shell and to the tasks -------------------------------------------
for how in batch tasks; do
  job=$(submit "ask_$how" --time=10 -- --set train.steps=100000)
  wait_until 90 "ask_$how: training started" steps_logged "ask_$how" 3 || continue
  if [ "$how" = batch ]; then scancel --batch --signal=USR1 "$job"; else scancel --signal=USR1 "$job"; fi
  wait_until 60 "ask_$how: requeued after the stop" requeued "$job"
  scancel "$job"
  ckpt=$tmp/runs/ask_$how/checkpoints
  [ -f "$ckpt/latest" ] || fail "scancel ($how) -s USR1: no checkpoint saved: $(cat "$tmp/ask_$how.out")"
  grep -q "requeueing job $job" "$tmp/ask_$how.out" || fail "scancel ($how): no requeue line: $(cat "$tmp/ask_$how.out")"
  echo "scancel -s USR1 to the $how: saved $(cat "$ckpt/latest" 2>/dev/null), requeued"
done

# --- 4: a killed rank ----------------------------------------------------------------------------------------------
job=$(submit killed --time=10 -- --set train.steps=100000)
if wait_until 90 "killed: training started" steps_logged killed 3; then
  # A task of the job step (not the batch shell): scontrol listpids gives PID, job, step, local id.
  victim=$(scontrol listpids "$job" 2>/dev/null | awk '$3 == "0" && $4 == "1" {print $1}' | head -1)
  if [ -z "$victim" ]; then
    fail "killed: no task pid in: $(scontrol listpids "$job" 2>&1)"
  else
    start=$(date +%s)
    kill -9 "$victim"
    wait_until 30 "killed: the job ended after a rank was killed" ended "$job"
    echo "killed rank: the job ended $(( $(date +%s) - start )) s after the SIGKILL, $(field "$job" JobState)"
    [ "$(field "$job" JobState)" = FAILED ] || fail "killed: job state $(field "$job" JobState)"
    grep -q "the job step failed with status" "$tmp/killed.out" || fail "killed: no message: $(cat "$tmp/killed.out")"
    [ "$(field "$job" Restarts)" = 0 ] || fail "killed: a failed job was requeued"
  fi
fi

# --- 2, continued: the reference while the requeued job waits, then its second segment -----------------------------
wait_until 150 "timed: requeued at its time limit" requeued "$timed" || cat "$tmp/timed.out" >&2
scontrol update JobId="$timed" TimeLimit=10  # the second segment runs to the end
reference timed_ref "$long_steps"
wait_until 300 "timed: the requeued job ended" ended "$timed"
[ "$(field "$timed" JobState)" = COMPLETED ] || fail "timed: $(field "$timed" JobState): $(cat "$tmp/timed.out")"
for line in "SIGUSR1 received" "requeueing job $timed" "segment 2" "resumed from" "training finished"; do
  grep -q "$line" "$tmp/timed.out" || fail "timed: no '$line' in its output: $(cat "$tmp/timed.out")"
done
got=$(losses "$tmp/runs/timed/metrics.jsonl") want=$(losses "$tmp/runs/timed_ref/metrics.jsonl")
[ "$(printf '%s\n' "$got" | wc -l)" -eq "$long_steps" ] || fail "timed: $(printf '%s\n' "$got" | wc -l) step losses"
[ "$got" = "$want" ] || fail "timed: the interrupted and requeued run's losses differ from the uninterrupted run's"
echo "time limit: saved at $(grep -o 'stopped at step [0-9]*' "$tmp/timed.out" | head -1), requeued, resumed;" \
  "$long_steps losses equal the uninterrupted run's"
finish
