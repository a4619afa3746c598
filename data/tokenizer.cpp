#include "data/tokenizer.h"

#include <fmt/format.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <xxhash.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <thread>
#include <unordered_map>

namespace moetrain::data {
namespace {

// Byte pieces plus <unk>, <s>, </s>: the smallest vocabulary byte fallback leaves room for.
constexpr int64_t kReservedPieces = 256 + 3;
// SentencePiece skips training sentences longer than its max_sentence_length; lines are fed in pieces below it.
constexpr size_t kMaxSentenceBytes = 8192;

// Feeds SentencePiece the non-blank lines of the inputs. An input error cannot be thrown through the library, so
// it ends the iteration and is rethrown once Train returns.
class LineIterator final : public sentencepiece::SentenceIterator {
 public:
  explicit LineIterator(std::vector<InputFile> files) : reader_(std::move(files), kMaxSentenceBytes) { Next(); }
  bool done() const override { return done_; }
  const std::string& value() const override { return value_; }
  sentencepiece::util::Status status() const override {
    if (error_.empty()) return {};
    return {sentencepiece::util::StatusCode::kInvalidArgument, error_};
  }
  void Next() override {
    try {
      LineReader::Piece p;
      while (reader_.next(p)) {
        while (!p.text.empty() && (p.text.back() == '\n' || p.text.back() == '\r')) p.text.pop_back();
        if (is_blank(p.text)) continue;
        value_ = std::move(p.text);
        ++lines_;
        return;
      }
    } catch (const std::exception& e) {
      error_ = e.what();
    }
    done_ = true;
  }
  const std::string& error() const { return error_; }
  int64_t lines() const { return lines_; }
  uint64_t bytes() const { return reader_.bytes_read(); }

 private:
  LineReader reader_;
  std::string value_, error_;
  bool done_ = false;
  int64_t lines_ = 0;
};

}  // namespace

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

uint64_t file_checksum(const std::string& path) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> f{std::fopen(path.c_str(), "rb"), &std::fclose};
  if (!f) throw std::runtime_error(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
  std::unique_ptr<XXH3_state_t, XXH_errorcode (*)(XXH3_state_t*)> state{XXH3_createState(), &XXH3_freeState};
  XXH3_64bits_reset(state.get());
  std::vector<char> block(size_t{1} << 20);
  size_t got;
  while ((got = std::fread(block.data(), 1, block.size(), f.get())) > 0) XXH3_64bits_update(state.get(), block.data(), got);
  if (std::ferror(f.get())) throw std::runtime_error(fmt::format("{}: read error: {}", path, std::strerror(errno)));
  return XXH3_64bits_digest(state.get());
}

Tokenizer::Tokenizer(const std::string& path) : path_(path), impl_(std::make_unique<Impl>()) {
  if (!std::filesystem::is_regular_file(path))
    throw std::runtime_error(fmt::format("{}: tokenizer model not found", path));
  const auto status = impl_->sp.Load(path);
  if (!status.ok())
    throw std::runtime_error(fmt::format("{}: not a SentencePiece model: {}", path, status.message()));
  if (impl_->sp.eos_id() < 0)
    throw std::runtime_error(fmt::format("{}: the tokenizer has no end-of-sequence piece (</s>)", path));
  checksum_ = file_checksum(path);
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

int64_t Tokenizer::vocab_size() const { return impl_->sp.GetPieceSize(); }
int64_t Tokenizer::eos_id() const { return impl_->sp.eos_id(); }

void Tokenizer::encode(std::string_view text, std::vector<int>& ids) const {
  std::vector<int> piece_ids;
  const auto status = impl_->sp.Encode(absl::string_view(text.data(), text.size()), &piece_ids);
  if (!status.ok()) throw std::runtime_error(fmt::format("{}: cannot encode text: {}", path_, status.message()));
  ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  std::string text;
  for (int id : ids)
    if (id < 0 || id >= vocab_size())
      throw std::runtime_error(fmt::format("{}: token id {} is outside the vocabulary [0, {})", path_, id, vocab_size()));
  const auto status = impl_->sp.Decode(ids, &text);
  if (!status.ok()) throw std::runtime_error(fmt::format("{}: cannot decode: {}", path_, status.message()));
  return text;
}

std::string Tokenizer::piece(int id) const { return impl_->sp.IdToPiece(id); }

TokenizerTrainSummary train_tokenizer(const TokenizerTrainOptions& o) {
  if (o.out.empty()) throw std::runtime_error("tokenizer-train: --out is required");
  if (o.model_type != "bpe" && o.model_type != "unigram")
    throw std::runtime_error(fmt::format("--model-type {}: expected bpe or unigram", o.model_type));
  if (o.character_coverage < 0.98 || o.character_coverage > 1.0)
    throw std::runtime_error(fmt::format("--character-coverage {}: must be between 0.98 and 1 (SentencePiece's range)",
                                         o.character_coverage));
  if (o.vocab_size <= kReservedPieces)
    throw std::runtime_error(fmt::format("--vocab-size {}: byte fallback needs more than {} pieces (256 bytes, "
                                         "<unk>, <s>, </s>) plus the learned ones",
                                         o.vocab_size, kReservedPieces));
  std::vector<InputFile> files = expand_inputs(o.inputs);
  TokenizerTrainSummary summary;
  summary.files = static_cast<int64_t>(files.size());

  // Exact round trips: identity normalization, no dummy prefix, spaces kept; byte fallback for the rest.
  const std::unordered_map<std::string, std::string> args = {
      {"model_type", o.model_type},
      {"vocab_size", std::to_string(o.vocab_size)},
      {"byte_fallback", "true"},
      {"normalization_rule_name", "identity"},
      {"add_dummy_prefix", "false"},
      {"remove_extra_whitespaces", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"split_digits", "true"},
      {"character_coverage", fmt::format("{}", o.character_coverage)},
      {"input_sentence_size", std::to_string(o.max_sentences)},
      {"shuffle_input_sentence", "true"},
      {"max_sentence_length", std::to_string(kMaxSentenceBytes * 2)},
      {"num_threads", std::to_string(std::max(1u, std::thread::hardware_concurrency()))},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      {"minloglevel", o.verbose ? "0" : "2"},
  };
  sentencepiece::SetRandomGeneratorSeed(o.seed);
  LineIterator lines(std::move(files));
  std::string model;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &lines, &model);
  if (!lines.error().empty()) throw std::runtime_error(lines.error());
  summary.lines = lines.lines();
  summary.bytes = lines.bytes();
  if (summary.lines == 0) {
    std::string names;
    for (const auto& in : o.inputs) names += (names.empty() ? "" : ", ") + in;
    throw std::runtime_error(fmt::format("{}: the input is empty (no non-blank line to train on)", names));
  }
  if (!status.ok())
    throw std::runtime_error(fmt::format("tokenizer-train --vocab-size {} --character-coverage {}: sentencepiece: {}",
                                         o.vocab_size, o.character_coverage, status.message()));

  const std::string tmp = o.out + ".tmp";
  {
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> f{std::fopen(tmp.c_str(), "wb"), &std::fclose};
    if (!f) throw std::runtime_error(fmt::format("{}: cannot write: {}", tmp, std::strerror(errno)));
    if (std::fwrite(model.data(), 1, model.size(), f.get()) != model.size() || std::fflush(f.get()) != 0)
      throw std::runtime_error(fmt::format("{}: write error: {}", tmp, std::strerror(errno)));
  }
  std::filesystem::rename(tmp, o.out);
  Tokenizer check(o.out);
  summary.vocab_size = check.vocab_size();
  summary.checksum = check.checksum();
  return summary;
}

}  // namespace moetrain::data
