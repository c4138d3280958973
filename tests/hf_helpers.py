"""Shared by the HuggingFace tests: tiny random-init models of every served family, their inputs, and an
independent masking oracle for separate q/k/v projections (the model's own forward, weights zeroed)."""

from __future__ import annotations

import copy

import torch
import transformers as tf
from torch import nn

from skd import Subnet
from skd.models import adapter_for

TEXT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
IMAGE = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=5)

FAMILIES = {
    "BertModel": lambda impl: tf.BertModel(tf.BertConfig(**TEXT, attn_implementation=impl)),
    "BertForSequenceClassification": lambda impl: tf.BertForSequenceClassification(
        tf.BertConfig(**TEXT, num_labels=3, attn_implementation=impl)),
    "RobertaModel": lambda impl: tf.RobertaModel(tf.RobertaConfig(**TEXT, pad_token_id=1, attn_implementation=impl)),
    "RobertaForTokenClassification": lambda impl: tf.RobertaForTokenClassification(
        tf.RobertaConfig(**TEXT, pad_token_id=1, num_labels=4, attn_implementation=impl)),
    "ViTModel": lambda impl: tf.ViTModel(tf.ViTConfig(**IMAGE, attn_implementation=impl)),
    "ViTForImageClassification": lambda impl: tf.ViTForImageClassification(
        tf.ViTConfig(**IMAGE, attn_implementation=impl)),
    "DeiTForImageClassification": lambda impl: tf.DeiTForImageClassification(
        tf.DeiTConfig(**IMAGE, attn_implementation=impl)),
    "DeiTForImageClassificationWithTeacher": lambda impl: tf.DeiTForImageClassificationWithTeacher(
        tf.DeiTConfig(**IMAGE, attn_implementation=impl)),
}


def tiny(name: str, impl: str = "sdpa") -> nn.Module:
    """A random-init model of class `name` (eval mode) whose weights are perturbed away from HF's init
    (zero biases and unit norms would hide mistakes)."""
    torch.manual_seed(0)
    model = FAMILIES[name](impl)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(name: str, batch: int = 3) -> dict[str, torch.Tensor]:
    """A batch for model class `name`: token ids with right padding (text) or images."""
    g = torch.Generator().manual_seed(1)
    if name.startswith(("ViT", "DeiT")):
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(3, 50, (batch, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, 3:] = 0
    ids[mask == 0] = 1 if name.startswith("Roberta") else 0
    return {"input_ids": ids, "attention_mask": mask}


def main_output(out: object) -> torch.Tensor:
    """The tensor an HF output is about: logits when present, else last_hidden_state."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def masked_copy(model: nn.Module, subnet: Subnet) -> nn.Module:
    """A deep copy of the (standard-layout) model with every q/k/v row, o column, fc1 row and fc2 column
    outside `subnet` zeroed (a width-0 branch's output bias too), run by transformers' own forward."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for spec, r, h in zip(adapter_for(m).blocks, subnet.attn, subnet.mlp, strict=True):
            heads, hd = spec.num_heads, spec.head_dim
            for w, b in spec.qkv_weights():
                w.view(heads, hd, -1)[:, r:] = 0
                if b is not None:
                    b.view(heads, hd)[:, r:] = 0
            spec.proj.weight.view(-1, heads, hd)[:, :, r:] = 0
            if r == 0 and spec.proj.bias is not None:
                spec.proj.bias.zero_()
            spec.fc1.weight[h:] = 0
            spec.fc1.bias[h:] = 0
            spec.fc2.weight[:, h:] = 0
            if h == 0:
                spec.fc2.bias.zero_()
    return m
