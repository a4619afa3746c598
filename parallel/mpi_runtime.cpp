#include "parallel/mpi_runtime.h"

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "parallel/liveness.h"

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
  // MOETRAIN_TEST_MPI_THREAD_LEVEL (tests only): ask for a lower level, as an MPI without thread support grants.
  const char* asked = std::getenv("MOETRAIN_TEST_MPI_THREAD_LEVEL");
  MPI_Init_thread(argc, argv, asked ? std::atoi(asked) : MPI_THREAD_MULTIPLE, &thread_level_);
  // Errors are returned, not fatal, so they become exceptions with context instead of a library abort banner.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  liveness::start();
  active_ = true;
}

std::optional<std::string> MpiRuntime::thread_support_error() const {
  if (!active_ || size_ == 1 || thread_level_ >= MPI_THREAD_MULTIPLE) return std::nullopt;
  const char* names[] = {"MPI_THREAD_SINGLE", "MPI_THREAD_FUNNELED", "MPI_THREAD_SERIALIZED"};
  const bool known = thread_level_ >= MPI_THREAD_SINGLE && thread_level_ <= MPI_THREAD_SERIALIZED;
  return fmt::format("this MPI library grants {} to a multi-threaded process; moetrain calls MPI from several "
                     "threads and needs MPI_THREAD_MULTIPLE ({}): use an MPI built with thread support (Open MPI "
                     "has it by default since 3.0)",
                     known ? names[thread_level_ - MPI_THREAD_SINGLE] : std::to_string(thread_level_),
                     library_version());
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
      // A rank that stopped never arrives. When this rank's error found which ones (a collective timed out and
      // liveness named the silent ranks), the lowest rank that answered reports and aborts the job; the others
      // wait for that abort (still answering) rather than repeat the same line, reporting only if it never comes.
      const std::vector<int> silent = liveness::silent_ranks_seen();
      int reporter = 0;
      while (std::find(silent.begin(), silent.end(), reporter) != silent.end()) ++reporter;
      if (error && !silent.empty() && reporter != rank_) {
        const auto wait_for_abort = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (std::chrono::steady_clock::now() < wait_for_abort) {
          liveness::answer();
          std::this_thread::sleep_for(std::chrono::milliseconds(2));
        }
      }
      print_error(error ? *error
                        : fmt::format("ranks did not finish within {:.0f} s of this one; aborting the job",
                                      done_timeout_s));
      abort(1);
    }
    liveness::answer();
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (error && lowest == rank_) print_error(*error);
  MPI_Finalize();
  finalized_ = true;
  return lowest == INT_MAX ? 0 : 1;
}

}  // namespace moetrain::parallel
