"""`prefix_attention`: multi-head attention over the first r dims of every head, read from and written to
skd's rank-major prefix layout, so an elastic block needs no activation copy around its attention.

Layouts (H heads, width r per head):
    qkv (S, N, r·3·H): column j·3H + w·H + h holds rank j of head h of w ∈ {0: q, 1: k, 2: v} — the output
        of the qkv prefix GEMM on rank-major rows (skd.ElasticViT's layout; every width r is a prefix).
    out (S, N, r·H): column j·H + h — the rank-major column order the proj prefix GEMM reads.

Kernels: csrc/cpu/prefix_attention.cpp (flash-style, packed tiles through MKL or oneDNN's brgemm, AVX-512
softmax where the CPU has it), skd_kernels/triton/prefix_attention.py (CUDA when forced, or CPU under
TRITON_INTERPRET=1), and on CUDA by default `via_sdpa` below: one copy of qkv to head-major order, torch's
SDPA (flash / memory-efficient kernels, their fused backward), one copy back. On an H200 the Triton kernel
ran at 0.26-0.51x the speed of that path (benchmarks/RESULTS.md, "H200, session 5" and "session 10"), so the
CUDA backend is that composite and Triton runs only when forced; there is no CUDA C++ kernel.
skd.ElasticViT's attention without the op runs `via_sdpa` too (with its rank masks and attention dropout).
skd_kernels/ops/prefix_attention_separate.py is the same op on separate q, k, v tensors (the same kernels;
it shares the checks, probabilities, copies and backward below).
`reference` below is the oracle and last fallback; the backward (plain PyTorch, recomputing the
probabilities) is shared by the compiled and Triton ops.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .. import _dispatch, _ops
from .._common import FLOAT_DTYPES, accumulation_dtype, check_float

OP = "prefix_attention"


def prefix_attention(
    qkv: torch.Tensor, num_heads: int, scale: float, attn_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q_h k_hᵀ · scale + attn_bias[:, h]) v_h for every head h, on the rank-major prefix layout.

    qkv: (S, N, r·3·H), column j·3H + w·H + h = rank j of head h of w ∈ {q, k, v} (any strides); r is
    qkv's width / (3·num_heads) and may be 0. scale: the full head's 1/sqrt(head_dim), not 1/sqrt(r).
    attn_bias: (S or 1, H or 1, N, N) additive bias in qkv's dtype (e.g. Swin's relative position bias
    plus shift mask), or None. fp32/bf16/fp16/fp64; accumulation in fp32 (fp64 for fp64).
    Returns (S, N, r·H) in qkv's dtype, column j·H + h (the proj's rank-major input); zeros (S, N, 0)
    for r = 0. Differentiable in qkv and attn_bias. No attention dropout.

    Equivalent to::

        q, k, v = qkv.unflatten(-1, (r, 3, H)).permute(3, 0, 4, 1, 2)            # each (S, H, N, r)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)
        out = o.permute(0, 2, 3, 1).reshape(S, N, r * H)
    """
    check(qkv, num_heads, scale, attn_bias)
    return _dispatch.kernel(OP, qkv.device, qkv.dtype)(qkv, num_heads, float(scale), attn_bias)


def check(qkv: torch.Tensor, num_heads: int, scale: float, attn_bias: torch.Tensor | None) -> None:
    """Shape, dtype and device checks (ValueError naming the argument); values are not scanned."""
    check_float("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be 3-D (S, N, r*3*H), got shape {tuple(qkv.shape)}")
    check_heads_and_scale(num_heads, scale)
    if qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv's width {qkv.shape[-1]} must be a multiple of 3 * num_heads = {3 * num_heads}")
    check_bias(attn_bias, "qkv", qkv, num_heads)


def check_heads_and_scale(num_heads: int, scale: float) -> None:
    """num_heads a positive int, scale a finite real (ValueError naming the argument)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads={num_heads!r} must be a positive int")
    # abs(scale) < inf rather than math.isfinite: False for NaN too, and it traces for a symbolic float
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not abs(scale) < math.inf:
        raise ValueError(f"scale={scale!r} must be a finite real number")


def check_bias(attn_bias: torch.Tensor | None, name: str, x: torch.Tensor, num_heads: int) -> None:
    """attn_bias None or (S or 1, H or 1, N, N) in the dtype and on the device of input `name`, x (S, N, C)."""
    if attn_bias is None:
        return
    check_float("attn_bias", attn_bias)
    s, n, _ = x.shape
    b = tuple(attn_bias.shape)
    if len(b) != 4 or b[0] not in (1, s) or b[1] not in (1, num_heads) or b[2:] != (n, n):
        raise ValueError(f"attn_bias must be (S or 1, H or 1, N, N) = ({s} or 1, {num_heads} or 1, {n}, {n}), "
                         f"got {b}")
    if attn_bias.dtype != x.dtype:
        raise ValueError(f"attn_bias must have {name}'s dtype {x.dtype}, got {attn_bias.dtype}")
    if attn_bias.device != x.device:
        raise ValueError(f"attn_bias must be on {name}'s device {x.device}, got {attn_bias.device}")


def _heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of every head, each (S, H, N, r) in the accumulation dtype."""
    s, n, c = qkv.shape
    r = c // (3 * num_heads)
    return qkv.to(accumulation_dtype(qkv.dtype)).reshape(s, n, r, 3, num_heads).permute(3, 0, 4, 1, 2).unbind(0)


def probabilities(q: torch.Tensor, k: torch.Tensor, scale: float, attn_bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q kᵀ · scale + bias): (S, H, N, N) in q's dtype."""
    scores = q @ k.transpose(-1, -2) * scale
    if attn_bias is not None:
        scores = scores + attn_bias.to(q.dtype)
    return scores.softmax(-1)


def reference(
    qkv: torch.Tensor, num_heads: int, scale: float, attn_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """prefix_attention in plain PyTorch, computed in fp32 (fp64 for fp64 input).

    qkv: (S, N, r·3·H) rank-major; attn_bias: (S or 1, H or 1, N, N) or None. Returns (S, N, r·H) in
    qkv's dtype, column j·H + h.
    """
    q, k, v = _heads(qkv, num_heads)
    return rank_major(probabilities(q, k, scale, attn_bias) @ v).to(qkv.dtype)


def rank_major(o: torch.Tensor) -> torch.Tensor:
    """(S, H, N, r) -> (S, N, r·H), column j·H + h."""
    s, h, n, r = o.shape
    return o.permute(0, 2, 3, 1).reshape(s, n, r * h)


def head_major(y: torch.Tensor, r: int, cols: int) -> torch.Tensor:
    """y (..., r·cols) rank-major (column j·cols + c: rank j of column group c) -> (..., cols, r) dense, each
    group's r dims contiguous, in one copy (per token, cache-local: 2.5x cheaper on ViT-B than gathering
    straight into (3, S, H, N, r)). Not `.contiguous()`: at r = 1 the transpose already counts as contiguous
    and keeps a last-dim stride of `cols`, which CUDA's SDPA rejects ("Input tensor must have contiguous last
    dimension", on an H200)."""
    return y.unflatten(-1, (r, cols)).transpose(-1, -2).clone(memory_format=torch.contiguous_format)


def via_sdpa(qkv: torch.Tensor, num_heads: int, scale: float, attn_bias: torch.Tensor | None = None,
             dropout_p: float = 0.0, rank_mask: torch.Tensor | None = None) -> torch.Tensor:
    """prefix_attention through torch's scaled_dot_product_attention: qkv copied head-major (`head_major`),
    SDPA on per-head views, the output copied back rank-major. Plain PyTorch, so autograd records SDPA's
    fused backward and torch.compile traces it. The op's CUDA kernel; ElasticViT's attention where it copies
    activations.

    qkv (S, N, r·3·H), attn_bias (S or 1, H or 1, N, N) | None as in `prefix_attention` (unchecked);
    dropout_p: SDPA's attention dropout; rank_mask: (r,) multiplier of every head's q, k and v rank dims, in
    qkv's dtype, or None. Returns (S, N, r·H) rank-major in qkv's dtype; zeros (S, N, 0) for r = 0.
    """
    s, n, c = qkv.shape
    h = num_heads
    r = c // (3 * h)
    if r == 0:
        return qkv.new_zeros(s, n, 0)
    heads = head_major(qkv, r, 3 * h)  # (S, N, 3H, r)
    if rank_mask is not None:
        heads = heads * rank_mask
    q, k, v = heads.view(s, n, 3, h, r).permute(2, 0, 3, 1, 4).unbind(0)  # each (S, H, N, r) views
    return rank_major(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale))


def fake(qkv: torch.Tensor, num_heads: int, scale: float, attn_bias: torch.Tensor | None) -> torch.Tensor:
    """Output metadata of the compiled and Triton ops (torch.compile, FakeTensorMode)."""
    torch._check(qkv.dim() == 3, lambda: "qkv must be (S, N, r*3*H)")
    torch._check(qkv.shape[-1] % (3 * num_heads) == 0, lambda: "qkv's width must be a multiple of 3 * num_heads")
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3))


def backward(ctx: object, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None]:
    """Gradients in qkv (its layout) and attn_bias (summed over its broadcast dims), in plain PyTorch.

    Recomputes the probabilities p from qkv (nothing (S, H, N, N) is kept from the forward); then
    dv = pᵀ do, ds = p ⊙ (do vᵀ − rowsum(do ⊙ o)), dq = ds k · scale, dk = dsᵀ q · scale.
    """
    qkv, attn_bias = ctx.saved_tensors
    s, n, c = qkv.shape
    q, k, v = _heads(qkv, ctx.num_heads)
    grads, grad_bias = head_grads(q, k, v, grad_out, ctx.scale, attn_bias, ctx.needs_input_grad[0],
                                  ctx.needs_input_grad[3])
    grad_qkv = None if grads is None else torch.stack(grads).permute(1, 3, 4, 0, 2).reshape(s, n, c).to(qkv.dtype)
    return grad_qkv, None, None, grad_bias


def head_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, scale: float,
    attn_bias: torch.Tensor | None, need_inputs: bool, need_bias: bool,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """((dq, dk, dv) each (S, H, N, r) in q's dtype, or None; grad of attn_bias, summed over its broadcast
    dims, in its dtype, or None) for q, k, v (S, H, N, r) and grad_out (S, N, r·H) rank-major."""
    s, h, n, r = q.shape
    p = probabilities(q, k, scale, attn_bias)
    do = grad_out.to(q.dtype).reshape(s, n, r, h).permute(0, 3, 1, 2)  # (S, H, N, r)
    dp = do @ v.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    grads = grad_bias = None
    if need_inputs:
        grads = (ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ do)
    if attn_bias is not None and need_bias:
        broadcast = [d for d in (0, 1) if attn_bias.shape[d] == 1]
        grad_bias = (ds.sum(broadcast, keepdim=True) if broadcast else ds).to(attn_bias.dtype)
    return grads, grad_bias


def setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    qkv, num_heads, scale, attn_bias = inputs
    ctx.save_for_backward(qkv, attn_bias)
    ctx.num_heads, ctx.scale = num_heads, scale


def register_autograd(qualname: str) -> None:
    """Attach prefix_attention's backward to a registered operator (compiled or Triton)."""
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


_ops.register_differentiable(OP, fake, register_autograd)

_dispatch.register_op(OP, {
    "cuda": _dispatch.Kernel(via_sdpa, FLOAT_DTYPES),
    "triton": _dispatch.triton(OP),
    "cpu": _dispatch.compiled(OP, "CPU"),
    "reference": _dispatch.Kernel(reference, FLOAT_DTYPES),
})
