#include "model/block.h"

namespace moetrain::model {

BlockImpl::BlockImpl(const config::ModelConfig& m, bool is_moe, ExpertShard shard, Mode mode) {
  attn_norm = register_module("attn_norm", RMSNorm(m.hidden_size, m.norm_eps));
  attn = register_module("attn", MLA(m, mode));
  ffn_norm = register_module("ffn_norm", RMSNorm(m.hidden_size, m.norm_eps));
  if (is_moe)
    moe = register_module("moe", MoE(m, shard, mode));
  else
    mlp = register_module("mlp", SwiGLU(m.hidden_size, m.dense_inter_dim, mode));
}

at::Tensor BlockImpl::forward(const at::Tensor& x, ExpertExchange& exchange, std::vector<MoeStats>& stats) {
  at::Tensor h = x + attn(attn_norm(x));
  at::Tensor f = ffn_norm(h);
  return h + (moe ? moe->forward(f, exchange, stats) : mlp(f));
}

}  // namespace moetrain::model
