#include "trainer/lr_schedule.h"

#include <cmath>
#include <numbers>

namespace moetrain::trainer {

double lr_at(const config::TrainConfig& t, int64_t step) {
  if (t.lr_final_steps > 0 && step >= t.steps - t.lr_final_steps) return t.lr_final;
  if (step < t.warmup_steps) return t.lr * static_cast<double>(step + 1) / static_cast<double>(t.warmup_steps);
  int64_t s = step - t.warmup_steps;
  if (s < t.constant_steps) return t.lr;
  s -= t.constant_steps;
  if (s < t.decay_steps) {
    double progress = static_cast<double>(s) / static_cast<double>(t.decay_steps);
    return t.lr_min + (t.lr - t.lr_min) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  }
  return t.lr_min;
}

}  // namespace moetrain::trainer
