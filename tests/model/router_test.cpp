#include "model/router.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <set>

#include "model/balancer.h"
#include "model/moe_load.h"
#include "model/moe.h"
#include "model/transformer.h"
#include "tests/model/test_models.h"

namespace moetrain::model {
namespace {

config::ModelConfig router_config() {
  config::ModelConfig m = testing::tiny_model();
  m.hidden_size = 8;
  m.n_routed_experts = 12;
  m.n_group = 4;      // 3 experts per group
  m.topk_group = 2;
  m.top_k = 3;
  m.routed_scaling_factor = 2.5;
  return m;
}

// The reference selection, token by token with plain loops: groups ranked by the sum of their two best biased
// scores, the best topk_group kept, then the top_k biased scores among the kept groups' experts.
std::set<int64_t> naive_select(const at::Tensor& biased_row, const config::ModelConfig& m, std::set<int64_t>* kept) {
  const int64_t per = m.n_routed_experts / m.n_group;
  std::vector<std::pair<double, int64_t>> groups;
  for (int64_t g = 0; g < m.n_group; ++g) {
    std::vector<double> s;
    for (int64_t e = g * per; e < (g + 1) * per; ++e) s.push_back(biased_row[e].item<double>());
    std::sort(s.rbegin(), s.rend());
    groups.push_back({s[0] + s[1], g});
  }
  std::sort(groups.rbegin(), groups.rend());
  std::vector<std::pair<double, int64_t>> experts;
  for (int64_t i = 0; i < m.topk_group; ++i) {
    kept->insert(groups[i].second);
    for (int64_t e = groups[i].second * per; e < (groups[i].second + 1) * per; ++e)
      experts.push_back({biased_row[e].item<double>(), e});
  }
  std::sort(experts.rbegin(), experts.rend());
  std::set<int64_t> chosen;
  for (int64_t k = 0; k < m.top_k; ++k) chosen.insert(experts[k].second);
  return chosen;
}

TEST(Router, GroupLimitedSelectionMatchesReference) {
  config::ModelConfig m = router_config();
  Router router(m);
  init_parameters(*router, 5, 0.5);
  torch::manual_seed(1);
  {
    torch::NoGradGuard g;
    router->bias.copy_(torch::randn({m.n_routed_experts}) * 0.1);
  }
  at::Tensor x = torch::randn({64, m.hidden_size});
  Routing r = router->forward(x);
  at::Tensor biased = r.scores + router->bias;
  const int64_t per = m.n_routed_experts / m.n_group;
  for (int64_t t = 0; t < x.size(0); ++t) {
    std::set<int64_t> kept;
    std::set<int64_t> want = naive_select(biased[t], m, &kept);
    std::set<int64_t> got;
    for (int64_t k = 0; k < m.top_k; ++k) got.insert(r.indices[t][k].item<int64_t>());
    EXPECT_EQ(got, want) << "token " << t;
    for (int64_t e : got) EXPECT_TRUE(kept.count(e / per)) << "expert " << e << " outside the kept groups";
  }
}

// The bias decides which experts are chosen; the gates are always the unbiased sigmoid scores of the chosen
// experts, normalized over them, times the scaling factor.
TEST(Router, BiasSelectsButNeverChangesGateValues) {
  config::ModelConfig m = router_config();
  m.n_group = 1;
  m.topk_group = 1;
  Router router(m);
  init_parameters(*router, 9, 0.5);
  torch::manual_seed(2);
  at::Tensor x = torch::randn({32, m.hidden_size});
  Routing before = router->forward(x);
  {
    torch::NoGradGuard g;
    router->bias[11] = 10.0f;  // expert 11 now wins every token
  }
  Routing after = router->forward(x);
  EXPECT_TRUE(torch::allclose(before.scores, after.scores));
  int64_t changed = 0;
  for (int64_t t = 0; t < 32; ++t) {
    std::set<int64_t> a, b;
    for (int64_t k = 0; k < m.top_k; ++k) {
      a.insert(before.indices[t][k].item<int64_t>());
      b.insert(after.indices[t][k].item<int64_t>());
    }
    EXPECT_TRUE(b.count(11));
    changed += a != b;
  }
  EXPECT_GT(changed, 0);
  for (const Routing* r : {&before, &after}) {
    at::Tensor s = r->scores.gather(1, r->indices);
    EXPECT_TRUE(torch::allclose(r->gates, s / s.sum(1, true) * m.routed_scaling_factor, 1e-6, 1e-6));
  }
  // A bias that shifts every expert equally changes nothing at all.
  {
    torch::NoGradGuard g;
    router->bias.fill_(0.7f);
  }
  Routing shifted = router->forward(x);
  EXPECT_TRUE(torch::equal(std::get<0>(shifted.indices.sort(1)), std::get<0>(before.indices.sort(1))));
  EXPECT_TRUE(torch::allclose(std::get<0>(shifted.gates.sort(1)), std::get<0>(before.gates.sort(1))));
}

TEST(Balancer, OverloadedDropsByExactlyUUnderloadedRisesByU) {
  at::Tensor bias = torch::zeros({4}, torch::kFloat);
  at::Tensor counts = torch::tensor({10, 2, 6, 6}, torch::kLong);  // mean 6
  const double u = 1e-3;
  update_bias(bias, counts, u);
  EXPECT_EQ(bias[0].item<float>(), -static_cast<float>(u));
  EXPECT_EQ(bias[1].item<float>(), static_cast<float>(u));
  EXPECT_EQ(bias[2].item<float>(), 0.0f);
  EXPECT_EQ(bias[3].item<float>(), 0.0f);
  update_bias(bias, counts, u);
  EXPECT_EQ(bias[0].item<float>(), -static_cast<float>(u) - static_cast<float>(u));
  EXPECT_DOUBLE_EQ(max_violation(counts), (10.0 - 6.0) / 6.0);
  EXPECT_DOUBLE_EQ(max_violation(torch::zeros({4}, torch::kLong)), 0.0);
}

// One sequence of two tokens over four experts, top-2, computed by hand:
//   scores t0 [0.8, 0.4, 0.2, 0.6] -> normalized [0.4, 0.2, 0.1, 0.3], chosen {0, 3}
//   scores t1 [0.1, 0.3, 0.9, 0.7] -> normalized [0.05, 0.15, 0.45, 0.35], chosen {2, 3}
//   P = [0.225, 0.175, 0.275, 0.325];  f = N/(K·T)·hits = 4/(2·2)·[1, 0, 1, 2]
//   Σ f_i P_i = 0.225 + 0.275 + 0.65 = 1.15, times α.
TEST(BalanceLoss, SequenceWiseByHand) {
  Routing r;
  r.scores = torch::tensor({{0.8, 0.4, 0.2, 0.6}, {0.1, 0.3, 0.9, 0.7}}, torch::kDouble);
  r.indices = torch::tensor({{0, 3}, {2, 3}}, torch::kLong);
  EXPECT_NEAR(balance_loss_sum(r, 1, 2, 2, 1e-4, 0.0).item<double>(), 1.15e-4, 1e-15);
  // Two sequences of one token each: per sequence f = 4/(2·1)·hits.
  //   seq 0: P = [0.4, 0.2, 0.1, 0.3], f = [2, 0, 0, 2] -> 0.8 + 0.6 = 1.4
  //   seq 1: P = [0.05, 0.15, 0.45, 0.35], f = [0, 0, 2, 2] -> 0.9 + 0.7 = 1.6       sum 3.0
  EXPECT_NEAR(balance_loss_sum(r, 2, 1, 2, 1.0, 0.0).item<double>(), 3.0, 1e-12);
  // The classic loss over the micro-batch (both tokens), counted once per sequence: 1.15 × 2 sequences.
  EXPECT_NEAR(balance_loss_sum(r, 2, 1, 2, 0.0, 1.0).item<double>(), 2.3, 1e-12);

  // The selection that routed the tokens (biased, group-limited) is {1, 2} for both: the sequence-wise loss still
  // counts plain top-2 of the unbiased scores ({0, 3} and {2, 3}: 1.15 as above); the classic loss the selection:
  //   f = 4/(2·2)·[0, 2, 2, 0] -> 2·0.175 + 2·0.275 = 0.9, times 2 sequences' worth of micro-batch = 1.8 for (2, 1).
  r.indices = torch::tensor({{1, 2}, {1, 2}}, torch::kLong);
  EXPECT_NEAR(balance_loss_sum(r, 1, 2, 2, 1.0, 0.0).item<double>(), 1.15, 1e-12);
  EXPECT_NEAR(balance_loss_sum(r, 2, 1, 2, 0.0, 1.0).item<double>(), 1.8, 1e-12);
}

// DeepSeek-V3 freezes the biases for the last 500B tokens: the rate is 0 from bias_update_stop_tokens on.
TEST(Balancer, BiasUpdateRateStopsAtItsTokenCount) {
  config::ModelConfig m;
  m.bias_update_rate = 1e-3;
  EXPECT_EQ(bias_update_rate(m, 0), 1e-3);
  EXPECT_EQ(bias_update_rate(m, int64_t{1} << 50), 1e-3);  // 0: never stops
  m.bias_update_stop_tokens = 1000;
  EXPECT_EQ(bias_update_rate(m, 999), 1e-3);
  EXPECT_EQ(bias_update_rate(m, 1000), 0.0);
  EXPECT_EQ(bias_update_rate(m, 5000), 0.0);
}

}  // namespace
}  // namespace moetrain::model
