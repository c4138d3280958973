"""`add_layer_norm`: a residual add and the LayerNorm after it in one pass (a pre-norm block's `x = x + f(norm(x))`
followed by the next norm; a post-norm block's `LayerNorm(x + f(x))`).

Kernel: csrc/cpu/add_layer_norm.cpp (AVX-512; 1.3-1.7x ATen's add + layer_norm at ViT-S/B rows on this CPU),
forward only: with a gradient to record, `_Backward` below runs its twin `add_layer_norm_stats` (the norm's mean
and rstd too) and differentiates it through ATen's layer_norm backward, so a model's forward is the same whether
or not it records one, eager or compiled. `reference` below is the oracle and the path of CUDA (ATen's two
kernels, which inductor fuses itself under torch.compile; no Triton kernel yet).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _dispatch, _ops
from .._common import FLOAT_DTYPES, check_float

OP = "add_layer_norm"
STATS_OP = "add_layer_norm_stats"  # the kernel's twin that also returns the norm's mean and rstd


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual and LayerNorm(s) over the last dim, s read once.

    x, residual: (..., D), one shape and dtype (fp32/bf16/fp16/fp64); weight, bias: (D,) in that dtype, or None.
    Returns (s, out), both (..., D) in x's dtype; s is rounded to the dtype before it is normalised, as in the
    two-op form. Differentiable in every tensor.

    Equivalent to::

        s = x + residual; out = F.layer_norm(s, (D,), weight, bias, eps)
    """
    check(x, residual, weight, bias, eps)
    return run_checked(x, residual, weight, bias, eps)


def run_checked(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """add_layer_norm without `check`, for a caller that has established what it checks (skd/models/residual.py
    fuses only plain LayerNorms over x's last dim with matching dtypes and devices): its ~4 µs are the fused
    op's whole gain at a small model's sizes."""
    fn = _dispatch.kernel(OP, x.device, x.dtype)
    # the reference records its own gradient; needs_grad is also True while torch.compile traces
    if fn is not reference and _dispatch.needs_grad(x, residual, weight, bias):
        return _Backward.apply(x, residual, weight, bias, eps)
    return fn(x, residual, weight, bias, eps)


def check(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> None:
    """Raises ValueError naming the bad argument."""
    check_float("x", x)
    check_float("residual", residual)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., D)")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    d = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_float(name, t)
        if t.shape != (d,):
            raise ValueError(f"{name} must be ({d},), x's last dim, got {tuple(t.shape)}")
    tensors = [t for t in (residual, weight, bias) if t is not None]
    if any(t.dtype != x.dtype for t in tensors):
        raise ValueError(f"x, residual, weight and bias must share a dtype, got "
                         f"{[str(t.dtype) for t in (x, *tensors)]}")
    if any(t.device != x.device for t in tensors):
        raise ValueError("x, residual, weight and bias must be on one device")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")


def reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, LayerNorm(x + residual)) in plain PyTorch. x, residual (..., D); weight, bias (D,) or None."""
    s = x + residual
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


class _Backward(torch.autograd.Function):
    """The CPU kernel's forward (its twin, which also returns the norm's mean and rstd) with LayerNorm's gradient:
    d/dx = d/dresidual = grad_s + layer_norm_backward(grad_out), from the stored sum, mean and rstd (before session
    17 ATen recomputed them: a LayerNorm forward more per norm in every training step)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        s, out, mean, rstd = torch.ops.skd_kernels.add_layer_norm_stats(x, residual, weight, bias, eps)
        ctx.save_for_backward(s, mean, rstd, weight, bias)
        return s, out

    @staticmethod
    def backward(ctx: object, grad_s: torch.Tensor | None, grad_out: torch.Tensor | None) -> tuple:
        s, mean, rstd, weight, bias = ctx.saved_tensors
        grad_w = grad_b = None
        if grad_out is not None:
            mask = [True, weight is not None and ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3]]
            grad_in, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
                grad_out.contiguous(), s, [s.shape[-1]], mean, rstd, weight, bias, mask)
            grad_s = grad_in if grad_s is None else grad_s + grad_in
        return grad_s, grad_s, grad_w, grad_b, None


def fake(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output metadata of the compiled op (FakeTensorMode, opcheck)."""
    torch._check(x.shape == residual.shape, lambda: "x and residual of one shape")
    return x.new_empty(x.shape), x.new_empty(x.shape)


def fake_stats(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output metadata of `add_layer_norm_stats`: `fake`'s, and mean and rstd (..., 1) in x's dtype."""
    stat = (*x.shape[:-1], 1)
    return (*fake(x, residual, weight, bias, eps), x.new_empty(stat), x.new_empty(stat))


if _ops.has_schema(OP):
    torch.library.register_fake(f"skd_kernels::{OP}")(fake)
if _ops.has_schema(STATS_OP):
    torch.library.register_fake(f"skd_kernels::{STATS_OP}")(fake_stats)

_dispatch.register_op(OP, {
    "cuda": "not implemented: CUDA runs the reference's two ATen kernels",
    "triton": "not implemented: CUDA runs the reference's two ATen kernels",
    "cpu": _dispatch.compiled(OP, "CPU"),
    "reference": _dispatch.Kernel(reference, FLOAT_DTYPES),
})
