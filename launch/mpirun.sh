#!/usr/bin/env bash
# mpirun with what moetrain needs on one machine or many:
#   launch/mpirun.sh -np N [mpirun options...] -- moetrain ARGS...
# (-q: the ranks report errors themselves, as one line; mpirun's own abort banner would repeat it.)
# Adds --oversubscribe when N exceeds the cores here, lets root run (containers), binds nothing (ranks set their
# own LibTorch threads from parallel.intra_op_threads) and exports OMP_NUM_THREADS=1 to every rank.
set -euo pipefail
np=""
opts=()
while (($#)); do
  case "$1" in
    --) shift; break ;;
    -np|-n) np="$2"; opts+=("$1" "$2"); shift 2 ;;
    *) opts+=("$1"); shift ;;
  esac
done
if [ -z "$np" ] || [ $# -eq 0 ]; then
  echo "usage: launch/mpirun.sh -np N [mpirun options...] -- moetrain ARGS..." >&2
  exit 2
fi
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
extra=(-q --bind-to none -x OMP_NUM_THREADS=1)
if [ "$np" -gt "$(nproc)" ]; then
  extra+=(--oversubscribe)
fi
exec mpirun "${extra[@]}" "${opts[@]}" "$@"
