// What a run reports: the per-step and validation records (one JSON object per line of the run directory's
// metrics.jsonl, written by rank 0), the progress, evaluation and stop lines rank 0 prints, and the peak FLOP/s
// that MFU divides by.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "config/config.h"
#include "data/batches.h"

namespace moetrain::trainer {

// One MoE layer's load over a step's global batch.
struct MoeLayerMetrics {
  std::string layer;  // "layers.3", "mtp.0"
  double max_vio = 0;
  int64_t min_tokens = 0, max_tokens = 0;
  double bias_min = 0, bias_max = 0;
  std::vector<int64_t> tokens;  // per expert
  std::vector<double> bias;     // per expert: the balancer's bias after the step
};

// What one optimizer step produced. Losses are global-batch means, the same on every rank.
struct StepResult {
  int64_t step = 0;  // the step trained (0-based); the record names the steps done after it (step + 1)
  double loss = 0, lm_loss = 0, mtp_loss = 0, balance_loss = 0, grad_norm = 0, lr = 0;  // mtp_loss: over depths
  std::vector<double> mtp_losses;  // per MTP depth (1, 2, ...)
  double step_time_s = 0, tokens_per_s = 0, mfu = 0;
  double comm_wait_s = 0;  // of the step time, this rank's host blocked on collectives (Communicator::waited_s)
  std::vector<double> max_vio;        // per MoE layer of the whole model (main layers, then MTP)
  std::vector<MoeLayerMetrics> moe;   // the same layers in full
  bool stop = false;                  // a stop signal reached some rank during the step (save_on_signal)
  bool out_of_time = false;           // or some rank ran out of train.exit_duration_mins
  bool skipped = false;               // not applied: the loss or gradient norm was not finite (trainer/divergence.h)
  std::vector<double> peak_memory_bytes;  // per rank (world order): peak live tensor bytes over the step
};

struct EvalResult {
  double loss = 0;     // validation LM loss, nats/token
  double max_vio = 0;  // MaxVio over the whole validation set, averaged over MoE layers
  double entropy_rate = -1;  // of the corpus, nats/token, the floor of `loss` (< 0: unknown)
};

// Appends records to metrics.jsonl; a path of "" writes nothing.
class MetricsWriter {
 public:
  // Opens `path` for writing (resumed_step < 0), or for a run resumed after step `resumed_step`: keeps its records of
  // steps ≤ resumed_step (what the interrupted run wrote after its checkpoint, and a torn last line, are dropped)
  // and appends.
  explicit MetricsWriter(const std::string& path, int64_t resumed_step = -1);
  // Throws when the line cannot be written whole (a full disk): a metric is never dropped in silence.
  void write(const nlohmann::json& record);

 private:
  std::string path_;
  std::ofstream out_;
};

// Rows of a model::MoeLoadTracker::layer_table (summed over the ranks), named.
std::vector<MoeLayerMetrics> moe_layer_metrics(const at::Tensor& table, const std::vector<std::string>& names);

// experts: with each MoE layer's tokens and bias per expert ("tokens", "bias"; logging.expert_loads_interval).
nlohmann::json step_record(const StepResult& r, bool experts = true);
nlohmann::json eval_record(int64_t steps_done, const EvalResult& e);

// The progress lines of one process, which may have resumed at `first_step` (steps done before it started). A
// line is due every logging.interval steps, at the last step and at the first step this process trains; the ETA
// extrapolates from the steps this process trained.
class Progress {
 public:
  Progress(const config::Config& c, int64_t first_step);
  bool due(int64_t steps_done) const;
  double eta_s(int64_t steps_done, double elapsed_s) const;  // < 0 when unknown
  std::string line(const StepResult& r, double elapsed_s) const;

 private:
  int64_t steps_, interval_, first_step_;
};

// What rank 0 prints when a run ends (trained to the end or stopped by a signal): the steps and tokens this process
// trained, wall time, mean tokens/s and MFU (over the steps' own time), the last validation loss and its gap to the
// corpus entropy rate when known, the checkpoints written and where, the peak memory of any rank and step.
class RunSummary {
 public:
  explicit RunSummary(int64_t first_step) : first_step_(first_step) {}
  const StepResult& add(const StepResult& r);
  const EvalResult& add(int64_t steps_done, const EvalResult& e);
  void saved(int64_t steps_done) { ++checkpoints_, last_saved_ = steps_done; }
  std::string line(double wall_s, double entropy_rate, const std::string& checkpoint_root) const;

 private:
  int64_t first_step_, steps_done_ = 0, checkpoints_ = 0, last_saved_ = -1, eval_step_ = -1;
  double tokens_ = 0, step_s_ = 0, mfu_s_ = 0, peak_bytes_ = 0, val_loss_ = 0;
};

using Clock = std::chrono::steady_clock;
inline double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The line at the start of a run.
std::string run_header(const config::Config& c, const data::BatchShape& shape, double peak_flops, double entropy_rate);
std::string eval_line(int64_t steps_done, const EvalResult& e, double entropy_rate);
// `why`: "on SIGTERM", "at its time budget (...)", ...
std::string stop_line(int64_t steps_done, int64_t steps, const std::string& why, const std::string& checkpoint_root);
// Writes a progress line to stdout and flushes it; a failed write (a full disk under a redirection) is an error.
void print_line(const std::string& line);

// "1h02m", "3m05s", "12s"
std::string format_duration(double seconds);

// Peak FLOP/s of this rank on `device` in `dtype`: the best of a few square matmuls (MFU's denominator when
// train.peak_flops is 0).
double measure_peak_flops(c10::Device device, c10::ScalarType dtype = c10::kFloat);

}  // namespace moetrain::trainer
