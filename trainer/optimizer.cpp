#include "trainer/optimizer.h"

#include <ATen/ops/zeros_like.h>

#include <cmath>

namespace moetrain::trainer {

AdamW::AdamW(std::vector<NamedParam> params, const config::TrainConfig& t, c10::ScalarType moment_dtype)
    : params_(std::move(params)),
      beta1_(t.adam_beta1),
      beta2_(t.adam_beta2),
      eps_(t.adam_eps),
      weight_decay_(t.weight_decay) {
  for (const auto& p : params_) {
    m_.push_back(at::zeros_like(p.param, p.param.options().dtype(moment_dtype)));
    v_.push_back(at::zeros_like(p.param, p.param.options().dtype(moment_dtype)));
  }
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  ++step_;
  const double bc1 = 1.0 - std::pow(beta1_, static_cast<double>(step_));
  const double bc2 = 1.0 - std::pow(beta2_, static_cast<double>(step_));
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& p = params_[i].param;
    at::Tensor g = p.grad().defined() ? p.grad() : at::zeros_like(p);
    // The moment math in at least FP32 (the parameter's precision) whatever the storage dtype.
    const auto math = at::promote_types(p.scalar_type(), at::kFloat);
    at::Tensor m = m_[i].to(math).mul_(beta1_).add_(g, 1.0 - beta1_);
    at::Tensor v = v_[i].to(math).mul_(beta2_).addcmul_(g, g, 1.0 - beta2_);
    if (weight_decay_ > 0 && decays(params_[i])) p.mul_(1.0 - lr * weight_decay_);
    p.addcdiv_(m, (v / bc2).sqrt_().add_(eps_), -lr / bc1);
    m_[i].copy_(m);
    v_[i].copy_(v);
  }
}

void AdamW::zero_grad() {
  for (auto& p : params_)
    if (p.param.grad().defined()) p.param.mutable_grad() = at::Tensor();
}

std::vector<checkpoints::StateTensor> checkpoint_state(const std::vector<model::ParamInfo>& params, AdamW& optimizer,
                                                       const std::vector<model::ParamInfo>& buffers) {
  std::vector<checkpoints::StateTensor> out;
  for (size_t i = 0; i < params.size(); ++i) {
    out.push_back({"model/", params[i], params[i].tensor});
    out.push_back({"optim/exp_avg/", params[i], optimizer.exp_avg_mut(i)});
    out.push_back({"optim/exp_avg_sq/", params[i], optimizer.exp_avg_sq_mut(i)});
  }
  for (const auto& b : buffers) out.push_back({"model/", b, b.tensor});
  return out;
}

double grad_norm(const std::vector<NamedParam>& params) {
  // Summed on the device, one host read per step.
  at::Tensor sum;
  for (const auto& p : params) {
    if (!p.param.grad().defined()) continue;
    at::Tensor sq = p.param.grad().to(at::kDouble).pow(2).sum();
    sum = sum.defined() ? sum + sq : sq;
  }
  return sum.defined() ? std::sqrt(sum.item<double>()) : 0.0;
}

void clip_grads(const std::vector<NamedParam>& params, double norm, double max_norm) {
  if (max_norm <= 0 || norm <= max_norm) return;
  const double scale = max_norm / (norm + 1e-6);
  at::NoGradGuard no_grad;
  for (const auto& p : params)
    if (p.param.grad().defined()) p.param.grad().mul_(scale);
}

}  // namespace moetrain::trainer
