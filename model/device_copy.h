// A host tensor on a device: on CUDA through pinned host memory with a copy that does not block the host (the
// caching host allocator keeps the pinned block until the copy is done; an already pinned tensor is not copied
// again); elsewhere the tensor itself. Batches, the balancer's loads and the grouped GEMM's group ends use it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace moetrain::model {

inline at::Tensor to_device(const at::Tensor& host, const c10::Device& device) {
  if (!device.is_cuda()) return host.to(device);
  return host.pin_memory().to(device, /*non_blocking=*/true);
}

}  // namespace moetrain::model
