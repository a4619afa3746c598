#include "data/blend.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

namespace moetrain::data {
namespace {

std::string trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t"), b = s.find_last_not_of(" \t");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

}  // namespace

std::vector<BlendEntry> parse_blend(const std::string& spec) {
  std::vector<BlendEntry> out;
  size_t start = 0;
  while (start <= spec.size()) {
    size_t comma = spec.find(',', start);
    if (comma == std::string::npos) comma = spec.size();
    const std::string item = trim(spec.substr(start, comma - start));
    start = comma + 1;
    if (item.empty())
      throw std::runtime_error(fmt::format("data.path = '{}': an empty entry (expected PREFIX or "
                                           "PREFIX=WEIGHT,PREFIX=WEIGHT,...)",
                                           spec));
    BlendEntry e;
    const size_t eq = item.rfind('=');
    if (eq == std::string::npos) {
      e.prefix = item;
    } else {
      e.prefix = trim(item.substr(0, eq));
      const std::string w = trim(item.substr(eq + 1));
      size_t used = 0;
      try {
        e.weight = std::stod(w, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != w.size() || w.empty() || !std::isfinite(e.weight) || e.weight <= 0)
        throw std::runtime_error(fmt::format("data.path entry '{}': the weight '{}' is not a positive number", item, w));
      if (e.prefix.empty()) throw std::runtime_error(fmt::format("data.path entry '{}': no shard prefix", item));
    }
    out.push_back(std::move(e));
  }
  return out;
}

Blend::Blend(const std::vector<double>& weights) {
  if (weights.empty()) throw std::invalid_argument("Blend: no datasets");
  const size_t k = weights.size();
  if (weights.size() == 1) {
    block_ = 1;
    slots_ = {1};
  } else {
    if (static_cast<int64_t>(k) > kBlendBlock / 16)
      throw std::runtime_error(fmt::format("data.path: a blend of {} datasets; at most {} are supported", k,
                                           kBlendBlock / 16));
    block_ = kBlendBlock;
    const double total = std::accumulate(weights.begin(), weights.end(), 0.0);
    // Largest remainders, every dataset at least one slot.
    std::vector<double> exact(k);
    int64_t used = 0;
    slots_.resize(k);
    for (size_t i = 0; i < k; ++i) {
      exact[i] = weights[i] / total * static_cast<double>(block_);
      slots_[i] = std::max<int64_t>(1, static_cast<int64_t>(std::floor(exact[i])));
      used += slots_[i];
    }
    std::vector<size_t> order(k);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      return exact[a] - static_cast<double>(slots_[a]) > exact[b] - static_cast<double>(slots_[b]);
    });
    for (size_t j = 0; used < block_; j = (j + 1) % k, ++used) ++slots_[order[j]];
    for (size_t j = 0; used > block_; j = (j + 1) % k)  // only when the minimum of one slot overshot
      if (slots_[order[k - 1 - j]] > 1) --slots_[order[k - 1 - j]], --used;
  }
  // Smooth weighted round-robin: each slot goes to the dataset furthest behind its share.
  table_.resize(static_cast<size_t>(block_));
  rank_.resize(static_cast<size_t>(block_));
  before_.assign(k, std::vector<int64_t>(static_cast<size_t>(block_) + 1, 0));
  std::vector<int64_t> current(k, 0), taken(k, 0);
  for (int64_t r = 0; r < block_; ++r) {
    size_t best = 0;
    for (size_t i = 0; i < k; ++i) {
      current[i] += slots_[i];
      if (current[i] > current[best]) best = i;
    }
    current[best] -= block_;
    table_[static_cast<size_t>(r)] = static_cast<uint32_t>(best);
    rank_[static_cast<size_t>(r)] = taken[best]++;
    for (size_t i = 0; i < k; ++i) before_[i][static_cast<size_t>(r) + 1] = taken[i];
  }
}

Blend::Draw Blend::at(int64_t position) const {
  if (position < 0) throw std::out_of_range(fmt::format("Blend: negative position {}", position));
  const int64_t b = position / block_;
  const auto r = static_cast<size_t>(position % block_);
  const size_t i = table_[r];
  return {i, b * slots_[i] + rank_[r]};
}

int64_t Blend::draws_before(size_t dataset, int64_t position) const {
  const int64_t b = position / block_;
  const auto r = static_cast<size_t>(position % block_);
  return b * slots_[dataset] + before_[dataset][r];
}

}  // namespace moetrain::data
