#!/usr/bin/env bash
# data_test.sh MOETRAIN: the `moetrain data` commands end to end (tokenizer-train, build, inspect, synth) and every
# bad input they and `moetrain train` meet: one stderr line "moetrain: error: ..." naming the file, non-zero exit.
. "$(dirname "$0")/lib.sh"
bin=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
text=tests/data/text/licenses.txt
multi=tests/data/text/multilingual.txt

for cmd in "data" "data tokenizer-train" "data build" "data inspect" "data synth"; do
  run "$bin" $cmd --help
  [ "$rc" -eq 0 ] || fail "moetrain $cmd --help exited $rc: $err"
  grep <<<"$out" -q "Usage" || fail "moetrain $cmd --help printed no usage: $out"
done

# The good path: a tokenizer, shards, their inspection.
run "$bin" data tokenizer-train --input "$text" --vocab-size 400 --out "$tmp/tok.model"
[ "$rc" -eq 0 ] || fail "tokenizer-train: $err"
grep <<<"$out" -Eq "^$tmp/tok.model: bpe tokenizer, 400 pieces .* byte fallback; trained on [0-9]+ lines" ||
  fail "tokenizer-train report: $out"
run "$bin" data build --tokenizer "$tmp/tok.model" --input "$text" "$multi" --out "$tmp/shards/lic"
[ "$rc" -eq 0 ] || fail "build: $err"
[ -z "$err" ] || fail "build printed to stderr (no terminal, small input: no progress bar): $err"
grep <<<"$out" -Eq "^$tmp/shards/lic: [0-9]+ documents, [0-9]+ tokens in 1 shard \(uint16, vocabulary 400\) from 2 files" ||
  fail "build report: $out"
[ -f "$tmp/shards/lic.00000.bin" ] && [ -f "$tmp/shards/lic.00000.idx" ] || fail "build wrote no shard files"
cmp -s "$tmp/tok.model" "$tmp/shards/lic.tokenizer.model" || fail "build left no copy of its tokenizer"
run "$bin" data inspect "$tmp/shards/lic" --tokenizer "$tmp/tok.model"
[ "$rc" -eq 0 ] || fail "inspect: $err"
for want in "^$tmp/shards/lic: [0-9]+ documents, [0-9]+ tokens in 1 shard$" "uint16 \(2 bytes\), vocabulary 400, end-of-document id 2" \
            "verified +checksums match" "GNU GENERAL PUBLIC LICENSE" "</s>$"; do
  grep <<<"$out" -Eq "$want" || fail "inspect lacks /$want/: $out"
done
# Several shards.
run "$bin" data build --tokenizer "$tmp/tok.model" --input "$text" --out "$tmp/small" --shard-tokens 5000 --docs line
[ "$rc" -eq 0 ] && grep <<<"$out" -Eq "tokens in [0-9]+ shards" || fail "sharded build: $out $err"
# Without --tokenizer, inspect decodes with the copy the build left next to the shards.
run "$bin" data inspect "$tmp/small" --doc 3 --tokens 8
[ "$rc" -eq 0 ] && grep <<<"$out" -q "document 3 (first 8 tokens, decoded by $tmp/small.tokenizer.model)" ||
  fail "inspect with the tokenizer copy: $out $err"
expect_doc="$tmp/small: --doc 9999999: the corpus has [0-9]+ documents"
run "$bin" data inspect "$tmp/small" --doc 9999999
[ "$rc" -ne 0 ] && grep <<<"$err" -Eq "$expect_doc" || fail "inspect --doc out of range: $err"

# The synthetic corpus as shards, with its entropy.
run "$bin" data synth --out "$tmp/synth" --tokens 20000 --vocab-size 128 --branching 4 --doc-tokens 99
[ "$rc" -eq 0 ] || fail "synth: $err"
grep <<<"$out" -Eq "^$tmp/synth: 200 documents of 99 Markov tokens \+ end token 127 = 20000 tokens" ||
  fail "synth report: $out"
grep <<<"$out" -Eq "entropy rate H = Σ_i π_i·H\(P_i\) = [0-9]\.[0-9]{6} nats/token" || fail "synth entropy: $out"
run "$bin" data inspect "$tmp/synth"
[ "$rc" -eq 0 ] && grep <<<"$out" -q "tokenizer      none (synthetic corpus)" || fail "inspect synth: $out $err"
grep <<<"$out" -q "(token ids: no tokenizer; pass --tokenizer to decode them)" || fail "inspect synth ids: $out"

# --vocab-size V writes shards a model.vocab_size = V trains on: vocabulary V, text ids < V−1 (V−1 Markov states),
# the end token V−1; the help says so. The ids are read from the .bin file itself (uint16), not through the reader.
run "$bin" data synth --help
grep -q "V−1 Markov states" <<<"$(tr -s ' \n' ' ' <<<"$out")" || fail "synth --help: $out"
run "$bin" data synth --out "$tmp/v64" --tokens 10000 --vocab-size 64 --doc-tokens 99
[ "$rc" -eq 0 ] && grep <<<"$out" -q "(vocabulary 64 = 63 Markov states + the end token," ||
  fail "synth --vocab-size 64: $out $err"
run "$bin" data inspect "$tmp/v64"
[ "$rc" -eq 0 ] && grep <<<"$out" -q "vocabulary 64, end-of-document id 63" || fail "inspect v64: $out $err"
ids=$(od -An -v -tu2 "$tmp/v64.00000.bin" | tr -s ' ' '\n' | grep -v '^$')
[ "$(printf '%s\n' "$ids" | wc -l)" -eq 10000 ] || fail "v64: expected 10000 ids"
[ "$(printf '%s\n' "$ids" | sort -n | tail -n 1)" -eq 63 ] || fail "v64: an id >= 64 or no end token 63"
[ "$(printf '%s\n' "$ids" | grep -cx 63)" -eq 100 ] || fail "v64: id 63 is not exactly the 100 end tokens"
run "$bin" train --config configs/tiny.yaml --set parallel.pp=1 --set parallel.dp=1 --set parallel.ep=1 \
  --set model.vocab_size=64 --set data.source=shards --set data.path="$tmp/v64" --set data.valid_fraction=0.05 \
  --set train.steps=1 --set train.warmup_steps=0 --set train.decay_steps=1 --set train.eval_interval=0 \
  --set logging.dir="$tmp/runs" --set logging.name=v64
[ "$rc" -eq 0 ] || fail "one step of a vocab-64 model on the v64 shards: $err"

# expect_error DESCRIPTION PATTERN CMD...: non-zero, nothing on stdout, one stderr line "moetrain: error: " + PATTERN.
expect_error() {
  local what=$1 want=$2
  shift 2
  run "$@"
  [ "$rc" -ne 0 ] || fail "$what: exited 0"
  [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] || fail "$what: expected one stderr line, got: $err"
  case "$err" in "moetrain: error: "*) ;; *) fail "$what: $err" ;; esac
  grep <<<"$err" -Eq -- "$want" || fail "$what: '$err' does not match /$want/"
}

: >"$tmp/empty.txt"
printf 'caf\xe9 cr\xe8me\n' >"$tmp/latin1.txt"
expect_error "missing input" "$tmp/nope.txt: no such file or directory" \
  "$bin" data tokenizer-train --input "$tmp/nope.txt" --vocab-size 400 --out "$tmp/x.model"
expect_error "empty input (train)" "$tmp/empty.txt: the input is empty" \
  "$bin" data tokenizer-train --input "$tmp/empty.txt" --vocab-size 400 --out "$tmp/x.model"
expect_error "empty input (build)" "$tmp/empty.txt: the input is empty" \
  "$bin" data build --tokenizer "$tmp/tok.model" --input "$tmp/empty.txt" --out "$tmp/e"
expect_error "invalid UTF-8" "$tmp/latin1.txt:1: invalid UTF-8 \(byte 0xE9 at byte offset 3 of the file\)" \
  "$bin" data build --tokenizer "$tmp/tok.model" --input "$tmp/latin1.txt" --out "$tmp/e"
expect_error "missing tokenizer" "$tmp/none.model: tokenizer model not found" \
  "$bin" data build --tokenizer "$tmp/none.model" --input "$text" --out "$tmp/e"
[ ! -e "$tmp/e.00000.bin" ] && [ ! -e "$tmp/e.00000.bin.tmp" ] || fail "a failed build left files behind"

run "$bin" data tokenizer-train --input "$text" --vocab-size 350 --out "$tmp/other.model"
expect_error "another tokenizer" "$tmp/other.model: tokenizer checksum [0-9a-f]{16} does not match the shards' [0-9a-f]{16} \($tmp/shards/lic.00000.idx\)" \
  "$bin" data inspect "$tmp/shards/lic" --tokenizer "$tmp/other.model"

cp "$tmp/other.model" "$tmp/shards/lic.tokenizer.model"
expect_error "another tokenizer next to the shards" "$tmp/shards/lic.tokenizer.model: tokenizer checksum [0-9a-f]{16} does not match" \
  "$bin" data inspect "$tmp/shards/lic"
cp "$tmp/tok.model" "$tmp/shards/lic.tokenizer.model"

cp "$tmp/shards/lic.00000.bin" "$tmp/lic.bin.good"
printf '\xff\xff' | dd of="$tmp/shards/lic.00000.bin" bs=1 seek=0 conv=notrunc status=none
expect_error "corrupt tokens (verify)" "$tmp/shards/lic.00000.bin: corrupt token data \(checksum mismatch" \
  "$bin" data inspect "$tmp/shards/lic"
expect_error "token id ≥ vocabulary" "$tmp/shards/lic.00000.bin: token id 65535 at position 0 is not below the vocabulary size 400" \
  "$bin" data inspect "$tmp/shards/lic" --no-verify
cp "$tmp/lic.bin.good" "$tmp/shards/lic.00000.bin"
truncate -s -2 "$tmp/shards/lic.00000.bin"
expect_error "truncated shard" "$tmp/shards/lic.00000.bin: truncated \([0-9]+ bytes; $tmp/shards/lic.00000.idx says [0-9]+ tokens × 2 bytes" \
  "$bin" data inspect "$tmp/shards/lic"
cp "$tmp/lic.bin.good" "$tmp/shards/lic.00000.bin"
cp "$tmp/shards/lic.00000.idx" "$tmp/lic.idx.good"
printf '\x01' | dd of="$tmp/shards/lic.00000.idx" bs=1 seek=136 conv=notrunc status=none
expect_error "corrupt index" "$tmp/shards/lic.00000.idx: corrupt document index \(offsets checksum mismatch\)" \
  "$bin" data inspect "$tmp/shards/lic"
truncate -s 100 "$tmp/shards/lic.00000.idx"
expect_error "truncated index" "$tmp/shards/lic.00000.idx: truncated \(100 bytes; the header alone is 128\)" \
  "$bin" data inspect "$tmp/shards/lic"
cp "$tmp/lic.idx.good" "$tmp/shards/lic.00000.idx"

# Training on shards that do not fit the config.
train() {
  "$bin" train --config configs/tiny.yaml --set parallel.pp=1 --set parallel.dp=1 --set parallel.ep=1 \
    --set data.source=shards --set logging.dir="$tmp/runs" --overwrite "$@"
}
expect_error "seq_len larger than the data" "$tmp/synth.00000.idx: the [0-9]+ training documents hold [0-9]+ tokens, fewer than one window of 20002 tokens .* train.seq_len is larger than the data" \
  train --set model.vocab_size=128 --set data.path="$tmp/synth" --set train.seq_len=20000
expect_error "vocabulary larger than the model's" "$tmp/shards/lic.00000.idx: the shards use a vocabulary of 400 ids, more than model.vocab_size = 256 \(set at configs/tiny.yaml:6\)" \
  train --set data.path="$tmp/shards/lic"
expect_error "tokenizer of other shards" "$tmp/other.model: tokenizer checksum [0-9a-f]{16} does not match" \
  train --set model.vocab_size=400 --set data.path="$tmp/shards/lic" --set data.tokenizer="$tmp/other.model"
expect_error "missing shards" "$tmp/nothing.00000.idx: no token shards at prefix $tmp/nothing" \
  train --set data.path="$tmp/nothing"
expect_error "bad blend weight" "--set data.path=.*: data.path entry '$tmp/synth=heavy': the weight 'heavy' is not a positive number" \
  train --set model.vocab_size=128 --set data.path="$tmp/synth=heavy"
finish
