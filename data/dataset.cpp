#include "data/dataset.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace moetrain::data {

PackedStream::PackedStream(std::shared_ptr<const ShardSet> set, std::vector<Run> runs, uint64_t documents,
                           int64_t window, int64_t stride)
    : set_(std::move(set)), runs_(std::move(runs)), documents_(documents), window_(window), stride_(stride) {
  if (window_ < 1 || stride_ < 1 || stride_ > window_)
    throw std::invalid_argument(fmt::format("PackedStream: window {} and stride {}", window_, stride_));
  starts_.reserve(runs_.size() + 1);
  starts_.push_back(0);
  for (const Run& r : runs_) starts_.push_back(starts_.back() + (r.end - r.begin));
  const uint64_t t = starts_.back();
  const auto w = static_cast<uint64_t>(window_);
  windows_ = t >= w ? static_cast<int64_t>((t - w) / static_cast<uint64_t>(stride_) + 1) : 0;
}

void PackedStream::read(int64_t k, int64_t* out) const {
  if (k < 0 || k >= windows_)
    throw std::out_of_range(fmt::format("{}: window {} of {}", set_->prefix(), k, windows_));
  uint64_t pos = static_cast<uint64_t>(k) * static_cast<uint64_t>(stride_);
  auto left = static_cast<uint64_t>(window_);
  size_t r = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), pos) - starts_.begin()) - 1;
  while (left > 0) {
    const Run& run = runs_[r];
    const uint64_t from = run.begin + (pos - starts_[r]);
    const uint64_t n = std::min(left, run.end - from);
    set_->read(run.shard, from, n, out);
    out += n;
    left -= n;
    pos += n;
    ++r;
  }
}

uint64_t Dataset::held_out(uint64_t documents, double valid_fraction) {
  if (valid_fraction <= 0 || documents < 2) return 0;
  const auto n = static_cast<uint64_t>(std::llround(valid_fraction * static_cast<double>(documents)));
  return std::clamp<uint64_t>(n, 1, documents - 1);
}

bool Dataset::is_validation(uint64_t doc, uint64_t documents, uint64_t held_out) {
  using u128 = unsigned __int128;
  return (u128{doc} + 1) * held_out / documents > u128{doc} * held_out / documents;
}

Dataset::Dataset(std::shared_ptr<const ShardSet> set, double valid_fraction, int64_t window, int64_t stride)
    : set_(std::move(set)) {
  using u128 = unsigned __int128;
  const uint64_t docs = set_->documents();
  if (valid_fraction > 0 && docs < 2)
    throw std::runtime_error(fmt::format("{}: {} document: too few to hold out validation documents "
                                         "(data.valid_fraction = {}); build from more documents (e.g. --docs blank "
                                         "or --docs line)",
                                         shard_path(set_->prefix(), 0, "idx"), docs, valid_fraction));
  const uint64_t n = held_out(docs, valid_fraction);
  // The m-th held-out document: the first d with ⌊(d+1)·n/D⌋ = m + 1, i.e. d = ⌈(m+1)·D/n⌉ − 1.
  const auto held = [&](uint64_t m) {
    return static_cast<uint64_t>(((u128{m} + 1) * docs + n - 1) / n) - 1;
  };
  std::vector<PackedStream::Run> train_runs, valid_runs;
  uint64_t m = 0;
  for (size_t s = 0; s < set_->shards().size(); ++s) {
    const auto& shard = set_->shards()[s];
    const uint64_t first = shard.first_document, end = first + shard.header.documents;
    const auto shard_index = static_cast<uint32_t>(s);
    uint64_t a = first;  // the first document of the current training run
    for (; m < n && held(m) < end; ++m) {
      const uint64_t v = held(m);
      if (v > a) train_runs.push_back({shard_index, shard.offsets[a - first], shard.offsets[v - first]});
      valid_runs.push_back({shard_index, shard.offsets[v - first], shard.offsets[v - first + 1]});
      a = v + 1;
    }
    if (a < end) train_runs.push_back({shard_index, shard.offsets[a - first], shard.offsets[end - first]});
  }
  train_ = PackedStream(set_, std::move(train_runs), docs - n, window, stride);
  validation_ = PackedStream(set_, std::move(valid_runs), n, window, stride);
  const std::string idx = shard_path(set_->prefix(), 0, "idx");
  if (train_.windows() == 0)
    throw std::runtime_error(fmt::format(
        "{}: the {} training documents hold {} tokens, fewer than one window of {} tokens (train.seq_len + 1 + "
        "model.mtp_depth): train.seq_len is larger than the data",
        idx, train_.documents(), train_.tokens(), window));
  if (n > 0 && validation_.windows() == 0)
    throw std::runtime_error(fmt::format(
        "{}: the {} validation documents (data.valid_fraction = {}) hold {} tokens, fewer than one window of {} "
        "tokens (train.seq_len + 1 + model.mtp_depth): raise data.valid_fraction or lower train.seq_len",
        idx, n, valid_fraction, validation_.tokens(), window));
}

}  // namespace moetrain::data
