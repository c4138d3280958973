"""`taylor_scores`: first-order Taylor token and channel importance in one pass over (act, grad).

Kernels: csrc/cpu/taylor_scores.cpp, csrc/cuda/taylor_scores.cu, skd_kernels/triton/taylor_scores.py;
`reference` below is the oracle and last fallback.
"""

from __future__ import annotations

import torch

from .. import _dispatch, _ops
from .._common import FLOAT_DTYPES, accumulation_dtype, check_finite_result, check_float

OP = "taylor_scores"


def taylor_scores(act: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and channel Taylor scores of a feature and the loss gradient w.r.t. it.

    act, grad: (B, T, C) fp32/bf16/fp16/fp64 (B samples, T tokens, C channels), same shape.
    Returns token (B, T) fp32 = |Σ_c g·a| and channel (C,) fp32 = Σ_b |Σ_t g·a| (float64 for float64 act).

    Equivalent to::

        p = grad.float() * act.float()
        token, channel = p.sum(-1).abs(), p.sum(1).abs().sum(0)
    """
    check(act, grad)
    if grad.dtype != act.dtype:
        grad = grad.to(act.dtype)
    token, channel = _dispatch.kernel(OP, act.device, act.dtype)(act, grad)
    # Every NaN/Inf of act or grad reaches a channel score; an overflow may show in either output.
    check_finite_result((token, channel), {"act": act, "grad": grad}, token.dtype)
    return token, channel


def check(act: torch.Tensor, grad: torch.Tensor) -> None:
    """Raises ValueError naming the bad argument."""
    check_float("act", act)
    check_float("grad", grad)
    if act.dim() != 3:
        raise ValueError(f"act must be 3-D (B, T, C), got shape {tuple(act.shape)}")
    if grad.shape != act.shape:
        raise ValueError(f"grad must have act's shape {tuple(act.shape)}, got {tuple(grad.shape)}")
    if act.device != grad.device:
        raise ValueError(f"act and grad must be on one device, got {act.device} and {grad.device}")
    # NaN/Inf in act or grad reach the scores, which check_finite_result inspects: no extra pass here.


def reference(act: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order Taylor scores in plain PyTorch.

    act, grad: (B, T, C) fp32/bf16/fp16.
    Returns token (B, T) fp32 = |Σ_c g·a| and channel (C,) fp32 = Σ_b |Σ_t g·a|; float64 for float64 input.
    """
    acc = accumulation_dtype(act.dtype)
    prod = grad.to(acc) * act.to(acc)
    return prod.sum(-1).abs(), prod.sum(1).abs().sum(0)


def fake(act: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output metadata of every backend's kernel (torch.compile, FakeTensorMode)."""
    torch._check(act.dim() == 3 and act.shape == grad.shape, lambda: "act, grad (B, T, C) of one shape")
    b, t, c = act.shape
    acc = accumulation_dtype(act.dtype)
    return act.new_empty((b, t), dtype=acc), act.new_empty((c,), dtype=acc)


if _ops.has_schema(OP):
    torch.library.register_fake(f"skd_kernels::{OP}")(fake)

_dispatch.register_op(OP, {
    "cuda": _dispatch.compiled(OP, "CUDA"),
    "triton": _dispatch.triton(OP),
    "cpu": _dispatch.compiled(OP, "CPU"),
    "reference": _dispatch.Kernel(reference, FLOAT_DTYPES),
})
