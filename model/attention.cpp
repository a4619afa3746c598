#include "model/attention.h"

#include <ATen/SDPBackend.h>
#include <ATen/ops/_fused_sdp_choice.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <torch/autograd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <mutex>

#include "model/fused_cpu.h"

namespace moetrain::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The attention operands, [B, H, T, ·] views of [B, T, H, ·] tensors in the attention dtype, from the projections:
//   q [B, T, H, nope + rope]                  -> [q_nope, RoPE(q_rope)]
//   kvb [B, T, H, nope + v], k_pe [B, T, rope] -> k = [k_nope, RoPE(k_pe) for every head], v padded with zeros to
//                                                `v_width` (the q/k head dim when v is narrower)
// v is padded where the attention kernel needs equal head dims (attention_v_width; transformers pads it for flash
// attention too): without them ATen would take the math path, which keeps the H·T attention probabilities of every
// token for the backward pass. One node whose backward writes the
// projections' gradients directly, where autograd's concatenations and slices would zero-fill a tensor per slice; it
// keeps only the RoPE table.
// dst = RoPE(src) (the inverse rotation with `inverse`), src with one head or as many as dst.
void rotate_into(at::Tensor dst, const at::Tensor& src, const at::Tensor& cis, bool inverse) {
  if (fused_cpu::applies({dst, src}) && cis.scalar_type() == at::kComplexFloat)
    return fused_cpu::rope_into(dst, src, cis, inverse);
  dst.copy_(apply_rope(src, {inverse ? cis.conj() : cis}).expand(dst.sizes()));
}

struct AttentionOperands : public torch::autograd::Function<AttentionOperands> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& kvb, const at::Tensor& k_pe,
                               const at::Tensor& cis, int64_t nope, int64_t v_dim, int64_t v_width, int64_t dtype) {
    const int64_t B = q.size(0), T = q.size(1), H = q.size(2), rope = q.size(3) - nope;
    const auto opts = q.options().dtype(static_cast<at::ScalarType>(dtype));
    at::Tensor qt = at::empty({B, T, H, nope + rope}, opts), kt = at::empty({B, T, H, nope + rope}, opts),
               vt = at::empty({B, T, H, v_width}, opts);
    qt.narrow(-1, 0, nope).copy_(q.narrow(-1, 0, nope));
    rotate_into(qt.narrow(-1, nope, rope), q.narrow(-1, nope, rope), cis, false);
    kt.narrow(-1, 0, nope).copy_(kvb.narrow(-1, 0, nope));
    rotate_into(kt.narrow(-1, nope, rope), k_pe.unsqueeze(2), cis, false);
    vt.narrow(-1, 0, v_dim).copy_(kvb.narrow(-1, nope, v_dim));
    if (v_width > v_dim) vt.narrow(-1, v_dim, v_width - v_dim).zero_();
    ctx->save_for_backward({cis});
    ctx->saved_data["dims"] = std::vector<int64_t>{nope, v_dim};
    ctx->saved_data["dtypes"] = std::vector<int64_t>{static_cast<int64_t>(q.scalar_type()),
                                                     static_cast<int64_t>(kvb.scalar_type()),
                                                     static_cast<int64_t>(k_pe.scalar_type())};
    return {qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor cis = ctx->get_saved_variables()[0];
    const std::vector<int64_t> dims = ctx->saved_data["dims"].toIntVector();
    const std::vector<int64_t> dtypes = ctx->saved_data["dtypes"].toIntVector();
    const int64_t nope = dims[0], v_dim = dims[1];
    const at::Tensor dq_t = grads[0].transpose(1, 2), dk_t = grads[1].transpose(1, 2), dv_t = grads[2].transpose(1, 2);
    const int64_t B = dq_t.size(0), T = dq_t.size(1), H = dq_t.size(2), rope = dq_t.size(3) - nope;
    at::Tensor dq = at::empty({B, T, H, nope + rope}, dq_t.options().dtype(static_cast<at::ScalarType>(dtypes[0])));
    dq.narrow(-1, 0, nope).copy_(dq_t.narrow(-1, 0, nope));
    rotate_into(dq.narrow(-1, nope, rope), dq_t.narrow(-1, nope, rope), cis, true);
    at::Tensor dkvb = at::empty({B, T, H, nope + v_dim}, dq.options().dtype(static_cast<at::ScalarType>(dtypes[1])));
    dkvb.narrow(-1, 0, nope).copy_(dk_t.narrow(-1, 0, nope));
    dkvb.narrow(-1, nope, v_dim).copy_(dv_t.narrow(-1, 0, v_dim));
    // The shared rotary key's gradient: summed over the heads (in at least FP32), then rotated back.
    const auto k_pe_dtype = static_cast<at::ScalarType>(dtypes[2]);
    const at::Tensor dk_rope =
        dk_t.narrow(-1, nope, rope).sum(2, /*keepdim=*/true, at::promote_types(k_pe_dtype, at::kFloat));
    at::Tensor dk_pe = at::empty_like(dk_rope);
    rotate_into(dk_pe, dk_rope, cis, true);
    dk_pe = dk_pe.squeeze(2).to(k_pe_dtype);
    return {dq, dkvb, dk_pe, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The fused CPU kernel's autograd node: keeps q, k, v, the output and the log-sum-exp per query.
struct FusedCausalAttention : public torch::autograd::Function<FusedCausalAttention> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            double scale) {
    auto [o, lse] = fused_cpu::causal_attention(q, k, v, scale);
    ctx->save_for_backward({q, k, v, o, lse});
    ctx->saved_data["scale"] = scale;
    return o;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const double scale = ctx->saved_data["scale"].toDouble();
    auto [dq, dk, dv] = fused_cpu::causal_attention_backward(grads[0], s[0], s[1], s[2], s[3], s[4], scale);
    return {dq, dk, dv, at::Tensor()};
  }
};

}  // namespace

bool fused_causal_attention(at::ScalarType dtype, const at::Device& device) {
  return dtype == at::kFloat && device.is_cpu();
}

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  if (fused_causal_attention(q.scalar_type(), q.device())) return FusedCausalAttention::apply(q, k, v, scale);
  return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true, scale);
}

int64_t attention_v_width(int64_t batch, int64_t seq, int64_t heads, int64_t qk_dim, int64_t v_dim,
                          at::ScalarType dtype, const at::Device& device, bool requires_grad) {
  if (v_dim >= qk_dim || fused_causal_attention(dtype, device)) return v_dim;
  const auto& ctx = at::globalContext();
  // The dispatcher's inputs: the operands' shape, dtype, device and requires_grad, and ATen's switches.
  using Key = std::array<int64_t, 14>;
  const Key key{batch, seq, heads, qk_dim, v_dim, static_cast<int64_t>(dtype),
                static_cast<int64_t>(device.type()), device.index(), requires_grad,
                ctx.userEnabledFlashSDP(), ctx.userEnabledMemEfficientSDP(), ctx.userEnabledMathSDP(),
                ctx.userEnabledCuDNNSDP(), ctx.deterministicAlgorithms()};
  static std::mutex mutex;
  static std::map<Key, int64_t> widths;
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = widths.find(key); it != widths.end()) return it->second;
  // Views of one allocation with the real operands' sizes and strides ([B, H, T, d] of [B, T, H, d]); nothing is
  // read or written.
  const at::Tensor storage = at::empty({batch * seq * heads * qk_dim}, at::TensorOptions().dtype(dtype).device(device))
                                 .requires_grad_(requires_grad);
  const auto operand = [&](int64_t d) {
    return storage.as_strided({batch, heads, seq, d}, {seq * heads * d, d, heads * d, 1});
  };
  const at::Tensor q = operand(qk_dim), k = operand(qk_dim);
  const auto choice = [&](int64_t d) -> int64_t {
    try {
      return at::_fused_sdp_choice(q, k, operand(d), {}, 0.0, /*is_causal=*/true);
    } catch (const c10::Error&) {  // no kernel at all for these operands
      return static_cast<int64_t>(at::SDPBackend::error);
    }
  };
  const int64_t as_is = choice(v_dim), padded = choice(qk_dim);
  const bool takes_v = as_is == padded && as_is != static_cast<int64_t>(at::SDPBackend::math) &&
                       as_is != static_cast<int64_t>(at::SDPBackend::error);
  return widths[key] = takes_v ? v_dim : qk_dim;
}

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
  at::Tensor q = query(x);
  const RopeTables rope =
      rope_tables(T, rope_, rope_theta_, q.options().dtype(at::promote_types(q.scalar_type(), at::kFloat)));
  at::Tensor kv = gemm(x, wkv_a, mode_);
  at::Tensor kvb = gemm(kv_norm(kv.narrow(-1, 0, kv_lora_rank_)), wkv_b, mode_).view({B, T, H, nope_ + v_dim_});
  // In bf16 and fp8 modes attention runs in BF16 (the fused kernels' dtype on GPUs), in FP32 in fp32 mode.
  const auto attn_dtype = mode_ == Mode::kFp32 ? q.scalar_type() : at::kBFloat16;
  const bool grad = at::GradMode::is_enabled() && (q.requires_grad() || kv.requires_grad());
  const int64_t v_width = attention_v_width(B, T, H, nope_ + rope_, v_dim_, attn_dtype, x.device(), grad);
  auto qkv = AttentionOperands::apply(q.view({B, T, H, nope_ + rope_}), kvb, kv.narrow(-1, kv_lora_rank_, rope_),
                                      rope.cis, nope_, v_dim_, v_width, static_cast<int64_t>(attn_dtype));
  return {qkv[0], qkv[1], qkv[2]};
}

at::Tensor MLAImpl::core(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::ScalarType dtype) {
  const int64_t B = q.size(0), T = q.size(2);
  at::Tensor o = causal_attention(q, k, v, softmax_scale());
  o = o.narrow(-1, 0, v_dim_).to(dtype);  // a padding's columns are zero
  return o.transpose(1, 2).reshape({B, T, heads_ * v_dim_});
}

at::Tensor MLAImpl::output(const at::Tensor& o) { return gemm(o, wo, mode_); }

at::Tensor MLAImpl::query(const at::Tensor& x) {
  return q_lora_rank_ > 0 ? gemm(q_norm(gemm(x, wq_a, mode_)), wq_b, mode_) : gemm(x, wq, mode_);
}

at::Tensor MLAImpl::forward_cached(const at::Tensor& x, LatentCache& cache) {
  const int64_t B = x.size(0), T = x.size(1), H = heads_, pos = cache.length();
  at::Tensor q = query(x).view({B, T, H, nope_ + rope_});
  RopeTables rope =
      rope_tables(pos + T, rope_, rope_theta_, q.options().dtype(at::promote_types(q.scalar_type(), at::kFloat)));
  rope.cis = rope.cis.narrow(1, pos, T);  // the new tokens' positions
  at::Tensor kv = gemm(x, wkv_a, mode_);
  at::Tensor c_kv = kv_norm(kv.narrow(-1, 0, kv_lora_rank_));
  at::Tensor k_pe = apply_rope(kv.narrow(-1, kv_lora_rank_, rope_).unsqueeze(2), rope).squeeze(2);
  cache.c_kv = cache.c_kv.defined() ? at::cat({cache.c_kv, c_kv}, 1) : c_kv;
  cache.k_pe = cache.k_pe.defined() ? at::cat({cache.k_pe, k_pe}, 1) : k_pe;
  const int64_t L = cache.length();
  at::Tensor kvb = gemm(cache.c_kv, wkv_b, mode_).view({B, L, H, nope_ + v_dim_});
  at::Tensor qf = at::cat({q.narrow(-1, 0, nope_), apply_rope(q.narrow(-1, nope_, rope_), rope)}, -1).transpose(1, 2);
  at::Tensor kf =
      at::cat({kvb.narrow(-1, 0, nope_), cache.k_pe.unsqueeze(2).expand({B, L, H, rope_})}, -1).transpose(1, 2);
  at::Tensor vf = kvb.narrow(-1, nope_, v_dim_).transpose(1, 2);
  // Query i (position pos + i) sees the keys of positions 0 .. pos + i.
  const auto idx = x.options().dtype(at::kLong);
  const at::Tensor mask = at::arange(L, idx).unsqueeze(0) <= (at::arange(T, idx) + pos).unsqueeze(1);
  const double scale = softmax_scale();
  at::Tensor o = at::scaled_dot_product_attention(qf, kf, vf, mask, /*dropout_p=*/0.0, /*is_causal=*/false, scale);
  return output(o.transpose(1, 2).reshape({B, T, H * v_dim_}).to(x.scalar_type()));
}

}  // namespace moetrain::model
