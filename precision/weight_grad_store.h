// The split backward of zero-bubble pipeline schedules (DualPipe's WeightGradStore, the B/W split of Zero Bubble
// Pipeline Parallelism): while deferral is on, a backward pass computes the input gradients of the linear layers
// (precision::gemm, the routed experts' grouped GEMMs) and queues their weight-gradient GEMMs instead of running
// them; flush() closes the pass's queue into one W unit, and run_oldest() later computes that unit's weight
// gradients and accumulates them into the parameters' .grad as autograd would have (same GEMMs, same operands,
// converted to the parameter's dtype, added in place). Outside deferral everything computes at once: the store is
// only consulted, the numbers do not change. The trainer's thread only (the CPU autograd engine runs there).
#pragma once

#include <ATen/core/Tensor.h>

#include <deque>
#include <functional>
#include <vector>

namespace moetrain::precision {

class WeightGradStore {
 public:
  // The linear layers built while this is on (forward passes) support the split; gemm() then records an op whose
  // backward can defer (in FP32 mode too, where it otherwise leaves the backward to autograd's own nodes).
  static void set_split_forward(bool on);
  static bool split_forward();
  // Backward passes while this is on queue their weight-gradient work.
  static void set_deferring(bool on);
  static bool deferring();
  // In a backward: when deferring, queues `work` (which accumulates into the weights itself) and returns true; else
  // returns false and the caller computes and returns the weight gradient as usual.
  static bool defer(std::function<void()> work);
  // The work queued since the last flush becomes one W unit (possibly empty).
  static void flush();
  // Runs the oldest W unit; a logic error when none is queued.
  static void run_oldest();
  static size_t units();  // W units queued
  // Drops everything queued (a step that failed part-way).
  static void clear();
};

// g accumulated into p.grad() the way autograd's AccumulateGrad does it: converted to p's dtype, then added in place
// (or taken as the gradient when p has none yet).
void accumulate_grad(const at::Tensor& p, const at::Tensor& g);

// In a backward function, the gradient of weight w: `wgrad()` now, or — when deferring — undefined (autograd then
// accumulates nothing) with `wgrad()` queued to be accumulated into w's .grad by the W pass.
at::Tensor weight_grad_or_defer(const at::Tensor& w, std::function<at::Tensor()> wgrad);

// RAII: deferral on for one backward pass, its queue flushed into a W unit at the end.
class DeferWeightGrads {
 public:
  explicit DeferWeightGrads(bool on);
  ~DeferWeightGrads();
  DeferWeightGrads(const DeferWeightGrads&) = delete;
  DeferWeightGrads& operator=(const DeferWeightGrads&) = delete;

 private:
  bool on_;
};

}  // namespace moetrain::precision
