// prefix_linear on CPU: y = act(x[..., :k_in] @ W[:k_out, :k_in]^T + b[:k_out]).
//
// The GEMM runs on strided views: the weight block keeps the full weight's row stride (BLAS's leading
// dimension), so nothing is copied. The bias goes into the GEMM (beta = 1) and GELU runs in place on y.
// bf16 blocks that are dense in one order (ElasticViT's always are: a row prefix of a row-major weight, a
// column prefix of a column-major one) go through oneDNN's linear instead (mkldnn::_linear_pointwise, bias
// and GELU fused, reads the block in place), 0-25 % faster than ATen's addmm route on ViT-S/B shapes; fp32
// stays on MKL's sgemm, which oneDNN does not beat. Without autograd on CPU, skd_kernels/ops/prefix_linear.py
// runs this same computation from Python (`_on_views`: the boxed op call costs more than the GEMM's own call).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../prefix_linear_operands.h"
#include "common.h"

namespace skd::cpu {
namespace {

using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                    c10::string_view, c10::List<std::optional<at::Scalar>>,
                                    std::optional<c10::string_view>);

// oneDNN's linear, or nullptr when this torch was built without it.
const c10::TypedOperatorHandle<LinearPointwise>* onednn_linear() {
  static const std::optional<c10::TypedOperatorHandle<LinearPointwise>> op =
      []() -> std::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    const auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value() || !at::hasMKLDNN()) return std::nullopt;
    return handle->typed<LinearPointwise>();
  }();
  return op.has_value() ? &*op : nullptr;
}

at::Tensor prefix_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             int64_t k_in, int64_t k_out, c10::string_view activation) {
  const PrefixGemm g = prefix_gemm_operands(x, weight, bias, k_in, k_out, activation);
  const at::Tensor w_blk = g.w_t.t();  // (k_out, k_in)
  const auto* onednn = x.scalar_type() == at::kBFloat16 && k_in > 0 && k_out > 0 &&
                               (w_blk.is_contiguous() || g.w_t.is_contiguous())
                           ? onednn_linear()
                           : nullptr;
  if (onednn != nullptr) {
    const char* attr = g.act == Act::kNone ? "none" : "gelu";
    const char* algorithm = g.act == Act::kNone ? "" : (g.act == Act::kGeluTanh ? "tanh" : "none");
    const std::optional<at::Tensor> b = g.bias.defined() ? std::optional<at::Tensor>(g.bias) : std::nullopt;
    return onednn->call(g.x2, w_blk, b, attr, c10::List<std::optional<at::Scalar>>(), algorithm).view(g.out_shape);
  }
  at::Tensor y = at::empty({g.x2.size(0), k_out}, x.options());
  if (g.bias.defined()) {
    // The bias rides in the GEMM's beta = 1 term, as in F.linear; k_in == 0 gives the bias itself.
    at::addmm_out(y, g.bias, g.x2, g.w_t);
  } else {
    at::mm_out(y, g.x2, g.w_t);  // k_in == 0 gives zeros
  }
  // GELU in place: one pass over y with ATen's kernel, which picks AVX-512 at run time (a hand-written
  // AVX2 bias+GELU pass measured 1-4x slower than it here, bf16 worst).
  if (g.act != Act::kNone) at::gelu_(y, g.act == Act::kGeluTanh ? "tanh" : "none");
  return y.view(g.out_shape);
}

}  // namespace
}  // namespace skd::cpu

TORCH_LIBRARY_IMPL(skd_kernels, CPU, m) {
  m.impl("prefix_linear", &skd::cpu::prefix_linear_cpu);
  m.impl("_prefix_linear_autograd", &skd::cpu::prefix_linear_cpu);
}
