// What a model config amounts to before any tensor exists: parameter counts per component (total and activated
// per token) and training FLOPs per token. `moetrain plan` prints these; the model's tests check that the built
// modules hold exactly these parameter counts. Counts that do not fit 64 bits throw config::CountOverflow
// (config/count.h); config::check_counts turns that into an error naming the key.
#pragma once

#include <cstdint>

#include "config/config.h"

namespace moetrain::model {

// Parameters of one transformer block, split by what a token activates.
struct BlockParams {
  int64_t attention = 0;       // MLA projections and their norms
  int64_t norms = 0;           // the block's two RMSNorms
  int64_t dense_mlp = 0;       // dense SwiGLU (dense blocks)
  int64_t shared_experts = 0;  // MoE blocks
  int64_t routed_experts = 0;  // all routed experts of the block
  int64_t routed_active = 0;   // the top_k a token uses
  int64_t router = 0;          // gate weights (the balancer bias is a buffer, not a parameter)

  int64_t total() const { return attention + norms + dense_mlp + shared_experts + routed_experts + router; }
  int64_t active() const { return attention + norms + dense_mlp + shared_experts + routed_active + router; }
};

struct ModelParams {
  int64_t embedding = 0;   // vocab × d
  int64_t head = 0;        // d × vocab (0 when tied)
  int64_t final_norm = 0;
  int64_t layers_total = 0;
  int64_t layers_active = 0;
  // One MTP module: projection M_k, its two input norms, its block and its output norm; it shares embedding and
  // head with the main model. 0 when mtp_depth is 0.
  int64_t mtp_module_total = 0;
  int64_t mtp_module_active = 0;
  int64_t mtp_depth = 0;

  int64_t main_total() const { return embedding + head + final_norm + layers_total; }
  int64_t main_active() const { return embedding + head + final_norm + layers_active; }
  int64_t mtp_total() const { return mtp_depth * mtp_module_total; }
  int64_t mtp_active() const { return mtp_depth * mtp_module_active; }
  // MTP as the DeepSeek-V3 release stores it: each module with its own embedding and head copy.
  int64_t mtp_total_with_copies() const { return mtp_total() + mtp_depth * (embedding + (head ? head : embedding)); }
};

int64_t mla_params(const config::ModelConfig& m);
bool is_moe_layer(const config::ModelConfig& m, int64_t layer);
bool mtp_is_moe(const config::ModelConfig& m);  // the MTP blocks are MoE iff the model has MoE layers
BlockParams block_params(const config::ModelConfig& m, int64_t layer);
BlockParams mtp_block_params(const config::ModelConfig& m);  // the block inside an MTP module
int64_t mtp_module_extra_params(const config::ModelConfig& m);  // projection + norms around the block
ModelParams model_params(const config::ModelConfig& m);

// Training FLOPs per token (forward + backward = 3 × forward): 6 per activated matmul weight (the embedding
// lookup is not a matmul) plus causal attention, 3·H·(d_qk + d_v)·seq_len per layer.
struct FlopsPerToken {
  double main = 0;
  double mtp = 0;
  double total() const { return main + mtp; }
};
double attention_flops_per_token(const config::ModelConfig& m, int64_t seq_len);  // one layer, fwd+bwd
FlopsPerToken flops_per_token(const config::ModelConfig& m, int64_t seq_len);

}  // namespace moetrain::model

namespace moetrain::model {

// Activations one token leaves saved for the backward pass in one block under model.recompute: elements stored in
// the activation dtype, plus elements kept in FP32 or as int64 indices (router scores, gates, logits; an int64
// counts as two). An estimate for `moetrain plan`, written from what each op of the forward pass saves (the
// memory bench holds it against measurement).
// fp8_elems: inputs of a GEMM that is their only consumer, kept as the GEMM saves them: E4M3 plus one FP32 scale
// per 128 in fp8 mode, in the activation dtype otherwise.
struct ActivationElems {
  double elems = 0;
  double fp32_elems = 0;
  double fp8_elems = 0;
  ActivationElems& operator+=(const ActivationElems& o) {
    elems += o.elems;
    fp32_elems += o.fp32_elems;
    fp8_elems += o.fp8_elems;
    return *this;
  }
  ActivationElems& operator-=(const ActivationElems& o) {
    elems -= o.elems;
    fp32_elems -= o.fp32_elems;
    fp8_elems -= o.fp8_elems;
    return *this;
  }
  // Bytes per token: `act` bytes per activation element, `fp8` per GEMM-input element.
  double bytes(double act, double fp8) const { return elems * act + fp32_elems * 4.0 + fp8_elems * fp8; }
};
// Held from a block's forward pass to its backward pass (full recomputation: the block's input only).
ActivationElems block_activations(const config::ModelConfig& m, bool moe);
// Held for the backward pass of the block being recomputed, once per stage whatever the micro-batches in flight:
// full recomputation, one block's activations without recomputation; selective, what one block's attention keeps
// without it beyond what it keeps with it.
ActivationElems recompute_transient(const config::ModelConfig& m, bool moe);
ActivationElems head_activations(const config::ModelConfig& m);        // final norm + FP32 log-probabilities
// The output head's backward pass, while every activation is still held: the gradient of the logits, FP32, and
// unless the fused CPU cross-entropy runs (FP32 logits on the CPU, model/layers.h) that of the log-probabilities.
ActivationElems head_backward_transient(const config::ModelConfig& m, bool fused_loss);
ActivationElems mtp_module_activations(const config::ModelConfig& m);  // one MTP module, its head included

}  // namespace moetrain::model
