// checkpoint.save_on_signal: SIGTERM or SIGUSR1 (a preemption, Slurm's --signal) on any rank makes every rank
// finish its step, save a checkpoint and stop. The handler only records the signal; the ranks agree on it once per
// step in the step vote, which also tells whether every rank's asynchronous checkpoint writer is done — one
// collective on the control plane for both.
#pragma once

#include <memory>

#include "parallel/control_plane.h"

namespace moetrain::trainer {

// Installs the SIGTERM and SIGUSR1 handlers for its lifetime (when `on`) and restores the previous ones after. A
// repeated signal (Slurm and mpirun may both forward one) changes nothing; SIGINT and SIGKILL still end the
// process at once. Nested: `moetrain train` listens from start-up (a signal while the model is built or a checkpoint
// loaded would otherwise end the process), the training loop inside it; a signal the outer one recorded stays
// recorded, and the first step's vote stops the run.
class StopSignals {
 public:
  explicit StopSignals(bool on);
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  static int received();  // the signal this process received, 0 if none
  static const char* name(int signal);  // "SIGTERM", "SIGUSR1", or "a signal to another rank" for 0

 private:
  struct Saved;
  std::unique_ptr<Saved> saved_;  // the previous handlers; null when off
};

struct StepVote {
  bool stop = false;          // some rank received a stop signal or ran out of its time budget
  bool out_of_time = false;   // some rank ran out of train.exit_duration_mins
  bool writers_done = true;   // no rank's asynchronous checkpoint writer is still busy
};
// Collective over the control plane: every rank calls it after every step when save_on_signal is on, a save is
// pending or a time budget is set (all the same on every rank).
StepVote vote(parallel::ControlPlane& control, bool signal_here, bool out_of_time_here, bool writer_busy_here);

// Test-only fault injection: MOETRAIN_TEST_FAIL_STEP=k [MOETRAIN_TEST_FAIL_RANK=r] makes rank r throw at step k.
void maybe_inject_failure(int64_t step, int64_t rank);

}  // namespace moetrain::trainer
