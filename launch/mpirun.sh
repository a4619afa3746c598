#!/usr/bin/env bash
# mpirun with what moetrain needs on one machine or many:
#   launch/mpirun.sh -np N [--hostfile FILE [--ranks-per-node K]] [mpirun options...] -- moetrain ARGS...
# Several machines: a hostfile (one host per line, `slots=K` for its ranks) and --ranks-per-node K (mpirun's
# --map-by ppr:K:node: K consecutive ranks on each node); each rank's GPU is its index among the ranks of its node,
# from MPI's shared-memory communicator, right under any launcher and mapping. On one machine (no --hostfile, --host
# or -H) it adds --oversubscribe when N exceeds the cores here. It lets root run (containers), binds nothing (ranks set their
# own LibTorch threads from parallel.intra_op_threads) and exports OMP_NUM_THREADS=1 to every rank. mpirun runs
# quiet (-q: the ranks report their own errors, as one line; mpirun's abort banner would repeat it), so a rank that
# dies without a word — killed by a signal, e.g. by the kernel when memory runs out — is reported here. SIGTERM,
# SIGUSR1, SIGUSR2, SIGINT and SIGHUP sent to this script are passed to mpirun, which forwards them to the ranks.
# Open MPI's own echo of a vanished peer ("Read -1, expected …, errno = 3") is filtered out of the ranks' stderr.
set -euo pipefail
usage="usage: launch/mpirun.sh -np N [--hostfile FILE [--ranks-per-node K]] [mpirun options...] -- moetrain ARGS..."
np=""
hosts=""
per_node=""
mapped=""
opts=()
while (($#)); do
  case "$1" in
    --) shift; break ;;
    -np|-n|--np)
      if [ -n "$np" ]; then
        echo "launch/mpirun.sh: -np given twice ($np and ${2:-}); moetrain runs one program on every rank: give one -np" >&2
        exit 2
      fi
      np="${2:-}"; opts+=("$1" "$np"); shift 2 || shift ;;
    --ranks-per-node)
      if ! [[ "${2:-}" =~ ^[1-9][0-9]*$ ]]; then
        echo "launch/mpirun.sh: --ranks-per-node '${2:-}' is not a positive number of ranks" >&2
        exit 2
      fi
      per_node=$2; opts+=(--map-by "ppr:$2:node"); shift 2 ;;
    --map-by|--map-by=*) mapped=1; opts+=("$1"); shift ;;
    --hostfile|--machinefile|--host|-H)
      if [ -z "${2:-}" ] || [[ "$2" == -* ]]; then
        echo "launch/mpirun.sh: $1 needs a value" >&2
        exit 2
      fi
      if [[ "$1" == --hostfile || "$1" == --machinefile ]] && [ ! -r "$2" ]; then
        echo "launch/mpirun.sh: $1 $2: no such readable file" >&2
        exit 2
      fi
      hosts=1; opts+=("$1" "$2"); shift 2 ;;
    :) echo "launch/mpirun.sh: ':' (several programs, MPMD) is not supported; moetrain runs one program on every rank" >&2
       exit 2 ;;
    *) opts+=("$1"); shift ;;
  esac
done
if [ -z "$np" ] || [ $# -eq 0 ]; then
  echo "$usage" >&2
  exit 2
fi
if [ -n "$per_node" ] && [ -n "$mapped" ]; then
  echo "launch/mpirun.sh: --ranks-per-node $per_node is a --map-by; give one of them" >&2
  exit 2
fi
if ! [[ "$np" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/mpirun.sh: -np '$np' is not a positive number of ranks" >&2
  exit 2
fi
for a in "$@"; do
  if [ "$a" = ":" ]; then
    echo "launch/mpirun.sh: ':' (several programs, MPMD) is not supported; moetrain runs one program on every rank" >&2
    exit 2
  fi
done
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
extra=(-q --bind-to none -x OMP_NUM_THREADS=1)
if [ -z "$hosts" ] && [ "$np" -gt "$(nproc)" ]; then
  extra+=(--oversubscribe)
fi

# Open MPI's shared-memory transport prints "[host:pid] Read -1, expected N, errno = 3" on the surviving ranks when
# a peer process vanished mid-transfer (errno 3, ESRCH: no such process). The dead rank is reported below; that
# line only repeats it in Open MPI's words, so it is dropped (every other line passes through as it comes).
exec 4>&2
exec 2> >(grep --line-buffered -vE '^\[[^]]*\] Read -?[0-9]+, expected [0-9]+, errno = 3$' >&4)
filter=$!
mpirun "${extra[@]}" "${opts[@]}" "$@" &
child=$!
for sig in TERM USR1 USR2 INT HUP; do
  trap "kill -$sig $child 2>/dev/null || true" "$sig"
done
rc=0
while :; do
  rc=0
  wait "$child" || rc=$?
  kill -0 "$child" 2>/dev/null || break  # still running: the wait was cut short by a signal passed on
done
exec 2>&4 4>&-  # the ranks' stderr ends here: let the filter pass on what is left before this script speaks
wait "$filter" 2>/dev/null || true
if [ "$rc" -gt 128 ] && [ "$rc" -lt 160 ]; then
  sig=$(kill -l "$((rc - 128))" 2>/dev/null || echo "$((rc - 128))")
  hint=""
  [ "$sig" = KILL ] && hint=" (SIGKILL from the system usually means a rank ran out of memory: see dmesg or the job's memory limit)"
  echo "moetrain: a rank ended by SIG$sig without a message$hint; the job stopped with exit status $rc" >&2
fi
exit "$rc"
