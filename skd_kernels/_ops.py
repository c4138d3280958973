"""Loads the compiled `skd_kernels._C` operators (if built) and gives them fake kernels and autograd.

The schemas live in csrc/registration.cpp. Fake kernels let the ops trace under torch.compile;
prefix_linear's backward is `prefix_linear_backward`, shared with the Triton op.
"""

from __future__ import annotations

import functools
import math

import torch

from .reference import accumulation_dtype

try:
    from . import _C  # registers torch.ops.skd_kernels.*

    LOAD_ERROR: str | None = None
    # Whether the extension was compiled with csrc/cuda (a CUDA toolkit and a CUDA torch at build time).
    BUILT_WITH_CUDA: bool = bool(_C.WITH_CUDA)
except ImportError as exc:  # a build without the extension still imports; ops fall back
    LOAD_ERROR = str(exc)
    BUILT_WITH_CUDA = False


def _registered(dispatch_key: str) -> bool:
    """True when the compiled extension registered kernels for `dispatch_key` ("CPU" or "CUDA")."""
    if LOAD_ERROR is not None:
        return False
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"skd_kernels::{op}", dispatch_key)
        for op in ("weighted_covariance", "taylor_scores", "prefix_linear")
    )


# Decided once at import: a cached lookup on every call would be traced (and warned about) by torch.compile.
COMPILED_KERNELS = {key: _registered(key) for key in ("CPU", "CUDA")}


def covariance_fake(x: torch.Tensor, w: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    torch._check(x.dim() == 2 and w.dim() == 1 and w.shape[0] == x.shape[0], lambda: "x (N, G*r), w (N,)")
    torch._check(groups >= 1 and x.shape[1] % groups == 0, lambda: "groups must divide x's width")
    r = x.shape[1] // groups
    acc = dict(dtype=accumulation_dtype(x.dtype), device=x.device)
    return x.new_empty((), **acc), x.new_empty((groups, r), **acc), x.new_empty((groups, r, r), **acc)


def taylor_fake(act: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(act.dim() == 3 and act.shape == grad.shape, lambda: "act, grad (B, T, C) of one shape")
    b, t, c = act.shape
    acc = accumulation_dtype(act.dtype)
    return act.new_empty((b, t), dtype=acc), act.new_empty((c,), dtype=acc)


def prefix_linear_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k_in: int, k_out: int, activation: str
) -> torch.Tensor:
    torch._check(0 <= k_in <= weight.shape[1] and 0 <= k_out <= weight.shape[0], lambda: "k out of range")
    torch._check(x.shape[-1] >= k_in, lambda: "x narrower than k_in")
    return x.new_empty((*x.shape[:-1], k_out))


def _gelu_grad(grad: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return grad
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch.ops.aten.gelu_backward(grad, z, approximate=approximate)


def prefix_linear_backward(
    op: object, ctx: object, grad_y: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None, None]:
    """Gradients of prefix_linear; `op` is the forward op, used to recompute the pre-activation.

    Gradients outside the leading block are zero; x's beyond k_in too.
    """
    x, weight, bias = ctx.saved_tensors
    k_in, k_out, activation = ctx.k_in, ctx.k_out, ctx.activation
    if activation != "none":
        z = op(x, weight, bias, k_in, k_out, "none")
        grad_y = _gelu_grad(grad_y, z, activation)
    w_blk = weight[:k_out, :k_in]
    rows = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous when k_out = 0
    g2 = grad_y.reshape(rows, k_out)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        gx = grad_y @ w_blk
        grad_x = gx if x.shape[-1] == k_in else torch.nn.functional.pad(gx, (0, x.shape[-1] - k_in))
    if ctx.needs_input_grad[1]:
        grad_w = torch.zeros_like(weight)
        grad_w[:k_out, :k_in] = g2.t() @ x.reshape(rows, x.shape[-1])[:, :k_in]
    if bias is not None and ctx.needs_input_grad[2]:
        grad_b = torch.zeros_like(bias)
        grad_b[:k_out] = g2.sum(0)
    return grad_x, grad_w, grad_b, None, None, None


def prefix_linear_setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias, k_in, k_out, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.k_in, ctx.k_out, ctx.activation = k_in, k_out, activation


def register_prefix_autograd(qualname: str, op: object) -> None:
    """Attach prefix_linear's backward to a registered operator (compiled or Triton)."""
    torch.library.register_autograd(
        qualname, functools.partial(prefix_linear_backward, op), setup_context=prefix_linear_setup_context
    )


if LOAD_ERROR is None:
    torch.library.register_fake("skd_kernels::weighted_covariance")(covariance_fake)
    torch.library.register_fake("skd_kernels::taylor_scores")(taylor_fake)
    torch.library.register_fake("skd_kernels::prefix_linear")(prefix_linear_fake)
    register_prefix_autograd("skd_kernels::prefix_linear", torch.ops.skd_kernels.prefix_linear)
