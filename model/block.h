// One transformer block: x + MLA(RMSNorm(x)), then + FFN(RMSNorm(·)) where the FFN is a dense SwiGLU for the first
// n_dense_layers and DeepSeekMoE after.
#pragma once

#include <torch/nn/module.h>

#include "config/config.h"
#include "model/attention.h"
#include "model/layers.h"
#include "model/moe.h"

namespace moetrain::model {

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(const config::ModelConfig& m, bool moe, ExpertShard shard, Mode mode = Mode::kFp32);
  at::Tensor forward(const at::Tensor& x, ExpertExchange& exchange, std::vector<MoeStats>& stats);

  RMSNorm attn_norm{nullptr}, ffn_norm{nullptr};
  MLA attn{nullptr};
  SwiGLU mlp{nullptr};  // dense blocks
  MoE moe{nullptr};     // MoE blocks
};
TORCH_MODULE(Block);

}  // namespace moetrain::model
