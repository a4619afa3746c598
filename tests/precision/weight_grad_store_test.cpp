// The split backward of DualPipeV (precision/weight_grad_store.h): deferred weight gradients, computed in a later W
// pass, are the gradients of an ordinary backward pass.
#include "precision/weight_grad_store.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>

#include "model/transformer.h"
#include "tests/model/test_models.h"

namespace moetrain::precision {
namespace {

using Grads = std::map<std::string, at::Tensor>;

// One forward and backward pass of a small model (hidden 128, so that fp8 mode's 1×128 tiles fit) with linear
// layers built for the split; with `defer`, the backward queues the weight gradients as one W unit. Returns the
// gradients right after the backward pass and, with `defer`, after the W pass too.
std::pair<Grads, Grads> pass(Mode mode, bool split_forward, bool defer) {
  config::ModelConfig m = testing::tiny_model();
  m.hidden_size = 128;
  m.dense_inter_dim = 128;
  m.moe_inter_dim = 128;
  m.q_lora_rank = 128;
  m.kv_lora_rank = 128;
  model::Transformer t(m, model::StageSpec::whole(m), mode);
  model::init_parameters(*t, 7, 0.05);
  at::Generator gen = at::detail::createCPUGenerator(11);
  const at::Tensor window =
      at::randint(m.vocab_size, {2, 16 + 1 + m.mtp_depth}, gen, at::TensorOptions().dtype(at::kLong));
  model::LocalExpertExchange exchange;
  WeightGradStore::set_split_forward(split_forward);
  model::LossSums s = t->forward(window, exchange);
  WeightGradStore::set_split_forward(false);
  {
    const DeferWeightGrads split(defer);
    (s.lm + 0.3 * s.mtp[0] + s.balance).backward();
  }
  auto grads = [&] {
    Grads g;
    for (const auto& item : t->named_parameters())
      g[item.key()] = item.value().grad().defined() ? item.value().grad().clone() : at::Tensor();
    return g;
  };
  std::pair<Grads, Grads> out{grads(), {}};
  if (defer) {
    EXPECT_EQ(WeightGradStore::units(), 1u);
    WeightGradStore::run_oldest();
    out.second = grads();
  }
  EXPECT_EQ(WeightGradStore::units(), 0u);
  return out;
}

// In every precision mode: the deferred pass leaves the linear layers' and the routed experts' weights without a
// gradient until its W pass, which then gives every parameter exactly the gradient of the ordinary backward pass.
TEST(WeightGradStore, DeferredWeightGradientsEqualImmediateOnes) {
  for (Mode mode : {Mode::kFp32, Mode::kBf16, Mode::kFp8}) {
    const std::string what(config::name(mode));
    const Grads whole = pass(mode, true, false).first;
    const auto [before_w, after_w] = pass(mode, true, true);
    for (const char* deferred : {"layers.0.attn.wo", "layers.0.mlp.w_down", "layers.1.moe.experts.2.w_gate",
                                 "layers.1.moe.shared.w_up", "mtp.0.proj"})
      EXPECT_FALSE(before_w.at(deferred).defined()) << what << " " << deferred;
    for (const char* immediate : {"layers.0.attn_norm.weight", "embed.weight"})
      EXPECT_TRUE(before_w.at(immediate).defined()) << what << " " << immediate;
    for (const auto& [name, g] : whole) {
      ASSERT_TRUE(after_w.at(name).defined()) << what << " " << name;
      EXPECT_TRUE(torch::equal(after_w.at(name), g)) << what << " " << name;
    }
  }
}

// In fp32 mode the splittable linear layer computes what at::linear's autograd computes.
TEST(WeightGradStore, SplitLinearMatchesLinear) {
  const Grads split = pass(Mode::kFp32, true, false).first, plain = pass(Mode::kFp32, false, false).first;
  for (const auto& [name, g] : plain) {
    const double scale = std::max(g.abs().max().item<double>(), 1e-30);
    EXPECT_LE((split.at(name) - g).abs().max().item<double>(), 1e-6 * scale) << name;
  }
}

}  // namespace
}  // namespace moetrain::precision
