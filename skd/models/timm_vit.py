"""Adapter for timm VisionTransformer: ViT, DeiT (class token or average pooling, register tokens,
LayerScale, qkv bias on or off) and VisionTransformerDistilled (distilled DeiT)."""

from __future__ import annotations

import functools
from typing import Any

import torch
from timm.layers import Attention, PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..errors import UnsupportedModelError
from ..subnet import Subnet
from . import AttnFn, BlockSpec, MlpFn, check_type, register
from .inert import through
from .residual import pre_norm_stream
from .timm_common import TimmAdapter, mlp_blocking, mlp_fields


def single_input(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """The one positional input of an image model; TypeError naming the model otherwise."""
    if len(args) != 1 or kwargs:
        raise TypeError(f"{type(model).__name__} takes one input (images (B, C, H, W)), got {len(args)} "
                        f"positional and keyword {sorted(kwargs)}")
    return args[0]


@register(VisionTransformer)
class ViTAdapter(TimmAdapter):
    def __init__(self, model: VisionTransformer) -> None:
        check_type(model.patch_embed, PatchEmbed, "patch_embed")  # hybrid CNN stems: MACs not modelled
        if model.attn_pool is not None:
            raise UnsupportedModelError(f"attn_pool ({type(model.attn_pool).__name__}) is not supported: "
                                        "its MACs are not modelled")
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        blocks = []
        for i, blk in enumerate(model.blocks):
            where = f"blocks.{i}"
            check_type(blk, Block, where)
            check_type(blk.attn, Attention, f"{where}.attn")
            attn = blk.attn
            has_qk_norm = not isinstance(attn.q_norm, nn.Identity)
            blocking = mlp_blocking(blk.mlp, where)
            if has_qk_norm:
                blocking.append(f"{where}.attn has qk_norm: a norm over each head's dims changes when dims are dropped")
            if not isinstance(attn.norm, nn.Identity):
                blocking.append(f"{where}.attn has scale_norm over all attention dims")
            if attn.gate is not None:
                blocking.append(f"{where}.attn is gated: the gate is not truncated with the heads")
            blocks.append(BlockSpec(
                name=where, block=blk, qkv=attn.qkv, proj=attn.proj, **mlp_fields(blk.mlp, where),
                num_heads=attn.num_heads, head_dim=attn.head_dim, attn_dropout=attn.attn_drop.p,
                qk_norms=(attn.q_norm, attn.k_norm) if has_qk_norm else (), tokens=tokens, sequences=1,
                blocking=tuple(blocking),
            ))
        super().__init__(model, blocks)

    def run(self, args: tuple, kwargs: dict[str, Any], subnet: Subnet, attn_fn: AttnFn, mlp_fn: MlpFn) -> Any:
        """args: (images (B, C, H, W),) -> the model's head output (logits (B, classes) for classifiers)."""
        m = self.model
        x = single_input(m, args, kwargs)
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        sublayers = []  # (norm, its sublayer) of the kept attentions and MLPs, in order
        for i, spec in enumerate(self.blocks):
            blk = spec.block
            if subnet.attn[i]:
                sublayers.append((blk.norm1, functools.partial(_attention_branch, blk, i, attn_fn)))
            if subnet.mlp[i]:
                sublayers.append((blk.norm2, functools.partial(_mlp_branch, blk, i, mlp_fn)))
        return m.forward_head(pre_norm_stream(x, sublayers, m.norm))

    def other_macs(self) -> int:
        m = self.model
        macs = m.patch_embed.num_patches * m.patch_embed.proj.weight.numel()
        for name in ("head", "head_dist"):  # head_dist: distilled DeiT's second classifier
            head = getattr(m, name, None)
            if isinstance(head, nn.Linear):
                macs += head.weight.numel()
        return macs

    def new_attention(self, i: int, head_dim: int) -> nn.Module:
        old = self.blocks[i].block.attn
        w = old.qkv.weight
        new = Attention(
            old.qkv.in_features, num_heads=old.num_heads, attn_head_dim=head_dim,
            dim_out=old.proj.out_features, qkv_bias=old.qkv.bias is not None,
            proj_bias=old.proj.bias is not None, attn_drop=old.attn_drop.p, proj_drop=old.proj_drop.p,
            device=w.device, dtype=w.dtype,
        )
        new.fused_attn = old.fused_attn
        return new


def _attention_branch(blk: Block, i: int, attn_fn: AttnFn, h: torch.Tensor) -> torch.Tensor:
    """Block i's attention branch on its normalised input h, before the residual add."""
    return through(blk.drop_path1, through(blk.ls1, through(blk.attn.proj_drop, attn_fn(i, h, None))))


def _mlp_branch(blk: Block, i: int, mlp_fn: MlpFn, h: torch.Tensor) -> torch.Tensor:
    """Block i's MLP branch on its normalised input h, before the residual add."""
    return through(blk.drop_path2, through(blk.ls2, through(blk.mlp.drop2, mlp_fn(i, h))))
