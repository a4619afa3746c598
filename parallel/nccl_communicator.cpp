#include "parallel/nccl_communicator.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <fmt/format.h>
#include <nccl.h>

#include "parallel/liveness.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <optional>
#include <thread>

namespace moetrain::parallel {

struct NcclState {
  ncclComm_t comm = nullptr;
  // The communication stream, created for this communicator alone and never destroyed (as LibTorch's pool streams
  // are not): the caching allocator records an event on it when a tensor used there is freed, maybe later.
  std::optional<c10::cuda::CUDAStream> side;
};

namespace {

ncclDataType_t nccl_type(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kLong: return ncclInt64;
    case at::kInt: return ncclInt32;
    case at::kBFloat16: return ncclBfloat16;
    case at::kHalf: return ncclFloat16;
    case at::kByte:
    case at::kBool: return ncclUint8;
    case at::kChar: return ncclInt8;
    default: break;
  }
  throw CommError(fmt::format("NCCL backend: unsupported dtype {}", c10::toString(t)));
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
  }
  return ncclSum;
}

void require_cuda(const at::Tensor& t, const char* op) {
  if (!t.is_cuda() || !t.is_contiguous())
    throw CommError(fmt::format("NCCL backend {}: needs a contiguous CUDA tensor", op));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// An NCCL group (ncclGroupStart … ncclGroupEnd) that is closed on every way out: an operation inside it that throws
// would otherwise leave this thread's group open, and every later NCCL call would be deferred into it.
class NcclGroup {
 public:
  NcclGroup() : rc_(ncclGroupStart()) {}
  ~NcclGroup() {
    if (open()) ncclGroupEnd();
  }
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;
  ncclResult_t started() const { return rc_; }
  ncclResult_t end() {
    ended_ = true;
    return ncclGroupEnd();
  }

 private:
  bool open() const { return rc_ == ncclSuccess && !ended_; }
  ncclResult_t rc_;
  bool ended_ = false;
};

}  // namespace

NcclCommunicator::NcclCommunicator(std::string name, MPI_Comm mpi_group, int world_rank, double timeout_s)
    : Communicator(std::move(name), 0, 1, world_rank), state_(std::make_unique<NcclState>()), timeout_s_(timeout_s) {
  MPI_Comm_rank(mpi_group, &rank_);
  MPI_Comm_size(mpi_group, &size_);
  ncclUniqueId id;
  if (rank_ == 0 && ncclGetUniqueId(&id) != ncclSuccess)
    throw CommError(fmt::format("ncclGetUniqueId failed for group {} (world rank {})", name_, world_rank_));
  MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, mpi_group);
  ncclResult_t rc = ncclCommInitRank(&state_->comm, size_, id, rank_);
  if (rc != ncclSuccess)
    throw CommError(fmt::format("ncclCommInitRank for group {} (rank {} of {}, world rank {}) failed: {}", name_,
                                rank_, size_, world_rank_, ncclGetErrorString(rc)));
  barrier();  // warm the communicator now: a broken setup fails at start-up
}

// ncclCommDestroy may block while an operation of the communicator is unfinished (NCCL's user guide,
// "Destroying a communicator"), and one whose peer failed never finishes. So a communicator destroyed while
// unwinding from an error, or with work still queued on its streams (a ZeRO-1 gather that ~GradSync left in
// flight) or a CUDA error on them, is aborted instead: ncclCommAbort ends its operations and returns.
NcclCommunicator::~NcclCommunicator() {
  if (!state_ || !state_->comm) return;
  const auto busy = [](cudaStream_t s) { return cudaStreamQuery(s) != cudaSuccess; };  // or failed
  if (std::uncaught_exceptions() > 0 || busy(stream()) || (state_->side && busy(state_->side->stream())))
    ncclCommAbort(state_->comm);
  else
    ncclCommDestroy(state_->comm);
}

void NcclCommunicator::finish(const char* op, void* on, void* event) {
  cudaStream_t s = on ? static_cast<cudaStream_t>(on) : stream();
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + std::chrono::duration<double>(timeout_s_);
  for (;;) {
    const cudaError_t q = event ? cudaEventQuery(static_cast<cudaEvent_t>(event)) : cudaStreamQuery(s);
    if (q == cudaSuccess) {
      waited_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      return;
    }
    if (q != cudaErrorNotReady)
      throw CommError(fmt::format("{} on group {} (rank {} of {}, world rank {}): CUDA error {}", op, name_, rank_,
                                  size_, world_rank_, cudaGetErrorString(q)));
    ncclResult_t async = ncclSuccess;
    ncclCommGetAsyncError(state_->comm, &async);
    const bool late = std::chrono::steady_clock::now() > deadline;
    if (async != ncclSuccess || late) {
      ncclCommAbort(state_->comm);
      state_->comm = nullptr;
      throw CommError(fmt::format("{} on group {} (rank {} of {}, world rank {}) {}", op, name_, rank_, size_,
                                  world_rank_,
                                  late ? fmt::format("did not finish within {:.0f} s (parallel.comm_timeout_s){}",
                                                     timeout_s_, liveness::explain_timeout(std::min(10.0, timeout_s_)))
                                       : fmt::format("failed: {}", ncclGetErrorString(async))));
    }
    liveness::answer();  // a peer that timed out asks who is alive
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

#define MOETRAIN_NCCL(call, op)                                                                              \
  do {                                                                                                       \
    ncclResult_t rc_ = (call);                                                                               \
    if (rc_ != ncclSuccess)                                                                                  \
      throw CommError(fmt::format("{} on group {} (rank {} of {}, world rank {}) failed: {}", op, name_, rank_, \
                                  size_, world_rank_, ncclGetErrorString(rc_)));                             \
  } while (0)

void NcclCommunicator::all_reduce(at::Tensor& t, ReduceOp op) {
  RECORD_USER_SCOPE(trace_name("all-reduce"));
  require_cuda(t, "all_reduce");
  count("all_reduce", static_cast<int64_t>(t.nbytes()));
  MOETRAIN_NCCL(ncclAllReduce(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()), nccl_type(t.scalar_type()),
                              nccl_op(op), state_->comm, stream()),
                "all_reduce");
  finish("all_reduce");
}

// A stream of the communicator's own, not one of LibTorch's pool (which hands its 32 streams out in turn): two
// communicators sharing one would order their operations against each other, sends of two pipeline channels
// among them.
void* NcclCommunicator::side_stream() {
  if (!state_->side) {
    int least = 0, greatest = 0;
    cudaDeviceGetStreamPriorityRange(&least, &greatest);
    cudaStream_t s = nullptr;
    const cudaError_t rc = cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest);
    if (rc != cudaSuccess)
      throw CommError(fmt::format("group {}: cannot create its CUDA stream: {}", name_, cudaGetErrorString(rc)));
    int device = 0;
    cudaGetDevice(&device);
    state_->side = c10::cuda::getStreamFromExternal(s, static_cast<c10::DeviceIndex>(device));
  }
  return state_->side->stream();
}

// A collective on the communication stream: started after the current stream's queued work (an event), finished
// when its own end event is (every start_* records it with enqueued() right after the operation, so that later
// operations on that stream — the other buckets' — are not waited for); wait() makes the current stream wait for
// that event in turn.
class NcclPendingOp final : public PendingOp {
 public:
  NcclPendingOp(NcclCommunicator* comm, const char* op) : comm_(comm), op_(op) {
    side_ = static_cast<cudaStream_t>(comm->side_stream());
    cudaEvent_t ready;
    cudaEventCreateWithFlags(&ready, cudaEventDisableTiming);
    cudaEventRecord(ready, stream());
    cudaStreamWaitEvent(side_, ready, 0);
    cudaEventDestroy(ready);  // released once the wait is satisfied
    cudaEventCreateWithFlags(&end_, cudaEventDisableTiming);
  }
  ~NcclPendingOp() override { cudaEventDestroy(end_); }  // released once complete
  NcclPendingOp(const NcclPendingOp&) = delete;
  NcclPendingOp& operator=(const NcclPendingOp&) = delete;
  cudaStream_t side() const { return side_; }
  // t is used on the side stream: the caching allocator must not hand its memory out again before the side stream
  // is past this operation, even when t is freed earlier.
  void keep(const at::Tensor& t) {
    if (t.numel() > 0)
      c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), *comm_->state_->side);
  }
  void enqueued() { cudaEventRecord(end_, side_); }  // the operation is on the side stream
  bool test() override {
    if (!done_ && cudaEventQuery(end_) == cudaSuccess) wait();
    return done_;
  }
  void wait() override {
    if (done_) return;
    comm_->finish(op_, side_, end_);
    cudaStreamWaitEvent(stream(), end_, 0);
    done_ = true;
  }

 private:
  NcclCommunicator* comm_;
  const char* op_;
  cudaStream_t side_;
  cudaEvent_t end_ = nullptr;
  bool done_ = false;
};

std::unique_ptr<PendingOp> NcclCommunicator::start_all_reduce(at::Tensor& t, ReduceOp op) {
  RECORD_USER_SCOPE(trace_name("all-reduce"));
  require_cuda(t, "all_reduce");
  count("all_reduce", static_cast<int64_t>(t.nbytes()));
  auto pending = std::make_unique<NcclPendingOp>(this, "all_reduce");
  MOETRAIN_NCCL(ncclAllReduce(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()), nccl_type(t.scalar_type()),
                              nccl_op(op), state_->comm, pending->side()),
                "all_reduce");
  pending->enqueued();
  return pending;
}

std::unique_ptr<PendingOp> NcclCommunicator::start_reduce_scatter_in_place(at::Tensor& whole) {
  RECORD_USER_SCOPE(trace_name("reduce-scatter"));
  require_cuda(whole, "reduce_scatter");
  const int64_t part = in_place_parts(whole, "reduce_scatter");
  auto pending = std::make_unique<NcclPendingOp>(this, "reduce_scatter");
  // NCCL's in place: the output is this rank's own part of the input.
  auto* base = static_cast<char*>(whole.data_ptr());
  MOETRAIN_NCCL(ncclReduceScatter(base, base + part * rank_ * static_cast<int64_t>(whole.element_size()),
                                  static_cast<size_t>(part), nccl_type(whole.scalar_type()), ncclSum, state_->comm,
                                  pending->side()),
                "reduce_scatter");
  pending->enqueued();
  return pending;
}

std::unique_ptr<PendingOp> NcclCommunicator::start_all_gather_in_place(at::Tensor& whole) {
  RECORD_USER_SCOPE(trace_name("all-gather"));
  require_cuda(whole, "all_gather");
  const int64_t part = in_place_parts(whole, "all_gather");
  auto pending = std::make_unique<NcclPendingOp>(this, "all_gather");
  // NCCL's in place: the input is this rank's own part of the output.
  auto* base = static_cast<char*>(whole.data_ptr());
  MOETRAIN_NCCL(ncclAllGather(base + part * rank_ * static_cast<int64_t>(whole.element_size()), base,
                              static_cast<size_t>(part), nccl_type(whole.scalar_type()), state_->comm,
                              pending->side()),
                "all_gather");
  pending->enqueued();
  return pending;
}

std::unique_ptr<PendingOp> NcclCommunicator::start_all_to_all_v(const at::Tensor& t,
                                                                const std::vector<int64_t>& send_rows,
                                                                const std::vector<int64_t>& recv_rows,
                                                                at::Tensor& out) {
  RECORD_USER_SCOPE(trace_name("all-to-all"));
  require_cuda(t, "all_to_all_v");
  int64_t row = 1;
  for (int64_t i = 1; i < t.dim(); ++i) row *= t.size(i);
  int64_t total_recv = 0;
  for (int64_t r : recv_rows) total_recv += r;
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape[0] = total_recv;
  out = at::empty(shape, t.options());
  auto pending = std::make_unique<NcclPendingOp>(this, "all_to_all_v");
  // Both buffers are used on the communication stream: the caching allocator must not reuse them before it is done.
  pending->keep(t);
  pending->keep(out);
  const auto type = nccl_type(t.scalar_type());
  const size_t elem = static_cast<size_t>(t.element_size());
  auto* send_base = static_cast<char*>(t.data_ptr());
  auto* recv_base = static_cast<char*>(out.data_ptr());
  int64_t s_off = 0, r_off = 0, sent = 0;
  NcclGroup group;
  MOETRAIN_NCCL(group.started(), "all_to_all_v");
  for (int peer = 0; peer < size_; ++peer) {
    const size_t sn = static_cast<size_t>(send_rows[peer] * row), rn = static_cast<size_t>(recv_rows[peer] * row);
    // Zero-sized sends and receives are still issued: every pair of ranks takes part in every exchange.
    MOETRAIN_NCCL(ncclSend(send_base + s_off * elem, sn, type, peer, state_->comm, pending->side()), "all_to_all_v");
    MOETRAIN_NCCL(ncclRecv(recv_base + r_off * elem, rn, type, peer, state_->comm, pending->side()), "all_to_all_v");
    s_off += static_cast<int64_t>(sn);
    r_off += static_cast<int64_t>(rn);
    if (peer != rank_) sent += static_cast<int64_t>(sn * elem);
  }
  MOETRAIN_NCCL(group.end(), "all_to_all_v");
  pending->enqueued();
  count("all_to_all_v", sent);
  return pending;
}

at::Tensor NcclCommunicator::all_to_all_v(const at::Tensor& t, const std::vector<int64_t>& send_rows,
                                          const std::vector<int64_t>& recv_rows) {
  at::Tensor out;
  start_all_to_all_v(t, send_rows, recv_rows, out)->wait();
  return out;
}

// On the group's communication stream, after the work queued so far on the current stream, and not waited for by
// it. A send holds up its stream until the peer receives (NCCL: point-to-point operations are "blocking for the
// GPU"), and the interleaved and DualPipeV schedules queue receives behind their sends: on the compute stream, two
// neighbours' sends would each wait for a receive queued behind the other's send, for ever, once a message is too
// large for NCCL's buffers (DeepSeek-V3's activations are). Their pipeline channels are communicators of their own
// (one direction each), so a channel's sends keep their order on its stream while the receives go on.
std::unique_ptr<PendingOp> NcclCommunicator::start_send(const at::Tensor& t, int dst, int tag) {
  RECORD_USER_SCOPE(trace_name("send"));
  require_cuda(t, "send");
  count("send", static_cast<int64_t>(t.nbytes()));
  auto pending = std::make_unique<NcclPendingOp>(this, "send");
  pending->keep(t);
  MOETRAIN_NCCL(ncclSend(t.data_ptr(), static_cast<size_t>(t.numel()), nccl_type(t.scalar_type()), dst, state_->comm,
                         pending->side()),
                "send");
  pending->enqueued();
  return pending;
}

void NcclCommunicator::send(const at::Tensor& t, int dst, int tag) { start_send(t, dst, tag)->wait(); }

void NcclCommunicator::recv(at::Tensor& t, int src, int tag) {
  RECORD_USER_SCOPE(trace_name("recv"));
  require_cuda(t, "recv");
  MOETRAIN_NCCL(ncclRecv(t.data_ptr(), static_cast<size_t>(t.numel()), nccl_type(t.scalar_type()), src, state_->comm,
                         stream()),
                "recv");
  finish("recv");
}

void NcclCommunicator::send_recv(const at::Tensor& out, int dst, int send_tag, at::Tensor& in, int src,
                                 int recv_tag) {
  RECORD_USER_SCOPE(trace_name("send+recv"));
  require_cuda(out, "send_recv");
  require_cuda(in, "send_recv");
  count("send", static_cast<int64_t>(out.nbytes()));
  NcclGroup group;
  MOETRAIN_NCCL(group.started(), "send_recv");
  MOETRAIN_NCCL(ncclSend(out.data_ptr(), static_cast<size_t>(out.numel()), nccl_type(out.scalar_type()), dst,
                         state_->comm, stream()),
                "send_recv");
  MOETRAIN_NCCL(ncclRecv(in.data_ptr(), static_cast<size_t>(in.numel()), nccl_type(in.scalar_type()), src,
                         state_->comm, stream()),
                "send_recv");
  MOETRAIN_NCCL(group.end(), "send_recv");
  finish("send_recv");
}

void NcclCommunicator::barrier() {
  RECORD_USER_SCOPE(trace_name("barrier"));
  int device = 0;
  cudaGetDevice(&device);
  at::Tensor one = at::ones({1}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device));
  MOETRAIN_NCCL(ncclAllReduce(one.data_ptr(), one.data_ptr(), 1, ncclFloat32, ncclSum, state_->comm, stream()),
                "barrier");
  finish("barrier");
}

}  // namespace moetrain::parallel
