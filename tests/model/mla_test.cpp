// MLA against a naive reference written here with explicit matmuls, per-head loops, an explicit causal softmax and
// RoPE as complex rotations of (2i, 2i+1) pairs: outputs and all gradients to 1e-5 in FP32.
#include "model/attention.h"

#include <ATen/SDPBackend.h>
#include <ATen/ops/_fused_sdp_choice.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "model/transformer.h"
#include "tests/model/test_models.h"

namespace moetrain::model {
namespace {

at::Tensor naive_rms(const at::Tensor& x, const at::Tensor& w, double eps) {
  return x / torch::sqrt((x * x).mean(-1, true) + eps) * w;
}

// x: [T, dim] one head's rope part; rotates pair i at position t by angle t·θ^(−2i/dim).
at::Tensor naive_rope(const at::Tensor& x, double theta) {
  const int64_t T = x.size(0), dim = x.size(1);
  std::vector<at::Tensor> rows;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<at::Tensor> parts;
    for (int64_t i = 0; i < dim / 2; ++i) {
      double a = static_cast<double>(t) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
      at::Tensor re = x[t][2 * i], im = x[t][2 * i + 1];
      parts.push_back(re * std::cos(a) - im * std::sin(a));
      parts.push_back(re * std::sin(a) + im * std::cos(a));
    }
    rows.push_back(torch::stack(parts));
  }
  return torch::stack(rows);
}

at::Tensor naive_mla(MLAImpl& mla, const config::ModelConfig& m, const at::Tensor& x) {
  const int64_t B = x.size(0), T = x.size(1), H = m.num_heads, nope = m.qk_nope_head_dim, rope = m.qk_rope_head_dim;
  const int64_t dv = m.v_head_dim, r = m.kv_lora_rank;
  std::vector<at::Tensor> batches;
  for (int64_t b = 0; b < B; ++b) {
    at::Tensor xb = x[b];                                                       // [T, d]
    at::Tensor q = torch::matmul(naive_rms(torch::matmul(xb, mla.wq_a.t()), mla.q_norm->weight, m.norm_eps),
                                 mla.wq_b.t());                               // [T, H·(nope+rope)]
    at::Tensor kv = torch::matmul(xb, mla.wkv_a.t());                           // [T, r + rope]
    at::Tensor k_rope = naive_rope(kv.slice(1, r, r + rope), m.rope_theta);     // [T, rope], shared by heads
    at::Tensor kvb = torch::matmul(naive_rms(kv.slice(1, 0, r), mla.kv_norm->weight, m.norm_eps), mla.wkv_b.t());
    std::vector<at::Tensor> heads;
    for (int64_t h = 0; h < H; ++h) {
      at::Tensor qh = q.slice(1, h * (nope + rope), (h + 1) * (nope + rope));
      at::Tensor qf = torch::cat({qh.slice(1, 0, nope), naive_rope(qh.slice(1, nope, nope + rope), m.rope_theta)}, 1);
      at::Tensor kvh = kvb.slice(1, h * (nope + dv), (h + 1) * (nope + dv));
      at::Tensor kf = torch::cat({kvh.slice(1, 0, nope), k_rope}, 1);
      at::Tensor v = kvh.slice(1, nope, nope + dv);
      at::Tensor scores = torch::matmul(qf, kf.t()) / std::sqrt(static_cast<double>(nope + rope));
      at::Tensor mask = torch::ones({T, T}, torch::kBool).triu(1);
      scores = scores.masked_fill(mask, -INFINITY);
      at::Tensor p = torch::exp(scores - std::get<0>(scores.max(1, true)));
      p = p / p.sum(1, true);
      heads.push_back(torch::matmul(p, v));
    }
    batches.push_back(torch::matmul(torch::cat(heads, 1), mla.wo.t()));
  }
  return torch::stack(batches);
}

TEST(MLA, MatchesNaiveReferenceWithGradients) {
  config::ModelConfig m = testing::tiny_model();
  m.hidden_size = 16;
  m.num_heads = 3;
  m.qk_rope_head_dim = 4;
  MLA mla(m);
  init_parameters(*mla, 7, 0.2);
  {
    torch::NoGradGuard g;  // non-trivial norm weights
    mla->q_norm->weight.uniform_(0.5, 1.5);
    mla->kv_norm->weight.uniform_(0.5, 1.5);
  }
  torch::manual_seed(0);
  at::Tensor x = torch::randn({2, 5, m.hidden_size}, torch::requires_grad());
  at::Tensor weights = torch::randn({2, 5, m.hidden_size});

  at::Tensor out = mla->forward(x);
  auto params = mla->parameters();
  std::vector<at::Tensor> inputs = params;
  inputs.push_back(x);
  auto grads = torch::autograd::grad({(out * weights).sum()}, inputs);

  at::Tensor ref = naive_mla(*mla, m, x);
  auto ref_grads = torch::autograd::grad({(ref * weights).sum()}, inputs);
  EXPECT_TRUE(torch::allclose(out, ref, 1e-5, 1e-5)) << (out - ref).abs().max();
  for (size_t i = 0; i < inputs.size(); ++i)
    EXPECT_TRUE(torch::allclose(grads[i], ref_grads[i], 1e-5, 1e-5))
        << "input " << i << ": " << (grads[i] - ref_grads[i]).abs().max();
}

TEST(MLA, FullRankQueryWhenQLoraRankIsZero) {
  config::ModelConfig m = testing::tiny_model();
  m.q_lora_rank = 0;
  MLA mla(m);
  EXPECT_TRUE(mla->wq.defined());
  EXPECT_FALSE(mla->wq_a.defined());
  init_parameters(*mla, 1, 0.1);
  EXPECT_EQ(mla->forward(torch::randn({1, 3, m.hidden_size})).sizes(), (std::vector<int64_t>{1, 3, m.hidden_size}));
}

TEST(MLA, CausalFutureTokensDoNotChangeEarlierOutputs) {
  config::ModelConfig m = testing::tiny_model();
  MLA mla(m);
  init_parameters(*mla, 3, 0.3);
  at::Tensor x = torch::randn({1, 6, m.hidden_size});
  at::Tensor y = x.clone();
  y[0][5] += 1.0;
  EXPECT_TRUE(torch::allclose(mla->forward(x).slice(1, 0, 5), mla->forward(y).slice(1, 0, 5), 1e-6, 1e-6));
}

// v is padded to the q/k head dim only where the kernel that runs needs it: never for the fused FP32 CPU kernel or a
// v as wide as q/k; elsewhere to a width with which ATen's dispatcher picks a fused kernel, not the math path that
// keeps every query's probabilities (BF16 on the CPU: its flash kernel wants equal head dims). The width is asked
// once per shape and grad mode, and the same width comes back.
TEST(MLA, VIsPaddedOnlyWhereTheAttentionKernelNeedsIt) {
  EXPECT_EQ(attention_v_width(2, 64, 4, 24, 16, torch::kFloat, torch::kCPU, true), 16);
  EXPECT_EQ(attention_v_width(2, 64, 4, 24, 24, torch::kBFloat16, torch::kCPU, true), 24);
  EXPECT_EQ(attention_v_width(2, 64, 4, 16, 24, torch::kBFloat16, torch::kCPU, true), 24);
  const auto choice = [](int64_t v_width, bool grad) {
    const auto operand = [&](int64_t d) {
      return torch::empty({2, 64, 4, d}, torch::kBFloat16).requires_grad_(grad).transpose(1, 2);
    };
    return at::_fused_sdp_choice(operand(24), operand(24), operand(v_width), {}, 0.0, /*is_causal=*/true);
  };
  const auto math = static_cast<int64_t>(at::SDPBackend::math);
  for (const bool grad : {true, false}) {
    const int64_t w = attention_v_width(2, 64, 4, 24, 16, torch::kBFloat16, torch::kCPU, grad);
    ASSERT_TRUE(w == 16 || w == 24) << w;
    EXPECT_NE(choice(w, grad), math) << "grad " << grad << ": v width " << w << " takes the math path";
    EXPECT_EQ(w == 16, choice(16, grad) != math && choice(16, grad) == choice(24, grad)) << "grad " << grad;
    EXPECT_EQ(attention_v_width(2, 64, 4, 24, 16, torch::kBFloat16, torch::kCPU, grad), w);
  }
}

}  // namespace
}  // namespace moetrain::model
