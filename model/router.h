// The DeepSeek-V3 router: sigmoid affinities in FP32, a balancer bias that only selects, group-limited top-k.
//   s = sigmoid(x · e_i);  select top-k of s + b among the experts of the topk_group groups with the largest sum
//   of their two best s + b;  gate = s / Σ_selected s · routed_scaling_factor.
// The bias is a buffer (`router.bias`), changed only by the balancer (model/balancer.h), never by gradients.
#pragma once

#include <torch/nn/module.h>

#include "config/config.h"

namespace moetrain::model {

struct Routing {
  at::Tensor indices;  // [N, top_k] int64 expert ids
  at::Tensor gates;    // [N, top_k] gate values (differentiable through the scores)
  at::Tensor scores;   // [N, n_routed] sigmoid affinities, at least FP32 (for the balance losses)
};

class RouterImpl : public torch::nn::Module {
 public:
  explicit RouterImpl(const config::ModelConfig& m);
  Routing forward(const at::Tensor& x);  // x: [N, d]

  at::Tensor weight;  // [n_routed, d]
  at::Tensor bias;    // [n_routed] FP32 buffer

 private:
  int64_t n_experts_, top_k_, n_group_, topk_group_;
  double scale_;
};
TORCH_MODULE(Router);

}  // namespace moetrain::model
