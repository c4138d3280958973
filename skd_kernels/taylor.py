"""`taylor_scores`: first-order Taylor token and channel importance in one pass over (act, grad)."""

from __future__ import annotations

import torch

from ._dispatch import select
from ._validate import check_finite_result, check_taylor


def taylor_scores(act: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and channel Taylor scores of a feature and the loss gradient w.r.t. it.

    act, grad: (B, T, C) fp32/bf16/fp16/fp64 (B samples, T tokens, C channels), same shape.
    Returns token (B, T) fp32 = |Σ_c g·a| and channel (C,) fp32 = Σ_b |Σ_t g·a| (float64 for float64 act).

    Equivalent to::

        p = grad.float() * act.float()
        token, channel = p.sum(-1).abs(), p.sum(1).abs().sum(0)
    """
    check_taylor(act, grad)
    if grad.dtype != act.dtype:
        grad = grad.to(act.dtype)
    token, channel = select(act.device, act.dtype).taylor_scores(act, grad)
    check_finite_result((token, channel), {"act": act, "grad": grad})
    return token, channel
