"""ElasticViT on timm SwinTransformer: shifted windows with masks, relative position bias, patch merging."""

from __future__ import annotations

import copy

import pytest
import torch
from elastic_oracle import kept_masks, masked_copy, random_subnets, rel_err
from timm.models.swin_transformer import SwinTransformer

from skd import ElasticViT, Subnet

# 32 px / patch 2 -> 16x16 tokens, window 4: stage 1 has 16 windows with shifted-window masks, stage 2
# (after patch merging) 8x8 tokens, 4 windows.
TINY = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 3),
            num_classes=10)


@pytest.fixture
def pair() -> tuple[SwinTransformer, ElasticViT]:
    model = SwinTransformer(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return copy.deepcopy(model), ElasticViT(model).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


def test_swin_blocks_have_shifted_windows(pair: tuple) -> None:
    _, elastic = pair
    blocks = [s.block for s in elastic.adapter.blocks]
    assert [any(b.shift_size) for b in blocks] == [False, True, False, True]
    assert [s.sequences for s in elastic.adapter.blocks] == [16, 16, 4, 4]


def test_full_width_wrap_equals_original(pair: tuple, x: torch.Tensor) -> None:
    bare, elastic = pair
    with torch.no_grad():
        err = rel_err(elastic(x), bare(x))
    print(f"max rel err {err:.2e}")
    assert err <= 1e-5


def test_random_subnets_match_masking_oracle_and_extract(pair: tuple, x: torch.Tensor) -> None:
    bare, elastic = pair
    for subnet in random_subnets(elastic.head_dims, elastic.hiddens, n=6, seed=3):
        with torch.no_grad():
            y = elastic.set_subnet(subnet=subnet)(x)
            e_oracle = rel_err(y, masked_copy(bare, subnet)(x))
            e_extract = rel_err(elastic.extract()(x), y)
        print(f"{subnet}: vs oracle {e_oracle:.2e}, extract vs elastic {e_extract:.2e}")
        assert e_oracle <= 1e-5
        assert e_extract <= 1e-5


def test_macs_per_window() -> None:
    elastic = ElasticViT(SwinTransformer(**TINY))
    d1, d2, n = 24, 48, 16  # window 4x4 = 16 tokens

    def block(dim: int, heads: int, windows: int, r: int, h: int) -> int:
        rows = n * windows
        return rows * (3 * dim * heads * r + heads * r * dim + 2 * dim * h) + windows * 2 * heads * n * n * r

    patch = 256 * 3 * 2 * 2 * d1
    merge = 64 * (4 * d1) * d2
    head = d2 * 10
    sub = Subnet(attn=[12, 3, 0, 16], mlp=[96, 0, 7, 192])
    assert elastic.macs(sub) == patch + merge + head + block(d1, 2, 16, 12, 96) + block(d1, 2, 16, 3, 0) + block(
        d2, 3, 4, 0, 7) + block(d2, 3, 4, 16, 192)


def test_swin_save_load_round_trip(tmp_path, x: torch.Tensor) -> None:
    import timm

    import skd

    model = timm.create_model("swin_tiny_patch4_window7_224", **dict(TINY, depths=(2, 2), num_heads=(2, 3)))
    elastic = ElasticViT(model.eval()).eval().set_subnet(keep=0.5)
    skd.save(elastic, tmp_path / "swin.safetensors")
    loaded = skd.load(tmp_path / "swin.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), elastic(x))


def test_swin_gradients_equal_masking_oracle_on_kept_entries(pair: tuple, x: torch.Tensor, sdpa_route: str) -> None:
    bare, elastic = pair
    subnet = Subnet(attn=[5, 12, 0, 9], mlp=[0, 40, 96, 3])
    target = torch.tensor([2, 5])
    oracle = masked_copy(bare, subnet)
    torch.nn.functional.cross_entropy(oracle(x), target).backward()
    torch.nn.functional.cross_entropy(elastic.set_subnet(subnet=subnet)(x), target).backward()
    masks, expected = kept_masks(bare, subnet), dict(oracle.named_parameters())
    with elastic.standard_layout() as model:
        for n, p in model.named_parameters():
            g = torch.zeros_like(p) if p.grad is None else p.grad  # skipped branch: None here, exact 0 there
            ref = expected[n].grad
            if n in masks:
                assert not g[~masks[n]].any(), n
                g, ref = g[masks[n]], ref[masks[n]]
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6, msg=n)
