"""`prefix_linear`: a Linear layer restricted to the leading block of its weight, without copying it."""

from __future__ import annotations

import torch

from ._dispatch import select
from ._validate import check_prefix_linear


def prefix_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    k_in: int | None = None,
    k_out: int | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """y = act(x[..., :k_in] @ weight[:k_out, :k_in]^T + bias[:k_out]), bias and activation fused.

    x: (..., I') with I' >= k_in; weight: (O, I); bias: (O,) or None; all one dtype (fp32/bf16/fp16/fp64).
    k_in in [0, I] (default I), k_out in [0, O] (default O); activation None | "gelu" | "gelu_tanh".
    Returns (..., k_out) in x's dtype. Only weight[:k_out, :k_in] is read and nothing is copied.
    Differentiable in x, weight (gradient zero outside the block) and bias.

    Equivalent to::

        y = F.linear(x[..., :k_in], weight[:k_out, :k_in], bias[:k_out]); y = F.gelu(y) if gelu
    """
    k_in = weight.shape[1] if k_in is None else k_in
    k_out = weight.shape[0] if k_out is None else k_out
    activation = activation or "none"
    check_prefix_linear(x, weight, bias, k_in, k_out, activation)
    return select(x.device, x.dtype).prefix_linear(x, weight, bias, k_in, k_out, activation)
