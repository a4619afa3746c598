# Helpers for the command-line tests (sourced).
set -uo pipefail
fails=0
fail() { echo "FAIL: $*" >&2; fails=$((fails + 1)); }
finish() { if ((fails)); then echo "$fails check(s) failed" >&2; exit 1; fi; echo "all checks passed"; }
# run CMD...: sets $rc, $out (stdout), $err (stderr)
run() {
  local o e
  o=$(mktemp); e=$(mktemp)
  "$@" >"$o" 2>"$e"; rc=$?
  out=$(cat "$o"); err=$(cat "$e"); rm -f "$o" "$e"
}
# tiny1 MOETRAIN ARGS...: `moetrain train` on configs/tiny.yaml in one process (pp = dp = ep = 1).
tiny1() {
  local bin=$1
  shift
  "$bin" train --config configs/tiny.yaml --set parallel.pp=1 --set parallel.dp=1 --set parallel.ep=1 "$@"
}
mpi() {
  if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
  mpirun -q --oversubscribe --bind-to none "$@"
}
# scratch: $tmp, a fresh directory removed when the script exits.
scratch() {
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
}
