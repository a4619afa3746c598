#!/usr/bin/env bash
# hf_interop_test.sh MOETRAIN PYTHON: a trained tiny checkpoint exported with `ckpt export --format hf` loads in
# transformers (PYTHON: the LibTorch virtual environment's, which has it) and gives the logits `moetrain eval
# --dump-logits` gives on the same windows (max abs difference <= 1e-4, FP32; `eval` on 5 ranks gives the one
# process's report and logits; a --dtype bf16 export holds BF16
# tensors and, run in BF16, stays within 0.3 with the same most likely token at >= 95% of positions); sharded
# safetensors with their index; exports transformers cannot express, and exports onto existing files, are refused. `ckpt import` of the
# export equals the checkpoint bit for bit, and `train --init-from` it starts from the trained weights on one rank
# and on pp 2 × dp 2 × ep 2; a folder that does not fit the config is refused, naming what differs.
. "$(dirname "$0")/lib.sh"
bin=$1
python=$2
scratch

train() {
  tiny1 "$bin" --set train.steps=20 --set train.eval_interval=0 --set checkpoint.interval=20 \
    --set logging.dir="$tmp/runs" "$@"
}
run train --set logging.name=tiny --set checkpoint.dir="$tmp/ckpt"
[ "$rc" -eq 0 ] || fail "train: $err"
run "$bin" data synth --out "$tmp/synth/s" --tokens 20000 --vocab-size 17 --branching 3 --order 2  # tiny.yaml's source
[ "$rc" -eq 0 ] || fail "data synth: $err"

# Sharded: a limit of 0.5 MB makes several files and the index.
run "$bin" ckpt export "$tmp/ckpt" --format hf --out "$tmp/hf" --shard-gb 0.0005
[ "$rc" -eq 0 ] || fail "export: $err"
echo "$out"
[ -f "$tmp/hf/config.json" ] && [ -f "$tmp/hf/model.safetensors.index.json" ] || fail "no config.json or index"
[ "$(ls "$tmp"/hf/model-*-of-*.safetensors | wc -l)" -gt 1 ] || fail "expected several safetensors shards"
grep -q '"rope_interleave": true' "$tmp/hf/config.json" && grep -q '"num_nextn_predict_layers": 1' "$tmp/hf/config.json" ||
  fail "config.json lacks rope_interleave or num_nextn_predict_layers"

run "$bin" eval "$tmp/ckpt" --data "$tmp/synth/s" --windows 12 --dump-logits "$tmp/logits.npy"
[ "$rc" -eq 0 ] || fail "eval: $err"
echo "$out"
grep <<<"$out" -q "eval: 12 windows of 64 tokens" || fail "eval output: $out"
grep <<<"$out" -q "mtp1 loss" && grep <<<"$out" -q "max-vio per MoE layer: layers.1" ||
  fail "eval reports no MTP loss or MaxVio: $out"

# Data parallel over 5 launched ranks (12 windows: blocks of 2, 2, 3, 2, 3): one report, the one process's numbers,
# the same logits in the one file; with 3 windows two ranks have none.
run mpi -np 5 "$bin" eval "$tmp/ckpt" --data "$tmp/synth/s" --windows 12 --dump-logits "$tmp/logits5.npy"
[ "$rc" -eq 0 ] || fail "eval on 5 ranks: $err"
echo "$out"
[ "$(printf '%s\n' "$out" | grep -c '^eval:')" -eq 1 ] || fail "expected one report from 5 ranks: $out"
one=$("$bin" eval "$tmp/ckpt" --data "$tmp/synth/s" --windows 12)
[ "$(printf '%s\n' "$out" | grep '^eval:')" = "$(printf '%s\n' "$one" | grep '^eval:')" ] ||
  fail "5 ranks report other losses: $out vs $one"
run "$python" -c "import numpy as np, sys; a = np.load(sys.argv[1]); b = np.load(sys.argv[2]); d = float(np.abs(a - b).max()); print('logits on 5 ranks vs 1: shape', b.shape, 'max |diff|', d); sys.exit(a.shape != b.shape or d > 1e-5)" "$tmp/logits.npy" "$tmp/logits5.npy"
echo "$out"
[ "$rc" -eq 0 ] || fail "the logits of 5 ranks differ: $out $err"
run mpi -np 5 "$bin" eval "$tmp/ckpt" --data "$tmp/synth/s" --windows 3
[ "$rc" -eq 0 ] && [ "$(printf '%s\n' "$out" | grep '^eval:')" = "$("$bin" eval "$tmp/ckpt" --data "$tmp/synth/s" --windows 3 | grep '^eval:')" ] ||
  fail "3 windows on 5 ranks: $rc $out $err"

run "$python" tests/cli/hf_logits.py "$tmp/hf" "$tmp/logits.npy" "$tmp/synth/s.00000.bin" --tol 1e-4
echo "$out"
[ "$rc" -eq 0 ] || fail "transformers' logits differ: $out $err"
run "$bin" ckpt export "$tmp/ckpt" --format hf --out "$tmp/hf-bf16" --dtype bf16
[ "$rc" -eq 0 ] && grep <<<"$out" -q "BF16" || fail "bf16 export: $out $err"
run "$python" tests/cli/hf_logits.py "$tmp/hf-bf16" "$tmp/logits.npy" "$tmp/synth/s.00000.bin" --dtype bf16 \
  --tol 0.3 --min-agree 0.95
echo "$out"
[ "$rc" -eq 0 ] || fail "transformers' logits of the bf16 export differ: $out $err"

# Refused: a norm epsilon transformers cannot express; an --out that holds files.
run train --set logging.name=eps --set checkpoint.dir="$tmp/ckpt-eps" --set train.steps=2 \
  --set checkpoint.interval=2 --set model.norm_eps=1e-5
[ "$rc" -eq 0 ] || fail "train (norm_eps): $err"
run "$bin" ckpt export "$tmp/ckpt-eps" --format hf --out "$tmp/hf-eps"
[ "$rc" -ne 0 ] && grep <<<"$err" -q "model.norm_eps is 1e-05" || fail "norm_eps 1e-5 exported: $rc $err"
[ ! -e "$tmp/hf-eps" ] || fail "a refused export left $tmp/hf-eps"
run "$bin" ckpt export "$tmp/ckpt" --format hf --out "$tmp/hf"
[ "$rc" -ne 0 ] && grep <<<"$err" -q "not an empty directory" || fail "export onto files: $rc $err"

# Back: import(export(ckpt)) holds the same weights, bit for bit.
run "$bin" config show configs/tiny.yaml --set parallel.pp=1 --set parallel.dp=1 --set parallel.ep=1
printf '%s\n' "$out" >"$tmp/tiny1.yaml"
run "$bin" ckpt import "$tmp/hf" --format hf --config "$tmp/tiny1.yaml" --out "$tmp/imported"
[ "$rc" -eq 0 ] || fail "import: $err"
run "$bin" ckpt verify "$tmp/imported"
[ "$rc" -eq 0 ] || fail "verify of the import: $err"
run "$bin" ckpt export "$tmp/imported" --out "$tmp/imported.h5"
run "$bin" ckpt export "$tmp/ckpt" --out "$tmp/original.h5"
run h5diff "$tmp/imported.h5" "$tmp/original.h5"
[ "$rc" -eq 0 ] || fail "import(export(ckpt)) differs from ckpt: $out $err"

# Continued pre-training from it: step 1's LM loss is the trained model's, not a fresh one's, on any layout.
lm1() { grep -o '"lm_loss":[0-9.eE+-]*' "$1" | head -n 1 | cut -d: -f2; }
run train --set logging.name=scratch --set train.steps=1 --set checkpoint.interval=0
run train --set logging.name=init --set train.steps=2 --set checkpoint.interval=0 --init-from "$tmp/imported"
[ "$rc" -eq 0 ] || fail "train --init-from: $err"
grep <<<"$out" -q "initialized from the weights of" || fail "no initialization line: $out"
scratch=$(lm1 "$tmp/runs/scratch/metrics.jsonl")
init=$(lm1 "$tmp/runs/init/metrics.jsonl")
echo "step 1 LM loss: from scratch $scratch, from the imported weights $init"
awk -v a="$scratch" -v b="$init" 'BEGIN { exit !(b < a - 0.5) }' || fail "--init-from did not start from the weights"
run mpi -np 4 "$bin" train --config configs/tiny.yaml --set train.steps=1 --set train.eval_interval=0 \
  --set logging.dir="$tmp/runs" --set logging.name=init4 --init-from "$tmp/imported"
[ "$rc" -eq 0 ] || fail "train --init-from on 4 ranks: $err"
init4=$(lm1 "$tmp/runs/init4/metrics.jsonl")  # the same up to the layouts' summation order (FP32)
awk -v a="$init4" -v b="$init" 'BEGIN { d = a - b; exit !(d < 1e-6 * b && -d < 1e-6 * b) }' ||
  fail "4 ranks start elsewhere: $init4 vs $init"
run train --set logging.name=both --init-from "$tmp/imported" --resume auto
[ "$rc" -ne 0 ] && grep <<<"$err" -q "pass one" || fail "--init-from with --resume: $rc $err"

# A folder that does not fit the config: named.
run "$bin" config show "$tmp/tiny1.yaml" --set model.num_layers=3
printf '%s\n' "$out" >"$tmp/three.yaml"
run "$bin" ckpt import "$tmp/hf" --format hf --config "$tmp/three.yaml" --out "$tmp/bad"
[ "$rc" -ne 0 ] && grep <<<"$err" -q "num_hidden_layers is 4 there but 3 by the config" ||
  fail "a 4-layer folder imported for 3 layers: $rc $err"
finish
