// AVX-512 helpers of the CPU kernels, for CPUs that have it (checked at run time: the extension itself is built
// for AVX2). Functions carry their own target attribute, so nothing here runs on a CPU without AVX-512.
#pragma once

#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>

// GCC 12 flags the placeholder operand of its own masked/reduce intrinsics as uninitialised.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace skd::cpu {

// AVX-512 F/BW/VL/DQ (masked 16-bit loads and stores need BW and VL), unless SKD_CPU_AVX2_ONLY is set: the
// tests use it to run the AVX2 path an AVX-512 machine would otherwise never take.
inline bool has_avx512() {
  static const bool yes = std::getenv("SKD_CPU_AVX2_ONLY") == nullptr && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq");
  return yes;
}

// AVX512_BF16 too (vcvtneps2bf16: fp32 -> bf16 rounded to nearest even in one instruction), unless
// SKD_CPU_AVX2_ONLY or SKD_CPU_NO_AVX512_BF16 is set (the tests' way to run the integer rounding).
inline bool has_avx512_bf16() {
  static const bool yes = has_avx512() && std::getenv("SKD_CPU_NO_AVX512_BF16") == nullptr &&
                          __builtin_cpu_supports("avx512bf16");
  return yes;
}

#define SKD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
// For the functions that may store bf16 through vcvtneps2bf16: they run it only where has_avx512_bf16().
#define SKD_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// The mask of lanes t .. min(t + 16, n) - 1 of a row of n values, for the step at t (t < n).
inline __mmask16 lanes16(int64_t n, int64_t t) {
  return n - t >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - t)) - 1);
}

// The k lanes of 16 consecutive T, widened to float (other lanes 0).
template <typename T>
SKD_AVX512 inline __m512 load16(const T* p, __mmask16 k) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  } else {
    static_assert(std::is_same_v<T, c10::Half>);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
  }
}

// Stores the k lanes of v as T, rounded to nearest even (bf16: as c10's round_to_nearest_even, by
// vcvtneps2bf16 when kNativeBF16; NaN stays NaN).
template <typename T, bool kNativeBF16>
SKD_AVX512_BF16 inline void store16(T* p, __m512 v, __mmask16 k) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, k, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16> && kNativeBF16) {
    _mm256_mask_storeu_epi16(p, k, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(r));
  } else {
    static_assert(std::is_same_v<T, c10::Half>);
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

}  // namespace skd::cpu

#pragma GCC diagnostic pop
