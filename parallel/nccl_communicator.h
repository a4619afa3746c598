// The NCCL backend of Communicator, for CUDA tensors (CUDA builds only). Bootstrapped over the group's MPI
// communicator: rank 0 creates the unique id, MPI broadcasts it, every rank joins with ncclCommInitRank; the
// communicator is warmed with a barrier at creation so a broken setup fails at start-up, not at the first step.
// The blocking operations run on the current PyTorch CUDA stream; the start_* ones and the sends on a communication
// stream of the group's own, after the work queued so far on the current stream. The host polls the stream (or the
// operation's end event) against the group's timeout and aborts the NCCL communicator (ncclCommAbort) when it
// passes, so a dead peer ends the job instead of hanging it.
#pragma once

#include <mpi.h>

#include "parallel/communicator.h"

namespace moetrain::parallel {

struct NcclState;

class NcclCommunicator final : public Communicator {
 public:
  // `mpi_group`: an MPI communicator holding exactly this group's ranks (in group order).
  NcclCommunicator(std::string name, MPI_Comm mpi_group, int world_rank, double timeout_s);
  ~NcclCommunicator() override;

  void all_reduce(at::Tensor& t, ReduceOp op) override;
  // On a communication stream of the group's own, after the work queued so far on the current stream; wait()
  // then orders the current stream after the collective.
  std::unique_ptr<PendingOp> start_all_reduce(at::Tensor& t, ReduceOp op) override;
  std::unique_ptr<PendingOp> start_reduce_scatter_in_place(at::Tensor& whole) override;
  int in_place_part() const override { return rank_; }
  std::unique_ptr<PendingOp> start_all_gather_in_place(at::Tensor& whole) override;
  at::Tensor all_to_all_v(const at::Tensor& t, const std::vector<int64_t>& send_rows,
                          const std::vector<int64_t>& recv_rows) override;
  std::unique_ptr<PendingOp> start_all_to_all_v(const at::Tensor& t, const std::vector<int64_t>& send_rows,
                                                const std::vector<int64_t>& recv_rows, at::Tensor& out) override;
  void send(const at::Tensor& t, int dst, int tag) override;
  // On the communication stream (the current stream does not wait for it): see the definition.
  std::unique_ptr<PendingOp> start_send(const at::Tensor& t, int dst, int tag) override;
  void recv(at::Tensor& t, int src, int tag) override;
  void send_recv(const at::Tensor& out, int dst, int send_tag, at::Tensor& in, int src, int recv_tag) override;
  void barrier() override;

 private:
  friend class NcclPendingOp;
  // Waits for the stream (the current one by default), or for `event` (a cudaEvent_t) where given, against the
  // deadline; aborts and throws on timeout/error.
  void finish(const char* op, void* stream = nullptr, void* event = nullptr);
  void* side_stream();  // the communication stream (a cudaStream_t), created on first use

  std::unique_ptr<NcclState> state_;
  double timeout_s_;
};

}  // namespace moetrain::parallel
