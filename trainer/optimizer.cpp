#include "trainer/optimizer.h"

#include <ATen/ops/_fused_adamw.h>
#include <ATen/record_function.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <cmath>
#include <optional>

#include "parallel/grad_sync.h"

namespace moetrain::trainer {

AdamW::AdamW(std::vector<NamedParam> params, const config::TrainConfig& t, c10::ScalarType moment_dtype,
             std::vector<parallel::ShardPiece> pieces, c10::ScalarType param_dtype)
    : params_(std::move(params)),
      pieces_(std::move(pieces)),
      beta1_(t.adam_beta1),
      beta2_(t.adam_beta2),
      eps_(t.adam_eps),
      weight_decay_(t.weight_decay) {
  if (pieces_.empty())
    for (size_t i = 0; i < params_.size(); ++i) pieces_.push_back({i, 0, params_[i].param.numel(), false});
  at::NoGradGuard no_grad;
  const bool master = param_dtype != c10::ScalarType::Undefined && !params_.empty() &&
                      params_[0].param.scalar_type() != param_dtype;
  for (size_t i = 0; i < pieces_.size(); ++i) {
    const at::Tensor v = param_view(i);
    if (master) master_.push_back(v.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true));
    m_.push_back(at::zeros_like(v, v.options().dtype(moment_dtype)));
    v_.push_back(at::zeros_like(v, v.options().dtype(moment_dtype)));
  }
  if (master)
    for (auto& p : params_) p.param.set_data(p.param.detach().to(param_dtype));
}

at::Tensor AdamW::value(size_t i) { return master_.empty() ? param_view(i) : master_[i]; }

at::Tensor AdamW::param_view(size_t i) {
  const parallel::ShardPiece& piece = pieces_[i];
  const NamedParam& p = params_[piece.param];
  return piece.partitioned ? parallel::piece_view(p.param, p.name, piece) : p.param;
}

std::vector<at::Tensor> AdamW::piece_values() {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < pieces_.size(); ++i) out.push_back(value(i));
  return out;
}

void AdamW::publish() {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < master_.size(); ++i)
    if (!pieces_[i].partitioned) params_[pieces_[i].param].param.copy_(master_[i]);
}

int64_t AdamW::master_bytes() const {
  int64_t n = 0;
  for (const auto& t : master_) n += static_cast<int64_t>(t.nbytes());
  return n;
}

int64_t AdamW::state_bytes() const {
  int64_t n = 0;
  for (size_t i = 0; i < m_.size(); ++i) n += static_cast<int64_t>(m_[i].nbytes() + v_[i].nbytes());
  return n;
}

void AdamW::step(double lr, double grad_scale, const std::vector<at::Tensor>* piece_grads) {
  RECORD_USER_SCOPE("optimizer");
  at::NoGradGuard no_grad;
  ++step_;
  std::vector<at::Tensor> grads;
  for (size_t i = 0; i < pieces_.size(); ++i) {
    if (piece_grads) {
      grads.push_back((*piece_grads)[i]);
    } else {
      const at::Tensor& p = params_[pieces_[i].param].param;
      grads.push_back(p.grad().defined() ? p.grad() : at::zeros_like(value(i)));
    }
  }
  if (!fused_step(lr, grad_scale, grads)) unfused_step(lr, grad_scale, grads);
  publish();
}

void AdamW::unfused_step(double lr, double grad_scale, std::vector<at::Tensor>& grads) {
  if (grad_scale != 1.0)
    for (auto& g : grads) g.mul_(grad_scale);
  const double bc1 = 1.0 - std::pow(beta1_, static_cast<double>(step_));
  const double bc2 = 1.0 - std::pow(beta2_, static_cast<double>(step_));
  for (size_t i = 0; i < pieces_.size(); ++i) {
    at::Tensor p = value(i);
    const at::Tensor& g = grads[i];
    // The moment math in at least FP32 (the parameter's precision) whatever the storage dtype.
    const auto math = at::promote_types(p.scalar_type(), at::kFloat);
    at::Tensor m = m_[i].to(math).mul_(beta1_).add_(g, 1.0 - beta1_);
    at::Tensor v = v_[i].to(math).mul_(beta2_).addcmul_(g, g, 1.0 - beta2_);
    if (weight_decay_ > 0 && decays(params_[pieces_[i].param])) p.mul_(1.0 - lr * weight_decay_);
    p.addcdiv_(m, (v / bc2).sqrt_().add_(eps_), -lr / bc1);
    m_[i].copy_(m);
    v_[i].copy_(v);
  }
}

bool AdamW::fused_kernel() {
  if (!fused_allowed_ || params_.empty()) return false;
  for (size_t i = 0; i < pieces_.size(); ++i)
    if (m_[i].scalar_type() != at::kFloat || value(i).scalar_type() != at::kFloat) return false;
  return true;
}

bool AdamW::fused_step(double lr, double grad_scale, std::vector<at::Tensor>& grads) {
  if (!fused_kernel()) return false;
  if (steps_.empty())
    for (size_t i = 0; i < pieces_.size(); ++i) steps_.push_back(at::zeros({}, m_[i].options().dtype(at::kFloat)));
  // Two groups: matrices with weight decay, the rest without.
  std::vector<at::Tensor> p[2], g[2], m[2], v[2], s[2];
  for (size_t i = 0; i < pieces_.size(); ++i) {
    const int k = weight_decay_ > 0 && decays(params_[pieces_[i].param]) ? 1 : 0;
    p[k].push_back(value(i));
    g[k].push_back(grads[i]);
    m[k].push_back(m_[i]);
    v[k].push_back(v_[i]);
    s[k].push_back(steps_[i].fill_(static_cast<double>(step_)));
  }
  // The kernel divides the gradients by grad_scale (the AMP scaler's convention): clipping rides along.
  std::optional<at::Tensor> divide_by;
  if (grad_scale != 1.0) divide_by = at::full({}, 1.0 / grad_scale, m_[0].options());
  for (int k = 0; k < 2; ++k)
    if (!p[k].empty())
      at::_fused_adamw_(p[k], g[k], m[k], v[k], /*max_exp_avg_sqs=*/{}, s[k], lr, beta1_, beta2_,
                        k == 1 ? weight_decay_ : 0.0, eps_, /*amsgrad=*/false, /*maximize=*/false, divide_by);
  return true;
}

void AdamW::zero_grad() {
  at::NoGradGuard no_grad;
  for (auto& p : params_) {
    at::Tensor& g = p.param.mutable_grad();
    if (master_.empty())
      g = at::Tensor();
    else if (g.defined())
      g.zero_();
    else
      g = at::zeros_like(p.param, p.param.options().dtype(parallel::grad_dtype(p.param.scalar_type())));
  }
}

std::vector<checkpoints::StateTensor> checkpoint_state(const std::vector<model::ParamInfo>& params, AdamW& optimizer,
                                                       const std::vector<model::ParamInfo>& buffers) {
  std::vector<checkpoints::StateTensor> out;
  const auto& pieces = optimizer.pieces();
  auto offset_of = [&](size_t i) { return pieces[i].partitioned ? pieces[i].offset : -1; };
  if (optimizer.has_master()) {
    for (size_t i = 0; i < pieces.size(); ++i)
      out.push_back({"model/", params[pieces[i].param], optimizer.master_mut(i), offset_of(i)});
  } else {
    for (const auto& p : params) out.push_back({"model/", p, p.tensor});
  }
  for (size_t i = 0; i < pieces.size(); ++i) {
    const int64_t offset = offset_of(i);
    out.push_back({"optim/exp_avg/", params[pieces[i].param], optimizer.exp_avg_mut(i), offset});
    out.push_back({"optim/exp_avg_sq/", params[pieces[i].param], optimizer.exp_avg_sq_mut(i), offset});
  }
  for (const auto& b : buffers) out.push_back({"model/", b, b.tensor});
  return out;
}

at::Tensor grad_norm_sq(const std::vector<NamedParam>& params) {
  std::vector<at::Tensor> grads;
  for (const auto& p : params)
    if (p.param.grad().defined()) grads.push_back(p.param.grad());
  return parallel::squared_norm(grads);
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
