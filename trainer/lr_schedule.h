// The learning-rate schedule of DeepSeek-V3: linear warmup from 0 to lr, a constant phase, a cosine decay to
// lr_min, then lr_min, and the run's last lr_final_steps steps at lr_final. Plain warmup-cosine is the same
// schedule with constant_steps = 0 and no final phase.
#pragma once

#include <cstdint>

#include "config/config.h"

namespace moetrain::trainer {

// The learning rate of optimizer step `step` (0-based).
double lr_at(const config::TrainConfig& t, int64_t step);

}  // namespace moetrain::trainer
