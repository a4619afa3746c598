// One interface for the collectives of a process group, with an MPI backend for CPU tensors
// (parallel/mpi_communicator.h) and an NCCL backend for CUDA tensors (parallel/nccl_communicator.h). Every
// operation is issued by every rank of the group, in the same order, even with nothing to send. An operation that
// does not finish within the group's timeout throws CommError naming the group, the operation and the rank, so
// the job ends instead of hanging.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>
#include <fmt/format.h>

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace moetrain::parallel {

class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class ReduceOp { kSum, kMax, kMin };

// A collective started without waiting for it (Communicator::start_*): its tensors must stay alive and untouched
// until wait() returns. test() advances it without blocking (MPI progresses a non-blocking collective only inside
// MPI calls) and says whether it finished; wait() blocks until it has, against the group's timeout (CommError).
class PendingOp {
 public:
  virtual ~PendingOp() = default;
  virtual bool test() = 0;
  virtual void wait() = 0;
};

// Bytes moved by each operation kind through one communicator (for bench/parallel).
struct CommStats {
  int64_t calls = 0;
  int64_t bytes_sent = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  const std::string& name() const { return name_; }  // "dp", "ep", ...
  int rank() const { return rank_; }                  // in the group
  int size() const { return size_; }
  int world_rank() const { return world_rank_; }

  // In place; tensors contiguous.
  virtual void all_reduce(at::Tensor& t, ReduceOp op = ReduceOp::kSum) = 0;
  // Non-blocking forms (the gradient reduction during the backward pass, parallel/grad_sync.h). Every rank starts
  // the operations of one group in the same order. start_reduce_scatter_in_place (ZeRO-1's gradient reduction):
  // `whole` (size() parts) is summed over the group and this rank's part of the sum (part r: elements
  // [r·n, (r+1)·n)) lands in whole's part in_place_part() — no second buffer; the rest of `whole` is left
  // undefined.
  virtual std::unique_ptr<PendingOp> start_all_reduce(at::Tensor& t, ReduceOp op = ReduceOp::kSum) = 0;
  virtual std::unique_ptr<PendingOp> start_reduce_scatter_in_place(at::Tensor& whole) = 0;
  virtual int in_place_part() const = 0;  // MPI: part 0 (MPI_IN_PLACE's convention); NCCL: part rank()
  // ZeRO-1's parameter gather, non-blocking and in place: `whole` (size() parts, contiguous) holds this rank's part
  // in part rank() (elements [r·n, (r+1)·n)); once the operation finished every part holds its rank's. A CommError
  // when it does not split evenly.
  virtual std::unique_ptr<PendingOp> start_all_gather_in_place(at::Tensor& whole) = 0;
  // Rows of `t` go to ranks in order: send_rows[r] rows to rank r; returns the rows received, recv_rows[r] from
  // rank r, in rank order. Row shape and dtype are t's.
  virtual at::Tensor all_to_all_v(const at::Tensor& t, const std::vector<int64_t>& send_rows,
                                  const std::vector<int64_t>& recv_rows) = 0;
  // Its non-blocking form: the received rows land in `out` (allocated here) once the operation finished.
  virtual std::unique_ptr<PendingOp> start_all_to_all_v(const at::Tensor& t, const std::vector<int64_t>& send_rows,
                                                        const std::vector<int64_t>& recv_rows, at::Tensor& out) = 0;
  virtual void send(const at::Tensor& t, int dst, int tag) = 0;  // returns when t may be reused
  // Its non-blocking form (the pipeline's sends): t may be reused once wait() returned.
  virtual std::unique_ptr<PendingOp> start_send(const at::Tensor& t, int dst, int tag) = 0;
  virtual void recv(at::Tensor& t, int src, int tag) = 0;
  // Sends `out` to dst while receiving `in` from src, as one operation (the pipeline's steady state, where two
  // neighbours send to each other at once and separate blocking sends could deadlock).
  virtual void send_recv(const at::Tensor& out, int dst, int send_tag, at::Tensor& in, int src, int recv_tag) = 0;
  virtual void barrier() = 0;

  const std::map<std::string, CommStats>& stats() const { return stats_; }
  void reset_stats() { stats_.clear(); }
  // Seconds this rank's host spent blocked on this group's operations since it was created, waiting for its peers
  // and the transfer (MPI: each request's wait; NCCL: the wait for the communication stream). What the trainer
  // reports as the step's communication wait.
  double waited_s() const { return waited_s_; }

 protected:
  Communicator(std::string name, int rank, int size, int world_rank)
      : name_(std::move(name)), rank_(rank), size_(size), world_rank_(world_rank) {}
  // The in-place reduce-scatter and all-gather: the elements of each of the size() parts of `whole` (a CommError
  // naming the operation when it does not split evenly); counts the bytes the operation `op` sends.
  int64_t in_place_parts(const at::Tensor& whole, const char* op) {
    if (whole.numel() % size_ != 0)
      throw CommError(fmt::format("{} on group {}: {} elements do not split into {} parts", op, name_, whole.numel(),
                                  size_));
    const int64_t part = whole.numel() / size_;
    count(op, part * (size_ - 1) * static_cast<int64_t>(whole.element_size()));
    return part;
  }
  // The profiler's name of an operation on this group, "all-to-all ep", "send pp" (trainer/profiler.h): built
  // only while a profiler records (RECORD_USER_SCOPE evaluates it then), kept as long as the group.
  const char* trace_name(const char* op) {
    auto it = trace_names_.find(op);
    if (it == trace_names_.end()) it = trace_names_.emplace(op, fmt::format("{} {}", op, name_)).first;
    return it->second.c_str();
  }
  void count(const char* op, int64_t bytes) {
    auto& s = stats_[op];
    ++s.calls;
    s.bytes_sent += bytes;
  }

  std::string name_;
  std::map<std::string, std::string> trace_names_;
  int rank_, size_, world_rank_;
  std::map<std::string, CommStats> stats_;
  double waited_s_ = 0;
};

}  // namespace moetrain::parallel
