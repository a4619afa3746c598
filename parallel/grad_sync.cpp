#include "parallel/grad_sync.h"

#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <fmt/format.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>

namespace moetrain::parallel {
namespace {

// Called by autograd after a parameter's gradient was accumulated into its .grad.
class AfterAccumulation final : public torch::autograd::PostAccumulateGradHook {
 public:
  explicit AfterAccumulation(std::function<void()> f) : f_(std::move(f)) {}
  void operator()(const torch::autograd::Variable& /*param*/) override { f_(); }

 private:
  std::function<void()> f_;
};

}  // namespace

at::Tensor piece_view(const at::Tensor& param, const std::string& name, const ShardPiece& piece) {
  if (!param.is_contiguous()) throw std::logic_error(fmt::format("parameter {} is not contiguous", name));
  return param.view({-1}).narrow(0, piece.offset, piece.numel);
}

c10::ScalarType grad_dtype(c10::ScalarType t) { return at::promote_types(t, at::kFloat); }

GradSync::GradSync(ProcessGroups& groups, std::vector<model::ParamInfo> params, const config::ParallelConfig& p)
    : g_(groups),
      params_(std::move(params)),
      bucket_bytes_(static_cast<int64_t>(p.bucket_size_mb * 1024 * 1024)),
      overlap_(p.overlap_grad_reduce),
      overlap_gather_(p.overlap_param_gather) {
  at::NoGradGuard no_grad;
  // Reverse registration order: roughly the order backward produces the gradients.
  std::vector<size_t> dense, embedding, expert;
  for (size_t i = params_.size(); i-- > 0;)
    (params_[i].routed() ? expert : params_[i].shared_embedding ? embedding : dense).push_back(i);
  sharded_ = p.distributed_optimizer && g_.dp && g_.dp->size() > 1;
  const bool edp = g_.edp && g_.edp->size() > 1;
  add_buckets(dense, g_.dp.get(), false, sharded_);
  add_buckets(embedding, g_.dp.get(), true, sharded_);
  add_buckets(expert, g_.edp.get(), false, sharded_ && edp);
  if (sharded_ && !edp)  // whole experts, in registration order (checkpoints stack a whole expert's rows in order)
    for (auto it = expert.rbegin(); it != expert.rend(); ++it)
      pieces_.push_back({*it, 0, params_[*it].tensor.numel(), false});
  piece_grads_.resize(pieces_.size());

  // The groups' lanes (each group's buckets in order) and, with overlap, a hook on every parameter reduced.
  bucket_of_.assign(params_.size(), 0);
  final_.assign(params_.size(), 0);
  std::map<Communicator*, size_t> lane_of;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    if (!reduces(buckets_[b])) continue;
    const auto [it, fresh] = lane_of.emplace(buckets_[b].comm, lanes_.size());
    if (fresh) lanes_.emplace_back();
    lanes_[it->second].push_back(b);
    for (size_t i : buckets_[b].params) {
      bucket_of_[i] = b;
      if (overlap_)
        torch::autograd::impl::set_post_acc_grad_hooks(
            params_[i].tensor, std::make_unique<AfterAccumulation>([this, i] { grad_ready(i); }));
    }
  }
  next_.assign(lanes_.size(), 0);
  for (size_t b = 0; b < buckets_.size(); ++b)
    if (buckets_[b].partitioned)
      for (size_t i : buckets_[b].params) gather_bucket_[params_[i].tensor.unsafeGetTensorImpl()] = b;
}

GradSync::~GradSync() {
  // A gather still in flight (the owner is unwinding from an error; else it finished them) may still write into
  // its buffer: the buffer and the request are left alive rather than waited for, which could hang on a failed
  // peer. The job is ending.
  for (Bucket& b : buckets_) {
    if (!b.gather) continue;
    bool done = false;
    try {
      done = b.gather->test();
    } catch (const std::exception&) {  // the communicator's error: the job is failing anyway
    }
    if (done) continue;
    (void)new at::Tensor(b.grads);  // NOLINT: deliberately never freed
    (void)b.gather.release();       // NOLINT: likewise
  }
  if (!overlap_) return;
  for (const auto& lane : lanes_)
    for (size_t b : lane)
      for (size_t i : buckets_[b].params) torch::autograd::impl::set_post_acc_grad_hooks(params_[i].tensor, nullptr);
}

void GradSync::arm() {
  if (!overlap_) return;
  armed_ = true;
  started_early_ = 0;
}

void GradSync::grad_ready(size_t param) {
  if (!armed_) return;
  Bucket& b = buckets_[bucket_of_[param]];
  // A second accumulation into a gradient already being reduced would be lost: a logic error, never a wrong sum.
  if (b.pending)
    throw std::logic_error(fmt::format("the gradient of {} was accumulated again after its bucket's reduction "
                                       "started (parallel.overlap_grad_reduce: set it to false)",
                                       params_[param].name));
  if (!final_[param]) {
    final_[param] = 1;
    ++b.ready;
    if (b.ready == b.params.size()) start_ready();
  }
  for (Bucket& other : buckets_)  // MPI progresses what was started only inside MPI calls
    if (other.pending) other.pending->test();
}

void GradSync::start(Bucket& b) {
  b.pending = b.partitioned ? b.comm->start_reduce_scatter_in_place(b.grads)
                            : b.comm->start_all_reduce(b.grads, ReduceOp::kSum);
}

void GradSync::start_ready() {
  for (size_t l = 0; l < lanes_.size(); ++l)
    for (; next_[l] < lanes_[l].size(); ++next_[l]) {
      Bucket& b = buckets_[lanes_[l][next_[l]]];
      if (b.ready < b.params.size()) break;
      start(b);
      ++started_early_;
    }
}

std::vector<std::vector<size_t>> GradSync::make_buckets(const std::vector<size_t>& which) const {
  std::vector<std::vector<size_t>> out;
  int64_t bytes = 0;
  for (size_t i : which) {
    const at::Tensor& p = params_[i].tensor;
    const auto n = p.numel() * static_cast<int64_t>(c10::elementSize(grad_dtype(p.scalar_type())));
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

void GradSync::add_buckets(const std::vector<size_t>& which, Communicator* comm, bool embedding, bool partition) {
  const int64_t n = partition ? comm->size() : 1;
  for (auto& members : make_buckets(which)) {
    Bucket b;
    b.comm = comm;
    b.embedding = embedding;
    b.partitioned = partition;
    b.params = std::move(members);
    for (size_t i : b.params) {
      b.offsets.push_back(b.numel);
      b.numel += params_[i].tensor.numel();
    }
    b.slice = (b.numel + n - 1) / n;
    const at::Tensor& first = params_[b.params.front()].tensor;
    b.grads = at::zeros({b.slice * n}, first.options().dtype(grad_dtype(first.scalar_type())));
    for (size_t k = 0; k < b.params.size(); ++k) {
      at::Tensor& p = params_[b.params[k]].tensor;
      p.mutable_grad() = b.grads.narrow(0, b.offsets[k], p.numel()).view(p.sizes());
    }
    if (partition) {
      const int64_t lo = comm->rank() * b.slice, hi = lo + b.slice;
      for (size_t k = 0; k < b.params.size(); ++k) {
        const int64_t o = b.offsets[k], e = o + params_[b.params[k]].tensor.numel();
        const int64_t from = std::max(o, lo), to = std::min(e, hi);
        if (from >= to) continue;
        b.pieces.push_back(pieces_.size());
        b.at.push_back(from - lo);
        pieces_.push_back({b.params[k], from - o, to - from, true});
      }
    }
    buckets_.push_back(std::move(b));
  }
}

void GradSync::zero_grads() {
  for (Bucket& b : buckets_)
    if (!b.gather) b.grads.zero_();  // else finish() zeroes it, before the backward pass accumulates into it
}

void GradSync::reduce() {
  RECORD_USER_SCOPE("gradient reduction");
  at::NoGradGuard no_grad;
  if (gathering())
    throw std::logic_error("a parameter all-gather was still in flight when the gradients were reduced (the forward "
                           "pass must finish it: GradSync::finish_gather)");
  armed_ = false;
  // What the backward pass did not start, in each group's order; then every reduction is waited for.
  for (size_t l = 0; l < lanes_.size(); ++l)
    for (; next_[l] < lanes_[l].size(); ++next_[l]) start(buckets_[lanes_[l][next_[l]]]);
  const bool embedding_group = g_.embedding && g_.embedding->size() > 1;
  for (Bucket& b : buckets_) {
    if (b.pending) b.pending->wait();
    b.pending.reset();
    b.ready = 0;
    if (!b.partitioned) {
      if (b.embedding && embedding_group) g_.embedding->all_reduce(b.grads, ReduceOp::kSum);
      continue;
    }
    at::Tensor mine = b.grads.narrow(0, b.comm->in_place_part() * b.slice, b.slice);  // the slice's sum
    if (b.embedding && embedding_group) g_.embedding->all_reduce(mine, ReduceOp::kSum);
    for (size_t k = 0; k < b.pieces.size(); ++k)
      piece_grads_[b.pieces[k]] = mine.narrow(0, b.at[k], pieces_[b.pieces[k]].numel);
  }
  std::fill(next_.begin(), next_.end(), 0);
  std::fill(final_.begin(), final_.end(), 0);
  for (size_t j = 0; j < pieces_.size(); ++j)
    if (!pieces_[j].partitioned) piece_grads_[j] = params_[pieces_[j].param].tensor.grad();
}

void GradSync::gather_params(const std::vector<at::Tensor>& values) {
  if (!sharded_) return;
  if (values.size() != pieces_.size())
    throw std::logic_error(fmt::format("gather_params: {} values for {} pieces", values.size(), pieces_.size()));
  if (gathering()) throw std::logic_error("gather_params: the previous parameter all-gather is still in flight");
  RECORD_USER_SCOPE("parameter all-gather");
  at::NoGradGuard no_grad;
  // The forward pass's order (the reverse of the buckets'), the same on every rank. The gradients were consumed
  // by the optimizer step: the buffer receives the parameters (its dtype is at least as wide as theirs).
  for (auto it = buckets_.rbegin(); it != buckets_.rend(); ++it) {
    Bucket& b = *it;
    if (!b.partitioned) continue;
    at::Tensor all = gathered(b);
    at::Tensor mine = all.narrow(0, b.comm->rank() * b.slice, b.slice);
    for (size_t k = 0; k < b.pieces.size(); ++k) {
      const size_t j = b.pieces[k];
      mine.narrow(0, b.at[k], pieces_[j].numel).copy_(values[j].reshape({-1}));
    }
    b.gather = b.comm->start_all_gather_in_place(all);
    ++gathering_;
  }
  for (at::Tensor& g : piece_grads_) g = at::Tensor();
  if (!overlap_gather_) finish_gather();
}

at::Tensor GradSync::gathered(const Bucket& b) const {
  return b.grads.view(params_[b.params[0]].tensor.scalar_type()).narrow(0, 0, b.slice * b.comm->size());
}

void GradSync::finish(Bucket& b) {
  b.gather->wait();
  b.gather.reset();
  --gathering_;
  const at::Tensor all = gathered(b);
  for (size_t k = 0; k < b.params.size(); ++k) {
    const model::ParamInfo& p = params_[b.params[k]];
    const ShardPiece whole{b.params[k], 0, p.tensor.numel(), true};
    piece_view(p.tensor, p.name, whole).copy_(all.narrow(0, b.offsets[k], p.tensor.numel()));
  }
  b.grads.zero_();
}

void GradSync::finish_gather(const std::vector<at::Tensor>& params) {
  if (!gathering()) return;
  RECORD_USER_SCOPE("parameter all-gather");
  at::NoGradGuard no_grad;
  for (const at::Tensor& p : params) {
    const auto it = gather_bucket_.find(p.unsafeGetTensorImpl());
    if (it == gather_bucket_.end() || !buckets_[it->second].gather) continue;
    finish(buckets_[it->second]);
    ++gathered_in_forward_;
  }
  for (Bucket& b : buckets_)  // MPI progresses what was started only inside MPI calls
    if (b.gather) b.gather->test();
}

void GradSync::finish_gather() {
  if (!gathering()) return;
  RECORD_USER_SCOPE("parameter all-gather");
  at::NoGradGuard no_grad;
  for (auto it = buckets_.rbegin(); it != buckets_.rend(); ++it)
    if (it->gather) finish(*it);
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
  std::vector<at::Tensor> grads[2];  // dense, routed
  auto add = [&](const model::ParamInfo& info, const at::Tensor& g) {
    if (!g.defined()) return;
    // The last stage's embedding is a copy of the first stage's: counted there.
    if (info.shared_embedding && last_not_first) return;
    grads[info.routed() ? 1 : 0].push_back(g);
  };
  if (sharded_) {
    for (size_t j = 0; j < pieces_.size(); ++j) add(params_[pieces_[j].param], piece_grads_[j]);
  } else {
    for (const auto& info : params_) add(info, info.tensor.grad());
  }
  if (!grads[0].empty()) dense.add_(squared_norm(grads[0]));
  if (!grads[1].empty()) expert.add_(squared_norm(grads[1]));
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
