// One online-softmax row step in AVX-512, for CPUs that have it (checked at run time: the extension itself is
// built for AVX2, whose 8-wide exp made the softmax 40 % of prefix_attention where ATen's flash attention,
// dispatched to AVX-512, spends half that). Functions carry their own target attribute, so nothing here
// runs on a CPU without AVX-512.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "avx512.h"

// GCC 12 flags the placeholder operand of its own masked/reduce intrinsics as uninitialised.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace skd::cpu {

// exp(x) for 16 softmax arguments x (a score minus the row's running max: <= 0, or above it by half an ulp of
// the max where the scale is folded in): Cody-Waite reduction x = n ln2 + f, |f| <= ln2/2, a polynomial for e^f,
// times 2^n by scalef. kDegree 5: ATen's exp_u20 coefficients, the exp of its flash attention (a few ulp; the
// degree-7 Cephes one cost 3 more of the exp pass's ~20 vector ops). kDegree 3: near-minimax coefficients fitted
// for relative error on [-ln2/2, ln2/2], max 7.5e-5, 50x below bf16's half ulp (2^-9), for bf16 probabilities
// (two fewer FMAs per 16 scores). x below the smallest normal's log (and -inf) gives 0; NaN stays NaN (max returns
// its second operand, x, when it is NaN, and every step after keeps it). No upper clamp (4 % of the bf16 op):
// x reaches log(FLT_MAX) only for scores beyond 2^31, whose row sum overflows with or without one.
template <int kDegree>
SKD_AVX512 inline __m512 exp16(__m512 x) {
  static_assert(kDegree == 3 || kDegree == 5);
  const __m512 lo = _mm512_set1_ps(-87.3365447f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  const __m512 xc = _mm512_max_ps(lo, x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p;
  if constexpr (kDegree == 5) {
    p = _mm512_set1_ps(0.00828929059f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0418978221f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.166676521f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.499991506f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.999999701f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  } else {
    p = _mm512_set1_ps(0.165665925f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.504959583f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.00016415f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.999928176f));
  }
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), _mm512_scalef_ps(p, n));
}

// p = exp(x * scale - shift) for the k lanes of 16 scores at x, stored to probs as T and returned (the lanes
// outside k are not stored, and the caller's masked sum skips them).
template <typename T, bool kNativeBF16, int kExpDegree>
SKD_AVX512_BF16 inline __m512 exp_store16(const float* x, __m512 scale, __m512 shift, T* probs, __mmask16 k) {
  const __m512 p = exp16<kExpDegree>(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, x), scale, shift));
  store16<T, kNativeBF16>(probs, p, k);
  return p;
}

// Online-softmax update of one fp32 score row x * scale (n values) plus its bias row if any (T*):
// p = exp(x * scale + bias - m_new) goes to probs (T: the input dtype, the second product's operand; may be x
// itself for fp32). m and l are the row's running max and sum; returns exp(m_old - m_new), the factor that
// rescales the row's running sum and output (0 while the row has seen only -inf).
// Without a bias and with scale > 0 the scale is folded into the exp pass (max(x * scale) = max(x) * scale,
// p = exp(fma(x, scale, -m_new))), so the max pass only reads x; otherwise it stores x * scale + bias first.
// (With both, and vcvtneps2bf16 for bf16, the step measured ~1/3 faster on ViT shapes.)
template <typename T, bool kNativeBF16>
SKD_AVX512_BF16 float softmax_step_avx512_impl(float* x, float scale, const T* bias, int64_t n, float& m, float& l,
                                               T* probs) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  // bf16 probabilities are rounded to 8 bits: the degree-3 exp's 7.5e-5 vanishes in that rounding.
  constexpr int kExpDegree = std::is_same_v<T, c10::BFloat16> ? 3 : 5;
  const bool fold = bias == nullptr && scale > 0.f;
  const bool rewrite = !fold && (scale != 1.f || bias != nullptr);
  __m512 vmax = _mm512_set1_ps(-kInf);
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 k = lanes16(n, t);
    __m512 v = _mm512_maskz_loadu_ps(k, x + t);
    if (rewrite) {
      v = _mm512_mul_ps(v, _mm512_set1_ps(scale));
      if (bias != nullptr) v = _mm512_add_ps(v, load16(bias + t, k));
      _mm512_mask_storeu_ps(x + t, k, v);
    }
    vmax = _mm512_mask_max_ps(vmax, k, vmax, v);
  }
  const float row_max = _mm512_reduce_max_ps(vmax);
  const float m_new = std::max(m, fold ? row_max * scale : row_max);
  // A row whose scores are all -inf so far (a fully masked tile) keeps p = 0 instead of exp(nan).
  const float shift = m_new == -kInf ? 0.f : m_new;
  const __m512 vscale = _mm512_set1_ps(fold ? scale : 1.f), vshift = _mm512_set1_ps(shift);
  // Two sums over pairs of full vectors, then a masked tail: the exp chains of neighbouring vectors overlap.
  __m512 vsum = _mm512_setzero_ps(), vsum2 = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 32 <= n; t += 32) {
    const __m512 p0 = exp_store16<T, kNativeBF16, kExpDegree>(x + t, vscale, vshift, probs + t, 0xffff);
    const __m512 p1 = exp_store16<T, kNativeBF16, kExpDegree>(x + t + 16, vscale, vshift, probs + t + 16, 0xffff);
    vsum = _mm512_add_ps(vsum, p0);
    vsum2 = _mm512_add_ps(vsum2, p1);
  }
  for (; t < n; t += 16) {
    const __mmask16 k = lanes16(n, t);
    const __m512 p = exp_store16<T, kNativeBF16, kExpDegree>(x + t, vscale, vshift, probs + t, k);
    vsum = _mm512_mask_add_ps(vsum, k, vsum, p);
  }
  vsum = _mm512_add_ps(vsum, vsum2);
  const float alpha = m == -kInf ? 0.f : std::exp(m - shift);
  l = l * alpha + _mm512_reduce_add_ps(vsum);
  m = m_new;
  return alpha;
}

// softmax_step_avx512_impl with vcvtneps2bf16 for bf16 where the CPU has it.
template <typename T>
float softmax_step_avx512(float* x, float scale, const T* bias, int64_t n, float& m, float& l, T* probs) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (has_avx512_bf16()) return softmax_step_avx512_impl<T, true>(x, scale, bias, n, m, l, probs);
  }
  return softmax_step_avx512_impl<T, false>(x, scale, bias, n, m, l, probs);
}

}  // namespace skd::cpu

#pragma GCC diagnostic pop
