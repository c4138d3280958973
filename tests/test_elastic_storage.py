"""ElasticViT's storage order (skd/elastic/layout.py): while wrapped, the weights read by a column prefix
(proj / o, fc2) are column-major in their own storage; the standard layout, extract() and files are row-major,
loading gives the column-major order back, and training on it updates the weights as on row-major ones."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from elastic_oracle import masked_copy, rel_err
from hf_helpers import inputs, tiny
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import skd
from skd import ElasticViT, Subnet
from skd.elastic.layout import column_truncated, store_columns_
from skd.io import load_tensors
from skd.piad.recipe import build_optimizer

VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)
SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 3), num_classes=10)
MODELS = {
    "timm_vit": lambda: VisionTransformer(**VIT),
    "timm_swin": lambda: SwinTransformer(**SWIN),
    "hf_bert": lambda: tiny("BertForSequenceClassification"),
    "hf_vit": lambda: tiny("ViTForImageClassification"),
}


def _perturbed(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _batch(name: str) -> dict[str, torch.Tensor] | torch.Tensor:
    if name.startswith("hf_"):
        return inputs("BertForSequenceClassification" if name == "hf_bert" else "ViTForImageClassification")
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _call(module: nn.Module, batch: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    out = module(**batch) if isinstance(batch, dict) else module(batch)
    return out if isinstance(out, torch.Tensor) else out.logits


def _column_major(w: torch.Tensor) -> bool:
    return w.stride() == (1, w.shape[0])


def _orders(elastic: ElasticViT) -> tuple[list[bool], list[bool]]:
    """(column-major? of every proj/fc2 weight, row-major contiguous? of every other 2-D weight)."""
    cols = {id(lin.weight) for lin in column_truncated(elastic.adapter.blocks)}
    truncated = [_column_major(lin.weight) for lin in column_truncated(elastic.adapter.blocks)]
    others = [p.is_contiguous() for p in elastic.parameters() if p.dim() == 2 and id(p) not in cols]
    return truncated, others


@pytest.mark.parametrize("name", MODELS)
def test_wrapped_proj_fc2_are_column_major_in_their_own_storage(name: str) -> None:
    model = _perturbed(name)
    bare, batch = copy.deepcopy(model), _batch(name)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    elastic = ElasticViT(model).eval()
    truncated, others = _orders(elastic)
    assert truncated and all(truncated) and others and all(others)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # re-strided in place, no new storage
    with torch.no_grad():
        assert rel_err(_call(elastic, batch), _call(bare, batch)) <= 1e-5
        with elastic.standard_layout() as inner:  # row-major again, in the same storage, the model's own forward
            assert all(p.is_contiguous() for p in inner.parameters())
            assert {n: p.data_ptr() for n, p in inner.named_parameters()} == ptrs
            assert rel_err(_call(inner, batch), _call(bare, batch)) <= 1e-5
        assert all(_orders(elastic)[0])
        small = elastic.extract(elastic.uniform(0.5))
        assert all(p.is_contiguous() for p in small.parameters())
        assert rel_err(_call(small, batch), _call(elastic.set_subnet(keep=0.5), batch)) <= 1e-5


def test_prefix_forward_on_column_major_weights_equals_masking_oracle() -> None:
    model = _perturbed("timm_vit")
    bare, x = copy.deepcopy(model), _batch("timm_vit")
    elastic = ElasticViT(model).eval()
    for subnet in (Subnet(attn=[5, 0, 16], mlp=[100, 7, 0]), Subnet(attn=[1, 9, 3], mlp=[1, 192, 50])):
        with torch.no_grad():
            assert rel_err(elastic(x, subnet=subnet), masked_copy(bare, subnet)(x)) <= 1e-5


def test_plans_follow_a_re_strided_weight() -> None:
    """A plan's views hold the strides of their time: re-striding (same storage and data_ptr) rebuilds it."""
    model = _perturbed("timm_vit")
    bare, x = copy.deepcopy(model), _batch("timm_vit")
    elastic = ElasticViT(model).eval().set_subnet(keep=0.5)
    expected = masked_copy(bare, elastic.subnet)(x)
    with torch.no_grad():
        assert rel_err(elastic(x), expected) <= 1e-5
        store_columns_(elastic.adapter.blocks, column_major=False)
        assert rel_err(elastic(x), expected) <= 1e-5
        store_columns_(elastic.adapter.blocks, column_major=True)
        assert rel_err(elastic(x), expected) <= 1e-5


def test_saved_file_is_row_major_values_and_loads_column_major(tmp_path) -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    elastic = ElasticViT(model).eval().set_subnet(keep=0.4)
    path = tmp_path / "m.safetensors"
    skd.save(elastic, path)
    tensors, _ = load_tensors(path)
    state = elastic.model.state_dict()
    assert all(t.is_contiguous() and torch.equal(t, state[k]) for k, t in tensors.items())
    loaded = skd.load(path).eval()
    assert all(_orders(loaded)[0]) and all(_orders(loaded)[1])
    x = _batch("timm_vit")
    with torch.no_grad():
        assert torch.equal(loaded(x), elastic(x))
    # load_state_dict(assign=True) puts the file's (row-major) tensors in: the wrapper re-strides them
    fresh = ElasticViT(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                         num_classes=10)).eval()
    fresh.model.load_state_dict(tensors, assign=True)
    assert all(_orders(fresh)[0])
    with torch.no_grad():
        assert torch.equal(fresh.set_subnet(subnet=elastic.subnet)(x), elastic(x))


def test_dtype_move_keeps_column_major() -> None:
    model = _perturbed("timm_vit")
    elastic = ElasticViT(model).eval()
    x = _batch("timm_vit")
    with torch.no_grad():
        y = elastic(x)
        elastic.to(torch.float64)
        assert all(_orders(elastic)[0])
        assert rel_err(elastic(x.double()).float(), y) <= 1e-5


def test_piad_step_on_column_major_matches_row_major() -> None:
    """One training step (fused AdamW, PIAD's optimizer) at a subnet: the same update on column-major weights
    as on the same weights stored row-major; gradients take their parameter's strides."""
    model = _perturbed("timm_vit")
    col, row = ElasticViT(copy.deepcopy(model)).train(), ElasticViT(model).train()
    store_columns_(row.adapter.blocks, column_major=False)
    assert all(_orders(col)[0]) and not any(_orders(row)[0])
    x, y = _batch("timm_vit"), torch.tensor([1, 7])
    subnet = Subnet(attn=[5, 16, 3], mlp=[100, 7, 192])
    before = {n: p.detach().clone() for n, p in col.named_parameters()}
    params = []
    for elastic in (col, row):
        opt = build_optimizer(elastic, "adamw", lr=1e-2, weight_decay=0.05)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(elastic(x, subnet=subnet), y).backward()
            assert all(p.grad.stride() == p.stride() for p in elastic.parameters() if p.grad is not None)
            opt.step()
        params.append(dict(elastic.named_parameters()))
    moved = 0
    for name, p in params[0].items():
        torch.testing.assert_close(p, params[1][name], rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(p, before[name])
    assert _column_major(col.adapter.blocks[1].fc2.weight) and moved == len(before)
