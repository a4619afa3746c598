#include "trainer/divergence.h"

#include <ATen/ops/isfinite.h>
#include <fmt/format.h>

#include <cmath>

namespace moetrain::trainer {

DivergenceGuard::Verdict DivergenceGuard::judge(const StepResult& r, const std::vector<NamedParam>& params,
                                                parallel::ControlPlane& control) {
  if (std::isfinite(r.loss) && std::isfinite(r.grad_norm)) {
    in_a_row_ = 0;
    return Verdict::kApply;
  }
  ++in_a_row_;
  // The first gradient of this rank that is not finite; rank 0 learns every rank's and names the first.
  std::string where;
  for (const auto& p : params) {
    const at::Tensor& g = p.param.grad();
    if (g.defined() && !at::isfinite(g).all().item<bool>()) {
      where = fmt::format("{} on rank {}", p.name, control.rank());
      break;
    }
  }
  for (const auto& w : control.gather(where))
    if (where.empty() && !w.empty()) where = w;
  const std::string what = fmt::format(
      "step {}: the {} is not finite (loss {}, lm {}, mtp {}, balance {}, gradient norm {}{})", r.step + 1,
      std::isfinite(r.loss) ? "gradient norm" : "loss", r.loss, r.lm_loss, r.mtp_loss, r.balance_loss, r.grad_norm,
      where.empty() ? "" : "; first non-finite gradient: " + where);
  if (in_a_row_ <= limit_) {
    message_ = fmt::format("{}; update skipped ({} of at most {} in a row, train.skip_nonfinite_steps)", what,
                           in_a_row_, limit_);
    return Verdict::kSkip;
  }
  message_ = fmt::format(
      "{}; the update is not applied and the run stops{}: lower train.lr or set train.grad_clip, then continue "
      "with --resume auto from the last checkpoint",
      what,
      limit_ > 0 ? fmt::format(" after {} such steps in a row (train.skip_nonfinite_steps = {})", in_a_row_, limit_)
                 : " (train.skip_nonfinite_steps = 0)");
  return Verdict::kStop;
}

}  // namespace moetrain::trainer
