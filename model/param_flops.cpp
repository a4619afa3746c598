#include "model/param_flops.h"

#include <algorithm>

#include "config/count.h"

namespace moetrain::model {

using config::Count;

namespace {
// Every count here is formed with config::Count, so absurd sizes raise CountOverflow instead of wrapping.
constexpr const char* kParams = "the model's parameter count";

Count mla(const config::ModelConfig& m) {
  const Count d = m.hidden_size, h = m.num_heads;
  const Count qk = Count(m.qk_nope_head_dim) + m.qk_rope_head_dim;
  Count q = m.q_lora_rank > 0 ? d * m.q_lora_rank + m.q_lora_rank /* q_norm */ + Count(m.q_lora_rank) * h * qk
                              : d * h * qk;
  Count kv = d * (Count(m.kv_lora_rank) + m.qk_rope_head_dim) + m.kv_lora_rank /* kv_norm */ +
             Count(m.kv_lora_rank) * h * (Count(m.qk_nope_head_dim) + m.v_head_dim);
  Count out = h * m.v_head_dim * d;
  return q + kv + out;
}

Count swiglu_params(int64_t d, int64_t inter) { return 3 * Count(d) * inter; }  // gate, up, down

// A block's total and activated parameters, checked (BlockParams::total() adds unchecked).
Count total(const BlockParams& b) {
  return Count(b.attention) + b.norms + b.dense_mlp + b.shared_experts + b.routed_experts + b.router;
}
Count active(const BlockParams& b) {
  return Count(b.attention) + b.norms + b.dense_mlp + b.shared_experts + b.routed_active + b.router;
}

BlockParams block_with_ffn(const config::ModelConfig& m, bool moe) {
  BlockParams b;
  b.attention = mla(m).value(kParams);
  b.norms = (2 * Count(m.hidden_size)).value(kParams);
  if (moe) {
    const Count expert = swiglu_params(m.hidden_size, m.moe_inter_dim);
    b.shared_experts = (expert * m.n_shared_experts).value(kParams);
    b.routed_experts = (expert * m.n_routed_experts).value(kParams);
    b.routed_active = (expert * m.top_k).value(kParams);
    b.router = (Count(m.n_routed_experts) * m.hidden_size).value(kParams);
  } else {
    b.dense_mlp = swiglu_params(m.hidden_size, m.dense_inter_dim).value(kParams);
  }
  total(b).value(kParams);  // so that b.total() fits
  return b;
}

}  // namespace

int64_t mla_params(const config::ModelConfig& m) { return mla(m).value(kParams); }

bool is_moe_layer(const config::ModelConfig& m, int64_t layer) { return layer >= m.n_dense_layers; }
bool mtp_is_moe(const config::ModelConfig& m) { return m.n_dense_layers < m.num_layers; }

BlockParams block_params(const config::ModelConfig& m, int64_t layer) {
  return block_with_ffn(m, is_moe_layer(m, layer));
}

// The MTP block has the FFN of the main model's deeper layers: MoE when the model has MoE layers.
BlockParams mtp_block_params(const config::ModelConfig& m) {
  return block_with_ffn(m, mtp_is_moe(m));
}

int64_t mtp_module_extra_params(const config::ModelConfig& m) {
  const Count d = m.hidden_size;
  return (2 * d * d /* M_k */ + 2 * d /* norms of h and Emb(t) */ + d /* output norm */).value(kParams);
}

ModelParams model_params(const config::ModelConfig& m) {
  ModelParams p;
  const Count embedding = Count(m.vocab_size) * m.hidden_size;
  p.embedding = embedding.value(kParams);
  p.head = m.tie_embeddings ? 0 : p.embedding;
  p.final_norm = m.hidden_size;
  // Layers [0, n_dense_layers) are dense, the rest MoE: counted per kind, not per layer (num_layers may be huge).
  const int64_t dense = std::clamp<int64_t>(m.n_dense_layers, 0, m.num_layers), moe = m.num_layers - dense;
  Count layers_total, layers_active;
  for (auto [n, is_moe] : {std::pair{dense, false}, std::pair{moe, true}}) {
    if (n == 0) continue;
    const BlockParams b = block_with_ffn(m, is_moe);
    layers_total += total(b) * n;
    layers_active += active(b) * n;
  }
  p.layers_total = layers_total.value(kParams);
  p.layers_active = layers_active.value(kParams);
  p.mtp_depth = m.mtp_depth;
  if (m.mtp_depth > 0) {  // without MTP its module is not counted, so its sizes need not fit
    const BlockParams mb = mtp_block_params(m);
    p.mtp_module_total = (total(mb) + mtp_module_extra_params(m)).value(kParams);
    p.mtp_module_active = (active(mb) + mtp_module_extra_params(m)).value(kParams);
  }
  // The largest sum the accessors (and `moetrain plan`) form: everything, MTP with its own embedding and head, and
  // a pipeline stage's copy of the embedding. With it every smaller sum fits too.
  (Count(p.embedding) + p.head + p.final_norm + p.layers_total + Count(p.mtp_depth) * p.mtp_module_total +
   Count(p.mtp_depth) * (Count(p.embedding) + (p.head ? p.head : p.embedding)) + p.embedding)
      .value(kParams);
  return p;
}

double attention_flops_per_token(const config::ModelConfig& m, int64_t seq_len) {
  // Forward: QK^T and PV over on average seq_len/2 earlier positions (causal): 2·H·(d_qk + d_v)·seq_len/2.
  const double dqk = static_cast<double>(m.qk_nope_head_dim + m.qk_rope_head_dim);
  return 3.0 * static_cast<double>(m.num_heads) * (dqk + static_cast<double>(m.v_head_dim)) *
         static_cast<double>(seq_len);
}

FlopsPerToken flops_per_token(const config::ModelConfig& m, int64_t seq_len) {
  ModelParams p = model_params(m);
  const double head = static_cast<double>(m.vocab_size * m.hidden_size);  // used as a matmul even when tied
  const double attn = attention_flops_per_token(m, seq_len);
  FlopsPerToken f;
  // Norm weights are elementwise, not matmul weights; they are a rounding error next to the rest.
  f.main = 6.0 * (static_cast<double>(p.layers_active) + head) + attn * static_cast<double>(m.num_layers);
  f.mtp = static_cast<double>(m.mtp_depth) * (6.0 * (static_cast<double>(p.mtp_module_active) + head) + attn);
  return f;
}

}  // namespace moetrain::model

namespace moetrain::model {

namespace {

// What one block's attention keeps per token under `r` (none or selective).
ActivationElems attention_saved(const config::ModelConfig& m, config::Recompute r) {
  const double d = static_cast<double>(m.hidden_size), H = static_cast<double>(m.num_heads);
  const double dqk = static_cast<double>(m.qk_nope_head_dim + m.qk_rope_head_dim);
  const double dv = static_cast<double>(m.v_head_dim), ql = static_cast<double>(m.q_lora_rank);
  const double kvl = static_cast<double>(m.kv_lora_rank), rope = static_cast<double>(m.qk_rope_head_dim);
  ActivationElems a;
  // The output projection's input, always; the block input is counted by the caller.
  a.fp8_elems += H * dv;
  if (r == config::Recompute::kSelective) return a;  // the rest runs again in the backward pass
  // The attention core keeps q, k, v (v padded to the q/k head dim where the kernel needs it, model/attention.cpp's
  // attention_v_width; an upper bound where it does not) and its padded output, and
  // the log-sum-exp per head; the input norm its output (the down projections' input), the latents (their norms'
  // inputs) and the latents' norm outputs (the up projections' inputs), 1/rms of each norm.
  a.elems += 2 * H * dqk + 2 * H * std::max(dqk, dv) + d + (ql > 0 ? ql : 0.0) + (kvl + rope);
  a.fp8_elems += (ql > 0 ? ql : 0.0) + kvl;
  a.fp32_elems += H + (ql > 0 ? 3 : 2);
  return a;
}

// One block's saved activations under `r` (none or selective; full is handled by the callers).
ActivationElems block_saved(const config::ModelConfig& m, bool moe, config::Recompute r) {
  const double d = static_cast<double>(m.hidden_size);
  ActivationElems a = attention_saved(m, r);
  // The block input; the FFN norm's input and output.
  a.elems += 3 * d;
  a.fp32_elems += 1;
  // A SwiGLU keeps gate and up (its activation is computed again in the backward pass, model/layers.h) and the down
  // projection's input; a routed expert also its gate, which it applies to that input.
  auto swiglu = [&](double inter, bool gated) {
    ActivationElems s;
    s.elems = 2.0 * inter + (gated ? 1.0 : 0.0);
    s.fp8_elems = inter;
    return s;
  };
  if (moe) {
    const double k = static_cast<double>(m.top_k), inter = static_cast<double>(m.moe_inter_dim);
    // Per routed copy: the dispatched input and the expert's SwiGLU (with the copy's gate).
    const ActivationElems e = swiglu(inter, true);
    a.elems += k * (d + e.elems);
    a.fp8_elems += k * e.fp8_elems;
    for (int64_t i = 0; i < m.n_shared_experts; ++i) a += swiglu(inter, false);
    // Router scores, the selected scores and gates, and the int64 indices of the sort and the combine.
    a.fp32_elems += static_cast<double>(m.n_routed_experts) + 2 * k + 3 * 2 * k;
  } else {
    a += swiglu(static_cast<double>(m.dense_inter_dim), false);
  }
  return a;
}

}  // namespace

ActivationElems block_activations(const config::ModelConfig& m, bool moe) {
  if (m.recompute == config::Recompute::kFull) return {static_cast<double>(m.hidden_size), 0.0};
  return block_saved(m, moe, m.recompute);
}

ActivationElems recompute_transient(const config::ModelConfig& m, bool moe) {
  if (m.recompute == config::Recompute::kFull) return block_saved(m, moe, config::Recompute::kNone);
  if (m.recompute != config::Recompute::kSelective) return {};
  ActivationElems a = attention_saved(m, config::Recompute::kNone);
  a -= attention_saved(m, config::Recompute::kSelective);
  return a;
}

ActivationElems head_activations(const config::ModelConfig& m) {
  ActivationElems a;
  a.elems = 2.0 * static_cast<double>(m.hidden_size);   // the last hidden state and the final norm's output
  a.fp32_elems = static_cast<double>(m.vocab_size) + 1;  // the log-probabilities of the cross-entropy, 1/rms
  return a;
}

ActivationElems head_backward_transient(const config::ModelConfig& m, bool fused_loss) {
  ActivationElems a;
  a.fp32_elems = (fused_loss ? 1.0 : 2.0) * static_cast<double>(m.vocab_size);
  return a;
}

ActivationElems mtp_module_activations(const config::ModelConfig& m) {
  ActivationElems a;
  // The embedded future token and the concatenation of both norms' outputs fed to M_k (the hidden input is the
  // previous head's), 1/rms of both norms.
  a.elems = 3.0 * static_cast<double>(m.hidden_size);
  a.fp32_elems = 2;
  a += block_activations(m, mtp_is_moe(m));
  a += head_activations(m);
  return a;
}

}  // namespace moetrain::model
