#include "trainer/preemption.h"

#include <fmt/format.h>

#include <atomic>
#include <csignal>
#include <cstdlib>
#include <stdexcept>

namespace moetrain::trainer {
namespace {

std::atomic<int> stop_signal{0};
extern "C" void record_stop_signal(int sig) { stop_signal.store(sig); }
int installed = 0;  // StopSignals alive (nested: the command's, then the training loop's)

}  // namespace

struct StopSignals::Saved {
  struct sigaction term = {}, usr1 = {};
};

StopSignals::StopSignals(bool on) {
  if (!on) return;
  saved_ = std::make_unique<Saved>();
  if (installed++ == 0) stop_signal.store(0);  // an inner one keeps what arrived while the outer one listened
  struct sigaction sa = {};
  sa.sa_handler = record_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, &saved_->term);
  sigaction(SIGUSR1, &sa, &saved_->usr1);
}

StopSignals::~StopSignals() {
  if (!saved_) return;
  --installed;
  sigaction(SIGTERM, &saved_->term, nullptr);
  sigaction(SIGUSR1, &saved_->usr1, nullptr);
}

int StopSignals::received() { return stop_signal.load(); }

const char* StopSignals::name(int signal) {
  return signal == SIGTERM ? "SIGTERM" : signal == SIGUSR1 ? "SIGUSR1" : "a signal to another rank";
}

StepVote vote(parallel::ControlPlane& control, bool signal_here, bool out_of_time_here, bool writer_busy_here) {
  const std::vector<bool> any = control.any({signal_here, out_of_time_here, writer_busy_here});
  return {any[0] || any[1], any[1], !any[2]};
}

void maybe_inject_failure(int64_t step, int64_t rank) {
  const char* at_step = std::getenv("MOETRAIN_TEST_FAIL_STEP");
  if (!at_step || std::atoll(at_step) != step) return;
  const char* on_rank = std::getenv("MOETRAIN_TEST_FAIL_RANK");
  if (on_rank && std::atoll(on_rank) != rank) return;
  throw std::runtime_error(fmt::format("injected failure at step {} on rank {} (MOETRAIN_TEST_FAIL_STEP)", step, rank));
}

}  // namespace moetrain::trainer
