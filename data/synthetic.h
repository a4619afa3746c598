// The built-in synthetic corpus: a sparse random Markov source of order k over the vocabulary: the next token
// depends on the last k tokens (the state; V^k of them). Every state has `branching` possible next tokens with random
// probabilities, all drawn from the seed. Its entropy rate is exact:
//
//   H = Σ_i π_i · H(P_i),   H(P_i) = −Σ_j P_ij · ln P_ij   (nats/token)
//
// where π is the stationary distribution over the states (computed by power iteration). Sequences start with the k
// tokens of a state drawn from π, so every later position is distributed as the stationary chain and the best
// possible next-token loss there is exactly H. A model trained on it should approach H from above. At order ≥ 2
// the next token is not a function of the current one alone: a model must look back (attention) to reach H.
#pragma once

#include <cstdint>
#include <vector>

namespace moetrain::data {

class MarkovSource {
 public:
  // vocab_size ≥ 2; branching in [1, vocab_size]; order ≥ 1, and vocab_size^order ≤ kMaxStates from order 2. The source (its
  // transition table) depends only on (vocab_size, branching, seed, order); order 1 is the first-order source of
  // earlier releases, unchanged.
  MarkovSource(int64_t vocab_size, int64_t branching, uint64_t seed, int64_t order = 1);
  static constexpr int64_t kMaxStates = int64_t{1} << 24;

  int64_t vocab_size() const { return vocab_size_; }
  int64_t order() const { return order_; }
  double entropy_rate() const { return entropy_rate_; }  // nats/token
  // H(next | the last `context` tokens) in the stationary chain, exactly (context in [0, order]; at `order` it is
  // the entropy rate): the best loss of a model that sees only the last `context` tokens, e.g. one without attention
  // (context 1). Needs alphabet^(context + 1) ≤ kMaxStates.
  double entropy_given(int64_t context) const;
  // Over the states (vocab_size^order; state s holds the tokens of s written in base vocab_size, oldest first).
  const std::vector<double>& stationary() const { return pi_; }

  // Sequence number `index` of stream `stream` (e.g. 0 train, 1 validation): `length` tokens, a pure function of
  // (source, stream, index) — the same whatever process or layout asks for it.
  void sequence(uint64_t stream, uint64_t index, int64_t length, int32_t* out) const;

 private:
  int64_t vocab_size_, branching_, order_, states_;
  uint64_t seed_;
  std::vector<int32_t> next_;  // [states][branching] next token ids (distinct)
  std::vector<double> prob_;   // [states][branching] their probabilities
  std::vector<double> cdf_;    // [states][branching] cumulative
  std::vector<double> pi_;     // stationary distribution
  std::vector<double> pi_cdf_;
  double entropy_rate_ = 0;
};

}  // namespace moetrain::data
