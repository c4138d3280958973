"""prefix_linear on every CPU-usable backend against skd_kernels.reference: forward, gradients (gradcheck in
float64), opcheck, no weight copy and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import (
    BACKENDS,
    LOW_PRECISION,
    OUTPUT_TOL,
    assert_close,
    backend_dtype_shape_params,
    largest_cpu_allocation,
    prefix_linear_outputs,
    scale,
    supports,
)

import skd_kernels
from skd_kernels import reference

# (leading dims of x, x's width, weight (out, in), k_in, k_out, big): odd sizes, k = 0 and full, x wider
# than k_in, 1-D x, k_out not a multiple of any tile.
SHAPES = [
    ((5,), 7, (9, 7), 7, 9, False),
    ((2, 3), 129, (7, 129), 129, 7, False),
    ((1,), 10, (130, 20), 10, 65, False),
    ((4,), 20, (130, 20), 13, 129, False),
    ((), 7, (9, 7), 5, 3, False),
    ((3,), 5, (6, 5), 0, 4, False),
    ((3,), 5, (6, 5), 3, 0, False),
    ((3,), 5, (6, 5), 0, 0, False),
    ((2, 197), 384, (1536, 384), 384, 1000, True),
    ((394,), 1536, (384, 1536), 700, 384, True),
]
ACTIVATIONS = [None, "gelu", "gelu_tanh"]


def _inputs(lead: tuple[int, ...], width: int, out_in: tuple[int, int], dtype: torch.dtype,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out_f, in_f = out_in
    x = torch.randn(*lead, width).to(dtype)
    weight = (torch.randn(out_f, in_f) * in_f**-0.5).to(dtype)
    bias = torch.randn(out_f).to(dtype)
    return x, weight, bias


def _check(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k_in: int,
           k_out: int, activation: str | None, label: str) -> None:
    want = reference.prefix_linear(x, weight, bias, k_in, k_out, activation or "none")
    rtol, atol = OUTPUT_TOL[x.dtype]
    assert_close(label, y, want, rtol=rtol, atol=atol * scale(want))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(("backend", "dtype", "lead", "width", "out_in", "k_in", "k_out", "big"),
                         backend_dtype_shape_params((torch.float32, *LOW_PRECISION, torch.float64), SHAPES))
def test_matches_reference(backend: str, dtype: torch.dtype, lead: tuple[int, ...], width: int,
                           out_in: tuple[int, int], k_in: int, k_out: int, big: bool, activation: str | None) -> None:
    x, weight, bias = _inputs(lead, width, out_in, dtype)
    for b in (bias, None):
        for label, y in prefix_linear_outputs(backend, x, weight, b, k_in, k_out, activation):
            assert y.shape == (*lead, k_out)
            _check(y, x, weight, b, k_in, k_out, activation, f"{backend}/{dtype} {label} bias={b is not None}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_defaults_to_full(backend: str) -> None:
    x, weight, bias = _inputs((4,), 12, (10, 12), torch.float32)
    with skd_kernels.use_backend(backend):
        y = skd_kernels.prefix_linear(x, weight, bias)
    assert_close(f"{backend} full", y, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend: str) -> None:
    x_t = torch.randn(24, 6).t()  # (6, 24), feature stride 6
    x_batch = torch.randn(3, 8, 24)[:, ::2]  # (3, 4, 24), token stride 48
    w_col_major = torch.randn(24, 30).t()  # (30, 24), stride (1, 30)
    w_sliced = torch.randn(30, 50)[:, 5:29]  # (30, 24), row stride 50
    bias = torch.randn(60)[::2]  # (30,), stride 2
    for x in (x_t, x_batch):
        for weight in (w_col_major, w_sliced):
            assert not (x.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
            for label, y in prefix_linear_outputs(backend, x, weight, bias, 17, 19, "gelu"):
                _check(y, x, weight, bias, 17, 19, "gelu",
                       f"{backend} {label} x{tuple(x.stride())} w{tuple(weight.stride())}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if supports(b, torch.float64)])
def test_gradcheck_float64(backend: str, activation: str | None) -> None:
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        with skd_kernels.use_backend(backend):
            return skd_kernels.prefix_linear(x, weight, bias, 4, 3, activation)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference(backend: str) -> None:
    """fp32 gradients (every backend, Triton included) equal autograd through the reference."""
    x, weight, bias = _inputs((3, 5), 20, (11, 24), torch.float32)
    grads = {}
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        with skd_kernels.use_backend(name):
            y = skd_kernels.prefix_linear(*leaves, 13, 9, "gelu_tanh")
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        grads[name] = [t.grad for t in leaves]
    for label, got, want in zip(("x", "weight", "bias"), grads[backend], grads["reference"], strict=True):
        assert_close(f"{backend} grad {label}", got, want, rtol=1e-5, atol=1e-6)
    # only the leading block gets gradient
    assert not grads[backend][1][9:].any() and not grads[backend][1][:, 13:].any()
    assert not grads[backend][0][..., 13:].any() and not grads[backend][2][9:].any()


def test_opcheck_compiled_op() -> None:
    op = torch.ops.skd_kernels.prefix_linear.default
    x, weight, bias = _inputs((2, 3), 9, (7, 11), torch.float32)
    for args in (
        (x, weight, bias, 9, 7, "none"),
        (x, weight, None, 5, 3, "gelu"),
        (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), 6, 4, "gelu_tanh"),
        (x.detach().bfloat16(), weight.detach().bfloat16(), bias.detach().bfloat16(), 0, 2, "gelu"),
        (x.detach().double(), weight.detach().double(), None, 9, 0, "none"),
    ):
        torch.library.opcheck(op, args)



def test_one_compiled_graph_serves_every_width() -> None:
    """k_in and k_out are SymInt in the schema and the fake kernel keeps them symbolic: torch.compile
    traces the op once for four (k_in, k_out) pairs, with and without autograd, and the results equal the
    reference."""
    import torch._dynamo.testing

    x, weight, bias = _inputs((2, 3), 20, (24, 20), torch.float32)
    for grad in (False, True):
        counter = torch._dynamo.testing.CompileCounter()
        fn = torch.compile(lambda x, w, b, k_in, k_out: skd_kernels.prefix_linear(x, w, b, k_in, k_out, "gelu"),
                           backend=counter, dynamic=True, fullgraph=True)
        for k_in, k_out in ((5, 6), (10, 12), (15, 18), (20, 24)):
            leaves = [t.clone().requires_grad_(grad) for t in (x, weight, bias)]
            y = fn(*leaves, k_in, k_out)
            _check(y, x, weight, bias, k_in, k_out, "gelu", f"compiled grad={grad} k=({k_in}, {k_out})")
            if grad:  # the backward traced with symbolic widths: gradient only inside the block
                y.sum().backward()
                assert leaves[1].grad[:k_out, :k_in].abs().sum() > 0
                assert not leaves[1].grad[k_out:].any() and not leaves[1].grad[:, k_in:].any()
        assert counter.frame_count == 1


# The Triton interpreter stages whole tensors through numpy by design, so only backends that run
# natively on CPU can show what they allocate here.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_never_copies_the_weight(backend: str) -> None:
    weight = torch.randn(1024, 1024)
    x = torch.randn(2, 1024)  # a tiny output, so any block-sized allocation is a weight copy
    block_bytes = 768 * 640 * weight.element_size()

    def run(w: torch.Tensor) -> None:
        with skd_kernels.use_backend(backend):
            skd_kernels.prefix_linear(x, w, None, 640, 768, "gelu")

    # The detector works: a weight view that BLAS cannot read directly (no unit stride) is copied.
    every_other_column = torch.randn(1024, 2048)[:, ::2]
    assert largest_cpu_allocation(lambda: run(every_other_column)) >= block_bytes
    largest = largest_cpu_allocation(lambda: run(weight))
    print(f"{backend}: largest allocation {largest} B, weight block {block_bytes} B")
    assert largest < block_bytes // 8


def _bad(kwargs: dict[str, object]) -> dict[str, object]:
    x, weight, bias = _inputs((3,), 8, (6, 8), torch.float32)
    return {"x": x, "weight": weight, "bias": bias, **kwargs}


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"k_in": 9}, "k_in"),
        ({"k_in": -1}, "k_in"),
        ({"k_out": 7}, "k_out"),
        ({"k_out": -2}, "k_out"),
        ({"x": torch.randn(3, 4), "k_in": 6}, "x"),
        ({"weight": torch.randn(6, 8, 1)}, "weight"),
        ({"bias": torch.randn(5)}, "bias"),
        ({"bias": torch.randn(6, dtype=torch.float64)}, "bias"),
        ({"activation": "relu"}, "activation"),
        ({"x": torch.randn(3, 8).int()}, "x"),
    ],
    ids=["k_in>in", "k_in<0", "k_out>out", "k_out<0", "x-narrower-than-k_in", "3d-weight", "short-bias",
         "bias-dtype", "bad-activation", "int-x"],
)
def test_bad_input_raises_naming_argument(kwargs: dict[str, object], arg: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        skd_kernels.prefix_linear(**_bad(kwargs))


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_autocast_runs_in_the_autocast_dtype_like_f_linear(activation):
    """Inside torch.autocast the op computes in bf16 as F.linear does (fp32 x, weight and bias in)."""
    x, weight, bias = torch.randn(5, 7, 48), torch.randn(40, 48), torch.randn(40)
    weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = skd_kernels.prefix_linear(x, weight, bias, k_in=30, k_out=17, activation=activation)
        want = F.linear(x[..., :30], weight[:17, :30], bias[:17])
        want = F.gelu(want) if activation else want
    assert y.dtype == torch.bfloat16 and want.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert weight.grad.dtype == torch.float32
    g = weight.grad
    assert g[:17, :30].abs().sum() > 0 and g[17:].abs().sum() == 0 and g[:, 30:].abs().sum() == 0
