// The few collective steps a checkpoint needs — gather every rank's index entries on rank 0, agree that every
// rank succeeded, a barrier — over MPI_COMM_WORLD when the job was launched with MPI, trivially in one process.
#pragma once

#include <string>
#include <vector>

namespace moetrain::checkpoints {

class Collective {
 public:
  // mpi: MPI is initialized (a launched job); otherwise a world of one.
  explicit Collective(bool mpi);
  int rank() const { return rank_; }
  int size() const { return size_; }
  // Every rank's string, on rank 0 (other ranks get an empty vector).
  std::vector<std::string> gather(const std::string& mine) const;
  // True on every rank iff `ok` is true on every rank.
  bool all_ok(bool ok) const;
  // True on every rank iff `flag` is true on some rank.
  bool any(bool flag) const;
  void barrier() const;

 private:
  bool mpi_;
  int rank_ = 0, size_ = 1;
};

}  // namespace moetrain::checkpoints
