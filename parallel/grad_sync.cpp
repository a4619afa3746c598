#include "parallel/grad_sync.h"

#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace moetrain::parallel {
at::Tensor piece_view(const at::Tensor& param, const std::string& name, const ShardPiece& piece) {
  if (!param.is_contiguous()) throw std::logic_error(fmt::format("parameter {} is not contiguous", name));
  return param.view({-1}).narrow(0, piece.offset, piece.numel);
}

GradSync::GradSync(ProcessGroups& groups, std::vector<model::ParamInfo> params, double bucket_mb,
                   bool shard_optimizer)
    : g_(groups), params_(std::move(params)), bucket_bytes_(static_cast<int64_t>(bucket_mb * 1024 * 1024)) {
  // Reverse registration order: roughly the order backward produces the gradients.
  std::vector<size_t> dense_only;
  for (size_t i = params_.size(); i-- > 0;) {
    (params_[i].routed() ? expert_ : dense_).push_back(i);
    if (params_[i].shared_embedding) embedding_.push_back(i);
    else if (!params_[i].routed()) dense_only.push_back(i);
  }
  sharded_ = shard_optimizer && g_.dp && g_.dp->size() > 1;
  if (!sharded_) return;
  add_sharded_buckets(dense_only, g_.dp.get(), false);
  add_sharded_buckets(embedding_, g_.dp.get(), true);
  if (g_.edp && g_.edp->size() > 1) {
    add_sharded_buckets(expert_, g_.edp.get(), false);
  } else {
    // Whole experts, in registration order (checkpoints stack a whole expert's rows in order).
    for (auto it = expert_.rbegin(); it != expert_.rend(); ++it)
      pieces_.push_back({*it, 0, params_[*it].tensor.numel(), false});
  }
  piece_grads_.resize(pieces_.size());
}

std::vector<std::vector<size_t>> GradSync::make_buckets(const std::vector<size_t>& which) const {
  std::vector<std::vector<size_t>> out;
  int64_t bytes = 0;
  for (size_t i : which) {
    const at::Tensor& p = params_[i].tensor;
    const auto n = static_cast<int64_t>(p.nbytes());
    if (out.empty() || p.scalar_type() != params_[out.back().front()].tensor.scalar_type() ||
        bytes + n > bucket_bytes_) {
      out.emplace_back();
      bytes = 0;
    }
    out.back().push_back(i);
    bytes += n;
  }
  return out;
}

void GradSync::add_sharded_buckets(const std::vector<size_t>& which, Communicator* comm, bool embedding) {
  const int64_t n = comm->size();
  for (auto& members : make_buckets(which)) {
    Bucket b;
    b.comm = comm;
    b.embedding = embedding;
    b.params = std::move(members);
    for (size_t i : b.params) {
      b.offsets.push_back(b.numel);
      b.numel += params_[i].tensor.numel();
    }
    b.slice = (b.numel + n - 1) / n;
    const int64_t lo = comm->rank() * b.slice, hi = lo + b.slice;
    for (size_t k = 0; k < b.params.size(); ++k) {
      const int64_t o = b.offsets[k], e = o + params_[b.params[k]].tensor.numel();
      const int64_t from = std::max(o, lo), to = std::min(e, hi);
      if (from >= to) continue;
      b.pieces.push_back(pieces_.size());
      b.at.push_back(from - lo);
      pieces_.push_back({b.params[k], from - o, to - from, true});
    }
    buckets_.push_back(std::move(b));
  }
}

at::Tensor& GradSync::grad_of(size_t i) {
  at::Tensor& p = params_[i].tensor;
  if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
  return p.mutable_grad();
}

at::Tensor GradSync::flat_grads(const std::vector<size_t>& which, int64_t padding) {
  std::vector<at::Tensor> parts;
  for (size_t i : which) parts.push_back(grad_of(i).reshape({-1}));
  if (padding > 0) parts.push_back(at::zeros({padding}, parts[0].options()));
  return at::cat(parts);
}

void GradSync::reduce_buckets(const std::vector<size_t>& which, Communicator* comm) {
  if (!comm || comm->size() == 1 || which.empty()) return;
  for (const auto& bucket : make_buckets(which)) {
    at::Tensor all = flat_grads(bucket, 0);
    comm->all_reduce(all, ReduceOp::kSum);
    int64_t off = 0;
    for (size_t i : bucket) {
      at::Tensor& gr = grad_of(i);
      gr.copy_(all.narrow(0, off, gr.numel()).view(gr.sizes()));
      off += gr.numel();
    }
  }
}

void GradSync::reduce() {
  at::NoGradGuard no_grad;
  if (!sharded_) {
    reduce_buckets(dense_, g_.dp.get());
    reduce_buckets(expert_, g_.edp.get());
    reduce_buckets(embedding_, g_.embedding.get());
    return;
  }
  for (const Bucket& b : buckets_) {
    const at::Tensor all = flat_grads(b.params, b.slice * b.comm->size() - b.numel);
    at::Tensor mine = at::empty({b.slice}, all.options());
    b.comm->reduce_scatter(all, mine);
    if (b.embedding && g_.embedding && g_.embedding->size() > 1) g_.embedding->all_reduce(mine, ReduceOp::kSum);
    for (size_t k = 0; k < b.pieces.size(); ++k)
      piece_grads_[b.pieces[k]] = mine.narrow(0, b.at[k], pieces_[b.pieces[k]].numel);
  }
  for (size_t j = 0; j < pieces_.size(); ++j)
    if (!pieces_[j].partitioned) piece_grads_[j] = grad_of(pieces_[j].param);
}

void GradSync::gather_params() {
  if (!sharded_) return;
  at::NoGradGuard no_grad;
  for (const Bucket& b : buckets_) {
    const at::Tensor& first = params_[b.params[0]].tensor;
    at::Tensor mine = at::zeros({b.slice}, first.options());
    for (size_t k = 0; k < b.pieces.size(); ++k) {
      const ShardPiece& piece = pieces_[b.pieces[k]];
      const model::ParamInfo& p = params_[piece.param];
      mine.narrow(0, b.at[k], piece.numel).copy_(piece_view(p.tensor, p.name, piece));
    }
    at::Tensor all = at::empty({b.slice * b.comm->size()}, first.options());
    b.comm->all_gather(mine, all);
    for (size_t k = 0; k < b.params.size(); ++k) {
      const model::ParamInfo& p = params_[b.params[k]];
      const ShardPiece whole{b.params[k], 0, p.tensor.numel(), true};
      piece_view(p.tensor, p.name, whole).copy_(all.narrow(0, b.offsets[k], p.tensor.numel()));
    }
  }
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
  auto add = [&](const model::ParamInfo& info, const at::Tensor& g) {
    if (!g.defined()) return;
    // The last stage's embedding is a copy of the first stage's: counted there.
    if (info.shared_embedding && last_not_first) return;
    if (g.is_cuda())
      on_gpu[info.routed() ? 1 : 0].push_back(g);
    else
      (info.routed() ? expert : dense).add_(g.to(at::kDouble).pow(2).sum());
  };
  if (sharded_) {
    for (size_t j = 0; j < pieces_.size(); ++j) add(params_[pieces_[j].param], piece_grads_[j]);
  } else {
    for (const auto& info : params_) add(info, info.tensor.grad());
  }
  if (!on_gpu[0].empty()) dense.add_(squared_norm(on_gpu[0]));
  if (!on_gpu[1].empty()) expert.add_(squared_norm(on_gpu[1]));
  at::Tensor total;
  if (sharded_) {
    // Each rank holds the sums of its slices: the dp group of a stage spans every (ep, edp) pair, so its sum
    // counts every dense and every routed element of the stage once.
    total = dense + expert;
    g_.dp->all_reduce(total, ReduceOp::kSum);
  } else {
    // Expert shards differ over ep; replicas (dp, edp) hold the same values: counted once.
    if (g_.ep && g_.ep->size() > 1) g_.ep->all_reduce(expert, ReduceOp::kSum);
    total = dense + expert;
  }
  if (g_.pp && g_.pp->size() > 1) g_.pp->all_reduce(total, ReduceOp::kSum);  // stages differ over pp
  return total;
}

at::Tensor squared_norm(const std::vector<at::Tensor>& grads) {
  at::NoGradGuard no_grad;
  if (grads.empty()) return at::zeros({1}, at::kDouble);
  const std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2);
  return at::stack(norms).to(at::kDouble).pow(2).sum().reshape({1});
}

}  // namespace moetrain::parallel
