// weighted_covariance on CPU: per-group Σw, Σ w x, Σ w x x^T of one batch, x read once.
//
// ONE parallel region per call: each thread takes a fixed range of L2-sized row chunks and, chunk by chunk, writes
// Y = sqrt(w) * x (widened to the accumulation type) into its own buffer, adds Σ w x, and multiplies
// Y_g^T Y_g into its own Σ w x x^T (the per-thread results are added once at the end). The GEMMs inside run
// single-threaded: ATen and MKL do not nest parallelism inside an OpenMP region. The earlier design ran a
// parallel elementwise pass and then a parallel GEMM per chunk (2 to 16 regions per 170-340 rows, 40-160 per
// call), and every region ends in a barrier: with another process on the 2 cores, each barrier waited for a
// descheduled thread for a scheduler slice (~5 ms), which made the op 100x slower than on one thread.
//
// Narrow groups (ViT heads) take one batched GEMM per chunk. Y_g^T Y_g is symmetric, so for wide groups only
// the blocks on and above the diagonal are multiplied (a blocked SYRK through at::addmm_: ATen exposes no
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
// Fewer rows per thread are not worth a parallel region's start and barrier.
constexpr int64_t kMinThreadRows = 64;
// Symmetric blocking kicks in from this group width; blocks are at most kSyrkBlock wide (r = 384 -> 2
// blocks of 192, 3 of 4 GEMMs; r = 768 -> 4 blocks of 192, 10 of 16). Measured at 1 and 2 threads, groups = 1:
// at r = 768, 192 ran 15-20 % faster than 160 (blocks of 154, not a multiple of the GEMM's 16/64-wide tiles)
// and 5-10 % faster than 128 (more, smaller at::addmm_ calls); at r = 384 one unblocked GEMM ran ~15 % slower.
constexpr int64_t kSyrkMin = 256;
constexpr int64_t kSyrkBlock = 192;

// Y[i, :] = sqrt_w[i] * x[n0 + i, :] for i in [0, m), in the accumulation type; the same pass adds Σ w x of
// these rows into psum (D wide), so Y is never read back for it. Serial: the caller's thread owns the rows.
template <typename scalar_t>
void scale_rows(const at::Tensor& x, const acc_t<scalar_t>* sw, int64_t n0, int64_t m, acc_t<scalar_t>* yp,
                acc_t<scalar_t>* psum) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  const int64_t D = x.size(1), sx = x.stride(0);
  const scalar_t* xp = x.const_data_ptr<scalar_t>() + n0 * sx;
  sw += n0;
  const int64_t vec_end = D - D % Vec::size();
  for (int64_t i = 0; i < m; ++i) {
    const scalar_t* xr = xp + i * sx;
    acc* yr = yp + i * D;
    const Vec s(sw[i]);
    int64_t c = 0;
    for (; c < vec_end; c += Vec::size()) {
      const Vec v = load_acc(xr + c) * s;
      v.store(yr + c);
      (Vec::loadu(psum + c) + v * s).store(psum + c);
    }
    for (; c < D; ++c) {
      yr[c] = sw[i] * static_cast<acc>(xr[c]);
      psum[c] += sw[i] * yr[c];
    }
  }
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
  // Per-thread Σ w x and Σ w x x^T, added at the end: threads never write the same memory.
  const int64_t threads = at::get_num_threads();
  at::Tensor part_sum = at::zeros({threads, D}, opts);
  at::Tensor part_outer = at::zeros({threads, groups, r, r}, opts);
  if (N == 0 || D == 0) return {weight_sum, part_sum.sum(0).view({groups, r}), part_outer.sum(0)};

  const at::Tensor sqrt_w = w.sqrt();
  // A chunk fills the L2 budget, but no more than a thread's share of rows (so every thread gets work) unless
  // that share is under kMinThreadRows.
  const int64_t per_thread = std::max<int64_t>((N + threads - 1) / threads, kMinThreadRows);
  const int64_t l2_rows = kChunkBytes / (D * static_cast<int64_t>(at::elementSize(acc_type)));
  const int64_t chunk = std::max<int64_t>(1, std::min(l2_rows, per_thread));
  at::Tensor y_bufs = at::empty({threads, chunk, D}, opts);
  const std::vector<int64_t> bounds = syrk_blocks(r);
  const int64_t nblk = static_cast<int64_t>(bounds.size()) - 1;

  // Each thread takes a fixed, contiguous range of chunks (at::parallel_for's static split) into its own
  // partial sums: the result is bitwise reproducible for a given thread count. (Claiming chunks dynamically
  // from a counter tolerated a descheduled thread better, but made the rounding depend on the schedule.)
  const int64_t n_chunks = (N + chunk - 1) / chunk;
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    at::Tensor y_buf = y_bufs.select(0, tid);
    at::Tensor outer = part_outer.select(0, tid);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n0 = k * chunk, m = std::min(chunk, N - n0);
      at::Tensor y = y_buf.narrow(0, 0, m);
      SKD_DISPATCH_FLOATS(x.scalar_type(), "skd_weighted_covariance", [&] {
        using acc = acc_t<scalar_t>;
        scale_rows<scalar_t>(x, sqrt_w.const_data_ptr<acc>(), n0, m, y.mutable_data_ptr<acc>(),
                             part_sum.mutable_data_ptr<acc>() + tid * D);
      });
      if (nblk == 1) {
        // Narrow groups: one batched GEMM over all groups, on strided views of Y (no copy).
        const at::Tensor yg = y.view({m, groups, r}).transpose(0, 1);  // (G, m, r)
        outer.baddbmm_(yg.transpose(1, 2), yg);
        continue;
      }
      for (int64_t g = 0; g < groups; ++g) {
        at::Tensor out = outer.select(0, g);
        for (int64_t bi = 0; bi < nblk; ++bi) {
          const at::Tensor yi = y.narrow(1, g * r + bounds[bi], bounds[bi + 1] - bounds[bi]);
          for (int64_t bj = bi; bj < nblk; ++bj) {
            const at::Tensor yj = y.narrow(1, g * r + bounds[bj], bounds[bj + 1] - bounds[bj]);
            out.narrow(0, bounds[bi], yi.size(1)).narrow(1, bounds[bj], yj.size(1)).addmm_(yi.t(), yj);
          }
        }
      }
    }
  });
  at::Tensor sum_outer = threads == 1 ? part_outer.select(0, 0) : part_outer.sum(0);
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
  return {weight_sum, part_sum.sum(0).view({groups, r}), sum_outer};
}

// Results up to this many entries are checked whole, larger ones through their diagonal (as the Python
// front end's _CHECK_WHOLE in skd_kernels/ops/weighted_covariance.py: a contiguous max beats a strided one).
constexpr int64_t kCheckWhole = 4096;

// True when min w >= 0 and Σw and the peaks are finite (NaN fails every comparison). acc: float or double.
template <typename acc>
bool checks_pass(const at::Tensor& w, const at::Tensor& weight_sum, const at::Tensor& peaks) {
  const acc* wp = w.const_data_ptr<acc>();
  for (int64_t i = 0; i < w.numel(); ++i) {
    if (!(wp[i] >= 0)) return false;
  }
  if (!std::isfinite(*weight_sum.const_data_ptr<acc>())) return false;
  // peaks: the whole (G, r, r) result, or a strided view of its diagonals.
  const acc* pp = peaks.const_data_ptr<acc>();
  const int64_t groups = peaks.size(0), n = peaks.size(1), sg = peaks.stride(0), sn = peaks.stride(peaks.dim() - 1);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = 0; i < n * (peaks.dim() == 3 ? n : 1); ++i) {
      if (!std::isfinite(pp[g * sg + i * sn])) return false;
    }
  }
  return true;
}

// prev + batch (or batch alone) as a new float64 tensor of batch's shape; batch and prev contiguous.
template <typename acc>
at::Tensor widen_add(const at::Tensor& batch, const std::optional<at::Tensor>& prev) {
  at::Tensor out = at::empty(batch.sizes(), batch.options().dtype(at::kDouble));
  const acc* b = batch.const_data_ptr<acc>();
  double* o = out.mutable_data_ptr<double>();
  const double* p = prev ? prev->const_data_ptr<double>() : nullptr;
  for (int64_t i = 0; i < batch.numel(); ++i) o[i] = (p ? p[i] : 0.0) + static_cast<double>(b[i]);
  return out;
}

// The public op's CPU path in one native call (a tensor op called from Python costs ~1 us, and its
// ATen counterpart from C++ ~0.5 us: more than these loops on a calibration batch): the batch's
// statistics, checked (min w >= 0, Σw and Σ w x x^T finite — which bound the rest, see the front end), then
// added in float64 to the state (new tensors, so a failed check leaves the state untouched). A failed check
// raises a c10::Error; the front end then names the culprit.
std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_covariance_update_cpu(
    const at::Tensor& x, const at::Tensor& w_in, int64_t groups, const std::optional<at::Tensor>& weight_sum,
    const std::optional<at::Tensor>& sum, const std::optional<at::Tensor>& sum_outer) {
  const bool has_state = weight_sum.has_value() && sum.has_value() && sum_outer.has_value();
  TORCH_CHECK(has_state || !(weight_sum.has_value() || sum.has_value() || sum_outer.has_value()),
              "the state is all three of weight_sum, sum, sum_outer or none");
  auto [ws, s, so] = weighted_covariance_cpu(x, w_in, groups);
  if (has_state) {
    for (const at::Tensor* t : {&*weight_sum, &*sum, &*sum_outer}) {
      TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous() && t->device().is_cpu(),
                  "the state must be contiguous float64 CPU tensors");
    }
    TORCH_CHECK(weight_sum->dim() == 0 && sum->sizes() == s.sizes() && sum_outer->sizes() == so.sizes(),
                "state shape does not match x");
  }
  const at::Tensor w = w_in.to(ws.scalar_type()).contiguous();
  s = s.contiguous();
  so = so.contiguous();
  const at::Tensor peaks = so.numel() <= kCheckWhole ? so : so.diagonal(0, 1, 2);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(ws.scalar_type(), "skd_weighted_covariance_update", [&] {
    TORCH_CHECK(checks_pass<scalar_t>(w, ws, peaks),
                "weighted_covariance: w has a negative or non-finite entry, x a non-finite one, or the result "
                "overflows");
    out = {widen_add<scalar_t>(ws, weight_sum), widen_add<scalar_t>(s, sum), widen_add<scalar_t>(so, sum_outer)};
  });
  return out;
}

}  // namespace
}  // namespace skd::cpu

TORCH_LIBRARY_IMPL(skd_kernels, CPU, m) {
  m.impl("weighted_covariance", &skd::cpu::weighted_covariance_cpu);
  m.impl("weighted_covariance_update", &skd::cpu::weighted_covariance_update_cpu);
}
