"""What timm's families share: their Mlp, record/rebuild through timm.create_model, Mixup, extraction."""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from timm.layers import GELU, DropPath, GELUTanh, Mlp
from torch import nn

from ..subnet import Subnet
from . import BlockSpec, ModelAdapter, check_type, head_rows, truncated_linear
from .inert import register_dropout

register_dropout(DropPath, "drop_prob")  # timm's stochastic depth: x itself when not training or at 0


def mlp_fields(mlp: nn.Module, where: str) -> dict[str, Any]:
    """BlockSpec fields of a timm Mlp (exact type checked), its blocking reason included."""
    check_type(mlp, Mlp, f"{where}.mlp")
    return dict(fc1=mlp.fc1, fc2=mlp.fc2, act=mlp.act, fused_act=fused_activation(mlp.act),
                hidden=mlp.fc1.out_features, hidden_dropout=mlp.drop1)


def fused_activation(act: nn.Module) -> str | None:
    """prefix_linear's fused name for a torch/timm activation module, or None when it must run separately."""
    if (type(act) is nn.GELU and act.approximate == "none") or type(act) is GELU:
        return "gelu"
    if (type(act) is nn.GELU and act.approximate == "tanh") or type(act) is GELUTanh:
        return "gelu_tanh"
    return None


def mlp_blocking(mlp: nn.Module, where: str) -> list[str]:
    """Reasons a timm Mlp cannot be truncated: a norm over the hidden units depends on all of them."""
    return [] if isinstance(mlp.norm, nn.Identity) else [f"{where}.mlp.norm normalises over all hidden units"]


class TimmAdapter(ModelAdapter):
    """Base of timm families: blocks with `.attn` (fused qkv, proj) and `.mlp` (timm Mlp)."""

    source = "timm"

    def new_attention(self, i: int, head_dim: int) -> nn.Module:
        """A fresh timm attention module for block i with `head_dim` dims per head (same dtype/device)."""
        raise NotImplementedError

    def shrink(self, subnet: Subnet) -> None:
        with torch.no_grad():
            for i, (spec, r, h) in enumerate(zip(self.blocks, subnet.attn, subnet.mlp, strict=True)):
                # fresh modules start in train mode; follow the block's (dropout would differ)
                spec.block.attn = self._shrunk_attention(i, spec, r).train(spec.block.training)
                spec.block.mlp = _shrunk_mlp(spec, h).train(spec.block.training)

    def _shrunk_attention(self, i: int, spec: BlockSpec, r: int) -> nn.Module:
        attn = self.new_attention(i, max(r, 1))
        if r == 0:  # timm cannot build 0-width modules: width 1, all zero, adds exactly 0
            for p in (*attn.qkv.parameters(), *attn.proj.parameters()):
                p.zero_()
            return attn
        h = spec.num_heads
        attn.qkv.load_state_dict(truncated_linear(spec.qkv, head_rows(h, spec.head_dim, r, 3)).state_dict())
        # timm's SDPA uses 1/sqrt(r); fold sqrt(r/hd) into q so scores keep the full head's 1/sqrt(hd).
        q_factor = math.sqrt(r / spec.head_dim)
        attn.qkv.weight[: h * r] *= q_factor
        if attn.qkv.bias is not None:
            attn.qkv.bias[: h * r] *= q_factor
        attn.proj.load_state_dict(truncated_linear(spec.proj, cols=head_rows(h, spec.head_dim, r)).state_dict())
        return attn

    def mixup(self, num_classes: int, mixup: float, cutmix: float, label_smoothing: float) -> Callable | None:
        from timm.data import Mixup

        if mixup <= 0 and cutmix <= 0:
            return None
        return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)

    def record(self) -> dict[str, Any]:
        arch = (getattr(self.model, "pretrained_cfg", None) or {}).get("architecture")
        if arch is None:
            raise ValueError("the model was not built with timm.create_model, so skd cannot record how to rebuild "
                             "it; create it with timm.create_model(name, **kwargs)")
        args = _model_args(self.model)
        for k, v in args.items():
            try:
                json.dumps(v)
            except TypeError as e:
                raise ValueError(f"model argument {k}={v!r} cannot be stored in JSON; pass a string name "
                                 "instead") from e
        return {"source": self.source, "architecture": arch, "model_args": args}

    @classmethod
    def rebuild(cls, record: dict[str, Any]) -> nn.Module:
        import timm

        from .. import digits  # noqa: F401  registers vit_digits with timm

        try:
            return timm.create_model(record["architecture"], pretrained=False, **record["model_args"])
        except Exception as e:
            raise ValueError(f"cannot rebuild timm model {record.get('architecture')!r} with "
                             f"{record.get('model_args')}: {e}") from e


def _model_args(model: nn.Module) -> dict[str, Any]:
    """timm.create_model's keyword arguments that rebuild `model`'s architecture (no weights)."""
    try:
        from timm.models import get_model_args
    except ImportError:  # an older timm (1.0.29) keeps no record of create_model's arguments
        return _shown_args(model)
    return get_model_args(model)


def _shown_args(model: nn.Module) -> dict[str, Any]:
    """The create_model arguments an older timm's model still shows: those get_model_args adds to the recorded
    ones. Others (a custom embed_dim, depth, window_size, ...) cannot be read back: skd.save then refuses,
    since the architecture's defaults would not rebuild the model."""
    import timm

    embed = model.patch_embed
    args = {"num_classes": model.num_classes, "in_chans": embed.proj.in_channels, "img_size": tuple(embed.img_size)}
    if isinstance(getattr(model, "global_pool", None), str):
        args["global_pool"] = model.global_pool
    warnings.warn(f"timm {timm.__version__} keeps no record of timm.create_model's arguments: skd records only "
                  f"{sorted(args)}; upgrade timm (1.0.31 records them all) to save models built with others",
                  stacklevel=5)  # the caller of skd.save
    return args


def _shrunk_mlp(spec: BlockSpec, h: int) -> nn.Module:
    old = spec.block.mlp
    w = spec.fc1.weight
    mlp = Mlp(spec.fc1.in_features, hidden_features=max(h, 1), out_features=spec.fc2.out_features,
              bias=(spec.fc1.bias is not None, spec.fc2.bias is not None),
              drop=(old.drop1.p, old.drop2.p), device=w.device, dtype=w.dtype)
    mlp.act = copy.deepcopy(spec.act)  # keeps e.g. nn.GELU(approximate="tanh") exactly
    keep = torch.arange(h)
    mlp.fc1 = truncated_linear(spec.fc1, keep)
    mlp.fc2 = truncated_linear(spec.fc2, cols=keep, zero=h == 0)
    return mlp
