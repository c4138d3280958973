"""skd.models.inert.through: module calls that would return their input are skipped, and only those."""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import skd.models.timm_common  # noqa: F401  registers timm's DropPath, as adapting any timm model does
from skd import ElasticViT
from skd.models.inert import through


def _calls(module: nn.Module) -> list[int]:
    """Counts module's calls through an instance-level forward (a hook would itself make through call it)."""
    calls: list[int] = []
    forward = module.forward

    def counted(*args: object) -> object:
        calls.append(1)
        return forward(*args)

    module.forward = counted
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


def test_hooked_modules_are_called_so_their_hooks_fire() -> None:
    """A forward hook on an eval-mode dropout, or a global module hook, makes through call the module."""
    x = torch.randn(2, 5, 8)
    drop, hooked = nn.Dropout(0.3).eval(), []
    drop.register_forward_pre_hook(lambda m, args: hooked.append(1))
    assert through(drop, x) is x and hooked == [1]
    ident, seen = nn.Identity(), []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(type(m)))
    try:
        assert through(ident, x) is x and seen == [nn.Identity]
    finally:
        handle.remove()
    assert through(ident, x) is x and seen == [nn.Identity]  # removed: no call
