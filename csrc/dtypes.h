// Accumulation type and dtype dispatch shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <type_traits>

namespace skd {

// fp64 inputs accumulate in fp64 (gradcheck, statistics users want exact); fp32/fp16/bf16 in fp32.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace skd

// Every dtype the kernels take: fp32, fp64, bf16, fp16.
#define SKD_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
