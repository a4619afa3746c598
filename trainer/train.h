// The training loop, readable top to bottom: micro-batches forward and backward (gradient accumulation on one
// stage, the 1F1B schedule across pipeline stages), gradient reduction over the data- and expert-parallel groups,
// the global gradient norm and its clip, AdamW at the scheduled learning rate, the balancer's bias update from
// the step's expert loads, metrics, validation. The components around it: checkpoints/checkpointer.h (saves and
// resume), model/moe_load.h (expert loads and the bias update), parallel/placement.h (stage and device),
// trainer/preemption.h (stop signals and the per-step vote), trainer/metrics.h (records and lines).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "checkpoints/checkpointer.h"
#include "config/config.h"
#include "data/batches.h"
#include "model/expert_exchange.h"
#include "model/moe_load.h"
#include "model/transformer.h"
#include "parallel/control_plane.h"
#include "parallel/grad_sync.h"
#include "parallel/pipeline.h"
#include "parallel/process_groups.h"
#include "trainer/divergence.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/run_dir.h"

namespace moetrain::trainer {

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
  void run();             // all train.steps, with logging, evaluation, checkpoints and stop signals

  // Checkpoints of the current step (collective; see checkpoints::Checkpointer): save, commit a pending
  // asynchronous save, and commit plus wait for pruned checkpoints' deletion.
  void save_checkpoint();
  void finish_checkpoint() { checkpointer_->commit(); }
  void settle_checkpoints() { checkpointer_->settle(); }
  std::string checkpoint_root() const { return checkpointer_->root(); }
  const checkpoints::Checkpointer& checkpointer() const { return *checkpointer_; }

  int64_t steps_done() const { return step_; }
  // The model and the optimizer with every parameter final (a parameter all-gather in flight finished first).
  model::Transformer& model() {
    finish_param_gather();
    return model_;
  }
  const data::BatchSource& batches() const { return *batches_; }
  const data::BatchShape& batch_shape() const { return shape_; }  // every step's global batch and micro-batches
  const std::vector<std::string>& moe_layer_names() const { return loads_->layer_names(); }
  double peak_flops() const { return peak_flops_; }
  const AdamW& optimizer() const {
    finish_param_gather();
    return *optimizer_;
  }
  const parallel::GradSync* grad_sync() const { return grad_sync_.get(); }  // null in one process
  // The pass order of the last step's pipeline schedule on this rank.
  const parallel::ScheduleTrace& schedule_trace() const { return trace_; }

 private:
  parallel::StageOutput stage_forward(int64_t chunk, const at::Tensor& input, const at::Tensor& window,
                                      at::Tensor& sums, bool training);
  double mtp_weight(int64_t tokens_seen) const;
  // parallel.overlap_param_gather: waits for the ZeRO-1 parameter all-gather the last step started, if any.
  void finish_param_gather() const;
  parallel::PipelineSpec pipeline_spec(int64_t micro_batches) const;
  int64_t tokens_before(int64_t step) const {  // trained before `step` (a batch-size ramp counted, from a resume)
    return origin_.samples_before(shape_, step) * c_.train.seq_len;
  }
  void reduce(at::Tensor& t, parallel::Communicator* comm) const;
  std::vector<MoeLayerMetrics> moe_metrics();  // collective: every MoE layer of the model, this step's loads
  void say(const std::string& line) const;

  config::Config c_;
  parallel::ProcessGroups* groups_;
  bool verbose_;
  std::unique_ptr<parallel::ControlPlane> own_control_;  // one process
  parallel::ControlPlane& control_;
  RunDirectory run_dir_;  // locked for the trainer's lifetime
  at::Device device_{at::kCPU};
  int64_t dp_rank_ = 0;
  model::Transformer model_{nullptr};
  std::unique_ptr<model::ExpertExchange> exchange_;
  std::unique_ptr<data::BatchSource> batches_;
  data::BatchShape shape_ = data::BatchShape::from(c_);  // each step's global batch (a ramp grows it)
  data::StreamOrigin origin_;  // the resumed step and the sequences trained before it
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<parallel::GradSync> grad_sync_;
  std::unique_ptr<model::MoeLoadTracker> loads_;
  std::unique_ptr<checkpoints::Checkpointer> checkpointer_;
  parallel::ScheduleTrace trace_;
  DivergenceGuard divergence_{c_.train.skip_nonfinite_steps};
  double flops_per_token_ = 0, peak_flops_ = 0;
  int64_t step_ = 0;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();  // train.exit_duration_mins
  bool over_budget() const {
    return c_.train.exit_duration_mins > 0 && seconds_since(started_) >= 60 * c_.train.exit_duration_mins;
  }
};

}  // namespace moetrain::trainer
