#include "model/moe.h"

#include <ATen/ops/argsort.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

namespace moetrain::model {

MoEImpl::MoEImpl(const config::ModelConfig& m, ExpertShard shard, Mode mode)
    : n_experts_(m.n_routed_experts),
      top_k_(m.top_k),
      aux_alpha_(m.balance_mode == config::BalanceMode::kAuxLoss ? m.aux_loss_alpha : 0.0),
      seq_alpha_(m.seq_balance_alpha) {
  router = register_module("router", Router(m));
  if (m.n_shared_experts > 0)
    shared = register_module("shared", SwiGLU(m.hidden_size, m.n_shared_experts * m.moe_inter_dim, mode));
  auto holder = register_module("experts", std::make_shared<torch::nn::Module>());
  const int64_t first = shard.first_expert(n_experts_);
  for (int64_t e = 0; e < shard.local_count(n_experts_); ++e)
    local_experts.push_back(
        holder->register_module(std::to_string(first + e), SwiGLU(m.hidden_size, m.moe_inter_dim, mode)));
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
  // On the host: the split sizes of the exchange need them, and so do the balancer and the metrics.
  at::Tensor counts_cpu = counts.to(at::kCPU).contiguous();
  std::vector<int64_t> counts_host(counts_cpu.data_ptr<int64_t>(), counts_cpu.data_ptr<int64_t>() + n_experts_);

  Dispatched in = exchange.dispatch(flat.index_select(0, token_of), counts_host);
  std::vector<at::Tensor> outs;
  int64_t offset = 0;
  for (size_t e = 0; e < local_experts.size(); ++e) {
    const int64_t n = in.local_counts[e];
    if (n == 0) continue;  // no tokens: no compute, and the expert's gradient stays zero
    outs.push_back(local_experts[e](in.tokens.narrow(0, offset, n)));
    offset += n;
  }
  // With no token for any local expert the output is still computed from the received tokens (zero rows), so
  // the backward pass reaches the dispatch exchange and this rank takes part in its reverse all-to-all.
  at::Tensor local_out = outs.empty() ? in.tokens.narrow(0, 0, 0) : at::cat(outs, 0);
  at::Tensor routed = exchange.combine(local_out, in);  // [N·k, d] in sorted order

  at::Tensor gate = r.gates.reshape({N * top_k_}).index_select(0, order).unsqueeze(1).to(x.scalar_type());
  at::Tensor out = at::zeros_like(flat).index_add(0, token_of, routed * gate);
  if (shared) out = out + shared(flat);

  stats.push_back({counts_cpu, balance_loss_sum(r, B, T, top_k_, seq_alpha_, aux_alpha_)});
  return out.view({B, T, d});
}

at::Tensor balance_loss_sum(const Routing& r, int64_t batch, int64_t seq, int64_t top_k, double seq_alpha,
                            double aux_alpha) {
  const auto opts = r.scores.options();
  const int64_t n_experts = r.scores.size(1);
  at::Tensor total = at::zeros({}, opts);
  if (seq_alpha <= 0 && aux_alpha <= 0) return total;
  const double E = static_cast<double>(n_experts), K = static_cast<double>(top_k);
  at::Tensor p = (r.scores / r.scores.sum(-1, /*keepdim=*/true)).view({batch, seq, n_experts});
  at::Tensor hits = at::zeros({batch, n_experts}, opts)
                        .scatter_add(1, r.indices.view({batch, seq * top_k}), at::ones({batch, seq * top_k}, opts));
  if (seq_alpha > 0) {
    at::Tensor f = hits * (E / (K * static_cast<double>(seq)));
    total = total + seq_alpha * (f * p.mean(1)).sum();
  }
  if (aux_alpha > 0) {
    at::Tensor f = hits.sum(0) * (E / (K * static_cast<double>(batch * seq)));
    total = total + aux_alpha * (f * p.mean(at::IntArrayRef{0, 1})).sum() * static_cast<double>(batch);
  }
  return total;
}

}  // namespace moetrain::model
