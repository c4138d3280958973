"""Shared pieces of the kernel tests: which backends run here, per-dtype tolerances, a printing compare.

Every backend usable on CPU is tested; with TRITON_INTERPRET=1 (tests/conftest.py) that includes Triton,
whose interpreter is slow, so shapes marked big run on the other backends only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import skd_kernels
from skd_kernels import _dispatch

CPU = torch.device("cpu")
BACKENDS = skd_kernels.available_backends(CPU)
LOW_PRECISION = (torch.bfloat16, torch.float16)

# (rtol, atol as a fraction of the expected tensor's largest magnitude) of outputs rounded to the dtype.
OUTPUT_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}
# Statistics (covariance, Taylor) are accumulated in fp32 (fp64) whatever the input dtype, so only the
# summation order differs from the reference: fp32 rounding, scaled by the magnitude of the terms.
STAT_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def supports(backend: str, dtype: torch.dtype | None = None, op: str | None = None) -> bool:
    """Whether `backend` claims `dtype` (any if None) and `op` (any if None) on CPU (a forced backend must then
    run it)."""
    return _dispatch._REGISTRY[backend].usable(CPU, dtype, op)


def backends_of(op: str) -> list[str]:
    """The CPU-usable backends that implement `op`."""
    return [b for b in BACKENDS if supports(b, op=op)]


def backend_dtype_shape_params(dtypes: tuple[torch.dtype, ...], shapes: list[tuple], op: str | None = None
                               ) -> list[object]:
    """pytest params (backend, dtype, *shape) over backends (those implementing `op`, if given) × supported
    dtypes × shapes.

    A shape's last element says it is big: big shapes run on every backend but Triton, whose CPU
    interpreter would take minutes on them (the small shapes exercise the same Triton code paths).
    """
    def shape_id(shape: tuple) -> str:
        return "x".join(map(str, shape[:-1])).replace(" ", "")

    return [pytest.param(b, d, *shape, id=f"{b}-{str(d).removeprefix('torch.')}-{shape_id(shape)}")
            for b in BACKENDS for d in dtypes if supports(b, d, op)
            for shape in shapes if not (shape[-1] and b == "triton")]


def _param_id(value: object) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def sweep(axes: dict[str, Sequence], rotated: int, always: Callable[[tuple], bool] = lambda case: False
          ) -> tuple[str, list[object]]:
    """(argnames, params) for pytest.mark.parametrize: every combination of `axes`, the device check's quick
    set unmarked and the rest marked gpu_sweep (`python -m benchmarks.gpu_check` deselects those; a plain
    pytest runs every case).

    axes: argnames -> values; "a,b" names a tuple-valued axis whose values are split over a and b. The quick
    set rotates the last `rotated` axes instead of crossing them: a case is in it when its values on them are
    the combination numbered (sum of its other axes' value indices) mod (their number of combinations), a Latin
    square, so each value of another axis meets every rotated combination when the remaining axes have enough
    values; or when always(case) (case: one value per axis). Why: on a GPU each new Triton autotune key (the
    shape's size buckets, activation, bias, dtype) compiles and times every config, seconds each, so a full
    cross product of epilogue options or layouts with shapes and dtypes costs minutes of JIT.
    """
    names = list(axes)
    ranges = [range(len(axes[n])) for n in names]
    k = len(names) - rotated  # the crossed axes come first
    combos = list(itertools.product(*ranges[k:]))
    params = []
    for idx in itertools.product(*ranges):
        case = tuple(axes[n][i] for n, i in zip(names, idx, strict=True))
        quick = idx[k:] == combos[sum(idx[:k]) % len(combos)] or always(case)
        values = [x for n, v in zip(names, case, strict=True) for x in (v if "," in n else (v,))]
        params.append(pytest.param(*values, id="-".join(map(_param_id, case)),
                                   marks=() if quick else pytest.mark.gpu_sweep))
    return ",".join(names), params


def padding_mask(s: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(S, 1, N, N), stride 0 over queries (as ElasticViT expands a padding mask): each sequence's last third of
    keys at -inf, its first keys kept."""
    mask = torch.zeros(s, 1, 1, n)
    mask[..., n - n // 3:] = float("-inf")
    return mask.to(dtype).expand(s, 1, n, n)


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    """Prints max/mean |got - want| (then asserts), so a failure shows how far off it was."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    if got.numel():
        diff = (got.double() - want.double()).abs()
        print(f"{name}: max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}, "
              f"max |want| {want.abs().max().item():.3e}, rtol {rtol:g}, atol {atol:.3e}")
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def scale(t: torch.Tensor) -> float:
    """Largest magnitude of `t` (1 when empty or all zero), the unit of the absolute tolerances."""
    return float(t.abs().max()) if t.numel() and bool(t.any()) else 1.0


def largest_cpu_allocation(fn: Callable[[], object]) -> int:
    """Bytes of the largest single CPU tensor allocation while `fn()` runs (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)


def prefix_linear_outputs(backend: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          k_in: int, k_out: int, activation: str | None) -> list[tuple[str, torch.Tensor]]:
    """[(label, y)]: the public prefix_linear's output under `backend`, and for a compiled backend ("cpu",
    "cuda") the compiled kernel's own, below autograd: without a gradient the public op runs that kernel's
    computation on views from Python (F.linear), so the kernel is only tested when called directly."""
    with skd_kernels.use_backend(backend):
        outputs = [("public op", skd_kernels.prefix_linear(x, weight, bias, k_in, k_out, activation))]
    if backend in ("cpu", "cuda"):
        kernel = torch.ops.skd_kernels.prefix_linear.default
        outputs.append(("compiled kernel", _dispatch.below_autograd(kernel, x, weight, bias, k_in, k_out,
                                                                      activation or "none")))
    return outputs
