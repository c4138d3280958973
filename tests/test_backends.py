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


def test_env_var_set_and_unset_at_run_time_steers_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-call kernel lookup reads the env var as os.environ holds it now (not a copy taken at import)."""
    auto = _dispatch.kernel("taylor_scores", CPU, torch.float32)
    monkeypatch.setenv("SKD_KERNELS_BACKEND", "reference")
    assert _dispatch.kernel("taylor_scores", CPU, torch.float32) is _dispatch._REGISTRY["reference"].kernels[
        "taylor_scores"].fn
    monkeypatch.delenv("SKD_KERNELS_BACKEND")
    assert _dispatch.kernel("taylor_scores", CPU, torch.float32) is auto


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


def test_has_kernel_says_whether_more_than_the_reference_runs() -> None:
    """has_kernel (the elastic plan's choice between prefix_attention_separate and copies + SDPA) follows the
    forced backend, and is False instead of raising where the forced backend cannot run the tensors."""
    op, fp32, fp64 = "prefix_attention_separate", torch.float32, torch.float64
    assert _dispatch.has_kernel(op, CPU, fp32) == ("cpu" in BACKENDS)
    with skd_kernels.use_backend("reference"):
        assert not _dispatch.has_kernel(op, CPU, fp32)
    if "triton" in BACKENDS:
        with skd_kernels.use_backend("triton"):
            assert _dispatch.has_kernel(op, CPU, fp32)
            assert not _dispatch.has_kernel(op, CPU, fp64)  # Triton takes no fp64: no kernel, no error
            with pytest.raises(RuntimeError, match="float64"):
                _dispatch.select(CPU, fp64, op)


def test_forced_only_backends_are_passed_over_by_the_automatic_choice() -> None:
    """prefix_linear's Triton kernel runs only when forced (on an H200 it was slower than cuBLAS, which the
    reference calls): the automatic order on CUDA passes over it, for that op alone."""
    assert _dispatch.auto_order("cuda", "prefix_linear") == ("cuda", "reference")
    assert _dispatch.auto_order("cuda", "taylor_scores") == ("cuda", "triton", "reference")
    assert _dispatch.auto_order("cpu", "prefix_linear") == ("cpu", "reference")
    if "triton" in BACKENDS:
        with skd_kernels.use_backend("triton"):
            assert _dispatch.select(CPU, torch.float32, "prefix_linear").name == "triton"


def test_unknown_backend_raises() -> None:
    with pytest.raises(ValueError, match="unknown backend"), skd_kernels.use_backend("mkl"):
        pass



def test_forced_backend_without_the_op_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend may implement only some ops: forcing it for one it lacks names the op and the reason."""
    cpu = _dispatch._REGISTRY["cpu"]
    monkeypatch.delitem(cpu.kernels, "taylor_scores")
    monkeypatch.setitem(cpu.missing, "taylor_scores", "not written yet")
    assert "cpu" in skd_kernels.available_backends(CPU)  # its other ops still run
    act = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"'cpu'.*no taylor_scores kernel \(not written yet\)"), \
            skd_kernels.use_backend("cpu"):
        skd_kernels.taylor_scores(act, act)
    with skd_kernels.use_backend("cpu"):  # the ops it has are unaffected
        skd_kernels.prefix_linear(act, torch.randn(5, 4))


def test_register_op_rejects_unknown_backends_and_a_missing_reference() -> None:
    with pytest.raises(ValueError, match="mkl"):
        _dispatch.register_op("taylor_scores", {"mkl": _dispatch.Kernel(lambda *a: None, (torch.float32,))})
    with pytest.raises(ValueError, match="reference"):
        _dispatch.register_op("new_op", {"cpu": _dispatch.Kernel(lambda *a: None, (torch.float32,))})


@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_public_ops_never_sync_on_cuda(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole public op runs on fake CUDA tensors, which hold no data: any host sync (.item(), bool(),
    float() of a tensor, a data-dependent branch) would raise, so passing proves the CUDA path has none."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    cuda = torch.device("cuda")
    if not _dispatch._REGISTRY[backend].usable(cuda):
        pytest.skip(f"backend {backend!r} has no CUDA kernels in this build")
    # Forced through the env var: use_backend would first ask for a real GPU.
    monkeypatch.setenv("SKD_KERNELS_BACKEND", backend)
    with FakeTensorMode():
        with pytest.raises(DataDependentOutputException):  # the detector works: a host sync raises
            bool(torch.randn(3, device=cuda).sum() > 0)
        x, w = torch.randn(64, 48, device=cuda), torch.rand(64, device=cuda)
        act, grad = torch.randn(2, 5, 48, device=cuda), torch.randn(2, 5, 48, device=cuda)
        weight, bias = torch.randn(40, 48, device=cuda), torch.randn(40, device=cuda)
        state = skd_kernels.weighted_covariance(x, w, 3)
        state = skd_kernels.weighted_covariance(x.bfloat16(), w, 3, state=state)
        token, channel = skd_kernels.taylor_scores(act, grad)
        y = skd_kernels.prefix_linear(x, weight, bias, 20, 30, "gelu")
    assert state.sum_outer.shape == (3, 16, 16) and state.sum_outer.device.type == "cuda"
    assert token.shape == (2, 5) and channel.shape == (48,) and y.shape == (64, 30)


def test_all_reduce_flat_needs_one_dtype_and_device() -> None:
    from skd_kernels.distributed import all_reduce_flat

    with pytest.raises(ValueError, match="one dtype"):
        all_reduce_flat([torch.zeros(2, dtype=torch.float64), torch.zeros(3)])
