#include "config/schema.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

namespace moetrain::config {
namespace {

TEST(Schema, EveryKeyIsSectionDotNameWithDocAndUniquePath) {
  std::set<std::string> seen;
  const std::set<std::string> known_sections{"model", "parallel", "train", "data", "checkpoint", "precision",
                                             "logging"};
  for (const auto& k : schema()) {
    EXPECT_TRUE(seen.insert(k.path).second) << "duplicate " << k.path;
    EXPECT_EQ(std::count(k.path.begin(), k.path.end(), '.'), 1) << k.path;
    EXPECT_TRUE(known_sections.count(k.section())) << k.path;
    EXPECT_FALSE(k.doc.empty()) << k.path;
  }
  EXPECT_EQ(sections().size(), known_sections.size());
}

TEST(Schema, DefaultsAreInsideTheirOwnRanges) {
  Config defaults;
  for (const auto& k : schema()) {
    std::visit(
        [&](auto p) {
          using T = std::remove_pointer_t<decltype(p)>;
          if constexpr (std::is_same_v<T, int64_t> || std::is_same_v<T, double>) {
            EXPECT_TRUE(k.range.contains(static_cast<double>(*p))) << k.path;
          }
          if constexpr (std::is_same_v<T, EnumRef>) {
            EXPECT_GE(p.get(p.p), 0) << k.path;
            EXPECT_LT(p.get(p.p), static_cast<int>(p.names.size())) << k.path;
          }
        },
        k.field(defaults));
  }
}

TEST(Schema, AccessorsBindDistinctMembers) {
  Config c;
  std::set<const void*> addresses;
  for (const auto& k : schema())
    EXPECT_TRUE(addresses.insert(std::visit(
                                     [](auto p) -> const void* {
                                       if constexpr (std::is_same_v<decltype(p), EnumRef>)
                                         return p.p;
                                       else
                                         return p;
                                     },
                                     k.field(c)))
                    .second)
        << k.path << " shares a member with another key";
}

TEST(Schema, EnumKeysReadAndWriteTheirMember) {
  Config c;
  const KeySpec& mode = *find_key("precision.mode");
  EXPECT_EQ(value_text(mode, c), "fp32");
  c.precision.mode = PrecisionMode::kFp8;
  EXPECT_EQ(value_text(mode, c), "fp8");
  auto ref = std::get<EnumRef>(mode.field(c));
  ref.set(ref.p, 1);
  EXPECT_EQ(c.precision.mode, PrecisionMode::kBf16);
  EXPECT_EQ(value_text(*find_key("model.balance_mode"), c), "aux_free");
  EXPECT_EQ(name(BalanceMode::kAuxLoss), "aux_loss");
  EXPECT_EQ(name(Device::kCuda), "cuda");
  EXPECT_EQ(name(DataSource::kShards), "shards");
  EXPECT_EQ(name(MomentDtype::kBf16), "bf16");
  const auto choices = find_key("train.device")->choices();
  EXPECT_EQ(std::vector<std::string_view>(choices.begin(), choices.end()),
            (std::vector<std::string_view>{"cpu", "cuda"}));
  EXPECT_TRUE(find_key("train.lr")->choices().empty());
  EXPECT_EQ(find_key("logging.level"), nullptr);  // removed: nothing read it
}

TEST(Schema, RangeDescribesOpenAndClosedBounds) {
  EXPECT_EQ((Range{.lo = 1}).describe(), "≥ 1");
  EXPECT_EQ((Range{.lo = 0, .lo_open = true}).describe(), "> 0");
  EXPECT_EQ((Range{.lo = 0, .hi = 0.5}).describe(), "≥ 0 and ≤ 0.5");
  EXPECT_EQ((Range{.lo = 0, .hi = 1, .hi_open = true}).describe(), "≥ 0 and < 1");
  EXPECT_EQ(Range{}.describe(), "");
  Range beta{.lo = 0, .hi = 1, .hi_open = true};
  EXPECT_TRUE(beta.contains(0));
  EXPECT_TRUE(beta.contains(0.999));
  EXPECT_FALSE(beta.contains(1));
  EXPECT_FALSE(beta.contains(-0.1));
  EXPECT_EQ(find_key("train.adam_beta1")->range.describe(), "≥ 0 and < 1");
  EXPECT_EQ(find_key("train.adam_beta2")->range.describe(), "≥ 0 and < 1");
}

TEST(Schema, ClosestKey) {
  EXPECT_EQ(closest_key("model.hiden_size"), "model.hidden_size");
  EXPECT_EQ(closest_key("model.num_layer"), "model.num_layers");
  EXPECT_EQ(closest_key("train.micro_batch"), "train.micro_batches");
  EXPECT_EQ(closest_key("parallel.top_k"), "model.top_k");
  EXPECT_EQ(closest_key("model.completely_unrelated_words"), "");
}

TEST(Schema, ValueText) {
  Config c;
  c.train.lr = 3e-4;
  c.parallel.stage_layers = {3, 2};
  EXPECT_EQ(value_text(*find_key("train.lr"), c), "0.0003");
  EXPECT_EQ(value_text(*find_key("parallel.stage_layers"), c), "[3, 2]");
  EXPECT_EQ(value_text(*find_key("model.tie_embeddings"), c), "false");
  EXPECT_EQ(find_key("precision.mode")->type_name(), "fp32 \\| bf16 \\| fp8");
  EXPECT_EQ(find_key("nope.nope"), nullptr);
}

// The committed reference is what the schema generates: the docs cannot drift from the code.
TEST(Schema, CommittedReferenceIsCurrent) {
  std::ifstream in(MOETRAIN_SOURCE_DIR "/docs/config-reference.md");
  ASSERT_TRUE(in) << "docs/config-reference.md is missing";
  std::stringstream committed;
  committed << in.rdbuf();
  EXPECT_EQ(committed.str(), reference_markdown())
      << "regenerate it: build/bin/moetrain config reference > docs/config-reference.md";
}

TEST(Schema, ReferenceListsEveryKey) {
  std::string md = reference_markdown();
  for (const auto& k : schema()) EXPECT_NE(md.find("`" + k.path + "`"), std::string::npos) << k.path;
}

}  // namespace
}  // namespace moetrain::config
