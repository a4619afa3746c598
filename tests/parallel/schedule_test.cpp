// The pipeline schedule's replay in unit time: its bubble fraction and its drawing (parallel/pipeline.h).
#include <gtest/gtest.h>

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
