// Test program for the control plane and the node-local rank under mpirun (tests/parallel/control_test.sh):
//   control_probe agree          every agreement once; prints "rank R local L of S stop S busy B same X gathered N"
//   control_probe hang R T       rank R never arrives at the vote; the others must fail within T s (CommError)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <thread>

#include <fmt/format.h>

#include "config/config.h"
#include "parallel/mpi_runtime.h"
#include "parallel/process_groups.h"
#include "trainer/preemption.h"

using namespace moetrain;

int main(int argc, char** argv) {
  parallel::MpiRuntime mpi(&argc, &argv);
  const std::string mode = argc > 1 ? argv[1] : "agree";
  std::optional<std::string> error;
  try {
    config::ParallelConfig p;
    p.pp = 1;
    p.dp = mpi.size();
    p.world_size = mpi.size();
    p.comm_timeout_s = mode == "hang" && argc > 3 ? std::atof(argv[3]) : 30.0;
    parallel::ProcessGroups g = parallel::ProcessGroups::create(p, parallel::Backend::kMpi);
    parallel::ControlPlane& control = *g.control;
    if (mode == "agree") {
      // Rank 1 received a stop signal; only the last rank's writer is still busy.
      const trainer::StepVote v =
          trainer::vote(control, g.rank == 1, /*out_of_time_here=*/false, g.rank == mpi.size() - 1);
      const bool same = control.same_everywhere(42);
      const bool differ = control.same_everywhere(static_cast<uint64_t>(g.rank));
      const auto all = control.gather(fmt::format("r{}", g.rank));
      std::string joined;
      for (const auto& s : all) joined += s;
      std::printf("rank %lld local %lld of %lld stop %d writers_done %d same %d differ %d gathered %s\n",
                  static_cast<long long>(g.rank), static_cast<long long>(g.local_rank),
                  static_cast<long long>(g.local_size), v.stop, v.writers_done, same, !differ, joined.c_str());
      std::fflush(stdout);
    } else if (mode == "hang") {
      const int hang_rank = argc > 2 ? std::atoi(argv[2]) : 1;
      if (g.rank == hang_rank) std::this_thread::sleep_for(std::chrono::seconds(60));
      trainer::vote(control, false, false, false);
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  return mpi.finish(error, 5.0, 5.0);
}
