"""Residual adds and the LayerNorm that reads each sum, fused where the norm is a plain LayerNorm.

A pre-norm encoder computes x = x + f(norm(x)) per sublayer and then normalises the sum again (the next
sublayer's norm, or the final one); a post-norm one computes LayerNorm(x + f(x)). Each such add and norm run as
one `skd_kernels.add_layer_norm` (one pass over x and f(x) on CPU instead of ATen's two; ATen's two on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from timm.layers import LayerNorm as TimmLayerNorm
from torch import nn

from skd_kernels import _dispatch
from skd_kernels.ops.add_layer_norm import OP, run_checked

from .inert import hooked

# Norm classes whose forward is F.layer_norm over the last dim with their own weight, bias and eps.
_PLAIN = (nn.LayerNorm, TimmLayerNorm)
# pre_norm_stream's final norm for a stream that ends without one (its last add then runs on its own)
NO_NORM = nn.Identity()


def add_norm(x: torch.Tensor, y: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, norm(x + y)) for x, y (..., D) and any norm module; one pass when `norm` is a plain LayerNorm over
    D, x, y and its parameters share a dtype (not under autocast, which runs the norm in fp32) and the op has a
    kernel for them (CPU; elsewhere, or under a forced backend without one, its reference is this two-op form)."""
    params = _fused_params(x, y, norm)
    if params is not None:
        return run_checked(x, y, *params)
    s = x + y
    return s, norm(s)


def _fused_params(x: torch.Tensor, y: torch.Tensor, norm: nn.Module) -> tuple | None:
    """norm's (weight, bias, eps) when add_norm runs the fused op, else None. That needs everything
    add_layer_norm's `check` would establish, a kernel, and no hooks on the norm (a hooked norm runs itself so
    that they fire). Per call, so written for speed (~2 µs): the kernel first (none on CUDA), then the norm,
    then the tensors; the norm's attributes read from its dicts, not through nn.Module.__getattr__ (~0.4 µs
    each, ~1 µs for a missing one)."""
    dtype, device = x.dtype, x.device
    attrs = norm.__dict__
    if not _dispatch.has_kernel(OP, device, dtype) or type(norm) not in _PLAIN or attrs.get("_fast_norm", False) \
            or hooked(norm):
        return None
    shape, eps, params = attrs["normalized_shape"], attrs["eps"], attrs["_parameters"]
    if len(shape) != 1 or not x.dim() or shape[0] != x.shape[-1] or y.shape != x.shape or y.dtype != dtype \
            or y.device != device or not isinstance(eps, (int, float)) or not eps >= 0:
        return None
    weight, bias = params.get("weight"), params.get("bias")
    for p in (weight, bias):
        if p is not None and (p.dtype != dtype or p.device != device):
            return None
    return None if torch.is_autocast_enabled(device.type) else (weight, bias, eps)


def pre_norm_stream(x: torch.Tensor, sublayers: Sequence[tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]],
                    final_norm: nn.Module) -> torch.Tensor:
    """final_norm(x) after x = x + f(norm(x)) for each (norm, f) in `sublayers`, in order: x (..., D). Each add is
    fused with the norm that reads its sum (the next sublayer's, the last one's with final_norm; NO_NORM: none)."""
    if not sublayers:
        return final_norm(x)
    h = sublayers[0][0](x)
    for j, (_, f) in enumerate(sublayers):
        following = sublayers[j + 1][0] if j + 1 < len(sublayers) else final_norm
        x, h = add_norm(x, f(h), following)
    return h
