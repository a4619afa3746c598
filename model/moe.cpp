#include "model/moe.h"

#include <ATen/ops/argsort.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

namespace moetrain::model {

ExpertImpl::ExpertImpl(int64_t dim, int64_t inter_dim) {
  w_gate = register_parameter("w_gate", at::empty({inter_dim, dim}));
  w_up = register_parameter("w_up", at::empty({inter_dim, dim}));
  w_down = register_parameter("w_down", at::empty({dim, inter_dim}));
}

MoEImpl::MoEImpl(const config::ModelConfig& m, ExpertShard shard)
    : n_experts_(m.n_routed_experts),
      top_k_(m.top_k),
      balance_mode_(m.balance_mode),
      aux_alpha_(m.aux_loss_alpha),
      seq_alpha_(m.seq_balance_alpha),
      shard_(shard) {
  router = register_module("router", Router(m));
  if (m.n_shared_experts > 0)
    shared = register_module("shared", SwiGLU(m.hidden_size, m.n_shared_experts * m.moe_inter_dim));
  auto holder = register_module("experts", std::make_shared<torch::nn::Module>());
  experts = holder.get();
  const int64_t first = shard.first_expert(n_experts_);
  for (int64_t e = 0; e < shard.local_count(n_experts_); ++e)
    local_experts.push_back(holder->register_module(std::to_string(first + e), Expert(m.hidden_size, m.moe_inter_dim)));
}

at::Tensor MoEImpl::forward(const at::Tensor& x, ExpertExchange& exchange, std::vector<MoeStats>& stats) {
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), N = B * T;
  at::Tensor flat = x.reshape({N, d});
  Routing r = router(flat);

  // Sort the N·k routed copies by expert (stable: within an expert, token order).
  at::Tensor expert_of = r.indices.reshape({N * top_k_});
  at::Tensor order = at::argsort(expert_of, /*stable=*/true);
  at::Tensor token_of = at::floor_divide(order, top_k_);
  at::Tensor counts = at::bincount(expert_of, /*weights=*/{}, n_experts_);
  std::vector<int64_t> counts_host(static_cast<size_t>(n_experts_));
  {
    at::Tensor c = counts.to(at::kCPU).contiguous();
    std::copy(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + n_experts_, counts_host.begin());
  }

  Dispatched in = exchange.dispatch(flat.index_select(0, token_of), counts_host);
  std::vector<at::Tensor> outs;
  int64_t offset = 0;
  for (size_t e = 0; e < local_experts.size(); ++e) {
    const int64_t n = in.local_counts[e];
    if (n == 0) continue;  // no tokens: no compute, and the expert's gradient stays zero
    const auto& ex = local_experts[e];
    outs.push_back(swiglu(in.tokens.narrow(0, offset, n), ex->w_gate, ex->w_up, ex->w_down));
    offset += n;
  }
  at::Tensor local_out = outs.empty() ? at::zeros({0, d}, x.options()) : at::cat(outs, 0);
  at::Tensor routed = exchange.combine(local_out, in);  // [N·k, d] in sorted order

  at::Tensor gate = r.gates.reshape({N * top_k_}).index_select(0, order).unsqueeze(1).to(x.scalar_type());
  at::Tensor out = at::zeros_like(flat).index_add(0, token_of, routed * gate);
  if (shared) out = out + shared(flat);

  stats.push_back({counts, balance_loss(r, B, T)});
  return out.view({B, T, d});
}

// Balance losses, summed over the micro-batch's sequences (the trainer divides by the global sequence count):
//   sequence-wise (α = seq_balance_alpha): per sequence α Σ_i f_i P_i, f_i = N/(K·T) Σ_t 1[i selected at t],
//   P_i = mean_t s_i,t / Σ_j s_j,t;
//   classic auxiliary (balance_mode aux_loss, α = aux_loss_alpha): the same over the whole micro-batch, counted
//   once per sequence so that it averages over micro-batches like the rest of the loss.
at::Tensor MoEImpl::balance_loss(const Routing& r, int64_t batch, int64_t seq) const {
  const auto opts = r.scores.options();
  at::Tensor total = at::zeros({}, opts);
  const bool aux = balance_mode_ == "aux_loss" && aux_alpha_ > 0;
  if (seq_alpha_ <= 0 && !aux) return total;
  const double E = static_cast<double>(n_experts_), K = static_cast<double>(top_k_);
  at::Tensor p = (r.scores / r.scores.sum(-1, /*keepdim=*/true)).view({batch, seq, n_experts_});
  at::Tensor hits = at::zeros({batch, n_experts_}, opts)
                        .scatter_add(1, r.indices.view({batch, seq * top_k_}),
                                     at::ones({batch, seq * top_k_}, opts));
  if (seq_alpha_ > 0) {
    at::Tensor f = hits * (E / (K * static_cast<double>(seq)));
    total = total + seq_alpha_ * (f * p.mean(1)).sum();
  }
  if (aux) {
    at::Tensor f = hits.sum(0) * (E / (K * static_cast<double>(batch * seq)));
    total = total + aux_alpha_ * (f * p.mean(at::IntArrayRef{0, 1})).sum() * static_cast<double>(batch);
  }
  return total;
}

}  // namespace moetrain::model
