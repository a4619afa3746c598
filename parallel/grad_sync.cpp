#include "parallel/grad_sync.h"

#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <cmath>

namespace moetrain::parallel {

GradSync::GradSync(ProcessGroups& groups, std::vector<model::ParamInfo> params, double bucket_mb)
    : g_(groups), params_(std::move(params)), bucket_bytes_(static_cast<int64_t>(bucket_mb * 1024 * 1024)) {
  // Reverse registration order: roughly the order backward produces the gradients.
  for (size_t i = params_.size(); i-- > 0;) {
    (params_[i].routed() ? expert_ : dense_).push_back(i);
    if (params_[i].shared_embedding) embedding_.push_back(i);
  }
}

void GradSync::reduce_buckets(const std::vector<size_t>& which, Communicator* comm) {
  if (!comm || comm->size() == 1 || which.empty()) return;
  size_t begin = 0;
  while (begin < which.size()) {
    // A bucket: consecutive parameters of one dtype up to bucket_bytes (at least one parameter).
    std::vector<at::Tensor> grads;
    int64_t bytes = 0;
    size_t end = begin;
    const auto dtype = params_[which[begin]].tensor.scalar_type();
    while (end < which.size()) {
      at::Tensor& p = params_[which[end]].tensor;
      if (p.scalar_type() != dtype || (end > begin && bytes + static_cast<int64_t>(p.nbytes()) > bucket_bytes_)) break;
      if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
      grads.push_back(p.grad());
      bytes += static_cast<int64_t>(p.nbytes());
      ++end;
    }
    std::vector<at::Tensor> flat_parts;
    for (auto& gr : grads) flat_parts.push_back(gr.reshape({-1}));
    at::Tensor flat = at::cat(flat_parts);
    comm->all_reduce(flat, ReduceOp::kSum);
    int64_t off = 0;
    for (auto& gr : grads) {
      gr.copy_(flat.narrow(0, off, gr.numel()).view(gr.sizes()));
      off += gr.numel();
    }
    begin = end;
  }
}

void GradSync::reduce() {
  at::NoGradGuard no_grad;
  reduce_buckets(dense_, g_.dp.get());
  reduce_buckets(expert_, g_.edp.get());
  reduce_buckets(embedding_, g_.embedding.get());
}

double GradSync::global_norm() { return std::sqrt(global_norm_sq().item<double>()); }

at::Tensor GradSync::global_norm_sq() {
  at::NoGradGuard no_grad;
  const bool last_not_first = g_.topology.last_stage(g_.rank) && !g_.topology.first_stage(g_.rank);
  const auto opts = at::TensorOptions()
                        .dtype(at::kDouble)
                        .device(params_.empty() ? at::Device(at::kCPU) : params_[0].tensor.device());
  // Sums of squares stay on the device: one host read per step whatever the model size.
  at::Tensor dense = at::zeros({1}, opts), expert = at::zeros({1}, opts);
  std::vector<at::Tensor> on_gpu[2];  // dense, routed
  for (const auto& info : params_) {
    const at::Tensor& p = info.tensor;
    if (!p.grad().defined()) continue;
    // The last stage's embedding is a copy of the first stage's: counted there.
    if (info.shared_embedding && last_not_first) continue;
    if (p.is_cuda())
      on_gpu[info.routed() ? 1 : 0].push_back(p.grad());
    else
      (info.routed() ? expert : dense).add_(p.grad().to(at::kDouble).pow(2).sum());
  }
  if (!on_gpu[0].empty()) dense.add_(squared_norm(on_gpu[0]));
  if (!on_gpu[1].empty()) expert.add_(squared_norm(on_gpu[1]));
  // Expert shards differ over ep; stages differ over pp; replicas (dp, edp) hold the same values: counted once.
  if (g_.ep && g_.ep->size() > 1) g_.ep->all_reduce(expert, ReduceOp::kSum);
  at::Tensor total = dense + expert;
  if (g_.pp && g_.pp->size() > 1) g_.pp->all_reduce(total, ReduceOp::kSum);
  return total;
}

at::Tensor squared_norm(const std::vector<at::Tensor>& grads) {
  at::NoGradGuard no_grad;
  if (grads.empty()) return at::zeros({1}, at::kDouble);
  const std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2);
  return at::stack(norms).to(at::kDouble).pow(2).sum().reshape({1});
}

}  // namespace moetrain::parallel
