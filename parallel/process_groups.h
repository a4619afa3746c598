// The communicators of one rank, created once at start-up from the layout (parallel/topology.h): world, pp, dp,
// ep, edp and embedding (first and last stage of a dp slice; absent on middle stages). Every group is warmed with
// a barrier at creation. CPU runs use the MPI backend, CUDA runs the NCCL backend bootstrapped over MPI. Besides
// them, the control plane (parallel/control_plane.h): a CPU communicator of the world for small agreements.
#pragma once

#include <map>
#include <tuple>

#include "parallel/pipeline.h"

#include <memory>
#include <string>

#include <c10/core/Device.h>

#include "config/config.h"
#include "parallel/communicator.h"
#include "parallel/control_plane.h"
#include "parallel/topology.h"

namespace moetrain::parallel {

enum class Backend { kMpi, kNccl };

struct ProcessGroups {
  Topology topology{Layout{}};
  int64_t rank = 0;
  Coords coords;
  // This rank among the ranks of its node (MPI_COMM_TYPE_SHARED): right under mpirun, srun and any placement.
  int64_t local_rank = 0, local_size = 1;
  std::unique_ptr<Communicator> world, pp, dp, ep, edp, embedding;
  // The ep group's backward lane (parallel/expert_exchange.h): DualPipeV with overlapped chunk pairs only.
  std::unique_ptr<Communicator> ep_backward;
  // The interleaved and DualPipeV schedules' pipeline channels (parallel/pipeline.h): for each (kind, from pp rank,
  // to pp rank) a transfer takes, a communicator of this dp slice's two ranks there, the sender first.
  std::map<std::tuple<char, int64_t, int64_t>, std::unique_ptr<Communicator>> pp_channels;
  PipelineChannels channels() const;  // a lookup into pp_channels (null where none)
  std::unique_ptr<ControlPlane> control;

  // The seconds this rank has spent blocked on the data plane's groups (Communicator::waited_s), summed.
  double waited_s() const;

  // Collective over MPI_COMM_WORLD: every rank calls it. Requires MPI to be initialized with pp·dp ranks. With the
  // NCCL backend it first makes this rank's GPU current (use_cuda_device), and refuses two ranks of a node on one GPU
  // (NCCL wants a GPU of its own for every rank), comparing the GPUs' PCI addresses.
  static ProcessGroups create(const config::ParallelConfig& p, Backend backend);
};

// GPU local_rank mod the visible devices, made the current CUDA device of this process: NCCL's communicators, the
// current streams and whatever runs without naming a device follow it. Throws "<asked_by> but no CUDA device is
// visible" when there is none.
c10::Device use_cuda_device(int64_t local_rank, const std::string& asked_by);

}  // namespace moetrain::parallel
