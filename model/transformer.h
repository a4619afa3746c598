// The DeepSeek-V3 model, or the part of it one pipeline stage holds: the token embedding (first stage), a run of
// blocks, and on the last stage the final norm, the output head and the multi-token-prediction modules.
// Parameters carry global, layout-independent names (`embed.weight`, `layers.7.moe.experts.12.w_gate`,
// `mtp.0.proj`), so checkpoints, initialization and tests see the same names whatever the layout.
//
// Windows of seq_len + 1 + mtp_depth tokens: position i < seq_len predicts t[i+1] (main model) and, in MTP module
// k, t[i+k+1] from h_{k-1}[i] and Emb(t[i+k]):  h'_k = M_k [RMSNorm(h_{k-1}); RMSNorm(Emb(t_{i+k}))] -> block ->
// final norm -> shared head, where h_0 is the main model's final-norm output and h_k module k's final-norm output
// (as Megatron-Core, SGLang and vLLM feed them; model/transformer.cpp).
#pragma once

#include <torch/nn/module.h>

#include <functional>
#include <vector>

#include "config/config.h"
#include "model/block.h"
#include "model/expert_exchange.h"

namespace moetrain::model {

// A run of consecutive blocks a process holds: one virtual pipeline stage (model chunk).
struct LayerChunk {
  int64_t first_layer = 0;
  int64_t num_layers = 0;
  bool embed = false;  // the model's first virtual stage: the token embedding runs before its blocks
  bool head = false;   // the model's last virtual stage: final norm, head and MTP modules run after its blocks
};

// What part of the model a process holds: one chunk per pipeline rank (1F1B), or several (the interleaved
// schedule's virtual stages), in the order the rank runs them.
struct StageSpec {
  std::vector<LayerChunk> chunks{LayerChunk{}};
  bool first = true;  // holds the embedding (a chunk with `embed`)
  bool last = true;   // holds final norm, head, MTP modules (and an embedding copy for MTP if not first)
  ExpertShard shard;

  static StageSpec whole(const config::ModelConfig& m) { return {{{0, m.num_layers, true, true}}, true, true, {}}; }
  // One chunk of layers [first_layer, first_layer + num_layers).
  static StageSpec contiguous(int64_t first_layer, int64_t num_layers, bool first, bool last, ExpertShard shard = {}) {
    return {{{first_layer, num_layers, first, last}}, first, last, shard};
  }
  int64_t num_layers() const {  // blocks held, over all chunks
    int64_t n = 0;
    for (const auto& c : chunks) n += c.num_layers;
    return n;
  }
};

class MTPModuleImpl : public torch::nn::Module {
 public:
  MTPModuleImpl(const config::ModelConfig& m, ExpertShard shard, Mode mode);
  // The block's input: M_k·[hnorm(prev); enorm(embedded)], prev the normed hidden state before this depth (the main
  // model's or the previous module's), embedded the tokens this depth reads.
  at::Tensor input(const at::Tensor& prev, const at::Tensor& embedded);
  RMSNorm hnorm{nullptr}, enorm{nullptr}, norm{nullptr};
  at::Tensor proj;  // M_k: [d, 2d]
  Block block{nullptr};

 private:
  Mode mode_;
};
TORCH_MODULE(MTPModule);

// Loss sums of one micro-batch (divide by the global token / sequence counts for the step's mean).
struct LossSums {
  at::Tensor lm;                // Σ −log P(t_{i+1}) over the micro-batch's tokens
  std::vector<at::Tensor> mtp;  // per depth k: Σ −log P(t_{i+k+1})
  at::Tensor balance;           // Σ over MoE layers of their balance-loss sums
  std::vector<MoeStats> moe;    // per MoE layer, main layers first, then MTP blocks
};

class TransformerImpl : public torch::nn::Module {
 public:
  // mode: the GEMM precision of the blocks' linear layers (the head and the router stay FP32).
  TransformerImpl(const config::ModelConfig& m, StageSpec stage, Mode mode = Mode::kFp32);

  // First stage: token ids [B, T] -> hidden [B, T, d], in the activation dtype.
  at::Tensor embed_tokens(const at::Tensor& tokens);
  // The dtype of the residual stream and of what the blocks keep for the backward pass: BF16 in the bf16 and fp8
  // modes (as DeepSeek-V3 and Megatron-Core train), the parameters' own (FP32) in fp32 mode. Norms, router
  // probabilities, softmax and the losses compute in FP32 whatever it is.
  at::ScalarType activation_dtype() const;
  // This stage's blocks, every chunk in order.
  at::Tensor run_layers(at::Tensor h, ExpertExchange& exchange, std::vector<MoeStats>& stats);
  // The blocks of chunk `chunk` of stage().chunks.
  at::Tensor run_chunk(size_t chunk, at::Tensor h, ExpertExchange& exchange, std::vector<MoeStats>& stats);
  // MoE blocks of the chunks before `chunk` (where the chunk's expert loads start among the stage's MoE layers,
  // model/moe_load.h; the MTP modules' follow the last chunk's).
  int64_t moe_blocks_before(size_t chunk) const;
  // Inference, the whole model: the next tokens [B, T] -> the last block's hidden [B, T, d], with one latent cache
  // per layer (resized to num_layers on first use) holding what came before.
  at::Tensor decode(const at::Tensor& tokens, std::vector<LatentCache>& caches, ExpertExchange& exchange);
  // Last stage: hidden of the last block [B, T, d] -> the main head's logits [B, T, vocab].
  at::Tensor logits(const at::Tensor& h);
  // The output head alone, on a hidden state already through its final norm (the main one or an MTP module's).
  at::Tensor head_logits(const at::Tensor& normed);
  // Last stage: hidden of the last block and the full window [B, T + 1 + D] -> loss sums (main and MTP).
  void head_losses(const at::Tensor& h, const at::Tensor& window, ExpertExchange& exchange, LossSums& out);
  // The whole model in one process: window [B, seq_len + 1 + mtp_depth] -> loss sums.
  LossSums forward(const at::Tensor& window, ExpertExchange& exchange);

  // Called before the embedding is used (with the module holding it) and before each block runs (with the block):
  // where the trainer waits for a parameter all-gather still in flight (parallel.overlap_param_gather). Empty:
  // nothing.
  std::function<void(const torch::nn::Module&)> param_gate;

  at::Tensor embed;  // [vocab, d] (registered as embed.weight)
  at::Tensor head;   // [vocab, d] (head.weight), undefined when tied
  RMSNorm norm{nullptr};
  std::vector<Block> layers;
  std::vector<MTPModule> mtp;

  const config::ModelConfig& config() const { return m_; }
  const StageSpec& stage() const { return stage_; }

 private:
  at::Tensor head_weight() const { return m_.tie_embeddings ? embed : head; }

  std::shared_ptr<torch::nn::Module> embed_module_;  // "embed", holding `embed`

  config::ModelConfig m_;
  StageSpec stage_;
  Mode mode_;
};
TORCH_MODULE(Transformer);

// Initializes every parameter from a generator seeded by (seed, global name): normal(0, init_std) for matrices,
// ones for norm weights; router biases zero. The same parameter gets the same values on any layout.
void init_parameters(torch::nn::Module& model, uint64_t seed, double init_std);

}  // namespace moetrain::model
