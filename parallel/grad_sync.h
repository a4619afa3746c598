// Gradient reduction after the backward passes of a step, and the global gradient norm, by parameter role
// (model/param_roles.h):
//   - routed-expert parameters: summed over edp (the replicas of the same experts);
//   - everything else: summed over dp;
//   - the shared token embedding: then also summed over the embedding group (first stage and the last stage's
//     copy used by MTP / a tied head), so both copies stay identical.
// Losses are divided by the global token count before backward, so sums are the right reduction. Gradients are
// flattened into buckets of parallel.bucket_size_mb and reduced bucket by bucket. A parameter without a gradient
// (an expert that saw no token here) takes part with zeros.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "model/param_roles.h"
#include "parallel/process_groups.h"

namespace moetrain::parallel {

class GradSync {
 public:
  GradSync(ProcessGroups& groups, std::vector<model::ParamInfo> params, double bucket_mb);

  void reduce();
  // The L2 norm over every unique parameter of the model once (stages, expert shards and replicas accounted for);
  // the same value on every rank.
  double global_norm();
  // The same squared, on the device ([1], double), for a caller that reads it with other values in one copy.
  at::Tensor global_norm_sq();

 private:
  void reduce_buckets(const std::vector<size_t>& which, Communicator* comm);

  ProcessGroups& g_;
  std::vector<model::ParamInfo> params_;
  std::vector<size_t> dense_, expert_, embedding_;
  int64_t bucket_bytes_;
};

// Σ‖g‖² over tensors on a GPU ([1], double on the device): one multi-tensor pass (per-tensor norms in FP32,
// squared and summed in double), instead of a double copy of every gradient. Empty: zero, on the CPU.
at::Tensor squared_norm(const std::vector<at::Tensor>& grads);

}  // namespace moetrain::parallel
