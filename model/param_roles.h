// What each parameter and buffer of a stage model is to the parallel layer, declared once here from the model's
// structure, so that gradient sync, the gradient norm, checkpoint ownership and expert stacking read it instead of
// guessing from names:
//   dense          replicated over the dp ranks of its stage: gradients summed over dp;
//   routed expert  one expert's weight, on one ep rank, replicated over edp: gradients summed over edp; stored in
//                  checkpoints as row `expert_row` of the stacked tensor `stacked_name` ([n_routed, ...]), the
//                  grouped-experts form Megatron-Core and torchtitan users know;
//   shared embedding (a flag on a dense parameter): the token embedding, of which the last stage (MTP, a tied
//                  head) holds a copy kept identical to the first stage's: gradients also summed over the
//                  embedding group, counted and saved once, by the first stage.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "model/transformer.h"

namespace moetrain::model {

enum class ParamRole { kDense, kRoutedExpert };

struct ParamInfo {
  std::string name;  // the global name: "layers.3.moe.experts.12.w_up", "embed.weight"
  at::Tensor tensor;
  ParamRole role = ParamRole::kDense;
  bool shared_embedding = false;
  std::string stacked_name;  // routed experts: "layers.3.moe.experts.w_up"
  int64_t expert_row = 0;    // routed experts: the global expert index
  int64_t expert_rows = 0;   // routed experts: n_routed_experts

  bool routed() const { return role == ParamRole::kRoutedExpert; }
  // The tensor it is part of in checkpoints and exports: its own, or a routed expert's stack [n_routed, ...].
  const std::string& global_name() const { return routed() ? stacked_name : name; }
  std::vector<int64_t> global_shape() const {
    std::vector<int64_t> shape = tensor.sizes().vec();
    if (routed()) shape.insert(shape.begin(), expert_rows);
    return shape;
  }
};

// In registration order (model.named_parameters() / named_buffers()).
std::vector<ParamInfo> parameter_roles(TransformerImpl& model);
std::vector<ParamInfo> buffer_roles(TransformerImpl& model);

}  // namespace moetrain::model
