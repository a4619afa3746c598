// The routed experts' two execution paths: one grouped GEMM per projection over the expert-sorted token blocks
// (GPU, bf16 mode) and a loop of per-expert GEMMs (CPU, fp32, fp8). Same function, same gradients.
#include "model/moe.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>

#include "model/expert_exchange.h"
#include "tests/model/test_models.h"

namespace moetrain::model {
namespace {

// A layer of 4 experts on 16-wide rows (the grouped op wants 16-byte aligned rows), weights drawn from `seed`.
MoE small_moe(uint64_t seed) {
  config::ModelConfig m = testing::tiny_model();
  m.hidden_size = 16;
  m.moe_inter_dim = 8;
  m.n_routed_experts = 4;
  torch::manual_seed(seed);
  MoE moe(m, ExpertShard{0, 1});
  for (auto& p : moe->parameters()) {
    at::NoGradGuard no_grad;
    p.normal_(0, 0.3);
  }
  return moe;
}

TEST(MoE, GroupedAndLoopExpertGemmsAgree) {
  MoE moe = small_moe(7);
  const std::vector<int64_t> counts{5, 0, 9, 3};  // an expert without tokens among them
  const at::Tensor tokens = torch::randn({17, 16});
  const at::Tensor dy = torch::randn({17, 16});
  auto run = [&](bool grouped) {
    moe->zero_grad();
    at::Tensor x = tokens.clone().requires_grad_(true);
    at::Tensor y = moe->run_experts(x, counts, grouped);
    y.backward(dy);
    std::vector<at::Tensor> grads{y.detach(), x.grad()};
    for (const auto& e : moe->local_experts)
      for (const at::Tensor& w : {e->w_gate, e->w_up, e->w_down})
        grads.push_back(w.grad().defined() ? w.grad().clone() : torch::zeros_like(w));
    return grads;
  };
  const auto loop = run(false), grouped = run(true);
  ASSERT_EQ(loop.size(), grouped.size());
  // The paths sum in different orders (and BLAS picks kernels by CPU model): agreement to a few FP32 ulps of each
  // tensor's largest entry.
  for (size_t i = 0; i < loop.size(); ++i) {
    const double scale = std::max(1.0, loop[i].abs().max().item<double>());
    EXPECT_LE((loop[i] - grouped[i]).abs().max().item<double>(), 8 * 1.2e-7 * scale)
        << "tensor " << i << " (largest entry " << scale << ")";
  }
  EXPECT_GT(loop[0].abs().max().item<double>(), 0.0);
  // The trainer takes the grouped path on the CPU in FP32 (and BF16), the loop in FP64.
  EXPECT_TRUE(moe->grouped_expert_gemm(tokens));
  EXPECT_FALSE(moe->grouped_expert_gemm(tokens.to(at::kDouble)));
  // A rank that receives no token (an empty view of the dispatched rows and gates) takes the loop, which the
  // grouped op's stride checks would refuse.
  EXPECT_FALSE(moe->grouped_expert_gemm(torch::randn({4, 17}).narrow(0, 0, 0).narrow(1, 0, 16)));
}

// A rank that receives a single token: its row (and its gradient's) can come as a one-row view with row stride 1,
// "contiguous" but refused by the grouped op's 16-byte stride check; the grouped path takes it (and agrees with the
// loop). The demo on 4 ranks (ep 2) stopped with "strides should be multiple of 16 bytes" before.
TEST(MoE, GroupedExpertGemmsTakeASingleTokenView) {
  MoE moe = small_moe(3);
  const std::vector<int64_t> counts{0, 1, 0, 0};
  const at::Tensor row = torch::randn({16}), grad = torch::randn({16});
  auto run = [&](bool grouped) {
    moe->zero_grad();
    at::Tensor x = row.clone().as_strided({1, 16}, {1, 1}).requires_grad_(true);
    EXPECT_TRUE(x.is_contiguous());
    at::Tensor y = moe->run_experts(x, counts, grouped);
    y.backward(grad.clone().as_strided({1, 16}, {1, 1}));
    const auto& e = moe->local_experts[1];
    return std::vector<at::Tensor>{y.detach(), x.grad(), e->w_gate.grad().clone(), e->w_down.grad().clone()};
  };
  std::vector<at::Tensor> loop, grouped;
  auto take = [&](bool g, std::vector<at::Tensor>& out) { out = run(g); };
  take(false, loop);
  ASSERT_NO_THROW(take(true, grouped));
  for (size_t i = 0; i < loop.size(); ++i)
    EXPECT_LE((loop[i] - grouped[i]).abs().max().item<double>(),
              8 * 1.2e-7 * std::max(1.0, loop[i].abs().max().item<double>()))
        << "tensor " << i;
}

// The shared expert's forward runs while the routed copies travel: the layer hands it to the exchange, which runs
// it between starting and finishing the dispatch (parallel/expert_exchange.cpp), and the output is the same.
TEST(MoE, SharedExpertComputesDuringTheDispatch) {
  struct Recording final : ExpertExchange {
    LocalExpertExchange local;
    int meanwhile_runs = 0;
    Dispatched dispatch(const at::Tensor& tokens, const at::Tensor& gates, const std::vector<int64_t>& counts,
                        const std::function<void()>& meanwhile) override {
      Dispatched d = local.dispatch(tokens, gates, counts);
      if (meanwhile) meanwhile(), ++meanwhile_runs;
      return d;
    }
    at::Tensor combine(const at::Tensor& outputs, const Dispatched& d) override { return local.combine(outputs, d); }
  };
  config::ModelConfig m = testing::tiny_model();
  ASSERT_GT(m.n_shared_experts, 0);
  torch::manual_seed(7);
  MoE moe(m, ExpertShard{0, 1});
  for (auto& p : moe->parameters()) {  // registered uninitialized (at::empty)
    at::NoGradGuard no_grad;
    p.normal_(0, 0.3);
  }
  const at::Tensor x = torch::randn({2, 5, m.hidden_size});
  Recording recording;
  LocalExpertExchange plain;
  std::vector<MoeStats> stats;
  const at::Tensor a = moe->forward(x, recording, stats), b = moe->forward(x, plain, stats);
  EXPECT_EQ(recording.meanwhile_runs, 1);
  EXPECT_TRUE(at::equal(a, b));
}

}  // namespace
}  // namespace moetrain::model
