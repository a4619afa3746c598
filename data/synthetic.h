// The built-in synthetic corpus: a sparse random first-order Markov source over the vocabulary. Every token has
// `branching` possible successors with random probabilities, all drawn from the seed. Its entropy rate is exact:
//
//   H = Σ_i π_i · H(P_i),   H(P_i) = −Σ_j P_ij · ln P_ij   (nats/token)
//
// where π is the stationary distribution of the transition matrix P (computed by power iteration). Sequences start
// in a state drawn from π, so every position of every sequence is distributed as the stationary chain and the best
// possible next-token loss is exactly H. A model trained on it should approach H from above.
#pragma once

#include <cstdint>
#include <vector>

namespace moetrain::data {

class MarkovSource {
 public:
  // vocab_size ≥ 2; branching in [1, vocab_size]. The source (its transition table) depends only on (vocab_size,
  // branching, seed).
  MarkovSource(int64_t vocab_size, int64_t branching, uint64_t seed);

  int64_t vocab_size() const { return vocab_size_; }
  double entropy_rate() const { return entropy_rate_; }      // nats/token
  const std::vector<double>& stationary() const { return pi_; }

  // Sequence number `index` of stream `stream` (e.g. 0 train, 1 validation): `length` tokens, a pure function of
  // (source, stream, index) — the same whatever process or layout asks for it.
  void sequence(uint64_t stream, uint64_t index, int64_t length, int32_t* out) const;

 private:
  int64_t vocab_size_, branching_;
  uint64_t seed_;
  std::vector<int32_t> next_;  // [vocab][branching] successor ids (distinct)
  std::vector<double> prob_;   // [vocab][branching] their probabilities
  std::vector<double> cdf_;    // [vocab][branching] cumulative
  std::vector<double> pi_;     // stationary distribution
  std::vector<double> pi_cdf_;
  double entropy_rate_ = 0;
};

}  // namespace moetrain::data
