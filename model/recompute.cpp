#include "model/recompute.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <utility>

namespace moetrain::model {

namespace {

using torch::autograd::variable_list;

// The backward node of a recomputed segment: one input per segment output, one
// next edge per segment input.
class RecomputeBackward final : public torch::autograd::Node {
 public:
  RecomputeBackward(Segment fn, std::vector<at::Tensor> inputs) : fn_(std::move(fn)), inputs_(std::move(inputs)) {}

  variable_list apply(variable_list&& grads) override {
    TORCH_CHECK(fn_,
                "a recomputed segment was back-propagated twice (its "
                "saved inputs are freed after the first)");
    std::vector<at::Tensor> in;
    in.reserve(inputs_.size());
    for (size_t i = 0; i < inputs_.size(); ++i)
      in.push_back(inputs_[i].detach().requires_grad_(should_compute_output(i)));
    std::vector<at::Tensor> roots, root_grads;
    {
      at::AutoGradMode enable(true);
      std::vector<at::Tensor> outs = fn_(in);
      TORCH_CHECK(outs.size() == grads.size(), "a recomputed segment returned ", outs.size(),
                  " outputs, its forward pass ", grads.size());
      for (size_t i = 0; i < outs.size(); ++i)
        if (grads[i].defined() && outs[i].requires_grad()) {
          roots.push_back(outs[i]);
          root_grads.push_back(grads[i]);
        }
    }
    // Inside a backward pass the engine runs this one re-entrantly: parameter
    // gradients accumulate as usual.
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);
    variable_list result;
    for (size_t i = 0; i < in.size(); ++i) result.push_back(in[i].requires_grad() ? in[i].grad() : at::Tensor());
    release_variables();
    return result;
  }

  void release_variables() override {
    inputs_.clear();
    fn_ = nullptr;
  }
  std::string name() const override { return "RecomputeBackward"; }

 private:
  Segment fn_;
  std::vector<at::Tensor> inputs_;
};

}  // namespace

std::vector<at::Tensor> recompute(Segment fn, const std::vector<at::Tensor>& inputs) {
  if (!at::GradMode::is_enabled()) return fn(inputs);
  std::vector<at::Tensor> detached;
  detached.reserve(inputs.size());
  for (const auto& x : inputs) detached.push_back(x.detach());
  std::vector<at::Tensor> outs;
  {
    at::NoGradGuard no_grad;
    outs = fn(detached);
  }
  auto node = std::shared_ptr<RecomputeBackward>(new RecomputeBackward(std::move(fn), std::move(detached)),
                                                 torch::autograd::deleteNode);
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  for (auto& o : outs) {
    TORCH_CHECK(o.defined() && at::isFloatingType(o.scalar_type()),
                "a recomputed segment's outputs must be defined floating-point "
                "tensors");
    o = o.detach();  // a fresh autograd identity (the segment may return views)
                     // on the same storage
    torch::autograd::create_gradient_edge(o, node);
  }
  return outs;
}

}  // namespace moetrain::model
