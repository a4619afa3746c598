#include "data/shard_batches.h"

#include <ATen/ops/empty.h>
#include <fmt/format.h>
#include <xxhash.h>

#include <cstring>
#include <optional>
#include <stdexcept>

#include "data/tokenizer.h"

namespace moetrain::data {
namespace {

std::vector<BlendEntry> entries(const config::Config& c) {
  try {
    return parse_blend(c.data.path);
  } catch (const std::exception& e) {
    throw std::runtime_error(c.where("data.path") + e.what());
  }
}

// " (set at FILE:LINE)" for a key a config file set, else "".
std::string set_at(const config::Config& c, const std::string& key) {
  const std::string where = c.where(key);  // "FILE:LINE: " or ""
  return where.size() > 2 ? " (set at " + where.substr(0, where.size() - 2) + ")" : "";
}

std::vector<double> weights(const config::Config& c) {
  std::vector<double> w;
  for (const auto& e : entries(c)) w.push_back(e.weight);
  return w;
}

}  // namespace

ShardBatches::ShardBatches(const config::Config& c)
    : shape_(BatchShape::from(c)), blend_(weights(c)), seed_(static_cast<uint64_t>(c.train.seed)) {
  if (c.data.valid_fraction <= 0)
    throw std::runtime_error(fmt::format("{}data.valid_fraction = 0 holds out no documents, but training measures "
                                         "the validation loss (every train.eval_interval steps and at the end)",
                                         c.where("data.valid_fraction")));
  std::optional<uint64_t> tokenizer;
  if (!c.data.tokenizer.empty()) tokenizer = file_checksum(c.data.tokenizer);
  std::vector<uint64_t> facts;  // what the fingerprint covers
  std::string first_idx;
  for (const BlendEntry& e : entries(c)) {
    auto set = std::make_shared<const ShardSet>(e.prefix);
    const std::string idx = shard_path(e.prefix, 0, "idx");
    if (set->vocab_size() > static_cast<uint64_t>(c.model.vocab_size))
      throw std::runtime_error(fmt::format("{}: the shards use a vocabulary of {} ids, more than model.vocab_size = "
                                           "{}{}",
                                           idx, set->vocab_size(), c.model.vocab_size, set_at(c, "model.vocab_size")));
    if (tokenizer) set->check_tokenizer(*tokenizer, c.data.tokenizer);
    // The corpora of a blend must speak one vocabulary: the same ids mean the same pieces, one end token.
    if (datasets_.empty()) {
      first_idx = idx;
    } else {
      const ShardSet& first = datasets_.front()->shards();
      auto differ = [&](const char* what, const std::string& theirs, const std::string& ours) {
        return std::runtime_error(fmt::format("data.path: {} has {} {} but {} has {}; the corpora of a blend must come "
                                              "from one tokenizer (rebuild one with the other's)",
                                              idx, what, theirs, first_idx, ours));
      };
      if (set->tokenizer_checksum() != first.tokenizer_checksum())
        throw differ("tokenizer checksum", fmt::format("{:016x}", set->tokenizer_checksum()),
                     fmt::format("{:016x}", first.tokenizer_checksum()));
      if (set->vocab_size() != first.vocab_size())
        throw differ("vocabulary", std::to_string(set->vocab_size()), std::to_string(first.vocab_size()));
      if (set->eos_id() != first.eos_id())
        throw differ("end-of-document id", std::to_string(set->eos_id()), std::to_string(first.eos_id()));
    }
    for (const auto& s : set->shards())
      facts.insert(facts.end(), {s.header.data_checksum, s.header.offsets_checksum, s.header.tokens});
    datasets_.push_back(std::make_unique<Dataset>(set, c.data.valid_fraction, shape_.window, c.train.seq_len));
    samplers_.emplace_back(datasets_.back()->train().windows(), seed_, static_cast<uint64_t>(datasets_.size() - 1));
  }
  uint64_t fraction_bits;
  std::memcpy(&fraction_bits, &c.data.valid_fraction, sizeof fraction_bits);
  facts.insert(facts.end(), {static_cast<uint64_t>(shape_.window), static_cast<uint64_t>(c.train.seq_len),
                             fraction_bits, static_cast<uint64_t>(blend_.block())});
  for (int64_t n : blend_.slots()) facts.push_back(static_cast<uint64_t>(n));
  fingerprint_ = XXH3_64bits(facts.data(), facts.size() * sizeof(uint64_t));
}

ShardBatches::Sample ShardBatches::train_sample(int64_t position) const {
  const Blend::Draw d = blend_.at(position);
  const Sampler& s = samplers_[d.dataset];
  return {d.dataset, s.epoch(d.index), s.sample(d.index)};
}

at::Tensor ShardBatches::train(int64_t step, int64_t dp_rank, int64_t micro_batch) const {
  at::Tensor out = at::empty({shape_.micro_batch_size, shape_.window}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  const int64_t first = position(step, dp_rank, micro_batch);
  for (int64_t j = 0; j < shape_.micro_batch_size; ++j) {
    const Sample s = train_sample(first + j);
    datasets_[s.dataset]->train().read(s.window, p + j * shape_.window);
  }
  return out;
}

at::Tensor ShardBatches::validation(int64_t index, int64_t dp_rank, int64_t micro_batch) const {
  at::Tensor out = at::empty({shape_.micro_batch_size, shape_.window}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  const int64_t first = shape_.first_validation_sequence(index, dp_rank, micro_batch);
  for (int64_t j = 0; j < shape_.micro_batch_size; ++j) {
    const Blend::Draw d = blend_.at(first + j);
    const PackedStream& held = datasets_[d.dataset]->validation();
    held.read(d.index % held.windows(), p + j * shape_.window);  // an evaluation longer than the split wraps
  }
  return out;
}

DataState ShardBatches::state(int64_t step) const {
  DataState s;
  s.step = step;
  s.samples_consumed = position(step, 0, 0);
  for (size_t i = 0; i < datasets_.size(); ++i) {
    const int64_t draws = blend_.draws_before(i, s.samples_consumed);
    const int64_t n = samplers_[i].samples_per_epoch();
    s.epochs.push_back(draws / n);
    s.samples_in_epoch.push_back(draws % n);
  }
  s.seed = seed_;
  s.fingerprint = fingerprint_;
  return s;
}

void ShardBatches::resume(const DataState& saved) {
  resume_stream(origin_, saved, seed_, fingerprint_, [this](int64_t step) { return state(step); });
}

}  // namespace moetrain::data
