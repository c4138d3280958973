"""ElasticViT on timm ViT / DeiT / distilled DeiT: function preservation, prefix execution vs an
independent masking oracle and vs extract(), zero-copy switching, gradients, budgets, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from elastic_oracle import kept_masks, masked_copy, random_subnets, rel_err
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import skd
from skd import DropoutList, ElasticViT, Subnet, UnsupportedModelError

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)
CONFIGS = {
    "vit_cls": lambda: VisionTransformer(**TINY),
    "vit_avg_reg_ls_nobias": lambda: VisionTransformer(
        **TINY, global_pool="avg", class_token=False, reg_tokens=2, init_values=0.5, qkv_bias=False),
    "vit_gelu_tanh_noembedcls": lambda: VisionTransformer(
        **TINY, act_layer="gelu_tanh", no_embed_class=True, reg_tokens=1, mlp_ratio=2.5),
    "deit_distilled": lambda: VisionTransformerDistilled(**TINY),
}


def _make(name: str) -> tuple[nn.Module, ElasticViT]:
    """(an untouched head-major copy of the model, the ElasticViT wrapping the original), eval mode."""
    model = CONFIGS[name]().eval()
    with torch.no_grad():  # random init leaves biases/LayerScale at 0/const; make every term matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    bare = copy.deepcopy(model)
    return bare, ElasticViT(model).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name", CONFIGS)
def test_full_width_wrap_equals_original(name: str, x: torch.Tensor) -> None:
    bare, elastic = _make(name)
    with torch.no_grad():
        err = rel_err(elastic(x), bare(x))
    print(f"{name}: max rel err {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("name", CONFIGS)
def test_random_subnets_match_masking_oracle_and_extract(name: str, x: torch.Tensor) -> None:
    bare, elastic = _make(name)
    for subnet in random_subnets(elastic.head_dims, elastic.hiddens, n=6, seed=hash(name) % 1000):
        with torch.no_grad():
            y = elastic.set_subnet(subnet=subnet)(x)
            oracle = masked_copy(bare, subnet)(x)
            extracted = elastic.extract()(x)
        e_oracle, e_extract = rel_err(y, oracle), rel_err(extracted, y)
        print(f"{subnet}: vs oracle {e_oracle:.2e}, extract vs elastic {e_extract:.2e}")
        assert e_oracle <= 1e-5
        assert e_extract <= 1e-5


def test_extract_is_smaller_plain_timm_and_keeps_full_scale(x: torch.Tensor) -> None:
    _, elastic = _make("vit_cls")
    elastic.set_subnet(keep=0.5)
    small = elastic.extract()
    n_small = sum(p.numel() for p in small.parameters())
    n_full = sum(p.numel() for p in elastic.parameters())
    assert n_small < 0.6 * n_full
    assert all(not type(m).__module__.startswith("skd") for m in small.modules())
    assert all(not m._forward_pre_hooks for m in small.modules())
    assert not any(m.training for m in small.modules())  # follows the eval-mode source
    assert small.blocks[0].attn.head_dim == 8 and small.blocks[0].mlp.fc1.out_features == 96
    # Forgetting the sqrt(r/hd) fold (timm then uses 1/sqrt(r)) would change the output measurably.
    with torch.no_grad():
        y = small(x)
        for blk in small.blocks:
            blk.attn.qkv.weight[: 3 * 8] /= math.sqrt(8 / 16)
            blk.attn.qkv.bias[: 3 * 8] /= math.sqrt(8 / 16)
        assert rel_err(small(x), y) > 1e-3
        assert rel_err(y, elastic(x)) <= 1e-5


def test_switching_copies_no_weight(x: torch.Tensor) -> None:
    model = CONFIGS["vit_cls"]().eval()
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    elastic = ElasticViT(model)
    for keep in (1.0, 0.3, 0.77, 1 / 3):
        with torch.no_grad():
            elastic.set_subnet(keep=keep)(x)
        assert {n: p.data_ptr() for n, p in elastic.model.named_parameters()} == before
        assert {p.untyped_storage().data_ptr() for p in elastic.parameters()} == storages
    with elastic.standard_layout():
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == before
    assert [p.data_ptr() for p in elastic.parameters()] == [p.data_ptr() for p in model.parameters()]


@pytest.mark.parametrize("name", ["vit_cls", "vit_avg_reg_ls_nobias"])
def test_gradients_equal_masking_oracle_on_kept_entries(name: str, x: torch.Tensor, sdpa_route: str) -> None:
    bare, elastic = _make(name)
    subnet = Subnet(attn=[5, 0, 16], mlp=[100, 7, 0])
    target = torch.tensor([1, 7])
    oracle = masked_copy(bare, subnet)
    nn.functional.cross_entropy(oracle(x), target).backward()
    nn.functional.cross_entropy(elastic.set_subnet(subnet=subnet)(x), target).backward()
    masks = kept_masks(bare, subnet)
    expected = dict(oracle.named_parameters())
    with elastic.standard_layout() as model:  # permutes grads back to head-major too
        checked = 0
        for n, p in model.named_parameters():
            # a skipped branch's norm gets no grad at all; the oracle's gets an exact 0 (zeroed weights)
            g = torch.zeros_like(p) if p.grad is None else p.grad
            ref = expected[n].grad
            if n in masks:
                m = masks[n]
                assert torch.equal(g[~m], torch.zeros_like(g[~m])), n  # dropped entries get no gradient
                g, ref = g[m], ref[m]
            if g.numel():
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6, msg=n)
                checked += 1
    assert checked > 20


def test_standard_layout_round_trip_and_edits_carry_over(x: torch.Tensor) -> None:
    bare, elastic = _make("vit_cls")
    with pytest.raises(RuntimeError, match="rank-major"):
        elastic.model(x)
    with torch.no_grad():
        with elastic.standard_layout() as model:
            torch.testing.assert_close(model(x), bare(x), rtol=0, atol=0)
            with pytest.raises(RuntimeError):
                elastic(x)
            model.blocks[1].attn.qkv.weight[5:9] *= 2  # a head-major edit, as WPAC makes
            model.blocks[1].attn.proj.weight[:, 3] *= -1
            expected = model(x)
        bare.blocks[1].attn.qkv.weight[5:9] *= 2
        bare.blocks[1].attn.proj.weight[:, 3] *= -1
        assert rel_err(elastic(x), expected) <= 1e-5
        assert rel_err(elastic.set_subnet(keep=0.5)(x), masked_copy(bare, elastic.subnet)(x)) <= 1e-5


def test_module_semantics() -> None:
    model = CONFIGS["vit_cls"]()
    elastic = ElasticViT(model)
    assert list(elastic.children()) == [model]
    assert set(elastic.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    assert elastic.train().model.training and not elastic.eval().model.training
    assert elastic.to(torch.float64).model.blocks[0].attn.qkv.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="already wrapped"):
        ElasticViT(model)


def test_macs_counted_analytically() -> None:
    elastic = ElasticViT(CONFIGS["vit_cls"]())
    n, d, heads = 17, 48, 3  # 16 patches + class token
    patch = 16 * 3 * 8 * 8 * d
    head = d * 10

    def block(r: int, h: int) -> int:
        return n * d * 3 * heads * r + 2 * heads * n * n * r + n * heads * r * d + 2 * n * d * h

    assert elastic.full_macs == patch + head + 3 * block(16, 192)
    sub = Subnet(attn=[0, 4, 16], mlp=[192, 0, 5])
    assert elastic.macs(sub) == patch + head + block(0, 192) + block(4, 0) + block(16, 5)
    assert elastic.macs() == elastic.full_macs  # active subnet defaults to full


@pytest.mark.parametrize("f", [0.25, 1 / 3, 0.5, 2 / 3, 0.9, 1.0])
def test_macs_budget_picks_largest_uniform_subnet(f: float) -> None:
    elastic = ElasticViT(CONFIGS["vit_cls"]())
    chosen = elastic.set_subnet(macs=f).subnet
    assert elastic.macs() <= f * elastic.full_macs
    # the next larger uniform subnet (one more MLP unit's worth of keep) would exceed the budget
    t = chosen.mlp[0] / 192
    if t < 1:
        assert elastic.macs(elastic.uniform(t + 1 / 192)) > f * elastic.full_macs
    assert elastic.set_subnet(macs=1.0).subnet == Subnet(attn=[16] * 3, mlp=[192] * 3)


def test_dropout_list_index_and_macs() -> None:
    elastic = ElasticViT(CONFIGS["vit_cls"]())
    units = [(2, "mlp")] * 10 + [(0, "attn")] * 3 + [(1, "mlp"), (2, "attn")] * 4
    dl = DropoutList(units, elastic.head_dims, elastic.hiddens)
    elastic.dropout_list = dl
    assert elastic.set_subnet(index=0).subnet == Subnet(attn=[16] * 3, mlp=[192] * 3)
    assert elastic.set_subnet(index=13).subnet == Subnet(attn=[10, 16, 16], mlp=[192, 192, 132])
    assert elastic.set_subnet(index=len(dl)).subnet == dl.subnet(len(dl))
    # macs= follows the list: the first list prefix under budget
    f = 0.97
    sub = elastic.set_subnet(macs=f).subnet
    s = next(s for s in range(len(dl) + 1) if elastic.macs(dl.subnet(s)) <= f * elastic.full_macs)
    assert sub == dl.subnet(s) and s > 0
    with pytest.raises(ValueError, match=r"macs=0\.05 is below"):
        elastic.set_subnet(macs=0.05)
    with pytest.raises(ValueError, match="index=99"):
        elastic.set_subnet(index=99)
    with pytest.raises(ValueError, match="dropout_list was built for"):
        elastic.dropout_list = DropoutList([], [16] * 2, [192] * 2)


def test_dropout_list_structure() -> None:
    dl = DropoutList([(0, "attn"), (1, "mlp"), (0, "attn")], head_dims=[12, 12], hiddens=[40, 40],
                     attn_groups=8, mlp_groups=32)
    # groups of 12 dims in 8: bounds round(g*12/8) = 0,2,3,5,6,8,9,11,12
    assert dl.subnet(1) == Subnet(attn=[11, 12], mlp=[40, 40])
    assert dl.subnet(3) == Subnet(attn=[9, 12], mlp=[40, 39])
    assert dl.unit_group(2) == (6, 9, 11)
    assert dl.droppable()[0, "attn"] == (5, 8, 9)
    assert dl.droppable(0)[1, "mlp"] == (31, 39, 40)
    assert skd.DropoutList.from_json(dl.to_json()) == dl
    tiny = DropoutList([(0, "attn")] * 2, head_dims=[2], hiddens=[4], attn_groups=2, mlp_groups=2)
    assert tiny.subnet(2).attn == (0,) and (0, "attn") not in tiny.droppable()
    with pytest.raises(ValueError, match="no group left"):
        tiny.append((0, "attn"))
    with pytest.raises(ValueError, match="unit module"):
        tiny.append((0, "ffn"))
    with pytest.raises(ValueError, match="block index 3"):
        tiny.append((3, "mlp"))
    with pytest.raises(ValueError, match="not a DropoutList"):
        DropoutList.from_json("{}")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(keep=0), "keep=0"), (dict(keep=-0.1), "keep"), (dict(keep=1.5), "keep"),
        (dict(keep=float("nan")), "keep"), (dict(keep=True), "keep"),
        (dict(macs=0.0), "macs"), (dict(macs=1.01), "macs"), (dict(macs=float("inf")), "macs"),
        (dict(macs=1e-6), r"macs=1e-06 is below"),
        (dict(subnet=Subnet(attn=[16, 16], mlp=[1, 1])), "subnet.attn has 2"),
        (dict(subnet=Subnet(attn=[16, 17, 16], mlp=[1, 1, 1])), r"subnet.attn\[1\]=17"),
        (dict(subnet=Subnet(attn=[16, 16, 16], mlp=[1, -1, 1])), r"subnet.mlp\[1\]=-1"),
        (dict(subnet=[16, 16, 16]), "subnet must be"),
        (dict(index=2), "index= needs a dropout list"),
        (dict(latency_ms=5.0), "profile_latency"), (dict(latency_ms=-1.0), "latency_ms"),
        (dict(), "exactly one"), (dict(keep=0.5, macs=0.5), "exactly one"),
    ],
)
def test_bad_budgets_raise_naming_argument(kwargs: dict, match: str) -> None:
    elastic = ElasticViT(CONFIGS["vit_cls"]())
    with pytest.raises(ValueError, match=match):
        elastic.set_subnet(**kwargs)
    assert elastic.subnet == Subnet(attn=[16] * 3, mlp=[192] * 3)  # unchanged by a failed call


def test_subnet_type_checks() -> None:
    with pytest.raises(ValueError, match=r"subnet.attn\[1\]"):
        Subnet(attn=[1, 2.5], mlp=[1, 1])
    with pytest.raises(ValueError, match=r"subnet\.mlp must be a list"):
        Subnet(attn=[1], mlp=3)
    with pytest.raises(ValueError, match="2 blocks"):
        Subnet(attn=[1, 1], mlp=[1])
    assert Subnet(attn=[1, 2], mlp=[3, 4]) == Subnet(attn=(1, 2), mlp=(3, 4))


def test_unsupported_models_raise() -> None:
    with pytest.raises(UnsupportedModelError, match="qk_norm"):
        ElasticViT(VisionTransformer(**TINY, qk_norm=True))
    with pytest.raises(UnsupportedModelError, match="scale_norm"):
        ElasticViT(VisionTransformer(**TINY, scale_attn_norm=True))
    with pytest.raises(UnsupportedModelError, match=r"mlp\.norm"):
        ElasticViT(VisionTransformer(**TINY, scale_mlp_norm=True))
    with pytest.raises(UnsupportedModelError, match=r"ResNet is not supported"):
        ElasticViT(timm.create_model("resnet10t", num_classes=2))
    # WPAC reads the adapter of a qk_norm model and reports it itself
    spec = skd.models.adapter_for(VisionTransformer(**TINY, qk_norm=True)).blocks[0]
    assert spec.has_qk_norm and spec.head_dim == 16 and spec.hidden == 192


def test_latency_profile_and_budget(x: torch.Tensor) -> None:
    elastic = ElasticViT(CONFIGS["vit_cls"]()).eval()
    table = elastic.profile_latency(x, points=4, repeats=2)
    assert len(table) == 4 and table[-1][0] == elastic.full_macs
    assert elastic.subnet == Subnet(attn=[16] * 3, mlp=[192] * 3)  # restored
    assert elastic.set_subnet(latency_ms=1e6).subnet == elastic.uniform(1.0)
    # The table is raw timings; predictions use its running maximum (noise must not make a bigger subnet look
    # faster), so the middle target is taken from that: a load spike on one point then cannot push it below.
    running = [max(ms for _, ms in table[: j + 1]) for j in range(len(table))]
    mid = elastic.set_subnet(latency_ms=(running[1] + running[-1]) / 2).macs()
    assert table[0][0] <= mid <= elastic.full_macs
    with pytest.raises(ValueError, match=r"latency_ms=1e-09 is below"):
        elastic.set_subnet(latency_ms=1e-9)


def test_train_mode_and_grad_through_prefix(x: torch.Tensor) -> None:
    model = VisionTransformer(**TINY, drop_path_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1)
    elastic = ElasticViT(model).train().set_subnet(keep=0.5)
    elastic(x).sum().backward()
    qkv = elastic.model.blocks[0].attn.qkv.weight
    assert qkv.grad[: 3 * 3 * 8].abs().sum() > 0 and qkv.grad[3 * 3 * 8:].abs().sum() == 0


def test_torch_compile_fixed_subnet_matches(x: torch.Tensor) -> None:
    _, elastic = _make("vit_cls")
    elastic.set_subnet(subnet=Subnet(attn=[5, 0, 16], mlp=[100, 7, 0]))
    with torch.no_grad():
        expected = elastic(x)
        compiled = torch.compile(elastic, backend="aot_eager", fullgraph=False)
        assert rel_err(compiled(x), expected) <= 1e-5


@pytest.mark.slow
def test_torch_compile_inductor_matches(x: torch.Tensor) -> None:
    _, elastic = _make("vit_cls")
    elastic.set_subnet(keep=0.5)
    with torch.no_grad():
        expected = elastic(x)
        assert rel_err(torch.compile(elastic)(x), expected) <= 1e-5


def test_bf16_runs_and_matches_extract(x: torch.Tensor) -> None:
    _, elastic = _make("vit_cls")
    elastic.set_subnet(subnet=Subnet(attn=[5, 0, 16], mlp=[100, 7, 0]))
    with torch.no_grad():
        expected = elastic(x)
        half = elastic.to(torch.bfloat16)
        y = half(x.bfloat16())
        assert y.dtype == torch.bfloat16
        assert rel_err(y.float(), expected) <= 3e-2  # bf16 rounding (8 mantissa bits) through 3 blocks
        assert rel_err(half.extract()(x.bfloat16()).float(), y.float()) <= 3e-2
