// model.recompute: the same losses and gradients as without recomputation, less
// memory held for the backward pass.
#include "model/recompute.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>

#include "model/transformer.h"
#include "tests/model/test_models.h"
#include "trainer/memory_meter.h"

namespace moetrain::model {
namespace {

struct Pass {
  std::vector<double> losses;               // lm, mtp, balance
  std::vector<at::Tensor> counts;           // tokens per expert, per MoE layer
  std::map<std::string, at::Tensor> grads;  // every parameter's gradient
  int64_t held_bytes = 0;                   // live tensor bytes after the forward pass, beyond the model's
};

config::ModelConfig recompute_model(config::Recompute r) {
  config::ModelConfig m = testing::tiny_model();
  m.hidden_size = 32;
  m.dense_inter_dim = 48;
  m.moe_inter_dim = 16;
  m.recompute = r;
  return m;
}

Pass run(config::Recompute r, precision::Mode mode, bool fp64 = false) {
  trainer::count_cpu_tensors();
  const config::ModelConfig m = recompute_model(r);
  Transformer t(m, StageSpec::whole(m), mode);
  init_parameters(*t, 7, m.init_std);
  if (fp64) t->to(at::kDouble);
  at::Generator gen = at::detail::createCPUGenerator(11);
  const at::Tensor window =
      at::randint(m.vocab_size, {4, 24 + 1 + m.mtp_depth}, gen, at::TensorOptions().dtype(at::kLong));
  LocalExpertExchange exchange;
  const int64_t before = trainer::tensor_memory(c10::Device(c10::kCPU)).live_bytes;
  Pass p;
  {
    LossSums s = t->forward(window, exchange);
    p.held_bytes = trainer::tensor_memory(c10::Device(c10::kCPU)).live_bytes - before;
    at::Tensor loss = s.lm + 0.3 * s.mtp[0] + s.balance;
    p.losses = {s.lm.item<double>(), s.mtp[0].item<double>(), s.balance.item<double>()};
    for (const auto& st : s.moe) p.counts.push_back(st.counts);
    loss.backward();
  }
  for (const auto& item : t->named_parameters()) p.grads[item.key()] = item.value().grad().clone();
  return p;
}

// Recomputation runs the same ops on the same inputs; only the order in which a tensor's gradient contributions are
// summed could change (it does not today: the differences print as 0). FP64 and FP32 gradients agree to 1e-12 and
// 1e-7 relative (the whole gradient and each tensor), BF16 to 1e-3; the losses and the expert counts the balancer
// sees are the same.
TEST(Recompute, SameLossesGradientsAndCountsAsWithout) {
  struct Case {
    precision::Mode mode;
    bool fp64;
    double whole, each;  // tolerances: the whole gradient, each tensor (relative, 2-norm)
  };
  for (const Case& c : {Case{precision::Mode::kFp32, true, 1e-12, 1e-12}, Case{precision::Mode::kFp32, false, 1e-7, 1e-7},
                        Case{precision::Mode::kBf16, false, 1e-3, 1e-3}}) {
    const Pass none = run(config::Recompute::kNone, c.mode, c.fp64);
    for (config::Recompute r : {config::Recompute::kSelective, config::Recompute::kFull}) {
      const Pass p = run(r, c.mode, c.fp64);
      const std::string what =
          std::string(config::name(r)) + " " + (c.fp64 ? "fp64" : std::string(config::name(c.mode)));
      for (size_t i = 0; i < none.losses.size(); ++i)
        EXPECT_NEAR(p.losses[i], none.losses[i], 1e-7 * std::abs(none.losses[i])) << what << " loss " << i;
      ASSERT_EQ(p.counts.size(), none.counts.size()) << what;
      for (size_t i = 0; i < p.counts.size(); ++i) EXPECT_TRUE(torch::equal(p.counts[i], none.counts[i])) << what;
      ASSERT_EQ(p.grads.size(), none.grads.size());
      double diff = 0, norm = 0, worst = 0;
      for (const auto& [name, g] : none.grads) {
        const at::Tensor d = p.grads.at(name).to(at::kDouble) - g.to(at::kDouble);
        const double dn = d.norm().item<double>(), gn = g.to(at::kDouble).norm().item<double>();
        diff += dn * dn;
        norm += gn * gn;
        EXPECT_LE(dn, c.each * std::max(gn, 1e-30)) << what << " " << name;
        worst = std::max(worst, dn / std::max(gn, 1e-30));
      }
      const double whole = std::sqrt(diff / norm);
      EXPECT_LE(whole, c.whole) << what;
      std::printf("%s: gradient difference %.3g relative (largest of one tensor %.3g)\n", what.c_str(), whole, worst);
    }
  }
}

// What the forward pass leaves alive for the backward pass shrinks: selective
// below none, full below selective.
TEST(Recompute, HoldsLessForTheBackwardPass) {
  const int64_t none = run(config::Recompute::kNone, precision::Mode::kFp32).held_bytes;
  const int64_t selective = run(config::Recompute::kSelective, precision::Mode::kFp32).held_bytes;
  const int64_t full = run(config::Recompute::kFull, precision::Mode::kFp32).held_bytes;
  std::printf("bytes held after the forward pass: none %ld, selective %ld, full %ld\n", static_cast<long>(none),
              static_cast<long>(selective), static_cast<long>(full));
  EXPECT_LT(selective, none * 0.9);
  EXPECT_LT(full, selective * 0.7);
}

// In bf16 mode the residual stream is BF16 (the embedding's output, every block's) and the forward pass holds a
// third less for the backward pass than in fp32 mode in this tiny model, whose FP32 log-probabilities over the
// vocabulary weigh much (bench/memory on configs/small-cpu.yaml: about half).
TEST(LowPrecisionActivations, Bf16ResidualStreamAndLessHeld) {
  const config::ModelConfig m = recompute_model(config::Recompute::kNone);
  Transformer t(m, StageSpec::whole(m), precision::Mode::kBf16);
  init_parameters(*t, 7, m.init_std);
  EXPECT_EQ(t->activation_dtype(), at::kBFloat16);
  const at::Tensor tokens = at::randint(m.vocab_size, {2, 8}, at::TensorOptions().dtype(at::kLong));
  at::Tensor h = t->embed_tokens(tokens);
  EXPECT_EQ(h.scalar_type(), at::kBFloat16);
  LocalExpertExchange exchange;
  std::vector<MoeStats> stats;
  for (auto& block : t->layers) {
    h = block->forward(h, exchange, stats);
    EXPECT_EQ(h.scalar_type(), at::kBFloat16);
  }
  Transformer f(m, StageSpec::whole(m), precision::Mode::kFp32);
  EXPECT_EQ(f->activation_dtype(), at::kFloat);

  const int64_t fp32 = run(config::Recompute::kNone, precision::Mode::kFp32).held_bytes;
  const int64_t bf16 = run(config::Recompute::kNone, precision::Mode::kBf16).held_bytes;
  std::printf("bytes held after the forward pass: fp32 %ld, bf16 %ld (%.1f%% less)\n", static_cast<long>(fp32),
              static_cast<long>(bf16), 100.0 * (1.0 - static_cast<double>(bf16) / static_cast<double>(fp32)));
  EXPECT_LT(bf16, fp32 * 0.67);
}

// A segment with gradients off is just the function; with them, its backward
// runs it again and the parameter inside gets the gradient it would have had.
TEST(Recompute, SegmentGradientsMatchTheDirectGraph) {
  at::Tensor w = torch::randn({3, 3}, torch::requires_grad());
  at::Tensor x = torch::randn({2, 3}, torch::requires_grad());
  int calls = 0;
  Segment f = [&](const std::vector<at::Tensor>& in) {
    ++calls;
    return std::vector<at::Tensor>{torch::tanh(in[0].matmul(w)), in[0].sum()};
  };
  std::vector<at::Tensor> out = recompute(f, {x});
  EXPECT_EQ(calls, 1);
  (out[0].pow(2).sum() + 3 * out[1]).backward();
  EXPECT_EQ(calls, 2);
  at::Tensor gw = w.grad().clone(), gx = x.grad().clone();
  w.mutable_grad().reset();
  x.mutable_grad().reset();
  (torch::tanh(x.matmul(w)).pow(2).sum() + 3 * x.sum()).backward();
  EXPECT_TRUE(torch::allclose(gw, w.grad(), 0, 1e-7));
  EXPECT_TRUE(torch::allclose(gx, x.grad(), 0, 1e-7));
  {
    torch::NoGradGuard no_grad;
    std::vector<at::Tensor> plain = recompute(f, {x});
    EXPECT_FALSE(plain[0].requires_grad());
  }
}

}  // namespace
}  // namespace moetrain::model
