#include "model/attention.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scaled_dot_product_attention.h>

#include <cmath>

namespace moetrain::model {

MLAImpl::MLAImpl(const config::ModelConfig& m, Mode mode)
    : heads_(m.num_heads),
      q_lora_rank_(m.q_lora_rank),
      kv_lora_rank_(m.kv_lora_rank),
      nope_(m.qk_nope_head_dim),
      rope_(m.qk_rope_head_dim),
      v_dim_(m.v_head_dim),
      rope_theta_(m.rope_theta),
      mode_(mode) {
  const int64_t d = m.hidden_size, qk = nope_ + rope_;
  if (q_lora_rank_ > 0) {
    wq_a = register_parameter("wq_a", at::empty({q_lora_rank_, d}));
    q_norm = register_module("q_norm", RMSNorm(q_lora_rank_, m.norm_eps));
    wq_b = register_parameter("wq_b", at::empty({heads_ * qk, q_lora_rank_}));
  } else {
    wq = register_parameter("wq", at::empty({heads_ * qk, d}));
  }
  wkv_a = register_parameter("wkv_a", at::empty({kv_lora_rank_ + rope_, d}));
  kv_norm = register_module("kv_norm", RMSNorm(kv_lora_rank_, m.norm_eps));
  wkv_b = register_parameter("wkv_b", at::empty({heads_ * (nope_ + v_dim_), kv_lora_rank_}));
  wo = register_parameter("wo", at::empty({d, heads_ * v_dim_}));
}

at::Tensor MLAImpl::forward(const at::Tensor& x) {
  std::vector<at::Tensor> qkv = project(x);
  return output(core(qkv[0], qkv[1], qkv[2], x.scalar_type()));
}

std::vector<at::Tensor> MLAImpl::project(const at::Tensor& x) {
  const int64_t B = x.size(0), T = x.size(1), H = heads_;
  at::Tensor q = q_lora_rank_ > 0 ? gemm(q_norm(gemm(x, wq_a, mode_)), wq_b, mode_) : gemm(x, wq, mode_);
  q = q.view({B, T, H, nope_ + rope_});
  at::Tensor q_nope = q.narrow(-1, 0, nope_);
  const RopeTables rope =
      rope_tables(T, rope_, rope_theta_, q.options().dtype(at::promote_types(q.scalar_type(), at::kFloat)));
  at::Tensor q_rope = apply_rope(q.narrow(-1, nope_, rope_), rope);

  at::Tensor kv = gemm(x, wkv_a, mode_);
  at::Tensor c_kv = kv.narrow(-1, 0, kv_lora_rank_);
  at::Tensor k_rope = apply_rope(kv.narrow(-1, kv_lora_rank_, rope_).unsqueeze(2), rope);  // one head
  at::Tensor kvb = gemm(kv_norm(c_kv), wkv_b, mode_).view({B, T, H, nope_ + v_dim_});
  at::Tensor k_nope = kvb.narrow(-1, 0, nope_);
  at::Tensor v = kvb.narrow(-1, nope_, v_dim_);

  at::Tensor qf = at::cat({q_nope, q_rope}, -1).transpose(1, 2);                           // [B, H, T, qk]
  at::Tensor kf = at::cat({k_nope, k_rope.expand({B, T, H, rope_})}, -1).transpose(1, 2);  // [B, H, T, qk]
  at::Tensor vf = v.transpose(1, 2);                                                       // [B, H, T, v]
  // In bf16 and fp8 modes attention runs in BF16 (the fused kernels' dtype on GPUs), in FP32 in fp32 mode.
  const auto attn_dtype = mode_ == Mode::kFp32 ? qf.scalar_type() : at::kBFloat16;
  // v padded with zeros to the q/k head dim (as transformers does for flash attention): the fused kernels need
  // equal head dims, without them the CPU takes the math path, which keeps the H·T attention probabilities of every
  // token for the backward pass. A copy either way: attention then keeps v alone, not the k_nope|v projection.
  if (v_dim_ < nope_ + rope_) vf = at::constant_pad_nd(vf, {0, nope_ + rope_ - v_dim_});
  return {qf.to(attn_dtype), kf.to(attn_dtype),
          vf.to(attn_dtype, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous)};
}

at::Tensor MLAImpl::core(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::ScalarType dtype) {
  const int64_t B = q.size(0), T = q.size(2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(nope_ + rope_));
  at::Tensor o = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true,
                                                  scale);
  o = o.narrow(-1, 0, v_dim_).to(dtype);  // the padding's columns are zero
  return o.transpose(1, 2).reshape({B, T, heads_ * v_dim_});
}

at::Tensor MLAImpl::output(const at::Tensor& o) { return gemm(o, wo, mode_); }

}  // namespace moetrain::model
