"""taylor_scores on every CPU-usable backend against skd_kernels.reference, plus opcheck and bad input."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import BACKENDS, LOW_PRECISION, STAT_TOL, assert_close, backend_dtype_shape_params

import skd_kernels
from skd_kernels import reference

# (B, T, C, big): odd sizes; B = 1 and 2 make the CPU kernel split tokens across threads; C = 7 and 129
# leave a vector tail.
SHAPES = [
    (1, 1, 1, False),
    (1, 129, 7, False),
    (2, 7, 129, False),
    (3, 17, 64, False),
    (8, 197, 384, True),
    (2, 300, 1536, True),
]


def _check(token: torch.Tensor, channel: torch.Tensor, act: torch.Tensor, grad: torch.Tensor, label: str) -> None:
    want_token, want_channel = reference.taylor_scores(act, grad)
    tol = STAT_TOL[act.dtype]
    # Sums of products: the rounding is bounded by the sum of |g·a| over what is summed.
    abs_prod = (act.double() * grad.double()).abs()
    assert_close(f"{label} token", token, want_token, rtol=tol, atol=tol * float(abs_prod.sum(-1).max()))
    assert_close(f"{label} channel", channel, want_channel, rtol=tol, atol=tol * float(abs_prod.sum((0, 1)).max()))


@pytest.mark.parametrize(("backend", "dtype", "b", "t", "c", "big"),
                         backend_dtype_shape_params((torch.float32, *LOW_PRECISION, torch.float64), SHAPES))
def test_matches_reference(backend: str, dtype: torch.dtype, b: int, t: int, c: int, big: bool) -> None:
    act = torch.randn(b, t, c).to(dtype)
    grad = torch.randn(b, t, c).to(dtype)
    with skd_kernels.use_backend(backend):
        token, channel = skd_kernels.taylor_scores(act, grad)
    _check(token, channel, act, grad, f"{backend}/{dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend: str) -> None:
    wide = torch.randn(3, 11, 40)[:, :, 3:36]  # token stride 40, channel stride 1
    channels_first = torch.randn(3, 33, 11).transpose(1, 2)  # channel stride 11
    batch_strided = torch.randn(6, 11, 33)[::2]  # batch stride 2·11·33
    for label, act, grad in (
        ("wide", wide, channels_first),
        ("channels-first", channels_first, batch_strided),
        ("batch-strided", batch_strided, wide),
    ):
        assert not act.is_contiguous() and not grad.is_contiguous()
        with skd_kernels.use_backend(backend):
            token, channel = skd_kernels.taylor_scores(act, grad)
        _check(token, channel, act.contiguous(), grad.contiguous(), f"{backend} {label}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_score_takes_abs_per_sample(backend: str) -> None:
    """Σ_b |Σ_t g·a|, not |Σ_b Σ_t g·a|: two samples with opposite sums must add, not cancel."""
    act = torch.ones(2, 3, 5)
    grad = torch.ones(2, 3, 5)
    grad[1] = -1
    with skd_kernels.use_backend(backend):
        token, channel = skd_kernels.taylor_scores(act, grad)
    assert torch.equal(channel, torch.full((5,), 6.0))
    assert torch.equal(token, torch.full((2, 3), 5.0))


def test_opcheck_compiled_op() -> None:
    act, grad = torch.randn(3, 9, 20), torch.randn(3, 9, 20)
    for a, g in ((act, grad), (act.bfloat16(), grad.bfloat16()), (act.half(), grad.half()),
                 (act.double(), grad.double()), (act[:1, :1, :1], grad[:1, :1, :1])):
        torch.library.opcheck(torch.ops.skd_kernels.taylor_scores.default, (a, g))


def _with(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t[1, 2, 3] = value
    return t


@pytest.mark.parametrize(
    ("make", "arg"),
    [
        (lambda a, g: (_with(a, float("nan")), g), "act"),
        (lambda a, g: (_with(a, float("inf")), g), "act"),
        (lambda a, g: (a, _with(g, float("nan"))), "grad"),
        (lambda a, g: (a, _with(g, float("-inf"))), "grad"),
        (lambda a, g: (a, g[:, :-1]), "grad"),
        (lambda a, g: (a[0], g[0]), "act"),
        (lambda a, g: (a.int(), g), "act"),
    ],
    ids=["nan-act", "inf-act", "nan-grad", "inf-grad", "shape-mismatch", "2d", "int-act"],
)
def test_bad_input_raises_naming_argument(make: object, arg: str) -> None:
    act, grad = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        skd_kernels.taylor_scores(*make(act, grad))


def test_overflowing_scores_raise() -> None:
    """Finite inputs whose products overflow fp32 would give Inf scores: an error, not a silent result."""
    act = torch.full((1, 2, 3), 1e30)
    with pytest.raises(ValueError, match="overflows"):
        skd_kernels.taylor_scores(act, act)
