"""Backend registry and dispatch: the extension is built and registered, forcing works, and a forced
backend that cannot run a tensor raises instead of silently falling back."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import BACKENDS, CPU

import skd_kernels
from skd_kernels import _dispatch, _ops

OPS = ("weighted_covariance", "taylor_scores", "prefix_linear")


def test_extension_loaded_and_cpu_kernels_registered() -> None:
    assert skd_kernels.EXTENSION_LOAD_ERROR is None, skd_kernels.EXTENSION_LOAD_ERROR
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"skd_kernels::{op}", "CPU"), op
    assert BACKENDS[-2:] == ["cpu", "reference"]


def test_cuda_build_registered_cuda_kernels() -> None:
    if not _ops.BUILT_WITH_CUDA:
        pytest.skip("the extension was built without CUDA (no toolkit found, or SKD_SKIP_CUDA_BUILD=1)")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"skd_kernels::{op}", "CUDA"), op


def test_automatic_choice_on_cpu_is_the_compiled_kernel() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert _dispatch.select(CPU, dtype).name == "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
def test_use_backend_forces_and_restores(backend: str) -> None:
    with skd_kernels.use_backend(backend):
        assert skd_kernels.forced_backend() == backend
        assert _dispatch.select(CPU, torch.float32).name == backend
    assert skd_kernels.forced_backend() is None


def test_env_var_forces_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKD_KERNELS_BACKEND", "reference")
    assert _dispatch.select(CPU, torch.float32).name == "reference"
    monkeypatch.setenv("SKD_KERNELS_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        _dispatch.select(CPU, torch.float32)


def test_forced_backend_that_cannot_run_the_tensor_raises() -> None:
    act = torch.randn(2, 3, 4)
    # "cuda" never runs CPU tensors: without a GPU the context refuses at entry, with one the call raises.
    with pytest.raises(RuntimeError, match="cuda"), skd_kernels.use_backend("cuda"):
        skd_kernels.taylor_scores(act, act)


def test_forced_backend_without_the_dtype_raises() -> None:
    unsupported = [(b, d) for b in BACKENDS for d in (torch.float64,) if not _dispatch._REGISTRY[b].usable(CPU, d)]
    for backend, dtype in unsupported:  # Triton has no fp64
        act = torch.randn(2, 3, 4, dtype=dtype)
        with pytest.raises(RuntimeError, match=backend), skd_kernels.use_backend(backend):
            skd_kernels.taylor_scores(act, act)
    assert unsupported or "triton" not in BACKENDS


def test_unknown_backend_raises() -> None:
    with pytest.raises(ValueError, match="unknown backend"), skd_kernels.use_backend("mkl"):
        pass

