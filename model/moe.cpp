#include "model/moe.h"

#include <ATen/ops/_grouped_mm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/empty_like.h>
#include <torch/autograd.h>

#include "model/device_copy.h"
#include "model/fused_cpu.h"
#include "model/row_ops.h"
#include "precision/weight_grad_store.h"

namespace moetrain::model {
namespace {

// `t` (2-D) contiguous with its standard strides: a one-row tensor counts as contiguous whatever its row stride (a
// view of one received token can have stride 1 there), which the grouped op's 16-byte stride check rejects.
at::Tensor standard_rows(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return c.size(0) == 1 && c.stride(0) != c.size(1) ? at::empty(c.sizes(), c.options()).copy_(c) : c;
}

// One projection of every local expert: y = x_rows(e) · W_eᵀ for each expert's block of rows (ends: the blocks'
// cumulative ends), in `dtype`. `stacked` is the experts' weights stacked ([E, out, in], differentiable), made of
// `weights` in order (E of them, or 2E that stack to [2E, out/2, in] for fused gate and up projections); the node
// keeps for the backward pass only x as given and the expert weights themselves, and stacks them again there: no
// stacked copy stays alive from the forward to the backward pass.
struct GroupedProjection : public torch::autograd::Function<GroupedProjection> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& stacked,
                            const at::Tensor& ends, std::vector<at::Tensor> weights) {
    const auto dtype = stacked.scalar_type();
    ctx->save_for_backward({x, ends});
    ctx->saved_data["weights"] = c10::List<at::Tensor>(weights);
    const at::Tensor xs = standard_rows(x.to(dtype));
    // FP32 on the CPU: the fused kernel (model/fused_cpu.h), which wants each expert's weight as [in, out].
    if (fused_cpu::applies({xs, stacked}))
      return fused_cpu::grouped_gemm(xs, stacked.transpose(1, 2).contiguous(), ends);
    return at::_grouped_mm(xs, stacked.transpose(1, 2), ends);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& ends = saved[1];
    std::vector<at::Tensor> ws;
    for (const at::Tensor& w : ctx->saved_data["weights"].toTensorList()) ws.push_back(w);
    const at::Tensor dy = standard_rows(grads[0]);
    const at::Tensor w = at::stack(ws).view({ends.size(0), dy.size(1), -1}).to(dy.scalar_type());  // [E, out, in]
    const at::Tensor xc = standard_rows(x.to(dy.scalar_type()));
    const bool fused = fused_cpu::applies({dy, w, xc});
    // Each block's rows · W_e, and the weights' gradient [E, out, in]: dy_eᵀ · x_e.
    at::Tensor dx = (fused ? fused_cpu::grouped_gemm(dy, w, ends) : at::_grouped_mm(dy, w, ends)).to(x.scalar_type());
    auto wgrad = [dy, xc, ends, fused] {
      return fused ? fused_cpu::grouped_gemm_tn(dy, xc, ends) : at::_grouped_mm(dy.t(), xc, ends);
    };
    // A zero-bubble schedule's split backward: the weights' gradients later, each expert weight's slice of the
    // stacked gradient accumulated into it (precision/weight_grad_store.h).
    const bool deferred = precision::WeightGradStore::defer([wgrad, ws] {
      const at::Tensor dw = wgrad().reshape({static_cast<int64_t>(ws.size()), ws[0].size(0), ws[0].size(1)});
      for (size_t i = 0; i < ws.size(); ++i) precision::accumulate_grad(ws[i], dw[static_cast<int64_t>(i)]);
    });
    return {dx, deferred ? at::Tensor() : wgrad(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

MoEImpl::MoEImpl(const config::ModelConfig& m, ExpertShard shard, Mode mode)
    : n_experts_(m.n_routed_experts),
      top_k_(m.top_k),
      aux_alpha_(m.balance_mode == config::BalanceMode::kAuxLoss ? m.aux_loss_alpha : 0.0),
      seq_alpha_(m.seq_balance_alpha),
      mode_(mode) {
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

  // Sort the N·k routed copies by expert (stable: within an expert, token order); slot_of inverts the sort.
  at::Tensor expert_of = r.indices.reshape({N * top_k_});
  at::Tensor order = at::argsort(expert_of, /*stable=*/true);
  at::Tensor token_of = at::floor_divide(order, top_k_);
  at::Tensor slot_of = at::empty_like(order).scatter_(0, order, at::arange(N * top_k_, order.options()));
  // Counted on the device without a host round trip (bincount would read the maximum first).
  at::Tensor counts = at::zeros({n_experts_}, expert_of.options()).scatter_add_(0, expert_of, at::ones_like(expert_of));
  // On the host: the split sizes of the exchange need them, and so do the balancer and the metrics. The one host
  // synchronisation of the layer per micro-batch.
  at::Tensor counts_cpu = counts.to(at::kCPU).contiguous();
  std::vector<int64_t> counts_host(counts_cpu.data_ptr<int64_t>(), counts_cpu.data_ptr<int64_t>() + n_experts_);

  // Each copy travels with its gate: the experts apply it to their down projection's input, so nothing after them
  // keeps their outputs for the gates' gradient (it comes from the down projection's input gradient instead).
  const at::Tensor gate_of = permute_rows(r.gates.reshape({N * top_k_}), order, slot_of).to(x.scalar_type());
  at::Tensor shared_out;  // the shared expert computes while the routed copies travel
  Dispatched in = exchange.dispatch(expand_rows(flat, token_of, slot_of, top_k_), gate_of, counts_host,
                                    [&] { shared_out = shared ? shared(flat) : at::Tensor(); });
  at::Tensor local_out = run_experts(in.tokens, in.local_counts, grouped_expert_gemm(in.tokens), in.gates);
  // Back in token order and summed over each token's copies (row gathers both ways, model/row_ops.h).
  at::Tensor out = reduce_rows(exchange.combine(local_out, in), token_of, slot_of, top_k_);
  if (shared_out.defined()) out = out + shared_out;

  stats.push_back({counts_cpu, balance_loss_sum(r, B, T, top_k_, seq_alpha_, aux_alpha_)});
  return out.view({B, T, d});
}

bool MoEImpl::grouped_expert_gemm(const at::Tensor& tokens) const {
  // No received token (a starved rank): the loop, whose empty output still joins the backward exchange; the
  // grouped op's stride checks do not accept the strided empty view it would be handed.
  if (local_experts.empty() || mode_ == Mode::kFp8 || tokens.size(0) == 0) return false;
  const auto dtype = mode_ == Mode::kBf16 ? at::kBFloat16 : tokens.scalar_type();
  if (dtype != at::kBFloat16 && (tokens.is_cuda() || dtype != at::kFloat)) return false;  // CUDA: BF16 kernels only
  // Every operand's rows 16-byte aligned, as the grouped op requires on every device.
  const int64_t per16 = 16 / static_cast<int64_t>(c10::elementSize(dtype));
  return local_experts[0]->w_gate.size(0) % per16 == 0 && local_experts[0]->w_gate.size(1) % per16 == 0;
}

at::Tensor MoEImpl::run_experts(const at::Tensor& tokens, const std::vector<int64_t>& counts, bool grouped,
                                const at::Tensor& gates) {
  if (!grouped) {
    std::vector<at::Tensor> outs;
    int64_t offset = 0;
    for (size_t e = 0; e < local_experts.size(); ++e) {
      const int64_t n = counts[e];
      if (n == 0) continue;  // no tokens: no compute, and the expert's gradient stays zero
      outs.push_back(local_experts[e]->forward(tokens.narrow(0, offset, n),
                                               gates.defined() ? gates.narrow(0, offset, n) : at::Tensor()));
      offset += n;
    }
    // With no token for any local expert the output is still computed from the received tokens (zero rows), so
    // the backward pass reaches the dispatch exchange and this rank takes part in its reverse all-to-all.
    return outs.empty() ? tokens.narrow(0, 0, 0) : at::cat(outs, 0);
  }
  // Group ends (int32, cumulative), written on the host and copied without blocking it.
  at::Tensor ends = at::empty({static_cast<int64_t>(counts.size())}, at::kInt);
  int32_t* end = ends.data_ptr<int32_t>();
  int64_t total = 0;
  for (size_t e = 0; e < counts.size(); ++e) end[e] = static_cast<int32_t>(total += counts[e]);
  const at::Tensor offs = to_device(ends, tokens.device());
  // The GEMM dtype: BF16 in bf16 mode, else the activations' own (the CPU test path, FP32).
  const auto dtype = mode_ == Mode::kBf16 ? at::kBFloat16 : tokens.scalar_type();
  auto project = [&](const at::Tensor& x, std::vector<at::Tensor> ws) {
    const auto E = static_cast<int64_t>(local_experts.size());
    at::Tensor stacked = at::stack(ws).to(dtype);
    return GroupedProjection::apply(x, stacked.view({E, -1, stacked.size(-1)}), offs, std::move(ws));
  };
  // Gate and up projections fused into one GEMM per expert ([2·inter, d]: gate rows, then up rows).
  std::vector<at::Tensor> gate_up, down;
  for (const auto& e : local_experts) {
    gate_up.insert(gate_up.end(), {e->w_gate, e->w_up});
    down.push_back(e->w_down);
  }
  const at::Tensor h =
      swiglu_activation_fused(project(tokens, gate_up), gates.defined() ? gates.to(dtype) : at::Tensor());
  return project(h, down).to(tokens.scalar_type());
}

at::Tensor balance_loss_sum(const Routing& r, int64_t batch, int64_t seq, int64_t top_k, double seq_alpha,
                            double aux_alpha) {
  const auto opts = r.scores.options();
  const int64_t n_experts = r.scores.size(1);
  at::Tensor total = at::zeros({}, opts);
  if (seq_alpha <= 0 && aux_alpha <= 0) return total;
  const double E = static_cast<double>(n_experts), K = static_cast<double>(top_k);
  at::Tensor p = (r.scores / r.scores.sum(-1, /*keepdim=*/true)).view({batch, seq, n_experts});
  auto hits_of = [&](const at::Tensor& indices) {  // [batch, n_experts]: copies per expert in each sequence
    return at::zeros({batch, n_experts}, opts)
        .scatter_add(1, indices.reshape({batch, seq * top_k}), at::ones({batch, seq * top_k}, opts));
  };
  if (seq_alpha > 0) {
    // DeepSeek-V3's eq. 17–18 (and Megatron-Core's sequence auxiliary loss): f_i counts plain top-k of the
    // unbiased scores over all experts, not the biased, group-limited selection that routes the tokens.
    const at::Tensor scores = r.scores.detach();
    const at::Tensor plain = fused_cpu::applies(scores) ? fused_cpu::route_top_k(scores, {}, 1, 1, top_k)
                                                        : std::get<1>(scores.topk(top_k, -1));
    at::Tensor f = hits_of(plain) * (E / (K * static_cast<double>(seq)));
    total = total + seq_alpha * (f * p.mean(1)).sum();
  }
  if (aux_alpha > 0) {  // the classic loss: the tokens' actual selection
    at::Tensor f = hits_of(r.indices).sum(0) * (E / (K * static_cast<double>(batch * seq)));
    total = total + aux_alpha * (f * p.mean(at::IntArrayRef{0, 1})).sum() * static_cast<double>(batch);
  }
  return total;
}

}  // namespace moetrain::model
