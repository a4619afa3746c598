#!/usr/bin/env bash
# generate_test.sh MOETRAIN PYTHON: the demo's model (configs/tiny.yaml on its built-in order-2 Markov corpus: the
# next token depends on the two before it), trained in one process, ends within 0.1 nats of the corpus's entropy
# rate; it continues a prompt, greedily, with the corpus's most likely transitions
# given the last two tokens (PYTHON counts them in the same source written as shards: tests/cli/transitions.py);
# speculative decoding by the MTP module gives the same tokens and reports its acceptance rate; sampling is
# reproducible from its seed; bad prompts and options are refused by name.
. "$(dirname "$0")/lib.sh"
bin=$1
python=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The built-in source of tiny.yaml (16 letters, branching 3, seed 0, order 2) as shards: 16 letters + end token.
run "$bin" data synth --out "$tmp/s" --tokens 1000000 --vocab-size 17 --branching 3 --order 2
[ "$rc" -eq 0 ] || fail "data synth: $err"
run tiny1 "$bin" --set train.eval_interval=1200 --set checkpoint.interval=1200 --set checkpoint.dir="$tmp/ckpt" \
  --set logging.dir="$tmp/runs"
[ "$rc" -eq 0 ] || fail "train: $err"

# The model learned the corpus: its first loss is far above the entropy rate, and its validation loss ends within
# 0.1 nats of it and not below it (up to the sampling noise of 4 validation batches). Trainer.WithoutAttention…
# trains the same model with its attention held at zero: it stays more than 0.3 nats above, so the corpus needs it.
entropy=$(printf '%s\n' "$out" | sed -n 's/.*corpus entropy rate \([0-9.]*\) nats\/token.*/\1/p')
gap=$(printf '%s\n' "$out" | sed -n 's/^summary: .* at step 1200 (gap \(-*[0-9.]*\) to the entropy rate).*/\1/p')
first=$(grep -m1 '"lm_loss"' "$tmp/runs/tiny/metrics.jsonl" | sed 's/.*"loss":\([^,]*\),.*/\1/')
echo "entropy rate $entropy, first loss $first, validation gap after 1200 steps $gap"
[ -n "$entropy" ] && [ -n "$gap" ] && [ -n "$first" ] &&
  awk -v e="$entropy" -v g="$gap" -v f="$first" 'BEGIN { exit !(e > 0 && f > e + 3 && g < 0.1 && g >= -0.02) }' ||
  fail "the demo's model did not learn its corpus (entropy rate '$entropy', first loss '$first', gap '$gap'): $out"

# Greedy decoding from 8 prompts (greedy continuations fall into cycles: several prompts see more of the table).
all=""
for prompt in 5,7 0,1 2,3 4,6 8,9 10,11 12,13 14,15; do
  run "$bin" generate "$tmp/ckpt" --prompt-ids $prompt --max-new-tokens 24
  [ "$rc" -eq 0 ] || fail "generate: $err"
  echo "$out"
  tokens=$(printf '%s\n' "$out" | sed -n 's/^generated: //p')
  [ "$(echo $tokens | wc -w)" -eq 24 ] || fail "expected 24 tokens: $out"
  all="$all${all:+;}${prompt/,/ } $tokens"
  [ "$prompt" = 5,7 ] && greedy=$tokens
done
run "$python" tests/cli/transitions.py "$tmp/s.00000.bin" "$all" --order 2 --min-seen 0.95 --min-best 0.7 --min-ratio 0.85
echo "$out"
[ "$rc" -eq 0 ] || fail "greedy decoding does not follow the corpus's most likely transitions: $out $err"
run "$python" tests/cli/transitions.py "$tmp/s.00000.bin" "$all" --order 1
echo "the same tokens judged by the current token alone: $out"

run "$bin" generate "$tmp/ckpt" --prompt-ids 5,7 --max-new-tokens 24 --mtp
[ "$rc" -eq 0 ] || fail "generate --mtp: $err"
echo "$out"
[ "$(printf '%s\n' "$out" | sed -n 's/^generated: //p')" = "$greedy" ] || fail "--mtp decodes other tokens: $out"
rate=$(printf '%s\n' "$out" | sed -n 's/^MTP drafts accepted: .*(\([0-9.]*\)%)$/\1/p')
awk -v r="$rate" 'BEGIN { exit !(r > 50) }' || fail "MTP acceptance rate '$rate' (expected over 50%): $out"
run "$bin" generate "$tmp/ckpt" --prompt-ids 5 --mtp --temperature 1
[ "$rc" -ne 0 ] && grep <<<"$err" -q "greedy" || fail "--mtp with sampling: $rc $err"

sample() { "$bin" generate "$tmp/ckpt" --prompt-ids 5,7 --max-new-tokens 20 --temperature 1 --top-p 0.9 "$@"; }
a=$(sample --seed 7 | grep '^generated:')
b=$(sample --seed 7 | grep '^generated:')
[ -n "$a" ] && [ "$a" = "$b" ] || fail "sampling with one seed differs: '$a' vs '$b'"

run "$bin" generate "$tmp/ckpt" --prompt-ids 5,999
[ "$rc" -ne 0 ] && grep <<<"$err" -q "prompt token 999 is outside the model's vocabulary" ||
  fail "an out-of-vocabulary prompt: $rc $err"
run "$bin" generate "$tmp/ckpt" --prompt "hello"
[ "$rc" -ne 0 ] && grep <<<"$err" -q "needs --tokenizer" || fail "--prompt without a tokenizer: $rc $err"
run "$bin" generate "$tmp/ckpt" --prompt-ids 5 --temperature 1 --top-p 0
[ "$rc" -ne 0 ] && grep <<<"$err" -q "top-p" || fail "--top-p 0: $rc $err"
finish
