"""Triton prefix_attention_separate: the fused op's flash kernel (skd_kernels/triton/prefix_attention.py) on
three rank-major tensors, rank j of head h at column j·H + h of each (rank stride H instead of 3H).

Registered as the custom op `skd_kernels::triton_prefix_attention_separate` with the op's fake kernel and
plain-PyTorch backward (skd_kernels/ops/prefix_attention_separate.py).
"""

import torch

from ..ops.prefix_attention_separate import fake, register_autograd
from .prefix_attention import attend


@torch.library.custom_op("skd_kernels::triton_prefix_attention_separate", mutates_args=())
def _prefix_attention_separate_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float,
    attn_bias: torch.Tensor | None,
) -> torch.Tensor:
    # columns are addressed as offsets from the row start; other strides are the kernel's own per tensor
    q, k, v = (t if t.stride(2) == 1 else t.contiguous() for t in (q, k, v))
    return attend(q, k, v, q.shape[-1] // num_heads, num_heads, num_heads, scale, attn_bias)


_prefix_attention_separate_op.register_fake(fake)
register_autograd("skd_kernels::triton_prefix_attention_separate")


def prefix_attention_separate(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float,
    attn_bias: torch.Tensor | None,
) -> torch.Tensor:
    """prefix_attention_separate through the Triton flash kernel.

    q, k, v: (S, N, r·H) rank-major, any strides, one dtype (fp32/fp16/bf16); attn_bias: (S or 1, H or 1,
    N, N) in q's dtype or None. Returns (S, N, r·H), column j·H + h, in q's dtype. Differentiable in q, k, v
    and attn_bias.
    """
    return _prefix_attention_separate_op(q, k, v, num_heads, scale, attn_bias)
