#!/usr/bin/env bash
# resume_test.sh MOETRAIN: checkpoints end to end.
#  - 20 uninterrupted steps vs 10 steps, stop, --resume auto, 10 more: bit-identical losses, on (1,1,1) and (2,2,2),
#    (2,2,2) in bf16 (BF16 parameters restored from the saved FP32 master weights), (2,2,2) under the interleaved
#    schedule (2 chunks per rank) and (2,1,1) under DualPipeV (its split backward's W passes included);
#  - saved at (2,2,2) (ZeRO-1 on: each rank saves its part of the optimizer state as element ranges), resumed at
#    (1,4,4), (2,4,2), (1,1,1), at (2,4,2) with ZeRO-1 off, at (2,2,2) interleaved and at (2,1,1) under DualPipeV;
#    saved with ZeRO-1 off, resumed at (2,4,2) with it; saved interleaved, resumed in one process: the next five
#    losses within 1e-5 relative;
#  - a save killed with SIGKILL before its commit: the job resumes from the previous checkpoint;
#  - flipped bytes in a shard: `ckpt verify` and --resume fail naming the file and the dataset;
#  - `ckpt inspect` and `ckpt export`.
. "$(dirname "$0")/../cli/lib.sh"
bin=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
base=(--config configs/tiny.yaml --set logging.dir="$dir" --set train.eval_interval=0 --set train.eval_batches=1
      --set train.micro_batch_size=2 --set train.peak_flops=1e9 --set parallel.dp=0)
losses() { grep '"lm_loss"' "$1" | sed 's/.*"loss":\([^,]*\),.*/\1/'; }
train() {  # NP NAME STEPS [args...]
  local np=$1 name=$2 steps=$3
  shift 3
  run mpi -np "$np" "$bin" train "${base[@]}" --set logging.name="$name" --set train.steps="$steps" "$@"
  [ "$rc" -eq 0 ] || fail "train $name ($np ranks, $steps steps): rc $rc: $err"
}

for layout in "1 1 1" "2 2 2" "2 2 2 bf16" "2 2 2 fp32 interleaved" "2 1 1 fp32 dualpipev"; do
  set -- $layout
  np=$(($1 * $2)) tag="$1$2$3${4:-}${5:-}"
  lay=(--set parallel.pp="$1" --set parallel.ep="$3" --set precision.mode="${4:-fp32}")
  [ -z "${5:-}" ] || lay+=(--set parallel.schedule="$5" --set parallel.virtual_stages=2)
  train "$np" "full$tag" 20 "${lay[@]}"
  train "$np" "split$tag" 10 "${lay[@]}" --set checkpoint.interval=10
  train "$np" "split$tag" 20 "${lay[@]}" --set checkpoint.interval=10 --resume auto
  grep <<<"$out" -q "resumed from .*step_0000010 at step 10" || fail "($tag) did not resume from step 10: $out"
  # The resumed process prints its first step (logging.interval is 10), with an ETA from its own steps.
  grep <<<"$out" -q "^step 11/20 | " || fail "($tag) no progress line for the first resumed step: $out"
  if [ "$(losses "$dir/full$tag/metrics.jsonl")" != "$(losses "$dir/split$tag/metrics.jsonl")" ]; then
    fail "($tag) resumed losses differ from the uninterrupted run:
$(paste <(losses "$dir/full$tag/metrics.jsonl") <(losses "$dir/split$tag/metrics.jsonl"))"
  fi
  [ "$(losses "$dir/split$tag/metrics.jsonl" | wc -l)" -eq 20 ] || fail "($tag) expected 20 step losses"
done

# bf16 with ZeRO-1: the checkpoint holds the FP32 master weights, each rank's pieces as element ranges.
python3 - "$dir/split222bf16/checkpoints/step_0000010/index.json" <<'PY' || fail "bf16: no FP32 master weights saved"
import json, sys
tensors = json.load(open(sys.argv[1]))["tensors"]
wo = tensors["model/layers.0.attn.wo"]
assert wo["dtype"] == "float32" and any("flat" in p for p in wo["parts"]), wo
PY

# Asynchronous saves (written in the background, committed steps later) resume the same trajectory.
train 1 async111 10 --set parallel.pp=1 --set parallel.ep=1 --set checkpoint.interval=4 --set checkpoint.async=true
[ "$(cat "$dir/async111/checkpoints/latest")" = "step_0000010" ] || fail "async: the final save was not committed"
train 1 async111 20 --set parallel.pp=1 --set parallel.ep=1 --set checkpoint.interval=4 --set checkpoint.async=true \
  --resume auto
[ "$(losses "$dir/full111/metrics.jsonl")" = "$(losses "$dir/async111/metrics.jsonl")" ] ||
  fail "async checkpoints: resumed losses differ from the uninterrupted run"
run "$bin" ckpt verify "$dir/async111/checkpoints"
[ "$rc" -eq 0 ] || fail "async checkpoint does not verify: $err"

# Resharding: the (2,2,2) checkpoint at step 10 continues on other layouts like the uninterrupted (2,2,2) run.
grep -q '"flat"' "$dir/split222/checkpoints/step_0000010/index.json" ||
  fail "a ZeRO-1 checkpoint holds no element-range parts of the optimizer state"
train 4 off222 10 --set parallel.pp=2 --set parallel.ep=2 --set checkpoint.interval=10 \
  --set parallel.distributed_optimizer=false
! grep -q '"flat"' "$dir/off222/checkpoints/step_0000010/index.json" || fail "ZeRO-1 off: element-range parts"
want=$(losses "$dir/full222/metrics.jsonl" | sed -n '11,15p')
for layout in "1 4 4 true split222" "2 4 2 true split222" "1 1 1 true split222" "2 4 2 false split222" \
              "2 4 2 true off222" "2 2 2 true split222 interleaved" "1 1 1 true split222fp32interleaved" \
              "2 1 1 true split222 dualpipev"; do
  set -- $layout
  name="reshard$1$2$3$4$5${6:-}"
  mkdir -p "$dir/$name"
  cp -r "$dir/$5/checkpoints" "$dir/$name/"
  sched=()
  [ -z "${6:-}" ] || sched=(--set parallel.schedule="$6" --set parallel.virtual_stages=2)
  train $(($1 * $2)) "$name" 15 --set parallel.pp="$1" --set parallel.ep="$3" \
    --set parallel.distributed_optimizer="$4" "${sched[@]}" --resume "$dir/$name/checkpoints/step_0000010"
  got=$(losses "$dir/$name/metrics.jsonl")
  python3 - "$want" "$got" "$1$2$3 zero $4 from $5" <<'PY' || fail "resharded onto ($1,$2,$3), ZeRO-1 $4, from $5: losses differ"
import sys
want = [float(x) for x in sys.argv[1].split()]
got = [float(x) for x in sys.argv[2].split()]
assert len(got) == 5, f"expected 5 losses, got {len(got)}"
for w, g in zip(want, got):
    rel = abs(w - g) / abs(w)
    print(f"({sys.argv[3]}) {g:.9f} vs {w:.9f}: relative {rel:.2e}")
    assert rel < 1e-5
PY
done

# Token shards: the sampler's position is saved and a resume on another dp size reads the same global order.
"$bin" data tokenizer-train --input tests/data/text/licenses.txt --vocab-size 512 --out "$dir/tok.model" >/dev/null 2>&1
"$bin" data build --tokenizer "$dir/tok.model" --input tests/data/text/licenses.txt --out "$dir/shards/lic" \
  >/dev/null 2>&1 || fail "could not build the shards"
sh=(--set model.vocab_size=512 --set data.source=shards --set data.path="$dir/shards/lic" --set data.valid_fraction=0.05)
train 1 shardfull 12 --set parallel.pp=1 --set parallel.ep=1 "${sh[@]}"
train 1 shardsplit 6 --set parallel.pp=1 --set parallel.ep=1 "${sh[@]}" --set checkpoint.interval=6
train 2 shardsplit 12 --set parallel.pp=1 --set parallel.ep=1 "${sh[@]}" --set checkpoint.interval=6 --resume auto
python3 - "$(losses "$dir/shardfull/metrics.jsonl" | sed -n '7,12p')" \
  "$(losses "$dir/shardsplit/metrics.jsonl" | sed -n '7,12p')" <<'PY' || fail "shards resumed on dp 2: losses differ"
import sys
want = [float(x) for x in sys.argv[1].split()]
got = [float(x) for x in sys.argv[2].split()]
assert len(got) == 6 and len(want) == 6, (want, got)
for w, g in zip(want, got):
    print(f"(shards, dp 1 -> 2) {g:.9f} vs {w:.9f}: relative {abs(w - g) / abs(w):.2e}")
    assert abs(w - g) / abs(w) < 1e-5
PY

# A job killed in the middle of a save (test-only pause before the commit) resumes from the previous checkpoint.
log="$dir/killed.log"
MOETRAIN_TEST_CKPT_PAUSE_STEP=6 MOETRAIN_TEST_CKPT_PAUSE_S=60 "$bin" train "${base[@]}" --set parallel.dp=1 --set parallel.pp=1 \
  --set parallel.ep=1 --set logging.name=killed --set train.steps=8 --set checkpoint.interval=3 >"$log" 2>&1 &
pid=$!
for _ in $(seq 600); do grep -q "pausing" "$log" && break; sleep 0.1; done
grep -q "pausing" "$log" || fail "the save never reached its pause: $(cat "$log")"
kill -9 "$pid"
wait "$pid" 2>/dev/null
[ "$(cat "$dir/killed/checkpoints/latest")" = "step_0000003" ] || fail "latest moved before the commit"
[ -d "$dir/killed/checkpoints/step_0000006.tmp" ] || fail "the interrupted save left no .tmp directory"
train 1 killed 8 --set parallel.pp=1 --set parallel.ep=1 --set checkpoint.interval=3 --resume auto
grep <<<"$out" -q "resumed from .*step_0000003 at step 3" || fail "did not resume from step 3: $out"
[ "$(cat "$dir/killed/checkpoints/latest")" = "step_0000008" ] || fail "latest after the resumed run"

# Inspect, export.
ck="$dir/split111/checkpoints"
run "$bin" ckpt inspect "$ck"
[ "$rc" -eq 0 ] && grep <<<"$out" -q "model/layers.1.moe.experts.w_gate .* 8×32×64 .*float32" ||
  fail "inspect: $out $err"
run "$bin" ckpt export "$ck" --out "$dir/model.h5"
[ "$rc" -eq 0 ] || fail "export: $err"
h5ls -r "$dir/model.h5" > "$dir/h5ls.txt"
grep -q "^/layers.1.moe.router.weight .*Dataset {8, 64}" "$dir/h5ls.txt" || fail "export lacks the router"
! grep -q "exp_avg" "$dir/h5ls.txt" || fail "export holds optimizer state"

# Corruption: flip bytes inside one dataset's data.
shard="$ck/step_0000020/shard_00000.h5"
h5dump -b LE -d /model/layers.0.attn.wo -o "$dir/wo.bin" "$shard" >/dev/null
python3 - "$shard" "$dir/wo.bin" <<'PY' || fail "could not corrupt the shard"
import sys
data = open(sys.argv[1], "rb").read()
raw = open(sys.argv[2], "rb").read()
at = data.find(raw)
assert at >= 0
with open(sys.argv[1], "r+b") as f:
    f.seek(at + len(raw) // 2)
    b = f.read(1)
    f.seek(at + len(raw) // 2)
    f.write(bytes([b[0] ^ 0xFF]))
PY
run "$bin" ckpt verify "$ck"
[ "$rc" -ne 0 ] && grep <<<"$err" -q "shard_00000.h5: checksum mismatch in dataset /model/layers.0.attn.wo" ||
  fail "verify of a corrupt shard: rc $rc: $err"
run mpi -np 1 "$bin" train "${base[@]}" --set logging.name=split111 --set train.steps=25 \
  --set parallel.pp=1 --set parallel.ep=1 --resume auto
[ "$rc" -ne 0 ] && grep <<<"$err" -q "checksum mismatch in dataset /model/layers.0.attn.wo" ||
  fail "--resume from a corrupt shard: rc $rc: $err"

# A checkpoint of another model shape (the failed resume leaves the run's config.yaml as it was), and a `latest`
# pointing nowhere.
cp "$dir/split111/config.yaml" "$dir/config-before.yaml"
run mpi -np 1 "$bin" train "${base[@]}" --set logging.name=split111 --set parallel.pp=1 --set parallel.ep=1 \
  --set model.hidden_size=32 --set train.steps=25 --resume "$ck/step_0000010"
[ "$rc" -ne 0 ] && grep <<<"$err" -q "has shape \[256,64\] in the checkpoint but \[256,32\] in this model" ||
  fail "another model shape: $err"
cmp -s "$dir/config-before.yaml" "$dir/split111/config.yaml" || fail "a failed resume rewrote config.yaml"
echo step_0000099 > "$ck/latest"
run "$bin" ckpt verify "$ck"
[ "$rc" -ne 0 ] && grep <<<"$err" -q "latest. names 'step_0000099', which is not a committed checkpoint" ||
  fail "dangling latest: $err"
finish
