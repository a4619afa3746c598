#!/usr/bin/env bash
# equivalence_test.sh PROGRAM: the same global batch trained on every layout (pp, dp, ep) gives the losses of
# each of 10 steps, the validation loss and the final parameters of the single-process run within 1e-5 relative
# (FP32), with ZeRO-1 (parallel.distributed_optimizer, the default) and, on one layout, without it; each rank's
# optimizer state is 1/dp (dense) and 1/edp (routed) of the whole with it (checked by the program, ±5%). So do two
# layouts with activation recomputation (full, selective), and bf16 with ZeRO-1 (master weights 1/dp, 1/edp).
# Gradient buckets are small (many per stage), so that parallel.overlap_grad_reduce (on by default) starts most of
# them during the backward pass (checked), and ZeRO-1's parameter all-gather (parallel.overlap_param_gather, on by
# default) is waited for bucket by bucket inside the next forward pass (checked); one layout runs without each
# overlap. Then a starved expert: no hang, zero
# gradient. The interleaved schedule on five layouts and DualPipeV on three (pp 2 and 4; its chunk pairs overlapped,
# and on one layout one after the other) against one process.
. "$(dirname "$0")/../cli/lib.sh"
prog=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
common=(--config configs/tiny.yaml --set train.micro_batch_size=2 --set train.global_batch_size=16
        --set train.eval_batches=1 --set train.peak_flops=1e9 --set parallel.dp=0 --set parallel.bucket_size_mb=0.02)
run_layout() {  # pp dp ep [recompute] [distributed_optimizer] [overlap_grad_reduce] [overlap_param_gather]
  local pp=$1 dp=$2 ep=$3 np=$(($1 * $2)) recompute=${4:-none} zero=${5:-true} overlap=${6:-true} gather=${7:-true}
  run mpi -np "$np" "$prog" "${common[@]}" --steps 10 --set parallel.pp="$pp" --set parallel.ep="$ep" \
      --set model.recompute="$recompute" --set parallel.distributed_optimizer="$zero" \
      --set parallel.overlap_grad_reduce="$overlap" --set parallel.overlap_param_gather="$gather" \
      --out "$dir/$pp-$dp-$ep${4:+-$4}${5:+-$5}${6:+-$6}${7:+-$7}"
  [ "$rc" -eq 0 ] || fail "layout pp $pp dp $dp ep $ep recompute $recompute distributed_optimizer $zero overlap \
$overlap overlap_param_gather $gather: rc $rc: $err"
}
run_layout 1 1 1
for layout in "1 2 1" "1 2 2" "2 1 1" "2 2 2" "1 4 4" "2 4 2"; do
  set -- $layout
  run_layout "$1" "$2" "$3"
  run "$prog" --compare "$dir/1-1-1" "$dir/$1-$2-$3"
  echo "$out"
  [ "$rc" -eq 0 ] || fail "layout pp $1 dp $2 ep $3 differs from one process: $out"
done

cat "$dir"/2-4-2/optim.*.txt  # ZeRO-1's share of the optimizer state, per rank
# ZeRO-1 off: gradients all-reduced, every replica updates everything.
run_layout 2 4 2 none false
run "$prog" --compare "$dir/1-1-1" "$dir/2-4-2-none-false"
echo "$out"
[ "$rc" -eq 0 ] || fail "layout pp 2 dp 4 ep 2 without ZeRO-1 differs from one process: $out"
grep -q "= 1.0000" "$dir/2-4-2-none-false/optim.0.txt" || fail "without ZeRO-1 a rank holds all of its moments"

# The overlap: most buckets started inside the backward pass (with and without ZeRO-1); without it, none did and
# the numbers are the same.
for d in 2-2-2 2-4-2-none-false; do
  grep -q "started during the backward pass: [1-9]" "$dir/$d/optim.0.txt" ||
    fail "$d: no gradient bucket was reduced during the backward pass: $(head -1 "$dir/$d/optim.0.txt")"
done
run_layout 2 2 2 none true false
run "$prog" --compare "$dir/1-1-1" "$dir/2-2-2-none-true-false"
echo "$out"
[ "$rc" -eq 0 ] || fail "layout pp 2 dp 2 ep 2 without overlap differs from one process: $out"
grep -q "started during the backward pass: 0" "$dir/2-2-2-none-true-false/optim.0.txt" ||
  fail "without overlap a bucket started during the backward pass"

# The parameter all-gather's overlap: the forward passes waited for buckets one by one (ZeRO-1 layouts); without
# it, none, and the numbers are the same.
for d in 1-2-1 2-2-2 2-4-2; do
  grep -q "gathered during a forward pass: [1-9]" "$dir/$d/optim.0.txt" ||
    fail "$d: no parameter bucket was gathered during a forward pass: $(head -1 "$dir/$d/optim.0.txt")"
done
run_layout 1 2 2 none true true false
run "$prog" --compare "$dir/1-1-1" "$dir/1-2-2-none-true-true-false"
echo "$out"
[ "$rc" -eq 0 ] || fail "layout pp 1 dp 2 ep 2 without overlap_param_gather differs from one process: $out"
grep -q "gathered during a forward pass: 0" "$dir/1-2-2-none-true-true-false/optim.0.txt" ||
  fail "without overlap_param_gather a forward pass waited for a parameter bucket"

# bf16: BF16 parameters all-gathered in BF16 after each step, FP32 master weights (and moments) 1/dp of the dense
# and 1/edp of the routed parameters per rank, each parameter its master weights rounded (checked by the program).
run mpi -np 8 "$prog" "${common[@]}" --steps 3 --set parallel.pp=2 --set parallel.ep=2 --set precision.mode=bf16 \
    --out "$dir/2-4-2-bf16"
[ "$rc" -eq 0 ] || fail "bf16 with ZeRO-1 on pp 2 dp 4 ep 2: rc $rc: $err"
cat "$dir"/2-4-2-bf16/optim.0.txt
grep -q "dense master weights: .* = 0.2500" "$dir/2-4-2-bf16/optim.0.txt" || fail "bf16: master weights not 1/dp"

# Activation recomputation on parallel layouts (the expert all-to-alls and the stage's blocks run again in the
# backward pass): the numbers of one process without it.
for layout in "2 2 2 full" "1 2 2 selective"; do
  set -- $layout
  run_layout "$1" "$2" "$3" "$4"
  run "$prog" --compare "$dir/1-1-1" "$dir/$1-$2-$3-$4"
  echo "$out"
  [ "$rc" -eq 0 ] || fail "layout pp $1 dp $2 ep $3 with recompute $4 differs from one process: $out"
done

# Interleaved 1F1B (parallel.schedule = interleaved: v model chunks per rank, virtual stage c·pp + rank) and
# DualPipeV (two chunks in a V, the backward split into input- and weight-gradient passes). 8 layers, so that pp 4 ×
# 2 chunks and pp 2 × 4 chunks have a layer per virtual stage; the reference is one process on them.
eight=(--set model.num_layers=8 --steps 10)
run mpi -np 1 "$prog" "${common[@]}" "${eight[@]}" --set parallel.pp=1 --set parallel.ep=1 --out "$dir/eight"
[ "$rc" -eq 0 ] || fail "8 layers in one process: rc $rc: $err"
for layout in "interleaved 2 1 1 2" "interleaved 2 2 2 2" "interleaved 4 1 1 2" "interleaved 4 2 2 2" \
              "interleaved 2 1 1 4" "dualpipev 2 1 1 2" "dualpipev 2 2 2 2" "dualpipev 4 1 1 2" \
              "dualpipev 2 2 2 2 sequential"; do
  set -- $layout
  # DualPipeV runs its forward/backward chunk pairs at once (two threads, the backward's all-to-alls on the ep
  # group's second communicator) unless "sequential" (parallel.overlap_chunk_pairs = false).
  run mpi -np $(($2 * $3)) "$prog" "${common[@]}" "${eight[@]}" --set parallel.pp="$2" --set parallel.ep="$4" \
      --set parallel.schedule="$1" --set parallel.virtual_stages="$5" \
      --set parallel.overlap_chunk_pairs="$([ "${6:-}" = sequential ] && echo false || echo true)" \
      --out "$dir/$1-$2-$3-$4-$5${6:-}"
  [ "$rc" -eq 0 ] || fail "$1 pp $2 dp $3 ep $4, $5 chunks per rank: rc $rc: $err"
  run "$prog" --compare "$dir/eight" "$dir/$1-$2-$3-$4-$5${6:-}"
  echo "$1 pp $2 dp $3 ep $4 × $5 chunks ${6:-}: $out"
  [ "$rc" -eq 0 ] || fail "$1 pp $2 dp $3 ep $4 with $5 chunks per rank differs from one process: $out"
done

# An expert the router never picks: every rank still takes part in every exchange, its gradient stays zero.
run mpi -np 4 "$prog" "${common[@]}" --set parallel.pp=2 --set parallel.ep=2 --set model.balance_mode=none \
    --steps 2 --starve-expert 1 --out "$dir/starved"
[ "$rc" -eq 0 ] || fail "starved expert: rc $rc: $err"
# Every expert of ep rank 1 starved (groups 2 and 3 are never kept): that rank receives no routed token at all.
run timeout 120 bash -c "$(declare -f mpi); mpi -np 4 '$prog' ${common[*]} --set parallel.pp=2 --set parallel.ep=2 \
    --set model.balance_mode=none --steps 2 --starve-expert 4 --starve-expert 5 --starve-expert 6 --starve-expert 7 \
    --out '$dir/starved-rank'"
[ "$rc" -eq 0 ] || fail "a rank without routed tokens: rc $rc (124: hang): $err"
finish
