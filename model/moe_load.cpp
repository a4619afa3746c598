#include "model/moe_load.h"

#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <fmt/format.h>

#include "model/balancer.h"
#include "model/device_copy.h"
#include "model/param_flops.h"

namespace moetrain::model {

std::vector<std::string> moe_layer_names(const config::ModelConfig& m) {
  std::vector<std::string> names;
  for (int64_t l = 0; l < m.num_layers; ++l)
    if (is_moe_layer(m, l)) names.push_back(fmt::format("layers.{}", l));
  for (int64_t k = 0; mtp_is_moe(m) && k < m.mtp_depth; ++k) names.push_back(fmt::format("mtp.{}", k));
  return names;
}

std::vector<MoeRouterRef> moe_routers(TransformerImpl& model) {
  const config::ModelConfig& m = model.config();
  std::vector<int64_t> moe_index(static_cast<size_t>(m.num_layers), -1);  // per layer: its place among MoE layers
  int64_t main_moe_layers = 0;
  for (int64_t l = 0; l < m.num_layers; ++l)
    if (is_moe_layer(m, l)) moe_index[static_cast<size_t>(l)] = main_moe_layers++;
  std::vector<MoeRouterRef> out;
  size_t block = 0;  // model.layers holds the chunks' blocks in chunk order
  for (const LayerChunk& chunk : model.stage().chunks)
    for (int64_t l = chunk.first_layer; l < chunk.first_layer + chunk.num_layers; ++l, ++block)
      if (model.layers[block]->moe)
        out.push_back({moe_index[static_cast<size_t>(l)], model.layers[block]->moe->router});
  for (size_t k = 0; k < model.mtp.size(); ++k)
    if (model.mtp[k]->block->moe)
      out.push_back({main_moe_layers + static_cast<int64_t>(k), model.mtp[k]->block->moe->router});
  return out;
}

MoeLoadTracker::MoeLoadTracker(TransformerImpl& model)
    : routers_(moe_routers(model)),
      names_(moe_layer_names(model.config())),
      n_experts_(model.config().n_routed_experts) {
  reset();
}

void MoeLoadTracker::reset() { loads_ = at::zeros({static_cast<int64_t>(routers_.size()), n_experts_}, at::kLong); }

void MoeLoadTracker::add(const std::vector<MoeStats>& stats) {
  if (stats.size() != routers_.size())
    throw std::logic_error(fmt::format("MoE loads: {} layers reported, {} held", stats.size(), routers_.size()));
  add(stats, 0);
}

void MoeLoadTracker::add(const std::vector<MoeStats>& stats, int64_t first) {
  if (first < 0 || first + static_cast<int64_t>(stats.size()) > static_cast<int64_t>(routers_.size()))
    throw std::logic_error(fmt::format("MoE loads: {} layers reported from the {}th on, {} held", stats.size(), first,
                                       routers_.size()));
  for (size_t i = 0; i < stats.size(); ++i) loads_[first + static_cast<int64_t>(i)] += stats[i].counts;
}

void MoeLoadTracker::reduce(const std::function<void(at::Tensor&)>& sum_over_dp) {
  if (!routers_.empty()) sum_over_dp(loads_);
}

void MoeLoadTracker::update_biases(double rate) {
  if (routers_.empty()) return;
  const at::Tensor loads = to_device(loads_, routers_[0].router->bias.device());  // one copy for all layers
  for (size_t i = 0; i < routers_.size(); ++i)
    update_bias(routers_[i].router->bias, loads[static_cast<int64_t>(i)], rate);
}

at::Tensor MoeLoadTracker::layer_table(bool fill) const {
  const int64_t width = kColumns + 2 * n_experts_;
  at::Tensor table = at::zeros({static_cast<int64_t>(names_.size()), width}, at::kDouble);
  if (!fill || routers_.empty()) return table;
  const at::Tensor loads = loads_.to(at::kDouble);
  // The biases, their minima and maxima in one copy from the device.
  std::vector<at::Tensor> biases;
  for (const auto& r : routers_) biases.push_back(r.router->bias);
  const at::Tensor bias = at::stack(biases);
  auto [lo, hi] = at::aminmax(bias, /*dim=*/1);
  const at::Tensor bias_table = at::cat({lo.unsqueeze(1), hi.unsqueeze(1), bias}, 1).to(at::kDouble).to(at::kCPU);
  const double* b = bias_table.data_ptr<double>();
  auto* out = table.data_ptr<double>();
  for (size_t i = 0; i < routers_.size(); ++i) {
    const at::Tensor load = loads_[static_cast<int64_t>(i)];
    double* row = out + routers_[i].layer * width;
    const double* bias_row = b + static_cast<int64_t>(i) * (2 + n_experts_);
    row[kMaxVio] = max_violation(load);
    row[kMinLoad] = static_cast<double>(load.min().item<int64_t>());
    row[kMaxLoad] = static_cast<double>(load.max().item<int64_t>());
    row[kBiasMin] = bias_row[0];
    row[kBiasMax] = bias_row[1];
    std::copy_n(loads[static_cast<int64_t>(i)].data_ptr<double>(), n_experts_, row + kColumns);
    std::copy_n(bias_row + 2, n_experts_, row + kColumns + n_experts_);
  }
  return table;
}

double bias_update_rate(const config::ModelConfig& m, int64_t tokens_seen) {
  return m.bias_update_stop_tokens > 0 && tokens_seen >= m.bias_update_stop_tokens ? 0.0 : m.bias_update_rate;
}

}  // namespace moetrain::model
