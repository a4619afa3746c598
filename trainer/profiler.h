// The step profiler (logging.profile_steps): LibTorch's profiler (Kineto; CPU ops, and CUDA kernels on a GPU)
// records steps [profile_start_step, profile_start_step + profile_steps) and every rank writes its Chrome trace to
// <run dir>/profile/rank<N>.json, to open in Perfetto (ui.perfetto.dev) or chrome://tracing. The training code
// marks its phases with named ranges (RECORD_USER_SCOPE, user annotations in the trace): "forward" (a stage's
// forward pass of one micro-batch), "backward", "gradient reduction", "parameter all-gather" (ZeRO-1),
// "optimizer", and every collective by operation and group — "all-to-all ep" (the expert dispatch and combine),
// "send pp", "recv pp", "send+recv pp" (pipeline transfers), "all-reduce dp", "reduce-scatter dp",
// "all-gather dp", ...; a range costs nothing while no profiler records.
#pragma once

#include <cstdint>
#include <string>

#include "config/config.h"

namespace moetrain::trainer {

class StepProfiler {
 public:
  // dir: the run directory ("" : no trace is written, nothing is recorded); cuda: also record the GPU's kernels.
  StepProfiler(const config::LoggingConfig& logging, std::string dir, int rank, bool cuda);
  ~StepProfiler();
  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;

  // Around each step; `step` is the step about to run / just run, 1-based. Returns the trace written after the
  // last recorded step ("" otherwise).
  void before(int64_t step);
  std::string after(int64_t step);

 private:
  int64_t first_ = 0, last_ = -1;  // recorded steps, inclusive (none when last_ < first_)
  std::string path_;
  bool on_ = false, cuda_ = false;
};

}  // namespace moetrain::trainer
