#include "precision/weight_grad_store.h"

#include <ATen/core/grad_mode.h>

#include <stdexcept>

namespace moetrain::precision {
namespace {

struct Store {
  bool split_forward = false, deferring = false;
  std::vector<std::function<void()>> open;           // the current backward pass's work
  std::deque<std::vector<std::function<void()>>> units;  // flushed W units, oldest first
};

Store& store() {
  static Store s;
  return s;
}

}  // namespace

void WeightGradStore::set_split_forward(bool on) { store().split_forward = on; }
bool WeightGradStore::split_forward() { return store().split_forward; }
void WeightGradStore::set_deferring(bool on) { store().deferring = on; }
bool WeightGradStore::deferring() { return store().deferring; }

bool WeightGradStore::defer(std::function<void()> work) {
  if (!store().deferring) return false;
  store().open.push_back(std::move(work));
  return true;
}

void WeightGradStore::flush() {
  store().units.push_back(std::move(store().open));
  store().open.clear();
}

void WeightGradStore::run_oldest() {
  if (store().units.empty()) throw std::logic_error("weight-gradient store: a W pass with no deferred work queued");
  std::vector<std::function<void()>> unit = std::move(store().units.front());
  store().units.pop_front();
  at::NoGradGuard no_grad;  // as inside autograd's backward: nothing here is recorded
  for (auto& work : unit) work();
}

size_t WeightGradStore::units() { return store().units.size(); }

void WeightGradStore::clear() {
  store().open.clear();
  store().units.clear();
  store().deferring = false;
}

void accumulate_grad(const at::Tensor& p, const at::Tensor& g) {
  at::NoGradGuard no_grad;
  at::Tensor grad = p.grad();
  if (grad.defined())
    grad.add_(g.to(p.scalar_type()));
  else
    p.mutable_grad() = g.to(p.scalar_type());
}

at::Tensor weight_grad_or_defer(const at::Tensor& w, std::function<at::Tensor()> wgrad) {
  if (WeightGradStore::defer([w, wgrad] { accumulate_grad(w, wgrad()); })) return {};
  return wgrad();
}

DeferWeightGrads::DeferWeightGrads(bool on) : on_(on) {
  if (on_) WeightGradStore::set_deferring(true);
}

DeferWeightGrads::~DeferWeightGrads() {
  if (!on_) return;
  WeightGradStore::set_deferring(false);
  WeightGradStore::flush();
}

}  // namespace moetrain::precision
