#include "model/param_roles.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <set>

#include "model/moe_load.h"
#include "tests/model/test_models.h"

namespace moetrain::model {
namespace {

// The last stage (layer 1 of 2, MoE, plus MTP) holding ep shard 1 of 2: experts 2 and 3 of every MoE layer.
Transformer last_stage_shard() {
  config::ModelConfig m = testing::tiny_model();
  StageSpec stage = StageSpec::contiguous(1, 1, /*first=*/false, /*last=*/true, ExpertShard{1, 2});
  return Transformer(m, stage);
}

TEST(ParamRoles, RoutedExpertsCarryTheirGlobalRowAndStackedName) {
  Transformer t = last_stage_shard();
  const auto roles = parameter_roles(*t);
  ASSERT_EQ(roles.size(), t->named_parameters().size());
  std::set<std::string> stacked;
  int routed = 0;
  for (const auto& p : roles) {
    const bool expert_name = p.name.find(".experts.") != std::string::npos;
    EXPECT_EQ(p.routed(), expert_name) << p.name;
    EXPECT_TRUE(p.tensor.is_same(t->named_parameters()[p.name])) << p.name;
    if (!p.routed()) continue;
    ++routed;
    EXPECT_EQ(p.expert_rows, 4);
    // "layers.1.moe.experts.3.w_up" -> row 3 of "layers.1.moe.experts.w_up"
    const std::string row = std::to_string(p.expert_row);
    EXPECT_NE(p.name.find(".experts." + row + "."), std::string::npos) << p.name << " row " << row;
    EXPECT_TRUE(p.expert_row == 2 || p.expert_row == 3) << p.name;
    std::string expected = p.name;
    expected.replace(expected.find(".experts." + row + "."), row.size() + 10, ".experts.");
    EXPECT_EQ(p.stacked_name, expected);
    stacked.insert(p.stacked_name);
  }
  // 2 MoE blocks (layer 1, the MTP block) × 2 local experts × 3 matrices.
  EXPECT_EQ(routed, 12);
  EXPECT_EQ(stacked, (std::set<std::string>{"layers.1.moe.experts.w_gate", "layers.1.moe.experts.w_up",
                                            "layers.1.moe.experts.w_down", "mtp.0.block.moe.experts.w_gate",
                                            "mtp.0.block.moe.experts.w_up", "mtp.0.block.moe.experts.w_down"}));
}

TEST(ParamRoles, OnlyTheEmbeddingIsShared) {
  Transformer t = last_stage_shard();  // holds an embedding copy for MTP
  int shared = 0;
  for (const auto& p : parameter_roles(*t)) {
    shared += p.shared_embedding;
    EXPECT_EQ(p.shared_embedding, p.name == "embed.weight") << p.name;
  }
  EXPECT_EQ(shared, 1);
  for (const auto& b : buffer_roles(*t)) EXPECT_FALSE(b.routed() || b.shared_embedding) << b.name;
}

TEST(MoeLoad, RoutersOfAStageKnowTheirLayerInTheWholeModel) {
  config::ModelConfig m = testing::tiny_model();
  m.num_layers = 4;  // layer 0 dense, 1..3 MoE, then the MTP block
  EXPECT_EQ(moe_layer_names(m), (std::vector<std::string>{"layers.1", "layers.2", "layers.3", "mtp.0"}));
  Transformer second(m, StageSpec::contiguous(2, 2, false, true));  // layers 2 and 3, the last stage
  std::vector<int64_t> layers;
  for (const auto& r : moe_routers(*second)) layers.push_back(r.layer);
  EXPECT_EQ(layers, (std::vector<int64_t>{1, 2, 3}));
  Transformer first(m, StageSpec::contiguous(0, 2, true, false));  // layers 0 (dense) and 1
  ASSERT_EQ(moe_routers(*first).size(), 1u);
  EXPECT_EQ(moe_routers(*first)[0].layer, 0);
}

TEST(MoeLoad, TrackerSumsUpdatesBiasesAndTabulates) {
  config::ModelConfig m = testing::tiny_model();  // MoE layers: layers.1, mtp.0; 4 experts
  Transformer t(m, StageSpec::whole(m));
  MoeLoadTracker tracker(*t);
  auto stats = [](std::vector<int64_t> a, std::vector<int64_t> b) {
    return std::vector<MoeStats>{{torch::tensor(a, torch::kLong), {}}, {torch::tensor(b, torch::kLong), {}}};
  };
  tracker.add(stats({1, 2, 3, 6}, {3, 3, 3, 3}));
  tracker.add(stats({1, 0, 1, 2}, {0, 0, 0, 0}));
  EXPECT_THROW(tracker.add({}), std::logic_error);
  tracker.reduce([](at::Tensor& x) { x.mul_(2); });  // as if two identical dp ranks
  tracker.update_biases(0.5);
  // Loads of layers.1: (4, 4, 8, 16), mean 8: below-mean experts gain u, above lose it, at the mean unchanged.
  EXPECT_TRUE(torch::equal(t->layers[1]->moe->router->bias, torch::tensor({0.5f, 0.5f, 0.0f, -0.5f})));
  EXPECT_TRUE(torch::equal(t->mtp[0]->block->moe->router->bias, torch::zeros({4})));
  const at::Tensor table = tracker.layer_table(/*fill=*/true);
  // Then each expert's tokens and each expert's bias.
  ASSERT_EQ(table.sizes(), (std::vector<int64_t>{2, MoeLoadTracker::kColumns + 8}));
  EXPECT_TRUE(torch::equal(table[0].narrow(0, MoeLoadTracker::kColumns, 4), torch::tensor({4.0, 4.0, 8.0, 16.0},
                                                                                          torch::kDouble)));
  EXPECT_TRUE(torch::equal(table[0].narrow(0, MoeLoadTracker::kColumns + 4, 4),
                           torch::tensor({0.5, 0.5, 0.0, -0.5}, torch::kDouble)));
  EXPECT_DOUBLE_EQ(table[0][MoeLoadTracker::kMaxVio].item<double>(), (16.0 - 8.0) / 8.0);
  EXPECT_EQ(table[0][MoeLoadTracker::kMinLoad].item<double>(), 4);
  EXPECT_EQ(table[0][MoeLoadTracker::kMaxLoad].item<double>(), 16);
  EXPECT_EQ(table[0][MoeLoadTracker::kBiasMin].item<double>(), -0.5);
  EXPECT_EQ(table[0][MoeLoadTracker::kBiasMax].item<double>(), 0.5);
  EXPECT_EQ(table[1][MoeLoadTracker::kMaxVio].item<double>(), 0.0);
  EXPECT_EQ(tracker.layer_table(/*fill=*/false).abs().sum().item<double>(), 0.0);
  tracker.reset();
  EXPECT_EQ(tracker.layer_table(true)[0][MoeLoadTracker::kMaxLoad].item<double>(), 0.0);
}

}  // namespace
}  // namespace moetrain::model
