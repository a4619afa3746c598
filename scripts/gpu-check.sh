#!/usr/bin/env bash
# The GPU check, run on a machine with an NVIDIA GPU from the repository root, with a bundle made here by
# scripts/gpu-bundle.sh (that machine has LibTorch but none of our Debian libraries):
#   scripts/gpu-check.sh BUNDLE_DIR [OUT_DIR]
# Each part runs under its own time limit and the next part runs whatever the last one did; logs go to OUT_DIR
# ($OUT, else ./gpu-check-out) and a table of results is printed last. The parts (about 8 minutes on an H200):
#   1. the unit tests with a GPU visible (the Cuda.* tests run instead of skipping), the slow ones left out;
#   2. 20 steps of the tiny config in fp32 on cuda and on cpu: the losses must agree within 1e-3;
#   3. bench_gpu: FP8 against BF16 on the expert GEMM shapes (and FP8's error against the emulation), then
#      tokens/s and MFU of the DeepSeek-V3-shaped model (configs/bench-gpu-dsv3.yaml) in bf16 and fp8, with 1 and
#      with 4 micro-batches of 4096 tokens per optimizer step;
#   4. bench/gpu_peer.py: the same model shape trained eagerly by Hugging Face transformers (the peer), also with 1
#      and with 4 micro-batches per step.
# The parts' limits add up to 570 s, inside the device tool's 600 s per command.
set -uo pipefail
bundle=$(cd "${1:?usage: scripts/gpu-check.sh BUNDLE_DIR [OUT_DIR]}" && pwd)
out=${2:-${OUT:-$PWD/gpu-check-out}}
mkdir -p "$out"
run=("$bundle/run.sh")
declare -a results=()

# The unit tests read configs under the source path compiled into them: point it at this checkout.
src=$(cat "$bundle/source_dir" 2>/dev/null || true)
if [ -n "$src" ] && [ ! -e "$src/configs/tiny.yaml" ]; then
  mkdir -p "$(dirname "$src")" && ln -sfn "$PWD" "$src"
fi

part() {  # part NAME SECONDS COMMAND...: runs COMMAND, its output to OUT/NAME.log and to the terminal
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  results+=("$(printf '%-10s rc=%-3s %4ss' "$name" "$rc" $((SECONDS - t0)))")
  return 0
}

{
  nvidia-smi || true
  "${run[@]}" moetrain version
} 2>&1 | tee "$out/machine.log"

# 1. Unit tests (GPU-visible). The slow trainer tests and anything needing mpirun are covered on the CPU by CI.
part unit 140 "${run[@]}" moetrain_unit_tests --gtest_brief=1 \
  --gtest_filter='-Trainer.LowPrecisionModesTrackFp32'

# 2. The tiny config, 20 steps, fp32, cuda against cpu.
scratch=$(mktemp -d)
train_tiny() {  # DEVICE
  "$bundle/run.sh" moetrain train --config configs/tiny.yaml --overwrite \
    --set parallel.pp=1 --set parallel.dp=1 --set parallel.ep=1 --set train.steps=20 --set train.eval_interval=0 \
    --set logging.interval=5 --set train.device="$1" --set logging.dir="$scratch" --set logging.name="tiny-$1"
}
compare_tiny() {
  train_tiny cuda && train_tiny cpu && python3 - "$scratch/tiny-cuda/metrics.jsonl" "$scratch/tiny-cpu/metrics.jsonl" <<'EOF'
import json, sys
def losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(path)) if "loss" in r and r.get("kind", "train") == "train"]
g, c = losses(sys.argv[1]), losses(sys.argv[2])
assert len(g) == len(c) == 20, (len(g), len(c))
worst = max(abs(a[1] - b[1]) for a, b in zip(g, c))
print(f"20 steps fp32: cuda loss {g[-1][1]:.6f}, cpu loss {c[-1][1]:.6f}, largest step difference {worst:.2e}")
sys.exit(0 if worst <= 1e-3 else 1)
EOF
}
export bundle scratch
part tiny 60 bash -c "$(declare -f train_tiny compare_tiny); compare_tiny"

# The model's depth: as many layers (of configs/bench-gpu-dsv3.yaml's 4) as `moetrain plan` says fit in 85% of this
# device's memory in fp8 (weights, master, gradients, AdamW moments, FP8 copies, activations; the rest is for the
# CUDA context, workspaces and fragmentation). An H200 (141 GB) takes 4 (80.5 GiB planned); an 80 GB H100 3 (61.2).
gib_of_plan() { "${run[@]}" moetrain plan configs/bench-gpu-dsv3.yaml --set model.num_layers="$1" \
  --set precision.mode=fp8 | awk '$NF == "GiB" { v = $(NF - 1) } END { print v }'; }
device_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -dc 0-9)
layers=4 need=
if [ -n "$device_mib" ]; then
  for layers in 4 3 2; do
    need=$(gib_of_plan "$layers")
    awk -v n="$need" -v m="$device_mib" 'BEGIN { exit !(n != "" && n * 1024 <= 0.85 * m) }' && break
  done
fi
echo "bench model: $layers layers (plan in fp8: ${need:-$(gib_of_plan "$layers")} GiB; device: ${device_mib:-?} MiB)" |
  tee -a "$out/machine.log"

# 3. bench_gpu: expert GEMMs, then the model in bf16 and fp8, each with 1 and 4 micro-batches per optimizer step.
part bench 230 "${run[@]}" bench_gpu --config configs/bench-gpu-dsv3.yaml --set model.num_layers="$layers" \
  --micro-batches 1,4 --steps 4 --warmup 2 --profile-top 25

# 4. The peer: the same shape in transformers, FP32 weights and AdamW under BF16 autocast.
peak=$(grep -o 'peak [0-9.]* TFLOP/s' "$out/bench.log" | head -1 | grep -o '[0-9.]*' || true)
part peer 140 python3 bench/gpu_peer.py --layers "$layers" --dense-layers 1 --experts 16 --top-k 8 --vocab 32768 \
  --seq 4096 --accumulate 1,4 --steps 4 --warmup 2 --dtype bf16 ${peak:+--peak-tflops "$peak"} --json "$out/peer.json"

echo
echo "=== results"
printf '%s\n' "${results[@]}"
grep -h -E '^\[  (PASSED|FAILED)|^FP8 |^host synchronisations|tests? (passed|failed)' "$out/unit.log" | head -20
tail -1 "$out/tiny.log"
sed -n '/^summary/,$p' "$out/bench.log"
tail -1 "$out/peer.log"
