// The job's small agreements — that every rank runs the same config, the per-step vote (a stop signal somewhere,
// an asynchronous checkpoint writer still busy somewhere), and a checkpoint's commit — over one CPU (MPI)
// communicator of the whole world, whatever backend the data plane uses, with the same timeout
// (parallel.comm_timeout_s) as every other collective: a rank that never arrives ends the job, it does not hang it.
// In one process (no launcher) every agreement is trivial.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moetrain::parallel {

class MpiCommunicator;

class ControlPlane {
 public:
  ControlPlane();  // a world of one
  explicit ControlPlane(std::unique_ptr<MpiCommunicator> world);
  ~ControlPlane();
  ControlPlane(const ControlPlane&) = delete;
  ControlPlane& operator=(const ControlPlane&) = delete;

  int rank() const;
  int size() const;

  // For each flag: true on every rank iff it is true on some rank. One collective for all of them.
  std::vector<bool> any(const std::vector<bool>& flags);
  bool any(bool flag) { return any(std::vector<bool>{flag})[0]; }
  bool all(bool flag) { return !any(!flag); }
  // True on every rank iff every rank passed the same value.
  bool same_everywhere(uint64_t value);
  // Every rank's string on rank 0, in rank order; the other ranks get an empty vector.
  std::vector<std::string> gather(const std::string& mine);
  void barrier();

 private:
  std::unique_ptr<MpiCommunicator> comm_;  // null: one process
};

}  // namespace moetrain::parallel
