#include "model/param_flops.h"

namespace moetrain::model {

int64_t mla_params(const config::ModelConfig& m) {
  const int64_t d = m.hidden_size, h = m.num_heads;
  const int64_t qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
  int64_t q = m.q_lora_rank > 0 ? d * m.q_lora_rank + m.q_lora_rank /* q_norm */ + m.q_lora_rank * h * qk
                                : d * h * qk;
  int64_t kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank /* kv_norm */ +
               m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim);
  int64_t out = h * m.v_head_dim * d;
  return q + kv + out;
}

bool is_moe_layer(const config::ModelConfig& m, int64_t layer) { return layer >= m.n_dense_layers; }
bool mtp_is_moe(const config::ModelConfig& m) { return m.n_dense_layers < m.num_layers; }

namespace {
int64_t swiglu_params(int64_t d, int64_t inter) { return 3 * d * inter; }  // gate, up, down

BlockParams block_with_ffn(const config::ModelConfig& m, bool moe) {
  BlockParams b;
  b.attention = mla_params(m);
  b.norms = 2 * m.hidden_size;
  if (moe) {
    const int64_t expert = swiglu_params(m.hidden_size, m.moe_inter_dim);
    b.shared_experts = m.n_shared_experts * expert;
    b.routed_experts = m.n_routed_experts * expert;
    b.routed_active = m.top_k * expert;
    b.router = m.n_routed_experts * m.hidden_size;
  } else {
    b.dense_mlp = swiglu_params(m.hidden_size, m.dense_inter_dim);
  }
  return b;
}
}  // namespace

BlockParams block_params(const config::ModelConfig& m, int64_t layer) {
  return block_with_ffn(m, is_moe_layer(m, layer));
}

// The MTP block has the FFN of the main model's deeper layers: MoE when the model has MoE layers.
BlockParams mtp_block_params(const config::ModelConfig& m) {
  return block_with_ffn(m, mtp_is_moe(m));
}

int64_t mtp_module_extra_params(const config::ModelConfig& m) {
  const int64_t d = m.hidden_size;
  return 2 * d * d /* M_k */ + 2 * d /* norms of h and Emb(t) */ + d /* output norm */;
}

ModelParams model_params(const config::ModelConfig& m) {
  ModelParams p;
  p.embedding = m.vocab_size * m.hidden_size;
  p.head = m.tie_embeddings ? 0 : m.vocab_size * m.hidden_size;
  p.final_norm = m.hidden_size;
  for (int64_t l = 0; l < m.num_layers; ++l) {
    BlockParams b = block_params(m, l);
    p.layers_total += b.total();
    p.layers_active += b.active();
  }
  BlockParams mb = mtp_block_params(m);
  p.mtp_depth = m.mtp_depth;
  p.mtp_module_total = mb.total() + mtp_module_extra_params(m);
  p.mtp_module_active = mb.active() + mtp_module_extra_params(m);
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

ActivationElems block_activations(const config::ModelConfig& m, bool moe) {
  const double d = static_cast<double>(m.hidden_size), h = static_cast<double>(m.num_heads);
  const double dqk = static_cast<double>(m.qk_nope_head_dim + m.qk_rope_head_dim);
  const double dv = static_cast<double>(m.v_head_dim);
  ActivationElems a;
  // Attention: block input and its norm, the query latent and its norm, q, the KV latent (+ rope key) and its
  // norm, k, v and the attention output.
  a.elems += 2 * d + (m.q_lora_rank > 0 ? 2.0 * static_cast<double>(m.q_lora_rank) : 0.0) + h * dqk +
             static_cast<double>(m.kv_lora_rank + m.qk_rope_head_dim) + static_cast<double>(m.kv_lora_rank) +
             h * dqk + 2 * h * dv;
  if (moe) {
    const double inter = static_cast<double>(m.moe_inter_dim), k = static_cast<double>(m.top_k);
    // The FFN input and its norm; per routed copy: the dispatched input, gate, up, their product and the output;
    // the shared experts' gate, up and product; router scores in FP32.
    a.elems += 2 * d + k * (2 * d + 3 * inter) + static_cast<double>(m.n_shared_experts) * 3 * inter;
    a.fp32_elems += static_cast<double>(m.n_routed_experts);
  } else {
    a.elems += 2 * d + 3 * static_cast<double>(m.dense_inter_dim);
  }
  return a;
}

ActivationElems head_activations(const config::ModelConfig& m) {
  ActivationElems a;
  a.elems = 2.0 * static_cast<double>(m.hidden_size);
  a.fp32_elems = static_cast<double>(m.vocab_size);
  return a;
}

ActivationElems mtp_module_activations(const config::ModelConfig& m) {
  ActivationElems a;
  a.elems = 4.0 * static_cast<double>(m.hidden_size);  // both inputs, their norms (the concat feeds M_k)
  a += block_activations(m, mtp_is_moe(m));
  a += head_activations(m);
  return a;
}

}  // namespace moetrain::model
