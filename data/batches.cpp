#include "data/batches.h"

#include <ATen/ops/empty.h>
#include <fmt/format.h>
#include <xxhash.h>

#include <algorithm>
#include <stdexcept>

#include "data/prefetch.h"
#include "data/shard_batches.h"

namespace moetrain::data {

BatchShape BatchShape::from(const config::Config& c) {
  return {c.train.micro_batch_size, c.train.micro_batches, c.parallel.dp,
          c.train.seq_len + 1 + c.model.mtp_depth};
}

int64_t StreamOrigin::position(const BatchShape& shape, int64_t step, int64_t dp_rank, int64_t micro_batch) const {
  if (step < this->step)
    throw std::out_of_range(fmt::format("data: step {} comes before the resumed step {}", step, this->step));
  return samples + shape.first_sequence(step - this->step, dp_rank, micro_batch);
}

void check_data_state(const DataState& saved, uint64_t seed, uint64_t fingerprint) {
  if (saved.fingerprint != fingerprint)
    throw std::runtime_error(fmt::format(
        "data state: saved for other data (fingerprint {:016x}, now {:016x}): the corpus, data.path, "
        "data.valid_fraction, train.seq_len or model.mtp_depth changed since it was saved",
        saved.fingerprint, fingerprint));
  if (saved.seed != seed)
    throw std::runtime_error(fmt::format("data state: saved with seed {}, this run's data order uses seed {}",
                                         saved.seed, seed));
  if (saved.step < 0 || saved.samples_consumed < 0)
    throw std::runtime_error(fmt::format("data state: negative step {} or samples consumed {}", saved.step,
                                         saved.samples_consumed));
}

SyntheticBatches::SyntheticBatches(const config::Config& c)
    : source_(c.model.vocab_size, c.data.synthetic_branching, static_cast<uint64_t>(c.data.synthetic_seed),
              c.data.synthetic_order),
      shape_(BatchShape::from(c)),
      train_sequences_(std::max<int64_t>(1, c.data.synthetic_tokens / shape_.window)),
      seed_(static_cast<uint64_t>(c.data.synthetic_seed)) {
  const int64_t parts[] = {c.model.vocab_size, c.data.synthetic_branching, c.data.synthetic_seed, train_sequences_,
                           shape_.window};
  // Order 1 keeps the fingerprint of the sources from before the order existed (their checkpoints resume).
  fingerprint_ = c.data.synthetic_order == 1
                     ? XXH3_64bits(parts, sizeof parts)
                     : XXH3_64bits_withSeed(parts, sizeof parts, static_cast<uint64_t>(c.data.synthetic_order));
}

at::Tensor SyntheticBatches::rows(uint64_t stream, int64_t first, bool wrap) const {
  at::Tensor ids32 = at::empty({shape_.micro_batch_size, shape_.window}, at::kInt);
  for (int64_t j = 0; j < shape_.micro_batch_size; ++j) {
    int64_t index = first + j;
    if (wrap) index %= train_sequences_;
    source_.sequence(stream, static_cast<uint64_t>(index), shape_.window, ids32[j].data_ptr<int32_t>());
  }
  return ids32.to(at::kLong);
}

at::Tensor SyntheticBatches::train(int64_t step, int64_t dp_rank, int64_t micro_batch) const {
  return rows(0, origin_.position(shape_, step, dp_rank, micro_batch), /*wrap=*/true);
}

at::Tensor SyntheticBatches::validation(int64_t index, int64_t dp_rank, int64_t micro_batch) const {
  return rows(1, shape_.first_sequence(index, dp_rank, micro_batch), /*wrap=*/false);
}

DataState SyntheticBatches::state(int64_t step) const {
  DataState s;
  s.step = step;
  s.samples_consumed = origin_.position(shape_, step, 0, 0);
  s.epochs = {s.samples_consumed / train_sequences_};
  s.samples_in_epoch = {s.samples_consumed % train_sequences_};
  s.seed = seed_;
  s.fingerprint = fingerprint_;
  return s;
}

void resume_stream(StreamOrigin& origin, const DataState& saved, uint64_t seed, uint64_t fingerprint,
                   const std::function<DataState(int64_t)>& state_at) {
  check_data_state(saved, seed, fingerprint);
  const StreamOrigin previous = origin;
  origin = {saved.step, saved.samples_consumed};
  const DataState now = state_at(saved.step);
  if (now.epochs != saved.epochs || now.samples_in_epoch != saved.samples_in_epoch) {
    origin = previous;
    throw std::runtime_error(fmt::format("data state: inconsistent (its epoch positions disagree with {} samples "
                                         "consumed)",
                                         saved.samples_consumed));
  }
}

void SyntheticBatches::resume(const DataState& saved) {
  resume_stream(origin_, saved, seed_, fingerprint_, [this](int64_t step) { return state(step); });
}

std::unique_ptr<BatchSource> make_batch_source(const config::Config& c) {
  std::unique_ptr<BatchSource> source;
  switch (c.data.source) {
    case config::DataSource::kSynthetic: source = std::make_unique<SyntheticBatches>(c); break;
    case config::DataSource::kShards: source = std::make_unique<ShardBatches>(c); break;
  }
  if (c.data.prefetch > 0)
    source = std::make_unique<PrefetchingSource>(std::move(source), c.data.prefetch, c.train.micro_batches);
  return source;
}

}  // namespace moetrain::data
