// Batches from token shards (data.source = shards): the corpora of data.path (one prefix, or a weighted blend),
// each split into training and validation documents and packed into windows (data/dataset.h); the global
// position of a row picks a dataset (data/blend.h) and, through that dataset's seeded per-epoch permutation
// (data/sampler.h), a window. Validation reads the held-out windows in order, through the same blend.
#pragma once

#include <memory>
#include <vector>

#include "config/config.h"
#include "data/batches.h"
#include "data/blend.h"
#include "data/dataset.h"
#include "data/sampler.h"

namespace moetrain::data {

class ShardBatches final : public BatchSource {
 public:
  // Opens the shards of c.data.path and checks them against the config: vocabulary ≤ model.vocab_size, the
  // tokenizer of data.tokenizer (when set), one window of train.seq_len + 1 + model.mtp_depth tokens available
  // on both sides of the split. Throws naming the file or key.
  explicit ShardBatches(const config::Config& c);

  at::Tensor train(int64_t step, int64_t dp_rank, int64_t micro_batch) const override;
  at::Tensor validation(int64_t index, int64_t dp_rank, int64_t micro_batch) const override;
  DataState state(int64_t step) const override;
  void resume(const DataState& state) override;

  // Which training window the row at a global position reads (for tests and tools).
  struct Sample {
    size_t dataset = 0;
    int64_t epoch = 0;
    int64_t window = 0;
  };
  Sample train_sample(int64_t position) const;
  // The global position of the first row of a training micro-batch.
  int64_t position(int64_t step, int64_t dp_rank, int64_t micro_batch) const {
    return origin_.position(shape_, step, dp_rank, micro_batch);
  }

  const BatchShape& shape() const { return shape_; }
  const std::vector<std::unique_ptr<Dataset>>& datasets() const { return datasets_; }
  const Blend& blend() const { return blend_; }
  uint64_t fingerprint() const { return fingerprint_; }

 private:
  BatchShape shape_;
  std::vector<std::unique_ptr<Dataset>> datasets_;
  std::vector<Sampler> samplers_;
  Blend blend_;
  uint64_t seed_ = 0, fingerprint_ = 0;
  StreamOrigin origin_;
};

}  // namespace moetrain::data
