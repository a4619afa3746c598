// The MPI backend of Communicator, for CPU tensors: non-blocking MPI calls polled against a deadline.
#pragma once

#include <mpi.h>

#include "parallel/communicator.h"

namespace moetrain::parallel {

class MpiCommunicator final : public Communicator {
 public:
  // Splits the group containing this rank out of `parent` (every rank of parent calls this with its own group's
  // ranks, in the same order). `members`: world ranks of this rank's group; empty: this rank takes part in the
  // split but belongs to no group (the result is then unusable).
  MpiCommunicator(std::string name, MPI_Comm parent, const std::vector<int64_t>& members, int world_rank,
                  double timeout_s);
  ~MpiCommunicator() override;

  void all_reduce(at::Tensor& t, ReduceOp op) override;
  std::unique_ptr<PendingOp> start_all_reduce(at::Tensor& t, ReduceOp op) override;
  std::unique_ptr<PendingOp> start_reduce_scatter_in_place(at::Tensor& whole) override;
  int in_place_part() const override { return 0; }
  std::unique_ptr<PendingOp> start_all_gather_in_place(at::Tensor& whole) override;
  at::Tensor all_to_all_v(const at::Tensor& t, const std::vector<int64_t>& send_rows,
                          const std::vector<int64_t>& recv_rows) override;
  std::unique_ptr<PendingOp> start_all_to_all_v(const at::Tensor& t, const std::vector<int64_t>& send_rows,
                                                const std::vector<int64_t>& recv_rows, at::Tensor& out) override;
  void send(const at::Tensor& t, int dst, int tag) override;
  std::unique_ptr<PendingOp> start_send(const at::Tensor& t, int dst, int tag) override;
  void recv(at::Tensor& t, int src, int tag) override;
  void send_recv(const at::Tensor& out, int dst, int send_tag, at::Tensor& in, int src, int recv_tag) override;
  void barrier() override;
  // Every rank's string on rank 0 of the group, in rank order (the other ranks get an empty vector).
  std::vector<std::string> gather_strings(const std::string& mine);

  bool valid() const { return comm_ != MPI_COMM_NULL; }
  MPI_Comm native() const { return comm_; }

 private:
  friend class MpiPendingOp;
  void wait(MPI_Request& request, const char* op);
  void check(int rc, const char* op) const;

  MPI_Comm comm_ = MPI_COMM_NULL;
  double timeout_s_;
};

MPI_Datatype mpi_type(c10::ScalarType t);

}  // namespace moetrain::parallel
