#include "trainer/memory_meter.h"

#include <ATen/ops/zeros.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <malloc.h>

#include <atomic>
#include <cstring>
#include <mutex>

#include "moetrain/build_info.h"
#if MOETRAIN_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace moetrain::trainer {
namespace {

std::atomic<int64_t> g_live{0};
std::atomic<int64_t> g_peak{0};
std::atomic<bool> g_installed{false};

void add(int64_t n) {
  const int64_t now = g_live.fetch_add(n, std::memory_order_relaxed) + n;
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

// Each allocation carries its size in a header in front of the data (64 bytes, keeping the 64-byte alignment of
// LibTorch's CPU allocator), so that the raw interface works too (some kernels, e.g. oneDNN's BF16 GEMMs, take raw
// buffers): the data pointer is its own context and one deleter frees any of them.
constexpr size_t kHeader = 64;
c10::Allocator* g_inner = nullptr;

void release(void* data) {
  if (data == nullptr) return;
  char* base = static_cast<char*>(data) - kHeader;
  int64_t bytes = 0;
  std::memcpy(&bytes, base, sizeof(bytes));
  g_live.fetch_sub(bytes, std::memory_order_relaxed);
  g_inner->raw_deallocate(base);
}

class CountingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::kCPU);
    if (n == 0) return {nullptr, nullptr, &release, cpu};
    char* base = static_cast<char*>(g_inner->raw_allocate(n + kHeader));
    const auto bytes = static_cast<int64_t>(n);
    std::memcpy(base, &bytes, sizeof(bytes));
    add(bytes);
    void* data = base + kHeader;
    return {data, data, &release, cpu};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

void count_cpu_tensors() {
  static std::once_flag once;
  std::call_once(once, [] {
    // glibc serves blocks over its mmap threshold (dynamic, from 128 KiB) with fresh mappings and returns freed heap
    // tops over 128 KiB to the system: the step's activation-sized temporaries then page-fault on every touch
    // (measured on small-cpu: 342k minor faults in 40 steps, 94k with these; 5% more tokens/s). Blocks up to
    // 64 MiB now come from the heap and up to 512 MiB of freed heap stay mapped.
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
    c10::Allocator* inner = c10::GetCPUAllocator();
    if (inner->raw_deleter() == nullptr) return;  // no raw interface below: nothing is counted (reads zeros)
    g_inner = inner;
    static CountingAllocator counting;
    c10::SetCPUAllocator(&counting, /*priority=*/100);
    g_installed = true;
  });
}

bool cpu_tensors_counted() { return g_installed; }

TensorMemory tensor_memory(const c10::Device& device) {
#if MOETRAIN_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    const auto& all = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    return {all.current, all.peak};
  }
#endif
  if (!device.is_cpu()) return {};
  return {g_live.load(std::memory_order_relaxed), g_peak.load(std::memory_order_relaxed)};
}

void reset_tensor_memory_peak(const c10::Device& device) {
#if MOETRAIN_WITH_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
    return;
  }
#endif
  if (device.is_cpu()) g_peak.store(g_live.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

std::vector<double> peak_bytes_per_rank(const c10::Device& device, int64_t rank, int64_t world_size,
                                        const std::function<void(at::Tensor&)>& sum_over_world) {
  const auto mine = static_cast<double>(tensor_memory(device).peak_bytes);  // before this function allocates
  reset_tensor_memory_peak(device);
  at::Tensor t = at::zeros({world_size}, at::kDouble);
  t.data_ptr<double>()[rank] = mine;
  sum_over_world(t);
  return {t.data_ptr<double>(), t.data_ptr<double>() + world_size};
}

}  // namespace moetrain::trainer
