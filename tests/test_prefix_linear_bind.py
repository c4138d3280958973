"""prefix_linear's lean paths: `bind` (weight side checked once, skd.ElasticViT's per-subnet plan) and the
public op below the autograd layer when no gradient is needed. Both must equal the public op with autograd
on fresh random inputs, every dtype and backend, and raise its errors on bad input."""

from __future__ import annotations

import contextlib

import pytest
import torch
from kernel_helpers import BACKENDS, OUTPUT_TOL, assert_close, largest_cpu_allocation, scale, supports

import skd_kernels
from skd_kernels import reference
from skd_kernels.ops import prefix_linear as prefix_linear_op
from skd_kernels.ops.prefix_linear import bind

# (leading dims of x, x's width, weight (out, in), k_in, k_out): odd sizes, k = 0 and full, x wider than k_in
SHAPES = [
    ((5,), 7, (9, 7), 7, 9),
    ((2, 3), 20, (13, 17), 11, 6),
    ((4, 65), 96, (288, 96), 96, 63),
    ((3,), 5, (6, 5), 0, 4),
    ((3,), 5, (6, 5), 3, 0),
]
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _inputs(lead, width, out_in, dtype, grad=False):
    x = torch.randn(*lead, width).to(dtype)
    weight = (torch.randn(*out_in) * out_in[1] ** -0.5).to(dtype).requires_grad_(grad)
    bias = torch.randn(out_in[0]).to(dtype).requires_grad_(grad)
    return x, weight, bias


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("backend", "dtype"), [(b, d) for b in (None, *BACKENDS) for d in DTYPES
                                                 if b is None or (b != "triton" and supports(b, d))], ids=str)
def test_no_grad_paths_equal_public_op_with_autograd(backend, dtype, shape, activation) -> None:
    """bind(...)(x) and the public op under no_grad (both below autograd) equal the public op recording
    autograd, and the reference; no grad_fn where none is needed. backend None: automatic choice."""
    lead, width, out_in, k_in, k_out = shape
    x, weight, bias = _inputs(lead, width, out_in, dtype, grad=True)
    with skd_kernels.use_backend(backend) if backend else contextlib.nullcontext():
        recorded = skd_kernels.prefix_linear(x, weight, bias, k_in, k_out, activation)
        assert recorded.grad_fn is not None
        bound = bind(weight, bias, k_in, k_out, activation)
        with torch.no_grad():
            public = skd_kernels.prefix_linear(x, weight, bias, k_in, k_out, activation)
            lean = bound(x)
    want = reference.prefix_linear(x, weight.detach(), bias.detach(), k_in, k_out, activation or "none")
    rtol, atol = OUTPUT_TOL[dtype]
    for label, y in (("public no_grad", public), ("bound", lean)):
        assert y.grad_fn is None and y.dtype == dtype
        assert_close(f"{label} vs recorded", y, recorded.detach(), rtol=rtol, atol=atol * scale(want))
        assert_close(f"{label} vs reference", y, want, rtol=rtol, atol=atol * scale(want))


def test_no_grad_needed_when_nothing_requires_grad() -> None:
    """Grad mode on but no input requiring grad: no graph is recorded, the values are the op's."""
    x, weight, bias = _inputs((3, 4), 10, (8, 10), torch.float32)
    y = skd_kernels.prefix_linear(x, weight, bias, 7, 5, "gelu")
    z = bind(weight, bias, 7, 5, "gelu")(x)
    assert y.grad_fn is None and z.grad_fn is None
    want = reference.prefix_linear(x, weight, bias, 7, 5, "gelu")
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(z, want)


def test_bound_gradients_equal_public_op() -> None:
    """With grad needed the bound callable records the op's autograd: same gradients as the public op."""
    x, weight, bias = _inputs((2, 5), 12, (9, 12), torch.float64, grad=True)
    x.requires_grad_(True)
    g = torch.randn(2, 5, 6, dtype=torch.float64)
    grads = []
    for fn in (lambda: skd_kernels.prefix_linear(x, weight, bias, 10, 6, "gelu_tanh"),
               lambda: bind(weight, bias, 10, 6, "gelu_tanh")(x)):
        y = fn()
        assert y.grad_fn is not None
        grads.append(torch.autograd.grad(y, (x, weight, bias), g))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    assert grads[1][1][:, 10:].abs().sum() == 0 and grads[1][1][6:].abs().sum() == 0


def test_bound_sees_in_place_weight_updates() -> None:
    """The callable holds views of the weight: an optimizer-style in-place update is seen at once."""
    x, weight, bias = _inputs((4,), 8, (6, 8), torch.float32)
    bound = bind(weight, bias, 8, 5)
    before = bound(x)
    with torch.no_grad():
        weight.mul_(-2.0).add_(torch.randn_like(weight))
        bias.add_(1.0)
    after = bound(x)
    torch.testing.assert_close(after, reference.prefix_linear(x, weight, bias, 8, 5))
    assert not torch.allclose(before, after)


def _bad(kwargs):
    x, weight, bias = _inputs((3,), 8, (6, 8), torch.float32)
    return {"x": x, "weight": weight, "bias": bias, **kwargs}


@pytest.mark.parametrize(
    "kwargs",
    [{"k_in": 9}, {"k_in": -1}, {"k_out": 7}, {"k_out": -2}, {"weight": torch.randn(6, 8, 1)},
     {"weight": torch.randn(6, 8).int()}, {"bias": torch.randn(5)}, {"bias": torch.randn(6, dtype=torch.float64)},
     {"activation": "relu"}],
    ids=["k_in>in", "k_in<0", "k_out>out", "k_out<0", "3d-weight", "int-weight", "short-bias", "bias-dtype",
         "bad-activation"],
)
def test_bind_raises_the_public_ops_error_on_bad_weight_side(kwargs) -> None:
    args = _bad(kwargs)
    with pytest.raises(ValueError) as public:
        skd_kernels.prefix_linear(**args)
    args.pop("x")
    with pytest.raises(ValueError) as bound:
        bind(**args)
    assert str(bound.value) == str(public.value)


@pytest.mark.parametrize(
    "x",
    [torch.randn(3, 4), torch.randn(3, 8).int(), torch.randn(3, 8, dtype=torch.float64), torch.randn(())],
    ids=["narrower-than-k_in", "int-x", "dtype-mismatch", "0-d"],
)
@pytest.mark.parametrize("grad", [False, True])
def test_bound_call_raises_the_public_ops_error_on_bad_x(x, grad) -> None:
    _, weight, bias = _inputs((3,), 8, (6, 8), torch.float32, grad=grad)
    with pytest.raises(ValueError) as public:
        skd_kernels.prefix_linear(x, weight, bias, 6, 5)
    bound = bind(weight, bias, 6, 5)
    with pytest.raises(ValueError) as lean:
        bound(x)
    assert str(lean.value) == str(public.value)


def test_bound_call_names_a_non_tensor_x() -> None:
    _, weight, bias = _inputs((3,), 8, (6, 8), torch.float32)
    with pytest.raises(ValueError, match=r"\bx must be a torch.Tensor"):
        bind(weight, bias)([1.0] * 8)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_bound_equals_public_op(dtype) -> None:
    """The Triton backend through `bind` (interpreted on CPU; one small shape, the interpreter is slow)."""
    x, weight, bias = _inputs((2, 3), 20, (13, 17), dtype, grad=True)
    with skd_kernels.use_backend("triton"):
        recorded = skd_kernels.prefix_linear(x, weight, bias, 11, 6, "gelu")
        with torch.no_grad():
            lean = bind(weight, bias, 11, 6, "gelu")(x)
    assert lean.grad_fn is None
    rtol, atol = OUTPUT_TOL[dtype]
    assert_close("triton bound", lean, recorded.detach(), rtol=rtol, atol=atol * scale(recorded.detach()))


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
@pytest.mark.parametrize("column_major", [True, False], ids=["column-major", "row-major"])
def test_bound_bf16_on_dense_blocks_equals_reference(column_major: bool, activation: str | None) -> None:
    """bf16 blocks that are dense in one order (a column-major weight's column prefix, a row-major weight's
    row prefix; ElasticViT's GEMMs) run through oneDNN's linear when bound; a strided panel does not.
    Values equal the reference either way."""
    torch.manual_seed(0)
    out_f, in_f = 48, 40
    weight = (torch.randn(out_f, in_f) * in_f**-0.5).to(torch.bfloat16)
    if column_major:
        weight = weight.t().contiguous().t()
    bias = torch.randn(out_f).to(torch.bfloat16)
    x = torch.randn(3, 7, in_f).to(torch.bfloat16)
    k_in, k_out = (23, out_f) if column_major else (in_f, 29)
    assert prefix_linear_op._onednn_runs(weight[:k_out, :k_in], k_in, k_out) == (
        prefix_linear_op._ONEDNN_LINEAR is not None and torch.backends.mkldnn.is_available())
    assert not prefix_linear_op._onednn_runs(weight.contiguous()[:, :in_f - 1], in_f - 1, out_f)  # strided panel
    with torch.no_grad():
        y = bind(weight, bias, k_in, k_out, activation)(x)  # x wider than k_in for the column prefix
    want = reference.prefix_linear(x, weight, bias, k_in, k_out, activation or "none")
    rtol, atol = OUTPUT_TOL[torch.bfloat16]
    assert y.dtype == torch.bfloat16 and y.shape == (3, 7, k_out)
    assert_close("bound bf16 vs reference", y, want, rtol=rtol, atol=atol * scale(want))


def test_bound_bf16_column_prefix_never_copies_the_weight() -> None:
    weight = torch.randn(1024, 1024).to(torch.bfloat16).t().contiguous().t()  # column-major, as ElasticViT's
    x = torch.randn(2, 640).to(torch.bfloat16)  # a tiny output: a block-sized allocation would be a weight copy
    bound = bind(weight, None, 640, None)
    with torch.no_grad():
        largest = largest_cpu_allocation(lambda: bound(x))
    assert largest < 1024 * 640 * weight.element_size() // 8


def test_no_grad_runs_on_views_on_cpu_and_cuda_but_onednn_only_on_cpu() -> None:
    """Without a gradient, the compiled kernel's computation runs from Python on both of its devices (on CUDA
    it saves the boxed call's ~20 µs of host work per GEMM); oneDNN's linear only for CPU weights (a meta
    tensor stands in for a CUDA one here). Triton and the reference run themselves."""
    kernel = prefix_linear_op._CPU_KERNEL
    if kernel is not None:
        assert prefix_linear_op._views_run(kernel, torch.device("cpu"))
        assert prefix_linear_op._views_run(kernel, torch.device("cuda"))
        assert not prefix_linear_op._views_run(kernel, torch.device("meta"))
    assert not prefix_linear_op._views_run(reference.prefix_linear, torch.device("cpu"))
    block = torch.empty(48, 40, dtype=torch.bfloat16, device="meta")
    assert not prefix_linear_op._onednn_runs(block, 40, 48)


def test_recorded_calls_run_torch_autograd_unforced() -> None:
    """Where autograd records, CPU and CUDA calls under the automatic choice run `reference` (PyTorch's C++
    autograd, not the op's Python one), eagerly and in a torch.compile trace with grad mode on; a forced backend
    and a compiled no-grad trace keep the op. The CUDA device is only named here (no tensor on it);
    tests/test_gpu.py runs the path."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert prefix_linear_op._torch_autograd(cuda) and prefix_linear_op._torch_autograd(cpu)
    assert not prefix_linear_op._torch_autograd(torch.device("meta"))
    with skd_kernels.use_backend("reference"):
        assert not prefix_linear_op._torch_autograd(cuda) and not prefix_linear_op._torch_autograd(cpu)
    seen = []
    traced = torch.compile(lambda x: seen.append(prefix_linear_op._torch_autograd(cpu)) or x, backend="eager")
    traced(torch.ones(1))
    with torch.no_grad():
        traced(torch.ones(1))
    assert seen == [True, False]
    x, weight, bias = _inputs((3,), 7, (9, 7), torch.float32, grad=True)
    x.requires_grad_()
    for call in (lambda: skd_kernels.prefix_linear(x, weight, bias, 5, 4, "gelu"),
                 lambda: prefix_linear_op.bind(weight, bias, 5, 4, "gelu")(x)):
        y = call()
        assert "prefix_linear" not in type(y.grad_fn).__name__ and "Gelu" in type(y.grad_fn).__name__
        got = torch.autograd.grad(y.square().sum(), (x, weight, bias))
        want = torch.autograd.grad(reference.prefix_linear(x, weight, bias, 5, 4, "gelu").square().sum(),
                                   (x, weight, bias))
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    if prefix_linear_op._CPU_KERNEL is not None:  # forced, the compiled op records its own node
        with skd_kernels.use_backend("cpu"):
            assert "prefix_linear" in type(skd_kernels.prefix_linear(x, weight, bias, 5, 4).grad_fn).__name__


def _nodes(grad_fn: object) -> list[str]:
    """The names of every autograd node behind grad_fn."""
    seen, todo, names = set(), [grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize(("k_in", "k_out", "slices"), [(17, 13, 0), (11, 13, 1), (17, 6, 2), (11, 6, 3)])
def test_recorded_composite_slices_only_what_it_drops(monkeypatch, k_in: int, k_out: int, slices: int) -> None:
    """The composite a recorded CUDA call runs (`reference`, here forced on CPU), in fp32 and under bf16 autocast:
    autograd nodes only for the dims it cuts (the weight's rows, its columns, the bias's rows), none for full
    ones (an identity slice's backward writes a zero-filled copy, a kernel pair per step on a GPU) and no
    aliases; the same values and gradients as the op."""
    monkeypatch.setattr(prefix_linear_op, "_torch_autograd", lambda device: True)
    x, weight, bias = _inputs((2, 3), 17, (13, 17), torch.float32, grad=True)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = skd_kernels.prefix_linear(x, weight, bias, k_in, k_out, "gelu")
        names = _nodes(y.grad_fn)
        assert names.count("SliceBackward0") == slices and "AliasBackward0" not in names, names
        y.float().square().sum().backward()
        grads = weight.grad.clone(), bias.grad.clone()
        weight.grad = bias.grad = None
        with monkeypatch.context() as m, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            m.setattr(prefix_linear_op, "_torch_autograd", lambda device: False)
            expected = skd_kernels.prefix_linear(x, weight, bias, k_in, k_out, "gelu")
        expected.float().square().sum().backward()
        rtol, atol = OUTPUT_TOL[torch.bfloat16 if autocast else torch.float32]
        for name, got, want in (("y", y, expected), ("weight grad", grads[0], weight.grad),
                                ("bias grad", grads[1], bias.grad)):
            assert_close(name, got.detach(), want.detach(), rtol, atol * scale(want.detach()))
        weight.grad = bias.grad = None
