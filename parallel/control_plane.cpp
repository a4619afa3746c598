#include "parallel/control_plane.h"

#include <ATen/ops/zeros.h>

#include "parallel/mpi_communicator.h"

namespace moetrain::parallel {

ControlPlane::ControlPlane() = default;
ControlPlane::ControlPlane(std::unique_ptr<MpiCommunicator> world) : comm_(std::move(world)) {}
ControlPlane::~ControlPlane() = default;

int ControlPlane::rank() const { return comm_ ? comm_->rank() : 0; }
int ControlPlane::size() const { return comm_ ? comm_->size() : 1; }

std::vector<bool> ControlPlane::any(const std::vector<bool>& flags) {
  if (!comm_ || comm_->size() == 1) return flags;
  at::Tensor t = at::zeros({static_cast<int64_t>(flags.size())}, at::kInt);
  for (size_t i = 0; i < flags.size(); ++i) t.data_ptr<int32_t>()[i] = flags[i] ? 1 : 0;
  comm_->all_reduce(t, ReduceOp::kMax);
  std::vector<bool> out(flags.size());
  for (size_t i = 0; i < flags.size(); ++i) out[i] = t.data_ptr<int32_t>()[i] != 0;
  return out;
}

bool ControlPlane::same_everywhere(uint64_t value) {
  if (!comm_ || comm_->size() == 1) return true;
  // The max of (v, −v) over the ranks is (max v, −min v): equal everywhere iff max = min.
  const auto v = static_cast<int64_t>(value & 0x7fffffffffffffffULL);
  at::Tensor t = at::zeros({2}, at::kLong);
  t.data_ptr<int64_t>()[0] = v;
  t.data_ptr<int64_t>()[1] = -v;
  comm_->all_reduce(t, ReduceOp::kMax);
  return t.data_ptr<int64_t>()[0] == -t.data_ptr<int64_t>()[1];
}

std::vector<std::string> ControlPlane::gather(const std::string& mine) {
  if (!comm_ || comm_->size() == 1) return {mine};
  return comm_->gather_strings(mine);
}

void ControlPlane::barrier() {
  if (comm_ && comm_->size() > 1) comm_->barrier();
}

}  // namespace moetrain::parallel
