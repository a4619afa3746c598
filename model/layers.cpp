#include "model/layers.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/stack.h>

namespace moetrain::model {

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", at::ones({dim}));
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  // Normalized in at least FP32 whatever the activation dtype.
  auto dtype = at::promote_types(x.scalar_type(), at::kFloat);
  at::Tensor xf = x.to(dtype);
  at::Tensor y = xf * (xf.pow(2).mean(-1, /*keepdim=*/true) + eps_).rsqrt();
  return (y * weight.to(dtype)).to(x.scalar_type());
}

RopeTables rope_tables(int64_t T, int64_t rope_dim, double theta, const at::TensorOptions& opts) {
  const int64_t half = rope_dim / 2;
  at::Tensor inv_freq = at::pow(theta, at::arange(0, half, opts) * (-2.0 / static_cast<double>(2 * half)));
  at::Tensor angle = at::arange(0, T, opts).unsqueeze(1) * inv_freq.unsqueeze(0);  // [T, half]
  return {angle.cos().view({1, T, 1, half}), angle.sin().view({1, T, 1, half})};
}

at::Tensor apply_rope(const at::Tensor& x, const RopeTables& rope) {
  TORCH_CHECK(x.dim() == 4, "apply_rope expects [B, T, heads, rope_dim], got ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), half = x.size(3) / 2;
  at::Tensor xp = x.to(rope.cos.scalar_type()).reshape({B, T, H, half, 2});
  at::Tensor x0 = xp.select(-1, 0), x1 = xp.select(-1, 1);
  return at::stack({x0 * rope.cos - x1 * rope.sin, x0 * rope.sin + x1 * rope.cos}, -1).flatten(-2).to(x.scalar_type());
}

SwiGLUImpl::SwiGLUImpl(int64_t dim, int64_t inter_dim, Mode mode) : mode_(mode) {
  w_gate = register_parameter("w_gate", at::empty({inter_dim, dim}));
  w_up = register_parameter("w_up", at::empty({inter_dim, dim}));
  w_down = register_parameter("w_down", at::empty({dim, inter_dim}));
}

at::Tensor SwiGLUImpl::forward(const at::Tensor& x) {
  return gemm(at::silu(gemm(x, w_gate, mode_)) * gemm(x, w_up, mode_), w_down, mode_);
}

}  // namespace moetrain::model
