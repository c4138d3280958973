"""Model adapters: one per model family, exposing each block's attention and MLP layers uniformly.

`adapter_for(model)` returns the adapter for a timm VisionTransformer (ViT, DeiT, distilled DeiT) or
SwinTransformer, or raises `skd.UnsupportedModelError` naming the module and why. WPAC and PIAD use
`adapter.blocks` on the bare timm model; ElasticViT also uses the adapter's `forward` (the model's
own modules around caller-supplied attention/MLP branches), `other_macs` and `new_attention`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..subnet import Subnet

# attn_fn(block_index, x (S, N, C), attn_bias (S or 1, H, N, N) or None) -> (S, N, C_out)
AttnFn = Callable[[int, torch.Tensor, torch.Tensor | None], torch.Tensor]
# mlp_fn(block_index, x (..., C)) -> (..., C)
MlpFn = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class BlockSpec:
    """One transformer block's truncatable layers (the model's own modules, not copies).

    name: the block's qualified name in the model (`model.get_submodule(name)`).
    qkv: Linear (3*num_heads*head_dim, dim) in timm's head-major layout on the bare model;
    proj: Linear (dim_out, num_heads*head_dim); fc1: Linear (hidden, dim); fc2: Linear (dim, hidden).
    tokens: tokens in one attention sequence (one window for Swin); sequences: attention sequences
    per image (windows per image for Swin, 1 for ViT) — together they give MACs per image.
    blocking: why this block cannot be prefix-truncated (empty when it can).
    """

    name: str
    block: nn.Module
    attn: nn.Module
    qkv: nn.Linear
    proj: nn.Linear
    mlp: nn.Module
    fc1: nn.Linear
    fc2: nn.Linear
    act: nn.Module
    num_heads: int
    head_dim: int
    hidden: int
    has_qk_norm: bool
    tokens: int
    sequences: int
    blocking: tuple[str, ...] = ()

    @property
    def scale(self) -> float:
        """Softmax scale of the full head, kept for every truncated width."""
        return self.head_dim ** -0.5


class ModelAdapter:
    """Family-specific knowledge of one model; subclasses fill `blocks` and implement the hooks."""

    family: str

    def __init__(self, model: nn.Module, blocks: list[BlockSpec]) -> None:
        self.model = model
        self.blocks = blocks

    def forward(self, x: torch.Tensor, subnet: Subnet, attn_fn: AttnFn, mlp_fn: MlpFn) -> torch.Tensor:
        """The model's forward with every block's attention/MLP branch computed by attn_fn/mlp_fn.

        A branch whose width in `subnet` is 0 is skipped (its residual adds nothing).
        """
        raise NotImplementedError

    def other_macs(self) -> int:
        """Multiply-accumulates per image of every Linear/conv outside the blocks' attention and MLP."""
        raise NotImplementedError

    def new_attention(self, i: int, head_dim: int) -> nn.Module:
        """A fresh timm attention module for block i with `head_dim` dims per head (same dtype/device).

        Everything but qkv and proj (e.g. Swin's relative position bias) is copied from block i.
        """
        raise NotImplementedError


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`; UnsupportedModelError naming the module and reason otherwise."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        from .vit import ViTAdapter

        return ViTAdapter(model)
    if isinstance(model, SwinTransformer):
        from .swin import SwinAdapter

        return SwinAdapter(model)
    raise UnsupportedModelError(
        f"{type(model).__module__}.{type(model).__name__} is not supported: skd handles timm "
        "VisionTransformer (ViT, DeiT, distilled DeiT) and SwinTransformer"
    )


def check_type(module: nn.Module, expected: type, where: str) -> None:
    """Exact type check: a subclass may override forward in a way truncation would silently break."""
    if type(module) is not expected:
        raise UnsupportedModelError(
            f"{where} is {type(module).__module__}.{type(module).__name__}; only "
            f"{expected.__module__}.{expected.__name__} is supported there"
        )


def mlp_blocking(mlp: nn.Module, where: str) -> list[str]:
    """Reasons a timm Mlp cannot be truncated: a norm over the hidden units depends on all of them."""
    return [] if isinstance(mlp.norm, nn.Identity) else [f"{where}.mlp.norm normalises over all hidden units"]
