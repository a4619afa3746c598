#include "data/prefetch.h"

#include <fmt/format.h>

#include <chrono>
#include <stdexcept>

namespace moetrain::data {

PrefetchingSource::PrefetchingSource(std::unique_ptr<BatchSource> inner, int64_t depth, BatchShape shape)
    : inner_(std::move(inner)), depth_(static_cast<size_t>(depth)), shape_(std::move(shape)) {
  if (!inner_ || depth < 1 || shape_.micro_batches < 1)
    throw std::invalid_argument(fmt::format("PrefetchingSource: depth {} and micro_batches {} must be ≥ 1", depth,
                                            shape_.micro_batches));
  worker_ = std::thread([this] { run(); });
}

PrefetchingSource::~PrefetchingSource() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

PrefetchingSource::Key PrefetchingSource::after(const Key& k) const {
  if (k.micro_batch + 1 < shape_.micro_batches_at(k.step)) return {k.step, k.dp_rank, k.micro_batch + 1};
  return {k.step + 1, k.dp_rank, 0};
}

void PrefetchingSource::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || (active_ && queue_.size() < depth_); });
    if (stop_) return;
    Item item{next_, {}, nullptr};
    const uint64_t generation = generation_;
    busy_ = true;
    lock.unlock();
    try {
      item.batch = inner_->train(item.key.step, item.key.dp_rank, item.key.micro_batch);
    } catch (...) {
      item.error = std::current_exception();
    }
    lock.lock();
    busy_ = false;
    if (generation == generation_) {
      if (item.error) active_ = false;  // stop here; the loop gets the error when it asks for this batch
      next_ = after(item.key);
      queue_.push_back(std::move(item));
    }
    cv_.notify_all();
  }
}

at::Tensor PrefetchingSource::train(int64_t step, int64_t dp_rank, int64_t micro_batch) const {
  const Key key{step, dp_rank, micro_batch};
  const auto t0 = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mutex_);
  bool waited = false;
  for (;;) {
    if (!queue_.empty()) {
      if (!(queue_.front().key == key)) break;
      Item item = std::move(queue_.front());
      queue_.pop_front();
      ++(waited ? stats_.waited : stats_.ready);
      stats_.wait_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      lock.unlock();
      cv_.notify_all();
      if (item.error) std::rethrow_exception(item.error);
      return item.batch;
    }
    if (!(active_ && next_ == key)) break;
    // The worker is preparing (or about to prepare) exactly this batch: wait for it rather than compute it twice.
    waited = true;
    cv_.wait(lock, [&] { return !queue_.empty() || !active_ || !(next_ == key); });
  }
  // Not predicted: drop what was prepared, serve this one now, prefetch from the next.
  ++generation_;
  queue_.clear();
  active_ = false;
  ++stats_.unpredicted;
  lock.unlock();
  at::Tensor batch = inner_->train(step, dp_rank, micro_batch);
  lock.lock();
  stats_.wait_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!active_ && queue_.empty()) {  // no other request restarted it meanwhile
    next_ = after(key);
    active_ = true;
  }
  lock.unlock();
  cv_.notify_all();
  return batch;
}

at::Tensor PrefetchingSource::validation(int64_t index, int64_t dp_rank, int64_t micro_batch) const {
  return inner_->validation(index, dp_rank, micro_batch);
}

void PrefetchingSource::resume(const DataState& state) {
  std::unique_lock<std::mutex> lock(mutex_);
  ++generation_;
  queue_.clear();
  active_ = false;
  // The inner source changes its origin: wait until the worker is out of it.
  cv_.wait(lock, [&] { return !busy_; });
  inner_->resume(state);
}

PrefetchingSource::Stats PrefetchingSource::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

}  // namespace moetrain::data
