"""`add_layer_norm`: a residual add and the LayerNorm after it in one pass (a pre-norm block's `x = x + f(norm(x))`
followed by the next norm; a post-norm block's `LayerNorm(x + f(x))`).

Kernel: csrc/cpu/add_layer_norm.cpp (AVX-512; 1.3-1.7x ATen's add + layer_norm at ViT-S/B rows on this CPU),
forward only: with a gradient to record (eagerly, or traced by torch.compile with grad mode on), the op runs
`reference` below, whose ATen ops record PyTorch's own autograd nodes. `reference` is also the oracle and the path
of CUDA (ATen's two kernels, which inductor fuses itself under torch.compile; no Triton kernel yet).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _dispatch, _ops
from .._common import FLOAT_DTYPES, check_float

OP = "add_layer_norm"


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
    two-op form. Differentiable in every tensor: where autograd records, under any backend, it runs the
    equivalent below (`run_checked`).

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
    op's whole gain at a small model's sizes.

    A call that autograd records, eagerly or traced by torch.compile with grad mode on, runs `reference`: ATen's
    add and LayerNorm with their own C++ autograd nodes, as a dense model trains (inductor fuses the two itself).
    The kernel inside a Python autograd Function (its backward ATen's LayerNorm backward from the kernel's sum,
    mean and rstd) made ElasticViT's training step 3-7 % slower on the digits ViT and no faster on ViT-S (fp32,
    bf16; CPU, 1 thread: benchmarks/RESULTS.md, "Session 18"). A compiled no-grad forward keeps the kernel."""
    fn = _dispatch.kernel(OP, x.device, x.dtype)  # a forced backend without a kernel for these tensors raises
    if _dispatch.needs_grad(x, residual, weight, bias) and not _dispatch.traced_without_grad():
        return reference(x, residual, weight, bias, eps)
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


def fake(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output metadata of the compiled op (FakeTensorMode, opcheck)."""
    torch._check(x.shape == residual.shape, lambda: "x and residual of one shape")
    return x.new_empty(x.shape), x.new_empty(x.shape)


if _ops.has_schema(OP):
    torch.library.register_fake(f"skd_kernels::{OP}")(fake)

_dispatch.register_op(OP, {
    "cuda": "not implemented: CUDA runs the reference's two ATen kernels",
    "triton": "not implemented: CUDA runs the reference's two ATen kernels",
    "cpu": _dispatch.compiled(OP, "CPU"),
    "reference": _dispatch.Kernel(reference, FLOAT_DTYPES),
})
