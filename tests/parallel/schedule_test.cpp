// The pipeline schedule's replay in unit time: its bubble fraction and its drawing (parallel/pipeline.h).
#include <gtest/gtest.h>

#include <map>
#include <set>
#include <stdexcept>

#include "parallel/pipeline.h"

namespace moetrain::parallel {
namespace {

// Each stage's pass order under 1F1B (as run_1f1b runs it): min(pp − s − 1, m) warm-up forwards, then one forward
// and one backward in turn, then the remaining backwards.
std::vector<ScheduleTrace> one_f_one_b(int64_t pp, int64_t m) {
  std::vector<ScheduleTrace> traces(static_cast<size_t>(pp));
  for (int64_t s = 0; s < pp; ++s) {
    auto& t = traces[static_cast<size_t>(s)];
    const int64_t warmup = std::min(pp - s - 1, m);
    int64_t f = 0, b = 0;
    for (; f < warmup; ++f) t.push_back("F" + std::to_string(f));
    for (; f < m; ++f, ++b) {
      t.push_back("F" + std::to_string(f));
      t.push_back("B" + std::to_string(b));
    }
    for (; b < m; ++b) t.push_back("B" + std::to_string(b));
  }
  return traces;
}

TEST(Schedule, OneFOneBBubbleIsItsFormula) {
  for (int64_t pp : {2, 4, 8})
    for (int64_t m : {1, 4, 8, 16}) {
      const double theory = static_cast<double>(pp - 1) / static_cast<double>(m + pp - 1);
      EXPECT_NEAR(bubble_fraction(one_f_one_b(pp, m)), theory, 1e-12) << "pp " << pp << ", m " << m;
      const ScheduleTimeline t = simulate_schedule(one_f_one_b(pp, m));
      EXPECT_EQ(t.makespan, 2 * (m + pp - 1));
      EXPECT_EQ(t.busy, 2 * m * pp);
    }
}

// Every stage's pass names under interleaved_order (what run_interleaved runs and traces).
std::vector<ScheduleTrace> interleaved(int64_t pp, int64_t v, int64_t m) {
  std::vector<ScheduleTrace> traces(static_cast<size_t>(pp));
  for (int64_t s = 0; s < pp; ++s)
    for (const PipelinePass& p : interleaved_order(s, pp, v, m)) traces[static_cast<size_t>(s)].push_back(p.name(v));
  return traces;
}

TEST(Schedule, OneChunkIsOneFOneB) {
  for (int64_t pp : {2, 4})
    for (int64_t m : {1, 4, 8}) EXPECT_EQ(interleaved(pp, 1, m), one_f_one_b(pp, m)) << "pp " << pp << ", m " << m;
}

// Megatron-Core's interleaved order is a valid schedule (the replay runs every pass: no stage waits for a pass that
// never comes, which in the executor would be a hang), each (chunk, micro-batch) once forward and once backward, and
// its bubble in units of a chunk's pass is (pp − 1)/(v·m + pp − 1), below 1F1B's.
TEST(Schedule, InterleavedOrderIsValidAndShrinksTheBubble) {
  for (int64_t pp : {2, 3, 4})
    for (int64_t v : {2, 3})
      for (int64_t m : {pp, 2 * pp, 4 * pp}) {
        const auto traces = interleaved(pp, v, m);
        for (const auto& t : traces) {
          EXPECT_EQ(static_cast<int64_t>(t.size()), 2 * v * m);
          EXPECT_EQ(std::set<std::string>(t.begin(), t.end()).size(), t.size());
        }
        const ScheduleTimeline timeline = simulate_schedule(traces);
        EXPECT_EQ(timeline.busy, 2 * v * m * pp);
        const double bubble = bubble_fraction(traces);
        EXPECT_NEAR(bubble, one_f_one_b_bubble(pp, m, v), 1e-12) << "pp " << pp << ", v " << v << ", m " << m;
        EXPECT_LT(bubble, one_f_one_b_bubble(pp, m)) << "pp " << pp << ", v " << v << ", m " << m;
      }
  EXPECT_THROW(interleaved_order(0, 4, 2, 6), std::invalid_argument);  // m not a multiple of pp
}

std::vector<ScheduleTrace> dualpipev(int64_t pp, int64_t m) {
  std::vector<ScheduleTrace> traces(static_cast<size_t>(pp));
  for (int64_t s = 0; s < pp; ++s)
    for (const PipelinePass& p : dualpipev_order(s, pp, m)) traces[static_cast<size_t>(s)].push_back(p.name(2));
  return traces;
}

// DualPipeV's eight phases (deepseek-ai/DualPipe's dualpipev.py): every rank runs each (chunk, micro-batch) forward
// once and backward once — whole (B) or split into I and a later W, in order of the splits — and the replay (V-shaped
// placement, F = 1, B = 2, I = W = 1) runs every pass with the bubble of (pp − 1)(F&B + B − 3W) = pp − 1 slots per
// rank, (pp − 1)/(6m + pp − 1), below 1F1B's and interleaved 1F1B's in the same units.
TEST(Schedule, DualPipeVOrderIsValidAndHasTheSmallestBubble) {
  const ReplayOptions replay{true, 1, 2, 1, 1};
  for (int64_t pp : {2, 3, 4})
    for (int64_t m : {2 * pp, 2 * pp + 1, 4 * pp}) {
      const auto traces = dualpipev(pp, m);
      for (const auto& t : traces) {
        std::map<char, int64_t> kinds;
        std::vector<std::string> splits, weights;
        for (const auto& op : t) {
          ++kinds[op[0]];
          if (op[0] == 'I') splits.push_back(op.substr(1));
          if (op[0] == 'W') weights.push_back(op.substr(1));
        }
        EXPECT_EQ(kinds['F'], 2 * m);
        EXPECT_EQ(kinds['B'] + kinds['I'], 2 * m);
        EXPECT_EQ(splits, weights);  // each split backward's weight pass, first in first out
        EXPECT_GT(kinds['I'], 0);
      }
      const double bubble = bubble_fraction(traces, replay);
      EXPECT_NEAR(bubble, dualpipev_bubble(pp, m), 1e-12) << "pp " << pp << ", m " << m;
      EXPECT_LT(bubble, one_f_one_b_bubble(pp, m, 2)) << "pp " << pp << ", m " << m;
    }
  EXPECT_THROW(dualpipev_order(0, 4, 7), std::invalid_argument);  // fewer than 2·pp micro-batches
  // Rank 0 holds the first and the last virtual stage; rank pp − 1 the two middle ones.
  const VirtualStages v{4, 2, true};
  EXPECT_EQ(v.of(0, 0), 0);
  EXPECT_EQ(v.of(0, 1), 7);
  EXPECT_EQ(v.of(3, 0), 3);
  EXPECT_EQ(v.of(3, 1), 4);
  EXPECT_EQ(v.home(5), (std::pair<int64_t, int64_t>{2, 1}));
}

TEST(Schedule, DrawsEachStagesSlotsWithTheIdleOnes) {
  EXPECT_EQ(draw_schedule(one_f_one_b(2, 2)),
            "slot      0\n"
            "stage 0  F0 F1  . B0  . B1   idle 2\n"
            "stage 1   . F0 B0 F1 B1  .   idle 2\n");
  // A backward listed before its forward can never run: an error naming the stage and the pass, not a hang.
  std::vector<ScheduleTrace> bad{{"B0", "F0"}};
  try {
    simulate_schedule(bad);
    FAIL() << "an impossible schedule replayed";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "schedule: stage 0 cannot run B0 (a dependency never runs)");
  }
}

}  // namespace
}  // namespace moetrain::parallel
