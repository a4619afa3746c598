// How routed tokens reach the experts. The model sorts its tokens by expert and hands them to an ExpertExchange;
// with expert parallelism (parallel/) the exchange is an all-to-all over the ep group, in a single process it is
// the identity. model/ depends only on this interface, never on MPI or NCCL.
#pragma once

#include <ATen/core/Tensor.h>

#include <any>
#include <cstdint>
#include <functional>
#include <vector>

namespace moetrain::model {

// Which routed experts this rank holds: a contiguous block of n_routed/ep_size global expert ids.
struct ExpertShard {
  int64_t ep_rank = 0;
  int64_t ep_size = 1;

  int64_t local_count(int64_t n_routed) const { return n_routed / ep_size; }
  int64_t first_expert(int64_t n_routed) const { return ep_rank * local_count(n_routed); }
};

struct Dispatched {
  at::Tensor tokens;                   // [M, d] sorted by local expert
  at::Tensor gates;                    // [M]: each row's gate
  std::vector<int64_t> local_counts;   // tokens per local expert (sums to M)
  std::any state;                      // what combine needs to send results back
};

class ExpertExchange {
 public:
  virtual ~ExpertExchange() = default;
  // tokens: [N·k, d] this rank's routed copies sorted by global expert id, gates: [N·k] their gates (they travel
  // with them); counts: tokens per global expert. Every rank of the ep group must call dispatch and combine, even
  // with no tokens. `meanwhile` (if any) runs while the tokens travel (the shared expert's forward, as DeepSeek-V3
  // overlaps it with the dispatch).
  virtual Dispatched dispatch(const at::Tensor& tokens, const at::Tensor& gates, const std::vector<int64_t>& counts,
                              const std::function<void()>& meanwhile = {}) = 0;
  // outputs: [M, d] in the order of Dispatched::tokens -> [N·k, d] in the order dispatch received.
  virtual at::Tensor combine(const at::Tensor& outputs, const Dispatched& dispatched) = 0;
};

// One process holds every expert: dispatch and combine hand tensors through unchanged.
class LocalExpertExchange final : public ExpertExchange {
 public:
  Dispatched dispatch(const at::Tensor& tokens, const at::Tensor& gates, const std::vector<int64_t>& counts,
                      const std::function<void()>& meanwhile = {}) override {
    if (meanwhile) meanwhile();
    return {tokens, gates, counts, {}};
  }
  at::Tensor combine(const at::Tensor& outputs, const Dispatched&) override { return outputs; }
};

}  // namespace moetrain::model
