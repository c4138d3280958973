// weighted_covariance on CUDA: per group Σw, Σ w x and Σ w x x^T of one batch.
//
// x is read once, in row chunks: one kernel writes Y = diag(sqrt(w)) X for the chunk into an
// accumulation-type workspace (so the products keep fp32 accuracy whatever x's dtype), then cuBLAS adds
// Y_g^T Y_g for every group in one strided batched GEMM (baddbmm on views, no copy) and Y^T sqrt(w) to
// Σ w x (addmv). The GEMMs follow torch's TF32 setting, like every other fp32 matmul.
#include <torch/library.h>

#include <algorithm>

#include "common.cuh"

namespace skd::cuda {
namespace {

// Workspace budget of one chunk: large enough that the GEMMs run at full speed, small next to a GPU.
constexpr int64_t kChunkBytes = int64_t{64} << 20;
constexpr int kThreads = 256;

// y[i, d] = x[n0 + i, d] * sqrt_w[n0 + i] for i < m; threads walk d (coalesced), blocks walk rows.
template <typename scalar_t>
__global__ void scale_rows_kernel(const scalar_t* __restrict__ x, int64_t stride_n, int64_t stride_d,
                                  const acc_t<scalar_t>* __restrict__ sqrt_w, int64_t n0, int64_t m, int64_t D,
                                  acc_t<scalar_t>* __restrict__ y) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  for (int64_t i = blockIdx.y; i < m; i += gridDim.y) {
    const int64_t n = n0 + i;
    y[i * D + d] = static_cast<acc_t<scalar_t>>(x[n * stride_n + d * stride_d]) * sqrt_w[n];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_covariance_cuda(const at::Tensor& x, const at::Tensor& w_in,
                                                                        int64_t groups) {
  TORCH_CHECK(x.is_cuda() && w_in.is_cuda(), "x and w must be CUDA tensors");
  TORCH_CHECK(x.dim() == 2 && w_in.dim() == 1 && w_in.size(0) == x.size(0), "x (N, G*r), w (N,)");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "groups must divide x's width");
  const at::ScalarType acc_type = acc_dtype(x.scalar_type());
  const auto opts = x.options().dtype(acc_type);
  const at::Tensor w = w_in.to(acc_type);
  const int64_t N = x.size(0), D = x.size(1), r = D / groups;

  at::Tensor weight_sum = w.sum();
  at::Tensor sum = at::zeros({groups, r}, opts);
  at::Tensor sum_outer = at::zeros({groups, r, r}, opts);
  if (N == 0 || D == 0) return {weight_sum, sum, sum_outer};

  const at::Tensor sqrt_w = w.sqrt().contiguous();
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / (D * at::elementSize(acc_type)), 1, N);
  at::Tensor y_buf = at::empty({chunk, D}, opts);
  at::Tensor sum_flat = sum.view({D});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t m = std::min(chunk, N - n0);
    at::Tensor y = y_buf.narrow(0, 0, m);
    const dim3 grid(static_cast<unsigned>(ceil_div(D, kThreads)), static_cast<unsigned>(std::min<int64_t>(m, 65535)));
    SKD_DISPATCH_FLOATS(x.scalar_type(), "skd_weighted_covariance_cuda", [&] {
      scale_rows_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), sqrt_w.const_data_ptr<acc_t<scalar_t>>(), n0, m,
          D, y.mutable_data_ptr<acc_t<scalar_t>>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // (G, m, r) strided view of Y: Y_g^T Y_g for all groups in one batched GEMM.
    const at::Tensor yg = y.view({m, groups, r}).transpose(0, 1);
    sum_outer.baddbmm_(yg.transpose(1, 2), yg);
    // Σ_n sqrt(w_n) y_n = Σ_n w_n x_n.
    sum_flat.addmv_(y.t(), sqrt_w.narrow(0, n0, m));
  }
  return {weight_sum, sum, sum_outer};
}

}  // namespace
}  // namespace skd::cuda

TORCH_LIBRARY_IMPL(skd_kernels, CUDA, m) {
  m.impl("weighted_covariance", &skd::cuda::weighted_covariance_cuda);
}
