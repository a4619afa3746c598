// The MPI process environment: initialization when started by a launcher, the rank and size of the world, and
// the end of a command agreed by every rank, so that an error on any rank gives one message and a non-zero exit
// on all of them instead of a hang.
#pragma once

#include <optional>
#include <string>

namespace moetrain::parallel {

class MpiRuntime {
 public:
  // Initializes MPI when a launcher (mpirun, srun --mpi=pmix) started the process. A plain start is a world of
  // one without MPI, so `moetrain --help` and single-process commands need no launcher.
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  bool active() const { return active_; }
  int rank() const { return rank_; }
  int size() const { return size_; }

  // Ends a command on every rank. All ranks learn whether any rank failed; the lowest failing rank prints its
  // message as one line on stderr; every rank gets the same exit code (0, or 1 if any rank failed). A rank whose
  // peers do not arrive in time (error_timeout_s after an error, done_timeout_s after success) prints its
  // message and aborts the whole job.
  int finish(const std::optional<std::string>& error, double error_timeout_s = 5.0,
             double done_timeout_s = 600.0);

  [[noreturn]] void abort(int code) const;

  // Why this world cannot run moetrain's threads, when it cannot: several ranks and an MPI library that grants less
  // than MPI_THREAD_MULTIPLE (autograd's device threads, a chunk pair's worker and the liveness answers all call
  // MPI). nullopt otherwise.
  std::optional<std::string> thread_support_error() const;

  static bool launched();               // started by mpirun / srun
  static std::string library_version();  // first line of MPI_Get_library_version

 private:
  void print_error(const std::string& message) const;

  bool active_ = false;
  bool finalized_ = false;
  int rank_ = 0;
  int size_ = 1;
  int thread_level_ = 0;  // what MPI_Init_thread provided
};

}  // namespace moetrain::parallel
