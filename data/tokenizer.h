// The tokenizer: a SentencePiece model (BPE or unigram) with byte fallback, trained and applied through
// libsentencepiece. It is set up for exact round trips: no normalization, no dummy prefix, whitespace kept as is,
// and every byte a character piece does not cover becomes one of 256 byte pieces, so decode(encode(text)) == text
// for any UTF-8 text (one exception, inherent to SentencePiece: the character U+2581 '▁', which it uses to mark
// spaces, decodes as a space). Ids: 0 <unk>, 1 <s>, 2 </s> (the end-of-document token), then the byte pieces and
// the learned pieces.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "data/text_input.h"

namespace moetrain::data {

class Tokenizer {
 public:
  // Loads a SentencePiece model file; throws naming the file when it cannot.
  explicit Tokenizer(const std::string& path);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  const std::string& path() const { return path_; }
  int64_t vocab_size() const;
  int64_t eos_id() const;
  uint64_t checksum() const { return checksum_; }  // xxHash (XXH3-64) of the model file's bytes

  void encode(std::string_view text, std::vector<int>& ids) const;  // appends to ids
  std::string decode(const std::vector<int>& ids) const;
  std::string piece(int id) const;  // the piece's text as the model stores it (for inspect)

 private:
  struct Impl;
  std::string path_;
  uint64_t checksum_ = 0;
  std::unique_ptr<Impl> impl_;
};

// XXH3-64 of a file's bytes (read in blocks); throws naming the file when it cannot be read.
uint64_t file_checksum(const std::string& path);

struct TokenizerTrainOptions {
  std::vector<std::string> inputs;  // files or directories
  int64_t vocab_size = 32000;
  std::string model_type = "bpe";   // bpe | unigram
  std::string out;                  // the .model file written
  double character_coverage = 0.9995;  // characters rarer than this share go to byte fallback
  int64_t max_sentences = 2000000;  // lines sampled (reservoir) for training: bounds the trainer's memory
  uint32_t seed = 0;                // the sampling seed
  bool verbose = false;             // SentencePiece's own progress log
};

struct TokenizerTrainSummary {
  int64_t vocab_size = 0;
  int64_t files = 0;
  uint64_t bytes = 0;
  int64_t lines = 0;
  uint64_t checksum = 0;
};

// Trains a tokenizer on the inputs' non-blank lines and writes the model to options.out (atomically: a temporary
// file renamed into place). Throws on missing, empty or non-UTF-8 input and on a vocabulary the text cannot fill.
TokenizerTrainSummary train_tokenizer(const TokenizerTrainOptions& options);

}  // namespace moetrain::data
