"""Adapter for HuggingFace vision transformers: ViTModel, ViTForImageClassification, DeiTModel,
DeiTForImageClassification and DeiTForImageClassificationWithTeacher (distilled DeiT).

Pre-norm layers: x = x + dropout(o(attention(LN1(x)))), x = x + dropout(fc2(act(fc1(LN2(x))))).
Masked-image-modeling models are refused (their convolutional decoder is not modelled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.models.deit import modeling_deit as md
from transformers.models.vit import modeling_vit as mv

from ..subnet import Subnet
from . import AttnFn, BlockSpec, MlpFn, check_type, register
from .hf_common import HFAdapter, additive_bias, fused_activation, linear_macs, supports
from .inert import through
from .residual import NO_NORM, pre_norm_stream

_FAMILIES = {  # layer, attention, MLP classes, checked exactly
    "ViT": (mv.ViTLayer, mv.ViTAttention, mv.ViTMLP),
    "DeiT": (md.DeiTLayer, md.DeiTAttention, md.DeiTMLP),
}


@register(mv.ViTPreTrainedModel, md.DeiTPreTrainedModel)
@supports("ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
          "DeiTForImageClassificationWithTeacher")
class HFViTAdapter(HFAdapter):
    qkvo_names = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
    mlp_names = ("mlp.fc1", "mlp.fc2")

    def __init__(self, model: nn.Module) -> None:
        self.refuse_unsupported(model, "skd serves ViTModel, ViTForImageClassification, DeiTModel and "
                                "DeiTForImageClassification(WithTeacher); masked image modeling is not modelled")
        family = "DeiT" if isinstance(model, md.DeiTPreTrainedModel) else "ViT"
        layer_t, attn_t, mlp_t = _FAMILIES[family]
        self.base = model.base_model
        names = {id(m): n for n, m in model.named_modules()}
        self.layers_prefix = names[id(self.base.layers)]
        self.patches = self.base.embeddings.patch_embeddings
        tokens = self.patches.num_patches + (2 if family == "DeiT" else 1)  # + class (+ distillation) token
        blocks, layers = [], []
        for layer in self.base.layers:
            where = names[id(layer)]
            check_type(layer, layer_t, where)
            check_type(layer.attention, attn_t, f"{where}.attention")
            check_type(layer.mlp, mlp_t, f"{where}.mlp")
            attn, mlp = layer.attention, layer.mlp
            blocks.append(BlockSpec(
                name=where, block=layer, q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, proj=attn.o_proj,
                fc1=mlp.fc1, fc2=mlp.fc2, act=mlp.activation_fn, fused_act=fused_activation(mlp.activation_fn),
                num_heads=attn.num_attention_heads, head_dim=attn.head_dim, hidden=mlp.fc1.out_features,
                attn_dropout=attn.attention_dropout, tokens=tokens, sequences=1,
            ))
            layers.append(layer)
        super().__init__(model, blocks, layers)

    def _layer_forward(self, i: int, layer: nn.Module, subnet: Subnet, attn_fn: AttnFn,
                       mlp_fn: MlpFn) -> Callable[..., torch.Tensor]:
        def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    **kwargs: Any) -> torch.Tensor:
            x = hidden_states
            sublayers = []  # (norm, its sublayer), kept ones in order: the attention's add fused with the MLP's norm
            if subnet.attn[i]:
                bias = additive_bias(attention_mask, x.dtype)
                sublayers.append((layer.layernorm_before, lambda h: through(layer.dropout, attn_fn(i, h, bias))))
            if subnet.mlp[i]:
                sublayers.append((layer.layernorm_after, lambda h: through(layer.dropout, mlp_fn(i, h))))
            return pre_norm_stream(x, sublayers, NO_NORM)  # the next layer's norm runs in its own forward

        return forward

    def _set_head_dim(self, spec: BlockSpec, r: int) -> None:
        attn = spec.block.attention
        attn.head_dim, attn.scaling = r, r**-0.5

    def other_macs(self) -> int:
        """The patch projection over every patch, plus every Linear outside the layers (pooler,
        classifiers) once per image."""
        conv = self.patches.projection
        return self.patches.num_patches * conv.weight.numel() + linear_macs(self.model, (), 1, (self.layers_prefix,))

    def init_kwargs(self) -> dict[str, Any]:
        if self.base is self.model:  # ViTModel / DeiTModel take add_pooling_layer
            return {"add_pooling_layer": self.model.pooler is not None}
        return {}
