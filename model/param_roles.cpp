#include "model/param_roles.h"

#include <unordered_map>

#include "model/moe.h"

namespace moetrain::model {
namespace {

std::vector<ParamInfo> roles(TransformerImpl& model, bool buffers) {
  // The routed experts, found by module type: each MoE layer's local experts hold consecutive global experts
  // from the first of this rank's shard.
  std::unordered_map<const c10::TensorImpl*, ParamInfo> experts;
  const int64_t n = model.config().n_routed_experts;
  const int64_t first = model.stage().shard.first_expert(n);
  for (const auto& item : model.named_modules(/*name_prefix=*/"", /*include_self=*/false)) {
    const auto* moe = dynamic_cast<const MoEImpl*>(item.value().get());
    if (!moe) continue;
    for (size_t e = 0; e < moe->local_experts.size(); ++e) {
      const auto& expert = moe->local_experts[e];
      for (const auto& p : buffers ? expert->named_buffers() : expert->named_parameters()) {
        ParamInfo info;
        info.role = ParamRole::kRoutedExpert;
        info.stacked_name = item.key() + ".experts." + p.key();
        info.expert_row = first + static_cast<int64_t>(e);
        info.expert_rows = n;
        experts.emplace(p.value().unsafeGetTensorImpl(), std::move(info));
      }
    }
  }
  std::vector<ParamInfo> out;
  for (const auto& item : buffers ? model.named_buffers() : model.named_parameters()) {
    auto it = experts.find(item.value().unsafeGetTensorImpl());
    ParamInfo info = it == experts.end() ? ParamInfo{} : it->second;
    info.name = item.key();
    info.tensor = item.value();
    info.shared_embedding = model.embed.defined() && item.value().is_same(model.embed);
    out.push_back(std::move(info));
  }
  return out;
}

}  // namespace

std::vector<ParamInfo> parameter_roles(TransformerImpl& model) { return roles(model, false); }
std::vector<ParamInfo> buffer_roles(TransformerImpl& model) { return roles(model, true); }

}  // namespace moetrain::model
