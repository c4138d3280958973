// prefix_attention on CPU: attention over the first r dims of every head, read from and written to skd's
// rank-major prefix layout, flash-style (online softmax over key tiles).
//
// qkv (S, N, r*3*H): column j*3H + w*H + h is rank j of head h of w in {q, k, v}; or (prefix_attention_separate)
// q, k, v each (S, N, r*H), column j*H + h (HF models' separate q/k/v Linears). out (S, N, r*H): column j*H + h.
// Both forms run one kernel on three base pointers and a rank stride (3H fused, H separate). A head's r dims
// sit 3H (or H) apart, which no BLAS reads, so each work item (sequence s, query tile) packs what it needs into
// per-thread buffers of its dtype: a per-token (r, H) -> (H, r) transpose of a few cache lines, the same packing
// every GEMM does. The two products per (head, key tile), single-threaded inside at::parallel_for:
// * bf16 on AVX-512 CPUs: oneDNN's brgemm (AMX where the CPU has it), the micro-kernel ATen's flash attention
//   runs, with k^T and v packed once per key tile straight from the rank-major operands into its VNNI layout
//   and q head-major (BrgemmTiles below);
// * otherwise MKL on head-major tiles: sgemm/dgemm for fp32/fp64, gemm_bf16bf16f32/gemm_f16f16f32 for bf16/fp16
//   (tiles in their dtype, fp32 accumulation).
// The softmax probabilities are rounded to the input dtype for the second product, as in ATen's flash
// attention. The online softmax runs in AVX-512 where the CPU has it (softmax_avx512.h), else in AVX2. The
// output is normalised, rounded and written straight into the proj's rank-major columns (one AVX-512 pass).
//
// Measured against ATen's SDPA on the extracted dense model's head-major qkv (benchmarks/prefix_attention.py,
// 1 thread, process CPU time, 2-core machine shared with other sessions): see benchmarks/RESULTS.md,
// "prefix_attention at batch 1 and in bf16". Of the changes there: brgemm at every r with k^T/v packed once
// (packing head-major first, then gathering k^T and packing it again through cpublas::pack, was ~10 % of the op
// and lost to MKL at r >= 32; so brgemm had been limited to r <= 16); k^T of a whole key tile in one VNNI block
// (one brgemm call per 64 query rows instead of per 64 x 64 block: call overhead, and keys padded to 16 not 64);
// the softmax with the scale folded into its exp pass, vcvtneps2bf16 and a degree-5 exp (degree 3 for bf16
// probabilities, session 9: 6-9 % of the op at ViT-S shapes).
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>

#include "common.h"
#include "softmax_avx512.h"

// MKL's Fortran BLAS (LP64) and CBLAS bf16/fp16 GEMMs, exported by libtorch_cpu on x86 builds. Weak: a torch
// built without MKL leaves them null, the extension still loads, and gemm_rm falls back to a plain loop.
extern "C" {
__attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
__attribute__((weak)) void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
// CBLAS enums are ints: 101 row-major, 111 no transpose, 112 transpose.
__attribute__((weak)) void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const at::BFloat16* a, int lda, const at::BFloat16* b, int ldb, float beta, float* c,
                            int ldc);
__attribute__((weak)) void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const at::Half* a,
                          int lda, const at::Half* b, int ldb, float beta, float* c, int ldc);
}

namespace skd::cpu {
namespace {

// Row-major C (m, n) = alpha * A (m, k) @ op(B) + beta * C; op(B) = B (k, n) or, with b_t, B^T for B (n, k).
// A and B in the input dtype, C in the accumulation type; beta is 0 (C is not read) or 1.
template <typename in_t, typename acc>
void gemm_rm(bool b_t, int64_t m, int64_t n, int64_t k, acc alpha, const in_t* a, int64_t lda, const in_t* b,
             int64_t ldb, acc beta, acc* c, int64_t ldc) {
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  // Fortran BLAS is column-major: C^T (n, m) = op(B)^T A^T.
  const char ta = b_t ? 'T' : 'N', tb = 'N';
  if constexpr (std::is_same_v<in_t, at::BFloat16>) {
    if (cblas_gemm_bf16bf16f32 != nullptr) {
      return cblas_gemm_bf16bf16f32(101, 111, b_t ? 112 : 111, mi, ni, ki, alpha, a, la, b, lb, beta, c, lc);
    }
  } else if constexpr (std::is_same_v<in_t, at::Half>) {
    if (cblas_gemm_f16f16f32 != nullptr) {
      return cblas_gemm_f16f16f32(101, 111, b_t ? 112 : 111, mi, ni, ki, alpha, a, la, b, lb, beta, c, lc);
    }
  } else if constexpr (std::is_same_v<acc, double>) {
    if (dgemm_ != nullptr) return dgemm_(&ta, &tb, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
  } else {
    if (sgemm_ != nullptr) return sgemm_(&ta, &tb, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
  }
  for (int64_t i = 0; i < m; ++i) {  // no MKL in this torch: correct, not fast
    for (int64_t j = 0; j < n; ++j) {
      acc dot = 0;
      for (int64_t t = 0; t < k; ++t) {
        dot += static_cast<acc>(a[i * lda + t]) * static_cast<acc>(b_t ? b[j * ldb + t] : b[t * ldb + j]);
      }
      c[i * ldc + j] = alpha * dot + (beta == acc(0) ? acc(0) : beta * c[i * ldc + j]);
    }
  }
}

// Tile sizes: a query tile of at most kQTile rows; a key tile whose packed K and V (2 * kt * H * r values)
// stay near 2 MiB (bf16: 1 MiB), so the two products of every head reuse them from L2.
constexpr int64_t kQTile = 256;
constexpr int64_t kKVBudget = int64_t(1) << 19;

// n uninitialised values.
template <typename T>
std::unique_ptr<T[]> buffer(int64_t n) {
  return std::unique_ptr<T[]>(new T[n]);
}

struct Shape {
  int64_t S, N, H, r, qt, kt;
};

// Where q, k and v live: base pointers, per-tensor sequence and token strides, and the rank stride w (3H for
// the fused qkv, whose three pointers are H columns apart; H for separate tensors). Columns have unit stride.
template <typename scalar_t>
struct Operands {
  const scalar_t* base[3];
  int64_t st_s[3], st_n[3];
  int64_t w;
  bool fused;
};

#ifdef __AVX2__
// An 8x8 block of 32-bit elements transposed in registers: r[c][a] <- r[a][c].
inline void transpose8x8_regs(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int a = 0; a < 8; a += 2) {
    t[a] = _mm256_unpacklo_ps(r[a], r[a + 1]);
    t[a + 1] = _mm256_unpackhi_ps(r[a], r[a + 1]);
  }
  for (int a = 0; a < 8; a += 4) {
    u[a] = _mm256_shuffle_ps(t[a], t[a + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[a + 1] = _mm256_shuffle_ps(t[a], t[a + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[a + 2] = _mm256_shuffle_ps(t[a + 1], t[a + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[a + 3] = _mm256_shuffle_ps(t[a + 1], t[a + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int a = 0; a < 4; ++a) {
    r[a] = _mm256_permute2f128_ps(u[a], u[a + 4], 0x20);
    r[a + 4] = _mm256_permute2f128_ps(u[a], u[a + 4], 0x31);
  }
}

// out[c * ld + j] = in[j * w + c] for an 8x8 block (j, c < 8).
inline void transpose8x8(const float* in, int64_t w, float* out, int64_t ld) {
  __m256 r[8];
  for (int a = 0; a < 8; ++a) r[a] = _mm256_loadu_ps(in + a * w);
  transpose8x8_regs(r);
  for (int a = 0; a < 8; ++a) _mm256_storeu_ps(out + a * ld, r[a]);
}

// An 8x8 block of 16-bit elements (bf16, fp16: only their bits move) transposed in registers.
inline void transpose8x8_regs(__m128i a[8]) {
  __m128i b[8], c[8];
  for (int k = 0; k < 8; k += 2) {
    b[k] = _mm_unpacklo_epi16(a[k], a[k + 1]);
    b[k + 1] = _mm_unpackhi_epi16(a[k], a[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    c[k] = _mm_unpacklo_epi32(b[k], b[k + 2]);
    c[k + 1] = _mm_unpackhi_epi32(b[k], b[k + 2]);
    c[k + 2] = _mm_unpacklo_epi32(b[k + 1], b[k + 3]);
    c[k + 3] = _mm_unpackhi_epi32(b[k + 1], b[k + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    a[2 * k] = _mm_unpacklo_epi64(c[k], c[k + 4]);
    a[2 * k + 1] = _mm_unpackhi_epi64(c[k], c[k + 4]);
  }
}

template <typename T, std::enable_if_t<sizeof(T) == 2, int> = 0>
inline void transpose8x8(const T* in, int64_t w, T* out, int64_t ld) {
  __m128i a[8];
  for (int k = 0; k < 8; ++k) a[k] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + k * w));
  transpose8x8_regs(a);
  for (int k = 0; k < 8; ++k) _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k * ld), a[k]);
}

// transpose8x8 of a partial block, bj rows of bc columns (both <= 8), through masked loads and stores.
template <typename T>
SKD_AVX512 void transpose_edge_avx512(const T* in, int64_t ld_in, int64_t bj, int64_t bc, T* out, int64_t ld_out) {
  const auto cols = static_cast<__mmask8>((1u << bc) - 1), rows = static_cast<__mmask8>((1u << bj) - 1);
  if constexpr (sizeof(T) == 4) {
    __m256 r[8];
    for (int64_t u = 0; u < 8; ++u) r[u] = u < bj ? _mm256_maskz_loadu_ps(cols, in + u * ld_in) : _mm256_setzero_ps();
    transpose8x8_regs(r);
    for (int64_t u = 0; u < bc; ++u) _mm256_mask_storeu_ps(out + u * ld_out, rows, r[u]);
  } else {
    static_assert(sizeof(T) == 2);
    __m128i r[8];
    for (int64_t u = 0; u < 8; ++u) r[u] = u < bj ? _mm_maskz_loadu_epi16(cols, in + u * ld_in) : _mm_setzero_si128();
    transpose8x8_regs(r);
    for (int64_t u = 0; u < bc; ++u) _mm_mask_storeu_epi16(out + u * ld_out, rows, r[u]);
  }
}
#endif

// out[c * ld_out + j] = in[j * ld_in + c] for j < nj, c < nc: in 8x8 register blocks (a scalar loop with
// strided loads measured 25 % of the kernel), the partial blocks at the edges (e.g. ViT-S's 6 heads) through
// AVX-512 masked loads and stores where the CPU has them (element by element: ~5 % of the op at H = 6); element
// by element for fp64.
template <typename T>
void transpose(const T* in, int64_t ld_in, int64_t nj, int64_t nc, T* out, int64_t ld_out) {
#ifdef __AVX2__
  if constexpr (!std::is_same_v<T, double>) {
    const bool avx512 = has_avx512();
    for (int64_t j = 0; j < nj; j += 8) {
      const int64_t bj = std::min<int64_t>(8, nj - j);
      for (int64_t c = 0; c < nc; c += 8) {
        const int64_t bc = std::min<int64_t>(8, nc - c);
        const T* a = in + j * ld_in + c;
        T* b = out + c * ld_out + j;
        if (bj == 8 && bc == 8) {
          transpose8x8(a, ld_in, b, ld_out);
        } else if (avx512) {
          transpose_edge_avx512(a, ld_in, bj, bc, b, ld_out);
        } else {
          for (int64_t u = 0; u < bc; ++u) {
            for (int64_t v = 0; v < bj; ++v) b[u * ld_out + v] = a[v * ld_in + u];
          }
        }
      }
    }
    return;
  }
#endif
  for (int64_t c = 0; c < nc; ++c) {
    for (int64_t j = 0; j < nj; ++j) out[c * ld_out + j] = in[j * ld_in + c];
  }
}

// dst[c * ld_h + i * ld_i + j] = src[i * src_tok + j * w + c] for the tokens i < n, ranks j < r and the nc
// columns c (nc = H: one of q, k, v; 2H or 3H: neighbouring ones of a fused qkv, whose packed heads follow
// each other); w is the rank stride. One (r, nc) -> (nc, r) transpose per token.
template <typename scalar_t>
void pack_heads(const scalar_t* src, int64_t src_tok, int64_t n, int64_t nc, int64_t w, const Shape& g,
                scalar_t* dst, int64_t ld_h, int64_t ld_i) {
  for (int64_t i = 0; i < n; ++i) transpose(src + i * src_tok, w, g.r, nc, dst + i * ld_i, ld_h);
}

// Packs tokens t0 .. t0 + n of sequence s of the `count` operands from `first` (0 q, 1 k, 2 v) into dst,
// operand after operand, each (H, n, r): one pass over a fused qkv's neighbouring columns, else one per tensor.
template <typename scalar_t>
void pack_operands(const Operands<scalar_t>& x, int first, int count, int64_t s, int64_t t0, int64_t n,
                   const Shape& g, scalar_t* dst) {
  const int64_t H = g.H, r = g.r;
  for (int o = first; o < first + count; ++o) {
    const int64_t nc = x.fused ? count * H : H;
    pack_heads(x.base[o] + s * x.st_s[o] + t0 * x.st_n[o], x.st_n[o], n, nc, x.w, g, dst + (o - first) * H * n * r,
               n * r, r);
    if (x.fused) return;
  }
}

// out[i * H * r + j * H + h] = src[h * n * r + i * r + j] for the tokens i < n: the inverse of pack_heads
// for one (H, n, r) buffer, into the proj's rank-major columns.
template <typename scalar_t>
void unpack_heads(const scalar_t* src, int64_t n, const Shape& g, scalar_t* out) {
  for (int64_t i = 0; i < n; ++i) transpose(src + i * g.r, n * g.r, g.H, g.r, out + i * g.H * g.r, g.H);
}

// out[i * H * r + j * H + h] = o[(h * n + i) * ldo + j] * inv_l[h * n + i] rounded to T, for the tokens i < n:
// the normalised output rounded and transposed into the proj's rank-major columns in one pass over o, 8 heads x 8
// ranks per register block (normalising and rounding o first, then unpack_heads, read and wrote it twice more).
template <typename T, bool kNativeBF16>
SKD_AVX512_BF16 void finish_avx512(const float* o, const float* inv_l, int64_t n, int64_t ldo, const Shape& g, T* out) {
  const int64_t H = g.H, r = g.r;
  for (int64_t i = 0; i < n; ++i) {
    T* row = out + i * H * r;
    for (int64_t h0 = 0; h0 < H; h0 += 8) {
      const int64_t hn = std::min<int64_t>(8, H - h0);
      const auto heads = static_cast<__mmask16>((1u << hn) - 1);
      for (int64_t j0 = 0; j0 < r; j0 += 8) {
        const int64_t jn = std::min<int64_t>(8, r - j0);
        const auto ranks = static_cast<__mmask8>((1u << jn) - 1);
        __m256 x[8];
        for (int64_t u = 0; u < 8; ++u) {
          const int64_t hi = (h0 + u) * n + i;
          x[u] = u < hn ? _mm256_mul_ps(_mm256_maskz_loadu_ps(ranks, o + hi * ldo + j0), _mm256_set1_ps(inv_l[hi]))
                        : _mm256_setzero_ps();
        }
        transpose8x8_regs(x);
        for (int64_t c = 0; c < jn; ++c) {
          store16<T, kNativeBF16>(row + (j0 + c) * H + h0, _mm512_castps256_ps512(x[c]), heads);
        }
      }
    }
  }
}

// Online-softmax update of one score row x (n values, already scaled), plus its bias row if any:
// p = exp(x + bias - m_new) overwrites x (two passes: bias and max, then exp and sum); returns the factor
// exp(m_old - m_new) that rescales the row's running sum and output.
template <typename scalar_t, typename acc>
acc softmax_step(acc* x, const scalar_t* bias, int64_t n, acc& m, acc& l) {
  using Vec = Vectorized<acc>;
  constexpr acc kInf = std::numeric_limits<acc>::infinity();
  const int64_t vec_end = n - n % Vec::size();
  Vec vmax(-kInf);
  acc mx = -kInf;
  int64_t t = 0;
  for (; t < vec_end; t += Vec::size()) {
    Vec v = Vec::loadu(x + t);
    if (bias != nullptr) {
      v = v + load_acc(bias + t);
      v.store(x + t);
    }
    vmax = at::vec::maximum(vmax, v);
  }
  for (; t < n; ++t) {
    if (bias != nullptr) x[t] += static_cast<acc>(bias[t]);
    mx = std::max(mx, x[t]);
  }
  mx = std::max(mx, at::vec::vec_reduce_all<acc>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, vmax));
  const acc m_new = std::max(m, mx);
  // A row whose scores are all -inf so far (a fully masked tile) keeps p = 0 instead of exp(nan).
  const acc shift = m_new == -kInf ? acc(0) : m_new;
  Vec vsum(0);
  for (t = 0; t < vec_end; t += Vec::size()) {
    const Vec p = (Vec::loadu(x + t) - Vec(shift)).exp_u20();
    p.store(x + t);
    vsum = vsum + p;
  }
  acc sum = at::vec::vec_reduce_all<acc>([](Vec a, Vec b) { return a + b; }, vsum);
  for (; t < n; ++t) {
    x[t] = std::exp(x[t] - shift);
    sum += x[t];
  }
  const acc alpha = m == -kInf ? acc(0) : std::exp(m - shift);
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

// softmax_step on the fastest path this CPU has, for scores x * scale; for bf16/fp16 also rounds p to the
// input dtype into probs (n values; fp32/fp64: unused, p stays in x).
template <typename scalar_t, typename acc>
acc softmax_row(acc* x, acc scale, const scalar_t* bias, int64_t n, acc& m, acc& l, scalar_t* probs, bool avx512) {
  if constexpr (std::is_same_v<acc, float>) {
    if (avx512) {
      if constexpr (std::is_same_v<scalar_t, float>) probs = x;
      return softmax_step_avx512(x, scale, bias, n, m, l, probs);
    }
  }
  if (scale != acc(1)) at::vec::map([scale](Vectorized<acc> a) { return a * Vectorized<acc>(scale); }, x, x, n);
  const acc alpha = softmax_step(x, bias, n, m, l);
  if constexpr (!std::is_same_v<scalar_t, acc>) at::vec::convert(x, probs, n);
  return alpha;
}

// The hn <= 8 heads h0 .. h0 + hn of two bf16 rows a and b (null: zeros) of a rank-major operand, interleaved
// into one 32-bit pair (a[h], b[h]) per head: the VNNI pair of head h.
SKD_AVX512 inline __m256 vnni_pairs(const at::BFloat16* a, const at::BFloat16* b, __mmask8 heads) {
  const __m128i x = a != nullptr ? _mm_maskz_loadu_epi16(heads, a) : _mm_setzero_si128();
  const __m128i y = b != nullptr ? _mm_maskz_loadu_epi16(heads, b) : _mm_setzero_si128();
  return _mm256_castsi256_ps(_mm256_set_m128i(_mm_unpackhi_epi16(x, y), _mm_unpacklo_epi16(x, y)));
}

// bf16 products through oneDNN's brgemm micro-kernel (AMX where the CPU has it), the kernel ATen's flash
// attention runs for bf16. Its B operands, k^T (all keys of the tile: one call per 64 query rows; blocks of 64
// keys measured ~3 % slower, per-call overhead) and v in column blocks of nb <= 64 ranks, are packed once per
// key tile, for every head, straight from the rank-major operands into the VNNI layout cpublas::pack writes
// (pairs of consecutive K-rows interleaved), zero-padded: a token's ranks of 8 heads are contiguous there, so
// 8 heads x 8 (tokens or ranks) of 32-bit VNNI pairs are one 8x8 register transpose. The VNNI pairs of k^T are
// rank pairs: an odd r gets a zero rank r, in q too, which is packed head-major (pack_q) as A.
// Before (packing head-major first, then gathering k^T and packing it again through cpublas::pack) this path
// beat MKL's bf16 GEMM only at r <= 16: the double packing was ~10 % of the op at r = 32/64.
struct BrgemmTiles {
  using bf16 = at::BFloat16;
  int64_t H = 0, r = 0, kn = 0;
  int64_t rk = 0;   // r rounded up to even: the scores' K, q's leading dimension
  int64_t ke = 0;   // kn rounded up to 16: the scores' leading dimension, the first product's N
  int64_t kn2 = 0;  // kn rounded up to even: the probabilities' leading dimension, the second product's K
  int64_t nb = 0;   // v's column block: r rounded up to 16 (r <= 64) or 64
  int64_t rn = 0;   // r rounded up to nb: the output accumulator's leading dimension
  std::unique_ptr<bf16[]> kt, v;
  static constexpr int64_t kRows = 64;  // rows per brgemm call

  BrgemmTiles(int64_t H_, int64_t r_, int64_t kt_max)
      : H(H_), r(r_), rk(even(r_)), nb(block(r_)), rn(padded(r_)) {
    kt = buffer<bf16>(H * ((kt_max + 15) / 16 * 16) * rk);
    v = buffer<bf16>(H * (kt_max + 1) * rn);
  }

  static int64_t even(int64_t r) { return (r + 1) / 2 * 2; }
  static int64_t block(int64_t r) { return r <= 64 ? (r + 15) / 16 * 16 : 64; }
  static int64_t padded(int64_t r) { return (r + block(r) - 1) / block(r) * block(r); }

  static bool usable(int64_t r) {
    return has_avx512() && at::native::cpublas::could_pack(at::kBFloat16);
  }

  // q of tokens t0 .. t0 + n of sequence s, head-major (H, n, rk), rank r (odd r) zero.
  void pack_q(const Operands<bf16>& x, int64_t s, int64_t t0, int64_t n, const Shape& g, bf16* dst) const {
    pack_heads(x.base[0] + s * x.st_s[0] + t0 * x.st_n[0], x.st_n[0], n, H, x.w, g, dst, n * rk, rk);
    if (rk > r) {
      for (int64_t hi = 0; hi < H * n; ++hi) dst[hi * rk + r] = bf16(0.f);
    }
  }

  // Packs keys t0 .. t0 + n of sequence s: k^T of head h as (rk / 2, ke, 2) at kt + h * ke * rk,
  // v of head h as (rn / nb) blocks (kn2 / 2, nb, 2) at v + h * kn2 * rn. Padding keys and ranks are 0.
  SKD_AVX512 void pack(const Operands<bf16>& x, int64_t s, int64_t t0, int64_t n) {
    kn = n;
    ke = (n + 15) / 16 * 16;
    kn2 = (n + 1) / 2 * 2;
    const bf16* k = x.base[1] + s * x.st_s[1] + t0 * x.st_n[1];
    const bf16* vs = x.base[2] + s * x.st_s[2] + t0 * x.st_n[2];
    const int64_t tk = x.st_n[1], tv = x.st_n[2], w = x.w;
    __m256 rows[8];
    for (int64_t h0 = 0; h0 < H; h0 += 8) {
      const int64_t hn = std::min<int64_t>(8, H - h0);
      const auto heads = static_cast<__mmask8>((1u << hn) - 1);
      // k^T: rows u = 8 keys, each 8 heads' (rank 2p, rank 2p + 1) pairs -> per head 8 keys' pairs.
      for (int64_t t = 0; t < ke; t += 8) {
        for (int64_t p = 0; p < rk / 2; ++p) {
          for (int64_t u = 0; u < 8; ++u) {
            const bf16* row = t + u < n ? k + (t + u) * tk + 2 * p * w + h0 : nullptr;
            rows[u] = vnni_pairs(row, row != nullptr && 2 * p + 1 < r ? row + w : nullptr, heads);
          }
          transpose8x8_regs(rows);
          for (int64_t c = 0; c < hn; ++c) {
            _mm256_storeu_ps(reinterpret_cast<float*>(kt.get() + (h0 + c) * ke * rk) + p * ke + t, rows[c]);
          }
        }
      }
      // v: rows u = 8 ranks, each 8 heads' (key 2p, key 2p + 1) pairs -> per head 8 ranks' pairs.
      for (int64_t p = 0; p < kn2 / 2; ++p) {
        const bf16* a = vs + 2 * p * tv + h0;
        const bf16* b = 2 * p + 1 < n ? a + tv : nullptr;
        for (int64_t j = 0; j < rn; j += 8) {
          for (int64_t u = 0; u < 8; ++u) {
            const bool in = j + u < r;
            rows[u] = vnni_pairs(in ? a + (j + u) * w : nullptr, in && b != nullptr ? b + (j + u) * w : nullptr, heads);
          }
          transpose8x8_regs(rows);
          const int64_t c0 = j / nb * nb;
          for (int64_t c = 0; c < hn; ++c) {
            _mm256_storeu_ps(reinterpret_cast<float*>(v.get() + (h0 + c) * kn2 * rn + c0 * kn2) + p * nb + j - c0,
                             rows[c]);
          }
        }
      }
    }
  }

  // sc (qn, ke) = q_h (qn, rk) k_h^T, unscaled.
  void scores(int64_t h, const bf16* q, int64_t qn, float* sc) const {
    for (int64_t i = 0; i < qn; i += kRows) {
      const int64_t mi = std::min(kRows, qn - i);
      at::native::cpublas::brgemm(mi, ke, rk, rk, ke, ke, false, q + i * rk, kt.get() + h * ke * rk, sc + i * ke);
    }
  }

  // o (qn, rn) (+)= p (qn, kn2) v_h.
  void values(int64_t h, const bf16* p, int64_t qn, bool add, float* o) const {
    for (int64_t i = 0; i < qn; i += kRows) {
      const int64_t mi = std::min(kRows, qn - i);
      for (int64_t c = 0; c < rn; c += nb) {
        at::native::cpublas::brgemm(mi, nb, kn2, kn2, nb, rn, add, p + i * kn2, v.get() + h * kn2 * rn + c * kn2,
                                    o + i * rn + c);
      }
    }
  }
};

template <typename scalar_t>
void attention_kernel(const Operands<scalar_t>& x, const at::Tensor& bias, double scale_d, at::Tensor& out,
                      const Shape& g) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  constexpr bool kNarrow = !std::is_same_v<scalar_t, acc>;
  const acc scale = static_cast<acc>(scale_d);
  const int64_t H = g.H, r = g.r, Hr = H * r;
  const int64_t n_qt = (g.N + g.qt - 1) / g.qt;
  const bool has_bias = bias.defined();
  const scalar_t* bias_ptr = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
  // Broadcast bias dims (size 1) read with stride 0.
  const int64_t b_s = has_bias && bias.size(0) > 1 ? bias.stride(0) : 0;
  const int64_t b_h = has_bias && bias.size(1) > 1 ? bias.stride(1) : 0;
  const int64_t b_i = has_bias ? bias.stride(2) : 0;
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  const bool avx512 = std::is_same_v<acc, float> && has_avx512();
  const bool use_brgemm = std::is_same_v<scalar_t, at::BFloat16> && BrgemmTiles::usable(r);
  // The output accumulator's and the probabilities' leading dimensions (brgemm pads them).
  const int64_t ldo = use_brgemm ? BrgemmTiles::padded(r) : r;
  const int64_t ldq = use_brgemm ? BrgemmTiles::even(r) : r;  // packed q's leading dimension

  at::parallel_for(0, g.S * n_qt, 1, [&](int64_t begin, int64_t end) {
    // Packed tiles, head-major: q (H, qt, r) followed by k then v (2H, kt, r); with one query and one key tile
    // the three are packed in one pass as (3H, N, r). With brgemm only q, (H, qt, r rounded up to even): k and v
    // go to BrgemmTiles. Scores (qt, kt); output (H, qt, r).
    // For bf16/fp16, p holds the probabilities rounded to scalar_t (fp32/fp64: unused, p is sc itself) and,
    // without AVX-512, ob the output before its transpose (fp32/fp64: o itself).
    // (Uninitialised: every value is written before it is read; zero-filling them measured 3 % of the op.)
    // With brgemm the scores are (qt, kt rounded up to 16) and p (qt, kt rounded up to even).
    const auto qkv_p = buffer<scalar_t>(H * g.qt * ldq + (use_brgemm ? 0 : 2 * H * g.kt * r));
    const int64_t kt_pad = use_brgemm ? (g.kt + 15) / 16 * 16 : g.kt;
    const auto p = buffer<scalar_t>(kNarrow ? g.qt * kt_pad : 0);
    const auto ob = buffer<scalar_t>(kNarrow && !avx512 ? H * g.qt * r : 0);
    const auto sc = buffer<acc>(g.qt * kt_pad), o = buffer<acc>(H * g.qt * ldo), m = buffer<acc>(H * g.qt),
               l = buffer<acc>(H * g.qt);
    std::optional<BrgemmTiles> tiles;
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (use_brgemm) tiles.emplace(H, r, g.kt);
    }
    int64_t packed_s = -1;  // the sequence whose keys and values kv holds, when it holds all of them
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / n_qt, q0 = (item % n_qt) * g.qt, qn = std::min(g.qt, g.N - q0);
      scalar_t* q = qkv_p.get();
      scalar_t* kv = q + H * qn * r;
      const bool one_tile = qn == g.N && g.kt >= g.N;
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        if (tiles) tiles->pack_q(x, s, q0, qn, g, q);
      }
      if (one_tile && !tiles) {
        pack_operands(x, 0, 3, s, 0, g.N, g, q);
      } else if (!tiles) {
        kv = q + H * g.qt * r;  // fixed place, so that it can be reused by the next query tile
        pack_operands(x, 0, 1, s, q0, qn, g, q);
      }
      std::fill_n(m.get(), H * qn, -std::numeric_limits<acc>::infinity());
      std::fill_n(l.get(), H * qn, acc(0));
      for (int64_t k0 = 0; k0 < g.N; k0 += g.kt) {
        const int64_t kn = std::min(g.kt, g.N - k0);
        const bool fresh = one_tile || packed_s != s;
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          if (tiles && fresh) tiles->pack(x, s, k0, kn);  // k and v straight into brgemm's layout
        }
        if (!one_tile && packed_s != s) {
          if (!tiles) pack_operands(x, 1, 2, s, k0, kn, g, kv);
          packed_s = kn == g.N ? s : -1;  // one key tile: the next query tile of s reuses it
        }
        // Leading dimensions of the scores and of p.
        const int64_t ld_sc = tiles ? tiles->ke : kn, ld_p = tiles ? tiles->kn2 : kn;
        for (int64_t h = 0; h < H; ++h) {
          // (Splitting the query rows into blocks of 64, so that the scores stay in L1/L2 between the two
          // products, measured 3-15 % slower: more, smaller MKL calls.)
          acc* oh = o.get() + h * qn * ldo;
          // scores (qn, kn) = q_h k_h^T (* scale: MKL's alpha, or in the softmax after brgemm)
          acc score_scale = scale;
          if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
            if (tiles) tiles->scores(h, q + h * qn * ldq, qn, sc.get());
          }
          if (!tiles) {
            gemm_rm<scalar_t, acc>(true, qn, kn, r, scale, q + h * qn * r, r, kv + h * kn * r, r, acc(0), sc.get(), kn);
            score_scale = acc(1);
          }
          for (int64_t i = 0; i < qn; ++i) {
            acc* x = sc.get() + i * ld_sc;
            const scalar_t* brow = has_bias ? bias_ptr + s * b_s + h * b_h + (q0 + i) * b_i + k0 : nullptr;
            scalar_t* prow = p.get() + i * ld_p;
            const acc alpha = softmax_row(x, score_scale, brow, kn, m[h * qn + i], l[h * qn + i], prow, avx512);
            if (ld_p > kn) prow[kn] = scalar_t(0);  // brgemm's even K: a zero probability
            // (the first key tile writes o: nothing to rescale)
            if (k0 > 0 && alpha != acc(1)) {
              at::vec::map([alpha](Vec a) { return a * Vec(alpha); }, oh + i * ldo, oh + i * ldo, r);
            }
          }
          // o_h (qn, r) += p (qn, kn) v_h (kn, r)
          if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
            if (tiles) tiles->values(h, p.get(), qn, k0 > 0, oh);
          }
          if (!tiles) {
            const scalar_t* probs;
            if constexpr (kNarrow) {
              probs = p.get();
            } else {
              probs = sc.get();
            }
            // (the first key tile writes o: beta 0, nothing to zero-fill)
            gemm_rm<scalar_t, acc>(false, qn, r, kn, acc(1), probs, kn, kv + (H + h) * kn * r, r, acc(k0 > 0), oh, r);
          }
        }
      }
      // o[h, i, :] /= l[h, i], rounded to scalar_t, then out[s, q0 + i, j*H + h] = o[h, i, j]: the proj's
      // rank-major columns, one (H, r) -> (r, H) transpose per token.
      scalar_t* dst = out_ptr + (s * g.N + q0) * Hr;
      if constexpr (std::is_same_v<acc, float>) {
        if (avx512) {
          for (int64_t hi = 0; hi < H * qn; ++hi) l[hi] = 1.f / l[hi];
          if (std::is_same_v<scalar_t, at::BFloat16> && has_avx512_bf16()) {
            finish_avx512<scalar_t, true>(o.get(), l.get(), qn, ldo, g, dst);
          } else {
            finish_avx512<scalar_t, false>(o.get(), l.get(), qn, ldo, g, dst);
          }
          continue;
        }
      }
      scalar_t* o_out;
      if constexpr (kNarrow) {
        o_out = ob.get();
      } else {
        o_out = o.get();
      }
      for (int64_t hi = 0; hi < H * qn; ++hi) {
        const acc inv = acc(1) / l[hi];
        acc* row = o.get() + hi * ldo;
        at::vec::map([inv](Vec a) { return a * Vec(inv); }, row, row, r);
        if constexpr (kNarrow) at::vec::convert(row, o_out + hi * r, r);
      }
      unpack_heads(o_out, qn, g, dst);
    }
    if (tiles) at::native::cpublas::brgemm_release();  // the AMX tile state this thread configured
  });
}

// The checked bias (rows read with unit stride) and the output; then the kernel, given the operands (made from
// tensors whose columns have unit stride) for the input dtype.
template <typename MakeOperands>
at::Tensor run(const at::Tensor& like, int64_t S, int64_t N, int64_t H, int64_t r, double scale,
               const std::optional<at::Tensor>& attn_bias, MakeOperands make) {
  at::Tensor bias;
  if (attn_bias.has_value() && attn_bias->defined()) {
    const at::Tensor& b = *attn_bias;
    TORCH_CHECK(b.dim() == 4 && (b.size(0) == 1 || b.size(0) == S) && (b.size(1) == 1 || b.size(1) == H) &&
                    b.size(2) == N && b.size(3) == N,
                "attn_bias must be (S or 1, H or 1, N, N) = (", S, ", ", H, ", ", N, ", ", N, "), got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == like.scalar_type() && b.device() == like.device(),
                "attn_bias must share the inputs' dtype and device");
    bias = b.stride(3) == 1 ? b : b.contiguous();  // rows are read with unit stride
  }
  at::Tensor out = at::empty({S, N, r * H}, like.options());
  if (out.numel() == 0) return out;  // r == 0: (S, N, 0)
  Shape g{S, N, H, r, 0, 0};
  g.kt = std::min<int64_t>(N, std::max<int64_t>(64, kKVBudget / (2 * H * r)));
  // Query tiles: as even as possible, and at least one per thread when there are fewer sequences than threads.
  const int64_t threads = at::get_num_threads();
  int64_t n_qt = (N + kQTile - 1) / kQTile;
  if (S * n_qt < threads) n_qt = std::min<int64_t>((N + 15) / 16, (threads + S - 1) / S);
  n_qt = std::max<int64_t>(n_qt, 1);
  g.qt = (N + n_qt - 1) / n_qt;
  SKD_DISPATCH_FLOATS(like.scalar_type(), "skd_prefix_attention", [&] {
    attention_kernel<scalar_t>(make(scalar_t(0)), bias, scale, out, g);
  });
  return out;
}

at::Tensor unit_columns(const at::Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); }

at::Tensor prefix_attention_cpu(const at::Tensor& qkv_in, int64_t num_heads, double scale,
                                const std::optional<at::Tensor>& attn_bias) {
  TORCH_CHECK(qkv_in.dim() == 3, "qkv must be (S, N, r*3*H), got ", qkv_in.dim(), " dims");
  TORCH_CHECK(num_heads >= 1 && qkv_in.size(2) % (3 * num_heads) == 0,
              "qkv's width ", qkv_in.size(2), " must be a multiple of 3 * num_heads = ", 3 * num_heads);
  const int64_t H = num_heads;
  const at::Tensor qkv = unit_columns(qkv_in);
  return run(qkv, qkv.size(0), qkv.size(1), H, qkv.size(2) / (3 * H), scale, attn_bias, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* p = qkv.const_data_ptr<scalar_t>();
    const int64_t ss = qkv.stride(0), sn = qkv.stride(1);
    return Operands<scalar_t>{{p, p + H, p + 2 * H}, {ss, ss, ss}, {sn, sn, sn}, 3 * H, true};
  });
}

at::Tensor prefix_attention_separate_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                         int64_t num_heads, double scale, const std::optional<at::Tensor>& attn_bias) {
  TORCH_CHECK(q_in.dim() == 3, "q must be (S, N, r*H), got ", q_in.dim(), " dims");
  TORCH_CHECK(k_in.sizes() == q_in.sizes() && v_in.sizes() == q_in.sizes(), "q, k and v must share one shape, got ",
              q_in.sizes(), ", ", k_in.sizes(), ", ", v_in.sizes());
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type() &&
                  k_in.device() == q_in.device() && v_in.device() == q_in.device(),
              "q, k and v must share one dtype and device");
  TORCH_CHECK(num_heads >= 1 && q_in.size(2) % num_heads == 0,
              "q's width ", q_in.size(2), " must be a multiple of num_heads = ", num_heads);
  const int64_t H = num_heads;
  const at::Tensor q = unit_columns(q_in), k = unit_columns(k_in), v = unit_columns(v_in);
  return run(q, q.size(0), q.size(1), H, q.size(2) / H, scale, attn_bias, [&](auto zero) {
    using scalar_t = decltype(zero);
    return Operands<scalar_t>{{q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>()},
                              {q.stride(0), k.stride(0), v.stride(0)},
                              {q.stride(1), k.stride(1), v.stride(1)},
                              H,
                              false};
  });
}

}  // namespace
}  // namespace skd::cpu

TORCH_LIBRARY_IMPL(skd_kernels, CPU, m) {
  m.impl("prefix_attention", &skd::cpu::prefix_attention_cpu);
  m.impl("prefix_attention_separate", &skd::cpu::prefix_attention_separate_cpu);
  m.impl("_prefix_attention_autograd", &skd::cpu::prefix_attention_cpu);
  m.impl("_prefix_attention_separate_autograd", &skd::cpu::prefix_attention_separate_cpu);
}
