// Test program for MpiRuntime::finish under mpirun:
//   mpi_finish_probe FAIL_RANK [HANG_RANK] [TIMEOUT_S]
// FAIL_RANK ends with an error (-1: none); HANG_RANK never reaches finish (it sleeps), so the others must not wait
// for it forever. Prints "rank R exit C" for each rank that returns.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <thread>

#include "parallel/mpi_runtime.h"

int main(int argc, char** argv) {
  moetrain::parallel::MpiRuntime mpi(&argc, &argv);
  int fail_rank = argc > 1 ? std::atoi(argv[1]) : -1;
  int hang_rank = argc > 2 ? std::atoi(argv[2]) : -1;
  double timeout = argc > 3 ? std::atof(argv[3]) : 30.0;
  int rank = mpi.rank();
  if (rank == hang_rank) std::this_thread::sleep_for(std::chrono::seconds(120));
  std::optional<std::string> error;
  if (rank == fail_rank) error = "probe failure on purpose";
  int code = mpi.finish(error, timeout, timeout);
  std::printf("rank %d exit %d\n", rank, code);
  std::fflush(stdout);
  return code;
}
