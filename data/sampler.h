// The sample order. Training reads an endless stream of samples; the sample at global position p (the p-th
// sequence of the run, counted over all steps, dp ranks, micro-batches and rows: BatchShape::first_sequence) is
//
//   epoch e = p / N,  k = p mod N,  sample = π_{seed, stream, e}(k)
//
// with N the samples of the dataset and π a seeded permutation of [0, N). The order thus depends only on the seed
// and the epoch, never on the number of dp ranks: ranks only take disjoint slices of each global batch's
// positions. Every epoch visits every sample exactly once, in a fresh order. Permutations are computed, not
// stored (a Feistel network), so any position is O(1) to look up and nothing grows with the corpus.
#pragma once

#include <cstdint>

namespace moetrain::data {

// A pseudo-random bijection of [0, n) chosen by `key`: a balanced Feistel network on the smallest even number of
// bits covering n, with cycle walking for the values ≥ n (on average fewer than 4 rounds of it).
class Permutation {
 public:
  Permutation(uint64_t n, uint64_t key);
  uint64_t operator()(uint64_t i) const;
  uint64_t size() const { return n_; }

 private:
  static constexpr int kRounds = 6;
  uint64_t n_, key_;
  unsigned half_bits_;
  uint64_t half_mask_;
  uint64_t round_keys_[kRounds];
};

// The order of one dataset's samples over epochs.
class Sampler {
 public:
  // `stream` tells apart datasets of a blend (their orders are independent).
  Sampler(int64_t samples_per_epoch, uint64_t seed, uint64_t stream);
  int64_t samples_per_epoch() const { return n_; }
  int64_t epoch(int64_t draw) const { return draw / n_; }
  // The sample index (in [0, N)) of the draw-th sample of the stream.
  int64_t sample(int64_t draw) const;

 private:
  int64_t n_;
  uint64_t seed_, stream_;
};

// splitmix64 finalizer: the hash the permutations are built from.
uint64_t mix64(uint64_t x);

}  // namespace moetrain::data
