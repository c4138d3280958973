"""On a CUDA device: the cuda and triton backends against the reference at ViT-B-like sizes, fp32/bf16.

ViT-B: 197 tokens, width 768, 12 heads of 64, MLP hidden 3072. Skipped without a GPU.
"""

import pytest
import torch

import skd_kernels
from skd_kernels import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

BACKENDS = ("cuda", "triton")
DTYPES = (torch.float32, torch.bfloat16)
# Output tolerance per dtype (rtol, atol). The statistics ops return fp32 sums of exact products, so they
# use the fp32 one relative to the largest entry; prefix_linear returns x's dtype.
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-2, 5e-2)}


def _require(backend: str) -> None:
    if backend not in skd_kernels.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not usable on cuda here")


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, relative_to_max: bool = False) -> None:
    rtol, atol = TOL[dtype]
    diff = (got.float() - want.float()).abs()
    print(f"max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}")
    if relative_to_max:
        atol *= max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_covariance_vit_b_heads(backend: str, dtype: torch.dtype) -> None:
    _require(backend)
    x = torch.randn(8 * 197, 768, device="cuda", dtype=dtype)
    w = torch.rand(8 * 197, device="cuda")
    with skd_kernels.use_backend(backend):
        state = skd_kernels.weighted_covariance(x, w, groups=12)
    want = reference.weighted_covariance(x, w, 12)
    for got, ref in zip((state.weight_sum, state.sum, state.sum_outer), want, strict=True):
        _close(got.float(), ref, torch.float32, relative_to_max=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_taylor_scores_vit_b_mlp(backend: str, dtype: torch.dtype) -> None:
    _require(backend)
    act = torch.randn(8, 197, 3072, device="cuda", dtype=dtype)
    grad = torch.randn(8, 197, 3072, device="cuda", dtype=dtype)
    with skd_kernels.use_backend(backend):
        got = skd_kernels.taylor_scores(act, grad)
    for g, ref in zip(got, reference.taylor_scores(act, grad), strict=True):
        _close(g, ref, torch.float32, relative_to_max=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("k_in", "k_out", "activation"), [(768, 3072, "gelu"), (384, 1536, "gelu_tanh"),
                                                          (3072, 768, "none"), (200, 577, "gelu")])
def test_prefix_linear_vit_b_mlp(backend: str, dtype: torch.dtype, k_in: int, k_out: int, activation: str) -> None:
    _require(backend)
    d_in, d_out = (768, 3072) if k_in <= 768 else (3072, 768)
    x = torch.randn(8, 197, d_in, device="cuda", dtype=dtype)
    weight = torch.randn(d_out, d_in, device="cuda", dtype=dtype) / d_in**0.5
    bias = torch.randn(d_out, device="cuda", dtype=dtype)
    with skd_kernels.use_backend(backend):
        got = skd_kernels.prefix_linear(x, weight, bias, k_in, k_out, activation)
    want = reference.prefix_linear(x.float(), weight.float(), bias.float(), k_in, k_out, activation)
    assert got.dtype == dtype
    _close(got, want.to(dtype), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_linear_grads_vit_b(backend: str) -> None:
    _require(backend)
    x = torch.randn(4, 197, 768, device="cuda", requires_grad=True)
    weight = (torch.randn(3072, 768, device="cuda") / 768**0.5).requires_grad_(True)
    bias = torch.randn(3072, device="cuda", requires_grad=True)
    g = torch.randn(4, 197, 1536, device="cuda")
    with skd_kernels.use_backend(backend):
        got = torch.autograd.grad(skd_kernels.prefix_linear(x, weight, bias, 384, 1536, "gelu"), (x, weight, bias), g)
    want = torch.autograd.grad(reference.prefix_linear(x, weight, bias, 384, 1536, "gelu"), (x, weight, bias), g)
    for a, b in zip(got, want, strict=True):
        _close(a, b, torch.float32, relative_to_max=True)
