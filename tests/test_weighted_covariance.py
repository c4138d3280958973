"""weighted_covariance on every CPU-usable backend against skd_kernels.reference, plus CovState algebra
(batches, merge, all_reduce over two gloo processes), opcheck and bad input."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kernel_helpers import (
    BACKENDS,
    LOW_PRECISION,
    STAT_TOL,
    assert_close,
    backend_dtype_shape_params,
)

import skd_kernels
from skd_kernels import CovState, reference

# (N, width, groups, big): odd N and widths; r = 16 heads; r = 260 and 384 take the CPU kernel's
# blocked-SYRK path (several blocks per group, with groups > 1 too); N = 1000 spans several row chunks.
SHAPES = [
    (1, 7, 1, False),
    (7, 12, 3, False),
    (129, 33, 1, False),
    (129, 96, 6, False),
    (300, 520, 2, True),
    (1000, 384, 1, True),
    (1000, 768, 12, True),
]


def _inputs(n: int, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # A non-zero mean makes Σwx and the cross terms of Σwxx^T matter.
    x = (torch.randn(n, width) + 0.5).to(dtype)
    w = (torch.rand(n) + 0.1).to(dtype)
    return x, w


def _check_state(state: CovState, x: torch.Tensor, w: torch.Tensor, groups: int, label: str) -> None:
    """The state holds exactly one pass of the reference over (x, w), up to fp32 summation order."""
    ws, s, so = reference.weighted_covariance(x, w.to(x.dtype), groups)
    tol = STAT_TOL[x.dtype]
    # Entries sum N terms of size ≤ w·max|x| (Σwx) or w·max|x|² (Σwxx^T): that bounds their rounding.
    total_w, x_max = float(ws), float(x.double().abs().max())
    assert_close(f"{label} weight_sum", state.weight_sum, ws.double(), rtol=tol, atol=tol * total_w)
    assert_close(f"{label} sum", state.sum, s.double(), rtol=tol, atol=tol * total_w * x_max)
    assert_close(f"{label} sum_outer", state.sum_outer, so.double(), rtol=tol, atol=tol * total_w * x_max**2)


@pytest.mark.parametrize(("backend", "dtype", "n", "width", "groups", "big"),
                         backend_dtype_shape_params((torch.float32, *LOW_PRECISION, torch.float64), SHAPES))
def test_matches_reference(backend: str, dtype: torch.dtype, n: int, width: int, groups: int, big: bool) -> None:
    x, w = _inputs(n, width, dtype)
    with skd_kernels.use_backend(backend):
        state = skd_kernels.weighted_covariance(x, w, groups)
    assert state.sum_outer.dtype == torch.float64
    _check_state(state, x, w, groups, f"{backend}/{dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend: str) -> None:
    base = torch.randn(40, 130) + 0.3
    wide_rows = base[:, 1:97]  # row stride 130, feature stride 1
    transposed = torch.randn(96, 40).t()  # feature stride 40
    w = (torch.rand(80) + 0.1)[::2]  # stride 2
    for label, x in (("row-strided", wide_rows), ("transposed", transposed)):
        assert not x.is_contiguous()
        with skd_kernels.use_backend(backend):
            state = skd_kernels.weighted_covariance(x, w, groups=6)
        _check_state(state, x.contiguous(), w.contiguous(), 6, f"{backend} {label}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_accumulate_to_one_pass(backend: str) -> None:
    x, w = _inputs(90, 24, torch.float32)
    with skd_kernels.use_backend(backend):
        whole = skd_kernels.weighted_covariance(x, w, groups=2)
        state = None
        for lo, hi in ((0, 1), (1, 40), (40, 90)):
            state = skd_kernels.weighted_covariance(x[lo:hi], w[lo:hi], groups=2, state=state)
        # merge: statistics of disjoint parts add up to those of the whole
        merged = skd_kernels.weighted_covariance(x[:30], w[:30], groups=2).merge(
            skd_kernels.weighted_covariance(x[30:], w[30:], groups=2))
    for label, s in (("batches", state), ("merged", merged)):
        for field in ("weight_sum", "sum", "sum_outer"):
            assert_close(f"{backend} {label} {field}", getattr(s, field), getattr(whole, field),
                         rtol=1e-5, atol=1e-5 * float(whole.sum_outer.abs().max()))


def test_covariance_matches_torch_cov() -> None:
    """End to end: CovState.covariance() is the weighted population covariance (torch.cov, float64)."""
    x, w = _inputs(500, 12, torch.float32)
    state = skd_kernels.weighted_covariance(x[:200], w[:200], groups=3)
    skd_kernels.weighted_covariance(x[200:], w[200:], groups=3, state=state)
    cov = state.covariance()
    for g in range(3):
        xg = x[:, 4 * g : 4 * g + 4].double()
        want = torch.cov(xg.t(), correction=0, aweights=w.double())
        assert_close(f"group {g} covariance", cov[g], want, rtol=1e-5, atol=1e-6)
    assert_close("mean", state.mean(), (w[:, None].double() * x.double()).sum(0).view(3, 4) / w.double().sum(),
                 rtol=1e-6, atol=1e-7)


def _all_reduce_worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(1234)  # every process draws the same data and takes its own half
        x, w = _inputs(101, 18, torch.float32)
        whole = skd_kernels.weighted_covariance(x, w, groups=3)
        part = slice(0, 50) if rank == 0 else slice(50, 101)
        state = skd_kernels.weighted_covariance(x[part], w[part], groups=3).all_reduce()
        for field in ("weight_sum", "sum", "sum_outer"):
            torch.testing.assert_close(getattr(state, field), getattr(whole, field), rtol=1e-6, atol=1e-5)
        # the other process really contributed: this half alone is far from the whole
        alone = skd_kernels.weighted_covariance(x[part], w[part], groups=3)
        assert not torch.allclose(alone.weight_sum, whole.weight_sum)
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_processes(tmp_path: object) -> None:
    init_file = os.path.join(str(tmp_path), "gloo_init")
    mp.spawn(_all_reduce_worker, args=(2, init_file), nprocs=2, join=True)


def test_opcheck_compiled_op() -> None:
    x, w = _inputs(37, 40, torch.float32)
    for args in ((x, w, 1), (x, w, 4), (x.bfloat16(), w.bfloat16(), 5), (x.double(), w.double(), 2)):
        torch.library.opcheck(torch.ops.skd_kernels.weighted_covariance.default, args)


@pytest.mark.parametrize(
    ("make", "arg"),
    [
        (lambda x, w: (x.index_put((torch.tensor([3]), torch.tensor([2])), torch.tensor(float("nan"))), w, 2),
         "x"),
        (lambda x, w: (x.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))), w, 2),
         "x"),
        (lambda x, w: (x, w.index_put((torch.tensor([5]),), torch.tensor(float("inf"))), 2), "w"),
        (lambda x, w: (x, w.index_put((torch.tensor([5]),), torch.tensor(float("nan"))), 2), "w"),
        (lambda x, w: (x, w.index_put((torch.tensor([1]),), torch.tensor(-0.5)), 2), "w"),
        (lambda x, w: (x, w[:-1], 2), "w"),
        (lambda x, w: (x[None], w, 2), "x"),
        (lambda x, w: (x, w, 5), "groups"),
        (lambda x, w: (x, w, 0), "groups"),
    ],
    ids=["nan-x", "inf-x", "inf-w", "nan-w", "negative-w", "short-w", "3d-x", "groups-not-dividing", "groups-0"],
)
def test_bad_input_raises_naming_argument(make: object, arg: str) -> None:
    x, w = _inputs(10, 8, torch.float32)
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        skd_kernels.weighted_covariance(*make(x, w))


def test_state_of_other_shape_raises() -> None:
    x, w = _inputs(10, 8, torch.float32)
    state = skd_kernels.weighted_covariance(x, w, groups=2)
    with pytest.raises(ValueError, match="state"):
        skd_kernels.weighted_covariance(x, w, groups=4, state=state)


def test_overflowing_statistics_raise_and_leave_state_untouched() -> None:
    x, w = _inputs(10, 8, torch.float32)
    state = skd_kernels.weighted_covariance(x, w, groups=2)
    before = state.sum_outer.clone()
    with pytest.raises(ValueError, match="overflows"):
        skd_kernels.weighted_covariance(torch.full((4, 8), 1e30), torch.ones(4), groups=2, state=state)
    assert torch.equal(state.sum_outer, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "w_scale"), [(torch.bfloat16, 1.0), (torch.float16, 1e-6)], ids=["bf16", "fp16"])
def test_weights_stay_fp32_for_low_precision_x(backend: str, dtype: torch.dtype, w_scale: float) -> None:
    """fp32 weights are never rounded to x's dtype (that cost 1.7e-4 relative error with bf16 x and U(0,1)
    weights, 1.3e-2 with fp16 x and w ~ 1e-6, against a 2e-5 tolerance)."""
    x = (torch.randn(300, 16) + 0.5).to(dtype)
    w = w_scale * (torch.rand(300) + 0.01)
    with skd_kernels.use_backend(backend):
        state = skd_kernels.weighted_covariance(x, w, groups=2)
    ws, s, so = reference.weighted_covariance(x.double(), w.double(), 2)  # exact inputs, float64 sums
    for name, got, want in (("weight_sum", state.weight_sum, ws), ("sum", state.sum, s),
                            ("sum_outer", state.sum_outer, so)):
        assert_close(f"{backend}/{dtype} {name}", got, want, rtol=STAT_TOL[dtype],
                     atol=STAT_TOL[dtype] * float(want.abs().max()))


def test_opcheck_compiled_op_with_fp32_weights() -> None:
    """The compiled op takes fp32 weights beside bf16/fp16 x (the public op never rounds them to x's dtype)."""
    x, w = _inputs(37, 40, torch.float32)
    for low in LOW_PRECISION:
        torch.library.opcheck(torch.ops.skd_kernels.weighted_covariance.default, (x.to(low), w, 4))


def test_opcheck_cpu_update_op() -> None:
    """The CPU extension's checked float64 update (the public op's CPU path), with and without a state."""
    x, w = _inputs(37, 40, torch.float32)
    state = skd_kernels.weighted_covariance(x, w, 4)
    for args in ((x, w, 4, None, None, None), (x.bfloat16(), w, 4, state.weight_sum, state.sum, state.sum_outer),
                 (x.double(), w.double(), 2, None, None, None)):
        torch.library.opcheck(torch.ops.skd_kernels.weighted_covariance_update.default, args)


@pytest.mark.parametrize("bad", ["nan-x", "negative-w"])
def test_bad_input_in_a_wide_result_names_it_and_leaves_state_untouched(bad: str) -> None:
    """Results over 4096 entries are checked through their diagonal (the CPU update's native loop and the
    Python checks alike); a failure there still names the argument and leaves the state as it was."""
    x, w = _inputs(50, 96, torch.float32)  # 1 group of 96: 9216 entries
    state = skd_kernels.weighted_covariance(x, w)
    before = [t.clone() for t in (state.weight_sum, state.sum, state.sum_outer)]
    if bad == "nan-x":
        x[7, 90] = float("nan")
    else:
        w[3] = -1e-3
    with pytest.raises(ValueError, match=r"\bx\b" if bad == "nan-x" else r"\bw\b"):
        skd_kernels.weighted_covariance(x, w, state=state)
    assert all(torch.equal(a, b) for a, b in zip(before, (state.weight_sum, state.sum, state.sum_outer), strict=True))
