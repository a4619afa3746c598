// DeepSeekMoE: shared experts every token uses plus fine-grained routed experts, no token dropped. Tokens are
// sorted by expert, exchanged (model/expert_exchange.h), each local expert applied to its contiguous slice,
// exchanged back and combined with the gates. The layer also reports what the balancer and the metrics need.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>

#include "config/config.h"
#include "model/expert_exchange.h"
#include "model/layers.h"
#include "model/router.h"

namespace moetrain::model {

// What one MoE layer reports from a forward pass.
struct MoeStats {
  at::Tensor counts;        // [n_routed] int64 on the host: tokens routed to each expert (this rank's tokens)
  at::Tensor balance_loss;  // scalar: Σ over this micro-batch's sequences of the balance loss (weighted by α)
};

// The balance losses of one layer for a micro-batch of `batch` sequences of `seq` tokens, summed over its
// sequences (the trainer divides by the global sequence count):
//   sequence-wise (seq_alpha): per sequence α Σ_i f_i P_i, f_i = N/(K·T) Σ_t 1[i selected at t],
//     P_i = mean_t s_i,t / Σ_j s_j,t;
//   classic auxiliary (aux_alpha, balance_mode aux_loss): the same over the whole micro-batch, counted once per
//     sequence so that it averages over micro-batches like the rest of the loss.
at::Tensor balance_loss_sum(const Routing& r, int64_t batch, int64_t seq, int64_t top_k, double seq_alpha,
                            double aux_alpha);

class MoEImpl : public torch::nn::Module {
 public:
  MoEImpl(const config::ModelConfig& m, ExpertShard shard, Mode mode = Mode::kFp32);
  // x: [B, T, d]. Appends this layer's statistics to `stats`.
  at::Tensor forward(const at::Tensor& x, ExpertExchange& exchange, std::vector<MoeStats>& stats);

  // The local experts on their expert-sorted token blocks ([M, d], block e has counts[e] rows): one grouped GEMM
  // per projection (at::_grouped_mm over the stacked expert weights) where grouped_expert_gemm says so, else a
  // loop of per-expert GEMMs. Both give the same result (tests: within 1e-6 in FP32). gates ([M], optional): each
  // token's gate, applied to the down projection's input.
  at::Tensor run_experts(const at::Tensor& tokens, const std::vector<int64_t>& counts, bool grouped,
                         const at::Tensor& gates = {});
  // Grouped on CUDA in bf16 mode (the op's BF16 kernels) and on the CPU in FP32 and BF16 (one op and one autograd
  // node per projection instead of one per expert: about half the time of the loop on small experts); FP8 keeps
  // the loop (LibTorch's grouped FP8 GEMM has no 1×128 / 128×128 scaling), and so does FP64.
  bool grouped_expert_gemm(const at::Tensor& tokens) const;

  Router router{nullptr};
  SwiGLU shared{nullptr};  // n_shared_experts fused into one SwiGLU of width n_shared·moe_inter_dim
  std::vector<SwiGLU> local_experts;  // registered under "experts.<global expert id>"

 private:
  int64_t n_experts_, top_k_;
  double aux_alpha_;  // the classic auxiliary loss's α; 0 unless balance_mode is aux_loss
  double seq_alpha_;
  Mode mode_;
};
TORCH_MODULE(MoE);

}  // namespace moetrain::model
