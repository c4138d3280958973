"""add_layer_norm on every CPU-usable backend against skd_kernels.reference, plus opcheck, gradients and bad input."""

from __future__ import annotations

import contextlib

import pytest
import torch
from kernel_helpers import LOW_PRECISION, OUTPUT_TOL, assert_close, backend_dtype_shape_params, backends_of, scale

import skd_kernels
from skd_kernels import reference

EPS = 1e-6
OP = "add_layer_norm"
# (rows, D, big): D = 1 (a constant row: out = bias), D below, at and above a vector of 16, ViT-S/B widths and
# 385 (a masked tail after 24 full vectors); rows = 1 and 1576 (threads take rows); no rows, and rows of width 0.
SHAPES = [(1, 1, False), (3, 7, False), (5, 16, False), (4, 33, False), (9, 384, False), (2, 385, False),
          (1576, 384, True), (197, 768, True), (0, 5, False), (3, 0, False)]


def _inputs(rows: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    # an offset and a spread per row, so the mean and variance differ from row to row
    x = (torch.randn(rows, d) * 3 + torch.randn(rows, 1) * 5).to(dtype)
    residual = torch.randn(rows, d).to(dtype)
    return x, residual, (torch.randn(d) + 1).to(dtype), torch.randn(d).to(dtype)


def _check(got: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, residual: torch.Tensor,
           weight: torch.Tensor | None, bias: torch.Tensor | None, label: str) -> None:
    want_s, want_out = reference.add_layer_norm(x, residual, weight, bias, EPS)
    assert torch.equal(got[0], want_s), f"{label}: the sum is x + residual rounded to {x.dtype}, exactly"
    rtol, atol = OUTPUT_TOL[x.dtype]
    # a normalised row is O(1) before weight and bias: that is the unit (a D = 1 row normalises to 0, and ATen's
    # form x * rstd - mean * rstd leaves ~1e-6 there where the kernel's (x - mean) * rstd gives 0)
    assert_close(f"{label} out", got[1], want_out, rtol=rtol, atol=atol * max(scale(want_out), 1.0))


@pytest.mark.parametrize(("backend", "dtype", "rows", "d", "big"),
                         backend_dtype_shape_params((torch.float32, *LOW_PRECISION, torch.float64), SHAPES, OP))
def test_matches_reference(backend: str, dtype: torch.dtype, rows: int, d: int, big: bool) -> None:
    x, residual, weight, bias = _inputs(rows, d, dtype)
    for w, b in ((weight, bias), (weight, None), (None, None)):
        with skd_kernels.use_backend(backend):
            got = skd_kernels.add_layer_norm(x, residual, w, b, EPS)
        _check(got, x, residual, w, b, f"{backend}/{dtype} weight={w is not None} bias={b is not None}")


@pytest.mark.parametrize("backend", backends_of(OP))
def test_leading_dims_and_non_contiguous_inputs(backend: str) -> None:
    """(S, N, D) inputs, rows padded (a column slice), transposed leading dims and a transposed residual."""
    d = 40
    padded = torch.randn(2, 9, d + 7)[..., :d]
    transposed = torch.randn(9, 2, d).transpose(0, 1)
    columns = torch.randn(d, 9, 2).permute(2, 1, 0)  # unit stride nowhere in the last dim
    weight, bias = torch.randn(d), torch.randn(d)
    for label, x, residual in (("padded", padded, transposed), ("transposed", transposed, columns),
                               ("columns", columns, padded)):
        assert not x.is_contiguous() and not residual.is_contiguous()
        with skd_kernels.use_backend(backend):
            got = skd_kernels.add_layer_norm(x, residual, weight, bias, EPS)
        assert got[0].shape == got[1].shape == (2, 9, d)
        _check(got, x.contiguous(), residual.contiguous(), weight, bias, f"{backend} {label}")


def test_inputs_are_not_modified() -> None:
    x, residual, weight, bias = _inputs(6, 50, torch.bfloat16)
    before = [t.clone() for t in (x, residual, weight, bias)]
    with skd_kernels.use_backend("cpu"):
        s, out = skd_kernels.add_layer_norm(x, residual, weight, bias, EPS)
    assert all(torch.equal(a, b) for a, b in zip((x, residual, weight, bias), before, strict=True))
    assert s.data_ptr() not in (x.data_ptr(), residual.data_ptr()) and out.data_ptr() != s.data_ptr()


@pytest.mark.parametrize("backend", backends_of(OP))
def test_gradients(backend: str) -> None:
    """float64 gradcheck of both outputs in every input, with weight and bias, without them, and through the sum
    alone or the norm alone (a recorded call runs the reference's ATen ops under every backend)."""
    x, residual, weight, bias = (t.double().requires_grad_() for t in _inputs(3, 11, torch.float64))
    for outputs in ((0.5, 1.0), (1.0, 0.0), (0.0, 1.0)):
        def fn(*args: torch.Tensor, outputs: tuple = outputs) -> torch.Tensor:
            with skd_kernels.use_backend(backend):
                s, out = skd_kernels.add_layer_norm(*args, EPS)
            return sum(c * t for c, t in zip(outputs, (s, out), strict=True) if c)

        assert torch.autograd.gradcheck(fn, (x, residual, weight, bias))
        assert torch.autograd.gradcheck(lambda a, b, fn=fn: fn(a, b, None, None), (x, residual))


@pytest.mark.parametrize("forced", (None, "cpu"))
def test_recorded_calls_run_torch_autograd(forced: str | None) -> None:
    """A call that autograd records runs ATen's add and LayerNorm (their own autograd nodes, the reference's values
    bitwise), forced CPU backend or not; without a gradient to record, the CPU kernel runs."""
    for dtype in (torch.float32, torch.bfloat16):
        x, residual, weight, bias = _inputs(6, 385, dtype)
        with skd_kernels.use_backend(forced) if forced else contextlib.nullcontext():
            plain = skd_kernels.add_layer_norm(x, residual, weight, bias, EPS)
            leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
            recorded = skd_kernels.add_layer_norm(*leaves, EPS)
        assert all(torch.equal(a, b) for a, b in zip(
            plain, torch.ops.skd_kernels.add_layer_norm(x, residual, weight, bias, EPS), strict=True))
        assert type(recorded[0].grad_fn).__name__ == "AddBackward0"
        assert type(recorded[1].grad_fn).__name__ == "NativeLayerNormBackward0"
        with torch.no_grad():
            want = reference.add_layer_norm(x, residual, weight, bias, EPS)
        assert all(torch.equal(a.detach(), b) for a, b in zip(recorded, want, strict=True))


def test_opcheck_compiled_op() -> None:
    op = torch.ops.skd_kernels.add_layer_norm.default
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x, residual, weight, bias = _inputs(5, 37, dtype)
        torch.library.opcheck(op, (x.view(5, 1, 37), residual.view(5, 1, 37), weight, bias, EPS))
        torch.library.opcheck(op, (x, residual, None, None, EPS))


def test_compiled_function_matches_eager() -> None:
    """torch.compile traces the op in one graph: without grad the CPU kernel as an opaque op (its fake kernel for
    the shapes), in a training graph the reference's ATen ops, whose gradients are eager's."""
    x, residual, weight, bias = _inputs(7, 24, torch.float32)
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda *a: skd_kernels.add_layer_norm(*a, EPS), fullgraph=True, backend=backend)
    with torch.no_grad():
        _check(fn(x, residual, weight, bias), x, residual, weight, bias, "compiled")
    leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
    got = fn(*leaves)
    _check(tuple(t.detach() for t in got), x, residual, weight, bias, "compiled training")
    eager = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
    want = reference.add_layer_norm(*eager, EPS)
    g = [torch.randn_like(t) for t in want]
    torch.autograd.backward(got, g)
    torch.autograd.backward(want, g)
    for name, a, b in zip(("x", "residual", "weight", "bias"), leaves, eager, strict=True):
        assert_close(f"grad {name}", a.grad, b.grad, rtol=1e-5, atol=1e-5 * max(scale(b.grad), 1.0))
    ops = [{str(n.target) for n in gm.graph.nodes if n.op == "call_function"} for gm in graphs]
    assert len(ops) == 2
    assert "skd_kernels.add_layer_norm.default" in ops[0] and not any("skd_kernels" in o for o in ops[1])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"residual": torch.randn(4, 9)}, "residual must have x's shape"),
    ({"residual": torch.randn(4, 8).double()}, "share a dtype"),
    ({"weight": torch.randn(9)}, r"weight must be \(8,\)"),
    ({"bias": torch.randn(8, 1)}, r"bias must be \(8,\)"),
    ({"x": torch.randint(0, 3, (4, 8))}, "x must be a floating tensor"),
    ({"x": torch.tensor(1.0), "residual": torch.tensor(2.0)}, "at least one dimension"),
    ({"eps": -1.0}, "eps must be a number >= 0"),
    ({"eps": float("nan")}, "eps must be a number >= 0"),
])
def test_bad_input_raises_value_error(kwargs: dict, message: str) -> None:
    args = {"x": torch.randn(4, 8), "residual": torch.randn(4, 8), "weight": torch.randn(8), "bias": torch.randn(8),
            "eps": EPS}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        skd_kernels.add_layer_norm(**args)


@pytest.mark.parametrize("env_var", ["SKD_CPU_AVX2_ONLY", "SKD_CPU_NO_AVX512_BF16"])
def test_cpu_other_paths_match_reference(env_var: str) -> None:
    """SKD_CPU_AVX2_ONLY=1: the CPU kernel runs ATen's add and layer_norm (a CPU without AVX-512);
    SKD_CPU_NO_AVX512_BF16=1: bf16 rounded by integer arithmetic instead of vcvtneps2bf16. The CPU-backend tests
    above check each in a fresh process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, env_var: "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "cpu and (matches_reference or non_contiguous) and not other_paths"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
