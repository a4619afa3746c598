// Prefetching: a BatchSource wrapper that prepares the next training micro-batches on a background thread, so the
// loop finds each one ready. The trainer asks for (step, dp_rank, micro_batch) in order — micro-batches 0..M−1 of
// a step, then the next step — so the next key is predictable; a bounded queue (data.prefetch deep) holds the
// ones prepared ahead. A request that is not the predicted one (the first, or after a jump) is served
// synchronously and prefetching restarts after it: the batches are the same either way, only the waiting differs.
// An error preparing a batch is raised when the loop asks for that batch. Validation batches pass through.
#pragma once

#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

#include "data/batches.h"

namespace moetrain::data {

class PrefetchingSource final : public BatchSource {
 public:
  // `inner`'s const methods must be safe to call from two threads (both sources here are).
  // `shape`: how many micro-batches each step has (with a batch-size ramp, more in later steps).
  PrefetchingSource(std::unique_ptr<BatchSource> inner, int64_t depth, BatchShape shape);
  ~PrefetchingSource() override;

  at::Tensor train(int64_t step, int64_t dp_rank, int64_t micro_batch) const override;
  at::Tensor validation(int64_t index, int64_t dp_rank, int64_t micro_batch) const override;
  double entropy_rate() const override { return inner_->entropy_rate(); }
  DataState state(int64_t step) const override { return inner_->state(step); }
  void resume(const DataState& state) override;  // drops what was prepared, then resumes the inner source


  struct Stats {
    int64_t ready = 0;      // requests served from the queue
    int64_t waited = 0;     // requests that waited for the batch being prepared
    int64_t unpredicted = 0;  // requests served synchronously (first one, or out of order)
    double wait_s = 0;      // total time train() spent blocked
  };
  Stats stats() const;

 private:
  struct Key {
    int64_t step = -1, dp_rank = 0, micro_batch = 0;
    bool operator==(const Key&) const = default;
  };
  struct Item {
    Key key;
    at::Tensor batch;
    std::exception_ptr error;
  };
  Key after(const Key& k) const;
  void run();

  std::unique_ptr<BatchSource> inner_;
  size_t depth_;
  BatchShape shape_;
  mutable std::mutex mutex_;
  mutable std::condition_variable cv_;
  mutable std::deque<Item> queue_;
  mutable Key next_;               // the key the worker prepares next
  mutable bool active_ = false;    // the worker is prefetching from next_
  mutable bool busy_ = false;      // the worker is inside inner_->train
  mutable uint64_t generation_ = 0;  // bumped on every restart: a batch of an older generation is dropped
  mutable Stats stats_;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace moetrain::data
