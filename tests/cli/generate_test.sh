#!/usr/bin/env bash
# generate_test.sh MOETRAIN PYTHON: a tiny model trained on a synthetic Markov shard continues a prompt, greedily,
# with transitions of that corpus (PYTHON reads the shard: tests/cli/bigrams.py); speculative decoding by the MTP
# module gives the same tokens and reports its acceptance rate; sampling is reproducible from its seed; bad prompts
# and options are refused by name.
. "$(dirname "$0")/lib.sh"
bin=$1
python=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

run "$bin" data synth --out "$tmp/s" --tokens 200000
[ "$rc" -eq 0 ] || fail "data synth: $err"
run "$bin" train --config configs/tiny.yaml --set parallel.pp=1 --set parallel.dp=1 --set parallel.ep=1 \
  --set data.source=shards --set data.path="$tmp/s" --set train.steps=300 --set train.decay_steps=280 \
  --set train.eval_interval=0 --set checkpoint.interval=300 --set checkpoint.dir="$tmp/ckpt" \
  --set logging.dir="$tmp/runs"
[ "$rc" -eq 0 ] || fail "train: $err"

run "$bin" generate "$tmp/ckpt" --prompt-ids 5,17 --max-new-tokens 40
[ "$rc" -eq 0 ] || fail "generate: $err"
echo "$out"
greedy=$(printf '%s\n' "$out" | sed -n 's/^generated: //p')
[ "$(echo $greedy | wc -w)" -eq 40 ] || fail "expected 40 tokens: $out"
run "$python" tests/cli/bigrams.py "$tmp/s.00000.bin" "5 17 $greedy" --min-seen 0.9 --min-best 0.4
echo "$out"
[ "$rc" -eq 0 ] || fail "greedy decoding does not follow the corpus: $out $err"

run "$bin" generate "$tmp/ckpt" --prompt-ids 5,17 --max-new-tokens 40 --mtp
[ "$rc" -eq 0 ] || fail "generate --mtp: $err"
echo "$out"
[ "$(printf '%s\n' "$out" | sed -n 's/^generated: //p')" = "$greedy" ] || fail "--mtp decodes other tokens: $out"
rate=$(printf '%s\n' "$out" | sed -n 's/^MTP drafts accepted: .*(\([0-9.]*\)%)$/\1/p')
awk -v r="$rate" 'BEGIN { exit !(r > 50) }' || fail "MTP acceptance rate '$rate' (expected over 50%): $out"
run "$bin" generate "$tmp/ckpt" --prompt-ids 5 --mtp --temperature 1
[ "$rc" -ne 0 ] && printf '%s' "$err" | grep -q "greedy" || fail "--mtp with sampling: $rc $err"

sample() { "$bin" generate "$tmp/ckpt" --prompt-ids 5,17 --max-new-tokens 20 --temperature 1 --top-p 0.9 "$@"; }
a=$(sample --seed 7 | grep '^generated:')
b=$(sample --seed 7 | grep '^generated:')
[ -n "$a" ] && [ "$a" = "$b" ] || fail "sampling with one seed differs: '$a' vs '$b'"

run "$bin" generate "$tmp/ckpt" --prompt-ids 5,999
[ "$rc" -ne 0 ] && printf '%s' "$err" | grep -q "prompt token 999 is outside the model's vocabulary" ||
  fail "an out-of-vocabulary prompt: $rc $err"
run "$bin" generate "$tmp/ckpt" --prompt "hello"
[ "$rc" -ne 0 ] && printf '%s' "$err" | grep -q "needs --tokenizer" || fail "--prompt without a tokenizer: $rc $err"
run "$bin" generate "$tmp/ckpt" --prompt-ids 5 --temperature 1 --top-p 0
[ "$rc" -ne 0 ] && printf '%s' "$err" | grep -q "top-p" || fail "--top-p 0: $rc $err"
finish
