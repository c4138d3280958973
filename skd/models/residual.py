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

import skd_kernels
from skd_kernels import _dispatch
from skd_kernels.ops.add_layer_norm import OP

# Norm classes whose forward is F.layer_norm over the last dim with their own weight, bias and eps.
_PLAIN = (nn.LayerNorm, TimmLayerNorm)
# pre_norm_stream's final norm for a stream that ends without one (its last add then runs on its own)
NO_NORM = nn.Identity()


def add_norm(x: torch.Tensor, y: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, norm(x + y)) for x, y (..., D) and any norm module; one pass when `norm` is a plain LayerNorm over
    D, x, y and its parameters share a dtype (not under autocast, which runs the norm in fp32) and the op has a
    kernel for them (CPU; elsewhere, or under a forced backend without one, its reference is this two-op form)."""
    if _fusable(x, y, norm):
        return skd_kernels.add_layer_norm(x, y, norm.weight, norm.bias, norm.eps)
    s = x + y
    return s, norm(s)


def _fusable(x: torch.Tensor, y: torch.Tensor, norm: nn.Module) -> bool:
    if type(norm) not in _PLAIN or getattr(norm, "_fast_norm", False) or len(norm.normalized_shape) != 1:
        return False
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    return (x.shape == y.shape and x.dtype == y.dtype and all(p.dtype == x.dtype for p in params)
            and not torch.is_autocast_enabled(x.device.type) and _dispatch.has_kernel(OP, x.device, x.dtype))


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
