// A diverging run: a step whose loss or global gradient norm is not finite (NaN or inf). Its update is never
// applied, so parameters, moments and biases stay finite and no checkpoint ever holds the divergence. With
// train.skip_nonfinite_steps = N, up to N such steps in a row are skipped (as large runs skip loss spikes); past
// that — at the first one with N = 0 — the run stops with an error naming the step, the figures and the first
// parameter whose gradient is not finite (and its rank).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "parallel/control_plane.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"

namespace moetrain::trainer {

class DivergenceGuard {
 public:
  enum class Verdict { kApply, kSkip, kStop };

  explicit DivergenceGuard(int64_t skip_limit) : limit_(skip_limit) {}
  // r: the step's global figures (the same on every rank), so every rank reaches the same verdict; a step that is
  // not finite costs one gather on the control plane (to name the gradient), a finite one nothing.
  Verdict judge(const StepResult& r, const std::vector<NamedParam>& params, parallel::ControlPlane& control);
  const std::string& message() const { return message_; }  // why the last verdict was kSkip or kStop

 private:
  int64_t limit_;
  int64_t in_a_row_ = 0;
  std::string message_;
};

}  // namespace moetrain::trainer
