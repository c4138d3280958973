// Shared helpers of the CPU kernels: accumulation type and vector loads that widen to it.
//
// Vectorized<T> comes from ATen's header-only SIMD layer; setup.py compiles with CPU_CAPABILITY=AVX2 so
// it is the AVX2/FMA implementation (the same code ATen's own kernels run on this CPU class).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace skd::cpu {

using at::vec::Vectorized;

// fp64 inputs accumulate in fp64 (gradcheck, statistics users want exact); everything else in fp32.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Loads Vectorized<acc_t<scalar_t>>::size() consecutive elements, widened to the accumulation type.
template <typename scalar_t>
inline Vectorized<acc_t<scalar_t>> load_acc(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return Vectorized<scalar_t>::loadu(p);
  } else {
    Vectorized<float> v;
    at::vec::load_to_float(p, v);
    return v;
  }
}

// Every dtype the kernels take: fp32, fp64, bf16, fp16.
#define SKD_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace skd::cpu
