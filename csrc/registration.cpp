// The one registration file: operator schemas of the skd_kernels library, the differentiable ops' Autograd kernel
// and the Python module stub. Kernels register their implementations next to their code (csrc/cpu/*.cpp: CPU,
// csrc/cuda/*.cu: CUDA).
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <string>

TORCH_LIBRARY(skd_kernels, m) {
  // x (N, G*r) fp32/bf16/fp16/fp64, w (N,) -> (weight_sum 0-d fp32, sum (G, r) fp32, sum_outer (G, r, r) fp32) of
  // this batch (fp64 for fp64 x). w may have any float dtype: the public op passes it in fp32 (fp64 for fp64 x),
  // never rounded to x's dtype, and every kernel reads it in the accumulation type.
  m.def("weighted_covariance(Tensor x, Tensor w, int groups) -> (Tensor, Tensor, Tensor)");
  // The public op's CPU path: this batch's statistics checked (w >= 0, result finite; an error otherwise) and
  // added in float64 to the state (weight_sum (), sum (G, r), sum_outer (G, r, r) float64; all three or none),
  // returned as new float64 tensors. CPU only: other backends run weighted_covariance and the checks in Python.
  m.def("weighted_covariance_update(Tensor x, Tensor w, int groups, Tensor? weight_sum, Tensor? sum, "
        "Tensor? sum_outer) -> (Tensor, Tensor, Tensor)");
  // act, grad (B, T, C) -> (token (B, T) fp32 = |sum_c g*a|, channel (C,) fp32 = sum_b |sum_t g*a|).
  m.def("taylor_scores(Tensor act, Tensor grad) -> (Tensor, Tensor)");
  // y = act(x[..., :k_in] @ weight[:k_out, :k_in]^T + bias[:k_out]); activation in {none, gelu, gelu_tanh}.
  // k_in, k_out are SymInt so torch.compile keeps a subnetwork's widths symbolic (one graph for every width);
  // the kernels take int64_t: they only ever run on concrete widths.
  m.def("prefix_linear(Tensor x, Tensor weight, Tensor? bias, SymInt k_in, SymInt k_out, str activation) -> Tensor");
  // qkv (S, N, r*3*H) rank-major (column j*3H + w*H + h), attn_bias (S|1, H|1, N, N) -> (S, N, r*H), column j*H + h.
  m.def("prefix_attention(Tensor qkv, int num_heads, float scale, Tensor? attn_bias) -> Tensor");
  // q, k, v each (S, N, r*H) rank-major (column j*H + h; HF's separate Linears), attn_bias as above -> (S, N, r*H).
  m.def("prefix_attention_separate(Tensor q, Tensor k, Tensor v, int num_heads, float scale, Tensor? attn_bias) "
        "-> Tensor");
  // x, residual (..., D), weight, bias (D,) or None -> (s = x + residual, LayerNorm(s) over D with eps), both
  // (..., D) in x's dtype: a pre-norm block's residual add and the next norm in one pass. No Autograd kernel: where
  // autograd records, the public op runs its reference (ATen's add and LayerNorm) instead.
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)");
  // The differentiable ops' twins: the same schema and kernels, and the autograd (backward in Python,
  // skd_kernels/ops/<op>.py) that the op reaches only when it has a gradient to record (autograd_or_below).
  m.def("_prefix_linear_autograd(Tensor x, Tensor weight, Tensor? bias, SymInt k_in, SymInt k_out, str activation) "
        "-> Tensor");
  m.def("_prefix_attention_autograd(Tensor qkv, int num_heads, float scale, Tensor? attn_bias) -> Tensor");
  m.def("_prefix_attention_separate_autograd(Tensor q, Tensor k, Tensor v, int num_heads, float scale, "
        "Tensor? attn_bias) -> Tensor");
}

namespace {

// The Autograd kernel of prefix_linear, prefix_attention and prefix_attention_separate. With no gradient to
// record (grad mode off, or no input that requires grad) the op runs straight below autograd; otherwise its twin
// "_<op>_autograd" runs, whose autograd torch.library.register_autograd installs. That Python layer, on the op
// itself, cost every call 4-14 µs even under no_grad: a third of a compiled digits ViT's forward at batch 1.
// (Under torch.inference_mode neither runs: inference tensors carry no autograd key.)
void autograd_or_below(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  bool record = false;
  if (at::GradMode::is_enabled()) {
    const size_t n = op.schema().arguments().size();
    for (size_t i = stack->size() - n; i < stack->size() && !record; ++i) {
      const c10::IValue& v = (*stack)[i];
      record = v.isTensor() && v.toTensor().defined() && v.toTensor().requires_grad();
    }
  }
  if (!record) {
    op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
    return;
  }
  const std::string& name = op.schema().name();  // "skd_kernels::<op>"
  const std::string twin = "skd_kernels::_" + name.substr(name.find("::") + 2) + "_autograd";
  c10::Dispatcher::singleton().findSchemaOrThrow(twin.c_str(), "").callBoxed(stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(skd_kernels, Autograd, m) {
  for (const char* op : {"prefix_linear", "prefix_attention", "prefix_attention_separate"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&autograd_or_below>());
  }
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "skd_kernels compiled operators", -1, nullptr};
  PyObject* mod = PyModule_Create(&module);
  // WITH_CUDA: whether csrc/cuda was compiled in, so tests can tell "no CUDA build" from "CUDA kernels missing".
#ifdef SKD_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (mod != nullptr && PyModule_AddIntConstant(mod, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
