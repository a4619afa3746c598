// The parallel layout as arithmetic: world = pp × dp, dp = ep × edp, rank order ep (fastest) → edp → pp, so that
// rank = pp_rank·dp + edp_rank·ep + ep_rank. Which ranks form each group, and which layers each pipeline stage
// owns. Pure functions of the layout: the communicators (parallel/process_groups.h) are built from them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "config/config.h"

namespace moetrain::parallel {

struct Layout {
  int64_t pp = 1, dp = 1, ep = 1;
  // DualPipeV folds the pipeline into a V: the model's last virtual stage (final norm, head, MTP) is on pipeline
  // rank 0, with its first; else it is on rank pp − 1.
  bool head_on_first = false;

  int64_t edp() const { return dp / ep; }
  int64_t world() const { return pp * dp; }
  static Layout from(const config::ParallelConfig& p);  // p must be validated (dp resolved)
};

struct Coords {
  int64_t pp = 0;   // pipeline stage
  int64_t dp = 0;   // data-parallel index within the stage: edp·ep + ep
  int64_t edp = 0;  // expert-data-parallel index
  int64_t ep = 0;   // expert-parallel index
};

enum class GroupKind { kPipeline, kData, kExpert, kExpertData, kEmbedding };
const char* group_name(GroupKind kind);  // "pp", "dp", "ep", "edp", "embedding"

class Topology {
 public:
  explicit Topology(Layout layout);

  const Layout& layout() const { return layout_; }
  Coords coords(int64_t rank) const;
  int64_t rank(int64_t pp, int64_t edp, int64_t ep) const;

  // The ranks of `rank`'s group of that kind, in group order (a rank's index in it is its rank in the group).
  // The embedding group is the first and last stage of rank's dp slice (one rank when both are pipeline rank 0);
  // empty for a middle stage's rank.
  std::vector<int64_t> group(GroupKind kind, int64_t rank) const;

  bool first_stage(int64_t rank) const { return coords(rank).pp == 0; }
  bool last_stage(int64_t rank) const { return coords(rank).pp == last_pp(); }
  int64_t last_pp() const { return layout_.head_on_first ? 0 : layout_.pp - 1; }  // the pipeline rank with the head

 private:
  Layout layout_;
};

// Layers per pipeline stage: the explicit list if given, else an even split where the first num_layers % pp
// stages take one layer more (the last stage also carries the output head and the MTP modules).
std::vector<int64_t> stage_layer_counts(int64_t num_layers, int64_t pp, const std::vector<int64_t>& explicit_counts);
// The global index of the first layer of each stage.
std::vector<int64_t> stage_first_layers(const std::vector<int64_t>& counts);

}  // namespace moetrain::parallel
