// Tiny model configs shared by the model and trainer tests.
#pragma once

#include "config/config.h"

namespace moetrain::testing {

// A DeepSeek-V3-shaped model small enough for finite differences: MLA with low-rank q, one dense block and one
// MoE block (1 shared + 4 routed experts, top-2 of 2 groups keeping 1), one MTP module.
inline config::ModelConfig tiny_model() {
  config::ModelConfig m;
  m.vocab_size = 16;
  m.hidden_size = 8;
  m.num_layers = 2;
  m.n_dense_layers = 1;
  m.dense_inter_dim = 12;
  m.moe_inter_dim = 4;
  m.n_shared_experts = 1;
  m.n_routed_experts = 4;
  m.top_k = 2;
  m.n_group = 2;
  m.topk_group = 1;
  m.routed_scaling_factor = 2.5;
  m.num_heads = 2;
  m.q_lora_rank = 6;
  m.kv_lora_rank = 4;
  m.qk_nope_head_dim = 4;
  m.qk_rope_head_dim = 2;
  m.v_head_dim = 3;
  m.init_std = 0.3;
  m.mtp_depth = 1;
  m.seq_balance_alpha = 0.1;
  return m;
}

}  // namespace moetrain::testing
