#include "trainer/evaluate.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/multinomial.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/autograd.h>

#include <chrono>
#include <filesystem>
#include <cmath>
#include <fstream>
#include <stdexcept>

#include "checkpoints/checkpointer.h"
#include "checkpoints/interop.h"
#include "data/shards.h"
#include "model/expert_exchange.h"
#include "model/moe_load.h"
#include "model/param_roles.h"
#include "model/transformer.h"
#include "precision/policy.h"

namespace moetrain::trainer {
namespace {

// The weights of a one-process model from a checkpoint of any layout: the trainer's restore
// (checkpoints::Checkpointer::load), model/ tensors only.
void load_weights(const config::Config& c, const std::string& dir, model::TransformerImpl& model) {
  std::vector<checkpoints::StateTensor> state;
  for (const model::ParamInfo& p : model::parameter_roles(model)) state.push_back({"model/", p, p.tensor});
  for (const model::ParamInfo& b : model::buffer_roles(model)) state.push_back({"model/", b, b.tensor});
  parallel::ControlPlane control;
  checkpoints::Checkpointer(c, "", control, nullptr, std::move(state), /*verbose=*/false)
      .load(dir, /*weights_only=*/true);
}

// NumPy's .npy format, version 1.0 (little-endian FP32, C order): its header for `shape`.
std::string npy_header(const std::vector<int64_t>& shape) {
  std::string dims;
  for (int64_t s : shape) dims += fmt::format("{}, ", s);
  std::string header = fmt::format("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}", dims);
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  const auto len = static_cast<uint16_t>(header.size());
  return std::string("\x93NUMPY\x01\x00", 8) + static_cast<char>(len & 0xff) + static_cast<char>(len >> 8) + header;
}

// `t`'s FP32 values into `path` at byte `offset` (the file exists: rank 0 wrote its header). "": written; else why not.
std::string write_at(const std::string& path, int64_t offset, const at::Tensor& t) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  const at::Tensor c = t.to(at::kFloat).contiguous();
  f.seekp(offset);
  f.write(static_cast<const char*>(c.const_data_ptr()), static_cast<std::streamsize>(c.numel() * 4));
  f.close();
  return f ? "" : fmt::format("{}: cannot write the logits", path);
}

}  // namespace

CheckpointEval evaluate(const EvalOptions& o) {
  const int64_t rank = o.world ? o.world->rank() : 0, ranks = o.world ? o.world->size() : 1;
  if (rank == 0 && !o.dump_logits.empty() && !std::ofstream(o.dump_logits, std::ios::binary))  // before the work
    throw std::runtime_error(fmt::format("{}: cannot write the logits there", o.dump_logits));
  checkpoints::Checkpoint ck(o.checkpoint);
  const config::Config c = checkpoints::saved_config(ck);
  const config::ModelConfig& m = c.model;
  const data::ShardSet shards(o.data);
  if (shards.vocab_size() > static_cast<uint64_t>(m.vocab_size))
    throw std::runtime_error(fmt::format("{}: token ids up to {} but the model's vocabulary has {}", o.data,
                                         shards.vocab_size(), m.vocab_size));
  model::Transformer model(m, model::StageSpec::whole(m), precision::policy_for(c.precision).mode);
  load_weights(c, o.checkpoint, *model);
  model->eval();

  // The windows' starts, in order; this rank's contiguous block of them (all of them in one process).
  const int64_t T = c.train.seq_len, width = T + 1 + m.mtp_depth;
  std::vector<std::pair<size_t, int64_t>> starts;  // (shard, first token)
  for (size_t s = 0; s < shards.shards().size() && static_cast<int64_t>(starts.size()) < o.max_windows; ++s) {
    const auto tokens = static_cast<int64_t>(shards.shards()[s].header.tokens);
    for (int64_t start = 0; start + width <= tokens && static_cast<int64_t>(starts.size()) < o.max_windows;
         start += T)
      starts.emplace_back(s, start);
  }
  if (starts.empty())
    throw std::runtime_error(fmt::format("{}: no window of {} tokens (seq_len {} + 1 + mtp_depth {}) in any shard",
                                         o.data, width, T, m.mtp_depth));
  const int64_t W = static_cast<int64_t>(starts.size());
  const int64_t first = W * rank / ranks, last = W * (rank + 1) / ranks;
  std::vector<at::Tensor> windows;
  for (int64_t i = first; i < last; ++i) {
    at::Tensor w = at::empty({width}, at::kLong);
    shards.read(starts[i].first, static_cast<uint64_t>(starts[i].second), static_cast<uint64_t>(width),
                w.data_ptr<int64_t>());
    windows.push_back(w);
  }

  const std::vector<std::string> names = model::moe_layer_names(m);  // in the order the forward pass reports them
  at::NoGradGuard no_grad;
  model::LocalExpertExchange exchange;
  CheckpointEval r;
  r.seq_len = T;
  // [lm, mtp per depth] and [MoE layer, expert] token counts, summed over this rank's windows (then over the ranks).
  at::Tensor losses = at::zeros({1 + m.mtp_depth}, at::kDouble);
  at::Tensor counts = at::zeros({static_cast<int64_t>(names.size()), m.n_routed_experts}, at::kDouble);
  std::vector<at::Tensor> logits;
  for (size_t b = 0; b < windows.size(); b += static_cast<size_t>(o.batch)) {
    const size_t e = std::min(windows.size(), b + static_cast<size_t>(o.batch));
    const at::Tensor batch = at::stack(std::vector<at::Tensor>(windows.begin() + b, windows.begin() + e));
    // One pass: the losses and, for the dump, the main head's logits from the same last hidden state.
    model::LossSums sums;
    const at::Tensor h = model->run_layers(model->embed_tokens(batch.narrow(1, 0, T)), exchange, sums.moe);
    model->head_losses(h, batch, exchange, sums);
    losses[0] += sums.lm.to(at::kDouble);
    for (int64_t k = 0; k < m.mtp_depth; ++k) losses[1 + k] += sums.mtp[k].to(at::kDouble);
    if (sums.moe.size() != names.size())
      throw std::logic_error(fmt::format("eval: {} MoE layers reported, {} expected", sums.moe.size(), names.size()));
    for (size_t l = 0; l < sums.moe.size(); ++l) counts[static_cast<int64_t>(l)] += sums.moe[l].counts.to(at::kDouble);
    if (!o.dump_logits.empty()) logits.push_back(model->logits(h).to(at::kFloat));
  }
  if (o.world) {
    o.world->all_reduce(losses, parallel::ReduceOp::kSum);
    o.world->all_reduce(counts, parallel::ReduceOp::kSum);
  }
  if (!o.dump_logits.empty()) {
    // Rank 0 writes the header and sizes the file; then every rank its block, at its windows' offset.
    const std::string header = npy_header({W, T, m.vocab_size});
    std::string error;
    if (rank == 0) {
      std::ofstream f(o.dump_logits, std::ios::binary | std::ios::trunc);
      f.write(header.data(), static_cast<std::streamsize>(header.size()));
      f.close();
      std::error_code ec;
      std::filesystem::resize_file(o.dump_logits, header.size() + static_cast<uint64_t>(W * T * m.vocab_size) * 4, ec);
      if (!f || ec) error = fmt::format("{}: cannot write the logits", o.dump_logits);
    }
    if (o.world) o.world->barrier();
    if (error.empty() && !logits.empty())
      error = write_at(o.dump_logits, static_cast<int64_t>(header.size()) + first * T * m.vocab_size * 4,
                       at::cat(logits, 0));
    at::Tensor failed = at::full({1}, error.empty() ? 0.0 : static_cast<double>(rank + 1), at::kDouble);
    if (o.world) o.world->all_reduce(failed, parallel::ReduceOp::kMax);
    if (const auto who = static_cast<int64_t>(failed.item<double>()); who > 0)
      throw std::runtime_error(error.empty() ? fmt::format("{}: rank {} could not write its logits", o.dump_logits,
                                                           who - 1)
                                             : error);
  }
  r.windows = W;
  r.tokens = r.windows * T;
  r.loss = losses[0].item<double>() / static_cast<double>(r.tokens);
  for (int64_t k = 0; k < m.mtp_depth; ++k) r.mtp_loss.push_back(losses[1 + k].item<double>() / static_cast<double>(r.tokens));
  for (size_t l = 0; l < names.size(); ++l) {
    const at::Tensor n = counts[static_cast<int64_t>(l)];
    const double mean = n.mean().item<double>();
    r.max_vio.emplace_back(names[l], mean > 0 ? n.max().item<double>() / mean - 1.0 : 0.0);
  }
  return r;
}

namespace {

int64_t pick_token(const at::Tensor& logits, double temperature, double top_p, at::Generator& gen) {
  if (temperature <= 0) return logits.argmax().item<int64_t>();
  at::Tensor probs = at::softmax(logits.to(at::kDouble) / temperature, -1);
  if (top_p < 1.0) {
    auto [sorted, order] = probs.sort(/*dim=*/-1, /*descending=*/true);
    // Keep a token while the mass before it is below top_p (so the first one always stays).
    const at::Tensor keep = (sorted.cumsum(-1) - sorted) < top_p;
    probs = at::zeros_like(probs).scatter_(-1, order, sorted * keep);
  }
  return at::multinomial(probs, 1, /*replacement=*/false, gen).item<int64_t>();
}

// Greedy speculative decoding with the MTP modules (see evaluate.h). Invariant between rounds: the main model's
// caches hold every confirmed token but the newest; `hs` holds its normed hidden state per cached position; MTP
// module k's cache holds its inputs for the positions it has seen (always confirmed ones).
void speculate(model::TransformerImpl& model, const at::Tensor& prompt, const GenerateOptions& o,
               std::vector<model::LatentCache>& caches, model::ExpertExchange& exchange, Generated& g) {
  const int64_t D = static_cast<int64_t>(model.mtp.size());
  std::vector<int64_t> tokens(prompt.data_ptr<int64_t>(), prompt.data_ptr<int64_t>() + prompt.numel());
  const auto n_prompt = static_cast<int64_t>(tokens.size());
  std::vector<at::Tensor> hs;                              // [1, 1, d] per main position
  auto feed_main = [&](const std::vector<int64_t>& ids) {  // -> the new positions' normed hidden states
    const at::Tensor h = model.norm(model.decode(at::tensor(ids, at::kLong).unsqueeze(0), caches, exchange));
    std::vector<at::Tensor> out;
    for (int64_t i = 0; i < h.size(1); ++i) out.push_back(h.narrow(1, i, 1));
    return out;
  };
  auto argmax = [&](const at::Tensor& normed) { return model.head_logits(normed).flatten().argmax().item<int64_t>(); };
  auto done = [&] {
    const auto n = static_cast<int64_t>(tokens.size()) - n_prompt;
    return n >= o.max_new_tokens || (n > 0 && tokens.back() == o.stop_id);
  };
  for (const at::Tensor& h : feed_main({tokens.begin(), tokens.end()})) hs.push_back(h);
  tokens.push_back(argmax(hs.back()));
  // MTP module k's state: its cache and the hidden states it produced per position (the next module's input).
  std::vector<model::LatentCache> mtp_cache(static_cast<size_t>(D));
  std::vector<std::vector<at::Tensor>> mtp_h(static_cast<size_t>(D));
  while (!done()) {
    // Drafts: module k at position j reads h_{k-1}(j) and token j + k + 1; feed each module every position it can
    // see now (its token confirmed), in order. Module k's output at the last main position drafts that position
    // + k + 2; later modules see the earlier drafts as their tokens.
    std::vector<int64_t> drafts;
    const auto last = static_cast<int64_t>(hs.size()) - 1;
    for (int64_t k = 0; k < D; ++k) {
      auto& mod = model.mtp[static_cast<size_t>(k)];
      const std::vector<at::Tensor>& below = k == 0 ? hs : mtp_h[static_cast<size_t>(k - 1)];
      auto& cache = mtp_cache[static_cast<size_t>(k)];
      for (int64_t j = cache.length(); j <= last && j < static_cast<int64_t>(below.size()); ++j) {
        const int64_t t = j + k + 1 < static_cast<int64_t>(tokens.size())
                              ? tokens[static_cast<size_t>(j + k + 1)]
                              : drafts[static_cast<size_t>(j + k + 1 - tokens.size())];
        const at::Tensor e = model.embed_tokens(at::full({1, 1}, t, at::kLong));
        const at::Tensor x = mod->input(below[static_cast<size_t>(j)], e);
        mtp_h[static_cast<size_t>(k)].push_back(mod->norm(mod->block->forward_cached(x, cache, exchange)));
      }
      if (static_cast<int64_t>(mtp_h[static_cast<size_t>(k)].size()) <= last) break;  // nothing to draft from
      drafts.push_back(argmax(mtp_h[static_cast<size_t>(k)][static_cast<size_t>(last)]));
    }
    // Verify: the newest confirmed token and the drafts in one pass of the main model.
    std::vector<int64_t> feed{tokens.back()};
    feed.insert(feed.end(), drafts.begin(), drafts.end());
    const std::vector<at::Tensor> h = feed_main(feed);
    size_t kept = 0;  // drafts the main model agrees with
    while (kept < drafts.size() && argmax(h[kept]) == drafts[kept]) ++kept;
    g.drafted += static_cast<int64_t>(drafts.size());
    g.accepted += static_cast<int64_t>(kept);
    for (size_t i = 0; i <= kept; ++i) hs.push_back(h[i]);
    tokens.insert(tokens.end(), drafts.begin(), drafts.begin() + static_cast<int64_t>(kept));
    tokens.push_back(argmax(h[kept]));
    // The rejected drafts leave the main caches (and their MTP inputs, fed above from drafts, leave the modules').
    const auto cached = static_cast<int64_t>(hs.size());
    for (auto& c : caches) c.truncate(cached);
    for (int64_t k = 0; k < D; ++k) {
      auto& mh = mtp_h[static_cast<size_t>(k)];
      const int64_t valid = std::min<int64_t>(static_cast<int64_t>(mh.size()), cached - k - 1);
      if (valid < static_cast<int64_t>(mh.size())) {
        mh.resize(static_cast<size_t>(std::max<int64_t>(valid, 0)));
        mtp_cache[static_cast<size_t>(k)].truncate(std::max<int64_t>(valid, 0));
      }
    }
  }
  for (int64_t i = n_prompt; i < static_cast<int64_t>(tokens.size()) && i - n_prompt < o.max_new_tokens; ++i) {
    g.tokens.push_back(tokens[static_cast<size_t>(i)]);
    if (tokens[static_cast<size_t>(i)] == o.stop_id) break;
  }
}

}  // namespace

Generated generate(const GenerateOptions& o) {
  checkpoints::Checkpoint ck(o.checkpoint);
  const config::Config c = checkpoints::saved_config(ck);
  const config::ModelConfig& m = c.model;
  if (o.prompt.empty()) throw std::runtime_error("generate: the prompt is empty");
  for (int64_t id : o.prompt)
    if (id < 0 || id >= m.vocab_size)
      throw std::runtime_error(
          fmt::format("generate: prompt token {} is outside the model's vocabulary [0, {})", id, m.vocab_size));
  if (o.mtp && (m.mtp_depth == 0 || o.temperature > 0))
    throw std::runtime_error(m.mtp_depth == 0
                                 ? "generate --mtp: the model has no MTP module (model.mtp_depth 0)"
                                 : "generate --mtp: speculative decoding here is greedy (--temperature 0)");
  if (o.temperature < 0 || o.top_p <= 0 || o.top_p > 1)
    throw std::runtime_error(fmt::format("generate: --temperature must be ≥ 0 and --top-p in (0, 1], got {} and {}",
                                         o.temperature, o.top_p));
  model::Transformer model(m, model::StageSpec::whole(m));
  load_weights(c, o.checkpoint, *model);
  model->eval();
  at::NoGradGuard no_grad;
  at::Generator gen = at::detail::createCPUGenerator(o.seed);
  model::LocalExpertExchange exchange;
  std::vector<model::LatentCache> caches;
  const auto t0 = std::chrono::steady_clock::now();
  Generated g;
  at::Tensor input = at::tensor(o.prompt, at::kLong).unsqueeze(0);
  if (!o.mtp) {
    for (int64_t i = 0; i < o.max_new_tokens; ++i) {
      const at::Tensor h = model->decode(input, caches, exchange);
      const int64_t next =
          pick_token(model->logits(h.narrow(1, h.size(1) - 1, 1)).flatten(), o.temperature, o.top_p, gen);
      g.tokens.push_back(next);
      if (next == o.stop_id) break;
      input = at::full({1, 1}, next, at::kLong);
    }
  } else {
    speculate(*model, input, o, caches, exchange, g);
  }
  g.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return g;
}

std::string format(const CheckpointEval& r) {
  std::string s = fmt::format("eval: {} windows of {} tokens ({} tokens) | loss {:.4f} | perplexity {:.3f}", r.windows,
                              r.seq_len, r.tokens, r.loss, std::exp(r.loss));
  for (size_t k = 0; k < r.mtp_loss.size(); ++k) s += fmt::format(" | mtp{} loss {:.4f}", k + 1, r.mtp_loss[k]);
  if (!r.max_vio.empty()) {
    s += "\nmax-vio per MoE layer:";
    for (const auto& [name, v] : r.max_vio) s += fmt::format(" {} {:.3f}", name, v);
  }
  return s + "\n";
}

}  // namespace moetrain::trainer
