// Where the training loop gets its token windows. A step's global batch is the same token ids whatever the
// layout: sequence number S(step) + dp_rank·(M·micro_batch_size) + micro_batch·micro_batch_size + row, where M is
// the step's micro-batches per dp rank and S(step) the sequences of all steps before it (step·G without a ramp,
// G = micro_batch_size · M · dp). dp ranks and micro-batches only split it.
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

// The batch-size ramp (train.batch_rampup_*, Megatron-Core's --rampup-batch-size): the global batch starts at
// `start` sequences and grows by `increment` each time another ramp_sequences / n sequences have been trained
// (n = (final − start) / increment increments), up to `final`. Like Megatron-Core's, a step's batch follows from the
// sequences trained before it; counted from step 0, it is a pure function of the step, the same on every layout.
class BatchRamp {
 public:
  BatchRamp(int64_t start, int64_t increment, int64_t final, int64_t ramp_sequences);
  int64_t sequences_at(int64_t step) const;      // the global batch of `step`
  int64_t sequences_before(int64_t step) const;  // the global batches of steps 0 .. step − 1, summed
  int64_t ramp_steps() const { return first_step_.back(); }  // the first step at the final batch

 private:
  size_t phase(int64_t step) const;
  // One entry per phase of constant batch (the last: the final batch, for good): its first step, the sequences
  // before it, its batch.
  std::vector<int64_t> first_step_, before_, size_;
};

struct BatchShape {
  int64_t micro_batch_size = 1;
  int64_t micro_batches = 1;  // per dp rank, of the final (without a ramp: every) step
  int64_t dp = 1;
  int64_t window = 2;  // tokens per sequence: seq_len + 1 + mtp_depth
  std::shared_ptr<const BatchRamp> ramp;  // null: every step's batch is global_sequences()

  int64_t global_sequences() const { return micro_batch_size * micro_batches * dp; }  // the final batch
  int64_t global_sequences(int64_t step) const { return ramp ? ramp->sequences_at(step) : global_sequences(); }
  int64_t micro_batches_at(int64_t step) const { return global_sequences(step) / (micro_batch_size * dp); }
  int64_t sequences_before(int64_t step) const {
    return ramp ? ramp->sequences_before(step) : step * global_sequences();
  }
  // Index of the first sequence of (step, dp_rank, micro_batch) in the training stream.
  int64_t first_sequence(int64_t step, int64_t dp_rank, int64_t micro_batch) const {
    return sequences_before(step) + (dp_rank * micro_batches_at(step) + micro_batch) * micro_batch_size;
  }
  // The same for validation batch `index`, which always has the final shape.
  int64_t first_validation_sequence(int64_t index, int64_t dp_rank, int64_t micro_batch) const {
    return index * global_sequences() + (dp_rank * micro_batches + micro_batch) * micro_batch_size;
  }
  static BatchShape from(const config::Config& c);
};

// The global sequence position of a micro-batch's first row, counted from a resume point: the steps after `step`
// follow from `samples` with this run's batches. The default origin gives BatchShape::first_sequence; a resume with
// another global batch size (or ramp) still continues at the saved position.
struct StreamOrigin {
  int64_t step = 0, samples = 0;
  int64_t position(const BatchShape& shape, int64_t step, int64_t dp_rank, int64_t micro_batch) const;
  int64_t samples_before(const BatchShape& shape, int64_t step) const { return position(shape, step, 0, 0); }
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
