#include "data/cli.h"

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <limits>

#include "data/builder.h"
#include "data/progress.h"
#include "data/shards.h"
#include "data/tokenizer.h"

namespace moetrain::data {

struct DataOptions {
  TokenizerTrainOptions tokenizer;
  BuildOptions build;
  std::string build_docs = "blank";
  bool build_quiet = false;
  std::string inspect_prefix, inspect_tokenizer;
  uint64_t inspect_document = 0;
  int64_t inspect_tokens = 64;
  bool inspect_no_verify = false;
  SynthOptions synth;
  bool synth_quiet = false;
};

namespace {

void print(const std::string& text) {
  std::fputs(text.c_str(), stdout);
  std::fflush(stdout);
}

// Control characters shown visibly, so a sample prints as one readable block.
std::string visible(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '\n') out += "\\n\n    ";
    else if (c == '\t') out += "\\t";
    else if (c == '\r') out += "\\r";
    else out += c;
  }
  return out;
}

void run_tokenizer_train(const DataOptions& o) {
  const TokenizerTrainSummary s = train_tokenizer(o.tokenizer);
  print(fmt::format("{}: {} tokenizer, {} pieces (<unk> <s> </s>, 256 bytes, {} characters and learned pieces), byte "
                    "fallback; trained on "
                    "{} lines ({}) of {} file{}; checksum {:016x}\n",
                    o.tokenizer.out, o.tokenizer.model_type, s.vocab_size, s.vocab_size - 259, s.lines,
                    human_bytes(static_cast<double>(s.bytes)), s.files, s.files == 1 ? "" : "s", s.checksum));
}

void run_build(DataOptions& o) {
  o.build.split = parse_document_split(o.build_docs);
  o.build.progress = !o.build_quiet;
  const BuildSummary s = build_shards(o.build);
  print(fmt::format("{}: {} documents, {} tokens in {} shard{} ({}, vocabulary {}) from {} file{} ({}) in {:.1f} s "
                    "({} tokens/s); tokenizer {} (checksum {:016x})\n",
                    o.build.out, s.documents, s.tokens, s.shards, s.shards == 1 ? "" : "s",
                    s.token_bytes == 2 ? "uint16" : "uint32", s.vocab_size, s.files, s.files == 1 ? "" : "s",
                    human_bytes(static_cast<double>(s.bytes)), s.seconds,
                    human_count(s.seconds > 0 ? static_cast<double>(s.tokens) / s.seconds : 0.0), o.build.tokenizer,
                    s.tokenizer_checksum));
}

void run_inspect(const DataOptions& o) {
  const ShardSet set(o.inspect_prefix);
  std::string out;
  out += fmt::format("{}: {} documents, {} tokens in {} shard{}\n", o.inspect_prefix, set.documents(), set.tokens(),
                     set.shards().size(), set.shards().size() == 1 ? "" : "s");
  out += fmt::format("  token ids      {} ({} bytes), vocabulary {}, end-of-document id {}\n",
                     set.token_bytes() == 2 ? "uint16" : "uint32", set.token_bytes(), set.vocab_size(), set.eos_id());
  out += fmt::format("  tokenizer      {}\n", set.tokenizer_checksum() == 0
                                                 ? std::string("none (synthetic corpus)")
                                                 : fmt::format("checksum {:016x}", set.tokenizer_checksum()));
  uint64_t shortest = std::numeric_limits<uint64_t>::max(), longest = 0;
  for (const auto& s : set.shards())
    for (uint64_t d = 0; d < s.header.documents; ++d) {
      const uint64_t n = s.offsets[d + 1] - s.offsets[d];
      shortest = std::min(shortest, n);
      longest = std::max(longest, n);
    }
  out += fmt::format("  document size  min {}, mean {:.1f}, max {} tokens (end token included)\n", shortest,
                     static_cast<double>(set.tokens()) / static_cast<double>(set.documents()), longest);
  for (const auto& s : set.shards())
    out += fmt::format("  {}  {} documents, {} tokens, data checksum {:016x}\n", s.bin->path(), s.header.documents,
                       s.header.tokens, s.header.data_checksum);
  print(out);
  if (!o.inspect_no_verify) {
    set.verify();
    print("  verified       checksums match, every id < vocabulary, every document ends with the end token\n");
  }

  // The tokenizer given, else the copy the builder left next to the shards.
  std::string tokenizer_path = o.inspect_tokenizer;
  if (tokenizer_path.empty() && std::filesystem::exists(tokenizer_copy_path(o.inspect_prefix)))
    tokenizer_path = tokenizer_copy_path(o.inspect_prefix);
  if (o.inspect_document >= set.documents())
    throw std::runtime_error(fmt::format("{}: --doc {}: the corpus has {} documents", o.inspect_prefix,
                                         o.inspect_document, set.documents()));
  std::vector<int64_t> doc = set.document(o.inspect_document);
  const bool cut = static_cast<int64_t>(doc.size()) > o.inspect_tokens;
  if (cut) doc.resize(static_cast<size_t>(o.inspect_tokens));
  std::string sample = fmt::format("  document {} ({}{} tokens{}):\n    ", o.inspect_document, cut ? "first " : "",
                                   doc.size(), tokenizer_path.empty() ? "" : ", decoded by " + tokenizer_path);
  if (!tokenizer_path.empty()) {
    const Tokenizer tokenizer(tokenizer_path);
    set.check_tokenizer(tokenizer.checksum(), tokenizer.path());
    std::vector<int> ids;
    bool eos = false;
    for (int64_t id : doc) {
      if (static_cast<uint64_t>(id) == set.eos_id()) {
        eos = true;
        break;
      }
      ids.push_back(static_cast<int>(id));
    }
    sample += visible(tokenizer.decode(ids)) + (eos ? "</s>" : cut ? "…" : "") + "\n";
  } else {
    for (size_t i = 0; i < doc.size(); ++i) sample += fmt::format("{}{}", i ? " " : "", doc[i]);
    sample += (cut ? " …" : "") + std::string("\n    (token ids: no tokenizer; pass --tokenizer to decode them)\n");
  }
  print(sample);
}

void run_synth(DataOptions& o) {
  o.synth.progress = !o.synth_quiet;
  const SynthSummary s = synth_shards(o.synth);
  print(fmt::format(
      "{}: {} documents of {} Markov tokens + end token {} = {} tokens in {} shard{} (vocabulary {} = {} Markov "
      "states + the end token, order {}, branching {}, seed {})\n"
      "entropy rate H = Σ_i π_i·H(P_i) = {:.6f} nats/token (a text token after {} text token{} of its document)\n"
      "document start H(π) = {:.6f} nats; per text token (H(π) + (L−{})·H)/L = {:.6f} nats/token (L = {}, end tokens "
      "excluded)\n",
      o.synth.out, s.documents, o.synth.document_tokens, s.eos_id, s.tokens, s.shards, s.shards == 1 ? "" : "s",
      o.synth.vocab_size, o.synth.vocab_size - 1, o.synth.order, o.synth.branching, o.synth.seed, s.entropy_rate,
      o.synth.order, o.synth.order == 1 ? "" : "s", s.start_entropy, o.synth.order, s.text_token_entropy,
      o.synth.document_tokens));
}

}  // namespace

bool DataCommands::selected() const { return data != nullptr && data->parsed(); }

DataCommands add_data_commands(CLI::App& app) {
  DataCommands c;
  c.options = std::make_shared<DataOptions>();
  DataOptions& o = *c.options;
  c.data = app.add_subcommand("data", "Tokenizers and token shards: train a tokenizer, build, inspect, synthesize");
  c.data->require_subcommand(1);

  c.tokenizer_train = c.data->add_subcommand(
      "tokenizer-train", "Train a SentencePiece tokenizer (BPE or unigram, byte fallback, exact round trips)");
  c.tokenizer_train->add_option("--input", o.tokenizer.inputs, "Text files or directories (UTF-8)")
      ->required()
      ->type_name("FILE|DIR ...");
  c.tokenizer_train->add_option("--vocab-size", o.tokenizer.vocab_size, "Pieces in the vocabulary (> 259)")
      ->required();
  c.tokenizer_train->add_option("--out", o.tokenizer.out, "The model file written (e.g. tok.model)")->required();
  c.tokenizer_train->add_option("--model-type", o.tokenizer.model_type, "bpe or unigram")
      ->check(CLI::IsMember({"bpe", "unigram"}))
      ->capture_default_str();
  c.tokenizer_train->add_option("--character-coverage", o.tokenizer.character_coverage,
                                "Share of characters given their own piece; the rarest go to byte fallback")
      ->check(CLI::Range(0.98, 1.0))
      ->capture_default_str();
  c.tokenizer_train->add_option("--max-sentences", o.tokenizer.max_sentences,
                                "Lines sampled for training (bounds memory on large inputs)")
      ->capture_default_str();
  c.tokenizer_train->add_option("--seed", o.tokenizer.seed, "Seed of the line sampling")->capture_default_str();
  c.tokenizer_train->add_flag("--verbose", o.tokenizer.verbose, "Show SentencePiece's own log");

  c.build = c.data->add_subcommand(
      "build", "Tokenize text into token shards: PREFIX.NNNNN.bin (ids) + PREFIX.NNNNN.idx (header, documents)");
  c.build->add_option("--tokenizer", o.build.tokenizer, "SentencePiece model (moetrain data tokenizer-train)")
      ->required();
  c.build->add_option("--input", o.build.inputs, "Text files or directories (UTF-8)")
      ->required()
      ->type_name("FILE|DIR ...");
  c.build->add_option("--out", o.build.out, "Shard prefix")->required()->type_name("PREFIX");
  c.build->add_option("--docs", o.build_docs,
                      "Document boundaries: blank (blank lines), line (one per line), file (one per file)")
      ->check(CLI::IsMember({"blank", "line", "file"}))
      ->capture_default_str();
  c.build->add_option("--shard-tokens", o.build.shard_tokens, "Tokens per shard (documents never span shards)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  c.build->add_flag("--no-progress", o.build_quiet, "No progress bar");

  c.inspect = c.data->add_subcommand("inspect", "Counts, checks and a decoded sample of token shards");
  c.inspect->add_option("PREFIX", o.inspect_prefix, "Shard prefix")->required();
  c.inspect->add_option("--tokenizer", o.inspect_tokenizer,
                        "Decode the sample with this model (default: PREFIX.tokenizer.model, the copy `data build` "
                        "writes); checked against the shards' tokenizer checksum");
  c.inspect->add_option("--doc", o.inspect_document, "The document shown")->capture_default_str();
  c.inspect->add_option("--tokens", o.inspect_tokens, "Tokens of it shown")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  c.inspect->add_flag("--no-verify", o.inspect_no_verify,
                      "Skip reading every token (checksums, id range, end tokens)");

  c.synth = c.data->add_subcommand(
      "synth", "Write a synthetic Markov corpus as token shards (a model with model.vocab_size = --vocab-size trains "
               "on them) and print its entropy rate");
  c.synth->add_option("--out", o.synth.out, "Shard prefix")->required()->type_name("PREFIX");
  c.synth->add_option("--tokens", o.synth.tokens, "Tokens to write (at least; whole documents)")
      ->required()
      ->check(CLI::PositiveNumber);
  c.synth->add_option("--vocab-size", o.synth.vocab_size,
                      "Vocabulary V of the shards, every id < V: 0..V−2 text (V−1 Markov states: the built-in "
                      "source of data.source: synthetic, which a vocab-V model sees over V states), V−1 the "
                      "end-of-document token")
      ->capture_default_str();
  c.synth->add_option("--branching", o.synth.branching, "Successors per token (entropy grows with it)")
      ->capture_default_str();
  c.synth->add_option("--seed", o.synth.seed, "Seed of the transition table")->capture_default_str();
  c.synth->add_option("--order", o.synth.order,
                      "Order k of the Markov source: the next token depends on the last k (2 or more: a model needs "
                      "attention to reach the rate)")
      ->capture_default_str();
  c.synth->add_option("--doc-tokens", o.synth.document_tokens, "Markov tokens per document (L)")
      ->capture_default_str();
  c.synth->add_option("--shard-tokens", o.synth.shard_tokens, "Tokens per shard")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  c.synth->add_flag("--no-progress", o.synth_quiet, "No progress bar");
  return c;
}

bool run_data_command(const DataCommands& c) {
  if (!c.selected()) return false;
  DataOptions& o = *c.options;
  if (c.tokenizer_train->parsed()) run_tokenizer_train(o);
  else if (c.build->parsed()) run_build(o);
  else if (c.inspect->parsed()) run_inspect(o);
  else if (c.synth->parsed()) run_synth(o);
  return true;
}

}  // namespace moetrain::data
