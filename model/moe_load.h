// The MoE layers' expert loads over a step or an evaluation: tokens routed to each expert, summed over a rank's
// micro-batches and then over the dp ranks (the whole global batch), from which the balancer updates every
// router's bias (model/balancer.h) and the metrics take, per layer, MaxVio, the least and most loaded expert and
// the range of the bias.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

#include "config/config.h"
#include "model/moe.h"
#include "model/transformer.h"

namespace moetrain::model {

// One MoE layer a stage model holds, in the order its forward pass reports MoeStats.
struct MoeRouterRef {
  int64_t layer = 0;  // its index in moe_layer_names(): the main model's MoE layers, then the MTP blocks
  Router router;      // router->bias is the balancer's bias
};
std::vector<MoeRouterRef> moe_routers(TransformerImpl& model);

// Every MoE layer of the whole model, by name: "layers.3", ..., "mtp.0".
std::vector<std::string> moe_layer_names(const config::ModelConfig& m);

class MoeLoadTracker {
 public:
  // Columns of layer_table().
  enum Column { kMaxVio, kMinLoad, kMaxLoad, kBiasMin, kBiasMax, kColumns };

  explicit MoeLoadTracker(TransformerImpl& model);

  void reset();                                   // before a step or an evaluation
  void add(const std::vector<MoeStats>& stats);   // one micro-batch's forward pass on this rank
  // One chunk's forward pass (model/transformer.h): its MoE layers are the held ones from the `first`th on.
  void add(const std::vector<MoeStats>& stats, int64_t first);
  // Sums the loads over the dp ranks with `sum_over_dp` (in place; not called for one process): afterwards they
  // are the global batch's, identical on every replica.
  void reduce(const std::function<void(at::Tensor&)>& sum_over_dp);
  // The auxiliary-loss-free update of every router's bias from the loads.
  void update_biases(double rate);
  // [moe_layer_names().size(), kColumns + 2 n_experts] FP64 on the host: the columns above, each expert's tokens, then
  // each expert's bias;
  // this stage's layers filled in when `fill`, zeros elsewhere, so that a sum over one rank per stage gathers the
  // whole model.
  at::Tensor layer_table(bool fill) const;

  const std::vector<std::string>& layer_names() const { return names_; }
  bool empty() const { return routers_.empty(); }

 private:
  std::vector<MoeRouterRef> routers_;
  std::vector<std::string> names_;
  int64_t n_experts_;
  at::Tensor loads_;  // [this stage's MoE layers, n_experts] int64 on the host
};

// The bias update rate of a step that starts with `tokens_seen` tokens trained: model.bias_update_rate, then 0
// from model.bias_update_stop_tokens on (when set).
double bias_update_rate(const config::ModelConfig& m, int64_t tokens_seen);

}  // namespace moetrain::model
