// AdamW over the model's parameters with decoupled weight decay (not applied to norms and biases, i.e. 1-D
// tensors), moments kept in FP32 or BF16, and global gradient-norm clipping. With ZeRO-1 (parallel/grad_sync.h)
// it updates, and keeps moments for, only this rank's pieces of the parameters.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoints/checkpointer.h"
#include "config/config.h"
#include "model/param_roles.h"
#include "parallel/grad_sync.h"

namespace moetrain::trainer {

struct NamedParam {
  std::string name;
  at::Tensor param;
};

class AdamW {
 public:
  // pieces: the elements this rank updates (ZeRO-1's GradSync::pieces()); empty: every parameter whole.
  AdamW(std::vector<NamedParam> params, const config::TrainConfig& t, c10::ScalarType moment_dtype,
        std::vector<parallel::ShardPiece> pieces = {});

  // One update at learning rate lr. Parameters without a gradient (an expert that saw no token) count as zero
  // gradient: their moments decay and weight decay still applies, as on every other replica. On a GPU with FP32
  // moments the update is LibTorch's fused AdamW kernel (one pass over each parameter, the same formula); else
  // the per-tensor operations below.
  // grad_scale multiplies every gradient first (gradient clipping, clip_factor): a pass of its own on the CPU,
  // folded into the fused kernel on a GPU.
  // grads: each piece's gradient (GradSync::piece_grads()); nullptr: the parameters' .grad.
  void step(double lr, double grad_scale = 1.0, const std::vector<at::Tensor>* grads = nullptr);
  void zero_grad();

  int64_t steps_taken() const { return step_; }
  const std::vector<NamedParam>& params() const { return params_; }
  // What the moments are kept for: one piece per parameter (whole) or this rank's pieces; moment i belongs to
  // piece i (flat for a part of a parameter, shaped as the parameter for a whole one).
  const std::vector<parallel::ShardPiece>& pieces() const { return pieces_; }
  int64_t state_bytes() const;  // bytes of the moments this rank holds
  const at::Tensor& exp_avg(size_t i) const { return m_[i]; }
  const at::Tensor& exp_avg_sq(size_t i) const { return v_[i]; }
  // Restoring from a checkpoint.
  at::Tensor& exp_avg_mut(size_t i) { return m_[i]; }
  at::Tensor& exp_avg_sq_mut(size_t i) { return v_[i]; }
  void set_steps_taken(int64_t steps) { step_ = steps; }
  static bool decays(const NamedParam& p) { return p.param.dim() >= 2; }

 private:
  std::vector<NamedParam> params_;
  std::vector<parallel::ShardPiece> pieces_;
  at::Tensor value(size_t piece);  // the elements piece i updates (a view of its parameter)
  bool fused_step(double lr, double grad_scale, std::vector<at::Tensor>& grads);

  std::vector<at::Tensor> m_, v_;
  std::vector<at::Tensor> steps_;  // the fused kernel's step counts, one per parameter, on the device
  double beta1_, beta2_, eps_, weight_decay_;
  int64_t step_ = 0;
};

// What a checkpoint saves and restores in place: each parameter (`params`, in the optimizer's order), the two
// AdamW moments of each optimizer piece (a part of a parameter under ZeRO-1: its element range), then the buffers.
std::vector<checkpoints::StateTensor> checkpoint_state(const std::vector<model::ParamInfo>& params, AdamW& optimizer,
                                                       const std::vector<model::ParamInfo>& buffers);

// The squared L2 norm of all gradients (missing gradients count as zero), summed on their device ([1], double):
// no host read. grad_norm is its square root on the host.
at::Tensor grad_norm_sq(const std::vector<NamedParam>& params);
double grad_norm(const std::vector<NamedParam>& params);
// The factor gradient clipping scales all gradients by: max_norm / (norm + 1e-6) when norm > max_norm, else 1
// (max_norm 0: no clipping).
double clip_factor(double norm, double max_norm);
// Multiplies every defined gradient by scale (nothing to do at 1).
void scale_grads(const std::vector<NamedParam>& params, double scale);
// Scales all gradients by clip_factor(norm, max_norm).
void clip_grads(const std::vector<NamedParam>& params, double norm, double max_norm);

}  // namespace moetrain::trainer
