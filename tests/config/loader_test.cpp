#include "config/loader.h"

#include <gtest/gtest.h>

#include <fmt/format.h>

#include <filesystem>
#include <fstream>

#include "config/count.h"

namespace moetrain::config {
namespace {
namespace fs = std::filesystem;

const std::string kRoot = MOETRAIN_SOURCE_DIR;

// A fresh directory per test for the YAML files it writes.
class LoaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("moetrain_loader_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& text) {
    fs::path p = dir_ / name;
    std::ofstream(p) << text;
    return p.string();
  }

  // Loads and returns the ConfigError message ("" if it loaded).
  std::string error_of(const std::string& file, LoadOptions options = {}) {
    try {
      load_config(file, options);
    } catch (const ConfigError& e) {
      return e.what();
    }
    return "";
  }

  fs::path dir_;
};

// The minimal valid config of the tests: one process, a small MoE.
const char* kValid = R"(model:
  num_layers: 4
  n_routed_experts: 8
  top_k: 2
parallel:
  pp: 1
  dp: 1
)";

TEST_F(LoaderTest, ShippedConfigsLoad) {
  Config tiny = load_config(kRoot + "/configs/tiny.yaml");
  EXPECT_EQ(tiny.parallel.pp, 2);
  EXPECT_EQ(tiny.parallel.dp, 2);
  EXPECT_EQ(tiny.parallel.ep, 2);
  EXPECT_EQ(tiny.parallel.world_size, 4);
  Config small = load_config(kRoot + "/configs/small-cpu.yaml");
  EXPECT_EQ(small.model.hidden_size, 128);
  EXPECT_EQ(small.model.mtp_depth, 1);  // inherited from tiny.yaml through `base:`
  Config v3 = load_config(kRoot + "/configs/deepseek-v3-671b.yaml");
  EXPECT_EQ(v3.parallel.world_size, 2048);
  EXPECT_EQ(v3.model.n_routed_experts, 256);
  EXPECT_EQ(v3.model.mtp_loss_weight_switch_tokens, 10'000'000'000'000);  // written 10.0e12
}

TEST_F(LoaderTest, DefaultsFillUnsetKeys) {
  Config c = load_config(write("a.yaml", kValid));
  EXPECT_EQ(c.model.hidden_size, ModelConfig{}.hidden_size);
  EXPECT_EQ(c.where("model.hidden_size"), "");
  EXPECT_EQ(c.where("model.top_k"), write("a.yaml", kValid) + ":4: ");
}

TEST_F(LoaderTest, UnknownKeySuggestsClosest) {
  std::string f = write("a.yaml", "model:\n  num_layers: 4\n  hiden_size: 8\n");
  EXPECT_EQ(error_of(f), f + ":3: unknown key 'model.hiden_size'; did you mean 'model.hidden_size'?");
}

TEST_F(LoaderTest, KeyInWrongSectionSuggestsItsSection) {
  std::string f = write("a.yaml", "parallel:\n  top_k: 2\n");
  EXPECT_EQ(error_of(f), f + ":2: unknown key 'parallel.top_k'; did you mean 'model.top_k'?");
}

TEST_F(LoaderTest, UnknownSectionSuggestsSection) {
  std::string f = write("a.yaml", "modle:\n  num_layers: 4\n");
  EXPECT_EQ(error_of(f), f + ":1: unknown key 'modle'; did you mean 'model'?");
}

TEST_F(LoaderTest, WrongTypes) {
  std::string f = write("a.yaml", "model:\n  num_layers: four\n");
  EXPECT_EQ(error_of(f), f + ":2: model.num_layers: expected an integer, got 'four'");
  f = write("b.yaml", "model:\n  num_layers: 2.5\n");
  EXPECT_EQ(error_of(f), f + ":2: model.num_layers: expected an integer, got '2.5'");
  f = write("c.yaml", "train:\n  lr: fast\n");
  EXPECT_EQ(error_of(f), f + ":2: train.lr: expected a number, got 'fast'");
  f = write("d.yaml", "model:\n  tie_embeddings: maybe\n");
  EXPECT_EQ(error_of(f), f + ":2: model.tie_embeddings: expected true or false, got 'maybe'");
  f = write("e.yaml", "parallel:\n  stage_layers: 4\n");
  EXPECT_EQ(error_of(f), f + ":2: parallel.stage_layers: expected a list of integers like [2, 2], got '4'");
  f = write("f.yaml", "model:\n  num_layers:\n");
  EXPECT_EQ(error_of(f), f + ":2: model.num_layers: expected an integer, got nothing");
  f = write("g.yaml", "model: 4\n");
  EXPECT_EQ(error_of(f), f + ":1: 'model' is a section: expected a mapping of keys, got '4'");
}

TEST_F(LoaderTest, IntegersInExponentForm) {
  Config c = load_config(write("a.yaml", std::string(kValid) + "train:\n  steps: 1e3\n"));
  EXPECT_EQ(c.train.steps, 1000);
}

TEST_F(LoaderTest, OutOfRangeAndChoices) {
  std::string f = write("a.yaml", "model:\n  num_layers: 0\n");
  EXPECT_EQ(error_of(f), f + ":2: model.num_layers: 0 is out of range (must be ≥ 1)");
  f = write("b.yaml", "train:\n  lr: 0\n");
  EXPECT_EQ(error_of(f), f + ":2: train.lr: 0 is out of range (must be > 0 and ≤ 1000)");
  f = write("c.yaml", "train:\n  adam_beta2: 1.5\n");
  EXPECT_EQ(error_of(f), f + ":2: train.adam_beta2: 1.5 is out of range (must be ≥ 0 and < 1)");
  f = write("d.yaml", "precision:\n  mode: fp16\n");
  EXPECT_EQ(error_of(f), f + ":2: precision.mode: 'fp16' is not one of fp32, bf16, fp8");
  f = write("e.yaml", "data:\n  source: [shards]\n");
  EXPECT_EQ(error_of(f), f + ":2: data.source: expected one of synthetic, shards, got a list");
  f = write("f.yaml", "data:\n  valid_fraction: 0.6\n");
  EXPECT_EQ(error_of(f), f + ":2: data.valid_fraction: 0.6 is out of range (must be ≥ 0 and ≤ 0.5)");
}

// β = 1 would divide by zero in AdamW's bias correction 1 − β^t: the range is [0, 1).
TEST_F(LoaderTest, AdamBetasMustBeBelowOne) {
  std::string f = write("a.yaml", "train:\n  adam_beta1: 1\n");
  EXPECT_EQ(error_of(f), f + ":2: train.adam_beta1: 1 is out of range (must be ≥ 0 and < 1)");
  f = write("b.yaml", "train:\n  adam_beta2: 1.0\n");
  EXPECT_EQ(error_of(f), f + ":2: train.adam_beta2: 1.0 is out of range (must be ≥ 0 and < 1)");
  EXPECT_EQ(error_of(write("c.yaml", kValid), {{"train.adam_beta2=1"}, 0}),
            "--set train.adam_beta2=1: train.adam_beta2: 1 is out of range (must be ≥ 0 and < 1)");
  Config c = load_config(write("d.yaml", std::string(kValid) + "train:\n  adam_beta1: 0\n  adam_beta2: 0.999\n"));
  EXPECT_DOUBLE_EQ(c.train.adam_beta1, 0);
  EXPECT_DOUBLE_EQ(c.train.adam_beta2, 0.999);
}

TEST_F(LoaderTest, ChoicesParseToTheirEnums) {
  std::string f = write("a.yaml", std::string(kValid) +
                                      "precision:\n  mode: bf16\n  moment_dtype: bf16\ntrain:\n  device: cuda\n");
  Config c = load_config(f, {{"model.balance_mode=aux_loss"}, 0});
  EXPECT_EQ(c.precision.mode, PrecisionMode::kBf16);
  EXPECT_EQ(c.precision.moment_dtype, MomentDtype::kBf16);
  EXPECT_EQ(c.train.device, Device::kCuda);
  EXPECT_EQ(c.model.balance_mode, BalanceMode::kAuxLoss);
  EXPECT_EQ(c.data.source, DataSource::kSynthetic);  // the default
  // `config show` writes the names back, and they load again to the same values.
  std::string yaml = to_yaml(c);
  EXPECT_NE(yaml.find("  balance_mode: aux_loss\n"), std::string::npos) << yaml;
  EXPECT_NE(yaml.find("  device: cuda\n"), std::string::npos) << yaml;
  EXPECT_NE(yaml.find("  mode: bf16\n"), std::string::npos) << yaml;
  EXPECT_EQ(yaml.find("level"), std::string::npos) << yaml;
  EXPECT_EQ(to_yaml(load_config(write("b.yaml", yaml))), yaml);
}

TEST_F(LoaderTest, LoggingLevelIsGone) {
  std::string f = write("a.yaml", "logging:\n  level: info\n");
  EXPECT_EQ(error_of(f).rfind(f + ":2: unknown key 'logging.level'", 0), 0u) << error_of(f);
}

TEST_F(LoaderTest, DuplicateKeyAndSyntaxError) {
  std::string f = write("a.yaml", "model:\n  top_k: 2\n  top_k: 3\n");
  EXPECT_EQ(error_of(f), f + ":3: key 'model.top_k' appears twice");
  f = write("b.yaml", "model:\n  top_k: [2\n");
  EXPECT_NE(error_of(f).find(f + ":3:"), std::string::npos) << error_of(f);
  EXPECT_NE(error_of(f).find("invalid YAML"), std::string::npos);
}

TEST_F(LoaderTest, DirectoryAndSecondDocument) {
  EXPECT_EQ(error_of(dir_.string()), dir_.string() + ": is a directory, expected a YAML file");
  std::string base_dir = write("base_dir.yaml", "base: .\n");
  EXPECT_EQ(error_of(base_dir),
            base_dir + ":1: base: '" + (dir_ / "").string() + "' is a directory, expected a YAML file");
  // yaml-cpp reads the first document only: a second one would be dropped without a word.
  std::string two = write("two.yaml", std::string(kValid) + "---\nmodel:\n  top_k: 3\n");
  EXPECT_EQ(error_of(two), two + ":8: a second YAML document; one config per file");
  std::string after_end = write("end.yaml", std::string(kValid) + "...\nmodel:\n  top_k: 3\n");
  EXPECT_EQ(error_of(after_end), after_end + ":8: a second YAML document; one config per file");
  // Document markers around the one document are fine.
  EXPECT_EQ(error_of(write("marked.yaml", "---\n" + std::string(kValid) + "---\n")), "");
}

TEST_F(LoaderTest, SetOfASection) {
  EXPECT_EQ(error_of(write("a.yaml", kValid), {{"model=1"}, 0}),
            "--set model=1: 'model' is a section; --set needs section.key=value (e.g. --set model.vocab_size=32000)");
}

TEST_F(LoaderTest, UpperBounds) {
  std::string f = write("a.yaml", kValid);
  EXPECT_EQ(error_of(f, {{"train.lr=1e308"}, 0}),
            "--set train.lr=1e308: train.lr: 1e308 is out of range (must be > 0 and ≤ 1000)");
  EXPECT_EQ(error_of(f, {{"parallel.intra_op_threads=100000"}, 0}),
            "--set parallel.intra_op_threads=100000: parallel.intra_op_threads: 100000 is out of range (must be ≥ 1 "
            "and ≤ 1024)");
  EXPECT_EQ(error_of(f, {{"train.lr=1000", "parallel.intra_op_threads=1024"}, 0}), "");
}

TEST(Count, OverflowIsRememberedNotWrapped) {
  EXPECT_EQ((3 * Count(4) + 5).value("x"), 17);
  const Count two_to_63 = Count(int64_t{1} << 62) * 2;
  EXPECT_TRUE(two_to_63.overflowed());
  EXPECT_TRUE((two_to_63 * 0).overflowed());  // once over, always over: plain int64_t could wrap back to 0
  EXPECT_TRUE((Count(INT64_MAX) + 1).overflowed());
  EXPECT_FALSE((Count(INT64_MAX) + 0).overflowed());
  try {
    two_to_63.value("the thing");
    ADD_FAILURE() << "no CountOverflow";
  } catch (const CountOverflow& e) {
    EXPECT_STREQ(e.what(), "the thing");
  }
}

// Products of sizes are formed in 64 bits with overflow checks before anything divides by them or allocates; the
// error names the key that makes one overflow, and where it was set.
TEST_F(LoaderTest, SizeProductsThatOverflowNameTheirKey) {
  std::string f = write("a.yaml", kValid);
  // micro_batch_size · dp wraps to exactly 0 in int64_t: the divisibility check by it once died of SIGFPE.
  EXPECT_EQ(error_of(f, {{"parallel.dp=4", "train.global_batch_size=16", "train.micro_batch_size=4611686018427387904"},
                        0}),
            "--set train.micro_batch_size=4611686018427387904: train.micro_batch_size: 4611686018427387904 makes the "
            "global batch (train.micro_batch_size · train.micro_batches · dp sequences) overflow 64 bits");
  EXPECT_EQ(error_of(f, {{"parallel.pp=4", "train.micro_batches=4", "parallel.dp=4611686018427387904"}, 0}),
            "--set parallel.dp=4611686018427387904: parallel.dp: 4611686018427387904 makes the world size "
            "(parallel.pp · parallel.dp) overflow 64 bits");
  EXPECT_EQ(error_of(f, {{"train.global_batch_size=4611686018427387904"}, 0}),
            "--set train.global_batch_size=4611686018427387904: train.global_batch_size: 4611686018427387904 makes "
            "the tokens of one step (train.global_batch_size · train.seq_len) overflow 64 bits");
  EXPECT_EQ(error_of(f, {{"model.vocab_size=1152921504606846976"}, 0}),
            "--set model.vocab_size=1152921504606846976: model.vocab_size: 1152921504606846976 makes the "
            "activations of one micro-batch (its tokens × a layer's width) overflow 64 bits");
  // Two sizes far above their defaults: the one further above is named.
  EXPECT_EQ(error_of(f, {{"train.seq_len=4294967296", "train.micro_batch_size=4294967296"}, 0}),
            "--set train.micro_batch_size=4294967296: train.micro_batch_size: 4294967296 makes the tokens of one "
            "step (global batch · train.seq_len) overflow 64 bits");
  // In a file: its line.
  std::string g = write("b.yaml", std::string(kValid) + "train:\n  micro_batch_size: 4611686018427387904\n");
  EXPECT_EQ(error_of(g), g + ":9: train.micro_batch_size: 4611686018427387904 makes the tokens of one step "
                             "(global batch · train.seq_len) overflow 64 bits");
  // A stage_layers sum that would overflow.
  EXPECT_EQ(error_of(f, {{"parallel.pp=2", "train.micro_batches=2", "parallel.stage_layers=[1, 9223372036854775807]"},
                        0}),
            "--set parallel.stage_layers=[1, 9223372036854775807]: parallel.stage_layers sums to more than "
            "model.num_layers = 4");
}

TEST(CheckCounts, NamesTheKeyWhoseDefaultLetsTheCountFit) {
  Config c;
  c.model.hidden_size = int64_t{1} << 40;  // 2^32 × its default: the candidate tried first
  c.model.num_layers = int64_t{1} << 30;   // 2^28 × its default
  auto cube_of_layers = [](const Config& c) {
    (Count(c.model.num_layers) * c.model.num_layers * c.model.num_layers).value("the thing");
  };
  try {
    check_counts(c, cube_of_layers);
    ADD_FAILURE() << "no ConfigError";
  } catch (const ConfigError& e) {
    // hidden_size's default does not help; num_layers' does. Defaults have no file position.
    EXPECT_STREQ(e.what(), "model.num_layers: 1073741824 makes the thing overflow 64 bits");
  }
  c.model.num_layers = 4;
  EXPECT_NO_THROW(check_counts(c, cube_of_layers));
}

TEST_F(LoaderTest, MissingAndEmptyFiles) {
  std::string missing = (dir_ / "nope.yaml").string();
  EXPECT_EQ(error_of(missing), missing + ": cannot open config file: No such file or directory");
  std::string empty = write("empty.yaml", "");
  EXPECT_EQ(error_of(empty), empty + ": the config file is empty");
  std::string scalar = write("scalar.yaml", "hello\n");
  EXPECT_EQ(error_of(scalar), scalar + ":1: expected a mapping of sections (model:, parallel:, ...), got 'hello'");
}

struct Conflict {
  const char* yaml;
  int line;  // where the message points (0: no file position)
  const char* message;
};

TEST_F(LoaderTest, CrossFieldConflicts) {
  const Conflict cases[] = {
      {"parallel:\n  world_size: 8\n  pp: 2\n  dp: 2\n  ep: 1\ntrain:\n  micro_batches: 2\n", 2,
       "world size 8 ≠ pp·dp = 2·2 = 4"},
      {"parallel:\n  dp: 4\n  ep: 3\nmodel:\n  n_routed_experts: 6\n  top_k: 2\n", 3,
       "parallel.ep = 3 does not divide parallel.dp = 4 (expert parallelism is carved out of data parallelism: "
       "dp = ep·edp)"},
      {"parallel:\n  dp: 4\n  ep: 4\nmodel:\n  n_routed_experts: 6\n  top_k: 2\n", 3,
       "model.n_routed_experts = 6 is not divisible by parallel.ep = 4 (each ep rank holds n_routed_experts/ep "
       "experts)"},
      {"parallel:\n  dp: 1\n  pp: 5\nmodel:\n  num_layers: 4\ntrain:\n  micro_batches: 8\n", 3,
       "parallel.pp = 5 exceeds model.num_layers = 4 (every stage needs a layer)"},
      {"parallel:\n  dp: 1\nmodel:\n  n_routed_experts: 4\n  top_k: 6\n", 5,
       "model.top_k = 6 exceeds model.n_routed_experts = 4"},
      {"parallel:\n  dp: 1\nmodel:\n  n_routed_experts: 8\n  n_group: 3\n", 5,
       "model.n_group = 3 does not divide model.n_routed_experts = 8"},
      {"parallel:\n  dp: 1\nmodel:\n  n_routed_experts: 8\n  n_group: 2\n  topk_group: 3\n", 6,
       "model.topk_group = 3 exceeds model.n_group = 2"},
      {"parallel:\n  dp: 1\n  pp: 2\ntrain:\n  micro_batches: 1\n", 5,
       "train.micro_batches = 1 is less than parallel.pp = 2 (the 1F1B schedule needs at least one micro-batch "
       "per stage)"},
      {"parallel:\n  dp: 1\nmodel:\n  n_routed_experts: 8\n  n_group: 4\n  topk_group: 1\n  top_k: 3\n", 7,
       "model.top_k = 3 exceeds the 2 experts in the model.topk_group = 1 kept groups of 2 experts"},
      {"parallel:\n  dp: 1\nmodel:\n  n_routed_experts: 8\n  n_group: 8\n", 5,
       "model.n_group = 8 leaves 1 expert per group; group scores sum each group's two best experts, so groups "
       "need at least 2"},
      {"parallel:\n  dp: 1\n  pp: 2\n  stage_layers: [1, 2]\ntrain:\n  micro_batches: 2\n", 4,
       "parallel.stage_layers sums to 3 but model.num_layers = 4"},
      {"parallel:\n  dp: 1\n  pp: 2\n  stage_layers: [4]\ntrain:\n  micro_batches: 2\n", 4,
       "parallel.stage_layers has 1 entries but parallel.pp = 2"},
      {"parallel:\n  dp: 1\nmodel:\n  n_dense_layers: 5\n", 4, "model.n_dense_layers = 5 exceeds model.num_layers = 4"},
      {"parallel:\n  dp: 1\nmodel:\n  n_routed_experts: 0\n", 4,
       "model.n_routed_experts = 0, but layers 1..3 are MoE layers (model.n_dense_layers = 1 < model.num_layers = 4)"},
      {"parallel:\n  dp: 1\nmodel:\n  qk_rope_head_dim: 7\n", 4,
       "model.qk_rope_head_dim = 7 must be even (RoPE rotates pairs of dimensions)"},
      {"parallel:\n  dp: 1\ntrain:\n  lr: 1.0e-3\n  lr_min: 1.0e-2\n", 5, "train.lr_min = 0.01 exceeds train.lr = 0.001"},
      {"parallel:\n  dp: 1\nprecision:\n  mode: fp8\nmodel:\n  hidden_size: 200\n", 4,
       "precision.mode = fp8 needs model.hidden_size divisible by 128 (1×128 activation tiles, 128×128 weight "
       "blocks); it is 200"},
      {"parallel:\n  dp: 1\ndata:\n  source: shards\n", 4, "data.source = shards needs data.path (the token-shard prefix)"},
      {"parallel:\n  pp: 1\n", 0,
       "parallel.dp = 0 (derive from the world size) needs parallel.world_size or a launch under mpirun/srun"},
  };
  int i = 0;
  for (const auto& c : cases) {
    std::string f = write(fmt::format("c{}.yaml", i++), c.yaml);
    std::string expected = (c.line ? fmt::format("{}:{}: ", f, c.line) : "") + c.message;
    EXPECT_EQ(error_of(f), expected) << c.yaml;
  }
}

TEST_F(LoaderTest, Fp8NeedsTileAlignedWidths) {
  std::string f = write("a.yaml",
                        "parallel:\n  dp: 1\nprecision:\n  mode: fp8\nmodel:\n  hidden_size: 256\n  "
                        "moe_inter_dim: 128\n  dense_inter_dim: 512\n");
  EXPECT_EQ(error_of(f), "");
}

TEST_F(LoaderTest, LaunchWorldSize) {
  std::string f = write("a.yaml", "parallel:\n  pp: 2\n  ep: 2\ntrain:\n  micro_batches: 2\n");
  Config c = load_config(f, {{}, 8});
  EXPECT_EQ(c.parallel.dp, 4);  // derived from the 8 launched ranks
  EXPECT_EQ(c.parallel.world_size, 8);
  EXPECT_EQ(c.where("parallel.dp"), "");  // derived: no place in a file
  EXPECT_EQ(c.origins.at("parallel.dp").describe(), "derived: world size / pp");
  EXPECT_EQ(error_of(f, {{}, 6}), f + ":3: parallel.ep = 2 does not divide parallel.dp = 3 (expert parallelism is "
                                      "carved out of data parallelism: dp = ep·edp)");
  EXPECT_EQ(error_of(f, {{}, 5}), f + ":2: parallel.pp = 2 does not divide the world size 5");
  std::string fixed = write("b.yaml", "parallel:\n  pp: 2\n  dp: 2\ntrain:\n  micro_batches: 2\n");
  EXPECT_EQ(error_of(fixed, {{}, 2}), fixed + ":3: world size 2 (ranks launched) ≠ pp·dp = 2·2 = 4");
  EXPECT_EQ(error_of(fixed, {{}, 4}), "");
  std::string pinned = write("c.yaml", "parallel:\n  world_size: 4\n  pp: 2\n  dp: 2\ntrain:\n  micro_batches: 2\n");
  EXPECT_EQ(error_of(pinned, {{}, 8}), pinned + ":2: parallel.world_size = 4 but the job was launched with 8 ranks");
}

TEST_F(LoaderTest, GlobalBatchSizeDerivesMicroBatches) {
  std::string f = write("a.yaml", "parallel:\n  pp: 2\n  dp: 2\ntrain:\n  global_batch_size: 16\n  micro_batch_size: 2\n");
  Config c = load_config(f);
  EXPECT_EQ(c.train.micro_batches, 4);
  c = load_config(f, {{"parallel.dp=4"}, 0});
  EXPECT_EQ(c.train.micro_batches, 2);  // the same 16 sequences per step on another layout
  EXPECT_EQ(c.train.global_batch_size, 16);
  EXPECT_EQ(error_of(f, {{"parallel.dp=3"}, 0}),
            f + ":5: train.global_batch_size = 16 is not divisible by train.micro_batch_size · dp = 2 · 3");
  EXPECT_EQ(error_of(f, {{"train.micro_batches=3"}, 0}),
            "--set train.micro_batches=3: train.micro_batches = 3 but train.global_batch_size = 16 with "
            "micro_batch_size 2 and dp 2 needs 4; set one of them");
  EXPECT_EQ(error_of(f, {{"train.global_batch_size=4"}, 0}),
            "--set train.global_batch_size=4: train.micro_batches = 1 is less than parallel.pp = 2 (the 1F1B schedule "
            "needs at least one micro-batch per stage)");
  Config plain = load_config(write("b.yaml", kValid), {{"train.micro_batches=3", "train.micro_batch_size=2"}, 0});
  EXPECT_EQ(plain.train.global_batch_size, 6);
}

TEST_F(LoaderTest, SetOverrides) {
  std::string f = write("a.yaml", kValid);
  Config c = load_config(f, {{"model.top_k=3", "parallel.stage_layers=[4]", "train.lr=1e-2"}, 0});
  EXPECT_EQ(c.model.top_k, 3);
  EXPECT_EQ(c.parallel.stage_layers, std::vector<int64_t>{4});
  EXPECT_DOUBLE_EQ(c.train.lr, 1e-2);
  EXPECT_EQ(c.where("model.top_k"), "--set model.top_k=3: ");
  EXPECT_EQ(error_of(f, {{"model.top_k=x"}, 0}), "--set model.top_k=x: model.top_k: expected an integer, got 'x'");
  EXPECT_EQ(error_of(f, {{"model.topk=3"}, 0}),
            "--set model.topk=3: unknown key 'model.topk'; did you mean 'model.top_k'?");
  EXPECT_EQ(error_of(f, {{"model.top_k"}, 0}), "--set model.top_k: expected section.key=value");
  // Overrides are validated like the file: a conflict they create names the override.
  EXPECT_EQ(error_of(f, {{"model.top_k=9"}, 0}), "--set model.top_k=9: model.top_k = 9 exceeds model.n_routed_experts = 8");
}

TEST_F(LoaderTest, BaseComposition) {
  write("base.yaml", std::string(kValid) + "train:\n  lr: 1.0e-3\n  steps: 7\n");
  fs::create_directories(dir_ / "exp");
  std::string child = write("exp/child.yaml", "base: ../base.yaml\ntrain:\n  lr: 2.0e-3\n");
  Config c = load_config(child);
  EXPECT_DOUBLE_EQ(c.train.lr, 2e-3);  // the child wins
  EXPECT_EQ(c.train.steps, 7);         // the base fills in
  EXPECT_EQ(c.where("train.steps"), (dir_ / "base.yaml").string() + ":10: ");
  EXPECT_EQ(c.where("train.lr"), child + ":3: ");

  std::string orphan = write("orphan.yaml", "base: missing.yaml\n");
  EXPECT_EQ(error_of(orphan), orphan + ":1: base: file '" + (dir_ / "missing.yaml").string() + "' does not exist");
  std::string a = write("loop_a.yaml", "base: loop_b.yaml\n");
  write("loop_b.yaml", "base: loop_a.yaml\n");
  EXPECT_NE(error_of(a).find("`base:` chain loops"), std::string::npos) << error_of(a);
  std::string nested = write("nested.yaml", std::string(kValid) + "train:\n  base: x\n");
  EXPECT_EQ(error_of(nested).rfind(nested + ":9: unknown key 'train.base'", 0), 0u) << error_of(nested);
}

TEST_F(LoaderTest, ResolvedConfigRoundTrips) {
  Config c = load_config(kRoot + "/configs/deepseek-v3-671b.yaml", {{"train.lr=1.5e-4"}, 0});
  std::string resolved = (dir_ / "config.yaml").string();
  write_resolved(c, resolved);
  Config again = load_config(resolved);
  EXPECT_EQ(to_yaml(again), to_yaml(c));
  EXPECT_DOUBLE_EQ(again.train.lr, 1.5e-4);
  EXPECT_EQ(again.model.mtp_loss_weight_switch_tokens, c.model.mtp_loss_weight_switch_tokens);
  EXPECT_FALSE(fs::exists(resolved + ".tmp"));
}

}  // namespace
}  // namespace moetrain::config
