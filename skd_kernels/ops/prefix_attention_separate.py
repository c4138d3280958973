"""`prefix_attention_separate`: prefix_attention (skd_kernels/ops/prefix_attention.py) for models with
separate q, k and v projections (HuggingFace BERT/ViT families), read from three rank-major tensors.

Layout (H heads, width r per head): q, k, v and out each (S, N, r·H), column j·H + h = rank j of head h —
the outputs of the q, k, v prefix GEMMs on rank-major rows, and the proj's rank-major input.

Kernels: the fused op's, run on three base pointers with rank stride H instead of 3H —
csrc/cpu/prefix_attention.cpp (CPU) and skd_kernels/triton/prefix_attention.py (through
skd_kernels/triton/prefix_attention_separate.py: CUDA when forced, or CPU under TRITON_INTERPRET=1); on CUDA
by default `via_sdpa` below (copies + torch's SDPA, faster there than the Triton kernel: see the fused op's
module). `reference` is the oracle and last fallback; the backward is the fused op's plain-PyTorch one
(`head_grads`), shared by the compiled and Triton ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _dispatch, _ops
from .._common import FLOAT_DTYPES, accumulation_dtype, check_float
from .prefix_attention import check_bias, check_heads_and_scale, head_grads, head_major, probabilities, rank_major

OP = "prefix_attention_separate"


def prefix_attention_separate(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q_h k_hᵀ · scale + attn_bias[:, h]) v_h for every head h, on three rank-major tensors.

    q, k, v: (S, N, r·H) each, column j·H + h = rank j of head h (any strides, one shape, dtype and
    device); r is their width / num_heads and may be 0. scale: the full head's 1/sqrt(head_dim), not
    1/sqrt(r). attn_bias: (S or 1, H or 1, N, N) additive bias in q's dtype (e.g. a padding mask), or None.
    fp32/bf16/fp16/fp64; accumulation in fp32 (fp64 for fp64). Returns (S, N, r·H) in q's dtype, column
    j·H + h; zeros (S, N, 0) for r = 0. Differentiable in q, k, v and attn_bias. No attention dropout.

    Equivalent to::

        heads = [t.unflatten(-1, (r, H)).permute(0, 3, 1, 2) for t in (q, k, v)]   # each (S, H, N, r)
        o = F.scaled_dot_product_attention(*heads, attn_mask=attn_bias, scale=scale)
        out = o.permute(0, 2, 3, 1).reshape(S, N, r * H)
    """
    check(q, k, v, num_heads, scale, attn_bias)
    return _dispatch.kernel(OP, q.device, q.dtype)(q, k, v, num_heads, float(scale), attn_bias)


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float,
          attn_bias: torch.Tensor | None) -> None:
    """Shape, dtype and device checks (ValueError naming the argument); values are not scanned."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D (S, N, r*H), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    check_heads_and_scale(num_heads, scale)
    if q.shape[-1] % num_heads:
        raise ValueError(f"q's width {q.shape[-1]} must be a multiple of num_heads = {num_heads}")
    check_bias(attn_bias, "q", q, num_heads)


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(S, N, r·H) rank-major -> (S, H, N, r) in the accumulation dtype."""
    s, n, c = t.shape
    return t.to(accumulation_dtype(t.dtype)).reshape(s, n, c // num_heads, num_heads).permute(0, 3, 1, 2)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """prefix_attention_separate in plain PyTorch, computed in fp32 (fp64 for fp64 input).

    q, k, v: (S, N, r·H) rank-major; attn_bias: (S or 1, H or 1, N, N) or None. Returns (S, N, r·H) in q's
    dtype, column j·H + h.
    """
    qh, kh, vh = (_heads(t, num_heads) for t in (q, k, v))
    return rank_major(probabilities(qh, kh, scale, attn_bias) @ vh).to(q.dtype)


def via_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float,
             attn_bias: torch.Tensor | None = None, dropout_p: float = 0.0,
             rank_mask: torch.Tensor | None = None) -> torch.Tensor:
    """prefix_attention_separate through torch's scaled_dot_product_attention: q, k and v each copied
    head-major (`head_major`), SDPA, the output copied back rank-major; plain PyTorch (the fused op's
    `via_sdpa`). q, k, v (S, N, r·H), attn_bias as in `prefix_attention_separate` (unchecked); dropout_p: SDPA's
    attention dropout; rank_mask: (r,) multiplier of every head's rank dims, in q's dtype, or None. Returns
    (S, N, r·H) rank-major in q's dtype; zeros (S, N, 0) for r = 0."""
    s, n, c = q.shape
    h = num_heads
    r = c // h
    if r == 0:
        return q.new_zeros(s, n, 0)
    heads = []
    for t in (q, k, v):
        y = head_major(t, r, h)  # (S, N, H, r)
        if rank_mask is not None:
            y = y * rank_mask
        heads.append(y.transpose(1, 2))  # (S, H, N, r) view
    return rank_major(F.scaled_dot_product_attention(*heads, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale))


def fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float,
         attn_bias: torch.Tensor | None) -> torch.Tensor:
    """Output metadata of the compiled and Triton ops (torch.compile, FakeTensorMode)."""
    torch._check(q.dim() == 3, lambda: "q must be (S, N, r*H)")
    torch._check(q.shape[-1] % num_heads == 0, lambda: "q's width must be a multiple of num_heads")
    return q.new_empty(q.shape)


def backward(ctx: object, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients in q, k, v (their layout) and attn_bias (summed over its broadcast dims), in plain PyTorch,
    recomputing the probabilities (`head_grads`)."""
    q, k, v, attn_bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    heads = [_heads(t, ctx.num_heads) for t in (q, k, v)]
    grads, grad_bias = head_grads(*heads, grad_out, ctx.scale, attn_bias, any(need[:3]), need[5])
    out = [None, None, None] if grads is None else [rank_major(g).to(q.dtype) if n else None
                                                    for g, n in zip(grads, need[:3], strict=True)]
    return *out, None, None, grad_bias


def setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    q, k, v, num_heads, scale, attn_bias = inputs
    ctx.save_for_backward(q, k, v, attn_bias)
    ctx.num_heads, ctx.scale = num_heads, scale


def register_autograd(qualname: str) -> None:
    """Attach prefix_attention_separate's backward to a registered operator (compiled or Triton)."""
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


_ops.register_differentiable(OP, fake, register_autograd)

_dispatch.register_op(OP, {
    "cuda": _dispatch.Kernel(via_sdpa, FLOAT_DTYPES),
    "triton": _dispatch.triton(OP),
    "cpu": _dispatch.compiled(OP, "CPU"),
    "reference": _dispatch.Kernel(reference, FLOAT_DTYPES),
})
