// The fused CPU kernels (model/fused_cpu.h, FP32 on the CPU) against the ATen compositions they replace, which
// FP64 tensors still take: the same functions and gradients within FP32 rounding, the same routing choices.
#include "model/fused_cpu.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "model/attention.h"
#include "model/layers.h"
#include "model/router.h"
#include "model/row_ops.h"
#include "tests/model/test_models.h"

namespace moetrain::model {
namespace {

// Runs f on FP32 and FP64 copies of `inputs` (all requiring gradients), backpropagates the same output gradient
// and expects the outputs and every input gradient to agree within FP32 rounding.
void expect_fp32_matches_fp64(const std::vector<at::Tensor>& inputs,
                              const std::function<at::Tensor(const std::vector<at::Tensor>&)>& f) {
  auto run = [&](at::ScalarType dtype) {
    std::vector<at::Tensor> in;
    for (const at::Tensor& t : inputs) in.push_back(t.to(dtype).detach().requires_grad_(true));
    at::Tensor y = f(in);
    torch::manual_seed(11);
    y.backward(torch::randn(y.sizes(), torch::kDouble).to(dtype));
    std::vector<at::Tensor> out{y.detach().to(torch::kDouble)};
    for (const at::Tensor& t : in) out.push_back(t.grad().to(torch::kDouble));
    return out;
  };
  ASSERT_TRUE(fused_cpu::applies(inputs[0].to(torch::kFloat)));
  ASSERT_FALSE(fused_cpu::applies(inputs[0].to(torch::kDouble)));
  const auto single = run(torch::kFloat), reference = run(torch::kDouble);
  for (size_t i = 0; i < single.size(); ++i)
    EXPECT_TRUE(torch::allclose(single[i], reference[i], 1e-5, 1e-5))
        << (i == 0 ? std::string("output") : "gradient of input " + std::to_string(i - 1)) << ": largest difference "
        << (single[i] - reference[i]).abs().max().item<double>();
}

TEST(FusedCpu, RmsNormMatchesTheComposition) {
  torch::manual_seed(1);
  RMSNorm norm(40, 1e-6);
  expect_fp32_matches_fp64({torch::randn({3, 7, 40}) * 3, torch::rand({40}) + 0.5}, [&](const auto& in) {
    norm->weight = in[1];
    return norm->forward(in[0]);
  });
}

TEST(FusedCpu, SwiGluBackwardMatchesTheComposition) {
  torch::manual_seed(2);
  // Separate g and u, gated and not; the fused [rows, 2·inter] layout with a gate (the routed experts').
  expect_fp32_matches_fp64({torch::randn({2, 9, 24}) * 2, torch::randn({2, 9, 24})},
                           [](const auto& in) { return swiglu_activation(in[0], in[1]); });
  expect_fp32_matches_fp64({torch::randn({33, 24}) * 2, torch::randn({33, 24}), torch::rand({33})},
                           [](const auto& in) { return swiglu_activation(in[0], in[1], in[2]); });
  expect_fp32_matches_fp64({torch::randn({33, 48}) * 2, torch::rand({33})},
                           [](const auto& in) { return swiglu_activation_fused(in[0], in[1]); });
}

TEST(FusedCpu, CrossEntropyMatchesTheComposition) {
  torch::manual_seed(6);
  const at::Tensor targets = torch::randint(0, 70, {2, 13}, torch::kLong);
  expect_fp32_matches_fp64({torch::randn({2, 13, 70}) * 4}, [&](const auto& in) {
    return cross_entropy_sum(in[0], targets) * 0.5;  // a scaled output gradient reaches the kernel's backward
  });
  EXPECT_THROW(cross_entropy_sum(torch::randn({3, 5}), torch::tensor({0, 5, 1}, torch::kLong)), c10::Error);
}

TEST(FusedCpu, RowGathersMatchTheComposition) {
  torch::manual_seed(3);
  const int64_t N = 37, k = 3;
  const at::Tensor order = torch::randperm(N * k, torch::kLong);
  const at::Tensor token_of = at::floor_divide(order, k);
  const at::Tensor slot_of = at::empty_like(order).scatter_(0, order, torch::arange(N * k));
  expect_fp32_matches_fp64({torch::randn({N, 20})}, [&](const auto& in) {
    return reduce_rows(expand_rows(in[0], token_of, slot_of, k) * 2 + 1, token_of, slot_of, k);
  });
  // And the sum itself, by hand: token t's k copies.
  const at::Tensor y = torch::randn({N * k, 20});
  const at::Tensor by_hand = y.index_select(0, slot_of).view({N, k, 20}).sum(1);
  EXPECT_TRUE(torch::allclose(reduce_rows(y, token_of, slot_of, k), by_hand, 1e-6, 1e-6));
}

TEST(FusedCpu, RopeMatchesTheComplexRotation) {
  torch::manual_seed(5);
  const RopeTables rope = rope_tables(6, 8, 10000.0, torch::TensorOptions().dtype(torch::kFloat));
  const at::Tensor wide = torch::randn({2, 6, 3, 12});
  const at::Tensor x = wide.narrow(-1, 4, 8);  // strided rows, as the rotary part of a projection
  at::Tensor out = torch::empty({2, 6, 3, 8});
  fused_cpu::rope_into(out, x, rope.cis, /*inverse=*/false);
  EXPECT_TRUE(torch::allclose(out, apply_rope(x, rope), 1e-6, 1e-6));
  at::Tensor back = torch::empty({2, 6, 3, 8});
  fused_cpu::rope_into(back, out, rope.cis, /*inverse=*/true);
  EXPECT_TRUE(torch::allclose(back, x, 1e-5, 1e-6));
  // One head for all (the shared rotary key).
  at::Tensor heads = torch::empty({2, 6, 3, 8});
  fused_cpu::rope_into(heads, x.narrow(2, 1, 1), rope.cis, false);
  EXPECT_TRUE(torch::allclose(heads, apply_rope(x.narrow(2, 1, 1), rope).expand({2, 6, 3, 8}), 1e-6, 1e-6));
}

TEST(FusedCpu, RoutingChoosesAsTheComposition) {
  config::ModelConfig m = testing::tiny_model();
  m.hidden_size = 24;
  m.n_routed_experts = 32;
  m.n_group = 4;
  m.topk_group = 2;
  m.top_k = 6;
  torch::manual_seed(4);
  Router router(m);
  {
    at::NoGradGuard no_grad;
    router->weight.normal_(0, 0.5);
    router->bias.uniform_(-0.3, 0.3);
  }
  const at::Tensor x = torch::randn({200, 24});
  const Routing a = router(x), b = router(x.to(torch::kDouble));  // the FP64 input takes the composition
  EXPECT_TRUE(at::equal(a.indices, b.indices));
  EXPECT_TRUE(torch::allclose(a.gates.to(torch::kDouble), b.gates, 1e-6, 1e-6));
  // Plain top-k (no bias, no groups) as at::topk orders it.
  const at::Tensor plain = fused_cpu::route_top_k(a.scores.detach(), {}, 1, 1, 6);
  EXPECT_TRUE(at::equal(plain, std::get<1>(b.scores.detach().topk(6, -1))));
}

TEST(FusedCpu, CausalAttentionMatchesScaledDotProductAttention) {
  torch::manual_seed(7);
  // [B, T, H, ·] tensors seen as [B, H, T, ·] (as MLA hands them over); query blocks of 32 with a partial last block
  // (T 77) and more keys than one register tile (T 150); head dims with remainders (D 20, Dv 12) and v narrower than
  // q and k (no padding).
  for (const int64_t T : {5, 77, 150}) {
    const at::Tensor q = torch::randn({2, T, 3, 20}), k = torch::randn({2, T, 3, 20}), v = torch::randn({2, T, 3, 12});
    expect_fp32_matches_fp64({q, k, v}, [](const auto& in) {
      return causal_attention(in[0].transpose(1, 2), in[1].transpose(1, 2), in[2].transpose(1, 2), 0.4);
    });
  }
  // The FP64 composition is ATen's own attention; the log-sum-exp is each query's over the keys it sees.
  const at::Tensor q = torch::randn({1, 2, 9, 8}), k = torch::randn({1, 2, 9, 8}), v = torch::randn({1, 2, 9, 8});
  const auto [o, lse] = fused_cpu::causal_attention(q, k, v, 0.5);
  const at::Tensor scores = torch::matmul(q, k.transpose(-2, -1)) * 0.5;
  const at::Tensor masked = scores.masked_fill(torch::ones({9, 9}, torch::kBool).triu(1), -INFINITY);
  EXPECT_TRUE(torch::allclose(lse, masked.logsumexp(-1), 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(o, torch::matmul(torch::softmax(masked, -1), v), 1e-5, 1e-5));
  EXPECT_TRUE(fused_causal_attention(torch::kFloat, torch::kCPU));
  EXPECT_FALSE(fused_causal_attention(torch::kBFloat16, torch::kCPU));
}

TEST(FusedCpu, GroupedGemmsMatchPerExpertProducts) {
  torch::manual_seed(8);
  // Blocks of 70, 0, 129 and 3 rows (more than one task of 64 rows, an expert without rows) and 2 rows after the last
  // block; widths with remainders (K 20, N 40: strips of 32 and single columns) and one of two full strips (N 128).
  const std::vector<int64_t> counts{70, 0, 129, 3};
  const at::Tensor ends = torch::tensor({70, 70, 199, 202}, torch::kInt);
  for (const int64_t N : {40, 128}) {
    const at::Tensor x = torch::randn({204, 20}), b = torch::randn({4, 20, N}), dy = torch::randn({204, N});
    const at::Tensor y = fused_cpu::grouped_gemm(x, b, ends), dw = fused_cpu::grouped_gemm_tn(dy, x, ends);
    int64_t first = 0;
    for (size_t e = 0; e < counts.size(); ++e) {
      const at::Tensor xe = x.narrow(0, first, counts[e]).to(torch::kDouble);
      const at::Tensor ge = dy.narrow(0, first, counts[e]).to(torch::kDouble);
      EXPECT_TRUE(torch::allclose(y.narrow(0, first, counts[e]).to(torch::kDouble),
                                  torch::mm(xe, b[e].to(torch::kDouble)), 1e-5, 1e-5))
          << "expert " << e << ", N " << N;
      EXPECT_TRUE(torch::allclose(dw[e].to(torch::kDouble), torch::mm(ge.t(), xe), 1e-5, 1e-5))
          << "expert " << e << ", N " << N;
      first += counts[e];
    }
    EXPECT_EQ(dw[1].abs().max().item<float>(), 0.0f);  // no rows: a zero gradient
    EXPECT_EQ(y.narrow(0, 202, 2).abs().max().item<float>(), 0.0f);
  }
  EXPECT_THROW(fused_cpu::grouped_gemm(torch::randn({5, 20}), torch::randn({4, 20, 8}), ends), c10::Error);
}

}  // namespace
}  // namespace moetrain::model
