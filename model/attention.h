// Multi-head Latent Attention (DeepSeek-V2/V3): a low-rank query, a compressed KV latent c_kv with its own norm,
// a decoupled rotary key shared by all heads, causal attention (causal_attention below).
//   q = W_qb · RMSNorm(W_qa · x)            (or W_q · x when q_lora_rank = 0)
//   [c_kv, k_rope] = W_kva · x;  [k_nope, v] = W_kvb · RMSNorm(c_kv)
//   softmax scale 1/sqrt(qk_nope_head_dim + qk_rope_head_dim)
#pragma once

#include <torch/nn/module.h>

#include <cmath>
#include <vector>

#include "config/config.h"
#include "model/layers.h"

namespace moetrain::model {

// Inference: the compressed latents of the tokens seen so far, DeepSeek-V3's MLA cache: kv_norm(c_kv)
// [B, L, kv_lora_rank] and the rotated shared key [B, L, qk_rope_head_dim] per token and layer.
struct LatentCache {
  at::Tensor c_kv, k_pe;
  int64_t length() const { return c_kv.defined() ? c_kv.size(1) : 0; }
  void truncate(int64_t n) {  // keep the first n positions (a rejected speculative token's are dropped)
    c_kv = c_kv.narrow(1, 0, n);
    k_pe = k_pe.narrow(1, 0, n);
  }
};

// Causal attention of q, k [B, H, T, D] and v [B, H, T, Dv] -> [B, H, T, Dv]: on FP32 CPU tensors the fused kernel
// (model/fused_cpu.h: v of any width, the probabilities computed again in the backward pass), else ATen's
// scaled-dot-product attention (some of its fused kernels want v padded to D: attention_v_width).
at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);
// Whether causal_attention takes the fused CPU kernel for operands of this dtype and device (then v needs no padding).
bool fused_causal_attention(at::ScalarType dtype, const at::Device& device);
// The head width MLA gives v in causal_attention for [B, T, H, ·] operands (transposed to [B, H, T, ·]) of this
// dtype and device that do or do not require grad: v's own (dv) where the kernel that runs takes it as it is, else
// D with zero columns. v as it is: the fused CPU kernel; elsewhere, when the kernel ATen's dispatcher
// (_fused_sdp_choice) picks for v as it is is the one it picks for v padded too (cuDNN's and the memory-efficient
// kernel take a narrower v; flash attention wants equal head dims, and ATen prefers it to the memory-efficient
// kernel). Padded where v as it is would take the math path, which keeps the H·T probabilities of every query, or
// no kernel at all. Asked once per shape and state of ATen's attention switches.
int64_t attention_v_width(int64_t batch, int64_t seq, int64_t heads, int64_t qk_dim, int64_t v_dim,
                          at::ScalarType dtype, const at::Device& device, bool requires_grad);

class MLAImpl : public torch::nn::Module {
 public:
  MLAImpl(const config::ModelConfig& m, Mode mode = Mode::kFp32);
  at::Tensor forward(const at::Tensor& x);  // [B, T, d] -> [B, T, d]: output(core(project(x)))

  // The parts of forward, apart so that selective recomputation can run all but the output projection again in the
  // backward pass (the latents' norms, the q and kv up-projections, RoPE and the attention core) and keep only the
  // block input and the output projection's input:
  // project: x -> {q, k, v} [B, H, T, ·] in the attention dtype (BF16 in the bf16 and fp8 modes, else x's);
  // core: causal attention -> [B, T, H·v_head_dim] in `dtype`;
  // output: the output projection -> [B, T, d].
  std::vector<at::Tensor> project(const at::Tensor& x);
  at::Tensor core(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::ScalarType dtype);
  at::Tensor output(const at::Tensor& o);
  // The queries [B, T, heads · (nope + rope)] (through the low-rank path when q_lora_rank > 0).
  at::Tensor query(const at::Tensor& x);
  double softmax_scale() const { return 1.0 / std::sqrt(static_cast<double>(nope_ + rope_)); }
  // Inference on the next T tokens ([B, T, d], positions cache.length() .. + T − 1): appends their latents to the
  // cache and attends over all of it (keys and values up-projected from the cached latents).
  at::Tensor forward_cached(const at::Tensor& x, LatentCache& cache);

  at::Tensor wq_a, wq_b, wq, wkv_a, wkv_b, wo;
  RMSNorm q_norm{nullptr}, kv_norm{nullptr};

 private:
  int64_t heads_, q_lora_rank_, kv_lora_rank_, nope_, rope_, v_dim_;
  double rope_theta_;
  Mode mode_;
};
TORCH_MODULE(MLA);

}  // namespace moetrain::model
