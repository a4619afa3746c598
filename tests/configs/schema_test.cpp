#include "configs/schema.h"

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
        [&](auto* p) {
          using T = std::remove_pointer_t<decltype(p)>;
          if constexpr (std::is_same_v<T, int64_t> || std::is_same_v<T, double>) {
            double v = static_cast<double>(*p);
            EXPECT_TRUE(k.range.lo_open ? v > k.range.lo : v >= k.range.lo) << k.path;
            EXPECT_LE(v, k.range.hi) << k.path;
          }
          if constexpr (std::is_same_v<T, std::string>) {
            if (!k.choices.empty()) {
              EXPECT_NE(std::find(k.choices.begin(), k.choices.end(), *p), k.choices.end()) << k.path;
            }
          }
        },
        k.field(defaults));
  }
}

TEST(Schema, AccessorsBindDistinctMembers) {
  Config c;
  std::set<const void*> addresses;
  for (const auto& k : schema())
    EXPECT_TRUE(addresses.insert(std::visit([](auto* p) -> const void* { return p; }, k.field(c))).second)
        << k.path << " shares a member with another key";
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
  std::ifstream in(std::string(MOETRAIN_SOURCE_DIR) + "/docs/config-reference.md");
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
