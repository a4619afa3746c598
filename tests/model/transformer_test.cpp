#include "model/transformer.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <random>

#include "model/param_flops.h"
#include "tests/model/test_models.h"

namespace moetrain::model {
namespace {

int64_t numel(torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

TEST(Transformer, ParameterCountsMatchModelSpec) {
  for (bool tied : {false, true})
    for (int64_t q_rank : {0, 6}) {
      config::ModelConfig m = testing::tiny_model();
      m.tie_embeddings = tied;
      m.q_lora_rank = q_rank;
      Transformer t(m, StageSpec::whole(m));
      ModelParams p = model_params(m);
      EXPECT_EQ(numel(*t), p.main_total() + p.mtp_total()) << "tied " << tied << " q_rank " << q_rank;
    }
}

TEST(Transformer, GlobalNames) {
  config::ModelConfig m = testing::tiny_model();
  Transformer t(m, StageSpec::whole(m));
  auto params = t->named_parameters();
  for (const char* name : {"embed.weight", "head.weight", "norm.weight", "layers.0.attn.wq_a", "layers.0.mlp.w_gate",
                           "layers.1.moe.router.weight", "layers.1.moe.shared.w_up", "layers.1.moe.experts.3.w_down",
                           "mtp.0.proj", "mtp.0.block.moe.experts.0.w_gate", "mtp.0.enorm.weight"})
    EXPECT_NE(params.find(name), nullptr) << name;
  EXPECT_NE(t->named_buffers().find("layers.1.moe.router.bias"), nullptr);
}

// An expert starts with the same values whichever ep rank holds it.
TEST(Transformer, InitializationIsLayoutIndependent) {
  config::ModelConfig m = testing::tiny_model();
  Transformer whole(m, StageSpec::whole(m));
  StageSpec shard = StageSpec::whole(m);
  shard.shard = ExpertShard{1, 2};  // experts 2 and 3
  Transformer half(m, shard);
  init_parameters(*whole, 42, 0.02);
  init_parameters(*half, 42, 0.02);
  auto a = whole->named_parameters(), b = half->named_parameters();
  EXPECT_EQ(b.find("layers.1.moe.experts.0.w_gate"), nullptr);
  for (const char* name : {"layers.1.moe.experts.3.w_gate", "layers.1.moe.experts.2.w_down", "layers.0.attn.wo"})
    EXPECT_TRUE(torch::equal(*a.find(name), *b.find(name))) << name;
  EXPECT_FALSE(torch::equal(*a.find("layers.1.moe.experts.3.w_gate"), *a.find("layers.1.moe.experts.2.w_gate")));
}

// The MTP module's inputs and targets, recomputed here from the model's pieces: at position i it combines
// h[i] with Emb(t[i+1]) and predicts t[i+2].
// By hand: depth 1 takes the main model's final-norm output, depth 2 module 1's final-norm output (Megatron-Core's,
// SGLang's and vLLM's h); each predicts the token depth + 1 ahead.
TEST(Transformer, MtpTargetsAreOffsetByDepthPlusOne) {
  config::ModelConfig m = testing::tiny_model();
  m.mtp_depth = 2;
  Transformer t(m, StageSpec::whole(m));
  init_parameters(*t, 3, 0.3);
  torch::manual_seed(4);
  const int64_t T = 5;
  at::Tensor window = torch::randint(0, m.vocab_size, {2, T + 3}, torch::kLong);
  LocalExpertExchange ex;
  LossSums s = t->forward(window, ex);

  auto ce = [&](const at::Tensor& logits, int64_t first) {
    return torch::nn::functional::cross_entropy(
        logits.reshape({-1, m.vocab_size}), window.slice(1, first, first + T).reshape({-1}),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
  };
  std::vector<MoeStats> stats;
  at::Tensor h = t->norm(t->run_layers(t->embed_tokens(window.slice(1, 0, T)), ex, stats));
  EXPECT_TRUE(torch::allclose(s.lm, ce(torch::matmul(h, t->head.t()), 1), 1e-6, 1e-6));
  for (int64_t k = 0; k < 2; ++k) {
    auto& mod = t->mtp[static_cast<size_t>(k)];
    at::Tensor hk = torch::matmul(
        torch::cat({mod->hnorm(h), mod->enorm(t->embed_tokens(window.slice(1, k + 1, k + 1 + T)))}, -1),
        mod->proj.t());
    h = mod->norm(mod->block->forward(hk, ex, stats));
    EXPECT_TRUE(torch::allclose(s.mtp[static_cast<size_t>(k)], ce(torch::matmul(h, t->head.t()), k + 2), 1e-6, 1e-6))
        << "depth " << k + 1;
  }
  EXPECT_EQ(s.moe.size(), 3u);  // layer 1 and the two MTP blocks
}

// Inference with the latent cache (a prefill of 3 tokens, then one token at a time) gives the logits of the full
// causal forward pass at every position. FP64: no near-tie of the router flips between the two orders of summation.
TEST(Transformer, CachedDecodingMatchesTheFullForwardPass) {
  config::ModelConfig m = testing::tiny_model();
  Transformer t(m, StageSpec::whole(m));
  init_parameters(*t, 5, 0.3);
  t->to(torch::kDouble);
  at::NoGradGuard no_grad;
  torch::manual_seed(6);
  const at::Tensor tokens = torch::randint(0, m.vocab_size, {2, 7}, torch::kLong);
  LocalExpertExchange ex;
  std::vector<MoeStats> stats;
  const at::Tensor full = t->logits(t->run_layers(t->embed_tokens(tokens), ex, stats));
  std::vector<LatentCache> caches;
  std::vector<at::Tensor> steps{t->logits(t->decode(tokens.slice(1, 0, 3), caches, ex))};
  for (int64_t i = 3; i < 7; ++i) steps.push_back(t->logits(t->decode(tokens.slice(1, i, i + 1), caches, ex)));
  EXPECT_EQ(caches[0].length(), 7);
  const at::Tensor cached = torch::cat(steps, 1);
  EXPECT_TRUE(torch::allclose(cached, full, 1e-10, 1e-10)) << (cached - full).abs().max().item<double>();
}

// The training objective of one micro-batch, as the trainer forms it.
at::Tensor objective(Transformer& t, const at::Tensor& window, double lambda) {
  LocalExpertExchange ex;
  LossSums s = t->forward(window, ex);
  const double tokens = static_cast<double>(window.size(0) * (window.size(1) - 2));
  return s.lm / tokens + s.mtp[0] * (lambda / tokens) + s.balance / static_cast<double>(window.size(0));
}

// Finite differences in double precision: every trainable parameter gets the right gradient (a few entries of
// each, central differences).
TEST(Transformer, FiniteDifferenceGradientCheck) {
  config::ModelConfig m = testing::tiny_model();
  Transformer t(m, StageSpec::whole(m));
  init_parameters(*t, 11, 0.4);
  t->to(torch::kDouble);
  {
    torch::NoGradGuard g;
    for (auto& p : t->parameters())
      if (p.dim() == 1) p.uniform_(0.5, 1.5);  // norms away from 1 so their gradients are exercised
  }
  torch::manual_seed(5);
  at::Tensor window = torch::randint(0, m.vocab_size, {2, 8}, torch::kLong);
  at::Tensor loss = objective(t, window, 0.3);
  loss.backward();
  std::mt19937 rng(7);
  int checked = 0;
  for (auto& item : t->named_parameters()) {
    at::Tensor p = item.value();
    at::Tensor flat = p.view({-1});
    for (int trial = 0; trial < 3; ++trial) {
      int64_t i = std::uniform_int_distribution<int64_t>(0, flat.numel() - 1)(rng);
      const double eps = 1e-6, orig = flat[i].item<double>();
      double plus, minus;
      {
        torch::NoGradGuard g;
        flat[i] = orig + eps;
        plus = objective(t, window, 0.3).item<double>();
        flat[i] = orig - eps;
        minus = objective(t, window, 0.3).item<double>();
        flat[i] = orig;
      }
      double fd = (plus - minus) / (2 * eps);
      // An expert that received no token has no gradient: its true gradient is zero.
      double ad = p.grad().defined() ? p.grad().view({-1})[i].item<double>() : 0.0;
      EXPECT_NEAR(ad, fd, 1e-6 + 1e-4 * std::abs(fd)) << item.key() << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 60);
}

// A copy task where the next-next token is determined (t[i+2] = t[i], two random tokens per sequence): the MTP
// loss falls toward 0, while the main model still pays for the one unpredictable token of each sequence.
TEST(Transformer, MtpLearnsACopyTask) {
  config::ModelConfig m = testing::tiny_model();
  m.hidden_size = 32;
  m.moe_inter_dim = 16;
  m.dense_inter_dim = 64;
  m.num_heads = 4;
  m.qk_nope_head_dim = 8;
  m.qk_rope_head_dim = 8;
  m.v_head_dim = 8;
  m.q_lora_rank = 16;
  m.kv_lora_rank = 16;
  m.init_std = 0.05;
  Transformer t(m, StageSpec::whole(m));
  init_parameters(*t, 1, m.init_std);
  torch::optim::Adam opt(t->parameters(), torch::optim::AdamOptions(3e-3));
  torch::manual_seed(6);
  const int64_t T = 16;
  double first = 0, last = 0;
  for (int step = 0; step < 200; ++step) {
    at::Tensor ab = torch::randint(0, m.vocab_size, {32, 2}, torch::kLong);
    at::Tensor window = ab.repeat({1, (T + 2) / 2});  // a b a b ...: T + 2 tokens
    LocalExpertExchange ex;
    LossSums s = t->forward(window, ex);
    at::Tensor mtp = s.mtp[0] / static_cast<double>(32 * T);
    at::Tensor loss = s.lm / static_cast<double>(32 * T) + mtp;
    opt.zero_grad();
    loss.backward();
    opt.step();
    if (step == 0) first = mtp.item<double>();
    last = mtp.item<double>();
  }
  EXPECT_GT(first, 2.0);
  EXPECT_LT(last, 0.05) << "MTP loss after 200 steps";
}

}  // namespace
}  // namespace moetrain::model
