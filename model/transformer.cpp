#include "model/transformer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <xxhash.h>

#include "model/param_flops.h"

namespace moetrain::model {

MTPModuleImpl::MTPModuleImpl(const config::ModelConfig& m, ExpertShard shard, Mode mode) : mode_(mode) {
  hnorm = register_module("hnorm", RMSNorm(m.hidden_size, m.norm_eps));
  enorm = register_module("enorm", RMSNorm(m.hidden_size, m.norm_eps));
  proj = register_parameter("proj", at::empty({m.hidden_size, 2 * m.hidden_size}));
  block = register_module("block", Block(m, mtp_is_moe(m), shard, mode));
  norm = register_module("norm", RMSNorm(m.hidden_size, m.norm_eps));
}

at::Tensor MTPModuleImpl::input(const at::Tensor& prev, const at::Tensor& embedded) {
  return gemm(at::cat({hnorm(prev), enorm(embedded)}, -1), proj, mode_);
}

TransformerImpl::TransformerImpl(const config::ModelConfig& m, StageSpec stage, Mode mode)
    : m_(m), stage_(stage), mode_(mode) {
  // The last stage embeds future tokens for MTP, so it holds the embedding too (a copy kept identical to the
  // first stage's by the parallel layer); a tied head also needs it there.
  if (stage.first || (stage.last && (m.mtp_depth > 0 || m.tie_embeddings))) {
    embed_module_ = register_module("embed", std::make_shared<torch::nn::Module>());
    embed = embed_module_->register_parameter("weight", at::empty({m.vocab_size, m.hidden_size}));
  }
  auto blocks = register_module("layers", std::make_shared<torch::nn::Module>());
  for (const LayerChunk& chunk : stage.chunks)
    for (int64_t l = chunk.first_layer; l < chunk.first_layer + chunk.num_layers; ++l)
      layers.push_back(blocks->register_module(std::to_string(l), Block(m, is_moe_layer(m, l), stage.shard, mode)));
  if (stage.last) {
    norm = register_module("norm", RMSNorm(m.hidden_size, m.norm_eps));
    if (!m.tie_embeddings) {
      auto h = register_module("head", std::make_shared<torch::nn::Module>());
      head = h->register_parameter("weight", at::empty({m.vocab_size, m.hidden_size}));
    }
    auto modules = register_module("mtp", std::make_shared<torch::nn::Module>());
    for (int64_t k = 0; k < m.mtp_depth; ++k)
      mtp.push_back(modules->register_module(std::to_string(k), MTPModule(m, stage.shard, mode)));
  }
}

at::Tensor TransformerImpl::embed_tokens(const at::Tensor& tokens) {
  if (param_gate) param_gate(*embed_module_);
  const at::Tensor e = at::embedding(embed, tokens);
  return mode_ == Mode::kFp32 ? e : e.to(at::kBFloat16);
}

at::ScalarType TransformerImpl::activation_dtype() const {
  if (mode_ != Mode::kFp32) return at::kBFloat16;
  const auto params = parameters();
  return params.empty() ? at::kFloat : params[0].scalar_type();
}

at::Tensor TransformerImpl::run_layers(at::Tensor h, ExpertExchange& exchange, std::vector<MoeStats>& stats) {
  for (auto& block : layers) h = block->forward(h, exchange, stats);
  return h;
}

at::Tensor TransformerImpl::run_chunk(size_t chunk, at::Tensor h, ExpertExchange& exchange,
                                      std::vector<MoeStats>& stats) {
  int64_t begin = 0;
  for (size_t c = 0; c < chunk; ++c) begin += stage_.chunks[c].num_layers;
  for (int64_t i = begin; i < begin + stage_.chunks.at(chunk).num_layers; ++i) {
    Block& block = layers[static_cast<size_t>(i)];
    if (param_gate) param_gate(*block);
    h = block->forward(h, exchange, stats);
  }
  return h;
}

int64_t TransformerImpl::moe_blocks_before(size_t chunk) const {
  int64_t n = 0;
  for (size_t c = 0; c < chunk; ++c)
    for (int64_t l = stage_.chunks[c].first_layer; l < stage_.chunks[c].first_layer + stage_.chunks[c].num_layers; ++l)
      n += is_moe_layer(m_, l);
  return n;
}


at::Tensor TransformerImpl::decode(const at::Tensor& tokens, std::vector<LatentCache>& caches,
                                   ExpertExchange& exchange) {
  caches.resize(layers.size());
  at::Tensor h = embed_tokens(tokens);
  for (size_t l = 0; l < layers.size(); ++l) h = layers[l]->forward_cached(h, caches[l], exchange);
  return h;
}

at::Tensor TransformerImpl::logits(const at::Tensor& h) { return head_logits(norm(h)); }

at::Tensor TransformerImpl::head_logits(const at::Tensor& normed) {
  // The output head in BF16 in the bf16 and fp8 modes (DeepSeek-V3 keeps it out of FP8), FP32 in fp32 mode.
  return gemm(normed, head_weight(), mode_ == Mode::kFp32 ? Mode::kFp32 : Mode::kBf16);
}

void TransformerImpl::head_losses(const at::Tensor& h, const at::Tensor& window, ExpertExchange& exchange,
                                  LossSums& out) {
  const int64_t T = h.size(1);
  // MTP depth 1 takes the main model's final-norm output, the head's input; depth k > 1 the previous module's
  // output after its own final norm (shared_head.norm). As Megatron-Core's MultiTokenPredictionBlock (the decoder's
  // final_layernorm runs before it; each MTP layer's final_layernorm output feeds the next), SGLang's
  // DeepseekModelNextN and vLLM's DeepSeek MTP proposer (the target model's normed hidden states) do.
  at::Tensor prev = norm(h);
  out.lm = cross_entropy_sum(head_logits(prev), window.narrow(1, 1, T));
  for (size_t k = 0; k < mtp.size(); ++k) {
    const int64_t depth = static_cast<int64_t>(k) + 1;
    auto& mod = mtp[k];
    const at::Tensor hk = mod->input(prev, embed_tokens(window.narrow(1, depth, T)));
    prev = mod->norm(mod->block->forward(hk, exchange, out.moe));
    out.mtp.push_back(cross_entropy_sum(head_logits(prev), window.narrow(1, depth + 1, T)));
  }
}

LossSums TransformerImpl::forward(const at::Tensor& window, ExpertExchange& exchange) {
  const int64_t T = window.size(1) - 1 - m_.mtp_depth;
  LossSums out;
  at::Tensor h = run_layers(embed_tokens(window.narrow(1, 0, T)), exchange, out.moe);
  head_losses(h, window, exchange, out);
  out.balance = at::zeros({}, h.options().dtype(at::promote_types(h.scalar_type(), at::kFloat)));
  for (const auto& s : out.moe) out.balance = out.balance + s.balance_loss;
  return out;
}

void init_parameters(torch::nn::Module& model, uint64_t seed, double init_std) {
  at::NoGradGuard no_grad;
  for (auto& item : model.named_parameters(/*recurse=*/true)) {
    const std::string& name = item.key();
    at::Tensor& p = item.value();
    const bool is_norm = p.dim() == 1;
    if (is_norm) {
      p.fill_(1.0);
      continue;
    }
    at::Generator gen = at::detail::createCPUGenerator(XXH64(name.data(), name.size(), seed));
    at::Tensor values = at::empty(p.sizes(), at::TensorOptions().dtype(at::kFloat)).normal_(0.0, init_std, gen);
    p.copy_(values);
  }
  for (auto& item : model.named_buffers(/*recurse=*/true)) item.value().zero_();
}

}  // namespace moetrain::model
