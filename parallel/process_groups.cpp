#include "parallel/process_groups.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <fmt/format.h>
#include <mpi.h>
#include <torch/cuda.h>

#include <algorithm>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "parallel/mpi_communicator.h"
#include "moetrain/build_info.h"
#if MOETRAIN_WITH_CUDA
#include <ATen/cuda/CUDAContextLight.h>

#include <array>

#include "parallel/nccl_communicator.h"
#endif

namespace moetrain::parallel {
namespace {

// A group over MPI, warmed with a barrier: a broken group fails here, not at the first step. Null for a rank that
// belongs to no group of this kind.
std::unique_ptr<MpiCommunicator> make_mpi(const char* name, const std::vector<int64_t>& members, int world_rank,
                                          double timeout) {
  auto mpi = std::make_unique<MpiCommunicator>(name, MPI_COMM_WORLD, members, world_rank, timeout);
  if (!mpi->valid()) return nullptr;
  mpi->barrier();
  return mpi;
}

std::unique_ptr<Communicator> make(const char* name, const std::vector<int64_t>& members, int world_rank,
                                   double timeout, Backend backend) {
  if (backend == Backend::kMpi) return make_mpi(name, members, world_rank, timeout);
  auto mpi = std::make_unique<MpiCommunicator>(name, MPI_COMM_WORLD, members, world_rank, timeout);
  if (!mpi->valid()) return nullptr;
#if MOETRAIN_WITH_CUDA
  return std::make_unique<NcclCommunicator>(name, mpi->native(), world_rank, timeout);
#else
  throw CommError("the NCCL backend needs a CUDA build of moetrain (this one is CPU-only)");
#endif
}

#if MOETRAIN_WITH_CUDA
// NCCL wants a GPU of its own for every rank (ncclCommInitRank refuses two ranks of one communicator on one GPU).
// This rank's GPU is made current (use_cuda_device: local rank mod the GPUs it sees, which under Slurm's per-task
// binding may be just its own), then the ranks of the node compare their GPUs' PCI addresses: two ranks on one GPU
// are refused by name on every rank of the node, before any communicator is created.
void use_own_gpu(MPI_Comm node, int world_rank, int local_rank, int local_size) {
  // A rank without a GPU still takes part in the exchange (PCI domain -1), so that its node's ranks all stop here.
  std::array<int, 4> mine{-1, -1, -1, world_rank};
  std::optional<std::string> error;
  try {
    const c10::Device d =
        use_cuda_device(local_rank, fmt::format("train.device = cuda (the NCCL backend, world rank {})", world_rank));
    const cudaDeviceProp* p = at::cuda::getDeviceProperties(d.index());
    mine = {p->pciDomainID, p->pciBusID, p->pciDeviceID, world_rank};
  } catch (const std::exception& e) {
    error = e.what();
  }
  std::vector<int> all(4 * static_cast<size_t>(local_size));
  if (MPI_Allgather(mine.data(), 4, MPI_INT, all.data(), 4, MPI_INT, node) != MPI_SUCCESS)
    throw CommError("MPI_Allgather over the ranks of a node failed: cannot tell their GPUs apart");
  if (error) throw std::runtime_error(*error);
  const auto gpus = torch::cuda::device_count();
  for (size_t i = 0; i < static_cast<size_t>(local_size); ++i) {  // (rank j < i had a GPU, or it was refused)
    if (all[4 * i] < 0)
      throw CommError(fmt::format("world rank {}, on the node of world rank {}, has no GPU: the NCCL backend "
                                  "(train.device = cuda) needs one for every rank",
                                  all[4 * i + 3], world_rank));
    for (size_t j = 0; j < i; ++j)
      if (std::equal(&all[4 * i], &all[4 * i + 3], &all[4 * j]))
        throw CommError(fmt::format(
            "world ranks {} and {} run on one GPU (PCI {:04x}:{:02x}:{:02x}.0; {} ranks on this node, {} GPU{} visible "
            "to world rank {}): the NCCL backend (train.device = cuda) needs a GPU of its own for every rank; launch "
            "at most as many ranks per node as it has GPUs",
            all[4 * j + 3], all[4 * i + 3], all[4 * i], all[4 * i + 1], all[4 * i + 2], local_size, gpus,
            gpus == 1 ? " is" : "s are", world_rank));
  }
}
#endif

}  // namespace

c10::Device use_cuda_device(int64_t local_rank, const std::string& asked_by) {
  const auto count = static_cast<int64_t>(torch::cuda::device_count());
  if (count == 0) throw std::runtime_error(asked_by + " but no CUDA device is visible");
  const c10::Device device(c10::kCUDA, static_cast<c10::DeviceIndex>(local_rank % count));
  c10::impl::getDeviceGuardImpl(c10::kCUDA)->setDevice(device);
  return device;
}

double ProcessGroups::waited_s() const {
  double s = 0;
  for (const auto* c : {world.get(), pp.get(), dp.get(), ep.get(), edp.get(), embedding.get(), ep_backward.get()})
    if (c) s += c->waited_s();
  for (const auto& [key, c] : pp_channels) s += c->waited_s();
  return s;
}

PipelineChannels ProcessGroups::channels() const {
  if (pp_channels.empty()) return {};
  return [this](char kind, int64_t from, int64_t to) -> Communicator* {
    auto it = pp_channels.find({kind, from, to});
    return it == pp_channels.end() ? nullptr : it->second.get();
  };
}

ProcessGroups ProcessGroups::create(const config::ParallelConfig& p, Backend backend) {
  int world_rank = 0, world_size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  ProcessGroups g;
  g.topology = Topology(Layout::from(p));
  if (g.topology.layout().world() != world_size)
    throw CommError(fmt::format("the layout needs {} ranks but {} were launched", g.topology.layout().world(),
                                world_size));
  g.rank = world_rank;
  g.coords = g.topology.coords(world_rank);
  const double t = p.comm_timeout_s;
  MPI_Comm node = MPI_COMM_NULL;
  if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank, MPI_INFO_NULL, &node) != MPI_SUCCESS)
    throw CommError("MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) failed: cannot tell the ranks of this node");
  int local_rank = 0, local_size = 1;
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_size(node, &local_size);
  struct FreeNode {
    MPI_Comm& comm;
    ~FreeNode() { MPI_Comm_free(&comm); }
  } free_node{node};
  g.local_rank = local_rank;
  g.local_size = local_size;
#if MOETRAIN_WITH_CUDA  // (a CPU-only build refuses the backend itself, below)
  if (backend == Backend::kNccl) use_own_gpu(node, world_rank, local_rank, local_size);
#endif
  std::vector<int64_t> all(static_cast<size_t>(world_size));
  for (int i = 0; i < world_size; ++i) all[static_cast<size_t>(i)] = i;
  // The same order on every rank: each split is collective over the world.
  g.control = std::make_unique<ControlPlane>(make_mpi("control", all, world_rank, t));
  g.world = make("world", all, world_rank, t, backend);
  g.pp = make("pp", g.topology.group(GroupKind::kPipeline, world_rank), world_rank, t, backend);
  g.dp = make("dp", g.topology.group(GroupKind::kData, world_rank), world_rank, t, backend);
  g.ep = make("ep", g.topology.group(GroupKind::kExpert, world_rank), world_rank, t, backend);
  g.edp = make("edp", g.topology.group(GroupKind::kExpertData, world_rank), world_rank, t, backend);
  g.embedding = make("embedding", g.topology.group(GroupKind::kEmbedding, world_rank), world_rank, t, backend);
  if (p.schedule == config::Schedule::kDualPipeV && p.overlap_chunk_pairs)
    g.ep_backward = make("ep-backward", g.topology.group(GroupKind::kExpert, world_rank), world_rank, t, backend);
  if (p.schedule != config::Schedule::k1F1B && p.pp > 1) {
    // Each direction between neighbouring virtual stages on different ranks, for activations (F) and gradients (B);
    // the same keys in the same order on every rank (each creation is collective over the world).
    const VirtualStages where = VirtualStages::from(p);
    std::set<std::tuple<char, int64_t, int64_t>> keys;
    for (int64_t j = 0; j + 1 < where.count(); ++j) {
      const int64_t a = where.home(j).first, b = where.home(j + 1).first;
      if (a == b) continue;  // the bottom of DualPipeV's V: a hand-over within the rank
      keys.insert({'F', a, b});
      keys.insert({'B', b, a});
    }
    for (const auto& [kind, from, to] : keys) {
      std::vector<int64_t> members;
      if (g.coords.pp == from || g.coords.pp == to)
        members = {g.topology.rank(from, g.coords.edp, g.coords.ep), g.topology.rank(to, g.coords.edp, g.coords.ep)};
      const std::string name = fmt::format("pp-{}-{}>{}", kind, from, to);
      if (auto comm = make(name.c_str(), members, world_rank, t, backend))
        g.pp_channels[{kind, from, to}] = std::move(comm);
    }
  }
  return g;
}

}  // namespace moetrain::parallel
