#include "cli/plan.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>

#include "config/count.h"
#include "config/loader.h"
#include "data/batches.h"
#include "parallel/pipeline.h"
#include "parallel/placement.h"
#include "precision/policy.h"

namespace moetrain::cli {
namespace {

std::string count(double n) {
  if (n >= 1e12) return fmt::format("{:.2f} T", n / 1e12);
  if (n >= 1e9) return fmt::format("{:.2f} B", n / 1e9);
  if (n >= 1e6) return fmt::format("{:.2f} M", n / 1e6);
  if (n >= 1e3) return fmt::format("{:.2f} K", n / 1e3);
  return fmt::format("{:.0f}", n);
}

// The run's length and the recipe's phases: the batch-size ramp, the learning rate's phases, and where the
// balancer's bias updates stop. Tokens count each step's own batch (a ramp makes the early ones smaller).
std::string schedule_line(const config::Config& c) {
  const config::TrainConfig& t = c.train;
  const data::BatchShape shape = data::BatchShape::from(c);
  auto before = [&](int64_t step) { return static_cast<double>(shape.sequences_before(step) * t.seq_len); };
  auto tokens = [&](int64_t steps) { return count(before(t.steps) - before(t.steps - steps)); };
  std::string s;
  if (shape.ramp)
    s += fmt::format("batch ramp  {} → {} sequences in steps of {}, over {} tokens: steps 0–{} ({} tokens)\n",
                     t.batch_rampup_start, t.global_batch_size, t.batch_rampup_increment,
                     count(static_cast<double>(t.batch_rampup_tokens)), shape.ramp->ramp_steps() - 1,
                     count(before(shape.ramp->ramp_steps())));
  s += fmt::format("schedule    {} steps ({} tokens): lr to {:g} over {} warmup steps, {} constant, cosine over {} to "
                   "{:g}, then {:g}",
                   t.steps, tokens(t.steps), t.lr, t.warmup_steps, t.constant_steps, t.decay_steps, t.lr_min, t.lr_min);
  if (t.lr_final_steps > 0)
    s += fmt::format("; the last {} steps ({} tokens) at {:g}", t.lr_final_steps, tokens(t.lr_final_steps), t.lr_final);
  if (const int64_t stop = c.model.bias_update_stop_tokens; stop > 0) {
    int64_t lo = 0, hi = std::max<int64_t>(t.steps, 1);  // the first step with at least `stop` tokens before it
    while (before(hi) < static_cast<double>(stop)) hi *= 2;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      before(mid) >= static_cast<double>(stop) ? hi = mid : lo = mid + 1;
    }
    s += fmt::format("; bias updates stop after {} tokens (step {})", count(static_cast<double>(stop)), lo);
  }
  return s;
}

std::string bytes(double b) {
  constexpr double kTiB = 1024.0 * 1024 * 1024 * 1024;
  if (b >= 1024 * 1024 * kTiB) return fmt::format("{:.3g} EiB", b / (1024 * 1024 * kTiB));
  if (b >= 1024 * kTiB) return fmt::format("{:.2f} PiB", b / (1024 * kTiB));
  if (b >= kTiB) return fmt::format("{:.2f} TiB", b / kTiB);
  if (b >= 1024.0 * 1024 * 1024) return fmt::format("{:.2f} GiB", b / (1024.0 * 1024 * 1024));
  if (b >= 1024.0 * 1024) return fmt::format("{:.2f} MiB", b / (1024.0 * 1024));
  return fmt::format("{:.1f} KiB", b / 1024.0);
}

std::string flops(double f) {
  if (f >= 1e12) return fmt::format("{:.2f} TFLOP", f / 1e12);
  if (f >= 1e9) return fmt::format("{:.2f} GFLOP", f / 1e9);
  return fmt::format("{:.2f} MFLOP", f / 1e6);
}

// Parameters of one block as held by one rank: routed experts are split over the ep group.
int64_t block_local_params(const model::BlockParams& b, int64_t ep) {
  return b.total() - b.routed_experts + b.routed_experts / ep;
}

model::ActivationElems times(model::ActivationElems a, int64_t n) {
  const double k = static_cast<double>(n);
  return {a.elems * k, a.fp32_elems * k, a.fp8_elems * k};
}

}  // namespace

Plan make_plan(const config::Config& c) {
  using config::Count;
  constexpr const char* kStageParams = "the parameters one rank of a pipeline stage holds";
  const config::ModelConfig& m = c.model;
  const int64_t pp = c.parallel.pp, ep = c.parallel.ep;
  const precision::Policy policy = precision::policy_for(c.precision);

  Plan plan;
  plan.params = model::model_params(m);
  plan.flops = model::flops_per_token(m, c.train.seq_len);
  plan.tokens_per_step = (Count(c.train.seq_len) * c.train.micro_batch_size * c.train.micro_batches * c.parallel.dp)
                             .value("the tokens of one step");

  const bool v_shape = c.parallel.schedule == config::Schedule::kDualPipeV;
  const double tokens_per_micro_batch = static_cast<double>(c.train.micro_batch_size * c.train.seq_len);
  const double act = policy.activation_bytes;
  // A GEMM input kept for the backward pass: E4M3 and an FP32 scale per 1×128 tile in fp8 mode.
  const double fp8 = policy.mode == precision::Mode::kFp8 ? 1.0 + 4.0 / 128.0 : act;
  for (int64_t s = 0; s < pp; ++s) {
    StagePlan st;
    st.stage = s;
    Count params, routed;  // routed: the routed experts' share of params
    // Per in-flight forward of each chunk; and once, the largest block being recomputed (full recomputation), which
    // happens after the output heads' backward pass has freed what they kept.
    const std::vector<model::LayerChunk> chunks = parallel::rank_chunks(c, s);  // as the trainer places them
    std::vector<model::ActivationElems> per_chunk(chunks.size());
    model::ActivationElems heads;
    double transient = 0;
    auto recomputed = [&](bool moe) {
      const model::ActivationElems t = model::recompute_transient(m, moe);
      transient = std::max(transient, t.bytes(act, fp8));
    };
    for (size_t chunk = 0; chunk < chunks.size(); ++chunk) {
      const int64_t first = chunks[chunk].first_layer, count = chunks[chunk].num_layers;
      st.chunks.push_back({first, count});
      st.layers += count;
      // The chunk's dense layers come first (layers < n_dense_layers), then its MoE layers: counted per kind.
      const int64_t dense = std::clamp<int64_t>(m.n_dense_layers - first, 0, count);
      for (auto [n, layer] : {std::pair{dense, first}, std::pair{count - dense, first + dense}}) {
        if (n == 0) continue;
        params += Count(n) * block_local_params(model::block_params(m, layer), ep);
        routed += Count(n) * (model::block_params(m, layer).routed_experts / ep);
        per_chunk[chunk] += times(model::block_activations(m, model::is_moe_layer(m, layer)), n);
        recomputed(model::is_moe_layer(m, layer));
      }
    }
    st.first_layer = st.chunks.front().first;
    model::ActivationElems& a = per_chunk.back();  // the heads run after the rank's last chunk (where it has them)
    const bool first = chunks.front().embed, last = chunks.back().head;
    if (first) params += plan.params.embedding;
    if (last) {
      params += plan.params.final_norm;
      // The head weight; a tied head on a separate stage is a copy of the embedding kept identical.
      if (!m.tie_embeddings || !first) params += Count(m.vocab_size) * m.hidden_size;
      if (m.mtp_depth > 0) {
        const Count mtp_module = Count(block_local_params(model::mtp_block_params(m), ep)) +
                                 model::mtp_module_extra_params(m);
        params += mtp_module * m.mtp_depth;
        routed += Count(model::mtp_block_params(m).routed_experts / ep) * m.mtp_depth;
      }
      // MTP embeds future tokens with the shared embedding: the last stage keeps a copy when it is not stage 0.
      if (m.mtp_depth > 0 && !first && !m.tie_embeddings) params += plan.params.embedding;
      heads = times(model::head_activations(m), 1 + m.mtp_depth);
      a += model::head_activations(m);
      a += times(model::mtp_module_activations(m), m.mtp_depth);
      if (m.mtp_depth > 0) recomputed(model::mtp_is_moe(m));
    }
    st.params = params.value(kStageParams);
    const double p = static_cast<double>(st.params);
    st.weight_bytes = p * static_cast<double>(policy.weight_bytes_per_param());
    st.grad_bytes = p * policy.grad_bytes;
    // ZeRO-1 partitions the master weights and moments over dp (dense) and edp (routed experts); buckets are padded
    // to a multiple of the group size, a few elements per bucket (not counted).
    const double r = static_cast<double>(routed.value(kStageParams));
    const bool zero = c.parallel.distributed_optimizer && c.parallel.dp > 1;
    const double dp = zero ? static_cast<double>(c.parallel.dp) : 1.0, edp = zero ? dp / static_cast<double>(ep) : 1.0;
    const double mine = (p - r) / dp + r / edp;  // the parameter elements this rank's optimizer updates
    st.master_bytes = mine * policy.master_weight_bytes;
    st.optimizer_bytes = mine * static_cast<double>(policy.optimizer_bytes_per_param());
    // The schedule's peak of what its live forwards keep (1F1B: min(pp − stage, m) forwards of the one chunk). A
    // split backward (I) keeps its linear layers' inputs and output gradients until its W pass: freed there.
    double kept = 0, live = 0;
    int64_t alive = 0;
    const auto order = v_shape ? parallel::dualpipev_order(s, pp, c.train.micro_batches)
                               : parallel::interleaved_order(s, pp, c.parallel.virtual_stages, c.train.micro_batches);
    for (const auto& pass : order) {
      if (pass.kind == 'I') continue;
      const double chunk_bytes = per_chunk[static_cast<size_t>(pass.chunk)].bytes(act, fp8);
      live += pass.kind == 'F' ? chunk_bytes : -chunk_bytes;
      alive += pass.kind == 'F' ? 1 : -1;
      kept = std::max(kept, live);
      st.in_flight_micro_batches = std::max(st.in_flight_micro_batches, alive);
    }
    const double freed = heads.bytes(act, fp8);
    // The heads' backward pass first, with everything held; then the blocks', the heads' activations freed.
    const bool fused_loss = c.train.device == config::Device::kCpu && policy.mode == precision::Mode::kFp32;
    const double head_backward = last ? model::head_backward_transient(m, fused_loss).bytes(act, fp8) : 0.0;
    st.activation_bytes = (kept + std::max(head_backward, transient - freed)) *
                          tokens_per_micro_batch;
    plan.stages.push_back(st);
  }
  return plan;
}

void check_plan_counts(const config::Config& config) {
  config::check_counts(config, [](const config::Config& c) { make_plan(c); });
}

double physical_ram_bytes() {
  return static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
}

void check_fits_in_ram(const Plan& plan, const config::Config& c, double ram_bytes) {
  if (c.train.device != config::Device::kCpu) return;
  const std::string where = c.where("train.device").empty() ? c.file + ": " : c.where("train.device");
  for (const StagePlan& s : plan.stages) {
    const double state = s.state_bytes();  // allocated for the whole run
    if (state > ram_bytes)
      throw config::ConfigError(fmt::format(
          "{}train.device = cpu: the plan's weights, gradients and optimizer state take {} per rank on stage {}, "
          "more than this machine's {} of RAM; shrink the model (`moetrain plan` shows the estimate)",
          where, bytes(state), s.stage, bytes(ram_bytes)));
    if (s.total_bytes() > kRamOvercommit * ram_bytes)
      throw config::ConfigError(fmt::format(
          "{}train.device = cpu: the plan estimates {} per rank on stage {} ({} of activations), over {:.0f} × this "
          "machine's {} of RAM; shrink the model or the batch (`moetrain plan` shows the estimate)",
          where, bytes(s.total_bytes()), s.stage, bytes(s.activation_bytes), kRamOvercommit, bytes(ram_bytes)));
  }
}

void check_memory_budget(const Plan& plan, const config::Config& c) {
  if (c.train.memory_budget_gib <= 0) return;
  const double budget = c.train.memory_budget_gib * 1024.0 * 1024 * 1024;
  for (const StagePlan& s : plan.stages) {
    if (s.total_bytes() <= budget) continue;
    struct Part {
      const char* name;
      double bytes;
      const char* remedy;
    };
    const Part parts[] = {
        {"weights", s.weight_bytes, "more pipeline stages (parallel.pp) or expert parallelism (parallel.ep)"},
        {"master weights", s.master_bytes,
         "ZeRO-1 over more data-parallel ranks (parallel.distributed_optimizer, parallel.dp)"},
        {"gradients", s.grad_bytes, "more pipeline stages (parallel.pp) or expert parallelism (parallel.ep)"},
        {"optimizer state", s.optimizer_bytes,
         "BF16 moments (precision.moment_dtype: bf16), more pipeline stages or expert parallelism"},
        {"activations", s.activation_bytes,
         "activation recomputation (model.recompute: selective or full), a smaller train.micro_batch_size or "
         "train.seq_len, or fewer in-flight micro-batches"}};
    const Part& top = *std::max_element(std::begin(parts), std::end(parts),
                                        [](const Part& a, const Part& b) { return a.bytes < b.bytes; });
    throw config::ConfigError(fmt::format(
        "{}train.memory_budget_gib = {:g}: stage {} needs {} per rank, over the budget; its largest part is {} "
        "({}): try {} (`moetrain plan` shows every stage)",
        c.where("train.memory_budget_gib").empty() ? c.file + ": " : c.where("train.memory_budget_gib"),
        c.train.memory_budget_gib, s.stage, bytes(s.total_bytes()), top.name,
        bytes(top.bytes), top.remedy));
  }
}

namespace {

// "3", "0-1", or with several chunks "0-1,4-5".
std::string layer_ranges(const StagePlan& s) {
  std::string out;
  for (const auto& [first, n] : s.chunks)
    out += (out.empty() ? "" : ",") + (n == 1 ? fmt::format("{}", first) : fmt::format("{}-{}", first, first + n - 1));
  return out;
}

}  // namespace

std::string format_plan(const Plan& plan, const config::Config& c) {
  const auto& p = plan.params;
  const auto& par = c.parallel;
  std::string out;
  out += fmt::format("plan for {}\n", c.file);
  out += fmt::format("layout      world {} = pp {} × dp {} (ep {} × edp {}); precision {}, AdamW moments {}\n",
                     par.world_size, par.pp, par.dp, par.ep, par.dp / par.ep, config::name(c.precision.mode),
                     config::name(c.precision.moment_dtype));
  out += fmt::format("batch       {} tokens/step = seq {} × micro-batch {} × {} micro-batches × dp {}\n",
                     plan.tokens_per_step, c.train.seq_len, c.train.micro_batch_size, c.train.micro_batches,
                     par.dp);
  out += schedule_line(c) + "\n\n";

  out += fmt::format("{:<34}{:>16}{:>18}{:>20}\n", "parameters", "total", "activated/token", "exact total");
  auto row = [&](const std::string& name, int64_t total, int64_t active) {
    out += fmt::format("{:<34}{:>16}{:>18}{:>20}\n", name, count(static_cast<double>(total)),
                       active >= 0 ? count(static_cast<double>(active)) : "", total);
  };
  row("main model", p.main_total(), p.main_active());
  row("  embedding", p.embedding, p.embedding);
  row("  output head", p.head, p.head);
  row("  transformer blocks", p.layers_total, p.layers_active);
  row(fmt::format("MTP modules (D = {}, own params)", p.mtp_depth), p.mtp_total(), p.mtp_active());
  row("MTP with own embedding + head", p.mtp_total_with_copies(), -1);
  row("main + MTP", p.main_total() + p.mtp_total(), p.main_active() + p.mtp_active());
  row("main + MTP as released", p.main_total() + p.mtp_total_with_copies(), -1);

  out += fmt::format("\nFLOPs/token (fwd+bwd, seq {}): main {}, MTP {}, total {}; per step {:.3e}\n",
                     c.train.seq_len, flops(plan.flops.main), flops(plan.flops.mtp), flops(plan.flops.total()),
                     plan.flops.total() * static_cast<double>(plan.tokens_per_step));

  out += fmt::format("\nmemory per rank (activation recomputation: {}; activations of the schedule's in-flight "
                     "forward passes; ZeRO-1 {}; the total holds the larger of activations and the gradient slices "
                     "ZeRO-1 reduces after them)\n",
                     config::name(c.model.recompute),
                     c.parallel.distributed_optimizer && par.dp > 1 ? "on: master and optimizer over dp / edp" : "off");
  out += fmt::format("{:>5} {:>9} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>9} {:>12}\n", "stage", "layers",
                     "params", "weights", "master", "grads", "optimizer", "activations", "in-flight", "total");
  for (const auto& s : plan.stages) {
    out += fmt::format("{:>5} {:>9} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>9} {:>12}\n", s.stage,
                       layer_ranges(s),
                       count(static_cast<double>(s.params)), bytes(s.weight_bytes), bytes(s.master_bytes),
                       bytes(s.grad_bytes), bytes(s.optimizer_bytes), bytes(s.activation_bytes),
                       s.in_flight_micro_batches, bytes(s.total_bytes()));
  }
  if (par.pp > 1) {  // the schedule's bubble with m micro-batches per dp rank
    const int64_t v = par.virtual_stages;
    auto bubble = [&](int64_t m) { return parallel::schedule_bubble(par, m); };
    const data::BatchShape shape = data::BatchShape::from(c);
    const std::string formula =
        par.schedule == config::Schedule::kDualPipeV
            ? fmt::format("DualPipeV over {} ranks × 2 chunks in a V: bubble (pp−1)/(6m+pp−1) (chunk passes F = B = "
                          "W, no F&B overlap)",
                          par.pp)
        : v == 1 ? fmt::format("1F1B over {} stages: bubble (pp−1)/(m+pp−1)", par.pp)
                 : fmt::format("interleaved 1F1B over {} stages × {} chunks: bubble (pp−1)/(v·m+pp−1)", par.pp, v);
    out += fmt::format("pipeline    {} = {:.3f} at m = {} micro-batches", formula, bubble(shape.micro_batches),
                       shape.micro_batches);
    if (shape.ramp)
      out += fmt::format(" ({:.3f} at the ramp's first m = {})", bubble(shape.micro_batches_at(0)),
                         shape.micro_batches_at(0));
    out += "\n";
  }
  return out;
}

nlohmann::json plan_json(const Plan& plan, const config::Config& c) {
  const auto& p = plan.params;
  nlohmann::json j;
  j["config"] = c.file;
  j["layout"] = {{"world_size", c.parallel.world_size}, {"pp", c.parallel.pp}, {"dp", c.parallel.dp},
                 {"ep", c.parallel.ep}};
  j["params"] = {{"main_total", p.main_total()},
                 {"main_active", p.main_active()},
                 {"embedding", p.embedding},
                 {"head", p.head},
                 {"mtp_total", p.mtp_total()},
                 {"mtp_active", p.mtp_active()},
                 {"mtp_total_with_copies", p.mtp_total_with_copies()}};
  j["flops_per_token"] = {{"main", plan.flops.main}, {"mtp", plan.flops.mtp}, {"total", plan.flops.total()}};
  j["tokens_per_step"] = plan.tokens_per_step;
  j["pipeline_bubble"] = parallel::schedule_bubble(c.parallel, c.train.micro_batches);  // 0 without a pipeline
  j["pipeline_schedule"] = config::name(c.parallel.schedule);
  j["schedule"] = {{"steps", c.train.steps},
                   {"lr_final", c.train.lr_final},
                   {"lr_final_steps", c.train.lr_final_steps},
                   {"bias_update_stop_tokens", c.model.bias_update_stop_tokens}};
  for (const auto& s : plan.stages)
    j["stages"].push_back({{"stage", s.stage},
                           {"first_layer", s.first_layer},
                           {"layers", s.layers},
                           {"chunks", s.chunks},
                           {"params", s.params},
                           {"in_flight_micro_batches", s.in_flight_micro_batches},
                           {"weight_bytes", s.weight_bytes},
                           {"master_bytes", s.master_bytes},
                           {"grad_bytes", s.grad_bytes},
                           {"optimizer_bytes", s.optimizer_bytes},
                           {"activation_bytes", s.activation_bytes},
                           {"total_bytes", s.total_bytes()}});
  return j;
}

}  // namespace moetrain::cli
