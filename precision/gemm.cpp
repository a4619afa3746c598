#include "precision/gemm.h"

#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <torch/autograd.h>

#include "precision/cpu_gemm.h"
#include "precision/fp8.h"
#include "precision/weight_cache.h"
#include "precision/weight_grad_store.h"

namespace moetrain::precision {
namespace {

// y = x · wᵀ in BF16 with w's BF16 copy made once per change of w (precision/weight_cache.h); x is saved for the
// backward pass in BF16. dgrad in BF16; wgrad in BF16 on BF16 operands, returned in w's dtype (FP32) and
// accumulated there: the numbers of casting x and w per call, without the per-call cast of w.
struct Bf16Linear : public torch::autograd::Function<Bf16Linear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w) {
    const at::Tensor xb = x.to(at::kBFloat16);
    ctx->save_for_backward({xb, w});
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    return at::linear(xb, bf16_weight(w)).to(x.scalar_type());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& xb = saved[0];
    const at::Tensor& w = saved[1];
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    const at::Tensor dy = grads[0].to(at::kBFloat16);
    at::Tensor dx = at::matmul(dy, bf16_weight(w)).to(dtype);
    return {dx, weight_grad_or_defer(w, [dy, xb, w] {
              return at::matmul(dy.reshape({-1, dy.size(-1)}).t(), xb.reshape({-1, xb.size(-1)})).to(w.scalar_type());
            })};
  }
};

// y = x · wᵀ in FP32 as at::linear computes it (the forward product through the BLAS), with a backward of its own:
// dx = dy · w and dw = dyᵀ · x over the flattened tokens, the weight gradient deferrable
// (precision/weight_grad_store.h), both through cpu_gemm::mm: the micro-kernels of precision/cpu_gemm.h for FP32 on
// the CPU, at::mm elsewhere.
// (With the micro-kernels in the forward product too, parallel.equivalence's 8-layer runs at dp 2 drift to 1.9e-5 of a
// parameter's scale after 10 steps, over its 1e-5: not a dependence on the layout, since every layout multiplies
// micro-batches of the same rows, but a trajectory on which the optimizer amplifies the reduction order's rounding
// more; with the BLAS forward the same runs agree within 2e-6.)
struct SplitLinear : public torch::autograd::Function<SplitLinear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w) {
    ctx->save_for_backward({x, w});
    return at::linear(x, w);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w = saved[1];
    const at::Tensor dy = grads[0].reshape({-1, grads[0].size(-1)});
    at::Tensor dx = cpu_gemm::mm(dy, w).view(x.sizes());
    return {dx, weight_grad_or_defer(w, [dy, x] { return cpu_gemm::mm(dy.t(), x.reshape({-1, x.size(-1)})); })};
  }
};

}  // namespace

at::Tensor gemm(const at::Tensor& x, const at::Tensor& weight, Mode mode) {
  switch (mode) {
    case Mode::kFp32:
      // On the CPU the node always (its backward's GEMMs on the micro-kernels), elsewhere when a schedule splits the
      // backward pass.
      if ((x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat) ||
          WeightGradStore::split_forward())
        return SplitLinear::apply(x, weight);
      return at::linear(x, weight);
    case Mode::kBf16:
      return Bf16Linear::apply(x, weight);
    case Mode::kFp8:
      return fp8_linear(x, weight);
  }
  return at::linear(x, weight);
}

}  // namespace moetrain::precision
