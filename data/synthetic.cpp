#include "data/synthetic.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <stdexcept>

#include "data/sampler.h"

namespace moetrain::data {
namespace {

// splitmix64: a counter-based generator, so a sequence's randomness depends only on (seed, stream, index).
struct SplitMix {
  uint64_t state;
  uint64_t next() {
    const uint64_t z = mix64(state);  // mix64 adds the increment itself
    state += 0x9E3779B97F4A7C15ull;
    return z;
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
};

int64_t draw(const double* cdf, int64_t n, double u) {
  return std::min<int64_t>(std::upper_bound(cdf, cdf + n, u) - cdf, n - 1);
}

}  // namespace

MarkovSource::MarkovSource(int64_t vocab_size, int64_t branching, uint64_t seed, int64_t order)
    : vocab_size_(vocab_size), branching_(branching), order_(order), states_(1), seed_(seed) {
  if (vocab_size < 2 || branching < 1 || branching > vocab_size)
    throw std::invalid_argument(fmt::format(
        "synthetic corpus: need vocab_size ≥ 2 and 1 ≤ branching ≤ vocab_size, got {} and {}", vocab_size, branching));
  if (order < 1) throw std::invalid_argument(fmt::format("synthetic corpus: order {} (at least 1)", order));
  for (int64_t i = 0; i < order; ++i) {
    if (order > 1 && states_ > kMaxStates / vocab_size)
      throw std::invalid_argument(
          fmt::format("synthetic corpus: order {} over a vocabulary of {} has {}^{} states, "
                      "more than the {} the source tabulates; lower the order or the vocabulary",
                      order, vocab_size, vocab_size, order, kMaxStates));
    states_ *= vocab_size;
  }
  const int64_t S = states_;
  const size_t n = static_cast<size_t>(S * branching);
  next_.resize(n);
  prob_.resize(n);
  cdf_.resize(n);
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(vocab_size));
  std::iota(ids.begin(), ids.end(), 0);
  std::gamma_distribution<double> gamma(1.0, 1.0);  // Dirichlet(1, ..., 1) via normalized Gamma(1) draws
  for (int64_t t = 0; t < S; ++t) {
    // `branching` distinct successors: a partial Fisher-Yates shuffle.
    for (int64_t j = 0; j < branching; ++j) {
      std::uniform_int_distribution<int64_t> pick(j, vocab_size - 1);
      std::swap(ids[j], ids[pick(rng)]);
    }
    double sum = 0;
    for (int64_t j = 0; j < branching; ++j) {
      next_[t * branching + j] = ids[j];
      prob_[t * branching + j] = gamma(rng) + 1e-3;  // keep every successor possible
      sum += prob_[t * branching + j];
    }
    double acc = 0;
    for (int64_t j = 0; j < branching; ++j) {
      prob_[t * branching + j] /= sum;
      acc += prob_[t * branching + j];
      cdf_[t * branching + j] = acc;
    }
  }
  // Stationary distribution by power iteration, starting uniform. A lazy chain (½ stay) converges even when P is
  // periodic and has the same stationary distribution.
  // State t followed by token c is state (t·V + c) mod V^order: the oldest token drops out.
  pi_.assign(static_cast<size_t>(S), 1.0 / static_cast<double>(S));
  std::vector<double> nxt(pi_.size());
  for (int it = 0; it < 100000; ++it) {
    for (size_t i = 0; i < nxt.size(); ++i) nxt[i] = 0.5 * pi_[i];
    for (int64_t t = 0; t < S; ++t)
      for (int64_t j = 0; j < branching; ++j)
        nxt[(t * vocab_size + next_[t * branching + j]) % S] += 0.5 * pi_[t] * prob_[t * branching + j];
    double diff = 0;
    for (size_t i = 0; i < nxt.size(); ++i) diff += std::fabs(nxt[i] - pi_[i]);
    pi_.swap(nxt);
    if (diff < 1e-13) break;
  }
  pi_cdf_.resize(pi_.size());
  std::partial_sum(pi_.begin(), pi_.end(), pi_cdf_.begin());
  for (int64_t t = 0; t < S; ++t) {
    double h = 0;
    for (int64_t j = 0; j < branching; ++j) {
      double p = prob_[t * branching + j];
      h -= p * std::log(p);
    }
    entropy_rate_ += pi_[t] * h;
  }
}

double MarkovSource::entropy_given(int64_t context) const {
  if (context < 0 || context > order_)
    throw std::invalid_argument(fmt::format("synthetic corpus: context {} outside [0, order {}]", context, order_));
  if (context == order_) return entropy_rate_;
  int64_t contexts = 1;  // V^context; a state's last `context` tokens are state mod V^context
  for (int64_t i = 0; i < context; ++i) contexts *= vocab_size_;
  if (contexts > kMaxStates / vocab_size_)
    throw std::invalid_argument(fmt::format("synthetic corpus: {}^{} next-token tables are too many to tabulate",
                                            vocab_size_, context + 1));
  // p(context, next) = Σ over the states ending in `context` of π_s · P_s(next).
  std::vector<double> joint(static_cast<size_t>(contexts * vocab_size_), 0.0);
  for (int64_t t = 0; t < states_; ++t)
    for (int64_t j = 0; j < branching_; ++j)
      joint[static_cast<size_t>((t % contexts) * vocab_size_ + next_[t * branching_ + j])] +=
          pi_[t] * prob_[t * branching_ + j];
  double h = 0;
  for (int64_t c = 0; c < contexts; ++c) {
    const double* row = &joint[static_cast<size_t>(c * vocab_size_)];
    const double mass = std::accumulate(row, row + vocab_size_, 0.0);
    for (int64_t v = 0; v < vocab_size_; ++v)
      if (row[v] > 0) h -= row[v] * std::log(row[v] / mass);
  }
  return h;
}

void MarkovSource::sequence(uint64_t stream, uint64_t index, int64_t length, int32_t* out) const {
  SplitMix rng{seed_ ^ (stream * 0xD1B54A32D192ED03ull) ^ (index * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull)};
  rng.next();
  if (length <= 0) return;
  // The first `order` tokens: a state drawn from π, written oldest first (with order 1, the token itself).
  int64_t state = draw(pi_cdf_.data(), states_, rng.uniform() * pi_cdf_.back());
  for (int64_t i = 0, rest = state, div = states_ / vocab_size_; i < std::min(order_, length); ++i) {
    out[i] = static_cast<int32_t>(rest / div);
    rest %= div;
    div = std::max<int64_t>(div / vocab_size_, 1);
  }
  for (int64_t i = order_; i < length; ++i) {
    const int64_t j =
        draw(&cdf_[state * branching_], branching_, rng.uniform() * cdf_[state * branching_ + branching_ - 1]);
    const int64_t token = next_[state * branching_ + j];
    out[i] = static_cast<int32_t>(token);
    state = (state * vocab_size_ + token) % states_;
  }
}

}  // namespace moetrain::data
