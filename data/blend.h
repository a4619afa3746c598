// A weighted blend of several datasets: which dataset each global sample position draws from. Positions come in
// blocks of kBlendBlock; in every block dataset i owns c_i slots (its weight's share of the block, largest
// remainders rounded up, at least one), spread evenly by a smooth weighted round-robin. The p-th position then is
//
//   block b = p / B, slot r = p mod B:  dataset table[r], its draw number b·c_i + (slots of i before r)
//
// — O(1), a pure function of p, so the blend is as resumable and dp-independent as the sampler under it. Each
// dataset cycles through its own epochs (data/sampler.h): a small dataset with a large weight repeats sooner.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moetrain::data {

inline constexpr int64_t kBlendBlock = 4096;

struct BlendEntry {
  std::string prefix;
  double weight = 1.0;
};

// data.path: "PREFIX" or "PREFIX=WEIGHT,PREFIX=WEIGHT,..." (weights > 0, relative; a prefix without "=WEIGHT"
// weighs 1). Throws naming the entry that is wrong.
std::vector<BlendEntry> parse_blend(const std::string& spec);

class Blend {
 public:
  explicit Blend(const std::vector<double>& weights);

  struct Draw {
    size_t dataset = 0;
    int64_t index = 0;  // this is the index-th draw from that dataset
  };
  Draw at(int64_t position) const;
  // Draws of dataset i among positions [0, position).
  int64_t draws_before(size_t dataset, int64_t position) const;

  size_t datasets() const { return slots_.size(); }
  int64_t block() const { return block_; }
  const std::vector<int64_t>& slots() const { return slots_; }  // c_i per block

 private:
  int64_t block_;
  std::vector<int64_t> slots_;
  std::vector<uint32_t> table_;                // slot -> dataset
  std::vector<int64_t> rank_;                  // slot -> its rank among its dataset's slots
  std::vector<std::vector<int64_t>> before_;   // [dataset][r]: its slots among [0, r)
};

}  // namespace moetrain::data
