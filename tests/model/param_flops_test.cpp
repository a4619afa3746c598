#include "model/param_flops.h"

#include <gtest/gtest.h>

#include "config/loader.h"

namespace moetrain::model {
namespace {

config::ModelConfig small_mla() {
  config::ModelConfig m;
  m.hidden_size = 8;
  m.num_heads = 2;
  m.q_lora_rank = 4;
  m.kv_lora_rank = 4;
  m.qk_nope_head_dim = 2;
  m.qk_rope_head_dim = 2;
  m.v_head_dim = 2;
  return m;
}

TEST(ModelSpec, MlaParamsByHand) {
  config::ModelConfig m = small_mla();
  // wq_a 8·4 = 32, q_norm 4, wq_b 4·2·(2+2) = 32, wkv_a 8·(4+2) = 48, kv_norm 4, wkv_b 4·2·(2+2) = 32,
  // wo 2·2·8 = 32.
  EXPECT_EQ(mla_params(m), 184);
  m.q_lora_rank = 0;  // full-rank query: wq 8·2·4 = 64 instead of wq_a + q_norm + wq_b
  EXPECT_EQ(mla_params(m), 180);
}

TEST(ModelSpec, BlockParamsByHand) {
  config::ModelConfig m = small_mla();
  m.num_layers = 2;
  m.n_dense_layers = 1;
  m.dense_inter_dim = 16;
  m.moe_inter_dim = 4;
  m.n_shared_experts = 1;
  m.n_routed_experts = 4;
  m.top_k = 2;
  BlockParams dense = block_params(m, 0);
  EXPECT_EQ(dense.dense_mlp, 3 * 8 * 16);
  EXPECT_EQ(dense.norms, 16);
  EXPECT_EQ(dense.total(), 184 + 16 + 384);
  EXPECT_EQ(dense.active(), dense.total());
  BlockParams moe = block_params(m, 1);
  EXPECT_EQ(moe.shared_experts, 96);      // 3·8·4
  EXPECT_EQ(moe.routed_experts, 4 * 96);  // all four
  EXPECT_EQ(moe.routed_active, 2 * 96);   // top-2
  EXPECT_EQ(moe.router, 4 * 8);
  EXPECT_EQ(moe.total(), 184 + 16 + 96 + 384 + 32);
  EXPECT_EQ(moe.active(), 184 + 16 + 96 + 192 + 32);

  m.vocab_size = 10;
  m.mtp_depth = 2;
  ModelParams p = model_params(m);
  EXPECT_EQ(p.embedding, 80);
  EXPECT_EQ(p.head, 80);
  EXPECT_EQ(p.main_total(), 80 + 80 + 8 + dense.total() + moe.total());
  // An MTP module: M_k 2·8·8 = 128, norms 8 + 8 + 8, and a MoE block.
  EXPECT_EQ(p.mtp_module_total, 128 + 24 + moe.total());
  EXPECT_EQ(p.mtp_total(), 2 * p.mtp_module_total);
  EXPECT_EQ(p.mtp_total_with_copies(), p.mtp_total() + 2 * 160);
  m.tie_embeddings = true;
  EXPECT_EQ(model_params(m).head, 0);
}

TEST(ModelSpec, AttentionFlopsByHand) {
  config::ModelConfig m = small_mla();  // H 2, d_qk 4, d_v 2
  EXPECT_DOUBLE_EQ(attention_flops_per_token(m, 10), 3.0 * 2 * (4 + 2) * 10);
}

// The DeepSeek-V3 technical report: 671B total, 37B activated; the MTP module 11.6B of its own, 14B as released
// with its own embedding and head (685B in all).
TEST(ModelSpec, DeepSeekV3MatchesTheReport) {
  config::Config c = config::load_config(MOETRAIN_SOURCE_DIR "/configs/deepseek-v3-671b.yaml");
  ModelParams p = model_params(c.model);
  EXPECT_NEAR(static_cast<double>(p.main_total()), 671e9, 0.01 * 671e9);
  EXPECT_NEAR(static_cast<double>(p.main_active()), 37e9, 0.02 * 37e9);
  EXPECT_NEAR(static_cast<double>(p.mtp_total()), 11.6e9, 0.02 * 11.6e9);
  EXPECT_NEAR(static_cast<double>(p.main_total() + p.mtp_total_with_copies()), 685e9, 0.01 * 685e9);
  // 6 × activated matmul weights dominates; attention adds 3·H·(d_qk + d_v)·seq per layer.
  FlopsPerToken f = flops_per_token(c.model, 4096);
  double expected_main = 6.0 * static_cast<double>(p.layers_active + p.head) + 61 * 3.0 * 128 * (192 + 128) * 4096;
  EXPECT_DOUBLE_EQ(f.main, expected_main);
  EXPECT_GT(f.mtp, 0.0);
}

}  // namespace
}  // namespace moetrain::model
