#include "model/row_ops.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/zeros.h>
#include <torch/autograd.h>

#include "model/fused_cpu.h"

namespace moetrain::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor gather_sum(const at::Tensor& y, const at::Tensor& slot_of, int64_t k) {
  if (fused_cpu::applies(y)) return fused_cpu::gather_sum(y, slot_of, k);
  const int64_t n = slot_of.size(0) / k;
  return y.index_select(0, slot_of).view({n, k, y.size(1)}).sum(1);
}

struct PermuteRows : public torch::autograd::Function<PermuteRows> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& perm,
                            const at::Tensor& inverse) {
    ctx->save_for_backward({inverse});
    return x.index_select(0, perm);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {grads[0].index_select(0, ctx->get_saved_variables()[0]), at::Tensor(), at::Tensor()};
  }
};

struct ExpandRows : public torch::autograd::Function<ExpandRows> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& token_of,
                            const at::Tensor& slot_of, int64_t k) {
    ctx->save_for_backward({slot_of});
    ctx->saved_data["k"] = k;
    return x.index_select(0, token_of);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor dx = gather_sum(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["k"].toInt());
    return {dx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct ReduceRows : public torch::autograd::Function<ReduceRows> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& token_of,
                            const at::Tensor& slot_of, int64_t k) {
    ctx->save_for_backward({token_of});
    return gather_sum(y, slot_of, k);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {grads[0].index_select(0, ctx->get_saved_variables()[0]), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct SplitLastColumn : public torch::autograd::Function<SplitLastColumn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x) {
    const int64_t d = x.size(1) - 1;
    ctx->saved_data["shape"] = std::vector<int64_t>{x.size(0), d};
    return {x.narrow(1, 0, d).contiguous(), x.select(1, d).contiguous()};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<int64_t> shape = ctx->saved_data["shape"].toIntVector();
    const auto opts = (grads[0].defined() ? grads[0] : grads[1]).options();
    const at::Tensor dx = grads[0].defined() ? grads[0] : at::zeros(shape, opts);
    const at::Tensor dg = grads[1].defined() ? grads[1] : at::zeros({shape[0]}, opts);
    return {at::cat({dx, dg.unsqueeze(1)}, 1)};
  }
};

}  // namespace

at::Tensor permute_rows(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& inverse) {
  return PermuteRows::apply(x, perm, inverse);
}

at::Tensor expand_rows(const at::Tensor& x, const at::Tensor& token_of, const at::Tensor& slot_of, int64_t k) {
  return ExpandRows::apply(x, token_of, slot_of, k);
}

at::Tensor reduce_rows(const at::Tensor& y, const at::Tensor& token_of, const at::Tensor& slot_of, int64_t k) {
  return ReduceRows::apply(y, token_of, slot_of, k);
}

std::pair<at::Tensor, at::Tensor> split_last_column(const at::Tensor& x) {
  variable_list out = SplitLastColumn::apply(x);
  return {out[0], out[1]};
}

}  // namespace moetrain::model
