#include "model/layers.h"

#include <torch/autograd.h>

#include <ATen/ops/arange.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/stack.h>

#include "model/recompute.h"

namespace moetrain::model {

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", at::ones({dim}));
}

namespace {

// RMSNorm with its backward written out: the pass keeps the input and 1/rms per token, where autograd's graph of
// the composite ops would also keep the FP32 input and the normalized value (two FP32 copies per token).
//   y = x·r, r = (mean(x²) + eps)^-½, out = w ⊙ y;   dx = r·(g⊙w − y·mean(g⊙w⊙y)),  dw = Σ_tokens g⊙y
class RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            double eps) {
    // Normalized in at least FP32 whatever the activation dtype.
    const auto dtype = at::promote_types(x.scalar_type(), at::kFloat);
    const at::Tensor xf = x.to(dtype);
    at::Tensor rstd = (xf.pow(2).mean(-1, /*keepdim=*/true) + eps).rsqrt();
    ctx->save_for_backward({x, w, rstd});
    return (xf * rstd * w.to(dtype)).to(x.scalar_type());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &rstd = saved[2];
    const auto dtype = rstd.scalar_type();
    const at::Tensor y = x.to(dtype) * rstd;
    const at::Tensor g = grads[0].to(dtype);
    const at::Tensor gw = g * w.to(dtype);
    const at::Tensor dx = rstd * (gw - y * (gw * y).mean(-1, /*keepdim=*/true));
    const at::Tensor dw = (g * y).reshape({-1, w.size(0)}).sum(0).to(w.scalar_type());
    return {dx.to(x.scalar_type()), dw, at::Tensor()};
  }
};

}  // namespace

at::Tensor RMSNormImpl::forward(const at::Tensor& x) { return RmsNormFunction::apply(x, weight, eps_); }

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

at::Tensor swiglu_activation(const at::Tensor& g, const at::Tensor& u, bool recompute, const at::Tensor& gate) {
  auto activation = [](const std::vector<at::Tensor>& in) {
    at::Tensor h = at::silu(in[0]) * in[1];
    return std::vector<at::Tensor>{in.size() > 2 ? h * in[2].unsqueeze(-1) : h};
  };
  std::vector<at::Tensor> in{g, u};
  if (gate.defined()) in.push_back(gate);
  return recompute ? model::recompute(activation, in)[0] : activation(in)[0];
}

SwiGLUImpl::SwiGLUImpl(int64_t dim, int64_t inter_dim, Mode mode, bool recompute_activation)
    : mode_(mode), recompute_activation_(recompute_activation) {
  w_gate = register_parameter("w_gate", at::empty({inter_dim, dim}));
  w_up = register_parameter("w_up", at::empty({inter_dim, dim}));
  w_down = register_parameter("w_down", at::empty({dim, inter_dim}));
}

at::Tensor SwiGLUImpl::forward(const at::Tensor& x, const at::Tensor& gate) {
  return gemm(swiglu_activation(gemm(x, w_gate, mode_), gemm(x, w_up, mode_), recompute_activation_, gate), w_down,
              mode_);
}

}  // namespace moetrain::model
