// Expert parallelism: the routed experts of a layer are split over the ep group (n_routed/ep each, contiguous
// global ids), and tokens travel to their experts and back as all-to-all-v exchanges inside autograd (the
// backward of an exchange is the reverse exchange). Split sizes are exchanged first; a rank or an expert with no
// tokens still takes part in every exchange.
#pragma once

#include "model/expert_exchange.h"
#include "parallel/communicator.h"

namespace moetrain::parallel {

// rows of x go to ranks by send_rows and come back by recv_rows; differentiable.
at::Tensor all_to_all_autograd(const at::Tensor& x, Communicator& comm, const std::vector<int64_t>& send_rows,
                               const std::vector<int64_t>& recv_rows);

class AllToAllExpertExchange final : public model::ExpertExchange {
 public:
  AllToAllExpertExchange(Communicator& ep, int64_t n_routed_experts);
  // The tokens' exchange is started without blocking, `meanwhile` runs, then it is waited for.
  model::Dispatched dispatch(const at::Tensor& tokens, const at::Tensor& gates, const std::vector<int64_t>& counts,
                             const std::function<void()>& meanwhile = {}) override;
  at::Tensor combine(const at::Tensor& outputs, const model::Dispatched& dispatched) override;

 private:
  Communicator& ep_;
  int64_t n_experts_, local_;
};

}  // namespace moetrain::parallel
