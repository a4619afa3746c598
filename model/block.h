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
  // Under model.recompute = full the whole block is recomputed from x in the backward pass; under selective
  // attention's norm, latents and q/k/v projections, and the SwiGLU activations are (model/recompute.h).
  at::Tensor forward(const at::Tensor& x, ExpertExchange& exchange, std::vector<MoeStats>& stats);
  // Inference on the next tokens with the attention's latent cache (model/attention.h).
  at::Tensor forward_cached(const at::Tensor& x, LatentCache& cache, ExpertExchange& exchange);

  RMSNorm attn_norm{nullptr}, ffn_norm{nullptr};
  MLA attn{nullptr};
  SwiGLU mlp{nullptr};  // dense blocks
  MoE moe{nullptr};     // MoE blocks

 private:
  at::Tensor forward_saved(const at::Tensor& x, ExpertExchange& exchange, std::vector<MoeStats>& stats);
  at::Tensor forward_recomputed(const at::Tensor& x, ExpertExchange& exchange, std::vector<MoeStats>& stats);

  config::Recompute recompute_;
};
TORCH_MODULE(Block);

}  // namespace moetrain::model
