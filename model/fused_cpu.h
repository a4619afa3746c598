// Fused CPU kernels for the step's elementwise chains: one pass over the rows instead of one ATen op (and one
// temporary) per arithmetic step, for FP32 tensors on the CPU (`fused_cpu::applies`); other dtypes and devices take
// the callers' ATen compositions, which stay the reference the unit tests compare these with. Loops are compiled
// for AVX-512, AVX2 and the baseline and picked at load time; rows are split over the intra-op threads in fixed
// chunks and partial sums are added in chunk order, so results do not depend on thread scheduling. Exponentials use
// a polynomial (Cephes' expf, about 1 ulp) that vectorizes with the loops.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <utility>

namespace moetrain::model::fused_cpu {

// FP32 tensors on the CPU (the rest of a kernel's inputs must match their first).
bool applies(const at::Tensor& t);
// All of them (undefined ones are left out; the first must be there).
bool applies(std::initializer_list<at::Tensor> ts);

// RMSNorm over the last dim: out = x·r·w with r = (mean(x²) + eps)^-½ per row; returns {out, r} (r: x's shape with
// a last dim of 1).
std::pair<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
// Its gradients {dx, dw} for the output gradient g: dx = r·(g⊙w) − x·r³·mean(g⊙w⊙x), dw = Σ_rows g⊙x·r.
std::pair<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                    const at::Tensor& rstd);

// h = silu(g)⊙u (⊙gate per row), [rows, inter] contiguous; g and u rows may be strided.
at::Tensor swiglu(const at::Tensor& g, const at::Tensor& u, const at::Tensor& gate);
// SwiGLU's backward for h = silu(g)⊙u (⊙gate per row): writes dg and du (same shapes as g and u, rows may be
// strided as in the fused [rows, 2·inter] layout) and returns dgate ([rows]; undefined without a gate).
at::Tensor swiglu_backward(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u, const at::Tensor& gate,
                           at::Tensor& dg, at::Tensor& du);

// Cross-entropy summed over rows: Σ_r logsumexp(logits[r]) − logits[r, target[r]]; returns {the sum (0-dim), the
// log-sum-exp per row}. Its backward: dlogits = scale·(softmax(logits) − onehot(target)).
std::pair<at::Tensor, at::Tensor> cross_entropy_sum(const at::Tensor& logits, const at::Tensor& target);
at::Tensor cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                                  double scale);

// out[t] = Σ_j y[index[t·k + j]] over j < k: [rows, d] rows gathered in groups of k and summed in group order.
at::Tensor gather_sum(const at::Tensor& y, const at::Tensor& index, int64_t k);

// Interleaved RoPE written into `out` ([B, T, H, rope], rows may be strided): out[b, t, h] = x[b, t, h] with each
// pair (2i, 2i+1) rotated by e^(i·t·θ_i) (e^(-i·t·θ_i) with `inverse`, the backward rotation); x may have one head
// for all. cis: [1, T, 1, rope/2] complex64 (model/layers.h's RopeTables). For FP32 x and out.
void rope_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& cis, bool inverse);

// The router's selection per token (no gradient): the k experts of highest s + bias ([rows, E] scores, bias [E] or
// undefined), among the topk_group groups of highest group score (the sum of a group's two highest s + bias) when
// n_group > 1; in descending order of s + bias, ties to the lower expert id (as at::topk's order). int64 [rows, k].
at::Tensor route_top_k(const at::Tensor& scores, const at::Tensor& bias, int64_t n_group, int64_t topk_group,
                       int64_t k);

// Causal attention, o = softmax(scale·q·kᵀ, keys up to each query's own position)·v, flash style: the probabilities
// live one block of queries at a time and the backward pass computes them again from the log-sum-exp. q, k
// [B, H, T, D] and v [B, H, T, Dv], any strides with a contiguous last dim (v needs no padding to D). Returns
// {o [B, H, T, Dv] (a view of a [B, T, H, Dv] tensor), lse [B, H, T] (each query's log-sum-exp of its scaled scores)}.
// Each (batch, head) pair is computed whole by one thread.
std::pair<at::Tensor, at::Tensor> causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   double scale);
// Its gradients {dq, dk, dv} (views of [B, T, H, ·] tensors) for the output gradient dout.
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                         const at::Tensor& k, const at::Tensor& v,
                                                                         const at::Tensor& o, const at::Tensor& lse,
                                                                         double scale);

// The routed experts' grouped GEMMs (x's rows in consecutive blocks, one per expert; ends: the blocks' cumulative
// ends, int32, as at::_grouped_mm's offsets), with precision/cpu_gemm.h's micro-kernels, split over the
// intra-op threads by blocks of rows (each output element is computed by one thread in a fixed order):
// y[rows of e] = x[rows of e]·b[e] for x [rows, K], b [E, K, N] -> y [rows, N] (rows after the last block 0);
at::Tensor grouped_gemm(const at::Tensor& x, const at::Tensor& b, const at::Tensor& ends);
// out[e] = dy[rows of e]ᵀ·x[rows of e] for dy [rows, N], x [rows, K] -> [E, N, K] (0 for an expert without rows).
at::Tensor grouped_gemm_tn(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& ends);

}  // namespace moetrain::model::fused_cpu
