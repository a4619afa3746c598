#include "parallel/mpi_runtime.h"

#include <fmt/format.h>
#include <mpi.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <thread>

namespace moetrain::parallel {

bool MpiRuntime::launched() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"})
    if (std::getenv(var)) return true;
  return false;
}

std::string MpiRuntime::library_version() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING] = {};
  int len = 0;
  MPI_Get_library_version(text, &len);
  std::string s(text, static_cast<size_t>(len));
  auto cut = s.find_first_of(",\n");
  return s.substr(0, cut);
}

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  if (!launched()) return;
  int provided = 0;
  MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided);
  // Errors are returned, not fatal, so they become exceptions with context instead of a library abort banner.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  active_ = true;
}

MpiRuntime::~MpiRuntime() {
  if (active_ && !finalized_) MPI_Finalize();
}

void MpiRuntime::print_error(const std::string& message) const {
  if (size_ > 1 && rank_ != 0)
    std::fprintf(stderr, "moetrain: error on rank %d of %d: %s\n", rank_, size_, message.c_str());
  else
    std::fprintf(stderr, "moetrain: error: %s\n", message.c_str());
  std::fflush(stderr);
}

void MpiRuntime::abort(int code) const {
  std::fflush(stdout);
  std::fflush(stderr);
  if (active_) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

int MpiRuntime::finish(const std::optional<std::string>& error, double error_timeout_s, double done_timeout_s) {
  if (!active_ || size_ == 1) {
    if (error) print_error(*error);
    if (active_) {
      MPI_Finalize();
      finalized_ = true;
    }
    return error ? 1 : 0;
  }
  // The lowest failing rank, INT_MAX if none failed.
  int mine = error ? rank_ : INT_MAX, lowest = INT_MAX;
  MPI_Request request;
  MPI_Iallreduce(&mine, &lowest, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD, &request);
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration<double>(error ? error_timeout_s : done_timeout_s);
  int done = 0;
  while (MPI_Test(&request, &done, MPI_STATUS_IGNORE) == MPI_SUCCESS && !done) {
    if (std::chrono::steady_clock::now() > deadline) {
      print_error(error ? *error
                        : fmt::format("ranks did not finish within {:.0f} s of this one; aborting the job",
                                      done_timeout_s));
      abort(1);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (error && lowest == rank_) print_error(*error);
  MPI_Finalize();
  finalized_ = true;
  return lowest == INT_MAX ? 0 : 1;
}

}  // namespace moetrain::parallel
