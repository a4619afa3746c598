#include "parallel/expert_exchange.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/tensor.h>
#include <torch/autograd.h>

#include <tuple>

#include "model/row_ops.h"

namespace moetrain::parallel {
namespace {

thread_local bool t_backward_lane = false;

// The communicator of the calling thread's lane.
Communicator* lane_of(int64_t forward_comm, int64_t backward_comm) {
  return reinterpret_cast<Communicator*>(t_backward_lane && backward_comm ? backward_comm : forward_comm);
}

// An exchange already started (outside autograd): the forward pass of AllToAllFn waits for it.
struct Started {
  std::unique_ptr<PendingOp> op;
  at::Tensor out;
};

struct AllToAllFn : public torch::autograd::Function<AllToAllFn> {
  // started: 0, or a Started* whose exchange of x is under way.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t comm,
                            int64_t backward_comm, std::vector<int64_t> send_rows, std::vector<int64_t> recv_rows,
                            int64_t started) {
    ctx->saved_data["comm"] = comm;
    ctx->saved_data["backward_comm"] = backward_comm;
    ctx->saved_data["send"] = send_rows;
    ctx->saved_data["recv"] = recv_rows;
    if (started) {
      auto* s = reinterpret_cast<Started*>(started);
      s->op->wait();
      return s->out;
    }
    return lane_of(comm, backward_comm)->all_to_all_v(x.contiguous(), send_rows, recv_rows);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // On the lane of the thread running the backward pass.
    auto* comm = lane_of(ctx->saved_data["comm"].toInt(), ctx->saved_data["backward_comm"].toInt());
    auto send = ctx->saved_data["send"].toIntVector();
    auto recv = ctx->saved_data["recv"].toIntVector();
    // The reverse exchange: what came from rank r goes back to rank r.
    return {comm->all_to_all_v(grads[0].contiguous(), recv, send), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// What combine needs: the permutation from (source rank, local expert) order to expert order, and the splits.
struct ExchangeState {
  at::Tensor to_expert_order;  // index into the received rows, expert-major
  at::Tensor to_rank_order;    // its inverse
  std::vector<int64_t> send_rows, recv_rows;
};

}  // namespace

BackwardLane::BackwardLane() : previous_(t_backward_lane) { t_backward_lane = true; }
BackwardLane::~BackwardLane() { t_backward_lane = previous_; }
bool BackwardLane::active() { return t_backward_lane; }

at::Tensor all_to_all_autograd(const at::Tensor& x, Communicator& comm, const std::vector<int64_t>& send_rows,
                               const std::vector<int64_t>& recv_rows, Communicator* backward_lane) {
  return AllToAllFn::apply(x, reinterpret_cast<int64_t>(&comm), reinterpret_cast<int64_t>(backward_lane), send_rows,
                           recv_rows, int64_t{0});
}

AllToAllExpertExchange::AllToAllExpertExchange(Communicator& ep, int64_t n_routed_experts,
                                               Communicator* ep_backward_lane)
    : ep_(ep),
      ep_back_(ep_backward_lane),
      n_experts_(n_routed_experts),
      local_(model::ExpertShard{ep.rank(), ep.size()}.local_count(n_routed_experts)) {}

model::Dispatched AllToAllExpertExchange::dispatch(const at::Tensor& tokens, const at::Tensor& gates,
                                                   const std::vector<int64_t>& counts,
                                                   const std::function<void()>& meanwhile) {
  const int64_t ep = ep_.size();
  // 1. Split sizes: rank r sends `local_` counts to every rank (its tokens for that rank's experts).
  at::Tensor my_counts = at::tensor(counts, at::kLong).view({n_experts_, 1});
  if (tokens.is_cuda()) my_counts = my_counts.to(tokens.device());
  std::vector<int64_t> per_rank(static_cast<size_t>(ep), local_);
  Communicator& comm = lane();
  at::Tensor got = comm.all_to_all_v(my_counts, per_rank, per_rank).to(at::kCPU).contiguous();  // [ep·local] src-major
  const int64_t* g = got.data_ptr<int64_t>();

  ExchangeState st;
  st.send_rows.assign(static_cast<size_t>(ep), 0);
  st.recv_rows.assign(static_cast<size_t>(ep), 0);
  // Expert e lives on rank e / local_ (ExpertShard: contiguous blocks of local_ experts).
  for (int64_t e = 0; e < n_experts_; ++e) st.send_rows[static_cast<size_t>(e / local_)] += counts[static_cast<size_t>(e)];
  for (int64_t src = 0; src < ep; ++src)
    for (int64_t j = 0; j < local_; ++j) st.recv_rows[static_cast<size_t>(src)] += g[src * local_ + j];

  // 2. The tokens themselves, each with its gate as one more column, started without blocking; `meanwhile`
  // computes while they travel.
  const at::Tensor x = at::cat({tokens, gates.to(tokens.scalar_type()).unsqueeze(1)}, 1);
  Started started;
  started.op = comm.start_all_to_all_v(x.detach(), st.send_rows, st.recv_rows, started.out);
  if (meanwhile) meanwhile();
  at::Tensor received = AllToAllFn::apply(x, reinterpret_cast<int64_t>(&ep_), reinterpret_cast<int64_t>(ep_back_),
                                          st.send_rows, st.recv_rows, reinterpret_cast<int64_t>(&started));

  // 3. Received rows are grouped by source rank, then expert; the experts want them grouped by expert.
  std::vector<int64_t> block_start(static_cast<size_t>(ep * local_));
  int64_t off = 0;
  for (int64_t src = 0; src < ep; ++src)
    for (int64_t j = 0; j < local_; ++j) {
      block_start[static_cast<size_t>(src * local_ + j)] = off;
      off += g[src * local_ + j];
    }
  std::vector<int64_t> order;
  order.reserve(static_cast<size_t>(off));
  model::Dispatched d;
  d.local_counts.assign(static_cast<size_t>(local_), 0);
  for (int64_t j = 0; j < local_; ++j)
    for (int64_t src = 0; src < ep; ++src) {
      const int64_t n = g[src * local_ + j], start = block_start[static_cast<size_t>(src * local_ + j)];
      for (int64_t i = 0; i < n; ++i) order.push_back(start + i);
      d.local_counts[static_cast<size_t>(j)] += n;
    }
  at::Tensor perm = at::tensor(order, at::kLong);
  at::Tensor inverse = at::empty_like(perm);
  if (perm.numel() > 0) inverse.index_put_({perm}, at::arange(perm.numel(), at::kLong));
  st.to_expert_order = perm.to(tokens.device());
  st.to_rank_order = inverse.to(tokens.device());
  std::tie(d.tokens, d.gates) = model::split_last_column(model::permute_rows(received, st.to_expert_order,
                                                                             st.to_rank_order));
  d.state = std::move(st);
  return d;
}

at::Tensor AllToAllExpertExchange::combine(const at::Tensor& outputs, const model::Dispatched& dispatched) {
  const auto& st = std::any_cast<const ExchangeState&>(dispatched.state);
  at::Tensor by_rank = model::permute_rows(outputs, st.to_rank_order, st.to_expert_order);
  return all_to_all_autograd(by_rank, ep_, st.recv_rows, st.send_rows, ep_back_);
}

}  // namespace moetrain::parallel
