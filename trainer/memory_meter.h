// Measured memory: the bytes of live tensors on this rank's device and their peak, as the allocator sees them —
// not RSS, which counts the allocator's caches, the libraries and the page cache.
//   CPU: a counting allocator installed in front of LibTorch's CPU allocator (count_cpu_tensors(), first thing in
//        main): every tensor storage allocated after it is counted until it is freed.
//   CUDA: the caching allocator's own statistics (allocated bytes, current and peak).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace moetrain::trainer {

// Installs the counting CPU allocator (idempotent, thread-safe). Storages allocated before it are not counted. It
// also keeps freed host blocks of up to 64 MiB for reuse instead of returning them to the system (glibc mallopt).
void count_cpu_tensors();
bool cpu_tensors_counted();

struct TensorMemory {
  int64_t live_bytes = 0;  // now
  int64_t peak_bytes = 0;  // the most live at once since the last reset_peak
};

// The device's reading; CPU without count_cpu_tensors() reads zeros.
TensorMemory tensor_memory(const c10::Device& device);
// Starts a new peak at the current live bytes.
void reset_tensor_memory_peak(const c10::Device& device);

// Every rank's peak of live tensor bytes since its last call, in world-rank order, and a new peak started on this
// rank. `sum_over_world` sums a CPU tensor over the world (a no-op in one process). Collective when it is.
std::vector<double> peak_bytes_per_rank(const c10::Device& device, int64_t rank, int64_t world_size,
                                        const std::function<void(at::Tensor&)>& sum_over_world);

}  // namespace moetrain::trainer
