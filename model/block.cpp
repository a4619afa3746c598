#include "model/block.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ops/zeros.h>

#include <memory>

#include "model/recompute.h"

namespace moetrain::model {

BlockImpl::BlockImpl(const config::ModelConfig& m, bool is_moe, ExpertShard shard, Mode mode)
    : recompute_(m.recompute) {
  attn_norm = register_module("attn_norm", RMSNorm(m.hidden_size, m.norm_eps));
  attn = register_module("attn", MLA(m, mode));
  ffn_norm = register_module("ffn_norm", RMSNorm(m.hidden_size, m.norm_eps));
  if (is_moe)
    moe = register_module("moe", MoE(m, shard, mode));
  else
    mlp = register_module("mlp", SwiGLU(m.hidden_size, m.dense_inter_dim, mode));
}

at::Tensor BlockImpl::forward(const at::Tensor& x, ExpertExchange& exchange, std::vector<MoeStats>& stats) {
  if (recompute_ == config::Recompute::kFull && at::GradMode::is_enabled())
    return forward_recomputed(x, exchange, stats);
  return forward_saved(x, exchange, stats);
}

at::Tensor BlockImpl::forward_cached(const at::Tensor& x, LatentCache& cache, ExpertExchange& exchange) {
  std::vector<MoeStats> stats;
  at::Tensor h = x + attn->forward_cached(attn_norm(x), cache);
  at::Tensor f = ffn_norm(h);
  return h + (moe ? moe->forward(f, exchange, stats) : mlp(f));
}

at::Tensor BlockImpl::forward_saved(const at::Tensor& x, ExpertExchange& exchange, std::vector<MoeStats>& stats) {
  // Selective: attention keeps x and the output projection's input; the norm, the latents, the q/k/v
  // up-projections and the attention core (DeepSeek-V3's recomputed RMSNorm and MLA up-projections, Megatron-Core's
  // recomputed core attention) run again in the backward pass, one block at a time.
  const bool selective = recompute_ == config::Recompute::kSelective;
  auto attention = [this, dtype = x.scalar_type()](const std::vector<at::Tensor>& in) {
    const std::vector<at::Tensor> qkv = attn->project(attn_norm(in[0]));
    return std::vector<at::Tensor>{attn->core(qkv[0], qkv[1], qkv[2], dtype)};
  };
  const at::Tensor o = (selective ? recompute(attention, {x}) : attention({x}))[0];
  at::Tensor h = x + attn->output(o);
  at::Tensor f = ffn_norm(h);  // keeps only h and 1/rms (model/layers.h): nothing to recompute
  return h + (moe ? moe->forward(f, exchange, stats) : mlp(f));
}

at::Tensor BlockImpl::forward_recomputed(const at::Tensor& x, ExpertExchange& exchange, std::vector<MoeStats>& stats) {
  // The block's balance loss leaves the segment as a second output so that its gradient reaches the router. The
  // MoE statistics of the first run (this forward pass) are handed on; those of the recomputation are dropped.
  auto sink = std::make_shared<std::vector<MoeStats>*>(&stats);
  const std::vector<at::Tensor> outs = recompute(
      [this, &exchange, sink](const std::vector<at::Tensor>& in) {
        std::vector<MoeStats> local;
        at::Tensor y = forward_saved(in[0], exchange, local);
        at::Tensor balance = local.empty() ? at::zeros({}, y.options().dtype(at::kFloat)) : local[0].balance_loss;
        if (*sink) {
          for (auto& s : local) (*sink)->push_back(std::move(s));
          *sink = nullptr;
        }
        return std::vector<at::Tensor>{y, balance};
      },
      {x});
  if (moe) stats.back().balance_loss = outs[1];
  return outs[0];
}

}  // namespace moetrain::model
