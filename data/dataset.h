// A token-shard corpus as training samples: its documents split into training and validation ones, each side's
// documents concatenated (each already ends with the end-of-document token, so windows that span documents keep
// them EOS-separated) and cut into windows.
//
// A window holds seq_len + 1 + mtp_depth tokens (BatchShape::window): seq_len inputs, their next tokens as targets,
// and mtp_depth further tokens for the multi-token-prediction targets. Consecutive windows start seq_len tokens
// apart (the stride), overlapping by 1 + mtp_depth tokens, so every token is a main-model target exactly once per
// epoch. A stream of T tokens gives ⌊(T − window) / stride⌋ + 1 windows.
//
// The split is by document and needs no seed: of D documents, n = round(valid_fraction · D) (at least 1, at most
// D − 1) are held out, evenly spread: document d is a validation document when ⌊(d+1)·n/D⌋ > ⌊d·n/D⌋. Both sides
// are stored as runs of consecutive documents (about n of them), not per document, so memory does not grow with
// the corpus.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/shards.h"

namespace moetrain::data {

// One side (training or validation) of a corpus, packed into windows.
class PackedStream {
 public:
  struct Run {
    uint32_t shard = 0;
    uint64_t begin = 0, end = 0;  // token range in the shard
  };
  PackedStream() = default;
  PackedStream(std::shared_ptr<const ShardSet> set, std::vector<Run> runs, uint64_t documents, int64_t window,
               int64_t stride);

  int64_t windows() const { return windows_; }
  uint64_t tokens() const { return starts_.empty() ? 0 : starts_.back(); }
  uint64_t documents() const { return documents_; }
  // Window k (0 ≤ k < windows()) into out[0..window).
  void read(int64_t k, int64_t* out) const;

 private:
  std::shared_ptr<const ShardSet> set_;
  std::vector<Run> runs_;
  std::vector<uint64_t> starts_;  // runs_.size() + 1 prefix sums of run lengths
  uint64_t documents_ = 0;
  int64_t window_ = 0, stride_ = 1, windows_ = 0;
};

class Dataset {
 public:
  // Throws when either side is shorter than one window (naming the corpus and train.seq_len) or the corpus has too
  // few documents to hold some out.
  Dataset(std::shared_ptr<const ShardSet> set, double valid_fraction, int64_t window, int64_t stride);

  const ShardSet& shards() const { return *set_; }
  const PackedStream& train() const { return train_; }
  const PackedStream& validation() const { return validation_; }

  // The held-out documents of a D-document corpus, and whether document d is one of them.
  static uint64_t held_out(uint64_t documents, double valid_fraction);
  static bool is_validation(uint64_t doc, uint64_t documents, uint64_t held_out);

 private:
  std::shared_ptr<const ShardSet> set_;
  PackedStream train_, validation_;
};

}  // namespace moetrain::data
