// prefix_attention on CPU: attention over the first r dims of every head, read from and written to skd's
// rank-major prefix layout, flash-style (online softmax over key tiles).
//
// qkv (S, N, r*3*H): column j*3H + w*H + h is rank j of head h of w in {q, k, v}. out (S, N, r*H): column
// j*H + h. A head's r dims sit 3H apart, which no BLAS reads, so each work item (sequence s, query tile)
// packs what it needs into thread-local buffers of its dtype, head-major with unit stride over j: a
// per-token (r, H) -> (H, r) transpose of a few cache lines, the same packing every GEMM does. The two
// products per (head, key tile) then run through MKL on the packed tiles (single-threaded inside
// at::parallel_for): sgemm/dgemm for fp32/fp64; for bf16/fp16 the tiles stay in their dtype and MKL's
// gemm_bf16bf16f32/gemm_f16f16f32 (AMX or AVX-512 where the CPU has them) accumulate in fp32, with the
// softmax probabilities rounded to the input dtype for the second product as in ATen's flash attention.
// The output is written straight into the proj's rank-major columns.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

// MKL's Fortran BLAS (LP64), exported by libtorch_cpu. Column-major: a row-major product C = A B is
// called as C^T = B^T A^T.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
// CBLAS enums are ints: 101 row-major, 111 no transpose, 112 transpose.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const at::BFloat16* a, int lda, const at::BFloat16* b, int ldb, float beta, float* c,
                            int ldc);
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const at::Half* a,
                          int lda, const at::Half* b, int ldb, float beta, float* c, int ldc);
}

namespace skd::cpu {
namespace {

// Row-major C (m, n) = alpha * A (m, k) @ op(B) + beta * C; op(B) = B (k, n) or, with b_t, B^T for B (n, k).
// A and B in the input dtype, C in the accumulation type.
template <typename in_t, typename acc>
void gemm_rm(bool b_t, int64_t m, int64_t n, int64_t k, acc alpha, const in_t* a, int64_t lda, const in_t* b,
             int64_t ldb, acc beta, acc* c, int64_t ldc) {
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<in_t, at::BFloat16>) {
    cblas_gemm_bf16bf16f32(101, 111, b_t ? 112 : 111, mi, ni, ki, alpha, a, la, b, lb, beta, c, lc);
  } else if constexpr (std::is_same_v<in_t, at::Half>) {
    cblas_gemm_f16f16f32(101, 111, b_t ? 112 : 111, mi, ni, ki, alpha, a, la, b, lb, beta, c, lc);
  } else {
    // Fortran BLAS is column-major: C^T (n, m) = op(B)^T A^T.
    const char ta = b_t ? 'T' : 'N', tb = 'N';
    if constexpr (std::is_same_v<acc, double>) {
      dgemm_(&ta, &tb, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
    } else {
      sgemm_(&ta, &tb, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
    }
  }
}


// Tile sizes: a query tile of at most kQTile rows; a key tile whose packed K and V (2 * kt * H * r values)
// stay near 1 MiB, so the two products of every head reuse them from L2.
constexpr int64_t kQTile = 128;
constexpr int64_t kKVBudget = int64_t(1) << 18;

struct Shape {
  int64_t S, N, H, r, qt, kt;
};

// dst[h * ld_h + i * ld_i + j] = src[i * src_tok + j * 3H + h] for the tokens i < n, ranks j < r, heads h < H.
template <typename scalar_t>
void pack_heads(const scalar_t* src, int64_t src_tok, int64_t n, const Shape& g, scalar_t* dst, int64_t ld_h,
                int64_t ld_i) {
  const int64_t w = 3 * g.H;
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* row = src + i * src_tok;
    for (int64_t j = 0; j < g.r; ++j) {
      const scalar_t* in = row + j * w;  // the H heads of rank j: contiguous
      scalar_t* out = dst + i * ld_i + j;
      for (int64_t h = 0; h < g.H; ++h) out[h * ld_h] = in[h];
    }
  }
}

// Online-softmax update of one score row x (n values, already scaled and biased): p = exp(x - m_new)
// overwrites x; returns the factor exp(m_old - m_new) that rescales the row's running sum and output.
template <typename acc>
acc softmax_step(acc* x, int64_t n, acc& m, acc& l) {
  using Vec = Vectorized<acc>;
  acc mx = at::vec::reduce_all<acc>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, x, n);
  const acc m_new = std::max(m, mx);
  // A row whose scores are all -inf so far (a fully masked tile) keeps p = 0 instead of exp(nan).
  const acc shift = m_new == -std::numeric_limits<acc>::infinity() ? acc(0) : m_new;
  at::vec::map([shift](Vec v) { return (v - Vec(shift)).exp(); }, x, x, n);
  const acc sum = at::vec::reduce_all<acc>([](Vec a, Vec b) { return a + b; }, x, n);
  const acc alpha = m == -std::numeric_limits<acc>::infinity() ? acc(0) : std::exp(m - shift);
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

template <typename scalar_t>
void attention_kernel(const at::Tensor& qkv, const at::Tensor& bias, double scale_d, at::Tensor& out,
                      const Shape& g) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  constexpr bool kNarrow = !std::is_same_v<scalar_t, acc>;
  const acc scale = static_cast<acc>(scale_d);
  const int64_t H = g.H, r = g.r, Hr = H * r;
  const int64_t n_qt = (g.N + g.qt - 1) / g.qt;
  const scalar_t* base = qkv.const_data_ptr<scalar_t>();
  const int64_t st_s = qkv.stride(0), st_n = qkv.stride(1);
  const bool has_bias = bias.defined();
  const scalar_t* bias_ptr = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
  // Broadcast bias dims (size 1) read with stride 0.
  const int64_t b_s = has_bias && bias.size(0) > 1 ? bias.stride(0) : 0;
  const int64_t b_h = has_bias && bias.size(1) > 1 ? bias.stride(1) : 0;
  const int64_t b_i = has_bias ? bias.stride(2) : 0;
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, g.S * n_qt, 1, [&](int64_t begin, int64_t end) {
    // Packed tiles, head-major: q (H, qt, r), k and v (H, kt, r); scores (qt, kt); output (H, qt, r).
    // For bf16/fp16, p holds the probabilities rounded to scalar_t (fp32/fp64: unused, p is sc itself).
    std::vector<scalar_t> q(H * g.qt * r), k(H * g.kt * r), v(H * g.kt * r);
    std::vector<scalar_t> p(kNarrow ? g.qt * g.kt : 0);
    std::vector<acc> sc(g.qt * g.kt), o(H * g.qt * r), m(H * g.qt), l(H * g.qt);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / n_qt, q0 = (item % n_qt) * g.qt, qn = std::min(g.qt, g.N - q0);
      const scalar_t* seq = base + s * st_s;
      pack_heads(seq + q0 * st_n, st_n, qn, g, q.data(), qn * r, r);
      std::fill(o.begin(), o.end(), acc(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc>::infinity());
      std::fill(l.begin(), l.end(), acc(0));
      for (int64_t k0 = 0; k0 < g.N; k0 += g.kt) {
        const int64_t kn = std::min(g.kt, g.N - k0);
        pack_heads(seq + k0 * st_n + H, st_n, kn, g, k.data(), kn * r, r);
        pack_heads(seq + k0 * st_n + 2 * H, st_n, kn, g, v.data(), kn * r, r);
        for (int64_t h = 0; h < H; ++h) {
          acc* oh = o.data() + h * qn * r;
          // scores (qn, kn) = q_h k_h^T * scale
          gemm_rm<scalar_t, acc>(true, qn, kn, r, scale, q.data() + h * qn * r, r, k.data() + h * kn * r, r, acc(0),
                       sc.data(), kn);
          for (int64_t i = 0; i < qn; ++i) {
            acc* x = sc.data() + i * kn;
            if (has_bias) {
              const scalar_t* brow = bias_ptr + s * b_s + h * b_h + (q0 + i) * b_i + k0;
              int64_t t = 0;
              for (; t + Vec::size() <= kn; t += Vec::size()) (Vec::loadu(x + t) + load_acc(brow + t)).store(x + t);
              for (; t < kn; ++t) x[t] += static_cast<acc>(brow[t]);
            }
            const acc alpha = softmax_step(x, kn, m[h * qn + i], l[h * qn + i]);
            if (alpha != acc(1)) at::vec::map([alpha](Vec a) { return a * Vec(alpha); }, oh + i * r, oh + i * r, r);
            if constexpr (kNarrow) at::vec::convert(x, p.data() + i * kn, kn);
          }
          // o_h (qn, r) += p (qn, kn) v_h (kn, r)
          const scalar_t* probs;
          if constexpr (kNarrow) {
            probs = p.data();
          } else {
            probs = sc.data();
          }
          gemm_rm<scalar_t, acc>(false, qn, r, kn, acc(1), probs, kn, v.data() + h * kn * r, r, acc(1), oh, r);
        }
      }
      // out[s, q0 + i, j*H + h] = o[h, i, j] / l[h, i]: the proj's rank-major columns.
      scalar_t* dst = out_ptr + (s * g.N + q0) * Hr;
      for (int64_t i = 0; i < qn; ++i) {
        for (int64_t h = 0; h < H; ++h) {
          const acc inv = acc(1) / l[h * qn + i];
          const acc* src = o.data() + (h * qn + i) * r;
          for (int64_t j = 0; j < r; ++j) dst[i * Hr + j * H + h] = static_cast<scalar_t>(src[j] * inv);
        }
      }
    }
  });
}

at::Tensor prefix_attention_cpu(const at::Tensor& qkv_in, int64_t num_heads, double scale,
                                const std::optional<at::Tensor>& attn_bias) {
  TORCH_CHECK(qkv_in.dim() == 3, "qkv must be (S, N, r*3*H), got ", qkv_in.dim(), " dims");
  TORCH_CHECK(num_heads >= 1 && qkv_in.size(2) % (3 * num_heads) == 0,
              "qkv's width ", qkv_in.size(2), " must be a multiple of 3 * num_heads = ", 3 * num_heads);
  const int64_t S = qkv_in.size(0), N = qkv_in.size(1), H = num_heads, r = qkv_in.size(2) / (3 * H);
  at::Tensor bias;
  if (attn_bias.has_value() && attn_bias->defined()) {
    const at::Tensor& b = *attn_bias;
    TORCH_CHECK(b.dim() == 4 && (b.size(0) == 1 || b.size(0) == S) && (b.size(1) == 1 || b.size(1) == H) &&
                    b.size(2) == N && b.size(3) == N,
                "attn_bias must be (S or 1, H or 1, N, N) = (", S, ", ", H, ", ", N, ", ", N, "), got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == qkv_in.scalar_type() && b.device() == qkv_in.device(),
                "attn_bias must share qkv's dtype and device");
    bias = b.stride(3) == 1 ? b : b.contiguous();  // rows are read with unit stride
  }
  at::Tensor out = at::empty({S, N, r * H}, qkv_in.options());
  if (out.numel() == 0) return out;  // r == 0: (S, N, 0)
  const at::Tensor qkv = qkv_in.stride(2) == 1 ? qkv_in : qkv_in.contiguous();
  Shape g{S, N, H, r, 0, 0};
  g.kt = std::min<int64_t>(N, std::max<int64_t>(64, kKVBudget / (2 * H * r)));
  // Query tiles: as even as possible, and enough of them to give every thread a few items.
  const int64_t want = 2 * at::get_num_threads();
  int64_t n_qt = (N + kQTile - 1) / kQTile;
  if (S * n_qt < want) n_qt = std::min<int64_t>((N + 15) / 16, (want + S - 1) / S);
  n_qt = std::max<int64_t>(n_qt, 1);
  g.qt = (N + n_qt - 1) / n_qt;
  SKD_DISPATCH_FLOATS(qkv.scalar_type(), "skd_prefix_attention", [&] {
    attention_kernel<scalar_t>(qkv, bias, scale, out, g);
  });
  return out;
}

}  // namespace
}  // namespace skd::cpu

TORCH_LIBRARY_IMPL(skd_kernels, CPU, m) {
  m.impl("prefix_attention", &skd::cpu::prefix_attention_cpu);
}
