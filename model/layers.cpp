#include "model/layers.h"

#include <ATen/ops/_fused_rms_norm.h>
#include <ATen/ops/_fused_rms_norm_backward.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cross_entropy_loss.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/polar.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/view_as_complex.h>
#include <ATen/ops/view_as_real.h>
#include <torch/autograd.h>

#include "model/fused_cpu.h"

namespace moetrain::model {

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", at::ones({dim}));
}

namespace {

// ATen's fused RMSNorm kernels (one pass forward, one for dx and a reduction for dw) for CUDA tensors of one
// floating dtype; the composite below takes everything else. They compute what the composite does, in FP32 for
// BF16/FP16 inputs, and keep the same two tensors for the backward pass.
bool aten_fused_rms_norm(const at::Tensor& x, const at::Tensor& w) {
  const auto t = x.scalar_type();
  return x.is_cuda() && w.device() == x.device() && w.scalar_type() == t &&
         (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf);
}

// RMSNorm with its backward written out: the pass keeps the input and 1/rms per token, where autograd's graph of
// the composite ops would also keep the FP32 input and the normalized value (two FP32 copies per token).
//   y = x·r, r = (mean(x²) + eps)^-½, out = w ⊙ y;   dx = r·(g⊙w − y·mean(g⊙w⊙y)),  dw = Σ_tokens g⊙y
class RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            double eps) {
    if (fused_cpu::applies({x, w})) {
      auto [out, rstd] = fused_cpu::rms_norm(x, w, eps);
      ctx->save_for_backward({x, w, rstd});
      return out;
    }
    if (aten_fused_rms_norm(x, w)) {
      auto [out, rstd] = at::_fused_rms_norm(x, {x.size(-1)}, w, eps);
      ctx->save_for_backward({x, w, rstd});
      return out;
    }
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
    if (fused_cpu::applies({x, w, grads[0]})) {
      auto [dx, dw] = fused_cpu::rms_norm_backward(grads[0], x, w, rstd);
      return {dx, dw, at::Tensor()};
    }
    if (aten_fused_rms_norm(x, w)) {  // as the forward pass chose: x and w are the ones it saw
      auto [dx, dw] = at::_fused_rms_norm_backward(grads[0], x, {x.size(-1)}, rstd, w,
                                                   {ctx->needs_input_grad(0), ctx->needs_input_grad(1)});
      return {dx, dw, at::Tensor()};
    }
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
  return {at::polar(at::ones_like(angle), angle).view({1, T, 1, half})};
}

at::Tensor apply_rope(const at::Tensor& x, const RopeTables& rope) {
  TORCH_CHECK(x.dim() == 4, "apply_rope expects [B, T, heads, rope_dim], got ", x.sizes());
  // Each pair (2i, 2i+1) as one complex number times e^(i·t·θ_i): one complex multiplication forward and one
  // backward, in the tables' precision, instead of four real ones and a stack each way.
  at::Tensor pairs = x.to(c10::toRealValueType(rope.cis.scalar_type())).unflatten(-1, {x.size(3) / 2, 2});
  bool viewable = pairs.stride(-1) == 1 && pairs.storage_offset() % 2 == 0;
  for (int64_t d = 0; d + 1 < pairs.dim(); ++d) viewable = viewable && pairs.stride(d) % 2 == 0;
  if (!viewable) pairs = pairs.contiguous();
  return at::view_as_real(at::view_as_complex(pairs) * rope.cis).flatten(-2).to(x.scalar_type());
}

namespace {

// h = silu(g) ⊙ u (⊙ gate): keeps g, u and the gate; in the backward pass, with s = sigmoid(g),
//   du = dh'·silu(g),  dg = dh'·u·s·(1 + g·(1 − s)) (silu_backward),  dgate = Σ_j dh_j·silu(g_j)·u_j,  dh' = dh·gate.
// `fused`: `g` holds g and u side by side and gets one gradient of its own shape. (Custom nodes take no undefined
// inputs, so a missing u or gate is an empty placeholder.)
class SwiGLUFunction : public torch::autograd::Function<SwiGLUFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& g_or_gu, const at::Tensor& u_in,
                            const at::Tensor& gate, bool fused, bool gated) {
    ctx->save_for_backward({g_or_gu, u_in, gate});
    ctx->saved_data["fused"] = fused;
    ctx->saved_data["gated"] = gated;
    const auto [g, u] = halves(g_or_gu, u_in, fused);
    if (fused_cpu::applies({g, u, gate}))  // gate: the placeholder when there is none
      return fused_cpu::swiglu(g, u, gated ? gate : at::Tensor());
    at::Tensor h = at::silu(g).mul_(u);
    return gated ? h.mul_(gate.unsqueeze(-1)) : h;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &a = saved[0], &gate = saved[2];
    const bool fused = ctx->saved_data["fused"].toBool(), gated = ctx->saved_data["gated"].toBool();
    const auto [g, u] = halves(a, saved[1], fused);
    at::Tensor da, dg, du, dgate;
    if (fused) {
      da = at::empty_like(a, at::MemoryFormat::Contiguous);
      const int64_t inter = g.size(-1);
      dg = da.narrow(-1, 0, inter);
      du = da.narrow(-1, inter, inter);
    } else {
      dg = at::empty_like(g, at::MemoryFormat::Contiguous);
      du = at::empty_like(u, at::MemoryFormat::Contiguous);
    }
    const at::Tensor dh = grads[0];
    if (fused_cpu::applies({g, u, dh, gate})) {
      dgate = fused_cpu::swiglu_backward(dh, g, u, gated ? gate : at::Tensor(), dg, du);
    } else {
      const at::Tensor silu = at::silu(g);
      at::Tensor dhg = dh;
      if (gated) {
        dgate = (dh * silu * u).sum(-1);
        dhg = dh * gate.unsqueeze(-1);
      }
      at::silu_backward_out(dg, dhg * u, g);
      at::mul_out(du, dhg, silu);
    }
    if (fused) return {da, at::Tensor(), dgate, at::Tensor(), at::Tensor()};
    return {dg, du, dgate, at::Tensor(), at::Tensor()};
  }

 private:
  static std::pair<at::Tensor, at::Tensor> halves(const at::Tensor& a, const at::Tensor& b, bool fused) {
    if (!fused) return {a, b};
    const int64_t inter = a.size(-1) / 2;
    return {a.narrow(-1, 0, inter), a.narrow(-1, inter, inter)};
  }
};

// Cross-entropy summed over tokens in one fused pass each way on FP32 CPU logits (model/fused_cpu.h): it keeps the
// logits and one log-sum-exp per token, where log_softmax would keep the log-probabilities.
struct CrossEntropySum : public torch::autograd::Function<CrossEntropySum> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target) {
    auto [loss, lse] = fused_cpu::cross_entropy_sum(logits, target);
    ctx->save_for_backward({logits, target, lse});
    return loss;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const double scale = grads[0].item<double>();
    return {fused_cpu::cross_entropy_backward(saved[0], saved[1], saved[2], scale), at::Tensor()};
  }
};

at::Tensor or_placeholder(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options().requires_grad(false));
}

}  // namespace

at::Tensor swiglu_activation(const at::Tensor& g, const at::Tensor& u, const at::Tensor& gate) {
  return SwiGLUFunction::apply(g, u, or_placeholder(gate, g), false, gate.defined());
}

at::Tensor swiglu_activation_fused(const at::Tensor& gate_up, const at::Tensor& gate) {
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "swiglu_activation_fused: odd width ", gate_up.size(-1));
  return SwiGLUFunction::apply(gate_up, or_placeholder({}, gate_up), or_placeholder(gate, gate_up), true,
                               gate.defined());
}

at::Tensor cross_entropy_sum(const at::Tensor& logits, const at::Tensor& targets) {
  const at::Tensor flat = logits.reshape({-1, logits.size(-1)}).to(at::promote_types(logits.scalar_type(), at::kFloat));
  if (fused_cpu::applies(flat)) return CrossEntropySum::apply(flat, targets.reshape({-1}));
  return at::cross_entropy_loss(flat, targets.reshape({-1}), /*weight=*/{}, at::Reduction::Sum);
}

SwiGLUImpl::SwiGLUImpl(int64_t dim, int64_t inter_dim, Mode mode) : mode_(mode) {
  w_gate = register_parameter("w_gate", at::empty({inter_dim, dim}));
  w_up = register_parameter("w_up", at::empty({inter_dim, dim}));
  w_down = register_parameter("w_down", at::empty({dim, inter_dim}));
}

at::Tensor SwiGLUImpl::forward(const at::Tensor& x, const at::Tensor& gate) {
  return gemm(swiglu_activation(gemm(x, w_gate, mode_), gemm(x, w_up, mode_), gate), w_down, mode_);
}

}  // namespace moetrain::model
