// weighted_covariance on CPU: per-group Σw, Σ w x, Σ w x x^T of one batch, x read once.
//
// Rows are processed in chunks that fit in L2: one parallel pass writes Y = sqrt(w) * x (widened to the
// accumulation type) and adds Σ w x, then BLAS reads Y from cache for Σ w x x^T = Y_g^T Y_g. Narrow
// groups (ViT heads) take one batched GEMM per chunk. Y_g^T Y_g is symmetric, so for wide groups only the
// blocks on and above the diagonal are multiplied (a blocked SYRK through at::addmm_: ATen exposes no
// syrk) and the lower blocks are mirrored once at the end.
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common.h"

namespace skd::cpu {
namespace {

// Target bytes of one chunk of Y: inside a 1-2 MiB L2 with room for the GEMM's packed panels
// (measured: 512 KiB beat 256 KiB and 1-4 MiB on ViT-S/B shapes).
constexpr int64_t kChunkBytes = 512 * 1024;
// Symmetric blocking kicks in from this group width; blocks are at most kSyrkBlock wide (r = 384 -> 3
// blocks, 6 of 9 GEMMs; r = 768 -> 5 blocks, 15 of 25). Narrower blocks save more flops but each
// at::addmm_ call costs ~10 µs and runs the GEMM less efficiently; 128-192 measured best.
constexpr int64_t kSyrkMin = 256;
constexpr int64_t kSyrkBlock = 160;

// Y[i, :] = sqrt_w[i] * x[n0 + i, :] for i in [0, m), in the accumulation type; the same pass adds
// Σ w x of these rows into partial[thread] (D wide), so Y is never read back for it.
template <typename scalar_t>
void scale_rows(const at::Tensor& x, const at::Tensor& sqrt_w, int64_t n0, int64_t m, at::Tensor& y,
                at::Tensor& partial) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  const int64_t D = x.size(1), sx = x.stride(0);
  const scalar_t* xp = x.const_data_ptr<scalar_t>() + n0 * sx;
  const acc* sw = sqrt_w.const_data_ptr<acc>() + n0;
  acc* yp = y.mutable_data_ptr<acc>();
  acc* part = partial.mutable_data_ptr<acc>();
  const int64_t vec_end = D - D % Vec::size();
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    acc* ps = part + at::get_thread_num() * D;
    for (int64_t i = r0; i < r1; ++i) {
      const scalar_t* xr = xp + i * sx;
      acc* yr = yp + i * D;
      const Vec s(sw[i]);
      int64_t c = 0;
      for (; c < vec_end; c += Vec::size()) {
        const Vec v = load_acc(xr + c) * s;
        v.store(yr + c);
        (Vec::loadu(ps + c) + v * s).store(ps + c);
      }
      for (; c < D; ++c) {
        yr[c] = sw[i] * static_cast<acc>(xr[c]);
        ps[c] += sw[i] * yr[c];
      }
    }
  });
}

// Block boundaries of a width-r group: one block unless r is wide enough for the symmetric saving.
std::vector<int64_t> syrk_blocks(int64_t r) {
  const int64_t n = r >= kSyrkMin ? (r + kSyrkBlock - 1) / kSyrkBlock : 1;
  std::vector<int64_t> bounds;
  for (int64_t i = 0; i <= n; ++i) bounds.push_back(r * i / n);
  return bounds;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_covariance_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                                                                       int64_t groups) {
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 1 && w_in.size(0) == x_in.size(0), "x (N, G*r), w (N,)");
  TORCH_CHECK(groups >= 1 && x_in.size(1) % groups == 0, "groups must divide x's width");
  // Rows are read with their stride; only a strided feature axis is copied (a pass over x, never avoidable
  // for vector loads), and w is tiny.
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::ScalarType acc_type = acc_dtype(x.scalar_type());
  const at::Tensor w = w_in.to(acc_type).contiguous();
  const int64_t N = x.size(0), D = x.size(1), r = D / groups;
  const auto opts = x.options().dtype(acc_type);

  at::Tensor weight_sum = w.sum();
  at::Tensor sum_outer = at::zeros({groups, r, r}, opts);
  // Σ w x, one row per thread (summed at the end): threads never write the same row.
  at::Tensor partial = at::zeros({at::get_num_threads(), D}, opts);
  if (N == 0 || D == 0) return {weight_sum, partial.sum(0).view({groups, r}), sum_outer};

  const at::Tensor sqrt_w = w.sqrt();
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / (D * at::elementSize(acc_type)), 64, N);
  at::Tensor y_buf = at::empty({chunk, D}, opts);
  const std::vector<int64_t> bounds = syrk_blocks(r);
  const int64_t nblk = static_cast<int64_t>(bounds.size()) - 1;

  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t m = std::min(chunk, N - n0);
    at::Tensor y = y_buf.narrow(0, 0, m);
    SKD_DISPATCH_FLOATS(x.scalar_type(), "skd_weighted_covariance", [&] {
      scale_rows<scalar_t>(x, sqrt_w, n0, m, y, partial);
    });
    if (nblk == 1) {
      // Narrow groups: one batched GEMM over all groups, on strided views of Y (no copy).
      const at::Tensor yg = y.view({m, groups, r}).transpose(0, 1);  // (G, m, r)
      sum_outer.baddbmm_(yg.transpose(1, 2), yg);
      continue;
    }
    for (int64_t g = 0; g < groups; ++g) {
      at::Tensor out = sum_outer.select(0, g);
      for (int64_t bi = 0; bi < nblk; ++bi) {
        const at::Tensor yi = y.narrow(1, g * r + bounds[bi], bounds[bi + 1] - bounds[bi]);
        for (int64_t bj = bi; bj < nblk; ++bj) {
          const at::Tensor yj = y.narrow(1, g * r + bounds[bj], bounds[bj + 1] - bounds[bj]);
          out.narrow(0, bounds[bi], yi.size(1)).narrow(1, bounds[bj], yj.size(1)).addmm_(yi.t(), yj);
        }
      }
    }
  }
  // Mirror the blocks above the diagonal into the ones below.
  for (int64_t g = 0; g < groups && nblk > 1; ++g) {
    at::Tensor out = sum_outer.select(0, g);
    for (int64_t bi = 0; bi < nblk; ++bi) {
      for (int64_t bj = bi + 1; bj < nblk; ++bj) {
        const int64_t hi = bounds[bi + 1] - bounds[bi], wj = bounds[bj + 1] - bounds[bj];
        out.narrow(0, bounds[bj], wj).narrow(1, bounds[bi], hi).copy_(
            out.narrow(0, bounds[bi], hi).narrow(1, bounds[bj], wj).t());
      }
    }
  }
  return {weight_sum, partial.sum(0).view({groups, r}), sum_outer};
}

}  // namespace
}  // namespace skd::cpu

TORCH_LIBRARY_IMPL(skd_kernels, CPU, m) {
  m.impl("weighted_covariance", &skd::cpu::weighted_covariance_cpu);
}
