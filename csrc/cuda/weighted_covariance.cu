// weighted_covariance on CUDA: per group Σw, Σ w x and Σ w x x^T of one batch.
//
// bf16/fp16/fp32 x: one fused tensor-core kernel reads x once. Each block owns one 64×64 tile of one
// group's r×r output (tiles on or above the diagonal; the mirror is a transposed store) and a slice of the
// rows. Per 32-row step it stages in shared memory, as bf16 (the next step's x is loaded into registers
// meanwhile):
//   A = w·x computed in fp32 and split A = A_hi + A_lo (both bf16, ~16 significant bits together), and
//   B = x: exact in bf16 for bf16 x; split B = B_hi + B_lo for fp16 x (exact: 11 bits) and fp32 x.
// WMMA (bf16 × bf16 → fp32) then adds A_hi^T B_hi + A_lo^T B_hi (+ A_hi^T B_lo for fp16/fp32 x; the
// A_lo^T B_lo term is below fp32 rounding). The result has fp32 accuracy: the weights are never rounded to
// x's dtype, and bf16's fp32 exponent range means no w·x overflows or underflows where fp32 does not (an
// fp16 split would overflow at w·x > 65504 and lose w·x < 6e-8). Row slices add their tiles into the
// zeroed outputs with fp32 atomics (exact to rounding, not bitwise reproducible). The diagonal tiles also
// add Σ w x from the fp32 products they form anyway.
// Tensor cores truncate when they align an addend to the fp32 accumulator (Fasi et al. 2021), a bias that
// grows with the accumulator: over a 460k-row slice the diagonal Σ w x² came out 2.4e-3 low (H200). So the
// MMAs accumulate kFlushSteps steps at a time and each partial is added with round-to-nearest fp32 adds.
//
// fp64 x: one kernel writes Y = diag(sqrt(w)) X for a chunk of rows into an fp64 workspace while adding
// Σ w x = Σ sqrt(w)·y, then cuBLAS adds Y_g^T Y_g for every group in one strided batched GEMM (baddbmm on
// views, no copy).
#include <cuda_bf16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common.cuh"

namespace skd::cuda {
namespace {

// ---- bf16/fp16/fp32: the fused tensor-core kernel ------------------------------------------------------------

constexpr int kTile = 64;         // output tile side
constexpr int kStep = 32;         // rows of x per staged step (the MMAs' K)
constexpr int kPad = 8;           // bf16 row padding of the staged tiles: 16 bytes, fewer bank conflicts
constexpr int kLd = kTile + kPad;
constexpr int kMmaThreads = 128;  // 4 warps in a 2×2 grid, each owning 32×32 = 2×2 fragments of 16×16
constexpr int kFrag = 16;
constexpr int kFlushSteps = 32;   // steps (1024 rows) per MMA partial: a truncation bias below ~1e-6

// Splits v into bf16 hi + lo: hi = bf16(v), lo = bf16(v - hi): ~16 significant bits, exact for an fp16 value
// (11 bits), relative error <= 2^-17 for an fp32 one.
__device__ __forceinline__ void split_bf16(float v, __nv_bfloat16& hi, __nv_bfloat16& lo) {
  hi = __float2bfloat16_rn(v);
  lo = __float2bfloat16_rn(v - __bfloat162float(hi));
}

// Block (tile, g, split): tile indexes the upper-triangle tiles (ti <= tj) of group g; rows
// [split·rows_per_split, +rows_per_split) of x. sum (G·r) and sum_outer (G, r, r) are fp32, zeroed.
template <typename scalar_t, bool kSplitX>
__global__ void __launch_bounds__(kMmaThreads)
    cov_mma_kernel(const scalar_t* __restrict__ x, int64_t sxn, int64_t sxd, const float* __restrict__ w,
                   int64_t N, int64_t r, int tiles_per_side, int64_t rows_per_split, float* __restrict__ sum,
                   float* __restrict__ sum_outer) {
  using namespace nvcuda;
  __shared__ __align__(32) __nv_bfloat16 a_hi[kStep][kLd];
  __shared__ __align__(32) __nv_bfloat16 a_lo[kStep][kLd];
  __shared__ __align__(32) __nv_bfloat16 b_hi[kStep][kLd];
  __shared__ __align__(32) __nv_bfloat16 b_lo[kSplitX ? kStep : 1][kLd];
  __shared__ __align__(32) float out[kTile][kTile + 4];

  // Upper-triangle tile index -> (ti, tj), row by row: tiles_per_side is r / 64, small.
  int ti = 0, rest = static_cast<int>(blockIdx.x);
  while (rest >= tiles_per_side - ti) rest -= tiles_per_side - ti++;
  const int tj = ti + rest;
  const int64_t g = blockIdx.y;
  const int64_t n_start = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t n_end = std::min(N, n_start + rows_per_split);
  const int64_t col0_i = g * r + int64_t{ti} * kTile, col0_j = g * r + int64_t{tj} * kTile;

  // Staging: thread owns column c = tid % 64 of both tiles, rows row0 + 2k (coalesced along columns).
  constexpr int kRowsPerPass = kMmaThreads / kTile;
  constexpr int kRowsPerThread = kStep / kRowsPerPass;
  const int c = threadIdx.x % kTile, row0 = threadIdx.x / kTile;
  const bool ok_i = int64_t{ti} * kTile + c < r, ok_j = int64_t{tj} * kTile + c < r;
  const scalar_t* x_i = x + (col0_i + c) * sxd;
  const scalar_t* x_j = x + (col0_j + c) * sxd;
  float s1 = 0.f;  // Σ w x of column c over this block's rows (diagonal tiles report it)

  // The next step's x and w, loaded into registers while the tensor cores work on the current one.
  float xi_next[kRowsPerThread], xj_next[kRowsPerThread], w_next[kRowsPerThread];
  const auto fetch = [&](int64_t n0) {
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const int64_t n = n0 + row0 + kRowsPerPass * k;
      const bool ok_n = n < n_end;
      xi_next[k] = ok_n && ok_i ? static_cast<float>(x_i[n * sxn]) : 0.f;
      xj_next[k] = ok_n && ok_j ? static_cast<float>(x_j[n * sxn]) : 0.f;
      w_next[k] = ok_n ? w[n] : 0.f;
    }
  };

  const int warp = threadIdx.x / kWarp;
  const int wi = (warp / 2) * 32, wj = (warp % 2) * 32;
  // acc: the MMAs' partial over at most kFlushSteps steps; total: the partials, in round-to-nearest adds.
  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[2][2], total[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::fill_fragment(acc[i][j], 0.f);
      wmma::fill_fragment(total[i][j], 0.f);
    }
  const auto flush = [&]() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < acc[i][j].num_elements; ++e) total[i][j].x[e] += acc[i][j].x[e];
        wmma::fill_fragment(acc[i][j], 0.f);
      }
  };

  fetch(n_start);
  int steps = 0;
  for (int64_t n0 = n_start; n0 < n_end; n0 += kStep) {
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const int row = row0 + kRowsPerPass * k;
      const float v = xi_next[k] * w_next[k];
      s1 += v;
      split_bf16(v, a_hi[row][c], a_lo[row][c]);
      if constexpr (kSplitX) {
        split_bf16(xj_next[k], b_hi[row][c], b_lo[row][c]);
      } else {
        b_hi[row][c] = __float2bfloat16_rn(xj_next[k]);  // exact: a bf16 value
      }
    }
    __syncthreads();
    if (n0 + kStep < n_end) fetch(n0 + kStep);  // block-uniform condition
#pragma unroll
    for (int k = 0; k < kStep; k += kFrag) {
      // A^T: the staged (K, 64) tile read as a (64, K) column-major matrix; B: (K, 64) row-major.
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, __nv_bfloat16, wmma::col_major> ah[2], al[2];
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, __nv_bfloat16, wmma::row_major> bh[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(ah[i], &a_hi[k][wi + i * kFrag], kLd);
        wmma::load_matrix_sync(al[i], &a_lo[k][wi + i * kFrag], kLd);
        wmma::load_matrix_sync(bh[i], &b_hi[k][wj + i * kFrag], kLd);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::mma_sync(acc[i][j], ah[i], bh[j], acc[i][j]);
          wmma::mma_sync(acc[i][j], al[i], bh[j], acc[i][j]);
        }
      if constexpr (kSplitX) {
        wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, __nv_bfloat16, wmma::row_major> bl[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(bl[j], &b_lo[k][wj + j * kFrag], kLd);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], ah[i], bl[j], acc[i][j]);
      }
    }
    if (++steps == kFlushSteps) {  // block-uniform
      flush();
      steps = 0;
    }
    __syncthreads();  // the next step overwrites the staged tiles
  }
  flush();

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&out[wi + i * kFrag][wj + j * kFrag], total[i][j], kTile + 4, wmma::mem_row_major);
  if (ti == tj && ok_i) atomicAdd(sum + col0_i + c, s1);
  __syncthreads();
  float* block = sum_outer + g * r * r;
  for (int e = threadIdx.x; e < kTile * kTile; e += kMmaThreads) {
    const int i = e / kTile, j = e % kTile;
    const int64_t gi = int64_t{ti} * kTile + i, gj = int64_t{tj} * kTile + j;
    if (gi >= r || gj >= r) continue;
    atomicAdd(block + gi * r + gj, out[i][j]);
    if (ti != tj) atomicAdd(block + gj * r + gi, out[i][j]);
  }
}

void launch_cov_mma(const at::Tensor& x, const at::Tensor& w, int64_t groups, at::Tensor& sum, at::Tensor& sum_outer,
                    cudaStream_t stream) {
  const int64_t N = x.size(0), r = x.size(1) / groups;
  const int64_t side = ceil_div(r, kTile);
  const int64_t tiles = side * (side + 1) / 2;
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max() && groups <= 65535,
              "weighted_covariance: too many groups (> 65535) or too wide a group for the CUDA kernel");
  // Row slices: about two blocks per SM in all, each at least a few steps long.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t splits = std::clamp<int64_t>(ceil_div(2 * int64_t{sms}, tiles * groups), 1,
                                             std::min<int64_t>(65535, ceil_div(N, 4 * kStep)));
  const int64_t rows_per_split = ceil_div(ceil_div(N, splits), kStep) * kStep;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(groups),
                  static_cast<unsigned>(ceil_div(N, rows_per_split)));
  const auto run = [&](auto* x_ptr, auto split_x) {
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(x_ptr)>>;
    cov_mma_kernel<scalar_t, decltype(split_x)::value><<<grid, kMmaThreads, 0, stream>>>(
        x_ptr, x.stride(0), x.stride(1), w.const_data_ptr<float>(), N, r, static_cast<int>(side), rows_per_split,
        sum.mutable_data_ptr<float>(), sum_outer.mutable_data_ptr<float>());
  };
  switch (x.scalar_type()) {
    case at::kBFloat16:
      run(x.const_data_ptr<at::BFloat16>(), std::false_type{});
      break;
    case at::kHalf:
      run(x.const_data_ptr<at::Half>(), std::true_type{});
      break;
    default:
      TORCH_CHECK(x.scalar_type() == at::kFloat, "weighted_covariance: the MMA kernel takes bf16, fp16 or fp32");
      run(x.const_data_ptr<float>(), std::true_type{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- fp64: scaled workspace + cuBLAS --------------------------------------------------------------

// Workspace budget of one chunk: large enough that the GEMM runs at full speed, small next to a GPU.
constexpr int64_t kChunkBytes = int64_t{64} << 20;
constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 64;  // rows one block scales: its column sums cost one atomic per 64 rows

// y[i, d] = x[n0 + i, d] * sqrt_w[n0 + i] for i < m, and sum[d] += Σ_i sqrt_w[n0 + i] * y[i, d]; threads walk d
// (coalesced), blocks walk row ranges.
__global__ void scale_rows_kernel(const double* __restrict__ x, int64_t stride_n, int64_t stride_d,
                                  const double* __restrict__ sqrt_w, int64_t n0, int64_t m, int64_t D,
                                  double* __restrict__ y, double* __restrict__ sum) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  double s = 0.0;
  for (int64_t i0 = int64_t{blockIdx.y} * kRowsPerBlock; i0 < m; i0 += int64_t{gridDim.y} * kRowsPerBlock) {
    const int64_t i1 = std::min(m, i0 + kRowsPerBlock);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = n0 + i;
      const double sw = sqrt_w[n];
      const double v = x[n * stride_n + d * stride_d] * sw;
      y[i * D + d] = v;
      s += v * sw;
    }
  }
  atomicAdd(sum + d, s);
}

void run_workspace_gemm(const at::Tensor& x, const at::Tensor& w, int64_t groups, at::Tensor& sum,
                        at::Tensor& sum_outer, cudaStream_t stream) {
  const int64_t N = x.size(0), D = x.size(1), r = D / groups;
  const at::Tensor sqrt_w = w.sqrt();
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / (D * int64_t{sizeof(double)}), 1, N);
  at::Tensor y_buf = at::empty({chunk, D}, sum.options());
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t m = std::min(chunk, N - n0);
    at::Tensor y = y_buf.narrow(0, 0, m);
    const dim3 grid(static_cast<unsigned>(ceil_div(D, kThreads)),
                    static_cast<unsigned>(std::min<int64_t>(ceil_div(m, kRowsPerBlock), 65535)));
    scale_rows_kernel<<<grid, kThreads, 0, stream>>>(x.const_data_ptr<double>(), x.stride(0), x.stride(1),
                                                     sqrt_w.const_data_ptr<double>(), n0, m, D,
                                                     y.mutable_data_ptr<double>(), sum.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // (G, m, r) strided view of Y: Y_g^T Y_g for all groups in one batched GEMM.
    const at::Tensor yg = y.view({m, groups, r}).transpose(0, 1);
    sum_outer.baddbmm_(yg.transpose(1, 2), yg);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_covariance_cuda(const at::Tensor& x, const at::Tensor& w_in,
                                                                        int64_t groups) {
  TORCH_CHECK(x.is_cuda() && w_in.is_cuda() && x.device() == w_in.device(),
              "x and w must be CUDA tensors on one device");
  TORCH_CHECK(x.dim() == 2 && w_in.dim() == 1 && w_in.size(0) == x.size(0), "x (N, G*r), w (N,)");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "groups must divide x's width");
  const c10::cuda::CUDAGuard guard(x.device());  // launches, cuBLAS and the stream below: x's device
  const at::ScalarType acc_type = acc_dtype(x.scalar_type());
  const auto opts = x.options().dtype(acc_type);
  // Weights in the accumulation type whatever they came as (fp32 for half x: never rounded to x's dtype).
  const at::Tensor w = w_in.to(acc_type).contiguous();
  const int64_t N = x.size(0), D = x.size(1), r = D / groups;

  at::Tensor weight_sum = w.sum();
  at::Tensor sum = at::zeros({groups, r}, opts);
  at::Tensor sum_outer = at::zeros({groups, r, r}, opts);
  if (N == 0 || D == 0) return {weight_sum, sum, sum_outer};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kDouble) {
    run_workspace_gemm(x, w, groups, sum, sum_outer, stream);
  } else {
    launch_cov_mma(x, w, groups, sum, sum_outer, stream);
  }
  return {weight_sum, sum, sum_outer};
}

}  // namespace
}  // namespace skd::cuda

TORCH_LIBRARY_IMPL(skd_kernels, CUDA, m) {
  m.impl("weighted_covariance", &skd::cuda::weighted_covariance_cuda);
}
