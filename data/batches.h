// Where the training loop gets its token windows. A step's global batch is the same token ids whatever the
// layout: sequence number step·G + dp_rank·(micro_batches·micro_batch_size) + micro_batch·micro_batch_size + row,
// G = micro_batch_size · micro_batches · dp. dp ranks and micro-batches only split it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>

#include "configs/config.h"
#include "data/synthetic.h"

namespace moetrain::data {

struct BatchShape {
  int64_t micro_batch_size = 1;
  int64_t micro_batches = 1;
  int64_t dp = 1;
  int64_t window = 2;  // tokens per sequence: seq_len + 1 + mtp_depth

  int64_t global_sequences() const { return micro_batch_size * micro_batches * dp; }
  // Index of the first sequence of (step, dp_rank, micro_batch) in the stream.
  int64_t first_sequence(int64_t step, int64_t dp_rank, int64_t micro_batch) const {
    return step * global_sequences() + dp_rank * micro_batches * micro_batch_size + micro_batch * micro_batch_size;
  }
  static BatchShape from(const config::Config& c);
};

class BatchSource {
 public:
  virtual ~BatchSource() = default;
  // [micro_batch_size, window] int64 token ids of training micro-batch `micro_batch` of `step` on `dp_rank`.
  virtual at::Tensor train(int64_t step, int64_t dp_rank, int64_t micro_batch) const = 0;
  // The same for validation batch `index` (a held-out stream).
  virtual at::Tensor validation(int64_t index, int64_t dp_rank, int64_t micro_batch) const = 0;
  // The best achievable next-token loss in nats, when the source knows it (synthetic), else a negative value.
  virtual double entropy_rate() const { return -1.0; }
};

// The synthetic Markov corpus: data.synthetic_tokens of training text (sequences repeat after that many tokens, as
// epochs of a finite corpus), validation from a separate stream of the same source.
class SyntheticBatches final : public BatchSource {
 public:
  SyntheticBatches(const config::Config& c);
  at::Tensor train(int64_t step, int64_t dp_rank, int64_t micro_batch) const override;
  at::Tensor validation(int64_t index, int64_t dp_rank, int64_t micro_batch) const override;
  double entropy_rate() const override { return source_.entropy_rate(); }
  const MarkovSource& source() const { return source_; }

 private:
  at::Tensor rows(uint64_t stream, int64_t first, bool wrap) const;

  MarkovSource source_;
  BatchShape shape_;
  int64_t train_sequences_;
};

std::unique_ptr<BatchSource> make_batch_source(const config::Config& c);

}  // namespace moetrain::data
