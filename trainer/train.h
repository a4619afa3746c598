// The training loop, readable top to bottom: micro-batches forward and backward (gradient accumulation on one
// stage, the 1F1B schedule across pipeline stages), gradient reduction over the data- and expert-parallel groups,
// the global gradient norm and its clip, AdamW at the scheduled learning rate, the balancer's bias update from
// the step's expert loads summed over all micro-batches and dp ranks, metrics, validation.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "configs/config.h"
#include "data/batches.h"
#include "model/expert_exchange.h"
#include "model/transformer.h"
#include "parallel/grad_sync.h"
#include "parallel/pipeline.h"
#include "parallel/process_groups.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"

namespace moetrain::checkpoints {
class Remover;
}

namespace moetrain::trainer {

// What one optimizer step produced (also written to metrics.jsonl). Losses are global-batch means, the same on
// every rank.
struct StepResult {
  int64_t step = 0;
  double loss = 0, lm_loss = 0, mtp_loss = 0, balance_loss = 0, grad_norm = 0, lr = 0;
  double step_time_s = 0, tokens_per_s = 0, mfu = 0;
  std::vector<double> max_vio;  // per MoE layer of the whole model (main layers, then MTP), this step
};

struct EvalResult {
  double loss = 0;     // validation LM loss, nats/token
  double max_vio = 0;  // MaxVio over the whole validation set, averaged over MoE layers
};

class Trainer {
 public:
  // groups: the communicators of a multi-rank job (nullptr: one process, no MPI). run_dir: the run directory
  // (the same on every rank; empty: no files). main: this rank prints progress and writes config and metrics.
  // resume: a committed checkpoint directory to continue from ("" to start fresh).
  Trainer(const config::Config& config, parallel::ProcessGroups* groups, std::string run_dir, bool main,
          const std::string& resume = "");
  ~Trainer();

  StepResult step();      // one optimizer step
  EvalResult evaluate();  // validation loss over train.eval_batches global batches
  void run();             // all train.steps, with logging, evaluation and checkpoints

  // Saves a checkpoint of the current step into checkpoint_root() (collective). With checkpoint.async the shard
  // is written on a background thread from host copies and committed at the first step when every rank's writer
  // is done (or by finish_checkpoint(), the next save, or the end of the run).
  void save_checkpoint();
  void finish_checkpoint();  // waits for and commits a pending asynchronous save
  // finish_checkpoint(), then waits for the background deletion of the checkpoints keep_last pruned.
  void settle_checkpoints();
  std::string checkpoint_root() const;

  int64_t steps_done() const { return step_; }
  model::Transformer& model() { return model_; }
  const data::BatchSource& batches() const { return *batches_; }
  const std::vector<std::string>& moe_layer_names() const { return all_moe_names_; }
  // The pass order of the last step's pipeline schedule on this rank.
  const parallel::ScheduleTrace& schedule_trace() const { return trace_; }

 private:
  struct Accumulator;  // sums of one step's micro-batches on this rank
  parallel::StageOutput stage_forward(int64_t mb, const at::Tensor& input, const at::Tensor& window,
                                      Accumulator& acc, bool training);
  double mtp_weight(int64_t tokens_seen) const;
  Accumulator new_accumulator() const;
  void global_loads(Accumulator& acc) const;
  parallel::PipelineSpec pipeline_spec() const;
  void load_checkpoint(const std::string& dir);
  struct PendingSave;
  void reduce(at::Tensor& t, parallel::Communicator* comm) const;
  // Per MoE layer of the whole model: (max_vio, min, max, bias_min, bias_max), gathered from the owning stages.
  at::Tensor layer_metrics(const std::vector<at::Tensor>& loads);

  config::Config c_;
  std::string config_yaml_;  // c_ resolved, as YAML
  parallel::ProcessGroups* groups_;
  std::string run_dir_;
  bool verbose_;
  at::Device device_{at::kCPU};
  int64_t dp_rank_ = 0;
  bool first_stage_ = true, last_stage_ = true;
  model::Transformer model_{nullptr};
  std::unique_ptr<model::ExpertExchange> exchange_;
  std::unique_ptr<data::BatchSource> batches_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<parallel::GradSync> grad_sync_;
  std::vector<at::Tensor*> router_biases_;  // this stage's MoE layers, in the order the forward reports them
  std::vector<int64_t> moe_global_index_;   // their index in all_moe_names_
  std::vector<std::string> all_moe_names_;
  std::unique_ptr<MetricsWriter> metrics_;
  parallel::ScheduleTrace trace_;
  double flops_per_token_ = 0, peak_flops_ = 0;
  int64_t step_ = 0;
  std::unique_ptr<checkpoints::Remover> remover_;  // deletes pruned checkpoints in the background
  std::unique_ptr<PendingSave> pending_save_;
  std::vector<at::Tensor> snapshot_pool_;  // host buffers of the last asynchronous save, reused by the next
};

// Where a run's checkpoints go: checkpoint.dir, inside run_dir when relative (and run_dir is given).
std::string checkpoint_root(const config::Config& c, const std::string& run_dir);

// Peak FLOP/s of this process: the best of a few square FP32 matmuls (for MFU when train.peak_flops is 0).
double measure_peak_flops();

}  // namespace moetrain::trainer
