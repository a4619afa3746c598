// Where the training loop gets its token windows. A step's global batch is the same token ids whatever the
// layout: sequence number step·G + dp_rank·(micro_batches·micro_batch_size) + micro_batch·micro_batch_size + row,
// G = micro_batch_size · micro_batches · dp. dp ranks and micro-batches only split it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "config/config.h"
#include "data/data_state.h"
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

// The global sequence position of a micro-batch's first row, counted from a resume point: positions of steps
// after `step` follow at global_sequences() per step from `samples`. The default origin gives
// BatchShape::first_sequence; a resume with another global batch size still continues at the saved position.
struct StreamOrigin {
  int64_t step = 0, samples = 0;
  int64_t position(const BatchShape& shape, int64_t step, int64_t dp_rank, int64_t micro_batch) const;
};

// Throws unless `saved` comes from a source with this seed and fingerprint, saying what differs.
void check_data_state(const DataState& saved, uint64_t seed, uint64_t fingerprint);

// The resume of every source: checks `saved`, moves `origin` to it, and checks that the source's own state at the
// saved step (`state_at`, computed from the moved origin) agrees with the saved epoch positions; on a mismatch the
// origin is restored and the error says so.
void resume_stream(StreamOrigin& origin, const DataState& saved, uint64_t seed, uint64_t fingerprint,
                   const std::function<DataState(int64_t)>& state_at);

class BatchSource {
 public:
  virtual ~BatchSource() = default;
  // [micro_batch_size, window] int64 token ids of training micro-batch `micro_batch` of `step` on `dp_rank`.
  virtual at::Tensor train(int64_t step, int64_t dp_rank, int64_t micro_batch) const = 0;
  // The same for validation batch `index` (a held-out stream).
  virtual at::Tensor validation(int64_t index, int64_t dp_rank, int64_t micro_batch) const = 0;
  // The best achievable next-token loss in nats, when the source knows it (synthetic), else a negative value.
  virtual double entropy_rate() const { return -1.0; }
  // The data order's state before `step` (a pure function of the step: batches are).
  virtual DataState state(int64_t step) const = 0;
  // Continue from a saved state: train(state.step, ...) yields what the saved run would have read next, whatever
  // the dp size and micro-batching are now. Throws when the data, window or seed differ from the saved run's.
  virtual void resume(const DataState& state) = 0;
};

// The synthetic Markov corpus: data.synthetic_tokens of training text (sequences repeat after that many tokens, as
// epochs of a finite corpus), validation from a separate stream of the same source.
class SyntheticBatches final : public BatchSource {
 public:
  SyntheticBatches(const config::Config& c);
  at::Tensor train(int64_t step, int64_t dp_rank, int64_t micro_batch) const override;
  at::Tensor validation(int64_t index, int64_t dp_rank, int64_t micro_batch) const override;
  double entropy_rate() const override { return source_.entropy_rate(); }
  DataState state(int64_t step) const override;
  void resume(const DataState& state) override;

 private:
  at::Tensor rows(uint64_t stream, int64_t first, bool wrap) const;

  MarkovSource source_;
  BatchShape shape_;
  int64_t train_sequences_;
  uint64_t seed_, fingerprint_;
  StreamOrigin origin_;
};

// data.source = synthetic: SyntheticBatches; shards: ShardBatches (data/shard_batches.h). With data.prefetch > 0
// the source is wrapped in a PrefetchingSource (data/prefetch.h) that prepares upcoming micro-batches on a
// background thread.
std::unique_ptr<BatchSource> make_batch_source(const config::Config& c);

}  // namespace moetrain::data
