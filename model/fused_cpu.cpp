#include "model/fused_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/view_as_real.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "precision/cpu_gemm.h"

// One copy of each row loop per instruction set, chosen when the library loads by the CPU's features (GCC function
// multiversioning; "arch=" clones would test the CPU model and miss newer ones).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOETRAIN_ROW_LOOP __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOETRAIN_ROW_LOOP
#endif

namespace moetrain::model::fused_cpu {
namespace {

using precision::cpu_gemm::small_gemm;

// Rows split into at most one chunk per intra-op thread (each of at least ~16k elements); f(chunk, begin, end).
// Returns the chunk count: chunk c always covers the same rows, whichever thread runs it.
template <class F>
int64_t for_row_chunks(int64_t rows, int64_t width, const F& f) {
  const int64_t by_size = std::max<int64_t>(1, rows * std::max<int64_t>(width, 1) / 16384);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({by_size, at::get_num_threads(), rows}));
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) f(c, rows * c / chunks, rows * (c + 1) / chunks);
  });
  return chunks;
}

// The stride between rows of `t` seen as [rows, last dim]: contiguous tensors of any rank, or 2-D row views.
int64_t row_stride(const at::Tensor& t) {
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) <= 1, "fused_cpu: the last dim must be contiguous");
  if (t.is_contiguous()) return t.size(-1);
  TORCH_CHECK(t.dim() == 2, "fused_cpu: a strided tensor must be 2-D rows, got ", t.sizes());
  return t.stride(0);
}

// e^x for single floats in arithmetic only, so loops vectorize: x = n·ln2 + r, |r| ≤ ln2/2, e^r by Cephes' polynomial,
// 2^n through the exponent bits. NaN stays NaN; the result saturates outside [-87.3, 88.7] (0 and ~3.4e38).
inline __attribute__((always_inline)) float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline __attribute__((always_inline)) float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

MOETRAIN_ROW_LOOP
void rms_rows(const float* x, const float* w, float* out, float* rstd, int64_t begin, int64_t end, int64_t d,
              float eps) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * d;
    float* o = out + r * d;
    float ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < d; ++j) ss += xr[j] * xr[j];
    const float rs = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    rstd[r] = rs;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) o[j] = xr[j] * rs * w[j];
  }
}

MOETRAIN_ROW_LOOP
void rms_backward_rows(const float* g, const float* x, const float* w, const float* rstd, float* dx, float* dw,
                       int64_t begin, int64_t end, int64_t d) {
  for (int64_t r = begin; r < end; ++r) {
    const float *gr = g + r * d, *xr = x + r * d;
    float* o = dx + r * d;
    const float rs = rstd[r];
    float dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < d; ++j) dot += gr[j] * w[j] * xr[j];
    const float c = rs * rs * rs * dot / static_cast<float>(d);
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      o[j] = rs * gr[j] * w[j] - xr[j] * c;
      dw[j] += gr[j] * xr[j] * rs;
    }
  }
}

MOETRAIN_ROW_LOOP
void swiglu_rows(const float* g, const float* u, const float* gate, float* h, int64_t begin, int64_t end, int64_t n,
                 int64_t sg, int64_t su) {
  for (int64_t r = begin; r < end; ++r) {
    const float *gr = g + r * sg, *ur = u + r * su;
    float* hr = h + r * n;
    const float gt = gate ? gate[r] : 1.0f;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) hr[j] = gr[j] * sigmoid(gr[j]) * ur[j] * gt;
  }
}

MOETRAIN_ROW_LOOP
void swiglu_backward_rows(const float* dh, const float* g, const float* u, const float* gate, float* dg, float* du,
                          float* dgate, int64_t begin, int64_t end, int64_t n, int64_t sg, int64_t su, int64_t sdg,
                          int64_t sdu) {
  for (int64_t r = begin; r < end; ++r) {
    const float *dhr = dh + r * n, *gr = g + r * sg, *ur = u + r * su;
    float *dgr = dg + r * sdg, *dur = du + r * sdu;
    const float gt = gate ? gate[r] : 1.0f;
    float acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) {
      const float s = sigmoid(gr[j]), silu = gr[j] * s;
      acc += dhr[j] * silu * ur[j];
      const float d = dhr[j] * gt;
      dur[j] = d * silu;
      dgr[j] = d * ur[j] * s * (1.0f + gr[j] * (1.0f - s));
    }
    if (dgate) dgate[r] = acc;
  }
}

MOETRAIN_ROW_LOOP
void cross_entropy_rows(const float* logits, const int64_t* target, float* lse, float* loss, int64_t begin, int64_t end,
                        int64_t v) {
  for (int64_t r = begin; r < end; ++r) {
    const float* l = logits + r * v;
    float mx = l[0];
#pragma omp simd reduction(max : mx)
    for (int64_t j = 1; j < v; ++j) mx = l[j] > mx ? l[j] : mx;
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < v; ++j) sum += exp_approx(l[j] - mx);
    lse[r] = mx + std::log(sum);
    loss[r] = lse[r] - l[target[r]];
  }
}

MOETRAIN_ROW_LOOP
void cross_entropy_backward_rows(const float* logits, const int64_t* target, const float* lse, float* dl, int64_t begin,
                                 int64_t end, int64_t v, float scale) {
  for (int64_t r = begin; r < end; ++r) {
    const float* l = logits + r * v;
    float* o = dl + r * v;
    const float m = lse[r];
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) o[j] = scale * exp_approx(l[j] - m);
    o[target[r]] -= scale;
  }
}

MOETRAIN_ROW_LOOP
void gather_sum_rows(const float* y, const int64_t* index, float* out, int64_t begin, int64_t end, int64_t d,
                     int64_t k) {
  for (int64_t t = begin; t < end; ++t) {
    float* o = out + t * d;
    const float* first = y + index[t * k] * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) o[j] = first[j];
    for (int64_t c = 1; c < k; ++c) {
      const float* row = y + index[t * k + c] * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) o[j] += row[j];
    }
  }
}

MOETRAIN_ROW_LOOP
void rope_rows(const float* x, const float* cs, float* out, int64_t begin, int64_t end, int64_t T, int64_t H,
               int64_t half, const int64_t* xs, const int64_t* os, float sign) {
  for (int64_t bt = begin; bt < end; ++bt) {
    const int64_t b = bt / T, t = bt % T;
    const float* c = cs + t * half * 2;  // (cos, sin) pairs of position t
    for (int64_t h = 0; h < H; ++h) {
      const float* xr = x + b * xs[0] + t * xs[1] + h * xs[2];
      float* o = out + b * os[0] + t * os[1] + h * os[2];
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x0 = xr[2 * i], x1 = xr[2 * i + 1], co = c[2 * i], si = sign * c[2 * i + 1];
        o[2 * i] = x0 * co - x1 * si;
        o[2 * i + 1] = x0 * si + x1 * co;
      }
    }
  }
}

// Writes the indices of the `k` largest of v[0..n) in descending order, ties to the lower index, and marks them
// taken by setting them to -inf in v (the candidates not allowed must already be -inf).
void take_top(float* v, int64_t n, int64_t k, int64_t* out) {
  for (int64_t slot = 0; slot < k; ++slot) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i)
      if (v[i] > v[best]) best = i;
    out[slot] = best;
    v[best] = -std::numeric_limits<float>::infinity();
  }
}

// Row r of s (`n` raw scores q·k, row stride lds) is query first + r: its keys 0..first + r turn into the softmax of
// scale·s, the later ones into 0; lse[r] = the log-sum-exp of the scaled scores. The loops run over all n columns and
// mask the later keys (no scalar tail per row when n is a multiple of the vector width).
MOETRAIN_ROW_LOOP
void causal_softmax_rows(float* s, int64_t lds, int64_t rows, int64_t first, int64_t n, float scale, float* lse) {
  constexpr float kLowest = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * lds;
    const int64_t valid = std::min(n, first + r + 1);
    float m = kLowest;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = std::max(m, j < valid ? row[j] : kLowest);
    m *= scale;
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const float e = j < valid ? exp_approx(row[j] * scale - m) : 0.0f;
      row[j] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
    lse[r] = m + std::log(sum);
  }
}

// The backward pass's probabilities again: p = e^(scale·s − lse) for the keys a query sees, 0 after them.
MOETRAIN_ROW_LOOP
void causal_probabilities_rows(float* s, int64_t lds, int64_t rows, int64_t first, int64_t n, float scale,
                               const float* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * lds;
    const int64_t valid = std::min(n, first + r + 1);
    const float l = lse[r];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = j < valid ? exp_approx(row[j] * scale - l) : 0.0f;
  }
}

// dp (the probabilities' gradient) becomes the scores' gradient times scale: scale·p·(dp − delta) per row.
MOETRAIN_ROW_LOOP
void softmax_grad_rows(const float* p, float* dp, int64_t ld, int64_t rows, int64_t n, float scale,
                       const float* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* pr = p + r * ld;
    float* d = dp + r * ld;
    const float dl = delta[r];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) d[j] = scale * pr[j] * (d[j] - dl);
  }
}

// dst[c·ldd + t] = src[t·lds + c] for t < rows, c < cols.
void transpose_into(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + t] = src[t * lds + c];
}

// One attention operand as rows of one (batch, head) pair: [B, H, T, width] with any strides but a contiguous last dim.
struct HeadRows {
  const float* base;
  int64_t sb, sh, st;
  explicit HeadRows(const at::Tensor& t)
      : base(t.const_data_ptr<float>()), sb(t.stride(0)), sh(t.stride(1)), st(t.stride(2)) {}
  const float* pair(int64_t b, int64_t h) const { return base + b * sb + h * sh; }
};

// Queries per block: a block computes scores only for the keys up to its last query, so the causal mask's upper
// triangle is skipped but for the diagonal blocks.
constexpr int64_t kQueryBlock = 32;

}  // namespace

bool applies(const at::Tensor& t) { return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat; }

bool applies(std::initializer_list<at::Tensor> ts) {
  return ts.size() > 0 && applies(*ts.begin()) &&
         std::all_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return !t.defined() || applies(t); });
}

std::pair<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  RECORD_FUNCTION("moetrain::fused_cpu::rms_norm", std::vector<c10::IValue>());
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t d = x.size(-1), rows = d > 0 ? x.numel() / d : 0;
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  std::vector<int64_t> rshape = x.sizes().vec();
  rshape.back() = 1;
  at::Tensor rstd = at::empty(rshape, x.options());
  const float *xp = x.const_data_ptr<float>(), *wp = w.const_data_ptr<float>();
  float *op = out.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  for_row_chunks(rows, d,
                 [&](int64_t, int64_t b, int64_t e) { rms_rows(xp, wp, op, rp, b, e, d, static_cast<float>(eps)); });
  return {out, rstd};
}

std::pair<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& g_in, const at::Tensor& x_in,
                                                    const at::Tensor& w_in, const at::Tensor& rstd_in) {
  RECORD_FUNCTION("moetrain::fused_cpu::rms_norm_backward", std::vector<c10::IValue>());
  const at::Tensor g = g_in.contiguous(), x = x_in.contiguous(), w = w_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t d = x.size(-1), rows = d > 0 ? x.numel() / d : 0;
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t max_chunks = std::max<int64_t>(1, at::get_num_threads());
  at::Tensor partial = at::zeros({max_chunks, d}, x.options());  // dw per chunk, added in chunk order below
  const float *gp = g.const_data_ptr<float>(), *xp = x.const_data_ptr<float>(), *wp = w.const_data_ptr<float>(),
              *rp = rstd.const_data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
  const int64_t chunks = for_row_chunks(
      rows, d, [&](int64_t c, int64_t b, int64_t e) { rms_backward_rows(gp, xp, wp, rp, dxp, pp + c * d, b, e, d); });
  at::Tensor dw = partial[0].clone();
  for (int64_t c = 1; c < chunks; ++c) dw.add_(partial[c]);
  return {dx, dw};
}

at::Tensor swiglu(const at::Tensor& g, const at::Tensor& u, const at::Tensor& gate) {
  RECORD_FUNCTION("moetrain::fused_cpu::swiglu", std::vector<c10::IValue>());
  const int64_t n = g.size(-1), rows = n > 0 ? g.numel() / n : 0;
  at::Tensor h = at::empty(g.sizes(), g.options());
  const at::Tensor gt = gate.defined() ? gate.contiguous() : at::Tensor();
  const float *gp = g.const_data_ptr<float>(), *up = u.const_data_ptr<float>(),
              *gatep = gt.defined() ? gt.const_data_ptr<float>() : nullptr;
  float* hp = h.data_ptr<float>();
  const int64_t sg = row_stride(g), su = row_stride(u);
  for_row_chunks(rows, n, [&](int64_t, int64_t b, int64_t e) { swiglu_rows(gp, up, gatep, hp, b, e, n, sg, su); });
  return h;
}

at::Tensor swiglu_backward(const at::Tensor& dh_in, const at::Tensor& g, const at::Tensor& u, const at::Tensor& gate,
                           at::Tensor& dg, at::Tensor& du) {
  RECORD_FUNCTION("moetrain::fused_cpu::swiglu_backward", std::vector<c10::IValue>());
  const at::Tensor dh = dh_in.contiguous();
  const int64_t n = g.size(-1), rows = n > 0 ? g.numel() / n : 0;
  const at::Tensor gt = gate.defined() ? gate.contiguous() : at::Tensor();
  at::Tensor dgate = gate.defined() ? at::empty({rows}, g.options()) : at::Tensor();
  const float *dhp = dh.const_data_ptr<float>(), *gp = g.const_data_ptr<float>(), *up = u.const_data_ptr<float>(),
              *gatep = gt.defined() ? gt.const_data_ptr<float>() : nullptr;
  float *dgp = dg.data_ptr<float>(), *dup = du.data_ptr<float>(),
        *dgatep = dgate.defined() ? dgate.data_ptr<float>() : nullptr;
  const int64_t sg = row_stride(g), su = row_stride(u), sdg = row_stride(dg), sdu = row_stride(du);
  for_row_chunks(rows, n, [&](int64_t, int64_t b, int64_t e) {
    swiglu_backward_rows(dhp, gp, up, gatep, dgp, dup, dgatep, b, e, n, sg, su, sdg, sdu);
  });
  return dgate;
}

std::pair<at::Tensor, at::Tensor> cross_entropy_sum(const at::Tensor& logits_in, const at::Tensor& target_in) {
  RECORD_FUNCTION("moetrain::fused_cpu::cross_entropy_sum", std::vector<c10::IValue>());
  const at::Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  const int64_t rows = logits.size(0), v = logits.size(1);
  if (rows > 0) {
    const int64_t lo = target.min().item<int64_t>(), hi = target.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < v, "cross_entropy_sum: target ", lo < 0 ? lo : hi, " is out of bounds [0, ", v, ")");
  }
  at::Tensor lse = at::empty({rows}, logits.options()), loss = at::empty({rows}, logits.options());
  const float* lp = logits.const_data_ptr<float>();
  const int64_t* tp = target.const_data_ptr<int64_t>();
  float *sp = lse.data_ptr<float>(), *op = loss.data_ptr<float>();
  for_row_chunks(rows, v, [&](int64_t, int64_t b, int64_t e) { cross_entropy_rows(lp, tp, sp, op, b, e, v); });
  return {loss.sum(), lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& lse,
                                  double scale) {
  RECORD_FUNCTION("moetrain::fused_cpu::cross_entropy_backward", std::vector<c10::IValue>());
  const at::Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  const int64_t rows = logits.size(0), v = logits.size(1);
  at::Tensor dl = at::empty_like(logits);
  const float *lp = logits.const_data_ptr<float>(), *sp = lse.const_data_ptr<float>();
  const int64_t* tp = target.const_data_ptr<int64_t>();
  float* dp = dl.data_ptr<float>();
  for_row_chunks(rows, v, [&](int64_t, int64_t b, int64_t e) {
    cross_entropy_backward_rows(lp, tp, sp, dp, b, e, v, static_cast<float>(scale));
  });
  return dl;
}

at::Tensor gather_sum(const at::Tensor& y_in, const at::Tensor& index_in, int64_t k) {
  RECORD_FUNCTION("moetrain::fused_cpu::gather_sum", std::vector<c10::IValue>());
  const at::Tensor y = y_in.contiguous(), index = index_in.contiguous();
  const int64_t d = y.size(1), rows = index.numel() / k;
  at::Tensor out = at::empty({rows, d}, y.options());
  const float* yp = y.const_data_ptr<float>();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  for_row_chunks(rows, d * k, [&](int64_t, int64_t b, int64_t e) { gather_sum_rows(yp, ip, op, b, e, d, k); });
  return out;
}

void rope_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& cis, bool inverse) {
  RECORD_FUNCTION("moetrain::fused_cpu::rope_into", std::vector<c10::IValue>());
  TORCH_CHECK(x.dim() == 4 && out.dim() == 4 && x.stride(3) == 1 && out.stride(3) == 1 &&
                  cis.scalar_type() == at::kComplexFloat,
              "rope_into: [B, T, H, rope] rows with a contiguous last dim and complex64 tables");
  const at::Tensor table = at::view_as_real(cis.resolve_conj()).contiguous();  // [1, T, 1, half, 2]
  const int64_t B = out.size(0), T = out.size(1), H = out.size(2), half = out.size(3) / 2;
  const int64_t xs[3] = {x.stride(0), x.stride(1), x.size(2) == 1 ? 0 : x.stride(2)};
  const int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)};
  const float* xp = x.const_data_ptr<float>();
  const float* cp = table.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  for_row_chunks(B * T, H * half * 2, [&](int64_t, int64_t b, int64_t e) {
    rope_rows(xp, cp, op, b, e, T, H, half, xs, os, inverse ? -1.0f : 1.0f);
  });
}

at::Tensor route_top_k(const at::Tensor& scores_in, const at::Tensor& bias_in, int64_t n_group, int64_t topk_group,
                       int64_t k) {
  RECORD_FUNCTION("moetrain::fused_cpu::route_top_k", std::vector<c10::IValue>());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor bias = bias_in.defined() ? bias_in.contiguous() : at::Tensor();
  const int64_t rows = scores.size(0), E = scores.size(1), per_group = E / n_group;
  TORCH_CHECK(k <= E && (n_group <= 1 || k <= topk_group * per_group), "route_top_k: k = ", k, " does not fit");
  at::Tensor indices = at::empty({rows, k}, scores.options().dtype(at::kLong));
  const float* sp = scores.const_data_ptr<float>();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  int64_t* ip = indices.data_ptr<int64_t>();
  for_row_chunks(rows, E * 4, [&](int64_t, int64_t b, int64_t e) {
    constexpr float kNone = -std::numeric_limits<float>::infinity();
    std::vector<float> v(static_cast<size_t>(E)), group_score(static_cast<size_t>(std::max<int64_t>(n_group, 1)));
    std::vector<int64_t> groups(static_cast<size_t>(std::max<int64_t>(topk_group, 1)));
    for (int64_t r = b; r < e; ++r) {
      float* vr = v.data();
      for (int64_t i = 0; i < E; ++i) vr[i] = sp[r * E + i] + (bp ? bp[i] : 0.0f);
      if (n_group > 1) {
        // A group's score: its two highest values (one for groups of one), added highest first as at::topk's sum.
        for (int64_t grp = 0; grp < n_group; ++grp) {
          const float* g = vr + grp * per_group;
          int64_t first = 0;
          for (int64_t i = 1; i < per_group; ++i)
            if (g[i] > g[first]) first = i;
          int64_t second = -1;
          for (int64_t i = 0; i < per_group; ++i)
            if (i != first && (second < 0 || g[i] > g[second])) second = i;
          group_score[grp] = second < 0 ? g[first] : g[first] + g[second];
        }
        take_top(group_score.data(), n_group, topk_group, groups.data());
        // Groups not chosen are left out: -inf (take_top marked the chosen ones -inf in group_score).
        for (int64_t grp = 0; grp < n_group; ++grp)
          if (group_score[grp] != kNone)
            for (int64_t i = 0; i < per_group; ++i) vr[grp * per_group + i] = kNone;
      }
      take_top(vr, E, k, ip + r * k);
    }
  });
  return indices;
}

namespace {

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void check_attention_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4 && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "fused_cpu::causal_attention: q, k [B, H, T, D] and v [B, H, T, Dv] expected, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
}

}  // namespace

std::pair<at::Tensor, at::Tensor> causal_attention(const at::Tensor& q_in, const at::Tensor& k_in,
                                                   const at::Tensor& v_in, double scale_in) {
  RECORD_FUNCTION("moetrain::fused_cpu::causal_attention", std::vector<c10::IValue>());
  check_attention_operands(q_in, k_in, v_in);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Dv = v.size(3);
  at::Tensor o = at::empty({B, T, H, Dv}, q.options()), lse = at::empty({B, H, T}, q.options());
  const HeadRows Q(q), K(k), V(v);
  float* op = o.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const auto scale = static_cast<float>(scale_in);
  // One (batch, head) pair per task, whole: the results do not depend on the thread count.
  at::parallel_for(0, B * H, 1, [&](int64_t pb, int64_t pe) {
    std::vector<float> kt(D * T), s(kQueryBlock * T);
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t b = p / H, h = p % H;
      const float *qp = Q.pair(b, h), *kp = K.pair(b, h), *vp = V.pair(b, h);
      float* out = op + (b * T * H + h) * Dv;  // query t's row at out + t·H·Dv
      transpose_into(kp, K.st, kt.data(), T, T, D);
      for (int64_t first = 0; first < T; first += kQueryBlock) {
        const int64_t rows = std::min(kQueryBlock, T - first), n = first + rows;
        small_gemm(qp + first * Q.st, Q.st, 1, kt.data(), T, s.data(), n, rows, n, D, false);
        causal_softmax_rows(s.data(), n, rows, first, n, scale, lp + p * T + first);
        small_gemm(s.data(), n, 1, vp, V.st, out + first * H * Dv, H * Dv, rows, Dv, n, false);
      }
    }
  });
  return {o.transpose(1, 2), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(const at::Tensor& dout_in,
                                                                         const at::Tensor& q_in, const at::Tensor& k_in,
                                                                         const at::Tensor& v_in, const at::Tensor& o_in,
                                                                         const at::Tensor& lse_in, double scale_in) {
  RECORD_FUNCTION("moetrain::fused_cpu::causal_attention_backward", std::vector<c10::IValue>());
  check_attention_operands(q_in, k_in, v_in);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor o = last_dim_contiguous(o_in), dout = last_dim_contiguous(dout_in), lse = lse_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Dv = v.size(3);
  at::Tensor dq = at::empty({B, T, H, D}, q.options()), dk = at::empty({B, T, H, D}, q.options()),
             dv = at::empty({B, T, H, Dv}, q.options());
  const HeadRows Q(q), K(k), V(v), O(o), dO(dout);
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const float* lp = lse.const_data_ptr<float>();
  const auto scale = static_cast<float>(scale_in);
  at::parallel_for(0, B * H, 1, [&](int64_t pb, int64_t pe) {
    std::vector<float> kt(D * T), vt(Dv * T), s(kQueryBlock * T), ds(kQueryBlock * T), dkt(D * T), dvt(Dv * T),
        delta(T);
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t b = p / H, h = p % H;
      const float *qp = Q.pair(b, h), *kp = K.pair(b, h), *vp = V.pair(b, h), *opr = O.pair(b, h),
                  *gp = dO.pair(b, h);
      transpose_into(kp, K.st, kt.data(), T, T, D);
      transpose_into(vp, V.st, vt.data(), T, T, Dv);
      std::fill(dkt.begin(), dkt.end(), 0.0f);
      std::fill(dvt.begin(), dvt.end(), 0.0f);
      for (int64_t t = 0; t < T; ++t) {  // delta_t = dO_t · O_t, the softmax backward's row term
        float acc = 0;
        for (int64_t c = 0; c < Dv; ++c) acc += gp[t * dO.st + c] * opr[t * O.st + c];
        delta[t] = acc;
      }
      for (int64_t first = 0; first < T; first += kQueryBlock) {
        const int64_t rows = std::min(kQueryBlock, T - first), n = first + rows;
        const float *qb = qp + first * Q.st, *gb = gp + first * dO.st;
        small_gemm(qb, Q.st, 1, kt.data(), T, s.data(), n, rows, n, D, false);  // the scores again
        causal_probabilities_rows(s.data(), n, rows, first, n, scale, lp + p * T + first);
        small_gemm(gb, 1, dO.st, s.data(), n, dvt.data(), T, Dv, n, rows, true);   // dVᵀ += dOᵀ·P
        small_gemm(gb, dO.st, 1, vt.data(), T, ds.data(), n, rows, n, Dv, false);  // dP = dO·Vᵀ
        softmax_grad_rows(s.data(), ds.data(), n, rows, n, scale, delta.data() + first);
        small_gemm(ds.data(), n, 1, kp, K.st, dqp + (b * T * H + h) * D + first * H * D, H * D, rows, D, n,
                   false);                                                            // dQ = dS·K
        small_gemm(qb, 1, Q.st, ds.data(), n, dkt.data(), T, D, n, rows, true);     // dKᵀ += Qᵀ·dS
      }
      transpose_into(dkt.data(), T, dkp + (b * T * H + h) * D, H * D, D, T);
      transpose_into(dvt.data(), T, dvp + (b * T * H + h) * Dv, H * Dv, Dv, T);
    }
  });
  return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)};
}

namespace {

// The rows of each expert's block from the int32 cumulative ends.
std::vector<int64_t> block_starts(const at::Tensor& ends_in, int64_t rows) {
  const at::Tensor ends = ends_in.to(at::kCPU, at::kLong).contiguous();
  const int64_t* ep = ends.const_data_ptr<int64_t>();
  std::vector<int64_t> starts{0};
  for (int64_t e = 0; e < ends.numel(); ++e) starts.push_back(ep[e]);
  TORCH_CHECK(starts.back() <= rows, "fused_cpu::grouped_gemm: the groups end at row ", starts.back(), " of ", rows);
  return starts;
}

// Tasks of up to `per_task` units of each expert's `units(e)`: {expert, first unit, units}, in expert order.
template <class Units>
std::vector<std::array<int64_t, 3>> expert_tasks(int64_t experts, int64_t per_task, const Units& units) {
  std::vector<std::array<int64_t, 3>> tasks;
  for (int64_t e = 0; e < experts; ++e)
    for (int64_t u = 0; u < units(e); u += per_task) tasks.push_back({e, u, std::min(per_task, units(e) - u)});
  return tasks;
}

}  // namespace

at::Tensor grouped_gemm(const at::Tensor& x_in, const at::Tensor& b_in, const at::Tensor& ends) {
  RECORD_FUNCTION("moetrain::fused_cpu::grouped_gemm", std::vector<c10::IValue>());
  const at::Tensor x = x_in.contiguous(), b = b_in.contiguous();
  TORCH_CHECK(x.dim() == 2 && b.dim() == 3 && b.size(1) == x.size(1) && b.size(0) == ends.numel(),
              "fused_cpu::grouped_gemm: x [rows, K] and b [E, K, N] expected, got ", x.sizes(), " and ", b.sizes());
  const int64_t K = x.size(1), N = b.size(2);
  const std::vector<int64_t> starts = block_starts(ends, x.size(0));
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  y.narrow(0, starts.back(), x.size(0) - starts.back()).zero_();  // rows after the last group: 0, as at::_grouped_mm's
  const float *xp = x.const_data_ptr<float>(), *bp = b.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto tasks = expert_tasks(b.size(0), 64, [&](int64_t e) { return starts[e + 1] - starts[e]; });
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const auto [e, first, rows] = tasks[t];
      const int64_t r = starts[e] + first;
      small_gemm(xp + r * K, K, 1, bp + e * K * N, N, yp + r * N, N, rows, N, K, false);
    }
  });
  return y;
}

at::Tensor grouped_gemm_tn(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& ends) {
  RECORD_FUNCTION("moetrain::fused_cpu::grouped_gemm_tn", std::vector<c10::IValue>());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0),
              "fused_cpu::grouped_gemm_tn: dy [rows, N] and x [rows, K] expected, got ", dy.sizes(), " and ",
              x.sizes());
  const int64_t N = dy.size(1), K = x.size(1), E = ends.numel();
  const std::vector<int64_t> starts = block_starts(ends, x.size(0));
  at::Tensor out = at::empty({E, N, K}, x.options());
  const float *gp = dy.const_data_ptr<float>(), *xp = x.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Each task: 32 rows of one expert's [N, K] gradient, summed over all of the expert's tokens in token order.
  const auto tasks = expert_tasks(E, 32, [&](int64_t) { return N; });
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const auto [e, first, rows] = tasks[t];
      const int64_t r = starts[e];
      small_gemm(gp + r * N + first, 1, N, xp + r * K, K, op + (e * N + first) * K, K, rows, K, starts[e + 1] - r,
                 false);
    }
  });
  return out;
}

}  // namespace moetrain::model::fused_cpu
