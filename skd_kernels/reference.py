"""Plain-PyTorch reference of every skd_kernels op: the oracle for tests and the last fallback.

Each function computes one batch's contribution exactly as the kernel contracts in DESIGN.md state;
accumulation is fp32 (inputs of lower precision are upcast first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "gelu", "gelu_tanh")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and returned in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_covariance(x: torch.Tensor, w: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    """One batch of weighted second-moment statistics.

    x: (N, G*r) fp32/bf16/fp16, w: (N,) >= 0.
    Returns (weight_sum () fp32, sum (G, r) fp32 = Σ w x, sum_outer (G, r, r) fp32 = Σ w x x^T);
    float64 instead of fp32 for float64 x.
    """
    n, d = x.shape
    r = d // groups
    acc = accumulation_dtype(x.dtype)
    xf = x.to(acc).reshape(n, groups, r)
    wf = w.to(acc)
    xw = xf * wf[:, None, None]
    sum_outer = torch.einsum("ngi,ngj->gij", xw, xf)
    return wf.sum(), xw.sum(0), sum_outer


def taylor_scores(act: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order Taylor scores.

    act, grad: (B, T, C) fp32/bf16/fp16.
    Returns token (B, T) fp32 = |Σ_c g·a| and channel (C,) fp32 = Σ_b |Σ_t g·a|; float64 for float64 input.
    """
    acc = accumulation_dtype(act.dtype)
    prod = grad.to(acc) * act.to(acc)
    return prod.sum(-1).abs(), prod.sum(1).abs().sum(0)


def prefix_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k_in: int,
    k_out: int,
    activation: str = "none",
) -> torch.Tensor:
    """y = act(x[..., :k_in] @ weight[:k_out, :k_in]^T + bias[:k_out]).

    x: (..., >= k_in), weight: (out, in), bias: (out,) or None. Returns (..., k_out) in x's dtype.
    """
    y = F.linear(x[..., :k_in], weight[:k_out, :k_in], None if bias is None else bias[:k_out])
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    return y
