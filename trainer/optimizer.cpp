#include "trainer/optimizer.h"

#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <cmath>
#include <optional>

#include "parallel/grad_sync.h"

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

void AdamW::step(double lr, double grad_scale) {
  at::NoGradGuard no_grad;
  ++step_;
  if (fused_step(lr, grad_scale)) return;
  scale_grads(params_, grad_scale);
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

bool AdamW::fused_step(double lr, double grad_scale) {
  if (params_.empty() || !params_[0].param.is_cuda()) return false;
  for (size_t i = 0; i < params_.size(); ++i)
    if (m_[i].scalar_type() != at::kFloat || params_[i].param.scalar_type() != at::kFloat) return false;
  if (steps_.empty())
    for (const auto& p : params_) steps_.push_back(at::zeros({}, p.param.options().dtype(at::kFloat)));
  // Two groups: matrices with weight decay, the rest without.
  std::vector<at::Tensor> p[2], g[2], m[2], v[2], s[2];
  for (size_t i = 0; i < params_.size(); ++i) {
    const int k = weight_decay_ > 0 && decays(params_[i]) ? 1 : 0;
    at::Tensor& param = params_[i].param;
    p[k].push_back(param);
    g[k].push_back(param.grad().defined() ? param.grad() : at::zeros_like(param));
    m[k].push_back(m_[i]);
    v[k].push_back(v_[i]);
    s[k].push_back(steps_[i].fill_(static_cast<double>(step_)));
  }
  // The kernel divides the gradients by grad_scale (the AMP scaler's convention): clipping rides along.
  std::optional<at::Tensor> divide_by;
  if (grad_scale != 1.0) divide_by = at::full({}, 1.0 / grad_scale, params_[0].param.options());
  for (int k = 0; k < 2; ++k)
    if (!p[k].empty())
      at::_fused_adamw_(p[k], g[k], m[k], v[k], /*max_exp_avg_sqs=*/{}, s[k], lr, beta1_, beta2_,
                        k == 1 ? weight_decay_ : 0.0, eps_, /*amsgrad=*/false, /*maximize=*/false, divide_by);
  return true;
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

at::Tensor grad_norm_sq(const std::vector<NamedParam>& params) {
  at::NoGradGuard no_grad;
  if (!params.empty() && params[0].param.is_cuda()) {
    std::vector<at::Tensor> grads;
    for (const auto& p : params)
      if (p.param.grad().defined()) grads.push_back(p.param.grad());
    return parallel::squared_norm(grads);
  }
  at::Tensor sum;
  for (const auto& p : params) {
    if (!p.param.grad().defined()) continue;
    at::Tensor sq = p.param.grad().to(at::kDouble).pow(2).sum().reshape({1});
    sum = sum.defined() ? sum + sq : sq;
  }
  return sum.defined() ? sum : at::zeros({1}, at::kDouble);
}

double grad_norm(const std::vector<NamedParam>& params) { return std::sqrt(grad_norm_sq(params).item<double>()); }

double clip_factor(double norm, double max_norm) {
  return max_norm <= 0 || norm <= max_norm ? 1.0 : max_norm / (norm + 1e-6);
}

void scale_grads(const std::vector<NamedParam>& params, double scale) {
  if (scale == 1.0) return;
  at::NoGradGuard no_grad;
  for (const auto& p : params)
    if (p.param.grad().defined()) p.param.grad().mul_(scale);
}

void clip_grads(const std::vector<NamedParam>& params, double norm, double max_norm) {
  scale_grads(params, clip_factor(norm, max_norm));
}

}  // namespace moetrain::trainer
