"""`prefix_attention`: attention over the first r dims of every head, in skd's rank-major prefix layout."""

from __future__ import annotations

import torch


def prefix_attention_reference(
    qkv: torch.Tensor, num_heads: int, scale: float, attn_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q_h k_hᵀ · scale + bias_h) v_h for every head h, in plain PyTorch (the oracle).

    qkv: (S, N, r·3·H), column j·3H + w·H + h = rank j of head h of w ∈ {q, k, v};
    attn_bias: (S or 1, H or 1, N, N) in qkv's dtype, or None.
    Returns (S, N, r·H) in qkv's dtype, column j·H + h. Computed in fp32 (fp64 for fp64 input).
    """
    s, n, c = qkv.shape
    h = num_heads
    r = c // (3 * h)
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    q, k, v = qkv.to(acc).reshape(s, n, r, 3, h).permute(3, 0, 4, 1, 2).unbind(0)  # each (S, H, N, r)
    scores = q @ k.transpose(-1, -2) * scale
    if attn_bias is not None:
        scores = scores + attn_bias.to(acc)
    o = scores.softmax(-1) @ v  # (S, H, N, r)
    return o.permute(0, 2, 3, 1).reshape(s, n, r * h).to(qkv.dtype)
