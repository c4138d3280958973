// prefix_linear's argument checks and GEMM operands, shared by the CPU and CUDA kernels (each adds its own
// device checks and epilogue): y (M, k_out) = act(x2 (M, k_in) @ w_t (k_in, k_out) + bias[:k_out]).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <vector>

namespace skd {

enum class Act { kNone, kGelu, kGeluTanh };

struct PrefixGemm {
  at::Tensor x2;    // (M, k_in): x's leading dims collapsed, a view whenever they collapse (always if contiguous)
  at::Tensor w_t;   // (k_in, k_out): the weight's leading block, transposed; a strided view read through the
                    // BLAS leading dimension, so the weight is never copied
  at::Tensor bias;  // (k_out,) view, or undefined
  Act act;
  std::vector<int64_t> out_shape;  // (..., k_out)
};

inline Act parse_activation(c10::string_view activation) {
  const std::string_view name(activation.data(), activation.size());
  if (name == "none") return Act::kNone;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  TORCH_CHECK(false, "activation must be none, gelu or gelu_tanh, got ", name);
}

inline PrefixGemm prefix_gemm_operands(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, int64_t k_in, int64_t k_out,
                                       c10::string_view activation) {
  TORCH_CHECK(weight.dim() == 2, "weight must be (out, in)");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= k_in, "x's last dim must be >= k_in");
  TORCH_CHECK(0 <= k_in && k_in <= weight.size(1) && 0 <= k_out && k_out <= weight.size(0), "k out of range");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.device() == weight.device(),
              "x and weight must share a dtype and a device");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) >= k_out && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                "bias must be 1-D, >= k_out long, in x's dtype and on its device");
  }
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(k_out);
  return {x.narrow(-1, 0, k_in).reshape({rows, k_in}), weight.narrow(0, 0, k_out).narrow(1, 0, k_in).t(),
          has_bias ? bias->narrow(0, 0, k_out) : at::Tensor(), parse_activation(activation), std::move(out_shape)};
}

}  // namespace skd
