#!/usr/bin/env bash
# data_train_test.sh MOETRAIN: a real text (tests/data/text/licenses.txt, 80 kB of English) through the whole data
# path — tokenizer-train, build, train the tiny model on the shards — and the validation loss must fall.
. "$(dirname "$0")/lib.sh"
bin=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
text=tests/data/text/licenses.txt

run "$bin" data tokenizer-train --input "$text" --vocab-size 512 --out "$tmp/tok.model"
[ "$rc" -eq 0 ] || fail "tokenizer-train: $err"
run "$bin" data build --tokenizer "$tmp/tok.model" --input "$text" --out "$tmp/shards/licenses"
[ "$rc" -eq 0 ] || fail "build: $err"

train() {
  "$bin" train --config configs/tiny.yaml --set parallel.pp=1 --set parallel.dp=1 --set parallel.ep=1 \
    --set model.vocab_size=512 --set data.source=shards --set data.path="$tmp/shards/licenses" \
    --set data.tokenizer="$tmp/tok.model" --set data.valid_fraction=0.05 \
    --set train.steps=40 --set train.warmup_steps=5 --set train.decay_steps=35 --set train.eval_interval=10 \
    --set logging.dir="$tmp/runs" --set logging.name=licenses "$@"
}
run train
[ "$rc" -eq 0 ] || fail "train: $err"
metrics="$tmp/runs/licenses/metrics.jsonl"
[ -f "$metrics" ] || fail "no $metrics"
losses=$(grep -o '"val_loss":[0-9.eE+-]*' "$metrics" | cut -d: -f2)
[ "$(printf '%s\n' "$losses" | wc -l)" -eq 4 ] || fail "expected 4 validation losses (steps 10..40): $losses"
first=$(printf '%s\n' "$losses" | head -n 1)
last=$(printf '%s\n' "$losses" | tail -n 1)
echo "validation loss: step 10 $first -> step 40 $last (uniform over 512 ids: 6.238)"
awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a - 0.2 && a < 6.238) }' ||
  fail "the validation loss did not fall: $first -> $last"

# The run directory already holds metrics: refused without --overwrite, replaced with it.
run train
[ "$rc" -ne 0 ] && grep <<<"$err" -q "pass --overwrite" || fail "second run without --overwrite: $rc $err"
run train --set train.steps=10 --set train.decay_steps=5 --overwrite
[ "$rc" -eq 0 ] || fail "train --overwrite: $err"
[ "$(grep -c '"val_loss"' "$metrics")" -eq 1 ] || fail "--overwrite kept the earlier run's metrics"
finish
