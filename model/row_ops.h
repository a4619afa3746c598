// Row gathers of the MoE layer as autograd nodes whose backward passes are gathers too: no index_add into a
// zero-filled tensor (serial on CPUs, atomic and non-deterministic on GPUs) and nothing kept but the indices.
//   N tokens, k routed copies each; copy j of token t is row t·k + j in token order. `order` sorts the copies by
//   expert; token_of = order / k is each sorted copy's token; slot_of is order's inverse (a copy's sorted row).
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

namespace moetrain::model {

// x[perm] along dim 0, for a permutation `perm` with inverse `inverse`; gradient: dy[inverse].
at::Tensor permute_rows(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& inverse);

// [N, d] -> [N·k, d] in sorted order: row i is x[token_of[i]]; gradient: Σ_j dy[slot_of[t·k + j]] per token t.
at::Tensor expand_rows(const at::Tensor& x, const at::Tensor& token_of, const at::Tensor& slot_of, int64_t k);

// Its adjoint: [N·k, d] in sorted order -> [N, d], token t gets Σ_j y[slot_of[t·k + j]] (summed in copy order,
// deterministic); gradient: dout[token_of[i]] for row i.
at::Tensor reduce_rows(const at::Tensor& y, const at::Tensor& token_of, const at::Tensor& slot_of, int64_t k);

// [M, d + 1] -> ([M, d] contiguous, [M]): the rows and their last column; the gradient is one tensor again.
std::pair<at::Tensor, at::Tensor> split_last_column(const at::Tensor& x);

}  // namespace moetrain::model
