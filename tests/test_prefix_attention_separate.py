"""prefix_attention_separate (separate rank-major q, k, v) on every backend that implements it (Triton too,
under TRITON_INTERPRET=1 on CPU), against skd_kernels.reference: forward over dtypes, odd N, r = 1..64, with
and without bias, per-tensor strides, r = 0, gradients, opcheck (compiled and Triton ops), one compiled graph
for every width, no activation copy, bad input and the backend table (CUDA runs `via_sdpa`, copies + SDPA,
itself checked against the reference). The reference is checked against the fused op on the same values."""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_helpers import CPU, OUTPUT_TOL, assert_close, largest_cpu_allocation, padding_mask, scale

import skd_kernels
from skd_kernels import _dispatch, reference
from skd_kernels.ops import prefix_attention_separate as separate_op
from skd_kernels.ops.prefix_attention_separate import OP

BACKENDS = [b for b in skd_kernels.available_backends(CPU) if _dispatch._REGISTRY[b].usable(CPU, op=OP)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (S, N, H, r): r over 1..64 (odd, even, below and above the brgemm and 8-lane edges), odd N (one and several
# key tiles: N = 300 with H*r = 768 splits the keys), H in {1, 3, 12}.
SHAPES = [(2, 5, 3, 1), (1, 1, 1, 2), (2, 7, 12, 3), (3, 63, 1, 5), (2, 65, 3, 8), (1, 197, 12, 13),
          (2, 31, 6, 16), (1, 129, 3, 31), (2, 64, 12, 32), (1, 300, 12, 64), (2, 17, 1, 64)]
SCALE = 0.37  # not 1/sqrt(r): the op takes the full head's scale


def _runs(backend: str, dtype: torch.dtype, shape: tuple[int, int, int, int] | None = None) -> bool:
    """Whether `backend` takes `dtype` for this op; and the shape, unless it is too big for Triton's CPU
    interpreter (its time grows with N²·H: seconds per call from N = 64 at H = 3; the smaller shapes take
    the same code paths: partial and several key tiles, r up to 64)."""
    return (_dispatch._REGISTRY[backend].usable(CPU, dtype, OP)
            and not (backend == "triton" and shape is not None and shape[1] ** 2 * shape[2] > 6_000))


def _qkv(s: int, n: int, h: int, r: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.randn(s, n, r * h).to(dtype) for _ in range(3)]


def _bias(s: int, n: int, h: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(s, h, n, n).to(dtype)


def _check(out: torch.Tensor, qkv: list[torch.Tensor], h: int, bias: torch.Tensor | None, label: str) -> None:
    want = reference.prefix_attention_separate(*qkv, h, SCALE, bias)
    rtol, atol = OUTPUT_TOL[qkv[0].dtype]
    assert_close(label, out, want, rtol=rtol, atol=atol * scale(want))


def _run(backend: str, qkv: list[torch.Tensor], h: int, bias: torch.Tensor | None) -> torch.Tensor:
    with skd_kernels.use_backend(backend):
        return skd_kernels.prefix_attention_separate(*qkv, h, SCALE, bias)


def test_reference_is_the_fused_ops_on_interleaved_values() -> None:
    """The oracle equals the fused op's reference on the same values interleaved into one qkv."""
    s, n, h, r = 3, 11, 4, 5
    qkv = _qkv(s, n, h, r, torch.float64)
    bias = _bias(s, n, h, torch.float64)
    got = reference.prefix_attention_separate(*qkv, h, SCALE, bias)
    fused = torch.stack([t.view(s, n, r, h) for t in qkv], dim=3).reshape(s, n, 3 * h * r)  # column j*3H + w*H + h
    assert_close("reference vs fused", got, reference.prefix_attention(fused, h, SCALE, bias), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 1, 1, 1), (3, 11, 4, 5), (2, 197, 12, 8)], ids=str)
def test_via_sdpa_matches_reference(dtype: torch.dtype, shape: tuple[int, int, int, int]) -> None:
    """`via_sdpa` (the op's CUDA kernel; ElasticViT's attention where it copies activations) on CPU, with q, k
    and v of different strides, without bias, with a per-head one and with a padding mask (stride 0 over
    queries, the last keys at -inf), equals the reference."""
    s, n, h, r = shape
    c = h * r
    strided = [torch.randn(s, n, c + 3).to(dtype)[..., :c], torch.randn(n, s, c).to(dtype).transpose(0, 1),
               torch.randn(s, n, 2 * c).to(dtype)[..., ::2]]
    for qkv in (_qkv(s, n, h, r, dtype), strided):
        for bias in (None, _bias(s, n, h, dtype), padding_mask(s, n, dtype)):
            out = separate_op.via_sdpa(*qkv, h, SCALE, bias)
            assert out.shape == (s, n, c) and out.dtype == dtype
            _check(out, qkv, h, bias, f"via_sdpa {dtype} strides {[t.stride() for t in qkv]} bias={bias is not None}")


def test_via_sdpa_rank_mask_zero_width_and_gradients() -> None:
    """The rank mask multiplies every head's q, k and v at each rank (the reference on masked inputs); r = 0
    gives (S, N, 0); fp32 gradients in q, k, v and a broadcast bias equal autograd through the reference."""
    s, n, h, r = 3, 9, 4, 5
    qkv, bias = _qkv(s, n, h, r, torch.float32), torch.randn(1, h, n, n)
    mask = torch.rand(r) + 0.5
    masked = [(t.view(s, n, r, h) * mask[:, None]).view(s, n, -1) for t in qkv]  # column j*H + h is rank j
    _check(separate_op.via_sdpa(*qkv, h, SCALE, bias, 0.0, mask), masked, h, bias, "via_sdpa masked")
    empty = torch.randn(2, 7, 0)
    assert separate_op.via_sdpa(empty, empty, empty, 3, SCALE).shape == (2, 7, 0)
    grads = []
    for fn in (separate_op.via_sdpa, reference.prefix_attention_separate):
        leaves = [t.clone().requires_grad_() for t in (*qkv, bias)]
        out = fn(*leaves[:3], h, SCALE, leaves[3])
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads.append([t.grad for t in leaves])
    for label, got, want in zip("qkvb", *grads, strict=True):
        assert_close(f"via_sdpa grad {label}", got, want, rtol=1e-4, atol=1e-5 * scale(want))


@pytest.mark.parametrize(("backend", "dtype", "shape"),
                         [p for p in itertools.product(BACKENDS, DTYPES, SHAPES) if _runs(*p)], ids=str)
def test_matches_reference(backend: str, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> None:
    s, n, h, r = shape
    qkv = _qkv(s, n, h, r, dtype)
    for bias in (None, _bias(s, n, h, dtype), _bias(s, n, 1, dtype)[:1]):
        out = _run(backend, qkv, h, bias)
        assert out.shape == (s, n, r * h)
        _check(out, qkv, h, bias, f"{backend}/{dtype} {shape} bias={None if bias is None else tuple(bias.shape)}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_width_gives_empty_output(backend: str) -> None:
    qkv = [torch.randn(2, 7, 0) for _ in range(3)]
    out = _run(backend, qkv, 3, _bias(2, 7, 3, torch.float32))
    assert out.shape == (2, 7, 0) and out.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_broadcast_bias(backend: str) -> None:
    """q, k and v each with their own strides (the kernel reads three base pointers and per-tensor strides)."""
    s, n, h, r = 2, 9, 3, 4
    c = h * r
    wide = torch.randn(s, n, c + 5)[..., :c]  # token stride c + 5
    tokens_first = torch.randn(n, s, c).transpose(0, 1)  # sequence stride c
    column_strided = torch.randn(s, n, 2 * c)[..., ::2]  # column stride 2 (copied, not misread)
    views_of_one = torch.randn(s, n, 3 * c)  # q, k, v as column slices of one GEMM output
    biases = (None, torch.randn(s, h, n, n).transpose(2, 3), torch.randn(1, h, n, n),
              torch.randn(1, 1, n, n).expand(s, h, n, n), torch.randn(s, 1, n, n))
    layouts = [[wide, tokens_first, column_strided], [column_strided, wide, tokens_first],
               list(views_of_one.split(c, dim=-1))]
    for qkv, bias in itertools.product(layouts, biases):
        label = f"{backend} {[tuple(t.stride()) for t in qkv]} bias{None if bias is None else tuple(bias.stride())}"
        _check(_run(backend, qkv, h, bias), qkv, h, bias, label)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if _runs(b, torch.float64)])
def test_gradcheck_float64(backend: str) -> None:
    s, n, h, r = 2, 4, 2, 3
    qkv = [t.requires_grad_() for t in _qkv(s, n, h, r, torch.float64)]
    for bias in (None, torch.randn(1, h, n, n, dtype=torch.float64), torch.randn(s, 1, n, n, dtype=torch.float64)):
        inputs = (*qkv,) if bias is None else (*qkv, bias.requires_grad_())

        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            with skd_kernels.use_backend(backend):
                return skd_kernels.prefix_attention_separate(q, k, v, h, SCALE, bias)

        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", [(True, True, True, True), (False, True, False, False), (True, False, True, True)],
                         ids=str)
def test_gradients_match_reference(backend: str, needs: tuple[bool, ...]) -> None:
    """fp32 gradients in whichever of q, k, v and a broadcast bias require them equal autograd through the
    reference; the others get none."""
    s, n, h, r = 3, 6, 2, 5
    inputs = [*_qkv(s, n, h, r, torch.float32), torch.randn(1, h, n, n)]
    grads = {}
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_(need) for t, need in zip(inputs, needs, strict=True)]
        out = _run(name, leaves[:3], h, leaves[3])
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads[name] = [t.grad for t in leaves]
    for label, got, want, need in zip("qkvb", grads[backend], grads["reference"], needs, strict=True):
        assert (got is not None) == need and (want is not None) == need, label
        if need:
            assert_close(f"{backend} grad {label}", got, want, rtol=1e-4, atol=1e-5 * scale(want))


def test_opcheck_compiled_op() -> None:
    qkv, bias = _qkv(2, 5, 3, 2, torch.float32), _bias(2, 5, 3, torch.float32)
    for args in [
        (*qkv, 3, SCALE, None),
        (*[t.clone().requires_grad_() for t in qkv], 3, SCALE, bias.clone().requires_grad_()),
        (*[t.bfloat16() for t in qkv], 3, SCALE, bias[:1].bfloat16()),
        (*_qkv(1, 3, 2, 2, torch.float64), 2, SCALE, None),
        (*[torch.randn(2, 5, 0) for _ in range(3)], 3, SCALE, None),
    ]:
        torch.library.opcheck(torch.ops.skd_kernels.prefix_attention_separate.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_allocates_only_its_output(dtype: torch.dtype) -> None:
    """No activation copy: the largest tensor allocation is the (S, N, r*H) output, the size of q."""
    s, n, h, r = 4, 64, 6, 16
    qkv, bias = _qkv(s, n, h, r, dtype), _bias(1, n, h, dtype)
    largest = largest_cpu_allocation(lambda: _run("cpu", qkv, h, bias))
    out_bytes = s * n * r * h * qkv[0].element_size()
    print(f"largest allocation {largest} B, output {out_bytes} B")
    assert 0 < largest <= out_bytes


def _bad(kwargs: dict[str, object]) -> dict[str, object]:
    q, k, v = _qkv(2, 5, 3, 2, torch.float32)
    return {"q": q, "k": k, "v": v, "num_heads": 3, "scale": SCALE, "attn_bias": None, **kwargs}


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"q": torch.randn(10, 6)}, "q"),
        ({"q": torch.randn(2, 5, 6).int()}, "q"),
        ({"v": torch.randn(2, 5, 6).int()}, "v"),
        ({"k": torch.randn(2, 5, 9)}, "k"),
        ({"v": torch.randn(2, 4, 6)}, "v"),
        ({"k": torch.randn(2, 5, 6, dtype=torch.float64)}, "k"),
        ({"q": torch.randn(2, 5, 7), "k": torch.randn(2, 5, 7), "v": torch.randn(2, 5, 7)}, "q"),
        ({"num_heads": 0}, "num_heads"),
        ({"scale": float("nan")}, "scale"),
        ({"attn_bias": torch.randn(2, 3, 5, 4)}, "attn_bias"),
        ({"attn_bias": torch.randn(2, 2, 5, 5)}, "attn_bias"),
        ({"attn_bias": torch.randn(2, 3, 5, 5, dtype=torch.float64)}, "attn_bias"),
    ],
    ids=["2d-q", "int-q", "int-v", "k-shape", "v-tokens", "k-dtype", "width-not-H", "zero-heads", "nan-scale",
         "bias-keys", "bias-heads", "bias-dtype"],
)
def test_bad_input_raises_naming_argument(kwargs: dict[str, object], arg: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        skd_kernels.prefix_attention_separate(**_bad(kwargs))


def test_one_compiled_graph_serves_every_width() -> None:
    """The fake kernel takes the width from q's (symbolic) shape: torch.compile traces the op once for four
    widths r, and the compiled results equal the reference."""
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda q, k, v, bias: skd_kernels.prefix_attention_separate(q, k, v, 3, SCALE, bias),
                       backend=counter, dynamic=True, fullgraph=True)
    bias = _bias(1, 9, 3, torch.float32)
    for r in (4, 8, 12, 16):
        qkv = _qkv(2, 9, 3, r, torch.float32)
        _check(fn(*qkv, bias), qkv, 3, bias, f"compiled r={r}")
    assert counter.frame_count == 1


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
def test_opcheck_triton_op() -> None:
    from skd_kernels.triton import prefix_attention_separate as _registers_the_op  # noqa: F401

    qkv, bias = _qkv(2, 5, 3, 2, torch.float32), _bias(2, 5, 3, torch.float32)
    for args in [
        (*qkv, 3, SCALE, None),
        (*[t.clone().requires_grad_() for t in qkv], 3, SCALE, bias.clone().requires_grad_()),
        (*[t.bfloat16() for t in qkv], 3, SCALE, bias[:1].bfloat16()),
        (*[torch.randn(2, 5, 0) for _ in range(3)], 3, SCALE, None),
    ]:
        torch.library.opcheck(torch.ops.skd_kernels.triton_prefix_attention_separate.default, args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
def test_triton_op_one_compiled_graph_serves_every_width() -> None:
    """The Triton op's fake kernel takes the width from q's symbolic shape too: one graph for four widths."""
    import torch._dynamo.testing

    from skd_kernels.triton import prefix_attention_separate as triton_op

    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda q, k, v, bias: triton_op(q, k, v, 3, SCALE, bias), backend=counter, dynamic=True,
                       fullgraph=True)
    bias = _bias(1, 5, 3, torch.float32)
    for r in (2, 4, 6, 8):  # widths 6 ... 24, none equal to another size (dynamo would share their symbol)
        qkv = _qkv(2, 5, 3, r, torch.float32)
        _check(fn(*qkv, bias), qkv, 3, bias, f"compiled triton r={r}")
    assert counter.frame_count == 1


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_is_the_fused_ops_on_rank_stride_h(dtype: torch.dtype) -> None:
    """One kernel for both ops: separate q, k, v (masked keys and scores shifted by tens through the bias)
    give what the fused Triton op gives on the same values interleaved into one qkv, to the last bit."""
    s, n, h, r = 2, 19, 3, 5
    qkv = [(t * 3).to(dtype) for t in _qkv(s, n, h, r, torch.float32)]
    bias = torch.randn(s, h, n, n) * 30
    bias.masked_fill_(torch.rand(s, h, n, n) < 0.5, float("-inf"))
    bias[..., 0] = 0  # every query keeps a key
    bias = bias.to(dtype)
    fused = torch.stack([t.view(s, n, r, h) for t in qkv], dim=3).reshape(s, n, 3 * h * r)
    with skd_kernels.use_backend("triton"):
        got = skd_kernels.prefix_attention_separate(*qkv, h, SCALE, bias)
        want = skd_kernels.prefix_attention(fused, h, SCALE, bias)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)
    _check(got, qkv, h, bias, f"triton {dtype} masked")


def test_backend_table_cuda_runs_via_sdpa() -> None:
    """CUDA tensors of every dtype get `via_sdpa` (faster on an H200 than the Triton kernel, which runs on
    fp32/fp16/bf16 when forced)."""
    for dtype in DTYPES:
        assert _dispatch._AUTO[OP, "cuda", dtype] is separate_op.via_sdpa, dtype
    triton_fn = _dispatch._REGISTRY["triton"].kernels[OP]
    assert set(triton_fn.dtypes) == {torch.float32, torch.float16, torch.bfloat16}
