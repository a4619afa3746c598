// Small building blocks of the DeepSeek-V3 block: RMSNorm, interleaved RoPE and the SwiGLU MLP. Weights are
// registered as plain parameters named like the released checkpoints (`w_gate`, `weight`), so a parameter's
// global name reads `layers.3.mlp.w_gate`.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <cstdint>

#include "precision/gemm.h"

namespace moetrain::model {

using precision::Mode;

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

// Rotary embedding on the last dimension, rotating adjacent pairs (2i, 2i+1) as complex numbers (DeepSeek's
// released code; Hugging Face calls it rope_interleave). x: [B, T, heads, rope_dim]; positions 0..T-1. The tables
// depend only on T and the dtype: one set serves q and k.
struct RopeTables {
  at::Tensor cis;  // [1, T, 1, rope_dim / 2], complex: e^(i·t·θ_j), the rotation of pair j at position t
};
RopeTables rope_tables(int64_t T, int64_t rope_dim, double theta, const at::TensorOptions& opts);
at::Tensor apply_rope(const at::Tensor& x, const RopeTables& rope);

// silu(g) ⊙ u, times a routed expert's gate per token where `gate` ([n]) is given. One autograd node that keeps
// only g, u (and the gate) for the backward pass and computes silu(g) again there (as selective recomputation
// would): two activations per token instead of four.
at::Tensor swiglu_activation(const at::Tensor& g, const at::Tensor& u, const at::Tensor& gate = {});
// The same on one tensor holding g and u side by side ([n, 2·inter]: the grouped expert GEMM's fused gate and up
// projections); its gradient is one tensor of that shape again, written without zero-filled slices.
at::Tensor swiglu_activation_fused(const at::Tensor& gate_up, const at::Tensor& gate = {});

// Σ over tokens of the cross-entropy of logits [..., V] against targets [...] (int64), in at least FP32; FP32 on the
// CPU in one fused pass each way that keeps the logits and a log-sum-exp per token (model/fused_cpu.h).
at::Tensor cross_entropy_sum(const at::Tensor& logits, const at::Tensor& targets);

// SwiGLU: w_down · (silu(w_gate · x) ⊙ (w_up · x)). Used by the dense layers and, with the MoE's inter dim, by
// the shared experts and each routed expert.
class SwiGLUImpl : public torch::nn::Module {
 public:
  SwiGLUImpl(int64_t dim, int64_t inter_dim, Mode mode);
  // gate ([n], optional): a routed expert's gate per token, applied to the down projection's input (the same
  // as scaling the output, w_down being linear), so the combine keeps no expert output for the gate's gradient.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& gate = {});
  at::Tensor w_gate, w_up, w_down;

 private:
  Mode mode_;
};
TORCH_MODULE(SwiGLU);

// y = x · Wᵀ for the model's linear layers (no bias: DeepSeek-V3's have none), in the GEMM precision `mode`.
using precision::gemm;

}  // namespace moetrain::model
