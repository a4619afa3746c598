#!/usr/bin/env bash
# commands_test.sh MOETRAIN: every command's --help, the good paths of config/plan/version, and CLI misuse.
. "$(dirname "$0")/lib.sh"
bin=$1

for cmd in "" "config" "config check" "config show" "config reference" "plan" "version"; do
  run "$bin" $cmd --help
  [ "$rc" -eq 0 ] || fail "moetrain $cmd --help exited $rc: $err"
  printf '%s' "$out" | grep -q "Usage" || fail "moetrain $cmd --help printed no usage: $out"
done

run "$bin" config check configs/tiny.yaml
[ "$rc" -eq 0 ] && [ "$out" = "configs/tiny.yaml: ok (world 4 = pp 2 × dp 2, ep 2)" ] || fail "check tiny: $rc $out $err"

run "$bin" config show configs/small-cpu.yaml --set train.lr=1e-2
[ "$rc" -eq 0 ] || fail "show: $err"
printf '%s\n' "$out" | grep -qx "  lr: 0.01" || fail "show lacks the override: $out"
printf '%s\n' "$out" | grep -qx "  hidden_size: 128" || fail "show lacks small-cpu's width: $out"

run "$bin" plan configs/deepseek-v3-671b.yaml
[ "$rc" -eq 0 ] || fail "plan v3: $err"
for want in "main model .*671.03 B .*37.55 B" "MTP modules \(D = 1, own params\) .*11.61 B" \
            "main \+ MTP as released .*684.49 B" "FLOPs/token" "memory per rank"; do
  printf '%s\n' "$out" | grep -Eq "$want" || fail "plan v3 lacks /$want/"
done
run "$bin" plan configs/tiny.yaml --json
[ "$rc" -eq 0 ] && printf '%s' "$out" | grep -q '"main_total"' || fail "plan --json: $out $err"

run "$bin" version
[ "$rc" -eq 0 ] || fail "version: $err"
# What the build compiled in (CMake's build_info.h next to bin/), not what `version` claims, decides the CUDA lines.
build_info="$(dirname "$bin")/../generated/moetrain/build_info.h"
if grep -qx "#define MOETRAIN_WITH_CUDA 1" "$build_info"; then
  cuda_lines=("^moetrain .*, CUDA \(CUDA [0-9.]+, NCCL from .*\) build$" "^CUDA runtime +[0-9]+\.[0-9]+"
              "^NCCL +[0-9]+\.[0-9]+\.[0-9]+ \(built against [0-9]+\.[0-9]+\.[0-9]+\)$")
elif grep -qx "#define MOETRAIN_WITH_CUDA 0" "$build_info"; then
  cuda_lines=("^moetrain .*, CPU-only \(.*\) build$" "^CUDA +not compiled in$" "^NCCL +not compiled in$")
else
  fail "no MOETRAIN_WITH_CUDA in $build_info"; cuda_lines=()
fi
for want in "^moetrain " "^LibTorch +2\." "^MPI +Open MPI" "^HDF5 +1\.10.*parallel" "^yaml-cpp +0\." "${cuda_lines[@]}"; do
  printf '%s\n' "$out" | grep -Eq "$want" || fail "version lacks /$want/: $out"
done

# Misuse: one line, non-zero.
for args in "" "frobnicate" "config check" "plan configs/tiny.yaml --set" "plan configs/tiny.yaml --set model.top_k" \
            "config check configs/nope.yaml"; do
  run "$bin" $args
  [ "$rc" -ne 0 ] || fail "'moetrain $args' exited 0"
  [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] || fail "'moetrain $args': expected one stderr line, got: $err"
  case "$err" in "moetrain: error: "*) ;; *) fail "'moetrain $args': $err" ;; esac
done
finish
