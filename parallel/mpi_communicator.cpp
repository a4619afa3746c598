#include "parallel/mpi_communicator.h"

#include <ATen/ops/empty.h>
#include <fmt/format.h>

#include "parallel/liveness.h"

#include <algorithm>
#include <chrono>
#include <thread>

namespace moetrain::parallel {

MPI_Datatype mpi_type(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kLong: return MPI_INT64_T;
    case at::kInt: return MPI_INT32_T;
    case at::kBFloat16:
    case at::kHalf: return MPI_UINT16_T;  // moved as raw 16-bit words, never reduced
    case at::kByte:
    case at::kChar:
    case at::kBool: return MPI_BYTE;
    default: break;
  }
  throw CommError(fmt::format("MPI backend: unsupported dtype {}", c10::toString(t)));
}

namespace {
MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return MPI_SUM;
    case ReduceOp::kMax: return MPI_MAX;
    case ReduceOp::kMin: return MPI_MIN;
  }
  return MPI_SUM;
}

void require_cpu_contiguous(const at::Tensor& t, const char* op) {
  if (!t.device().is_cpu() || !t.is_contiguous())
    throw CommError(fmt::format("MPI backend {}: needs a contiguous CPU tensor", op));
}
}  // namespace

MpiCommunicator::MpiCommunicator(std::string name, MPI_Comm parent, const std::vector<int64_t>& members,
                                 int world_rank, double timeout_s)
    : Communicator(std::move(name), 0, 1, world_rank), timeout_s_(timeout_s) {
  // Color: the group's first world rank (groups of one kind are disjoint); no group: MPI_UNDEFINED.
  int color = members.empty() ? MPI_UNDEFINED : static_cast<int>(members.front());
  int key = 0;
  for (size_t i = 0; i < members.size(); ++i)
    if (members[i] == world_rank) key = static_cast<int>(i);
  check(MPI_Comm_split(parent, color, key, &comm_), "comm_split");
  if (comm_ != MPI_COMM_NULL) {
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_);
}

void MpiCommunicator::check(int rc, const char* op) const {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw CommError(fmt::format("{} on group {} (rank {} of {}, world rank {}) failed: {}", op, name_, rank_, size_,
                              world_rank_, std::string(text, static_cast<size_t>(len))));
}

void MpiCommunicator::wait(MPI_Request& request, const char* op) {
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + std::chrono::duration<double>(timeout_s_);
  int done = 0;
  for (int spins = 0;; ++spins) {
    check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), op);
    if (done) {
      waited_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      return;
    }
    if (std::chrono::steady_clock::now() > deadline)
      throw CommError(fmt::format("{} on group {} (rank {} of {}, world rank {}) did not finish within {:.0f} s "
                                  "(parallel.comm_timeout_s){}",
                                  op, name_, rank_, size_, world_rank_, timeout_s_,
                                  liveness::explain_timeout(std::min(10.0, timeout_s_))));
    if (spins > 1000) {
      liveness::answer();  // a peer that timed out asks who is alive
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

// A started collective: its request, tested or waited for through the communicator (timeout, liveness).
class MpiPendingOp final : public PendingOp {
 public:
  MpiPendingOp(MpiCommunicator* comm, const char* op) : comm_(comm), op_(op) {}
  bool test() override {
    if (!done_) {
      int flag = 0;
      comm_->check(MPI_Test(&request, &flag, MPI_STATUS_IGNORE), op_);
      done_ = flag != 0;
    }
    return done_;
  }
  void wait() override {
    if (!done_) comm_->wait(request, op_);
    done_ = true;
  }
  void finished() { done_ = true; }  // nothing was started (a group of one)

  MPI_Request request = MPI_REQUEST_NULL;
  std::vector<std::vector<int>> counts;  // an all-to-all's counts and displacements, alive until it finished
  at::Tensor send;                       // the send buffer of an all-to-all or a send

 private:
  MpiCommunicator* comm_;
  const char* op_;
  bool done_ = false;
};

std::unique_ptr<PendingOp> MpiCommunicator::start_all_reduce(at::Tensor& t, ReduceOp op) {
  RECORD_USER_SCOPE(trace_name("all-reduce"));
  require_cpu_contiguous(t, "all_reduce");
  count("all_reduce", static_cast<int64_t>(t.nbytes()));
  auto pending = std::make_unique<MpiPendingOp>(this, "all_reduce");
  if (size_ == 1) {
    pending->finished();
    return pending;
  }
  check(MPI_Iallreduce(MPI_IN_PLACE, t.data_ptr(), static_cast<int>(t.numel()), mpi_type(t.scalar_type()), mpi_op(op),
                       comm_, &pending->request),
        "all_reduce");
  return pending;
}

void MpiCommunicator::all_reduce(at::Tensor& t, ReduceOp op) { start_all_reduce(t, op)->wait(); }

std::unique_ptr<PendingOp> MpiCommunicator::start_reduce_scatter_in_place(at::Tensor& whole) {
  RECORD_USER_SCOPE(trace_name("reduce-scatter"));
  require_cpu_contiguous(whole, "reduce_scatter");
  const int64_t part = in_place_parts(whole, "reduce_scatter");
  auto pending = std::make_unique<MpiPendingOp>(this, "reduce_scatter");
  if (size_ == 1) {
    pending->finished();
    return pending;
  }
  // In place: the input is the whole buffer, this rank's part of the sum lands at its start.
  check(MPI_Ireduce_scatter_block(MPI_IN_PLACE, whole.data_ptr(), static_cast<int>(part),
                                  mpi_type(whole.scalar_type()), MPI_SUM, comm_, &pending->request),
        "reduce_scatter");
  return pending;
}

std::unique_ptr<PendingOp> MpiCommunicator::start_all_gather_in_place(at::Tensor& whole) {
  RECORD_USER_SCOPE(trace_name("all-gather"));
  require_cpu_contiguous(whole, "all_gather");
  const int64_t part = in_place_parts(whole, "all_gather");
  auto pending = std::make_unique<MpiPendingOp>(this, "all_gather");
  if (size_ == 1) {
    pending->finished();
    return pending;
  }
  // MPI_IN_PLACE: this rank's contribution is already at its place in the receive buffer.
  check(MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, whole.data_ptr(), static_cast<int>(part),
                       mpi_type(whole.scalar_type()), comm_, &pending->request),
        "all_gather");
  return pending;
}

std::unique_ptr<PendingOp> MpiCommunicator::start_all_to_all_v(const at::Tensor& t,
                                                               const std::vector<int64_t>& send_rows,
                                                               const std::vector<int64_t>& recv_rows, at::Tensor& out) {
  RECORD_USER_SCOPE(trace_name("all-to-all"));
  require_cpu_contiguous(t, "all_to_all_v");
  const int64_t row = t.dim() > 0 && t.size(0) > 0 ? t.numel() / t.size(0) : [&] {
    int64_t n = 1;
    for (int64_t i = 1; i < t.dim(); ++i) n *= t.size(i);
    return n;
  }();
  std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
  int64_t s_off = 0, r_off = 0, total_recv = 0;
  for (int i = 0; i < size_; ++i) {
    sc[i] = static_cast<int>(send_rows[i] * row);
    sd[i] = static_cast<int>(s_off);
    rc[i] = static_cast<int>(recv_rows[i] * row);
    rd[i] = static_cast<int>(r_off);
    s_off += send_rows[i] * row;
    r_off += recv_rows[i] * row;
    total_recv += recv_rows[i];
  }
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape[0] = total_recv;
  out = at::empty(shape, t.options());
  count("all_to_all_v", (s_off - send_rows[rank_] * row) * static_cast<int64_t>(t.element_size()));
  auto pending = std::make_unique<MpiPendingOp>(this, "all_to_all_v");
  MPI_Datatype type = mpi_type(t.scalar_type());
  // The counts, displacements and send buffer must stay valid until the operation completes: they travel with it.
  pending->counts = {std::move(sc), std::move(sd), std::move(rc), std::move(rd)};
  pending->send = t;
  auto& v = pending->counts;
  check(MPI_Ialltoallv(t.data_ptr(), v[0].data(), v[1].data(), type, out.data_ptr(), v[2].data(), v[3].data(), type,
                       comm_, &pending->request),
        "all_to_all_v");
  return pending;
}

at::Tensor MpiCommunicator::all_to_all_v(const at::Tensor& t, const std::vector<int64_t>& send_rows,
                                         const std::vector<int64_t>& recv_rows) {
  at::Tensor out;
  start_all_to_all_v(t, send_rows, recv_rows, out)->wait();
  return out;
}

std::unique_ptr<PendingOp> MpiCommunicator::start_send(const at::Tensor& t, int dst, int tag) {
  RECORD_USER_SCOPE(trace_name("send"));
  require_cpu_contiguous(t, "send");
  count("send", static_cast<int64_t>(t.nbytes()));
  auto pending = std::make_unique<MpiPendingOp>(this, "send");
  pending->send = t;
  check(MPI_Isend(t.data_ptr(), static_cast<int>(t.numel()), mpi_type(t.scalar_type()), dst, tag, comm_,
                  &pending->request),
        "send");
  return pending;
}

void MpiCommunicator::send(const at::Tensor& t, int dst, int tag) { start_send(t, dst, tag)->wait(); }

void MpiCommunicator::recv(at::Tensor& t, int src, int tag) {
  RECORD_USER_SCOPE(trace_name("recv"));
  require_cpu_contiguous(t, "recv");
  MPI_Request r;
  check(MPI_Irecv(t.data_ptr(), static_cast<int>(t.numel()), mpi_type(t.scalar_type()), src, tag, comm_, &r), "recv");
  wait(r, "recv");
}

void MpiCommunicator::send_recv(const at::Tensor& out, int dst, int send_tag, at::Tensor& in, int src,
                                int recv_tag) {
  RECORD_USER_SCOPE(trace_name("send+recv"));
  require_cpu_contiguous(out, "send_recv");
  require_cpu_contiguous(in, "send_recv");
  count("send", static_cast<int64_t>(out.nbytes()));
  MPI_Request r[2];
  check(MPI_Isend(out.data_ptr(), static_cast<int>(out.numel()), mpi_type(out.scalar_type()), dst, send_tag, comm_,
                  &r[0]),
        "send_recv");
  check(MPI_Irecv(in.data_ptr(), static_cast<int>(in.numel()), mpi_type(in.scalar_type()), src, recv_tag, comm_, &r[1]),
        "send_recv");
  wait(r[1], "send_recv");
  wait(r[0], "send_recv");
}

std::vector<std::string> MpiCommunicator::gather_strings(const std::string& mine) {
  int len = static_cast<int>(mine.size());
  std::vector<int> lens(static_cast<size_t>(size_));
  MPI_Request r;
  check(MPI_Igather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, 0, comm_, &r), "gather");
  wait(r, "gather");
  std::vector<int> offsets(static_cast<size_t>(size_), 0);
  int total = 0;
  for (size_t i = 0; i < lens.size(); ++i) {
    offsets[i] = total;
    total += lens[i];
  }
  std::string all(rank_ == 0 ? static_cast<size_t>(total) : 0, '\0');
  count("gather", len);
  check(MPI_Igatherv(mine.data(), len, MPI_CHAR, all.data(), lens.data(), offsets.data(), MPI_CHAR, 0, comm_, &r),
        "gather");
  wait(r, "gather");
  std::vector<std::string> out;
  if (rank_ == 0)
    for (size_t i = 0; i < lens.size(); ++i)
      out.push_back(all.substr(static_cast<size_t>(offsets[i]), static_cast<size_t>(lens[i])));
  return out;
}

void MpiCommunicator::barrier() {
  RECORD_USER_SCOPE(trace_name("barrier"));
  MPI_Request r;
  check(MPI_Ibarrier(comm_, &r), "barrier");
  wait(r, "barrier");
}

}  // namespace moetrain::parallel
