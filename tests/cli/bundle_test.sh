#!/usr/bin/env bash
# bundle_test.sh MOETRAIN: scripts/gpu-bundle.sh packs MOETRAIN's build into a folder whose run.sh runs the programs
# in an empty environment (env -i), with no RUNPATH left into build/ or the venv, every library loaded from the
# bundle, the torch venv or the glibc / libstdc++ / libgcc_s family, mpirun working, and under 64 MiB.
. "$(dirname "$0")/lib.sh"
bin=$1
build_dir=$(cd "$(dirname "$bin")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
b=$tmp/bundle
clean=(env -i HOME="$HOME" PATH=/usr/bin:/bin)

run env MOETRAIN_BUILD_DIR="$build_dir" ./scripts/gpu-bundle.sh "$b"
[ "$rc" -eq 0 ] || { fail "gpu-bundle.sh exited $rc: $err"; finish; }
grep -Eq "^$b: [0-9]+ MiB" <<<"$out" || fail "gpu-bundle.sh did not print the size: $out"

# The GPU check's programs by default; an unknown program is refused by name and the bundle left as it was; named
# programs replace the earlier bundle (the rest of the test runs two ranks of the MPI probe under the bundled mpirun).
programs() { ls "$b/bin" | grep -v -E '^(mpirun|mpiexec|orterun|orted|ompi_info)$' | tr '\n' ' '; }
[ "$(programs)" = "bench_gpu moetrain moetrain_unit_tests " ] || fail "default programs: $(programs)"
run env MOETRAIN_BUILD_DIR="$build_dir" ./scripts/gpu-bundle.sh "$b" moetrain no_such_program
[ "$rc" -ne 0 ] && grep <<<"$err" -q "no program no_such_program in" && [ -x "$b/bin/bench_gpu" ] ||
  fail "an unknown program: rc $rc, $err"
run env MOETRAIN_BUILD_DIR="$build_dir" ./scripts/gpu-bundle.sh "$b" moetrain moetrain_unit_tests mpi_finish_probe
[ "$rc" -eq 0 ] && [ "$(programs)" = "moetrain moetrain_unit_tests mpi_finish_probe " ] ||
  fail "named programs: rc $rc, $(programs) $err"

# Size: a device run carries at most 64 MiB.
bytes=$(du -sb "$b" | cut -f1)
[ "$bytes" -lt $((64 * 1048576)) ] || fail "the bundle takes $bytes bytes, over 64 MiB"

# No RUNPATH at all: nothing may point into build/, the venv or /usr.
while read -r f; do
  d=$(readelf -d "$f" 2>/dev/null)
  if grep -Eq '\((RUNPATH|RPATH)\)' <<<"$d"; then fail "$f keeps a RUNPATH: $(grep -E 'RUNPATH|RPATH' <<<"$d")"; fi
done < <(find "$b/bin" "$b/lib" -type f)
[ -x "$b/bin/moetrain" ] && [ -x "$b/bin/mpirun" ] && [ -x "$b/run.sh" ] || fail "bin/moetrain, bin/mpirun or run.sh missing"

# The programs run in an empty environment.
run "${clean[@]}" "$b/run.sh" moetrain version
[ "$rc" -eq 0 ] || fail "run.sh moetrain version exited $rc: $err"
grep -Eq "^MPI +Open MPI" <<<"$out" && grep -Eq "^HDF5 +1\..*parallel" <<<"$out" ||
  fail "run.sh moetrain version: $out"
run "${clean[@]}" "$b/run.sh" moetrain_unit_tests --gtest_brief=1 --gtest_filter='Router.*:LoaderTest.*:Shards.*'
[ "$rc" -eq 0 ] && grep -Eq '\[  PASSED  \] [1-9][0-9]* tests' <<<"$out" ||
  fail "run.sh moetrain_unit_tests exited $rc: $(printf '%s\n' "$out" "$err" | tail -n 5)"

# Every library a program loads (LD_DEBUG) comes from the bundle, the torch wheel run.sh chose, or the system's
# glibc / libstdc++ / libgcc_s; an HDF5 or Open MPI from this machine's /usr would be missing on the GPU machine.
torch_lib=$("${clean[@]}" "$b/run.sh" printenv LD_LIBRARY_PATH | cut -d: -f2)
site=$(readlink -f "$torch_lib/../..")
b_real=$(readlink -f "$b")
# loaded PROG: the files the process(es) whose program matches PROG loaded: initialised after their exec, or
# dlopen'ed later.
loaded() {
  awk -v PROG="$1" '
    /calling init:/ { if (cur[$1] ~ PROG) print $NF; else buf[$1] = buf[$1] $NF "\n"; next }
    /initialize program:/ { cur[$1] = $NF; if ($NF ~ PROG) printf "%s", buf[$1]; buf[$1] = "" }'
}
check_origins() {  # check_origins WHAT < list of loaded files
  local n=0 f real
  while read -r f; do
    n=$((n + 1))
    real=$(readlink -f "$f")
    case "$real" in "$b_real"/*|"$site"/*) continue ;; esac
    case "$(basename "$f")" in
      ld-linux*|libc.so*|libm.so*|libmvec.so*|libdl.so*|libpthread.so*|librt.so*|libresolv.so*|libutil.so*|\
      libanl.so*|libnss_*|libstdc++.so*|libgcc_s.so*) continue ;;
    esac
    fail "$1 loaded $f from outside the bundle and the torch wheel"
  done
  [ "$n" -gt 10 ] || fail "$1: LD_DEBUG listed only $n libraries"
}
check_origins "moetrain version" < <("${clean[@]}" LD_DEBUG=libs "$b/run.sh" moetrain version 2>&1 >/dev/null |
                                     loaded '/moetrain$' | sort -u)

# mpirun from the bundle: two ranks through MPI_Init (Open MPI's and PMIx's plug-ins from the bundle) and finish.
as_root=()
[ "$(id -u)" -ne 0 ] || as_root=(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
mpi_env=("${clean[@]}" "${as_root[@]}")
mpirun=("$b/run.sh" mpirun -q --oversubscribe --bind-to none -np 2)
if [ -x "$b/bin/mpi_finish_probe" ]; then
  run "${mpi_env[@]}" "${mpirun[@]}" mpi_finish_probe -1
  [ "$rc" -eq 0 ] && [ "$(grep -c 'exit 0$' <<<"$out")" -eq 2 ] ||
    fail "run.sh mpirun -np 2 mpi_finish_probe exited $rc: $out $err"
  ld_log=$tmp/mpirun.ld
  "${mpi_env[@]}" LD_DEBUG=libs "${mpirun[@]}" mpi_finish_probe -1 >"$ld_log" 2>&1
  grep -q '/lib/openmpi3/mca_btl_vader.so' "$ld_log" || fail "the ranks did not load the bundle's btl vader plug-in"
  check_origins "mpirun + 2 ranks" < <(loaded '(^|/)(orterun|mpirun|mpi_finish_probe)$' <"$ld_log" | sort -u)
else
  fail "no mpi_finish_probe in the bundle"
fi

# No LibTorch: one clear error. A python3 without torch first on PATH, no venv under HOME.
mkdir -p "$tmp/fakebin"
printf '#!/bin/sh\nexit 1\n' >"$tmp/fakebin/python3"
chmod +x "$tmp/fakebin/python3"
run env -i HOME="$tmp" PATH="$tmp/fakebin:/usr/bin:/bin" "$b/run.sh" moetrain version
[ "$rc" -ne 0 ] && [ "$(wc -l <<<"$err")" -eq 1 ] && grep -q '^run.sh: error: no LibTorch found' <<<"$err" ||
  fail "without torch: rc $rc, $err"
finish
