// taylor_scores on CUDA: token (B, T) = |Σ_c g·a| and channel (C,) = Σ_b |Σ_t g·a|, one pass over act/grad.
//
// One block per (sample b, tile of kTokens tokens). Its threads walk the channels (coalesced loads of a
// token row) and each keeps, in registers, its partial token sums and the per-channel sum over the tile.
// Token sums are then complete after one block reduction (warp shuffles + shared memory) and stored as
// |·|; per-channel sums are atomically added into a (B, C) accumulation-type scratch, whose |·| summed
// over b by a second tiny kernel (B·C reads) is the channel score. The atomics make the channel scores
// exact to rounding but not bitwise reproducible.
#include <torch/library.h>

#include <algorithm>

#include "common.cuh"

namespace skd::cuda {
namespace {

constexpr int kTokens = 16;      // tokens per block: 16 independent loads per operand in flight per thread
constexpr int kMaxThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
    taylor_pass_kernel(const scalar_t* __restrict__ act, const scalar_t* __restrict__ grad, int64_t T, int64_t C,
                       int64_t sab, int64_t sat, int64_t sac, int64_t sgb, int64_t sgt, int64_t sgc,
                       int64_t token_tiles, acc_t<scalar_t>* __restrict__ token,
                       acc_t<scalar_t>* __restrict__ per_sample) {
  using acc = acc_t<scalar_t>;
  __shared__ acc warp_tok[kMaxThreads / kWarp][kTokens];
  const int64_t b = blockIdx.x / token_tiles;
  const int64_t t0 = (blockIdx.x % token_tiles) * kTokens;
  const int tokens = static_cast<int>(std::min<int64_t>(kTokens, T - t0));
  const scalar_t* a_base = act + b * sab + t0 * sat;
  const scalar_t* g_base = grad + b * sgb + t0 * sgt;

  acc tok[kTokens];
#pragma unroll
  for (int t = 0; t < kTokens; ++t) tok[t] = acc(0);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc chan = acc(0);
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      if (t < tokens) {
        const acc p = static_cast<acc>(a_base[t * sat + c * sac]) * static_cast<acc>(g_base[t * sgt + c * sgc]);
        tok[t] += p;
        chan += p;
      }
    }
    atomicAdd(per_sample + b * C + c, chan);
  }

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
    const acc s = warp_sum(tok[t]);
    if (lane == 0) warp_tok[warp][t] = s;
  }
  __syncthreads();
  if (threadIdx.x < tokens) {
    acc s = acc(0);
    for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) s += warp_tok[w][threadIdx.x];
    token[b * T + t0 + threadIdx.x] = s < acc(0) ? -s : s;
  }
}

// channel[c] = Σ_b |per_sample[b, c]|, in b order (deterministic given per_sample).
template <typename acc>
__global__ void channel_abs_sum_kernel(const acc* __restrict__ per_sample, int64_t B, int64_t C,
                                       acc* __restrict__ channel) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc s = acc(0);
  for (int64_t b = 0; b < B; ++b) {
    const acc v = per_sample[b * C + c];
    s += v < acc(0) ? -v : v;
  }
  channel[c] = s;
}

std::tuple<at::Tensor, at::Tensor> taylor_scores_cuda(const at::Tensor& act, const at::Tensor& grad) {
  TORCH_CHECK(act.is_cuda() && grad.is_cuda(), "act and grad must be CUDA tensors");
  TORCH_CHECK(act.dim() == 3 && act.sizes() == grad.sizes(), "act, grad must be (B, T, C) of one shape");
  TORCH_CHECK(act.scalar_type() == grad.scalar_type(), "act and grad must share a dtype");
  const int64_t B = act.size(0), T = act.size(1), C = act.size(2);
  const auto opts = act.options().dtype(acc_dtype(act.scalar_type()));
  // Launched, the kernels write every score; otherwise they are sums of nothing, zero.
  if (B == 0 || T == 0 || C == 0) return {at::zeros({B, T}, opts), at::zeros({C}, opts)};
  at::Tensor token = at::empty({B, T}, opts);
  at::Tensor channel = at::empty({C}, opts);
  at::Tensor per_sample = at::zeros({B, C}, opts);  // the atomics add into it

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t token_tiles = ceil_div(T, kTokens);
  // Narrow C: fewer threads (a multiple of a warp) instead of idle ones.
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, ceil_div(C, kWarp) * kWarp));
  SKD_DISPATCH_FLOATS(act.scalar_type(), "skd_taylor_scores_cuda", [&] {
    using acc = acc_t<scalar_t>;
    taylor_pass_kernel<scalar_t><<<static_cast<unsigned>(B * token_tiles), threads, 0, stream>>>(
        act.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), T, C, act.stride(0), act.stride(1),
        act.stride(2), grad.stride(0), grad.stride(1), grad.stride(2), token_tiles, token.mutable_data_ptr<acc>(),
        per_sample.mutable_data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    channel_abs_sum_kernel<acc><<<static_cast<unsigned>(ceil_div(C, kMaxThreads)), kMaxThreads, 0, stream>>>(
        per_sample.const_data_ptr<acc>(), B, C, channel.mutable_data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {token, channel};
}

}  // namespace
}  // namespace skd::cuda

TORCH_LIBRARY_IMPL(skd_kernels, CUDA, m) {
  m.impl("taylor_scores", &skd::cuda::taylor_scores_cuda);
}
