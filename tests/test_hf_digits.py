"""A trained HuggingFace ViT for a quality check: the digits ViT (timm `vit_digits`, trained and cached by
skd.digits) converted weight for weight into a transformers ViTForImageClassification. Both libraries'
models compute the same logits, and WPAC through the HF adapter gives the same accuracy at 1/4 of every
head's dims as through the timm adapter, far above Taylor ordering."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers as tf
from torch.utils.data import DataLoader, Dataset, Subset

import skd
from skd.digits import VIT_DIGITS_KWARGS, accuracy


def to_hf(vit: torch.nn.Module) -> tf.ViTForImageClassification:
    """The timm VisionTransformer `vit_digits` as a transformers ViTForImageClassification (eval mode)."""
    k = VIT_DIGITS_KWARGS
    d = k["embed_dim"]
    config = tf.ViTConfig(image_size=k["img_size"], patch_size=k["patch_size"], num_channels=k["in_chans"],
                          hidden_size=d, num_hidden_layers=k["depth"], num_attention_heads=k["num_heads"],
                          intermediate_size=int(d * k["mlp_ratio"]), layer_norm_eps=1e-6, hidden_act="gelu",
                          num_labels=k["num_classes"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = tf.ViTForImageClassification(config).eval()
    src = vit.state_dict()
    out = {
        "vit.embeddings.cls_token": src["cls_token"], "vit.embeddings.position_embeddings": src["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
        "vit.layernorm.weight": src["norm.weight"], "vit.layernorm.bias": src["norm.bias"],
        "classifier.weight": src["head.weight"], "classifier.bias": src["head.bias"],
    }
    for i in range(k["depth"]):
        t, h = f"blocks.{i}.", f"vit.layers.{i}."
        for which, (w, b) in zip("qkv", zip(src[t + "attn.qkv.weight"].chunk(3), src[t + "attn.qkv.bias"].chunk(3),
                                            strict=True), strict=True):
            out[h + f"attention.{which}_proj.weight"], out[h + f"attention.{which}_proj.bias"] = w, b
        for hf_name, timm_name in (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
                                   ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                out[f"{h}{hf_name}.{p}"] = src[f"{t}{timm_name}.{p}"]
    hf.load_state_dict(out)
    return hf


class AsDicts(Dataset):
    """(image, label) samples as HF dict samples {"pixel_values", "labels"}."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, label = self.data[i]
        return {"pixel_values": image, "labels": label}


@torch.no_grad()
def hf_accuracy(model: torch.nn.Module, data: Dataset) -> float:
    correct = 0
    for batch in DataLoader(AsDicts(data), batch_size=256):
        correct += int((model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(data)


def _quarter(elastic: skd.ElasticViT) -> skd.Subnet:
    return skd.Subnet(attn=[max(1, math.floor(hd / 4)) for hd in elastic.head_dims], mlp=list(elastic.hiddens))


@pytest.mark.slow
def test_hf_vit_on_digits_matches_timm_and_wpac_beats_taylor(digits_vit, digits_data) -> None:
    train, test = digits_data
    hf = to_hf(digits_vit)
    images = test.tensors[0][:64]
    ref = digits_vit.eval()(images)
    got = hf(pixel_values=images).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    calib = Subset(train, range(256))
    acc = {}
    for criterion in ("wpac", "taylor"):
        model = skd.wpac(copy.deepcopy(hf), DataLoader(AsDicts(calib), batch_size=64), criterion=criterion,
                         num_samples=256, progress=False)
        elastic = skd.ElasticViT(model).eval()
        acc[criterion] = hf_accuracy(elastic.set_subnet(_quarter(elastic)), test)
    timm_model = skd.wpac(copy.deepcopy(digits_vit), DataLoader(calib, batch_size=64), num_samples=256,
                          progress=False)
    timm_elastic = skd.ElasticViT(timm_model).eval()
    timm_acc = accuracy(timm_elastic.set_subnet(_quarter(timm_elastic)), test)
    print(acc, "timm wpac", timm_acc)
    assert acc["wpac"] == pytest.approx(timm_acc, abs=0.01)  # same math through either adapter
    assert acc["wpac"] > acc["taylor"] + 0.05
