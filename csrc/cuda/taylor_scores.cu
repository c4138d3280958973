// taylor_scores on CUDA: token (B, T) = |Σ_c g·a| and channel (C,) = Σ_b |Σ_t g·a|, one pass over act/grad.
//
// One block per (sample b, tile of kTokens tokens). Its threads walk the channels (coalesced loads of a
// token row) and each keeps, in registers, its partial token sums and the per-channel sum over the tile.
// Token sums are then complete after one block reduction (warp shuffles + shared memory) and stored as
// |·|; per-channel sums are atomically added into a (B, C) accumulation-type scratch, whose |·| summed
// over b by a second tiny kernel (B·C reads) is the channel score. The atomics make the channel scores
// exact to rounding but not bitwise reproducible.
//
// Two instantiations of the pass: full tiles run without any per-token guard, and, when the channel rows
// are contiguous and 16-byte aligned, with one 16-byte load per operand and token (kVec elements); only
// the last, partial tile of each sample takes the guarded path.
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common.cuh"

namespace skd::cuda {
namespace {

constexpr int kTokens = 16;  // tokens per block: 2·16 independent loads per thread in flight
constexpr int kMaxThreads = 256;

// Elements of one 16-byte vector load.
template <typename scalar_t>
constexpr int kVecOf = 16 / static_cast<int>(sizeof(scalar_t));

template <typename scalar_t, int kWidth>
struct alignas(sizeof(scalar_t) * kWidth) Pack {
  scalar_t v[kWidth];
};

// kVec consecutive channels from p (kVec > 1: contiguous channels, p aligned to the pack) or one element.
template <int kVec, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, kVec> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, kVec>*>(p);
}

// kVec > 1 needs sac == sgc == 1 (checked by the caller); channel c's element is base[c * stride].
// kGuarded: the tile may be partial (tokens < kTokens); otherwise every token of the tile exists.
template <typename scalar_t, int kVec, bool kGuarded>
__global__ void __launch_bounds__(kMaxThreads)
    taylor_pass_kernel(const scalar_t* __restrict__ act, const scalar_t* __restrict__ grad, int64_t T, int64_t C,
                       int64_t sab, int64_t sat, int64_t sac, int64_t sgb, int64_t sgt, int64_t sgc,
                       int64_t tiles, int64_t first_tile, acc_t<scalar_t>* __restrict__ token,
                       acc_t<scalar_t>* __restrict__ per_sample) {
  using acc = acc_t<scalar_t>;
  __shared__ acc warp_tok[kMaxThreads / kWarp][kTokens];
  const int64_t b = blockIdx.x / tiles;
  const int64_t t0 = (first_tile + blockIdx.x % tiles) * kTokens;
  const int tokens = kGuarded ? static_cast<int>(std::min<int64_t>(kTokens, T - t0)) : kTokens;
  const scalar_t* a_base = act + b * sab + t0 * sat;
  const scalar_t* g_base = grad + b * sgb + t0 * sgt;

  acc tok[kTokens];
#pragma unroll
  for (int t = 0; t < kTokens; ++t) tok[t] = acc(0);
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * kVec; c < C; c += static_cast<int64_t>(blockDim.x) * kVec) {
    acc chan[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) chan[j] = acc(0);
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      if (!kGuarded || t < tokens) {
        const auto a = load_pack<kVec>(a_base + t * sat + c * sac);
        const auto g = load_pack<kVec>(g_base + t * sgt + c * sgc);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const acc p = static_cast<acc>(a.v[j]) * static_cast<acc>(g.v[j]);
          tok[t] += p;
          chan[j] += p;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) atomicAdd(per_sample + b * C + c + j, chan[j]);
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

// Whether (B, T, C) tensor t can be read kVec channels at a time: contiguous channels, and every token
// row starting on a 16-byte boundary.
bool vector_readable(const at::Tensor& t, int vec) {
  const int64_t C = t.size(2);
  return t.stride(2) == 1 && C % vec == 0 && (t.size(1) <= 1 || t.stride(1) % vec == 0) &&
         (t.size(0) <= 1 || t.stride(0) % vec == 0) && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// Threads for `units` channel loads per token row: as few loop rounds as kMaxThreads allows, split evenly
// (a multiple of a warp), so narrow rows do not leave most of a block idle.
int threads_for(int64_t units) {
  const int64_t rounds = ceil_div(units, kMaxThreads);
  return static_cast<int>(std::min<int64_t>(kMaxThreads, ceil_div(ceil_div(units, rounds), kWarp) * kWarp));
}

template <typename scalar_t, int kVec>
void launch_passes(const at::Tensor& act, const at::Tensor& grad, at::Tensor& token, at::Tensor& per_sample,
                   cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  const int64_t B = act.size(0), T = act.size(1), C = act.size(2);
  const int64_t full = T / kTokens;
  const int threads = threads_for(ceil_div(C, kVec));
  const auto launch = [&](auto guarded, int64_t tiles, int64_t first_tile) {
    const int64_t blocks = B * tiles;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "taylor_scores: B*T too large for one grid");
    taylor_pass_kernel<scalar_t, kVec, decltype(guarded)::value><<<static_cast<unsigned>(blocks), threads, 0,
                                                                   stream>>>(
        act.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), T, C, act.stride(0), act.stride(1),
        act.stride(2), grad.stride(0), grad.stride(1), grad.stride(2), tiles, first_tile,
        token.mutable_data_ptr<acc>(), per_sample.mutable_data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (full > 0) launch(std::false_type{}, full, 0);
  if (T % kTokens != 0) launch(std::true_type{}, 1, full);
}

std::tuple<at::Tensor, at::Tensor> taylor_scores_cuda(const at::Tensor& act, const at::Tensor& grad) {
  TORCH_CHECK(act.is_cuda() && grad.is_cuda() && act.device() == grad.device(),
              "act and grad must be CUDA tensors on one device");
  TORCH_CHECK(act.dim() == 3 && act.sizes() == grad.sizes(), "act, grad must be (B, T, C) of one shape");
  TORCH_CHECK(act.scalar_type() == grad.scalar_type(), "act and grad must share a dtype");
  const c10::cuda::CUDAGuard guard(act.device());  // launches and the stream below: act's device
  const int64_t B = act.size(0), T = act.size(1), C = act.size(2);
  const auto opts = act.options().dtype(acc_dtype(act.scalar_type()));
  // Launched, the kernels write every score; otherwise they are sums of nothing, zero.
  if (B == 0 || T == 0 || C == 0) return {at::zeros({B, T}, opts), at::zeros({C}, opts)};
  at::Tensor token = at::empty({B, T}, opts);
  at::Tensor channel = at::empty({C}, opts);
  at::Tensor per_sample = at::zeros({B, C}, opts);  // the atomics add into it

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SKD_DISPATCH_FLOATS(act.scalar_type(), "skd_taylor_scores_cuda", [&] {
    using acc = acc_t<scalar_t>;
    constexpr int kVec = kVecOf<scalar_t>;
    if (vector_readable(act, kVec) && vector_readable(grad, kVec)) {
      launch_passes<scalar_t, kVec>(act, grad, token, per_sample, stream);
    } else {
      launch_passes<scalar_t, 1>(act, grad, token, per_sample, stream);
    }
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
