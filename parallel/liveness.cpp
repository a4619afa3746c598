#include "parallel/liveness.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <mpi.h>

#include <chrono>
#include <deque>
#include <mutex>
#include <thread>

namespace moetrain::parallel::liveness {

namespace {

constexpr int kPing = 1;  // payload: the pinging rank's round number
constexpr int kPong = 2;  // payload: the round answered

struct Send {
  int value = 0;
  MPI_Request request = MPI_REQUEST_NULL;
};

struct State {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0;
  int size = 1;
  int round = 0;
  std::mutex mu;
  std::deque<Send> sends;  // in flight; a deque keeps the buffers of earlier sends where they are
  std::vector<int> silent_seen;
};

State& state() {
  static State s;
  return s;
}

void post(State& s, int to, int tag, int value) {
  Send& send = s.sends.emplace_back();
  send.value = value;
  if (MPI_Isend(&send.value, 1, MPI_INT, to, tag, s.comm, &send.request) != MPI_SUCCESS)
    send.request = MPI_REQUEST_NULL;
}

// Drops finished sends from the front (a ping to a stopped rank may never finish; it stays, and so do later ones).
void reap(State& s) {
  while (!s.sends.empty()) {
    int done = 1;
    if (s.sends.front().request != MPI_REQUEST_NULL &&
        MPI_Test(&s.sends.front().request, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS)
      done = 1;
    if (!done) return;
    s.sends.pop_front();
  }
}

// Requires s.mu.
void answer_locked(State& s) {
  reap(s);
  for (;;) {
    int pending = 0;
    MPI_Status status;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kPing, s.comm, &pending, &status) != MPI_SUCCESS || !pending) return;
    int round = 0;
    if (MPI_Recv(&round, 1, MPI_INT, status.MPI_SOURCE, kPing, s.comm, MPI_STATUS_IGNORE) != MPI_SUCCESS) return;
    post(s, status.MPI_SOURCE, kPong, round);
  }
}

}  // namespace

void start() {
  State& s = state();
  if (s.comm != MPI_COMM_NULL) return;
  MPI_Comm_rank(MPI_COMM_WORLD, &s.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &s.size);
  if (s.size == 1) return;
  if (MPI_Comm_dup(MPI_COMM_WORLD, &s.comm) != MPI_SUCCESS) {
    s.comm = MPI_COMM_NULL;
    return;
  }
  MPI_Comm_set_errhandler(s.comm, MPI_ERRORS_RETURN);
}

void answer() {
  State& s = state();
  if (s.comm == MPI_COMM_NULL) return;
  std::unique_lock<std::mutex> lock(s.mu, std::try_to_lock);
  if (lock.owns_lock()) answer_locked(s);  // another thread is answering (or pinging) already
}

std::vector<int> silent_ranks(double grace_s) {
  State& s = state();
  if (s.comm == MPI_COMM_NULL) return {};
  std::lock_guard<std::mutex> lock(s.mu);
  const int round = ++s.round;
  std::vector<bool> answered(static_cast<size_t>(s.size), false);
  answered[static_cast<size_t>(s.rank)] = true;
  for (int r = 0; r < s.size; ++r)
    if (r != s.rank) post(s, r, kPing, round);
  int missing = s.size - 1;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(grace_s);
  while (missing > 0 && std::chrono::steady_clock::now() < deadline) {
    answer_locked(s);  // the other ranks that timed out ping too
    int pending = 0;
    MPI_Status status;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kPong, s.comm, &pending, &status) == MPI_SUCCESS && pending) {
      int answered_round = 0;
      if (MPI_Recv(&answered_round, 1, MPI_INT, status.MPI_SOURCE, kPong, s.comm, MPI_STATUS_IGNORE) ==
              MPI_SUCCESS &&
          answered_round == round && !answered[static_cast<size_t>(status.MPI_SOURCE)]) {
        answered[static_cast<size_t>(status.MPI_SOURCE)] = true;
        --missing;
      }
      continue;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::vector<int> silent;
  for (int r = 0; r < s.size; ++r)
    if (!answered[static_cast<size_t>(r)]) silent.push_back(r);
  s.silent_seen = silent;
  return silent;
}

std::vector<int> silent_ranks_seen() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.silent_seen;
}

std::string explain_timeout(double grace_s) {
  if (state().comm == MPI_COMM_NULL) return "";
  const std::vector<int> silent = silent_ranks(grace_s);
  if (silent.empty())
    return fmt::format("; every other rank answered within {:.0f} s, so none is stopped: a peer is slow or waits in "
                       "another collective",
                       grace_s);
  return fmt::format("; world rank{} {} did not answer within {:.0f} s: stopped or hung", silent.size() > 1 ? "s" : "",
                     fmt::join(silent, ", "), grace_s);
}

}  // namespace moetrain::parallel::liveness
