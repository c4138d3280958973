// The one registration file: operator schemas of the skd_kernels library and the Python module stub.
// Kernels register their implementations next to their code (csrc/cpu/*.cpp: CPU, csrc/cuda/*.cu: CUDA).
#include <Python.h>
#include <torch/library.h>

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
