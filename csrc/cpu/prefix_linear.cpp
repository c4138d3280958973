// prefix_linear on CPU: y = act(x[..., :k_in] @ W[:k_out, :k_in]^T + b[:k_out]).
//
// The GEMM runs on strided views: the weight block keeps the full weight's row stride (BLAS's leading
// dimension), so nothing is copied. With GELU, bias and activation then run as one parallel, vectorised
// pass over y; without, the bias goes into the GEMM (beta = 1) as in F.linear.
#include <torch/library.h>

#include <cmath>
#include <string_view>

#include "common.h"

namespace skd::cpu {
namespace {

enum class Act { kNone, kGelu, kGeluTanh };

Act parse_activation(std::string_view name) {
  if (name == "none") return Act::kNone;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  TORCH_CHECK(false, "activation must be none, gelu or gelu_tanh, got ", name);
}

// GELU on a vector of the accumulation type; the formulas are ATen's (erf form, or tanh form).
template <bool kTanh, typename V>
inline V gelu(V v) {
  using S = typename V::value_type;
  if constexpr (kTanh) {
    const V inner = V(S(M_2_SQRTPI * M_SQRT1_2)) * (v + V(S(0.044715)) * v * v * v);
    return V(S(0.5)) * v * (V(S(1)) + inner.tanh());
  } else {
    return v * V(S(0.5)) * (V(S(1)) + (v * V(S(M_SQRT1_2))).erf());
  }
}

// y (M, N) row-major, in place: y = gelu(y + bias) with bias (N,) or null.
template <typename scalar_t, bool kTanh>
void bias_gelu(at::Tensor& y, const scalar_t* bias) {
  const int64_t M = y.size(0), N = y.size(1);
  scalar_t* out = y.mutable_data_ptr<scalar_t>();
  // ~32K elements per task keeps the parallel overhead below a few percent of the pass.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* row = out + r * N;
      if (bias != nullptr) {
        at::vec::map2([](auto v, auto b) { return gelu<kTanh>(v + b); }, row, row, bias, N);
      } else {
        at::vec::map([](auto v) { return gelu<kTanh>(v); }, row, row, N);
      }
    }
  });
}

at::Tensor prefix_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             int64_t k_in, int64_t k_out, c10::string_view activation) {
  TORCH_CHECK(weight.dim() == 2, "weight must be (out, in)");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= k_in, "x's last dim must be >= k_in");
  TORCH_CHECK(0 <= k_in && k_in <= weight.size(1) && 0 <= k_out && k_out <= weight.size(0), "k out of range");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must share a dtype");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) >= k_out && bias->scalar_type() == x.scalar_type(),
                "bias must be 1-D, >= k_out long, in x's dtype");
  }
  const Act act = parse_activation(std::string_view(activation.data(), activation.size()));

  // (..., k_in) -> (M, k_in): a view whenever x's leading dims collapse (always for contiguous x).
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  const at::Tensor x2 = x.narrow(-1, 0, k_in).reshape({rows, k_in});
  // The leading block of W, transposed: a strided view, BLAS reads it through its leading dimension.
  const at::Tensor w_t = weight.narrow(0, 0, k_out).narrow(1, 0, k_in).t();
  at::Tensor y = at::empty({x2.size(0), k_out}, x.options());
  // Contiguous bias prefix (k_out elements, never the weight) so the epilogue can load it as a vector.
  const at::Tensor b = has_bias ? bias->narrow(0, 0, k_out).contiguous() : at::Tensor();
  if (act == Act::kNone && has_bias) {
    // No activation: the bias rides in the GEMM's beta = 1 term, exactly what F.linear does.
    at::addmm_out(y, b, x2, w_t);
  } else {
    at::mm_out(y, x2, w_t);  // k_in == 0 gives zeros
  }
  if (act != Act::kNone) {
    SKD_DISPATCH_FLOATS(x.scalar_type(), "skd_prefix_linear_bias_gelu", [&] {
      const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
      if (act == Act::kGeluTanh) {
        bias_gelu<scalar_t, true>(y, bp);
      } else {
        bias_gelu<scalar_t, false>(y, bp);
      }
    });
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(k_out);
  return y.view(out_shape);
}

}  // namespace
}  // namespace skd::cpu

TORCH_LIBRARY_IMPL(skd_kernels, CPU, m) {
  m.impl("prefix_linear", &skd::cpu::prefix_linear_cpu);
}
