"""ElasticViT.capture (skd/elastic/capture.py) off the GPU: what it refuses, before anything is recorded. The
replays themselves run in tests/test_gpu.py (test_captured_forward_replays_its_subnet)."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from skd import ElasticViT, Subnet
from skd.elastic import CapturedForward


def _elastic() -> ElasticViT:
    torch.manual_seed(0)
    return ElasticViT(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                        num_classes=10)).eval()


def test_cpu_inputs_are_refused_with_the_cpu_alternative() -> None:
    elastic = _elastic()
    with pytest.raises(ValueError, match=r"CUDA input tensors.*torch\.compile"):
        elastic.capture(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="CUDA input tensors"):
        CapturedForward(elastic, elastic, (), {"flag": True})  # no tensor at all


def test_a_bad_subnet_is_refused_before_capturing() -> None:
    elastic = _elastic()
    with pytest.raises(ValueError, match="attn"):
        elastic.capture(torch.randn(2, 3, 32, 32), subnet=Subnet(attn=[999, 1], mlp=[4, 4]))


def test_a_frozen_capture_refuses_cpu_inputs_autocast_and_the_standard_layout() -> None:
    """capture(frozen=True) copies the attention weights in the model's dtype: under autocast it refuses (the
    copies would not be in the dtype the replays compute in); CPU inputs and the standard layout are refused as
    by the forward."""
    elastic = _elastic()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="CUDA input tensors"):
        elastic.capture(x, frozen=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="autocast"):
        elastic.capture(x, frozen=True)
    with elastic.standard_layout(), pytest.raises(RuntimeError, match="standard_layout"):
        elastic.capture(x, frozen=True)
