#include "model/router.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/zeros.h>

#include <limits>

#include "model/fused_cpu.h"

namespace moetrain::model {

RouterImpl::RouterImpl(const config::ModelConfig& m)
    : n_experts_(m.n_routed_experts),
      top_k_(m.top_k),
      n_group_(m.n_group),
      topk_group_(m.topk_group),
      scale_(m.routed_scaling_factor) {
  weight = register_parameter("weight", at::empty({n_experts_, m.hidden_size}));
  bias = register_buffer("bias", at::zeros({n_experts_}, at::kFloat));
}

Routing RouterImpl::forward(const at::Tensor& x) {
  const auto dtype = at::promote_types(x.scalar_type(), at::kFloat);  // router math in FP32 (FP64 in tests)
  Routing r;
  // BF16 activations (bf16 / fp8 modes): the gate GEMM in BF16 as on GPUs, so that the backward pass keeps the
  // BF16 input rather than an FP32 copy of it; the scores and all that follows in FP32.
  const bool low = x.scalar_type() == at::kBFloat16;
  r.scores = at::sigmoid(low ? at::linear(x, weight.to(x.scalar_type())).to(dtype) : at::linear(x.to(dtype), weight.to(dtype)));
  {
    at::NoGradGuard no_grad;
    if (fused_cpu::applies({r.scores, bias})) {  // one pass per token (model/fused_cpu.h)
      r.indices = fused_cpu::route_top_k(r.scores, bias, n_group_, topk_group_, top_k_);
    } else {
      at::Tensor biased = r.scores + bias.to(dtype);
      const int64_t N = x.size(0);
      if (n_group_ > 1) {
        const int64_t per_group = n_experts_ / n_group_;
        at::Tensor group_scores = std::get<0>(biased.view({N, n_group_, per_group}).topk(2, -1)).sum(-1);
        at::Tensor kept = std::get<1>(group_scores.topk(topk_group_, -1));
        at::Tensor keep = at::zeros({N, n_group_}, x.options().dtype(at::kBool)).scatter_(1, kept, true);
        biased = biased.masked_fill(
            keep.logical_not().unsqueeze(-1).expand({N, n_group_, per_group}).reshape({N, n_experts_}),
            -std::numeric_limits<double>::infinity());
      }
      r.indices = std::get<1>(biased.topk(top_k_, -1));
    }
  }
  at::Tensor selected = r.scores.gather(1, r.indices);
  r.gates = selected / selected.sum(-1, /*keepdim=*/true) * scale_;
  return r;
}

}  // namespace moetrain::model
