// The training loop, readable top to bottom: micro-batches forward and backward with gradient accumulation, the
// global gradient norm and its clip, AdamW at the scheduled learning rate, the balancer's bias update from the
// step's expert loads, metrics, validation.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "configs/config.h"
#include "data/batches.h"
#include "model/expert_exchange.h"
#include "model/transformer.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"

namespace moetrain::trainer {

// What one optimizer step produced (also written to metrics.jsonl).
struct StepResult {
  int64_t step = 0;
  double loss = 0, lm_loss = 0, mtp_loss = 0, balance_loss = 0, grad_norm = 0, lr = 0;
  double step_time_s = 0, tokens_per_s = 0, mfu = 0;
  std::vector<double> max_vio;  // per MoE layer, this step
};

struct EvalResult {
  double loss = 0;     // validation LM loss, nats/token
  double max_vio = 0;  // MaxVio over the whole validation set, averaged over MoE layers
};

class Trainer {
 public:
  // run_dir empty: no files written (tests).
  Trainer(const config::Config& config, std::string run_dir, bool verbose);

  StepResult step();       // one optimizer step
  EvalResult evaluate();   // validation loss over train.eval_batches global batches
  void run();              // all train.steps, with logging and evaluation

  int64_t steps_done() const { return step_; }
  model::Transformer& model() { return model_; }
  const data::BatchSource& batches() const { return *batches_; }
  const std::vector<std::string>& moe_layer_names() const { return moe_names_; }

 private:
  double mtp_weight(int64_t tokens_seen) const;

  config::Config c_;
  std::string run_dir_;
  bool verbose_;
  model::Transformer model_{nullptr};
  model::LocalExpertExchange exchange_;
  std::unique_ptr<data::BatchSource> batches_;
  std::unique_ptr<AdamW> optimizer_;
  std::vector<at::Tensor*> router_biases_;  // in the order LossSums::moe reports the MoE layers
  std::vector<std::string> moe_names_;
  std::unique_ptr<MetricsWriter> metrics_;
  double flops_per_token_ = 0, peak_flops_ = 0;
  int64_t step_ = 0;
};

// Peak FLOP/s of this process: the best of a few square FP32 matmuls (for MFU when train.peak_flops is 0).
double measure_peak_flops();

}  // namespace moetrain::trainer
