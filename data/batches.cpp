#include "data/batches.h"

#include <ATen/ops/empty.h>
#include <fmt/format.h>
#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "data/prefetch.h"
#include "data/shard_batches.h"

namespace moetrain::data {

BatchRamp::BatchRamp(int64_t start, int64_t increment, int64_t final, int64_t ramp_sequences) {
  if (start < 1 || increment < 1 || final <= start || (final - start) % increment != 0 || ramp_sequences < 1)
    throw std::invalid_argument(fmt::format("batch ramp: start {}, increment {}, final {}, over {} sequences",
                                            start, increment, final, ramp_sequences));
  const int64_t n = (final - start) / increment;
  const double per_increment = static_cast<double>(ramp_sequences) / static_cast<double>(n);
  int64_t step = 0, before = 0;
  for (int64_t i = 0; i < n; ++i) {
    // Batch start + i·increment while fewer than (i + 1)·per_increment sequences have been trained.
    const int64_t size = start + i * increment;
    const double left = static_cast<double>(i + 1) * per_increment - static_cast<double>(before);
    const auto steps = left > 0 ? static_cast<int64_t>(std::ceil(left / static_cast<double>(size))) : 0;
    if (steps == 0) continue;
    first_step_.push_back(step), before_.push_back(before), size_.push_back(size);
    step += steps, before += steps * size;
  }
  first_step_.push_back(step), before_.push_back(before), size_.push_back(final);
}

size_t BatchRamp::phase(int64_t step) const {
  if (step < 0) throw std::out_of_range(fmt::format("batch ramp: step {}", step));
  return static_cast<size_t>(std::upper_bound(first_step_.begin(), first_step_.end(), step) - first_step_.begin()) - 1;
}

int64_t BatchRamp::sequences_at(int64_t step) const { return size_[phase(step)]; }

int64_t BatchRamp::sequences_before(int64_t step) const {
  const size_t i = phase(step);
  return before_[i] + (step - first_step_[i]) * size_[i];
}

BatchShape BatchShape::from(const config::Config& c) {
  const config::TrainConfig& t = c.train;
  BatchShape s{t.micro_batch_size, t.micro_batches, c.parallel.dp, t.seq_len + 1 + c.model.mtp_depth, nullptr};
  if (t.batch_rampup_start > 0)
    s.ramp = std::make_shared<const BatchRamp>(t.batch_rampup_start, t.batch_rampup_increment, s.global_sequences(),
                                               std::max<int64_t>(1, t.batch_rampup_tokens / t.seq_len));
  return s;
}

int64_t StreamOrigin::position(const BatchShape& shape, int64_t step, int64_t dp_rank, int64_t micro_batch) const {
  if (step < this->step)
    throw std::out_of_range(fmt::format("data: step {} comes before the resumed step {}", step, this->step));
  return samples + shape.first_sequence(step, dp_rank, micro_batch) - shape.sequences_before(this->step);
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
    : source_(c.data.synthetic_alphabet(c.model.vocab_size), c.data.synthetic_branching,
              static_cast<uint64_t>(c.data.synthetic_seed), c.data.synthetic_order),
      shape_(BatchShape::from(c)),
      train_sequences_(std::max<int64_t>(1, c.data.synthetic_tokens / shape_.window)),
      seed_(static_cast<uint64_t>(c.data.synthetic_seed)) {
  const int64_t parts[] = {source_.vocab_size(), c.data.synthetic_branching, c.data.synthetic_seed, train_sequences_,
                           shape_.window};
  // Order 1 keeps the fingerprint of the sources from before the order existed (their checkpoints resume); the
  // alphabet was the model's vocabulary then and is the first part now.
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
  return rows(1, shape_.first_validation_sequence(index, dp_rank, micro_batch), /*wrap=*/false);
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
    source = std::make_unique<PrefetchingSource>(std::move(source), c.data.prefetch, BatchShape::from(c));
  return source;
}

}  // namespace moetrain::data
