// add_layer_norm on CPU: s = x + residual rounded to the input dtype, out = LayerNorm(s) over the last dim, in one
// pass over memory (a pre-norm transformer's residual add and the next norm; ATen runs them as two kernels, and
// its bf16 LayerNorm reads at ~9 GB/s here against ~23 GB/s in fp32).
//
// Each row (D values) is summed, rounded and stored, then read back from L1 twice: the mean, then the variance
// around it (two-pass, as ATen's LayerNorm), both in fp32, then normalised with weight and bias and rounded. AVX-512
// for fp32/bf16/fp16 where the CPU has it; otherwise (and for fp64) ATen's add and layer_norm, the reference's
// computation.
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "avx512.h"
#include "common.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace skd::cpu {
namespace {

// Rows [begin, end) of x and r (D values each, unit stride, rows `ld` apart) into s and out (contiguous rows).
template <typename T, bool kNativeBF16>
SKD_AVX512_BF16 void rows_avx512(const T* x, const T* r, const T* w, const T* b, float eps, int64_t D, int64_t ld_x,
                                 int64_t ld_r, int64_t begin, int64_t end, T* s, T* out) {
  const float inv_d = 1.f / static_cast<float>(D);
  for (int64_t i = begin; i < end; ++i) {
    const T* xi = x + i * ld_x;
    const T* ri = r + i * ld_r;
    T* si = s + i * D;
    T* oi = out + i * D;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t t = 0; t < D; t += 16) {
      const __mmask16 k = lanes16(D, t);
      store16<T, kNativeBF16>(si + t, _mm512_add_ps(load16(xi + t, k), load16(ri + t, k)), k);
      acc = _mm512_add_ps(acc, load16(si + t, k));  // the rounded sum, as F.layer_norm(x + r) reads it
    }
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(acc) * inv_d);
    __m512 sq = _mm512_setzero_ps();
    for (int64_t t = 0; t < D; t += 16) {
      const __mmask16 k = lanes16(D, t);
      const __m512 c = _mm512_maskz_sub_ps(k, load16(si + t, k), mean);
      sq = _mm512_fmadd_ps(c, c, sq);
    }
    const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(sq) * inv_d + eps));
    for (int64_t t = 0; t < D; t += 16) {
      const __mmask16 k = lanes16(D, t);
      __m512 y = _mm512_mul_ps(_mm512_sub_ps(load16(si + t, k), mean), rstd);
      if (w != nullptr) y = _mm512_mul_ps(y, load16(w + t, k));
      if (b != nullptr) y = _mm512_add_ps(y, load16(b + t, k));
      store16<T, kNativeBF16>(oi + t, y, k);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                      const std::optional<at::Tensor>& weight,
                                                      const std::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(x.dim() >= 1 && x.sizes() == residual.sizes(), "x and residual must share one shape (..., D), got ",
              x.sizes(), " and ", residual.sizes());
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.device() == residual.device(),
              "x and residual must share a dtype and a device");
  const int64_t D = x.size(-1);
  const bool has_w = weight.has_value() && weight->defined(), has_b = bias.has_value() && bias->defined();
  for (const auto* p : {&weight, &bias}) {
    if (p->has_value() && (*p)->defined()) {
      TORCH_CHECK((*p)->dim() == 1 && (*p)->size(0) == D && (*p)->scalar_type() == x.scalar_type() &&
                      (*p)->device() == x.device(),
                  "weight and bias must be (D,) = (", D, ",) in x's dtype and on its device");
    }
  }
  const auto st = x.scalar_type();
  const bool vec = has_avx512() && (st == at::kFloat || st == at::kBFloat16 || st == at::kHalf);
  if (!vec || x.numel() == 0) {  // (empty: no rows to reshape to)
    at::Tensor s = at::add(x, residual);
    return {s, at::layer_norm(s, {D}, weight, bias, eps)};
  }
  // Rows are read with unit stride, `ld` apart: a 2-D view of each input when its rows are, else a copy.
  const auto rows_of = [D](const at::Tensor& t) {
    at::Tensor v = t.reshape({-1, D});
    return v.stride(-1) == 1 ? v : v.contiguous();
  };
  const at::Tensor x2 = rows_of(x), r2 = rows_of(residual);
  const at::Tensor w = has_w ? weight->contiguous() : at::Tensor(), b = has_b ? bias->contiguous() : at::Tensor();
  at::Tensor s = at::empty(x.sizes(), x.options()), out = at::empty(x.sizes(), x.options());
  const int64_t M = x2.size(0);
  // ~64 KB of input per task: threads take rows, not parts of one
  const int64_t grain = std::max<int64_t>(1, 16384 / D);
  const float eps_f = static_cast<float>(eps);
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    const T* wp = has_w ? w.const_data_ptr<T>() : nullptr;
    const T* bp = has_b ? b.const_data_ptr<T>() : nullptr;
    const bool native = std::is_same_v<T, at::BFloat16> && has_avx512_bf16();
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
      (native ? rows_avx512<T, true> : rows_avx512<T, false>)(
          x2.const_data_ptr<T>(), r2.const_data_ptr<T>(), wp, bp, eps_f, D, x2.stride(0), r2.stride(0), begin, end,
          s.mutable_data_ptr<T>(), out.mutable_data_ptr<T>());
    });
  };
  if (st == at::kFloat) {
    run(float(0));
  } else if (st == at::kBFloat16) {
    run(at::BFloat16(0.f));
  } else {
    run(at::Half(0.f));
  }
  return {s, out};
}

}  // namespace
}  // namespace skd::cpu

#pragma GCC diagnostic pop

TORCH_LIBRARY_IMPL(skd_kernels, CPU, m) { m.impl("add_layer_norm", &skd::cpu::add_layer_norm_cpu); }
