"""Adapter for timm SwinTransformer: window attention with relative position bias, shifted windows,
patch merging. Attention runs per window; heads keep their own relative position bias."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    window_partition,
    window_reverse,
)
from torch import nn

from ..subnet import Subnet
from . import AttnFn, BlockSpec, MlpFn, check_type, register
from .inert import through
from .residual import NO_NORM, pre_norm_stream
from .timm_common import TimmAdapter, mlp_blocking, mlp_fields
from .timm_vit import single_input


@register(SwinTransformer)
class SwinAdapter(TimmAdapter):
    def __init__(self, model: SwinTransformer) -> None:
        blocks = []
        for s, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                check_type(stage.downsample, PatchMerging, f"layers.{s}.downsample")
            for j, blk in enumerate(stage.blocks):
                where = f"layers.{s}.blocks.{j}"
                check_type(blk, SwinTransformerBlock, where)
                check_type(blk.attn, WindowAttention, f"{where}.attn")
                attn = blk.attn
                (h, w), (wh, ww) = blk.input_resolution, blk.window_size
                blocks.append(BlockSpec(
                    name=where, block=blk, qkv=attn.qkv, proj=attn.proj, **mlp_fields(blk.mlp, where),
                    num_heads=attn.num_heads, head_dim=attn.qkv.out_features // (3 * attn.num_heads),
                    attn_dropout=attn.attn_drop.p, tokens=wh * ww,
                    sequences=math.ceil(h / wh) * math.ceil(w / ww), blocking=tuple(mlp_blocking(blk.mlp, where)),
                ))
        super().__init__(model, blocks)

    def run(self, args: tuple, kwargs: dict[str, Any], subnet: Subnet, attn_fn: AttnFn, mlp_fn: MlpFn) -> Any:
        """args: (images (B, C, H, W),) -> the model's head output (logits (B, classes) for classifiers)."""
        m = self.model
        x = m.patch_embed(single_input(m, args, kwargs))  # (B, H, W, C)
        i = 0
        for k, stage in enumerate(m.layers):
            x = stage.downsample(x)
            sublayers = []  # (norm, its sublayer) of the stage's kept attentions and MLPs, in order
            for blk in stage.blocks:
                if subnet.attn[i]:
                    sublayers.append((blk.norm1, functools.partial(_attention_branch, blk, i, attn_fn)))
                if subnet.mlp[i]:
                    sublayers.append((blk.norm2, functools.partial(_mlp_branch, blk, i, mlp_fn)))
                i += 1
            # the next stage's downsample normalises a merged shape: only the last stage ends in a norm
            x = pre_norm_stream(x, sublayers, m.norm if k == len(m.layers) - 1 else NO_NORM)
        return m.forward_head(x)

    @staticmethod
    def _window_attention(blk: SwinTransformerBlock, i: int, x: torch.Tensor, attn_fn: AttnFn) -> torch.Tensor:
        """timm's SwinTransformerBlock._attn with the window attention replaced by attn_fn. x: (B, H, W, C)."""
        b, h, w, c = x.shape
        shift = blk.shift_size
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        wh, ww = blk.window_size
        x = nn.functional.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        _, hp, wp, _ = x.shape
        windows = window_partition(x, blk.window_size).view(-1, blk.window_area, c)  # (B*nW, N, C)
        bias = blk.attn._get_rel_pos_bias()  # (1, heads, N, N)
        mask = blk.get_attn_mask(x) if getattr(blk, "dynamic_mask", False) else blk.attn_mask  # (nW, N, N)
        if mask is not None:
            n_win, n = mask.shape[0], blk.window_area
            bias = (bias.unsqueeze(1) + mask.view(1, n_win, 1, n, n)).expand(b, -1, -1, -1, -1)
            bias = bias.reshape(-1, blk.attn.num_heads, n, n)  # (B*nW, heads, N, N), window-major like x
        out = through(blk.attn.proj_drop, attn_fn(i, windows, bias))
        x = window_reverse(out.view(-1, wh, ww, out.shape[-1]), blk.window_size, hp, wp)[:, :h, :w, :]
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x

    def other_macs(self) -> int:
        m = self.model
        macs = m.patch_embed.num_patches * m.patch_embed.proj.weight.numel()
        for stage in m.layers:
            if isinstance(stage.downsample, PatchMerging):
                h, w = stage.output_resolution
                macs += h * w * stage.downsample.reduction.weight.numel()
        fc = getattr(m.head, "fc", None)
        if isinstance(fc, nn.Linear):
            macs += fc.weight.numel()
        return macs

    def new_attention(self, i: int, head_dim: int) -> nn.Module:
        old = self.blocks[i].block.attn
        w = old.qkv.weight
        new = WindowAttention(
            old.dim, old.num_heads, head_dim=head_dim, window_size=old.window_size,
            qkv_bias=old.qkv.bias is not None, attn_drop=old.attn_drop.p, proj_drop=old.proj_drop.p,
            device=w.device, dtype=w.dtype,
        )
        with torch.no_grad():
            new.relative_position_bias_table.copy_(old.relative_position_bias_table)
        new.fused_attn = old.fused_attn
        return new


def _attention_branch(blk: SwinTransformerBlock, i: int, attn_fn: AttnFn, h: torch.Tensor) -> torch.Tensor:
    """Block i's window-attention branch on its normalised input h (B, H, W, C), before the residual add."""
    return through(blk.drop_path1, SwinAdapter._window_attention(blk, i, h, attn_fn))


def _mlp_branch(blk: SwinTransformerBlock, i: int, mlp_fn: MlpFn, h: torch.Tensor) -> torch.Tensor:
    """Block i's MLP branch on its normalised input h (Linear layers act on the last dim: no (B, H*W, C) reshape
    needed), before the residual add."""
    return through(blk.drop_path2, through(blk.mlp.drop2, mlp_fn(i, h)))
