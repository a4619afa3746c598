// The typed experiment config: one struct per section, defaults in the member initializers. The schema
// (config/schema.cpp) binds every member to its YAML key, type, range and documentation; the loader
// (config/loader.cpp) fills a Config from YAML files and --set overrides and validates it.
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace moetrain::config {

// Keys with a fixed set of values are enums. Each enum's YAML names are declared once, in enumerator order, by a
// choice_names() overload next to it; the schema's allowed values, the loader's parsing and name() all read them.
enum class BalanceMode { kAuxFree, kAuxLoss, kNone };
inline constexpr std::array<std::string_view, 3> kBalanceModeNames{"aux_free", "aux_loss", "none"};
constexpr const auto& choice_names(BalanceMode) { return kBalanceModeNames; }

enum class Device { kCpu, kCuda };
inline constexpr std::array<std::string_view, 2> kDeviceNames{"cpu", "cuda"};
constexpr const auto& choice_names(Device) { return kDeviceNames; }

enum class DataSource { kSynthetic, kShards };
inline constexpr std::array<std::string_view, 2> kDataSourceNames{"synthetic", "shards"};
constexpr const auto& choice_names(DataSource) { return kDataSourceNames; }

enum class PrecisionMode { kFp32, kBf16, kFp8 };
inline constexpr std::array<std::string_view, 3> kPrecisionModeNames{"fp32", "bf16", "fp8"};
constexpr const auto& choice_names(PrecisionMode) { return kPrecisionModeNames; }

// Activation recomputation (Megatron-Core's recompute_granularity, torchtitan's activation_checkpoint.mode).
enum class Recompute { kNone, kSelective, kFull };
inline constexpr std::array<std::string_view, 3> kRecomputeNames{"none", "selective", "full"};
constexpr const auto& choice_names(Recompute) { return kRecomputeNames; }

// The pipeline schedule (Megatron-Core's 1F1B and interleaved 1F1B with virtual stages; DeepSeek's DualPipeV).
enum class Schedule { k1F1B, kInterleaved, kDualPipeV };
inline constexpr std::array<std::string_view, 3> kScheduleNames{"1f1b", "interleaved", "dualpipev"};
constexpr const auto& choice_names(Schedule) { return kScheduleNames; }

enum class MomentDtype { kFp32, kBf16 };
inline constexpr std::array<std::string_view, 2> kMomentDtypeNames{"fp32", "bf16"};
constexpr const auto& choice_names(MomentDtype) { return kMomentDtypeNames; }

template <typename E>
concept ChoiceEnum = std::is_enum_v<E> && requires(E e) {
  { choice_names(e)[0] } -> std::convertible_to<std::string_view>;
};

// The YAML name of a choice, for messages and `config show` ("aux_free", "cuda", "fp8").
template <ChoiceEnum E>
constexpr std::string_view name(E e) {
  return choice_names(e)[static_cast<size_t>(e)];
}

struct ModelConfig {
  int64_t vocab_size = 32000;
  int64_t hidden_size = 256;
  int64_t num_layers = 4;
  int64_t n_dense_layers = 1;
  int64_t dense_inter_dim = 1024;
  int64_t moe_inter_dim = 128;
  int64_t n_shared_experts = 1;
  int64_t n_routed_experts = 8;
  int64_t top_k = 2;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  double routed_scaling_factor = 1.0;
  int64_t num_heads = 4;
  int64_t q_lora_rank = 0;
  int64_t kv_lora_rank = 64;
  int64_t qk_nope_head_dim = 32;
  int64_t qk_rope_head_dim = 16;
  int64_t v_head_dim = 32;
  double rope_theta = 10000.0;
  double norm_eps = 1e-6;
  double init_std = 0.006;
  bool tie_embeddings = false;
  BalanceMode balance_mode = BalanceMode::kAuxFree;
  double bias_update_rate = 1e-3;
  int64_t bias_update_stop_tokens = 0;  // tokens trained after which the rate is 0 (0: never)
  double aux_loss_alpha = 1e-3;
  double seq_balance_alpha = 1e-4;
  int64_t mtp_depth = 1;
  double mtp_loss_weight = 0.3;
  double mtp_loss_weight_final = 0.1;
  int64_t mtp_loss_weight_switch_tokens = 0;
  Recompute recompute = Recompute::kNone;
};

struct ParallelConfig {
  int64_t world_size = 0;  // 0: pp·dp, checked against the launch
  int64_t pp = 1;
  int64_t dp = 0;  // 0: world_size / pp
  int64_t ep = 1;
  Schedule schedule = Schedule::k1F1B;
  int64_t virtual_stages = 1;         // model chunks per rank (interleaved: ≥ 2; dualpipev: 2)
  std::vector<int64_t> stage_layers;  // empty: even split; one entry per virtual stage
  int64_t intra_op_threads = 1;
  double comm_timeout_s = 300.0;
  double bucket_size_mb = 25.0;
  bool distributed_optimizer = true;  // ZeRO-1 where dp > 1
  bool overlap_grad_reduce = true;    // buckets reduced during the step's last backward pass
  bool overlap_param_gather = true;   // ZeRO-1: the parameter all-gather overlapped with the next forward pass
  bool overlap_chunk_pairs = true;    // dualpipev: a forward and a backward chunk at once (two threads)
};

struct TrainConfig {
  int64_t seed = 1234;
  int64_t steps = 100;
  int64_t seq_len = 128;
  int64_t micro_batch_size = 4;
  int64_t micro_batches = 1;
  int64_t global_batch_size = 0;  // 0: micro_batch_size · micro_batches · dp
  // Batch-size ramp: the global batch grows from batch_rampup_start sequences by batch_rampup_increment to
  // global_batch_size over the first batch_rampup_tokens tokens (0: none). micro_batches is the final batch's.
  int64_t batch_rampup_start = 0;
  int64_t batch_rampup_increment = 0;  // sequences per increment (needed with a ramp)
  int64_t batch_rampup_tokens = 0;
  double lr = 3e-3;
  double lr_min = 3e-4;
  int64_t warmup_steps = 10;
  int64_t constant_steps = 0;
  double lr_final = 0.0;       // the learning rate of the run's last lr_final_steps steps
  int64_t lr_final_steps = 0;  // 0: no final phase
  int64_t decay_steps = 90;
  double weight_decay = 0.1;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.95;
  double adam_eps = 1e-8;
  double grad_clip = 1.0;
  int64_t skip_nonfinite_steps = 0;
  int64_t eval_interval = 50;
  int64_t eval_batches = 4;
  double peak_flops = 0.0;  // 0: measured at start-up
  double exit_duration_mins = 0.0;  // save and exit after this many minutes (0: no budget)
  double memory_budget_gib = 0.0;  // 0: none
  Device device = Device::kCpu;
  bool deterministic = false;  // LibTorch's deterministic kernels (GPU runs reproducible bit for bit)
};

struct DataConfig {
  DataSource source = DataSource::kSynthetic;
  std::string path;       // a shard prefix, or a blend "PREFIX=WEIGHT,PREFIX=WEIGHT"
  std::string tokenizer;  // empty: the shards' tokenizer is not checked
  double valid_fraction = 0.01;
  int64_t synthetic_tokens = 2000000;
  int64_t synthetic_branching = 4;
  int64_t synthetic_seed = 0;
  int64_t synthetic_order = 1;  // the Markov source's order: tokens its next token depends on
  int64_t synthetic_vocab = 0;  // the source's alphabet: token ids [0, synthetic_vocab); 0: model.vocab_size
  int64_t synthetic_alphabet(int64_t model_vocab) const { return synthetic_vocab > 0 ? synthetic_vocab : model_vocab; }
  int64_t prefetch = 4;
};

struct CheckpointConfig {
  int64_t interval = 0;
  std::string dir = "checkpoints";
  std::string init_from;  // "": none; else a checkpoint whose weights start the run (step 0, fresh optimizer)
  int64_t keep_last = 2;
  bool async = false;
  bool save_on_signal = true;
};

struct PrecisionConfig {
  PrecisionMode mode = PrecisionMode::kFp32;
  MomentDtype moment_dtype = MomentDtype::kFp32;
};

struct LoggingConfig {
  std::string name = "run";
  std::string dir = "runs";
  int64_t interval = 10;
  int64_t profile_steps = 0;       // steps recorded by the profiler (0: none)
  int64_t profile_start_step = 3;  // the first of them (1-based), after the warm-up
  bool tensorboard = true;         // TensorBoard event file in the run directory
  int64_t expert_loads_interval = 1;  // steps between per-expert tokens and biases in metrics.jsonl (0: never)
};

// Where a value came from: a file and line, a --set override, or the default.
struct Origin {
  std::string file;  // empty for defaults
  int line = 0;      // 1-based; 0 for --set and defaults
  std::string text;  // the --set argument, when it came from one
  std::string note;  // for values moetrain derived ("derived: pp·dp")

  std::string describe() const;  // "configs/x.yaml:12", "--set model.top_k=3" or "default"
};

struct Config {
  ModelConfig model;
  ParallelConfig parallel;
  TrainConfig train;
  DataConfig data;
  CheckpointConfig checkpoint;
  PrecisionConfig precision;
  LoggingConfig logging;

  std::string file;                        // the top-level config file
  std::map<std::string, Origin> origins;   // key path -> where its value was set (absent: default)

  // Where `key` was set, for messages: "configs/x.yaml:12: " or "" for defaults.
  std::string where(const std::string& key) const;
};

}  // namespace moetrain::config
