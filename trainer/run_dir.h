// The run directory (logging.dir/logging.name) of a training job: a lock, so that two jobs never write into one
// run (checkpoints, `latest`, metrics.jsonl), the resolved config.yaml and metrics.jsonl. Rank 0 holds the lock,
// for the job's lifetime; the ranks agree on it, so a refused job ends on every rank at once.
#pragma once

#include <memory>
#include <string>

#include "config/config.h"
#include "parallel/control_plane.h"
#include "trainer/event_file.h"
#include "trainer/metrics.h"

namespace moetrain::trainer {

class RunDirectory {
 public:
  // Collective over the control plane. dir "": no files (tests, benchmarks). main: this rank creates the
  // directory and takes the lock (<dir>/.lock, an flock: released by the kernel when the process ends, however it
  // ends). Throws on every rank when the lock is held by another job, naming its process and host.
  RunDirectory(std::string dir, bool main, parallel::ControlPlane& control);
  ~RunDirectory();
  RunDirectory(const RunDirectory&) = delete;
  RunDirectory& operator=(const RunDirectory&) = delete;

  // After a successful start (a resume loaded): config.yaml written, metrics.jsonl and the TensorBoard event file
  // (logging.tensorboard) opened; a run resumed after step `resumed_step` (≥ 0; −1: a fresh run) keeps their records
  // up to it and appends.
  void start(const config::Config& c, int64_t resumed_step);
  MetricsWriter* metrics() { return metrics_.get(); }
  // One step's record, or one evaluation's, into metrics.jsonl and the event file (rank 0; nothing elsewhere).
  void record(const StepResult& r);
  void record(int64_t steps_done, const EvalResult& e);
  const std::string& path() const { return dir_; }
  // "pid N on HOST": the holder of a lock left behind by a process that ended without releasing it, or "".
  const std::string& stale_holder() const { return stale_; }
  // Throws the in-use error above if another job holds dir's lock now (a look, local to this rank: nothing is
  // taken or created). Lets a command refuse a busy run directory before anything else about it.
  static void refuse_if_in_use(const std::string& dir);

 private:
  std::string dir_;
  bool main_;
  int fd_ = -1;
  std::string stale_;
  std::unique_ptr<MetricsWriter> metrics_;
  std::unique_ptr<EventFile> events_;
  int64_t expert_loads_interval_ = 1;  // logging.expert_loads_interval
};

}  // namespace moetrain::trainer
