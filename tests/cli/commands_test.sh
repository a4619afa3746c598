#!/usr/bin/env bash
# commands_test.sh MOETRAIN: every command's --help, the good paths of config/plan/version, and CLI misuse.
. "$(dirname "$0")/lib.sh"
bin=$1

for cmd in "" "config" "config check" "config show" "config reference" "plan" "version" "report"; do
  run "$bin" $cmd --help
  [ "$rc" -eq 0 ] || fail "moetrain $cmd --help exited $rc: $err"
  grep <<<"$out" -q "Usage" || fail "moetrain $cmd --help printed no usage: $out"
done

run "$bin" config check configs/tiny.yaml
[ "$rc" -eq 0 ] && [ "$out" = "configs/tiny.yaml: ok (world 4 = pp 2 × dp 2, ep 2)" ] || fail "check tiny: $rc $out $err"

run "$bin" config show configs/small-cpu.yaml --set train.lr=1e-2
[ "$rc" -eq 0 ] || fail "show: $err"
grep <<<"$out" -qx "  lr: 0.01" || fail "show lacks the override: $out"
grep <<<"$out" -qx "  hidden_size: 128" || fail "show lacks small-cpu's width: $out"

run "$bin" plan configs/deepseek-v3-671b.yaml
[ "$rc" -eq 0 ] || fail "plan v3: $err"
for want in "main model .*671.03 B .*37.55 B" "MTP modules \(D = 1, own params\) .*11.61 B" \
            "main \+ MTP as released .*684.49 B" "FLOPs/token" "memory per rank"; do
  grep <<<"$out" -Eq "$want" || fail "plan v3 lacks /$want/"
done
run "$bin" plan configs/tiny.yaml --json
[ "$rc" -eq 0 ] && grep <<<"$out" -q '"main_total"' || fail "plan --json: $out $err"

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
  grep <<<"$out" -Eq "$want" || fail "version lacks /$want/: $out"
done

# Misuse: one line, non-zero.
for args in "" "frobnicate" "config check" "plan configs/tiny.yaml --set" "plan configs/tiny.yaml --set model.top_k" \
            "config check configs/nope.yaml"; do
  run "$bin" $args
  [ "$rc" -ne 0 ] || fail "'moetrain $args' exited 0"
  [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] || fail "'moetrain $args': expected one stderr line, got: $err"
  case "$err" in "moetrain: error: "*) ;; *) fail "'moetrain $args': $err" ;; esac
done

# expect_error WANT CMD...: CMD exits non-zero within 30 s, prints nothing on stdout and one stderr line,
# "moetrain: error: ..." matching WANT (an extended regex), with no LibTorch backtrace ("frame #").
expect_error() {
  local want=$1; shift
  run timeout 30 "$@" </dev/null
  [ "$rc" -ne 0 ] || fail "'$*' exited 0"
  [ "$rc" -ne 124 ] || fail "'$*' did not finish within 30 s"
  [ "$rc" -lt 128 ] || fail "'$*' died of signal $((rc - 128))"
  [ -z "$out" ] || fail "'$*' printed to stdout: $out"
  [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] || fail "'$*': expected one stderr line, got: $err"
  case "$err" in *"frame #"*|*"Exception raised from"*) fail "'$*' printed a backtrace: $err" ;; esac
  case "$err" in "moetrain: error: "*) ;; *) fail "'$*': $err" ;; esac
  grep <<<"$err" -Eq -- "$want" || fail "'$*': '$err' does not match /$want/"
}

# Unknown commands are named, also with --help (CLI11 alone printed the main help and exited 0).
expect_error "unknown command 'serve'; commands: config, plan, version, train, ckpt, eval, generate, report, data" "$bin" serve
expect_error "unknown command 'serve'" "$bin" serve --help
expect_error "unknown command 'config frob'; config commands: check, show, reference" "$bin" config frob
# A directory for a config file; a section for --set.
expect_error "^moetrain: error: configs: is a directory, expected a YAML file$" "$bin" config check configs
expect_error "'model' is a section; --set needs section.key=value" "$bin" plan configs/tiny.yaml --set model=1
# Absurd sizes: `plan` once printed negative counts or looped for ever, `train` died with LibTorch backtraces.
expect_error "model.num_layers: 1000000000000000000 makes the model's parameter count overflow 64 bits" \
  "$bin" plan configs/tiny.yaml --set model.num_layers=1e18
expect_error "model.hidden_size: 4611686018427387904 makes .* overflow 64 bits" \
  "$bin" plan configs/small-cpu.yaml --set model.hidden_size=4611686018427387904 --json
runs=$(mktemp -d)
state="train.device = cpu: the plan's weights, gradients and optimizer state take .* per rank on stage 0, more than \
this machine's .* of RAM"
while IFS='|' read -r sizes want; do
  # shellcheck disable=SC2086  # sizes holds further --set arguments
  expect_error "$want" "$bin" train --config configs/small-cpu.yaml --set logging.dir="$runs" --set $sizes
done <<EOF
model.hidden_size=4611686018427387904|model.hidden_size: 4611686018427387904 makes .* overflow 64 bits
model.num_layers=1e18|model.num_layers: 1000000000000000000 makes the model's parameter count overflow 64 bits
model.n_routed_experts=1099511627776|$state
model.vocab_size=1099511627776|$state
model.num_layers=10000000 --set model.n_dense_layers=10000000|$state
train.global_batch_size=0 --set train.micro_batch_size=1000000|the plan estimates .* per rank on stage 0 \(.* of activations\), over 64 × this machine's .* of RAM
EOF
[ -z "$(ls -A "$runs")" ] || fail "a refused train wrote into its run directory: $(ls -A "$runs")"
rm -rf "$runs"
finish
