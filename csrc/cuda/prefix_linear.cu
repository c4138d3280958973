// prefix_linear on CUDA: y = act(x[..., :k_in] @ W[:k_out, :k_in]^T + b[:k_out]).
//
// cuBLAS runs the GEMM on strided views: the weight block keeps the full weight's row stride (cuBLAS's
// leading dimension), so the weight is never copied. Without an activation the bias rides in the GEMM
// (addmm's bias epilogue); with GELU, bias + GELU run as one vectorised elementwise pass over y.
#include <torch/library.h>

#include <cmath>

#include "../prefix_linear_operands.h"
#include "common.cuh"

namespace skd::cuda {
namespace {

// GELU in the accumulation type, ATen's formulas. tanh is written through exp(-2|u|) <= 1: no overflow,
// and it stays accurate under --use_fast_math (which may swap tanhf for a coarse hardware approximation).
template <Act kAct, typename T>
__device__ __forceinline__ T apply_act(T v) {
  if constexpr (kAct == Act::kGelu) {
    return T(0.5) * v * (T(1) + erf(v * T(M_SQRT1_2)));
  } else if constexpr (kAct == Act::kGeluTanh) {
    const T u = T(M_2_SQRTPI * M_SQRT1_2) * (v + T(0.044715) * v * v * v);
    const T e = exp(T(-2) * (u < T(0) ? -u : u));
    const T th = (T(1) - e) / (T(1) + e);
    return T(0.5) * v * (T(1) + (u < T(0) ? -th : th));
  } else {
    return v;
  }
}

// Elements per thread: 16 bytes of scalar_t, one vector load/store when a row allows it.
template <typename scalar_t>
constexpr int kVec = 16 / sizeof(scalar_t);

template <typename scalar_t, int kWidth>
struct alignas(sizeof(scalar_t) * kWidth) Pack {
  scalar_t v[kWidth];
};

// y (M, N) row-major, in place: y = act(y + bias[col]). kWidth consecutive elements per thread, within one
// row (N % kWidth == 0 and y's base aligned to the pack size, checked by the caller).
template <typename scalar_t, Act kAct, int kWidth>
__global__ void bias_act_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ bias, int64_t stride_bias,
                                int64_t packs, int64_t N) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, kWidth>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    P p = reinterpret_cast<P*>(y)[i];
    const int64_t col = (i * kWidth) % N;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      acc v = static_cast<acc>(p.v[j]);
      if (bias != nullptr) v += static_cast<acc>(bias[(col + j) * stride_bias]);
      p.v[j] = static_cast<scalar_t>(apply_act<kAct>(v));
    }
    reinterpret_cast<P*>(y)[i] = p;
  }
}

template <typename scalar_t, Act kAct>
void launch_bias_act(at::Tensor& y, const scalar_t* bias, int64_t stride_bias) {
  const int64_t N = y.size(1), numel = y.numel();
  scalar_t* out = y.mutable_data_ptr<scalar_t>();
  const bool vec = N % kVec<scalar_t> == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int64_t packs = vec ? numel / kVec<scalar_t> : numel;
  constexpr int kThreads = 256;
  // Enough blocks to fill any GPU; the grid-stride loop covers the rest.
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(packs, kThreads), 65536));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vec) {
    bias_act_kernel<scalar_t, kAct, kVec<scalar_t>><<<blocks, kThreads, 0, stream>>>(out, bias, stride_bias, packs, N);
  } else {
    bias_act_kernel<scalar_t, kAct, 1><<<blocks, kThreads, 0, stream>>>(out, bias, stride_bias, packs, N);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor prefix_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              int64_t k_in, int64_t k_out, c10::string_view activation) {
  TORCH_CHECK(x.is_cuda() && weight.is_cuda(), "x and weight must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(x.device());  // cuBLAS, the epilogue and its stream: x's device
  const PrefixGemm g = prefix_gemm_operands(x, weight, bias, k_in, k_out, activation);
  const at::Tensor& b = g.bias;
  const bool has_bias = b.defined();
  const Act act = g.act;
  at::Tensor y = at::empty({g.x2.size(0), k_out}, x.options());

  if (act == Act::kNone && has_bias) {
    at::addmm_out(y, b, g.x2, g.w_t);  // k_in == 0 gives the broadcast bias
  } else {
    at::mm_out(y, g.x2, g.w_t);  // k_in == 0 gives zeros
    if (act != Act::kNone && y.numel() > 0) {
      SKD_DISPATCH_FLOATS(x.scalar_type(), "skd_prefix_linear_cuda_epilogue", [&] {
        const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
        const int64_t sb = has_bias ? b.stride(0) : 0;
        if (act == Act::kGelu) {
          launch_bias_act<scalar_t, Act::kGelu>(y, bp, sb);
        } else {
          launch_bias_act<scalar_t, Act::kGeluTanh>(y, bp, sb);
        }
      });
    }
  }
  return y.view(g.out_shape);
}

}  // namespace
}  // namespace skd::cuda

TORCH_LIBRARY_IMPL(skd_kernels, CUDA, m) {
  m.impl("prefix_linear", &skd::cuda::prefix_linear_cuda);
  m.impl("_prefix_linear_autograd", &skd::cuda::prefix_linear_cuda);
}
