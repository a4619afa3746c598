// `moetrain plan`: what a config costs before it runs — parameters (main model and MTP, total and activated),
// training FLOPs per token, and per-rank memory of each pipeline stage under the layout and precision.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "config/config.h"
#include "model/param_flops.h"

namespace moetrain::cli {

struct StagePlan {
  int64_t stage = 0;
  int64_t first_layer = 0;
  int64_t layers = 0;                                 // over all of its chunks
  std::vector<std::pair<int64_t, int64_t>> chunks;    // (first layer, layers) of each model chunk, in run order
  int64_t params = 0;                 // parameters held by one rank of this stage (routed experts: 1/ep of them)
  // The most forward passes (of any chunk) alive at once under the schedule: 1F1B keeps min(pp − stage,
  // micro_batches); interleaved 1F1B more, each of one chunk's layers.
  int64_t in_flight_micro_batches = 0;
  // weight_bytes: the model's parameters (and fp8 mode's E4M3 copies), on every replica. master_bytes: the FP32
  // master weights the optimizer keeps in the bf16 and fp8 modes, optimizer_bytes: the AdamW moments — with
  // ZeRO-1 this rank's dp / edp part of both. (ZeRO-1's reduce-scatter is in place: its slices take no memory of
  // their own, parallel/grad_sync.h.)
  double weight_bytes = 0, master_bytes = 0, grad_bytes = 0, optimizer_bytes = 0, activation_bytes = 0;
  double state_bytes() const { return weight_bytes + master_bytes + grad_bytes + optimizer_bytes; }
  double total_bytes() const { return state_bytes() + activation_bytes; }
};

struct Plan {
  model::ModelParams params;
  model::FlopsPerToken flops;
  int64_t tokens_per_step = 0;  // global batch in tokens
  std::vector<StagePlan> stages;
};

// Throws config::CountOverflow when a count does not fit 64 bits; check_plan_counts first turns that into an error
// naming the key.
Plan make_plan(const config::Config& config);

// Throws a ConfigError naming the key when a count the plan forms (parameters per block, per stage and in total)
// overflows 64 bits. `config check`, `config show`, `plan` and `train` run it after loading.
void check_plan_counts(const config::Config& config);

// Training on the CPU refuses, before anything is allocated, a config whose plan needs on one rank more than the
// machine's RAM for weights, gradients and optimizer state (held all run long), or more than kRamOvercommit × the
// RAM in all (activations are estimated without recomputation, so only the hopeless are stopped). GPU configs
// (train.device = cuda) are not checked against host RAM; `config check` and `plan` do not run it.
inline constexpr double kRamOvercommit = 64;
double physical_ram_bytes();
void check_fits_in_ram(const Plan& plan, const config::Config& config, double ram_bytes);
// train.memory_budget_gib > 0: a ConfigError naming the first stage whose estimate (weights + gradients +
// optimizer state + in-flight activations) exceeds the budget, with its largest part and what shrinks that part.
void check_memory_budget(const Plan& plan, const config::Config& config);
std::string format_plan(const Plan& plan, const config::Config& config);
nlohmann::json plan_json(const Plan& plan, const config::Config& config);

}  // namespace moetrain::cli
