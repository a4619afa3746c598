// AdamW over the model's parameters with decoupled weight decay (not applied to norms and biases, i.e. 1-D
// tensors), moments kept in FP32 or BF16, and global gradient-norm clipping. With ZeRO-1 (parallel/grad_sync.h)
// it updates, and keeps moments for, only this rank's pieces of the parameters.
// Master weights: in the bf16 and fp8 modes the model's parameters are BF16 and the optimizer keeps the FP32
// master weights — of its pieces only, under ZeRO-1 — updates them, and copies them into the parameters (whole
// pieces here; ZeRO-1's slices through GradSync::gather_params). In fp32 mode the parameters are the master
// weights. Gradients are FP32 in every mode (parallel/grad_sync.h keeps them; zero_grad() here without it).
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
  // param_dtype: Undefined, or the parameters' own: they are the master weights. Another (BF16): the FP32 master
  // pieces are taken from the parameters' current values, then the parameters are cast to param_dtype.
  AdamW(std::vector<NamedParam> params, const config::TrainConfig& t, c10::ScalarType moment_dtype,
        std::vector<parallel::ShardPiece> pieces = {}, c10::ScalarType param_dtype = c10::ScalarType::Undefined);

  // One update at learning rate lr. Parameters without a gradient (an expert that saw no token) count as zero
  // gradient: their moments decay and weight decay still applies, as on every other replica. With FP32 moments
  // and FP32 values (parameters or master weights) the update is LibTorch's fused AdamW kernel, on the CPU as on
  // a GPU (one pass over each parameter, the same formula); BF16 moments take the per-tensor operations.
  // grad_scale multiplies every gradient first (gradient clipping, clip_factor): folded into the fused kernel, a
  // pass of its own otherwise.
  // grads: each piece's gradient (GradSync::piece_grads()); nullptr: the parameters' .grad.
  // With master weights, the whole (not partitioned) pieces are then copied into their parameters.
  void step(double lr, double grad_scale = 1.0, const std::vector<at::Tensor>* grads = nullptr);
  // Gradients dropped (FP32 parameters) or zeroed in place, allocated in FP32 where missing (master weights).
  void zero_grad();
  // Master weights: copies the whole pieces into their parameters (after a checkpoint load; step() does it).
  void publish();
  // Each piece's current value (pieces() order): its master weights, or a view of its parameter.
  std::vector<at::Tensor> piece_values();

  int64_t steps_taken() const { return step_; }
  const std::vector<NamedParam>& params() const { return params_; }
  // What the moments are kept for: one piece per parameter (whole) or this rank's pieces; moment i belongs to
  // piece i (flat for a part of a parameter, shaped as the parameter for a whole one).
  const std::vector<parallel::ShardPiece>& pieces() const { return pieces_; }
  int64_t state_bytes() const;   // bytes of the moments this rank holds
  bool has_master() const { return !master_.empty(); }
  int64_t master_bytes() const;  // bytes of the master weights this rank holds (0 without)
  const at::Tensor& master(size_t i) const { return master_[i]; }
  at::Tensor& master_mut(size_t i) { return master_[i]; }
  const at::Tensor& exp_avg(size_t i) const { return m_[i]; }
  const at::Tensor& exp_avg_sq(size_t i) const { return v_[i]; }
  // Restoring from a checkpoint.
  at::Tensor& exp_avg_mut(size_t i) { return m_[i]; }
  at::Tensor& exp_avg_sq_mut(size_t i) { return v_[i]; }
  void set_steps_taken(int64_t steps) { step_ = steps; }
  static bool decays(const NamedParam& p) { return p.param.dim() >= 2; }
  // Whether step() runs the fused kernel; use_fused(false) keeps the per-tensor operations (the reference a test
  // holds the kernel against).
  bool fused_kernel();
  void use_fused(bool allowed) { fused_allowed_ = allowed; }

 private:
  std::vector<NamedParam> params_;
  std::vector<parallel::ShardPiece> pieces_;
  at::Tensor value(size_t piece);       // the elements piece i updates (its master, or a view of its parameter)
  at::Tensor param_view(size_t piece);  // piece i's elements of its parameter
  bool fused_step(double lr, double grad_scale, std::vector<at::Tensor>& grads);
  void unfused_step(double lr, double grad_scale, std::vector<at::Tensor>& grads);

  std::vector<at::Tensor> master_;  // FP32, one per piece (empty: the parameters are the masters)
  std::vector<at::Tensor> m_, v_;
  std::vector<at::Tensor> steps_;  // the fused kernel's step counts, one per parameter, on the device
  double beta1_, beta2_, eps_, weight_decay_;
  bool fused_allowed_ = true;
  int64_t step_ = 0;
};

// What a checkpoint saves and restores in place: each parameter (`params`, in the optimizer's order) — the master
// weights of each optimizer piece where the optimizer keeps them —, the two AdamW moments of each optimizer piece
// (a part of a parameter under ZeRO-1: its element range), then the buffers. After a load with master weights,
// the parameters are refreshed from them (AdamW::publish, GradSync::gather_params).
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
