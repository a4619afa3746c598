#include "parallel/topology.h"

#include <gtest/gtest.h>

#include <numeric>
#include <set>

namespace moetrain::parallel {
namespace {

using V = std::vector<int64_t>;

TEST(Topology, RankOrderIsEpThenEdpThenPp) {
  Topology t(Layout{2, 4, 2});  // world 8, edp 2
  for (int64_t r = 0; r < 8; ++r) {
    Coords c = t.coords(r);
    EXPECT_EQ(r, c.pp * 4 + c.edp * 2 + c.ep);
    EXPECT_EQ(c.dp, c.edp * 2 + c.ep);
    EXPECT_EQ(t.rank(c.pp, c.edp, c.ep), r);
  }
  Coords c5 = t.coords(5);
  EXPECT_EQ(c5.pp, 1);
  EXPECT_EQ(c5.edp, 0);
  EXPECT_EQ(c5.ep, 1);
}

TEST(Topology, GroupsOfOneRank) {
  Topology t(Layout{2, 4, 2});
  EXPECT_EQ(t.group(GroupKind::kExpert, 5), (V{4, 5}));
  EXPECT_EQ(t.group(GroupKind::kExpertData, 5), (V{5, 7}));
  EXPECT_EQ(t.group(GroupKind::kData, 5), (V{4, 5, 6, 7}));
  EXPECT_EQ(t.group(GroupKind::kPipeline, 5), (V{1, 5}));
  EXPECT_EQ(t.group(GroupKind::kEmbedding, 5), (V{1, 5}));
  EXPECT_TRUE(t.last_stage(5));
  EXPECT_FALSE(t.first_stage(5));
}

TEST(Topology, EmbeddingGroupSkipsMiddleStages) {
  Topology t(Layout{3, 2, 1});
  EXPECT_EQ(t.group(GroupKind::kEmbedding, 0), (V{0, 4}));
  EXPECT_EQ(t.group(GroupKind::kEmbedding, 3), V{});  // stage 1 of 3
  EXPECT_EQ(t.group(GroupKind::kEmbedding, 5), (V{1, 5}));
  Topology single(Layout{1, 2, 2});
  EXPECT_EQ(single.group(GroupKind::kEmbedding, 1), V{1});
}

// Every kind of group partitions the world (the embedding group the first and last stages), and a rank's
// group lists it.
TEST(Topology, GroupsPartitionTheWorld) {
  for (Layout l : {Layout{1, 1, 1}, Layout{1, 2, 2}, Layout{2, 2, 2}, Layout{1, 4, 4}, Layout{2, 4, 2},
                   Layout{4, 6, 3}}) {
    Topology t(l);
    for (GroupKind kind : {GroupKind::kPipeline, GroupKind::kData, GroupKind::kExpert, GroupKind::kExpertData,
                           GroupKind::kEmbedding}) {
      std::set<V> groups;
      int64_t members = 0;
      for (int64_t r = 0; r < l.world(); ++r) {
        V g = t.group(kind, r);
        if (g.empty()) continue;
        EXPECT_NE(std::find(g.begin(), g.end(), r), g.end());
        if (groups.insert(g).second) members += static_cast<int64_t>(g.size());
      }
      int64_t expected = kind == GroupKind::kEmbedding ? (l.pp > 1 ? 2 : 1) * l.dp : l.world();
      EXPECT_EQ(members, expected) << group_name(kind) << " pp" << l.pp << " dp" << l.dp << " ep" << l.ep;
    }
  }
}

TEST(Topology, RejectsBadLayouts) {
  EXPECT_THROW(Topology(Layout{1, 4, 3}), std::invalid_argument);
  EXPECT_THROW(Topology(Layout{2, 2, 2}).coords(4), std::out_of_range);
}

TEST(StageSplit, EvenWithRemainderOnFirstStages) {
  V v3 = stage_layer_counts(61, 16, {});
  EXPECT_EQ(std::accumulate(v3.begin(), v3.end(), int64_t{0}), 61);
  EXPECT_EQ(std::count(v3.begin(), v3.end(), 4), 13);
  EXPECT_EQ(v3.back(), 3);
  EXPECT_EQ(stage_layer_counts(4, 2, {}), (V{2, 2}));
  EXPECT_EQ(stage_layer_counts(4, 2, {3, 1}), (V{3, 1}));
  EXPECT_EQ(stage_first_layers(V{3, 1, 2}), (V{0, 3, 4}));
}

}  // namespace
}  // namespace moetrain::parallel
