"""What is specific to the Triton backend: the custom op's registration (opcheck), its autograd against
the reference, k = 0, tile tails and multi-tile paths (mirrored covariance tiles, N-splits, atomics).

Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (set by conftest.py before the kernels are imported).
The general per-backend correctness sweep lives in tests/test_{weighted_covariance,taylor_scores,
prefix_linear}.py.
"""

import importlib
import os

import pytest
import torch

from skd_kernels import reference

triton_backend = pytest.importorskip("skd_kernels.triton")
if not triton_backend.AVAILABLE:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (rtol, atol) per output dtype; fp32 dots on GPU are tf32x3 (about fp32). Covariance and Taylor
# outputs are fp32 sums of exactly representable products, so they get the fp32 tolerance for every
# input dtype, relative to the largest entry of the reference.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-3, 5e-3), torch.bfloat16: (1e-2, 5e-2)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
covariance_module = importlib.import_module("skd_kernels.triton.weighted_covariance")


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, relative_to_max: bool = False) -> None:
    rtol, atol = TOL[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = (got.float() - want.float()).abs()
    if diff.numel():
        print(f"max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}")
    if relative_to_max and want.numel():
        atol *= max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


def _prefix_args(dtype: torch.dtype, k_in: int, k_out: int, activation: str = "gelu") -> tuple:
    """x (3, 5, 47) sliced to a non-contiguous (3, 5, 41); weight (37, 41) as a transposed view."""
    x = torch.randn(3, 5, 47, device=DEVICE, dtype=dtype)[..., 6:]
    weight = (torch.randn(41, 37, device=DEVICE, dtype=dtype) / 41**0.5).t()
    bias = torch.randn(37, device=DEVICE, dtype=dtype)
    return x, weight, bias, k_in, k_out, activation


@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
def test_prefix_linear_opcheck(activation: str) -> None:
    args = _prefix_args(torch.float32, 19, 23, activation)
    for a in args[:3]:
        a.requires_grad_(True)
    torch.library.opcheck(torch.ops.skd_kernels.triton_prefix_linear.default, args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("k_in", "k_out"), [(41, 37), (19, 23), (1, 1), (0, 5), (7, 0)])
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
def test_prefix_linear_matches_reference(dtype: torch.dtype, k_in: int, k_out: int, activation: str) -> None:
    args = _prefix_args(dtype, k_in, k_out, activation)
    _close(triton_backend.prefix_linear(*args), reference.prefix_linear(*args), dtype)


def test_prefix_linear_k_in_zero_gives_act_of_bias() -> None:
    x, weight, bias, *_ = _prefix_args(torch.float32, 0, 9)
    y = triton_backend.prefix_linear(x, weight, bias, 0, 9, "gelu")
    torch.testing.assert_close(y, torch.nn.functional.gelu(bias[:9]).expand(3, 5, 9))


def test_prefix_linear_reads_only_the_leading_block() -> None:
    """NaN outside weight[:k_out, :k_in] (and x[..., k_in:]) must not reach the output."""
    x, weight, bias, *_ = _prefix_args(torch.float32, 19, 23)
    poisoned_w, poisoned_x = weight.clone(), x.clone()
    poisoned_w[23:] = float("nan")
    poisoned_w[:, 19:] = float("nan")
    poisoned_x[..., 19:] = float("nan")
    got = triton_backend.prefix_linear(poisoned_x, poisoned_w, bias, 19, 23, "gelu")
    _close(got, reference.prefix_linear(x, weight, bias, 19, 23, "gelu"), torch.float32)


@pytest.mark.parametrize(("k_in", "k_out"), [(41, 37), (19, 23), (0, 5)])
@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
def test_prefix_linear_autograd_matches_reference(k_in: int, k_out: int, activation: str) -> None:
    base = _prefix_args(torch.float32, k_in, k_out, activation)
    grads = []
    for fn in (triton_backend.prefix_linear, reference.prefix_linear):
        x, weight, bias = (t.detach().clone().requires_grad_(True) for t in base[:3])
        y = fn(x, weight, bias, k_in, k_out, activation)
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum().backward()
        grads.append((x.grad, weight.grad, bias.grad))
    for got, want in zip(*grads, strict=True):
        _close(got, want, torch.float32)


def test_prefix_linear_grads_vanish_outside_the_block() -> None:
    x, weight, bias, *_ = _prefix_args(torch.float32, 13, 11, "gelu")
    x, weight, bias = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
    y = triton_backend.prefix_linear(x, weight, bias, 13, 11, "gelu")
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, weight, bias), g)
    assert torch.all(gw[11:] == 0) and torch.all(gw[:, 13:] == 0) and torch.all(gb[11:] == 0)
    assert torch.all(gx[..., 13:] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "groups", "r"), [(1, 1, 1), (7, 3, 7), (129, 2, 33), (150, 1, 70), (0, 2, 4)])
def test_covariance_tails_and_mirrored_tiles(dtype: torch.dtype, n: int, groups: int, r: int) -> None:
    """r = 70 spans several BLOCK_R tiles, so the mirrored (below-diagonal) stores are exercised."""
    x = torch.randn(n, 2 * groups * r, device=DEVICE, dtype=dtype)[:, ::2]  # non-contiguous columns
    w = torch.rand(n, device=DEVICE)
    w[::5] = 0.0
    for got, want in zip(triton_backend.weighted_covariance(x, w, groups),
                         reference.weighted_covariance(x, w, groups), strict=True):
        _close(got, want, torch.float32, relative_to_max=True)


def test_covariance_split_n_partials_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The N-split path (partials summed) is what a GPU takes; force it here with 3 splits."""
    monkeypatch.setattr(covariance_module, "_num_splits", lambda x, groups, r: 3)
    x = torch.randn(600, 2 * 20, device=DEVICE)
    w = torch.rand(600, device=DEVICE)
    for got, want in zip(triton_backend.weighted_covariance(x, w, 2),
                         reference.weighted_covariance(x, w, 2), strict=True):
        _close(got, want, torch.float32, relative_to_max=True)


def test_covariance_is_symmetric_off_the_diagonal_tiles() -> None:
    x = torch.randn(90, 70, device=DEVICE)
    _, _, outer = triton_backend.weighted_covariance(x, torch.rand(90, device=DEVICE), 1)
    torch.testing.assert_close(outer[0], outer[0].t(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "t", "c"), [(1, 1, 1), (2, 7, 129), (3, 70, 300), (2, 0, 3), (2, 3, 0)])
def test_taylor_tails_and_token_blocks(dtype: torch.dtype, b: int, t: int, c: int) -> None:
    """t = 70 spans several token blocks, whose channel partials meet in the atomic adds."""
    act = torch.randn(b, t, 2 * c, device=DEVICE, dtype=dtype)[..., 1::2]
    grad = torch.randn(t, b, c, device=DEVICE, dtype=dtype).transpose(0, 1)
    for got, want in zip(triton_backend.taylor_scores(act, grad), reference.taylor_scores(act, grad),
                         strict=True):
        _close(got, want, torch.float32, relative_to_max=True)
