// Activation recomputation (model.recompute): a segment of the forward pass
// runs without recording its graph, keeping only its inputs; the backward pass
// runs it again with gradients and back-propagates through it at once (the
// reentrant scheme of torch.utils.checkpoint and Megatron-Core). Parameters
// inside the segment get their gradients as usual; the inputs' gradients flow
// on to the rest of the graph.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

namespace moetrain::model {

// A segment: inputs -> outputs (defined floating-point tensors). It must
// compute the same values when called again (deterministic ops, no state it
// changes on the second call); anything it captures by reference must live
// until the backward pass.
using Segment = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

// fn(inputs), holding only `inputs` for the backward pass. With gradients off
// it is just fn(inputs).
std::vector<at::Tensor> recompute(Segment fn, const std::vector<at::Tensor>& inputs);

}  // namespace moetrain::model
