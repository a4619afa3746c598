// Expert parallelism: the routed experts of a layer are split over the ep group (n_routed/ep each, contiguous
// global ids), and tokens travel to their experts and back as all-to-all-v exchanges inside autograd (the
// backward of an exchange is the reverse exchange). Split sizes are exchanged first; a rank or an expert with no
// tokens still takes part in every exchange.
#pragma once

#include "model/expert_exchange.h"
#include "parallel/communicator.h"

namespace moetrain::parallel {

// Two lanes of exchanges: the forward lane (the default) and the backward lane, each on a communicator of its own,
// so that a forward pass and a backward pass of two micro-batches can run at once on two threads (DualPipeV's
// overlapped chunk pairs, parallel/pipeline.h) without their collectives meeting on one communicator. A thread
// runs on the backward lane while a BackwardLane lives on it; every exchange it issues — forward exchanges of a
// recomputation included, and the backward exchanges autograd runs there — goes over the backward communicator.
// Ranks of a group run the same passes in the same lanes, so each communicator sees the same order everywhere.
class BackwardLane {
 public:
  BackwardLane();
  ~BackwardLane();
  BackwardLane(const BackwardLane&) = delete;
  BackwardLane& operator=(const BackwardLane&) = delete;
  static bool active();  // on this thread

 private:
  bool previous_;
};

// rows of x go to ranks by send_rows and come back by recv_rows; differentiable. `backward_lane`: the communicator
// of the backward lane (null: `comm` for both).
at::Tensor all_to_all_autograd(const at::Tensor& x, Communicator& comm, const std::vector<int64_t>& send_rows,
                               const std::vector<int64_t>& recv_rows, Communicator* backward_lane = nullptr);

class AllToAllExpertExchange final : public model::ExpertExchange {
 public:
  // ep_backward_lane: a second communicator over the ep group for the backward lane (null: ep for both lanes).
  AllToAllExpertExchange(Communicator& ep, int64_t n_routed_experts, Communicator* ep_backward_lane = nullptr);
  // The tokens' exchange is started without blocking, `meanwhile` runs, then it is waited for.
  model::Dispatched dispatch(const at::Tensor& tokens, const at::Tensor& gates, const std::vector<int64_t>& counts,
                             const std::function<void()>& meanwhile = {}) override;
  at::Tensor combine(const at::Tensor& outputs, const model::Dispatched& dispatched) override;

 private:
  Communicator& lane() const { return BackwardLane::active() && ep_back_ ? *ep_back_ : ep_; }
  Communicator& ep_;
  Communicator* ep_back_;
  int64_t n_experts_, local_;
};

}  // namespace moetrain::parallel
