#include "data/builder.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <optional>
#include <stdexcept>

#include "data/progress.h"
#include "data/shards.h"
#include "data/synthetic.h"
#include "data/tokenizer.h"

namespace moetrain::data {
namespace {

// Inputs at least this large report progress even when stderr is not a terminal (a log file).
constexpr uint64_t kLargeInputBytes = uint64_t{256} << 20;
constexpr uint64_t kLargeSynthTokens = uint64_t{200} << 20;

}  // namespace

std::string tokenizer_copy_path(const std::string& prefix) { return prefix + ".tokenizer.model"; }

BuildSummary build_shards(const BuildOptions& o) {
  if (o.out.empty()) throw std::runtime_error("data build: --out PREFIX is required");
  const auto t0 = std::chrono::steady_clock::now();
  Tokenizer tokenizer(o.tokenizer);
  std::vector<InputFile> files = expand_inputs(o.inputs);
  BuildSummary s;
  s.files = static_cast<int64_t>(files.size());
  DocumentReader docs(std::move(files), o.split);
  TokenShardWriter writer(o.out, static_cast<uint64_t>(tokenizer.vocab_size()), static_cast<uint64_t>(tokenizer.eos_id()),
                     tokenizer.checksum(), o.shard_tokens);
  Progress progress("build", docs.lines().total_bytes(), Progress::Unit::bytes,
                    docs.lines().total_bytes() >= kLargeInputBytes, o.progress);
  DocumentReader::Piece piece;
  std::vector<int> ids;
  while (docs.next(piece)) {
    ids.clear();
    tokenizer.encode(piece.text, ids);
    writer.append(ids);
    if (piece.document_end) writer.end_document();
    progress.update(docs.lines().bytes_read(), writer.tokens());
  }
  if (writer.documents() == 0) {
    std::string names;
    for (const auto& in : o.inputs) names += (names.empty() ? "" : ", ") + in;
    throw std::runtime_error(fmt::format("{}: the input is empty (no document to tokenize)", names));
  }
  writer.finish();
  // The tokenizer travels with its shards (a temporary file renamed into place, like the shards).
  const std::string copy = tokenizer_copy_path(o.out);
  std::filesystem::copy_file(o.tokenizer, copy + ".tmp", std::filesystem::copy_options::overwrite_existing);
  std::filesystem::rename(copy + ".tmp", copy);
  progress.update(docs.lines().bytes_read(), writer.tokens());
  progress.finish();
  s.bytes = docs.lines().bytes_read();
  s.documents = writer.documents();
  s.tokens = writer.tokens();
  s.shards = writer.shards();
  s.token_bytes = token_bytes_for(static_cast<uint64_t>(tokenizer.vocab_size()));
  s.vocab_size = tokenizer.vocab_size();
  s.tokenizer_checksum = tokenizer.checksum();
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return s;
}

SynthSummary synth_shards(const SynthOptions& o) {
  if (o.out.empty()) throw std::runtime_error("data synth: --out PREFIX is required");
  if (o.vocab_size < 3)
    throw std::runtime_error(fmt::format("--vocab-size {}: the synthetic corpus needs at least 3 ids (2 for text, "
                                         "1 for the end-of-document token)",
                                         o.vocab_size));
  if (o.branching < 1 || o.branching > o.vocab_size - 1)
    throw std::runtime_error(fmt::format("--branching {}: must be between 1 and the text vocabulary {} "
                                         "(--vocab-size − 1)",
                                         o.branching, o.vocab_size - 1));
  if (o.document_tokens < 1)
    throw std::runtime_error(fmt::format("--doc-tokens {}: must be at least 1", o.document_tokens));
  if (o.tokens < 1) throw std::runtime_error("--tokens: must be at least 1");
  if (o.order < 1 || o.document_tokens < o.order)
    throw std::runtime_error(
        fmt::format("--order {}: must be between 1 and --doc-tokens ({})", o.order, o.document_tokens));
  std::optional<MarkovSource> made;
  try {
    made.emplace(o.vocab_size - 1, o.branching, o.seed, o.order);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(fmt::format("--order {} with --vocab-size {}: {}", o.order, o.vocab_size, e.what()));
  }
  const MarkovSource& source = *made;
  SynthSummary s;
  s.eos_id = o.vocab_size - 1;
  const auto per_doc = static_cast<uint64_t>(o.document_tokens) + 1;
  const uint64_t documents = (o.tokens + per_doc - 1) / per_doc;
  TokenShardWriter writer(o.out, static_cast<uint64_t>(o.vocab_size), static_cast<uint64_t>(s.eos_id), 0, o.shard_tokens);
  Progress progress("synth", documents * per_doc, Progress::Unit::tokens, documents * per_doc >= kLargeSynthTokens,
                    o.progress);
  std::vector<int32_t> doc(static_cast<size_t>(o.document_tokens));
  for (uint64_t d = 0; d < documents; ++d) {
    source.sequence(/*stream=*/0, d, o.document_tokens, doc.data());
    writer.append(doc);
    writer.end_document();
    progress.update(writer.tokens(), writer.tokens());
  }
  writer.finish();
  progress.finish();
  s.documents = writer.documents();
  s.tokens = writer.tokens();
  s.shards = writer.shards();
  s.entropy_rate = source.entropy_rate();
  for (double p : source.stationary())
    if (p > 0) s.start_entropy -= p * std::log(p);
  const auto L = static_cast<double>(o.document_tokens);
  // A document's first k tokens are a state drawn from π (jointly H(π)); each later one costs H.
  s.text_token_entropy = (s.start_entropy + (L - static_cast<double>(o.order)) * s.entropy_rate) / L;
  return s;
}

}  // namespace moetrain::data
