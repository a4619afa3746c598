#include "cli/plan.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "config/count.h"
#include "config/loader.h"

namespace moetrain::cli {
namespace {

config::Config tiny(std::vector<std::string> overrides) {
  return config::load_config(std::string(MOETRAIN_SOURCE_DIR) + "/configs/tiny.yaml", {std::move(overrides), 0});
}

int64_t sum_stage_params(const Plan& plan) {
  int64_t s = 0;
  for (const auto& st : plan.stages) s += st.params;
  return s;
}

TEST(Plan, OneRankHoldsEveryParameterOnce) {
  config::Config c = tiny({"parallel.pp=1", "parallel.dp=1", "parallel.ep=1"});
  Plan plan = make_plan(c);
  ASSERT_EQ(plan.stages.size(), 1u);
  EXPECT_EQ(plan.stages[0].params, plan.params.main_total() + plan.params.mtp_total());
}

TEST(Plan, ExpertsAreShardedOverEp) {
  config::Config one = tiny({"parallel.pp=1", "parallel.dp=2", "parallel.ep=1"});
  config::Config two = tiny({"parallel.pp=1", "parallel.dp=2", "parallel.ep=2"});
  const auto& m = one.model;
  // Routed experts of the 3 MoE layers and of the MoE block of the one MTP module: half of them leave each rank.
  int64_t routed = 4 * m.n_routed_experts * 3 * m.hidden_size * m.moe_inter_dim;
  EXPECT_EQ(sum_stage_params(make_plan(one)) - sum_stage_params(make_plan(two)), routed / 2);
}

TEST(Plan, PipelineStagesSplitLayersAndCopyTheEmbeddingForMtp) {
  config::Config c = tiny({"parallel.ep=1"});  // pp 2, dp 2
  Plan plan = make_plan(c);
  ASSERT_EQ(plan.stages.size(), 2u);
  EXPECT_EQ(plan.stages[0].layers, 2);
  EXPECT_EQ(plan.stages[1].first_layer, 2);
  // Every parameter once, plus the last stage's copy of the embedding that the MTP module uses.
  EXPECT_EQ(sum_stage_params(plan), plan.params.main_total() + plan.params.mtp_total() + plan.params.embedding);
}

TEST(Plan, MemoryFollowsThePrecisionPolicy) {
  config::Config c = tiny({"parallel.pp=1", "parallel.dp=1", "parallel.ep=1"});
  StagePlan fp32 = make_plan(c).stages[0];
  double p = static_cast<double>(fp32.params);
  EXPECT_DOUBLE_EQ(fp32.weight_bytes, 4 * p);
  EXPECT_DOUBLE_EQ(fp32.grad_bytes, 4 * p);
  EXPECT_DOUBLE_EQ(fp32.optimizer_bytes, 8 * p);
  c.precision.mode = config::PrecisionMode::kBf16;
  c.precision.moment_dtype = config::MomentDtype::kBf16;
  StagePlan bf16 = make_plan(c).stages[0];
  EXPECT_DOUBLE_EQ(fp32.master_bytes, 0);  // the FP32 parameters are the master weights
  EXPECT_DOUBLE_EQ(bf16.weight_bytes, 2 * p);  // BF16 parameters
  EXPECT_DOUBLE_EQ(bf16.master_bytes, 4 * p);  // FP32 master weights, whole on one rank
  EXPECT_DOUBLE_EQ(bf16.optimizer_bytes, 4 * p);
  // BF16 activations halve everything but the FP32 router scores and logits.
  EXPECT_LT(bf16.activation_bytes, fp32.activation_bytes);
  EXPECT_GT(bf16.activation_bytes, fp32.activation_bytes / 2);
}

// ZeRO-1 over dp 4 (ep 2, edp 2): master weights and moments are 1/4 of the dense parameters' and 1/2 of the routed
// experts'; the reduce-scatter is in place: nothing transient besides the activations.
TEST(Plan, ZeroOnePartitionsMasterWeightsAndMoments) {
  config::Config c = tiny({"parallel.pp=1", "parallel.dp=4", "parallel.ep=2", "precision.mode=bf16",
                           "parallel.distributed_optimizer=false"});
  const StagePlan whole = make_plan(c).stages[0];
  c.parallel.distributed_optimizer = true;
  const StagePlan zero = make_plan(c).stages[0];
  const double p = static_cast<double>(whole.params);
  EXPECT_DOUBLE_EQ(whole.master_bytes, 4 * p);
  EXPECT_DOUBLE_EQ(zero.weight_bytes, whole.weight_bytes);  // BF16 parameters on every replica
  EXPECT_DOUBLE_EQ(zero.grad_bytes, whole.grad_bytes);
  EXPECT_LT(zero.master_bytes, whole.master_bytes / 2);
  EXPECT_GT(zero.master_bytes, whole.master_bytes / 4);
  EXPECT_DOUBLE_EQ(zero.optimizer_bytes / zero.master_bytes, whole.optimizer_bytes / whole.master_bytes);
  EXPECT_DOUBLE_EQ(zero.total_bytes(), zero.state_bytes() + zero.activation_bytes);
}

TEST(Plan, OneFOneBKeepsPpMinusStageMicroBatchesInFlight) {
  config::Config c = tiny({"parallel.pp=4", "parallel.dp=1", "parallel.ep=1", "train.global_batch_size=32"});
  Plan plan = make_plan(c);
  std::vector<int64_t> in_flight;
  for (const auto& s : plan.stages) in_flight.push_back(s.in_flight_micro_batches);
  EXPECT_EQ(in_flight, (std::vector<int64_t>{4, 3, 2, 1}));
  // Same layers on stages 1 and 2: activations in proportion to the micro-batches in flight.
  EXPECT_DOUBLE_EQ(plan.stages[1].activation_bytes / 3, plan.stages[2].activation_bytes / 2);
  // And its bubble, (pp − 1) / (m + pp − 1) = 3 / 11, also at the first step of a batch-size ramp (m = 4: 3 / 7).
  EXPECT_NE(format_plan(plan, c).find("pipeline    1F1B over 4 stages: bubble (pp−1)/(m+pp−1) = 0.273 at m = 8"),
            std::string::npos);
  c = tiny({"parallel.pp=4", "parallel.dp=1", "parallel.ep=1", "train.global_batch_size=32",
            "train.batch_rampup_start=16", "train.batch_rampup_increment=4", "train.batch_rampup_tokens=100000"});
  EXPECT_NE(format_plan(make_plan(c), c).find("(0.429 at the ramp's first m = 4)"), std::string::npos);
}

// Interleaved 1F1B: rank s holds chunks s and pp + s (virtual stages c·pp + s) and its warm-up keeps more chunk
// forwards alive, (pp − s − 1)·2 + (v − 1)·pp + 1 of them (11, 9, 7, 5 at pp 4, v 2, m 8), each of one chunk.
TEST(Plan, InterleavedHoldsTwoChunksPerRankAndMoreForwardsInFlight) {
  config::Config c = tiny({"parallel.pp=4", "parallel.dp=1", "parallel.ep=1", "train.global_batch_size=32",
                           "model.num_layers=8", "parallel.schedule=interleaved", "parallel.virtual_stages=2"});
  Plan plan = make_plan(c);
  std::vector<int64_t> in_flight;
  for (const auto& s : plan.stages) in_flight.push_back(s.in_flight_micro_batches);
  EXPECT_EQ(in_flight, (std::vector<int64_t>{11, 9, 7, 5}));
  EXPECT_EQ(plan.stages[1].chunks, (std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {5, 1}}));
  EXPECT_EQ(plan.stages[1].layers, 2);
  // Stages 1 and 2 hold the same kinds of layers: activations in proportion to the chunk forwards in flight.
  EXPECT_DOUBLE_EQ(plan.stages[1].activation_bytes / 9, plan.stages[2].activation_bytes / 7);
  // The same layers under 1F1B: 3 forwards of 2 layers on stage 1, against 9 of one layer here.
  config::Config one = tiny({"parallel.pp=4", "parallel.dp=1", "parallel.ep=1", "train.global_batch_size=32",
                             "model.num_layers=8"});
  EXPECT_DOUBLE_EQ(plan.stages[1].activation_bytes / make_plan(one).stages[1].activation_bytes, 9.0 / 6.0);
  EXPECT_EQ(plan.stages[1].params, make_plan(one).stages[1].params);
  const std::string text = format_plan(plan, c);
  EXPECT_NE(text.find("pipeline    interleaved 1F1B over 4 stages × 2 chunks: bubble (pp−1)/(v·m+pp−1) = 0.158 at "
                      "m = 8"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("    1 "), std::string::npos);
  EXPECT_NE(text.find("1,5"), std::string::npos) << text;
  EXPECT_EQ(plan_json(plan, c)["pipeline_schedule"], "interleaved");
}

// DualPipeV: rank r holds virtual stages r and 2·pp − 1 − r, so rank 0 holds the embedding and the head; every rank
// keeps at most 2·pp + 1 chunk forwards alive (a split backward's inputs count until its W pass), the same on every
// rank (DualPipe's balanced activations), against 1F1B's pp − stage.
TEST(Plan, DualPipeVFoldsTheStagesIntoAV) {
  config::Config c = tiny({"parallel.pp=4", "parallel.dp=1", "parallel.ep=1", "train.global_batch_size=32",
                           "model.num_layers=8", "parallel.schedule=dualpipev"});
  EXPECT_EQ(c.parallel.virtual_stages, 2);  // derived
  Plan plan = make_plan(c);
  std::vector<int64_t> in_flight;
  for (const auto& s : plan.stages) in_flight.push_back(s.in_flight_micro_batches);
  EXPECT_EQ(in_flight, (std::vector<int64_t>{9, 9, 9, 9}));
  EXPECT_EQ(plan.stages[0].chunks, (std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {7, 1}}));
  EXPECT_EQ(plan.stages[3].chunks, (std::vector<std::pair<int64_t, int64_t>>{{3, 1}, {4, 1}}));
  // Rank 0: the embedding and the head (MTP too); the others: two MoE layers each, as rank 1 of 1F1B.
  EXPECT_GT(plan.stages[0].params, plan.stages[1].params + plan.params.embedding);
  EXPECT_EQ(plan.stages[1].params, plan.stages[3].params);
  const std::string text = format_plan(plan, c);
  EXPECT_NE(text.find("pipeline    DualPipeV over 4 ranks × 2 chunks in a V: bubble (pp−1)/(6m+pp−1) (chunk passes F = "
                      "B = W, no F&B overlap) = 0.059 at m = 8"),
            std::string::npos)
      << text;
  EXPECT_EQ(plan_json(plan, c)["pipeline_schedule"], "dualpipev");
}

// Counts that overflow 64 bits raise CountOverflow instead of wrapping; check_plan_counts names the key.
TEST(Plan, CountsThatOverflowNameTheKey) {
  config::Config c = tiny({"model.num_layers=1e18"});  // the loader's batch and layout products all fit
  EXPECT_THROW(make_plan(c), config::CountOverflow);
  try {
    check_plan_counts(c);
    ADD_FAILURE() << "no ConfigError";
  } catch (const config::ConfigError& e) {
    EXPECT_STREQ(e.what(), "--set model.num_layers=1e18: model.num_layers: 1000000000000000000 makes the model's "
                           "parameter count overflow 64 bits");
  }
  c = tiny({"model.n_routed_experts=1125899906842624"});  // 2^50 experts in each MoE block
  EXPECT_THROW(check_plan_counts(c), config::ConfigError);
  EXPECT_NO_THROW(check_plan_counts(tiny({})));
}

// Parameters and activations are counted per kind of layer, not per layer: a trillion layers plan at once.
TEST(Plan, LayersAreCountedPerKind) {
  const int64_t layers = 1'000'000'000'000;
  config::Config c =
      tiny({"parallel.pp=1", "parallel.dp=1", "parallel.ep=1", fmt::format("model.num_layers={}", layers)});
  Plan plan = make_plan(c);
  const auto dense = model::block_params(c.model, 0), moe = model::block_params(c.model, 1);
  EXPECT_EQ(plan.params.layers_total, dense.total() + (layers - 1) * moe.total());
  EXPECT_EQ(plan.stages[0].params, plan.params.main_total() + plan.params.mtp_total());
}

TEST(Plan, CpuTrainingMustFitThisMachine) {
  config::Config c = tiny({"parallel.pp=1", "parallel.dp=1", "parallel.ep=1"});
  const StagePlan s = make_plan(c).stages[0];
  const double state = s.state_bytes();
  EXPECT_NO_THROW(check_fits_in_ram(make_plan(c), c, state));
  try {
    check_fits_in_ram(make_plan(c), c, state / 2);
    ADD_FAILURE() << "no ConfigError";
  } catch (const config::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("train.device = cpu: the plan's weights, gradients and optimizer state "
                                         "take "),
              std::string::npos)
        << e.what();
  }
  // Activations are estimated without recomputation: only beyond kRamOvercommit × RAM are they refused.
  c = tiny({"parallel.pp=1", "parallel.dp=1", "parallel.ep=1", "train.global_batch_size=0",
            "train.micro_batch_size=100000"});
  const StagePlan big = make_plan(c).stages[0];
  EXPECT_NO_THROW(check_fits_in_ram(make_plan(c), c, big.total_bytes() / kRamOvercommit));
  EXPECT_THROW(check_fits_in_ram(make_plan(c), c, big.total_bytes() / kRamOvercommit / 2), config::ConfigError);
  // A GPU config is not held against host RAM.
  c.train.device = config::Device::kCuda;
  EXPECT_NO_THROW(check_fits_in_ram(make_plan(c), c, 1.0));
  EXPECT_GT(physical_ram_bytes(), 0.0);
}

// train.memory_budget_gib: the first stage over the budget is named with its largest part and a remedy for it.
TEST(Plan, MemoryBudget) {
  config::Config c = tiny({"parallel.pp=1", "parallel.dp=1", "parallel.ep=1"});
  const Plan plan = make_plan(c);
  const double total = plan.stages[0].total_bytes();
  c.train.memory_budget_gib = 0;  // no budget
  EXPECT_NO_THROW(check_memory_budget(plan, c));
  c.train.memory_budget_gib = total / (1024.0 * 1024 * 1024) * 1.01;
  EXPECT_NO_THROW(check_memory_budget(plan, c));
  c.train.memory_budget_gib = total / (1024.0 * 1024 * 1024) * 0.99;
  try {
    check_memory_budget(plan, c);
    ADD_FAILURE() << "no ConfigError";
  } catch (const config::ConfigError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("stage 0 needs"), std::string::npos) << what;
    EXPECT_NE(what.find("its largest part is activations"), std::string::npos) << what;  // tiny: activations lead
    EXPECT_NE(what.find("train.micro_batch_size"), std::string::npos) << what;
  }
  // DeepSeek-V3 as shipped (fp8, selective recomputation, ZeRO-1, BF16 moments) fits 80 GiB per rank on every
  // stage; without ZeRO-1, or without recomputation, it does not.
  const std::string v3_file = std::string(MOETRAIN_SOURCE_DIR) + "/configs/deepseek-v3-671b.yaml";
  config::Config v3 = config::load_config(v3_file, {{"train.memory_budget_gib=80"}, 0});
  const Plan v3_plan = make_plan(v3);
  EXPECT_NO_THROW(check_memory_budget(v3_plan, v3));
  for (const StagePlan& s : v3_plan.stages) EXPECT_LE(s.total_bytes(), 80.0 * 1024 * 1024 * 1024) << s.stage;
  for (const char* without : {"model.recompute=none", "parallel.distributed_optimizer=false"}) {
    config::Config c3 = config::load_config(v3_file, {{"train.memory_budget_gib=80", without}, 0});
    EXPECT_THROW(check_memory_budget(make_plan(c3), c3), config::ConfigError) << without;
  }
}

TEST(Plan, TextAndJson) {
  config::Config c = config::load_config(std::string(MOETRAIN_SOURCE_DIR) + "/configs/deepseek-v3-671b.yaml");
  Plan plan = make_plan(c);
  EXPECT_EQ(plan.tokens_per_step, 4096LL * 1 * 120 * 128);
  std::string text = format_plan(plan, c);
  EXPECT_NE(text.find("671.03 B"), std::string::npos) << text;
  EXPECT_NE(text.find("37.55 B"), std::string::npos) << text;
  // The recipe's tails: the last learning-rate phase and the end of the bias updates.
  EXPECT_NE(text.find("the last 2655 steps (167.04 B tokens) at 7.3e-06"), std::string::npos) << text;
  EXPECT_NE(text.find("bias updates stop after 14.30 T tokens"), std::string::npos) << text;
  nlohmann::json j = plan_json(plan, c);
  EXPECT_EQ(j["schedule"]["lr_final_steps"].get<int64_t>(), 2655);
  EXPECT_EQ(j["params"]["main_total"].get<int64_t>(), plan.params.main_total());
  EXPECT_EQ(j["stages"].size(), 16u);
}

}  // namespace
}  // namespace moetrain::cli
