#include "config/schema.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>

namespace moetrain::config {
namespace {

// KEY(model, hidden_size) expands to the key's path and an accessor for its Config member.
#define KEY(section, name) \
  #section "." #name, [](Config& c) { return field_ptr(&c.section.name); }

constexpr Range at_least(double lo) { return Range{.lo = lo}; }
constexpr Range positive() { return Range{.lo = 0.0, .lo_open = true}; }
constexpr Range between(double lo, double hi) { return Range{.lo = lo, .hi = hi}; }
constexpr Range half_open(double lo, double hi) { return Range{.lo = lo, .hi = hi, .hi_open = true}; }  // [lo, hi)
constexpr Range positive_up_to(double hi) { return Range{.lo = 0.0, .hi = hi, .lo_open = true}; }       // (0, hi]

std::vector<KeySpec> build_schema() {
  return {
      // ---- model -------------------------------------------------------------------------------------------
      {KEY(model, vocab_size), "Vocabulary size (token ids are < vocab_size).", at_least(2)},
      {KEY(model, hidden_size), "Model width d (residual stream).", at_least(1)},
      {KEY(model, num_layers), "Number of transformer blocks of the main model.", at_least(1)},
      {KEY(model, n_dense_layers),
       "The first n_dense_layers blocks use a dense SwiGLU MLP; the rest use DeepSeekMoE.", at_least(0)},
      {KEY(model, dense_inter_dim), "Hidden size of the dense SwiGLU MLP.", at_least(1)},
      {KEY(model, moe_inter_dim), "Hidden size of each (shared or routed) expert.", at_least(1)},
      {KEY(model, n_shared_experts), "Always-on shared experts per MoE layer.", at_least(0)},
      {KEY(model, n_routed_experts), "Fine-grained routed experts per MoE layer.", at_least(0)},
      {KEY(model, top_k), "Routed experts each token is sent to.", at_least(1)},
      {KEY(model, n_group), "Expert groups for group-limited routing (1: no group limit).", at_least(1)},
      {KEY(model, topk_group), "Groups kept per token; its experts are chosen only inside these groups.",
       at_least(1)},
      {KEY(model, routed_scaling_factor), "Routed gates are multiplied by this after normalization.",
       positive_up_to(1e3)},
      {KEY(model, num_heads), "Attention heads of Multi-head Latent Attention.", at_least(1)},
      {KEY(model, q_lora_rank), "Rank of the low-rank query projection (0: full-rank query).", at_least(0)},
      {KEY(model, kv_lora_rank), "Rank of the compressed KV latent c_kv.", at_least(1)},
      {KEY(model, qk_nope_head_dim), "Per-head query/key dimensions without rotary embedding.", at_least(1)},
      {KEY(model, qk_rope_head_dim), "Per-head query dimensions with rotary embedding (one key head shared).",
       at_least(2)},
      {KEY(model, v_head_dim), "Per-head value dimension.", at_least(1)},
      {KEY(model, rope_theta), "RoPE base frequency.", positive_up_to(1e12)},
      {KEY(model, norm_eps), "RMSNorm epsilon.", positive_up_to(1)},
      {KEY(model, init_std), "Standard deviation of the normal initialization of weights.", positive_up_to(10)},
      {KEY(model, tie_embeddings), "Share the token embedding with the output head."},
      {KEY(model, balance_mode),
       "Expert load balancing: aux_free (bias update, DeepSeek-V3), aux_loss (classic auxiliary loss, the "
       "baseline) or none."},
      {KEY(model, bias_update_rate), "aux_free: bias step u per optimizer step (b_i += u·sign(mean c − c_i)).",
       between(0, 1)},
      {KEY(model, bias_update_stop_tokens),
       "aux_free: tokens trained after which the bias update rate is 0, the biases frozen (DeepSeek-V3: the last "
       "500B of 14.8T tokens; 0: never).",
       at_least(0)},
      {KEY(model, aux_loss_alpha), "aux_loss: weight of the classic auxiliary balance loss.", between(0, 1e3)},
      {KEY(model, seq_balance_alpha),
       "Weight of the complementary sequence-wise balance loss (0: off); its f_i counts plain top-k of the "
       "unbiased scores over all experts (DeepSeek-V3 eq. 17-18).",
       between(0, 1e3)},
      {KEY(model, mtp_depth), "Multi-token-prediction modules D (0: no MTP).", at_least(0)},
      {KEY(model, mtp_loss_weight), "MTP loss weight λ until mtp_loss_weight_switch_tokens tokens.",
       between(0, 1e3)},
      {KEY(model, mtp_loss_weight_final), "MTP loss weight λ after mtp_loss_weight_switch_tokens tokens.",
       between(0, 1e3)},
      {KEY(model, mtp_loss_weight_switch_tokens),
       "Tokens trained after which λ drops to mtp_loss_weight_final (0: never).", at_least(0)},

      {KEY(model, recompute),
       "Activation recomputation in the backward pass: none (every activation kept), selective (DeepSeek-V3's: "
       "attention's RMSNorm outputs, the q and kv latents and their up-projections are recomputed from what the "
       "block keeps; the SwiGLU activation is always recomputed from g and u) or full (each block keeps only its input and is run again in the "
       "backward pass). Losses and gradients are the same; memory drops, compute grows (full: one more forward "
       "pass of the blocks)."},

      // ---- parallel ----------------------------------------------------------------------------------------
      {KEY(parallel, world_size),
       "Ranks in the job (0: pp·dp). When launched, the launch's rank count must equal pp·dp.", at_least(0)},
      {KEY(parallel, pp), "Pipeline-parallel stages.", between(1, 1024)},
      {KEY(parallel, dp), "Data-parallel replicas per stage (0: world_size / pp).", at_least(0)},
      {KEY(parallel, ep), "Expert-parallel size, carved out of dp (dp = ep·edp); routed experts are sharded "
                          "over it.",
       at_least(1)},
      {KEY(parallel, schedule),
       "The pipeline schedule: 1f1b (PipeDream-Flush, as Megatron-Core); interleaved (Megatron-Core's interleaved "
       "1F1B: each rank holds parallel.virtual_stages model chunks, virtual stage c·pp + rank on rank `rank`, so the "
       "bubble shrinks to (pp − 1)/(virtual_stages·m + pp − 1) at the price of more in-flight activations and "
       "transfers; the micro-batches per step must be a multiple of pp); or dualpipev (DeepSeek's DualPipeV, the "
       "cut-in-half DualPipe: two chunks per rank folded into a V — rank r holds virtual stages r and 2·pp − 1 − r, so "
       "rank 0 embeds and computes the losses — with its eight-phase order and the backward split into input- and "
       "weight-gradient passes that fill the bubbles; at least 2·pp micro-batches per step). Both send their "
       "activations and gradients over pipeline channels: a communicator of two ranks per direction and kind between "
       "neighbouring stages, so that NCCL sees one ordered stream of transfers on each."},
      {KEY(parallel, virtual_stages),
       "Model chunks per pipeline rank (Megatron-Core's virtual_pipeline_model_parallel_size): 1 with schedule "
       "1f1b, at least 2 with interleaved, 2 with dualpipev (taken as 2 when left at 1); every virtual stage needs a "
       "layer (pp·virtual_stages ≤ num_layers).",
       between(1, 64)},
      {KEY(parallel, overlap_chunk_pairs),
       "With parallel.schedule = dualpipev: where the schedule pairs a forward chunk with a backward chunk of another "
       "micro-batch (its F0B1 / F1B0 steps), run the two at once on two threads, the backward's expert all-to-alls on "
       "an ep communicator of their own, so that one pass's exchanges wait while the other computes (DualPipe's "
       "F&B overlap). Same numbers as running them one after the other. CPU only for now: with train.device = cuda "
       "the pairs run in turn (false is derived; true is refused)."},
      {KEY(parallel, stage_layers),
       "Layers per pipeline stage, one entry per stage summing to num_layers (with schedule interleaved one entry "
       "per virtual stage, pp·virtual_stages of them, in virtual-stage order); empty: even split, the first stages "
       "taking the remainder."},
      {KEY(parallel, intra_op_threads), "LibTorch intra-op threads per rank.", between(1, 1024)},
      {KEY(parallel, comm_timeout_s), "A collective not finished after this many seconds aborts the job.",
       positive_up_to(1e6)},
      {KEY(parallel, bucket_size_mb), "Data-parallel gradient reduction bucket size in MiB.", positive_up_to(1e6)},
      {KEY(parallel, distributed_optimizer),
       "ZeRO-1 (Megatron-Core's distributed optimizer), where dp > 1: the AdamW moments (and the FP32 master weights "
       "in bf16/fp8 mode) are partitioned over the dp ranks of a stage (routed experts: over their edp replicas), "
       "gradients are reduce-scattered instead of all-reduced and the updated parameters all-gathered (in BF16 in "
       "bf16/fp8 mode). Same numbers as without it; checkpoints load either "
       "way and onto any layout."},
      {KEY(parallel, overlap_grad_reduce),
       "Reduce each gradient bucket (parallel.bucket_size_mb) as soon as the step's last backward pass has "
       "accumulated all of its gradients, with non-blocking collectives, while the backward pass goes on "
       "(Megatron-Core's overlap_grad_reduce). Same numbers as reducing after the backward pass; more, smaller "
       "buckets start earlier."},
      {KEY(parallel, overlap_param_gather),
       "With ZeRO-1 (parallel.distributed_optimizer, dp > 1): start the all-gather of the updated parameters after "
       "the optimizer step without waiting for it, and wait for each bucket only where the next forward pass first "
       "uses one of its parameters, layer by layer (Megatron-Core's overlap_param_gather). Same numbers as gathering "
       "right after the optimizer step."},

      // ---- train -------------------------------------------------------------------------------------------
      {KEY(train, seed), "Seed for initialization, data order and dropout-free sampling.", at_least(0)},
      {KEY(train, steps), "Optimizer steps to train.", at_least(1)},
      {KEY(train, seq_len), "Tokens per sequence.", at_least(2)},
      {KEY(train, micro_batch_size), "Sequences per micro-batch on each dp rank.", at_least(1)},
      {KEY(train, micro_batches),
       "Micro-batches per step on each dp rank (gradient accumulation; the 1F1B pipeline needs ≥ pp). Derived "
       "from global_batch_size when that is set.",
       at_least(1)},
      {KEY(train, global_batch_size),
       "Sequences per optimizer step over all dp ranks (0: micro_batch_size · micro_batches · dp). When set, "
       "micro_batches = global_batch_size / (micro_batch_size · dp), so the batch stays the same on any layout.",
       at_least(0)},
      {KEY(train, batch_rampup_start),
       "Batch-size ramp (Megatron-Core's --rampup-batch-size; DeepSeek-V3 grows 3072 → 15360 sequences over its "
       "first 469B tokens): the global batch of the first steps, in sequences (0: no ramp). It grows by "
       "train.batch_rampup_increment each time another 1/n of train.batch_rampup_tokens has been trained (n "
       "increments in all) until train.global_batch_size; micro-batches per step grow with it. Every step's batch "
       "must divide into micro_batch_size · dp, and its micro-batches be ≥ pp.",
       at_least(0)},
      {KEY(train, batch_rampup_increment),
       "Sequences the global batch grows by at each ramp increment (needed with a ramp; a multiple of "
       "micro_batch_size · dp on every layout the run uses).",
       at_least(0)},
      {KEY(train, batch_rampup_tokens),
       "Tokens over which the batch-size ramp reaches train.global_batch_size.", at_least(0)},
      {KEY(train, lr), "Peak learning rate (after warmup); the bound keeps the optimizer's float32 steps finite.",
       positive_up_to(1e3)},
      {KEY(train, lr_min), "Final learning rate (after the cosine decay).", between(0, 1e3)},
      {KEY(train, warmup_steps), "Linear warmup steps from 0 to lr.", at_least(0)},
      {KEY(train, constant_steps), "Steps at lr after warmup, before the decay.", at_least(0)},
      {KEY(train, decay_steps), "Cosine decay steps from lr to lr_min; lr_min afterwards.", at_least(0)},
      {KEY(train, lr_final), "The learning rate of the run's last train.lr_final_steps steps (DeepSeek-V3: 7.3e-6 "
                             "for its final 167B tokens, after 2.2e-5).",
       between(0, 1e3)},
      {KEY(train, lr_final_steps), "Steps at the end of the run (the last of train.steps) at train.lr_final (0: none).",
       at_least(0)},
      {KEY(train, weight_decay), "AdamW weight decay (not applied to norms and biases).", between(0, 1e3)},
      {KEY(train, adam_beta1), "AdamW β1 (< 1: the bias correction divides by 1 − β1^t).", half_open(0, 1)},
      {KEY(train, adam_beta2), "AdamW β2 (< 1: the bias correction divides by 1 − β2^t).", half_open(0, 1)},
      {KEY(train, adam_eps), "AdamW ε.", positive_up_to(1)},
      {KEY(train, grad_clip), "Global gradient-norm clip (0: no clipping).", between(0, 1e12)},
      {KEY(train, skip_nonfinite_steps),
       "A step whose loss or gradient norm is NaN or inf is never applied; up to this many such steps in a row are "
       "skipped, then (0: at the first) the run stops with an error naming the step.",
       at_least(0)},
      {KEY(train, exit_duration_mins),
       "A wall-clock budget (Megatron-Core's --exit-duration-in-mins), for clusters that send no signal before their "
       "time limit: once this many minutes have passed since the trainer started (0: no budget), the run saves a "
       "checkpoint and exits with status 0 after the step it is in, every rank at the same step; --resume auto "
       "continues. Set it below the job's limit by more than a step and a checkpoint save.",
       between(0, 1e9)},
      {KEY(train, eval_interval), "Steps between validation-loss evaluations (0: never).", at_least(0)},
      {KEY(train, eval_batches), "Global batches per validation evaluation.", at_least(1)},
      {KEY(train, device),
       "Where the model runs: cpu (MPI between ranks) or cuda (one GPU per rank, local rank order; NCCL between "
       "ranks)."},
      {KEY(train, deterministic),
       "Deterministic kernels on the GPU (PyTorch's use_deterministic_algorithms, torchtitan's debug.deterministic): "
       "attention's backward and the other kernels that sum with atomics take their deterministic versions, and "
       "memory is filled before first use; an op without a deterministic version is an error naming it. cuBLAS "
       "needs CUBLAS_WORKSPACE_CONFIG=:4096:8 or :16:8 (moetrain sets :4096:8 at start-up unless it is set). A run "
       "and its resume from a checkpoint then compute the same numbers bit for bit, as CPU runs always do; slower. "
       "Also set on the CPU, where it changes no result (the filling costs a little time)."},
      {KEY(train, peak_flops),
       "Peak FLOP/s of one rank for MFU (0: measured by a matmul at start-up).", between(0, 1e18)},
      {KEY(train, memory_budget_gib),
       "Memory one rank may use, in GiB (e.g. 80 for an H800; 0: no budget). `config check`, `plan` and `train` "
       "refuse a config whose `moetrain plan` estimate exceeds it on any pipeline stage, naming the stage and its "
       "largest part.",
       between(0, 1e6)},

      // ---- data --------------------------------------------------------------------------------------------
      {KEY(data, source), "Where batches come from: the built-in synthetic corpus or token shards at path."},
      {KEY(data, path),
       "Token-shard prefix written by `moetrain data build` or `data synth` (data.source = shards), or a weighted "
       "blend of several: PREFIX=WEIGHT,PREFIX=WEIGHT,... (relative weights; each corpus repeats in its own "
       "epochs). A sample is a window of train.seq_len + 1 + model.mtp_depth tokens of documents packed end to end, "
       "EOS-separated."},
      {KEY(data, tokenizer),
       "SentencePiece model the shards must have been built with, checked against their tokenizer checksum at "
       "start-up (empty: not checked)."},
      {KEY(data, valid_fraction),
       "Fraction of documents held out for validation (data.source = shards; evenly spread over the corpus, at "
       "least one).",
       between(0, 0.5)},
      {KEY(data, synthetic_tokens), "Tokens generated by the synthetic corpus (data.source = synthetic).",
       at_least(1)},
      {KEY(data, synthetic_branching),
       "Successors per token of the synthetic Markov source (its entropy rate grows with it).", at_least(1)},
      {KEY(data, synthetic_seed), "Seed of the synthetic source's transition table.", at_least(0)},
      {KEY(data, synthetic_order),
       "Order of the synthetic Markov source: the next token depends on the last k tokens (1: on the current one "
       "alone; 2 or more: a model needs attention to reach the entropy rate, and the alphabet^k ≤ 2^24).",
       at_least(1)},
      {KEY(data, synthetic_vocab),
       "Alphabet of the synthetic Markov source: it writes token ids below this (0: model.vocab_size; at most "
       "model.vocab_size). A small alphabet keeps an order-2 source learnable in a short run (32 letters: 1024 "
       "states).",
       at_least(0)},
      {KEY(data, prefetch),
       "Training micro-batches prepared ahead on a background thread (queue depth; 0: prepared when asked for).",
       at_least(0)},

      // ---- checkpoint --------------------------------------------------------------------------------------
      {KEY(checkpoint, interval), "Steps between checkpoints (0: none).", at_least(0)},
      {KEY(checkpoint, dir), "Checkpoint directory (relative paths: inside the run directory)."},
      {KEY(checkpoint, init_from),
       "A checkpoint (step directory, or a checkpoint directory with `latest`) whose model weights start the run: "
       "step 0, a fresh optimizer and data order, any layout (continued pre-training; `ckpt import` makes one from "
       "a transformers folder). `train --init-from` sets it; a run resumed with --resume ignores it."},
      {KEY(checkpoint, keep_last), "Checkpoints kept; older ones are deleted after a successful save (0: all).",
       at_least(0)},
      {KEY(checkpoint, async), "Write checkpoints on a background thread after a copy to host memory."},
      {KEY(checkpoint, save_on_signal),
       "On SIGTERM or SIGUSR1 (a preemption, Slurm's --signal) every rank finishes its step, a checkpoint is saved "
       "and the run exits with status 0 (SIGINT and SIGKILL still end it at once)."},

      // ---- precision ---------------------------------------------------------------------------------------
      {KEY(precision, mode),
       "GEMM precision: fp32 (reference), bf16, or fp8 (E4M3, 1×128 activation tiles, 128×128 weight blocks). "
       "In bf16 and fp8 the parameters and activations are BF16 and the optimizer keeps FP32 master weights; "
       "gradients are accumulated in FP32 in every mode."},
      {KEY(precision, moment_dtype), "dtype of the AdamW moments."},

      // ---- logging -----------------------------------------------------------------------------------------
      {KEY(logging, name), "Run name; the run directory is logging.dir/logging.name."},
      {KEY(logging, dir), "Parent directory of run directories."},
      {KEY(logging, interval), "Steps between progress lines on rank 0 (metrics.jsonl gets every step).",
       at_least(1)},
      {KEY(logging, profile_steps),
       "Steps recorded by LibTorch's profiler (0: none): every rank writes a Chrome trace of them, "
       "<run dir>/profile/rank<N>.json (Perfetto, chrome://tracing), with named ranges for forward, backward, "
       "the expert all-to-alls, pipeline sends and receives, gradient reduction and the optimizer.",
       at_least(0)},
      {KEY(logging, profile_start_step), "The first step the profiler records (1-based; the first steps warm up).",
       at_least(1)},
      {KEY(logging, tensorboard),
       "Write a TensorBoard event file, <run dir>/events.out.tfevents.moetrain (`tensorboard --logdir <logging.dir>`): "
       "every scalar of metrics.jsonl (losses, gradient norm, learning rate, tokens/s, MFU, validation loss, per MoE "
       "layer MaxVio and bias range) at every step it is computed, and a histogram of the tokens per expert of each "
       "MoE layer. A resumed run drops what the interrupted run wrote after the resumed step, then appends."},
      {KEY(logging, expert_loads_interval),
       "Steps between records of metrics.jsonl that carry each MoE layer's tokens and bias per expert (`tokens`, "
       "`bias`; `moetrain report` draws its expert-load heatmaps and bias trajectories from them); 0: never. Every "
       "record keeps the per-layer MaxVio, token range and bias range. At DeepSeek-V3's 58 MoE layers × 256 experts "
       "a record with them is ~250 KB: raise it for long runs of wide models.",
       at_least(0)},
  };
}
#undef KEY

}  // namespace

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

namespace {

std::string_view leaf(std::string_view path) {
  auto dot = path.rfind('.');
  return dot == std::string_view::npos ? path : path.substr(dot + 1);
}

}  // namespace

bool Range::contains(double v) const {
  return (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
}

std::string Range::describe() const {
  std::string low = std::isinf(lo) ? "" : fmt::format("{} {}", lo_open ? ">" : "≥", lo);
  std::string high = std::isinf(hi) ? "" : fmt::format("{} {}", hi_open ? "<" : "≤", hi);
  if (low.empty() || high.empty()) return low + high;
  return low + " and " + high;
}

const std::vector<KeySpec>& schema() {
  static const std::vector<KeySpec> keys = build_schema();
  return keys;
}

const std::vector<std::string>& sections() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (const auto& k : schema())
      if (std::find(out.begin(), out.end(), k.section()) == out.end()) out.push_back(k.section());
    return out;
  }();
  return names;
}

const KeySpec* find_key(std::string_view path) {
  for (const auto& k : schema())
    if (k.path == path) return &k;
  return nullptr;
}

std::span<const std::string_view> KeySpec::choices() const {
  Config probe;
  FieldPtr f = field(probe);
  if (const auto* e = std::get_if<EnumRef>(&f)) return e->names;
  return {};
}

std::string KeySpec::type_name() const {
  Config probe;
  return std::visit(
      [&](auto p) -> std::string {
        using T = std::remove_pointer_t<decltype(p)>;
        if constexpr (std::is_same_v<T, int64_t>) return "int";
        if constexpr (std::is_same_v<T, double>) return "float";
        if constexpr (std::is_same_v<T, bool>) return "bool";
        if constexpr (std::is_same_v<T, std::vector<int64_t>>) return "list of int";
        if constexpr (std::is_same_v<T, std::string>) return "string";
        if constexpr (std::is_same_v<T, EnumRef>) return fmt::format("{}", fmt::join(p.names, " \\| "));
      },
      field(probe));
}

std::string value_text(const KeySpec& key, const Config& config) {
  return std::visit(
      [](auto p) -> std::string {
        using T = std::remove_pointer_t<decltype(p)>;
        if constexpr (std::is_same_v<T, bool>) return *p ? "true" : "false";
        if constexpr (std::is_same_v<T, std::vector<int64_t>>) return fmt::format("[{}]", fmt::join(*p, ", "));
        if constexpr (std::is_same_v<T, std::string>) return *p;
        if constexpr (std::is_same_v<T, int64_t> || std::is_same_v<T, double>) return fmt::format("{}", *p);
        if constexpr (std::is_same_v<T, EnumRef>) return std::string(p.name());
      },
      key.field(const_cast<Config&>(config)));
}

std::string closest_key(std::string_view unknown) {
  std::string best;
  size_t best_distance = std::string::npos;
  std::string_view unknown_leaf = leaf(unknown);
  for (const auto& k : schema()) {
    // A typo in the whole path, or the right name in the wrong section.
    size_t whole = edit_distance(unknown, k.path);
    size_t by_leaf = edit_distance(unknown_leaf, leaf(k.path)) + 1;
    size_t d = std::min(whole, by_leaf);
    if (d < best_distance) {
      best_distance = d;
      best = k.path;
    }
  }
  size_t allowed = std::max<size_t>(2, unknown_leaf.size() / 3) + 1;
  return best_distance <= allowed ? best : "";
}

std::string reference_markdown() {
  static const Config defaults;
  std::string out =
      "# Config reference\n\n"
      "Generated by `moetrain config reference` from the schema in `config/schema.cpp`; do not edit by hand.\n"
      "Every key is optional; a config file sets the keys that differ from the defaults. `base: other.yaml`\n"
      "composes files (paths relative to the including file); `--set section.key=value` overrides on the\n"
      "command line. Values are YAML scalars (lists as `[1, 2]`).\n";
  for (const auto& section : sections()) {
    out += fmt::format("\n## {}\n\n| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n", section);
    for (const auto& k : schema()) {
      if (k.section() != section) continue;
      std::string allowed = k.range.describe();
      std::string def = value_text(k, defaults);
      out += fmt::format("| `{}` | {} | `{}` | {} | {} |\n", k.path, k.type_name(), def.empty() ? "\"\"" : def,
                         allowed, k.doc);
    }
  }
  return out;
}

}  // namespace moetrain::config
