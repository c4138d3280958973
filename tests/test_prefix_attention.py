"""prefix_attention on every CPU-usable backend against skd_kernels.reference: forward over dtypes and odd
sizes, with and without bias, non-contiguous inputs, r = 0, gradients (gradcheck in float64), opcheck, no
activation copy and bad input; and `via_sdpa` (copies + SDPA: the CUDA kernel, and ElasticViT's attention
where it copies activations) against the same reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_helpers import (
    BACKENDS,
    LOW_PRECISION,
    OUTPUT_TOL,
    assert_close,
    backend_dtype_shape_params,
    largest_cpu_allocation,
    padding_mask,
    scale,
    supports,
)

import skd_kernels
from skd_kernels import _dispatch, reference
from skd_kernels.ops import prefix_attention as prefix_attention_op

# (S, N, H, r, big): every r in {1, 3, 8, 32} x N in {1, 5, 197} x H in {1, 3, 6}; N = 197 is big (the
# Triton interpreter runs the same code paths on the small N).
SHAPES = [(2, n, h, r, n > 64) for r, n, h in itertools.product((1, 3, 8, 32), (1, 5, 197), (1, 3, 6))]
SCALE = 0.37  # not 1/sqrt(r): the op takes the full head's scale


def _qkv(s: int, n: int, h: int, r: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(s, n, r * 3 * h).to(dtype)


def _bias(s: int, n: int, h: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(s, h, n, n).to(dtype)


def _check(out: torch.Tensor, qkv: torch.Tensor, h: int, bias: torch.Tensor | None, label: str) -> None:
    want = reference.prefix_attention(qkv, h, SCALE, bias)
    rtol, atol = OUTPUT_TOL[qkv.dtype]
    assert_close(label, out, want, rtol=rtol, atol=atol * scale(want))


def _run(backend: str, qkv: torch.Tensor, h: int, bias: torch.Tensor | None) -> torch.Tensor:
    with skd_kernels.use_backend(backend):
        return skd_kernels.prefix_attention(qkv, h, SCALE, bias)


# (S, N, H, r): one token and r = 1, odd N and r, ViT-S heads at N = 197, r = 32
VIA_SDPA_SHAPES = [(2, 1, 1, 1), (3, 11, 4, 5), (2, 197, 6, 8), (1, 65, 3, 32)]


@pytest.mark.parametrize("dtype", (torch.float32, *LOW_PRECISION, torch.float64))
@pytest.mark.parametrize(("s", "n", "h", "r"), VIA_SDPA_SHAPES)
def test_via_sdpa_matches_reference(dtype: torch.dtype, s: int, n: int, h: int, r: int) -> None:
    """`via_sdpa` (the op's CUDA kernel; ElasticViT's attention where it copies activations) on CPU: contiguous
    and strided qkv, without bias, with a per-head one and with a padding mask, equal the reference."""
    c = 3 * h * r
    for qkv in (_qkv(s, n, h, r, dtype), torch.randn(s, n, c + 5).to(dtype)[..., :c]):
        for bias in (None, _bias(s, n, h, dtype), padding_mask(s, n, dtype)):
            out = prefix_attention_op.via_sdpa(qkv, h, SCALE, bias)
            assert out.shape == (s, n, r * h) and out.dtype == dtype
            _check(out, qkv, h, bias, f"via_sdpa {dtype} qkv{tuple(qkv.stride())} bias={bias is not None}")


def test_via_sdpa_rank_mask_zero_width_and_gradients() -> None:
    """`via_sdpa`'s rank mask multiplies every head's q, k and v at each rank (the reference on masked qkv);
    r = 0 gives (S, N, 0); fp32 gradients in qkv and a broadcast bias equal autograd through the reference."""
    s, n, h, r = 3, 9, 4, 5
    qkv, bias = _qkv(s, n, h, r, torch.float32), torch.randn(1, h, n, n)
    mask = torch.rand(r) + 0.5
    masked = (qkv.view(s, n, r, 3 * h) * mask[:, None]).view(s, n, -1)  # rank-major: column j*3H + c is rank j
    _check(prefix_attention_op.via_sdpa(qkv, h, SCALE, bias, 0.0, mask), masked, h, bias, "via_sdpa masked")
    assert prefix_attention_op.via_sdpa(torch.randn(2, 7, 0), 3, SCALE).shape == (2, 7, 0)
    grads = []
    for fn in (prefix_attention_op.via_sdpa, reference.prefix_attention):
        leaves = [t.clone().requires_grad_() for t in (qkv, bias)]
        out = fn(leaves[0], h, SCALE, leaves[1])
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads.append([t.grad for t in leaves])
    for label, got, want in zip(("qkv", "bias"), *grads, strict=True):
        assert_close(f"via_sdpa grad {label}", got, want, rtol=1e-4, atol=1e-5 * scale(want))


def test_cuda_runs_via_sdpa_and_triton_only_when_forced() -> None:
    """CUDA tensors of every dtype get `via_sdpa` (faster on an H200 than the Triton kernel, which stays
    registered for `use_backend("triton")`)."""
    for dtype in (torch.float32, *LOW_PRECISION, torch.float64):
        assert _dispatch._AUTO[prefix_attention_op.OP, "cuda", dtype] is prefix_attention_op.via_sdpa, dtype
    assert prefix_attention_op.OP in _dispatch._REGISTRY["triton"].kernels


@pytest.mark.parametrize(("backend", "dtype", "s", "n", "h", "r", "big"),
                         backend_dtype_shape_params((torch.float32, *LOW_PRECISION, torch.float64), SHAPES))
def test_matches_reference(backend: str, dtype: torch.dtype, s: int, n: int, h: int, r: int, big: bool) -> None:
    qkv = _qkv(s, n, h, r, dtype)
    for bias in (None, _bias(s, n, h, dtype)):
        out = _run(backend, qkv, h, bias)
        assert out.shape == (s, n, r * h)
        _check(out, qkv, h, bias, f"{backend}/{dtype} bias={bias is not None}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_width_gives_empty_output(backend: str) -> None:
    qkv = torch.randn(2, 7, 0)
    out = _run(backend, qkv, 3, _bias(2, 7, 3, torch.float32))
    assert out.shape == (2, 7, 0) and out.dtype == qkv.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_broadcast_bias(backend: str) -> None:
    s, n, h, r = 2, 9, 3, 4
    c = 3 * h * r
    wide = torch.randn(s, n, c + 5)[..., :c]  # token stride c + 5
    tokens_first = torch.randn(n, s, c).transpose(0, 1)  # sequence stride c
    column_strided = torch.randn(s, n, 2 * c)[..., ::2]  # column stride 2 (copied, not misread)
    bias_t = torch.randn(s, h, n, n).transpose(2, 3)  # key stride n
    shared = torch.randn(1, h, n, n)  # one bias for every sequence (Swin's relative position bias)
    expanded = torch.randn(1, 1, n, n).expand(s, h, n, n)  # stride 0 in S and H
    one_for_all = torch.randn(1, 1, n, n)
    for qkv, bias in itertools.product((wide, tokens_first, column_strided),
                                       (None, bias_t, shared, expanded, one_for_all)):
        assert not qkv.is_contiguous()
        label = f"{backend} qkv{tuple(qkv.stride())} bias{None if bias is None else tuple(bias.stride())}"
        _check(_run(backend, qkv, h, bias), qkv, h, bias, label)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if supports(b, torch.float64)])
def test_gradcheck_float64(backend: str) -> None:
    s, n, h, r = 2, 4, 2, 3
    qkv = _qkv(s, n, h, r, torch.float64).requires_grad_()
    for bias in (None, torch.randn(1, h, n, n, dtype=torch.float64), torch.randn(s, 1, n, n, dtype=torch.float64)):
        inputs = (qkv,) if bias is None else (qkv, bias.requires_grad_())

        def fn(qkv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            with skd_kernels.use_backend(backend):
                return skd_kernels.prefix_attention(qkv, h, SCALE, bias)

        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference(backend: str) -> None:
    """fp32 gradients in qkv and a broadcast bias (every backend, Triton included) equal autograd through
    the reference."""
    s, n, h, r = 3, 6, 2, 5
    qkv, bias = _qkv(s, n, h, r, torch.float32), torch.randn(1, h, n, n)
    grads = {}
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (qkv, bias)]
        out = _run(name, *leaves[:1], h, leaves[1])
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads[name] = [t.grad for t in leaves]
    for label, got, want in zip(("qkv", "bias"), grads[backend], grads["reference"], strict=True):
        assert_close(f"{backend} grad {label}", got, want, rtol=1e-4, atol=1e-5 * scale(want))


def _opcheck_args() -> list[tuple]:
    qkv, bias = _qkv(2, 5, 3, 2, torch.float32), _bias(2, 5, 3, torch.float32)
    return [
        (qkv, 3, SCALE, None),
        (qkv.requires_grad_(), 3, SCALE, bias.requires_grad_()),
        (qkv.detach().bfloat16(), 3, SCALE, bias.detach()[:1].bfloat16()),
        (torch.randn(2, 5, 0), 3, SCALE, None),
    ]


def test_opcheck_compiled_op() -> None:
    for args in [*_opcheck_args(), (_qkv(1, 3, 2, 2, torch.float64), 2, SCALE, None)]:
        torch.library.opcheck(torch.ops.skd_kernels.prefix_attention.default, args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
def test_opcheck_triton_op() -> None:
    from skd_kernels.triton import prefix_attention as _  # noqa: F401 (registers the op)

    for args in _opcheck_args():
        torch.library.opcheck(torch.ops.skd_kernels.triton_prefix_attention.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_allocates_only_its_output(dtype: torch.dtype) -> None:
    """No activation copy: the largest tensor allocation is the (S, N, r*H) output, a third of qkv."""
    s, n, h, r = 4, 64, 6, 16
    qkv, bias = _qkv(s, n, h, r, dtype), _bias(1, n, h, dtype)
    largest = largest_cpu_allocation(lambda: _run("cpu", qkv, h, bias))
    out_bytes = s * n * r * h * qkv.element_size()
    print(f"largest allocation {largest} B, output {out_bytes} B, qkv {qkv.numel() * qkv.element_size()} B")
    assert 0 < largest <= out_bytes


def _bad(kwargs: dict[str, object]) -> dict[str, object]:
    return {"qkv": _qkv(2, 5, 3, 2, torch.float32), "num_heads": 3, "scale": SCALE, "attn_bias": None, **kwargs}


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"qkv": torch.randn(10, 18)}, "qkv"),
        ({"qkv": torch.randn(2, 5, 17)}, "qkv"),
        ({"qkv": torch.randn(2, 5, 18).int()}, "qkv"),
        ({"num_heads": 0}, "num_heads"),
        ({"num_heads": 2.0}, "num_heads"),
        ({"scale": float("nan")}, "scale"),
        ({"scale": "0.1"}, "scale"),
        ({"attn_bias": torch.randn(2, 3, 5, 4)}, "attn_bias"),
        ({"attn_bias": torch.randn(3, 3, 5, 5)}, "attn_bias"),
        ({"attn_bias": torch.randn(2, 2, 5, 5)}, "attn_bias"),
        ({"attn_bias": torch.randn(3, 5, 5)}, "attn_bias"),
        ({"attn_bias": torch.randn(2, 3, 5, 5, dtype=torch.float64)}, "attn_bias"),
    ],
    ids=["2d-qkv", "width-not-3H", "int-qkv", "zero-heads", "float-heads", "nan-scale", "str-scale",
         "bias-keys", "bias-batch", "bias-heads", "3d-bias", "bias-dtype"],
)
def test_bad_input_raises_naming_argument(kwargs: dict[str, object], arg: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        skd_kernels.prefix_attention(**_bad(kwargs))


def test_one_compiled_graph_serves_every_width() -> None:
    """The fake kernel takes the width from qkv's (symbolic) shape: torch.compile traces the op once for
    four widths r, and the compiled results equal the reference."""
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda qkv, bias: skd_kernels.prefix_attention(qkv, 3, SCALE, bias),
                       backend=counter, dynamic=True, fullgraph=True)
    bias = _bias(1, 9, 3, torch.float32)
    for r in (4, 8, 12, 16):
        qkv = _qkv(2, 9, 3, r, torch.float32)
        _check(fn(qkv, bias), qkv, 3, bias, f"compiled r={r}")
    assert counter.frame_count == 1


def _masked_bias(s: int, n: int, h: int, dtype: torch.dtype) -> torch.Tensor:
    """Scores shifted by tens (exps underflow to 0, row maxima far from 0) and about half the keys at -inf
    (masked out), every row keeping key 0."""
    bias = torch.randn(s, h, n, n) * 30
    bias.masked_fill_(torch.rand(s, h, n, n) < 0.5, float("-inf"))
    bias[..., 0] = 0
    return bias.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize(("s", "n", "h", "r"), [(2, 37, 3, 8), (1, 700, 6, 64), (1, 300, 64, 16)],
                         ids=["tail-lanes", "two-key-tiles", "two-key-tiles-small-r"])
def test_cpu_masked_keys_and_large_scores(dtype: torch.dtype, s: int, n: int, h: int, r: int) -> None:
    """The CPU kernel's own exp and online softmax: 37 keys leave a partial vector; 700 keys at H*r = 384 and
    300 keys at H*r = 1024 split into two key tiles (the running max and sum rescaled between them; bf16
    through brgemm on AVX-512 CPUs, accumulating into its output)."""
    qkv = (_qkv(s, n, h, r, torch.float32) * 3).to(dtype)
    for bias in (None, _masked_bias(s, n, h, dtype)):
        out = _run("cpu", qkv, h, bias)
        assert torch.isfinite(out).all()
        _check(out, qkv, h, bias, f"{dtype} bias={bias is not None}")


def test_cpu_avx2_path_matches_reference() -> None:
    """On an AVX-512 CPU the kernel takes its AVX-512 softmax; SKD_CPU_AVX2_ONLY=1 forces the AVX2 one, which
    the CPU-backend tests above then check in a fresh process."""
    import os
    import subprocess
    import sys

    tests = "cpu and (matches_reference or masked_keys or non_contiguous) and not avx2"
    env = {**os.environ, "SKD_CPU_AVX2_ONLY": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


# (S, N, H, r): bf16 through brgemm with k^T and v packed straight from the rank-major operands: odd r (a zero
# rank pads K), N not a multiple of 64 or of 2 (padded key blocks, an odd second-product K), H not a multiple
# of 8 (masked head groups), r above 64 (two v column blocks), and N = 300 at H*r = 2080 (three key tiles).
BRGEMM_SHAPES = [(2, 67, 5, 21), (1, 130, 12, 42), (1, 197, 9, 64), (2, 50, 3, 80), (1, 300, 16, 130)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
@pytest.mark.parametrize(("s", "n", "h", "r"), BRGEMM_SHAPES, ids=[f"{s}x{n}x{h}x{r}" for s, n, h, r in BRGEMM_SHAPES])
def test_cpu_bf16_brgemm_tails(fused: bool, s: int, n: int, h: int, r: int) -> None:
    """The bf16 brgemm path's packing edges against the reference, on token-strided inputs (rows padded by 5
    columns), with no bias, a random bias and the masked large-score bias."""
    dtype = torch.bfloat16
    wide = (torch.randn(3, s, n, r * h + 5) * 3).to(dtype)
    q, k, v = wide[..., : r * h]
    qkv = torch.randn(s, n, r * 3 * h + 5).mul(3).to(dtype)[..., : r * 3 * h]
    for bias in (None, _bias(s, n, h, dtype), _masked_bias(s, n, h, dtype)):
        if fused:
            out, want = _run("cpu", qkv, h, bias), reference.prefix_attention(qkv, h, SCALE, bias)
        else:
            with skd_kernels.use_backend("cpu"):
                out = skd_kernels.prefix_attention_separate(q, k, v, h, SCALE, bias)
            want = reference.prefix_attention_separate(q, k, v, h, SCALE, bias)
        assert torch.isfinite(out).all()
        rtol, atol = OUTPUT_TOL[dtype]
        assert_close(f"fused={fused} bias={bias is not None}", out, want, rtol=rtol, atol=atol * scale(want))


def test_cpu_bf16_without_native_conversion_matches_reference() -> None:
    """On a CPU with AVX512_BF16 the softmax rounds probabilities with vcvtneps2bf16; SKD_CPU_NO_AVX512_BF16=1
    forces its integer rounding, which the bf16 CPU tests above then check in a fresh process."""
    import os
    import subprocess
    import sys

    tests = "cpu and (bfloat16 and (matches_reference or masked_keys) or brgemm) and not native"
    env = {**os.environ, "SKD_CPU_NO_AVX512_BF16": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
