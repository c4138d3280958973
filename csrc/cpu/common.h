// Shared helpers of the CPU kernels: vector loads that widen to the accumulation type (../dtypes.h).
//
// Vectorized<T> comes from ATen's header-only SIMD layer; setup.py compiles with CPU_CAPABILITY=AVX2 so
// it is the AVX2/FMA implementation (the same code ATen's own kernels run on this CPU class).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "../dtypes.h"

namespace skd::cpu {

using at::vec::Vectorized;

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

}  // namespace skd::cpu
