#include "precision/weight_cache.h"

#include <c10/core/UndefinedTensorImpl.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/autograd.h>

#include <mutex>
#include <optional>
#include <unordered_map>

namespace moetrain::precision {
namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Entry {
  std::optional<WeakImpl> owner;  // the weight itself, without keeping it alive
  const void* data = nullptr;
  uint32_t version = 0;
  at::Tensor bf16;
  Fp8Weight fp8;
};

std::mutex g_mutex;
std::unordered_map<const c10::TensorImpl*, Entry> g_cache;
int64_t g_copies = 0;

bool current(const Entry& e, const at::Tensor& w) {
  return e.owner && !e.owner->expired() && e.data == w.data_ptr() && e.version == w._version();
}

// The entry for w, emptied when w changed. Entries of weights that died are dropped when a new weight comes in
// (not on every refresh after an optimizer step).
Entry& entry_for(const at::Tensor& w) {
  auto it = g_cache.find(w.unsafeGetTensorImpl());
  if (it != g_cache.end() && current(it->second, w)) return it->second;
  if (it == g_cache.end())
    for (auto i = g_cache.begin(); i != g_cache.end();)
      i = (!i->second.owner || i->second.owner->expired()) ? g_cache.erase(i) : std::next(i);
  Entry& e = g_cache[w.unsafeGetTensorImpl()];
  e = Entry{};
  e.owner.emplace(w.getIntrusivePtr());
  e.data = w.data_ptr();
  e.version = w._version();
  return e;
}

}  // namespace

at::Tensor bf16_weight(const at::Tensor& w) {
  if (w.scalar_type() == at::kBFloat16) return w.detach();  // a BF16 parameter (bf16 mode): no copy
  std::lock_guard<std::mutex> lock(g_mutex);
  Entry& e = entry_for(w);
  if (!e.bf16.defined()) {
    at::NoGradGuard no_grad;
    e.bf16 = w.detach().to(at::kBFloat16).contiguous();
    ++g_copies;
  }
  return e.bf16;
}

Fp8Weight fp8_weight(const at::Tensor& w) {
  std::lock_guard<std::mutex> lock(g_mutex);
  Entry& e = entry_for(w);
  if (!e.fp8.rows.data.defined()) {
    at::NoGradGuard no_grad;
    e.fp8 = quantize_weight(w.detach());
    ++g_copies;
  }
  return e.fp8;
}

int64_t weight_copies_made() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_copies;
}

void clear_weight_cache() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_cache.clear();
}

}  // namespace moetrain::precision
