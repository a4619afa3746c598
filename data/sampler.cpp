#include "data/sampler.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <stdexcept>

namespace moetrain::data {

uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

Permutation::Permutation(uint64_t n, uint64_t key) : n_(n), key_(key) {
  if (n == 0) throw std::invalid_argument("Permutation of an empty range");
  const unsigned bits = n <= 1 ? 0 : static_cast<unsigned>(std::bit_width(n - 1));  // values 0..n-1
  half_bits_ = std::max(1u, (bits + 1) / 2);
  half_mask_ = (uint64_t{1} << half_bits_) - 1;
  for (int r = 0; r < kRounds; ++r) round_keys_[r] = mix64(key_ + static_cast<uint64_t>(r));
}

uint64_t Permutation::operator()(uint64_t i) const {
  if (i >= n_) throw std::out_of_range(fmt::format("Permutation: {} is outside [0, {})", i, n_));
  if (n_ == 1) return 0;
  // Walk the cycle of the Feistel bijection on [0, 4^half) until it lands back in [0, n): a bijection of [0, n).
  uint64_t x = i;
  do {
    uint64_t left = x >> half_bits_, right = x & half_mask_;
    for (int r = 0; r < kRounds; ++r) {
      const uint64_t f = mix64(right ^ round_keys_[r]) & half_mask_;
      const uint64_t next = left ^ f;
      left = right;
      right = next;
    }
    x = (left << half_bits_) | right;
  } while (x >= n_);
  return x;
}

Sampler::Sampler(int64_t samples_per_epoch, uint64_t seed, uint64_t stream)
    : n_(samples_per_epoch), seed_(seed), stream_(stream) {
  if (n_ <= 0) throw std::invalid_argument("Sampler: a dataset without samples");
}

int64_t Sampler::sample(int64_t draw) const {
  if (draw < 0) throw std::out_of_range(fmt::format("Sampler: negative position {}", draw));
  const uint64_t e = static_cast<uint64_t>(draw / n_);
  const uint64_t key = mix64(mix64(seed_ ^ 0x5EED5EED5EED5EEDull) ^ mix64(stream_ + 0x51AB) ^ (e * 0xA24BAED4963EE407ull));
  return static_cast<int64_t>(Permutation(static_cast<uint64_t>(n_), key)(static_cast<uint64_t>(draw % n_)));
}

}  // namespace moetrain::data
