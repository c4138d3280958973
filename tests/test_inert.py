"""skd.models.inert.through: module calls that would return their input are skipped, and only those."""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from skd import ElasticViT
from skd.models.inert import through


def _calls(module: nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda m, args: calls.append(1))
    return calls


@pytest.mark.parametrize("module", [nn.Identity(), nn.Dropout(0.3).eval(), nn.Dropout(0.0).train(),
                                    DropPath(0.2).eval(), DropPath(0.0).train()], ids=str)
def test_modules_that_return_their_input_are_not_called(module: nn.Module) -> None:
    x = torch.randn(2, 5, 8)
    calls = _calls(module)
    assert through(module, x) is x and not calls


class _Noisy(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


@pytest.mark.parametrize("module", [nn.Dropout(0.3).train(), DropPath(0.2).train(), _Noisy(0.0).eval(),
                                    nn.LayerNorm(8)], ids=str)
def test_modules_that_may_do_something_are_called(module: nn.Module) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    calls = _calls(module)
    y = through(module, x)
    assert calls == [1] and not torch.equal(y, x)


def test_elastic_training_still_drops() -> None:
    """A ViT with dropout everywhere: in training mode ElasticViT's forward is random (the dropouts run), in
    eval mode it is deterministic and equals the model's own forward."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10,
                              proj_drop_rate=0.3, drop_path_rate=0.3)
    x = torch.randn(2, 3, 32, 32)
    elastic = ElasticViT(model)
    elastic.train()
    assert not torch.equal(elastic(x), elastic(x))
    elastic.eval()
    with torch.no_grad(), elastic.standard_layout() as bare:
        want = bare(x)
    got = elastic(x)
    assert torch.equal(elastic(x), got) and torch.allclose(got, want, atol=1e-5)
