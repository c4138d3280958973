"""pytest-benchmark microbenchmarks of the kernels at ViT-S shapes (batch 8), beside their baselines.

    .venv/bin/python -m pytest benchmarks/test_bench_kernels.py

Not part of the default test run (pyproject's testpaths is ["tests"]). Each op is timed on every backend
that runs natively here (Triton's CPU interpreter is left out: it measures numpy, not the kernel) and
beside its baseline: the reference, or F.linear on the extracted contiguous weight block.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import skd_kernels
from skd_kernels import reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOKENS, D, HEADS, HIDDEN = 197 * 8, 384, 6, 1536
BACKENDS = [b for b in skd_kernels.available_backends(DEVICE) if not (b == "triton" and DEVICE.type == "cpu")]


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _bench(benchmark: object, fn: object) -> None:
    def run() -> None:
        fn()
        _sync()

    benchmark(run)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["taylor (8,197,384)", "taylor (8,197,1536)"])
def test_taylor_scores(benchmark: object, case: str, backend: str) -> None:
    c = HIDDEN if "1536" in case else D
    act, grad = torch.randn(8, 197, c, device=DEVICE), torch.randn(8, 197, c, device=DEVICE)
    if backend == "reference":
        _bench(benchmark, lambda: reference.taylor_scores(act, grad))
        return
    with skd_kernels.use_backend(backend):
        _bench(benchmark, lambda: skd_kernels.taylor_scores(act, grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [HEADS, 1], ids=["heads", "whole"])
def test_weighted_covariance(benchmark: object, groups: int, backend: str) -> None:
    x, w = torch.randn(TOKENS, D, device=DEVICE), torch.rand(TOKENS, device=DEVICE)
    if backend == "reference":
        _bench(benchmark, lambda: reference.weighted_covariance(x, w, groups))
        return
    with skd_kernels.use_backend(backend):
        _bench(benchmark, lambda: skd_kernels.weighted_covariance(x, w, groups))


@pytest.mark.parametrize("impl", [*BACKENDS, "F.linear(extracted)"])
@pytest.mark.parametrize("frac", [0.25, 0.5, 1.0])
def test_prefix_linear_fc1(benchmark: object, frac: float, impl: str) -> None:
    """fc1 of ViT-S keeping k_out = frac·1536 hidden units, bias and GELU fused."""
    k_out = round(frac * HIDDEN)
    weight = torch.randn(HIDDEN, D, device=DEVICE) * D**-0.5
    bias = torch.randn(HIDDEN, device=DEVICE)
    x = torch.randn(TOKENS, D, device=DEVICE)
    if impl == "F.linear(extracted)":
        w_blk, b_blk = weight[:k_out].contiguous(), bias[:k_out].contiguous()
        _bench(benchmark, lambda: F.gelu(F.linear(x, w_blk, b_blk)))
        return
    with skd_kernels.use_backend(impl):
        _bench(benchmark, lambda: skd_kernels.prefix_linear(x, weight, bias, D, k_out, "gelu"))
