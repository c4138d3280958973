"""Budget-chosen widths at a granularity (ElasticViT.multiple_of): multiples of g or full, within budget,
monotone, the attention kept near its share, g = 1 exactly the floor-uniform subnets."""

from __future__ import annotations

import math
import pickle

import pytest
import timm
import torch
from cli_helpers import skd as run_skd
from timm.models.swin_transformer import SwinTransformer

import skd
from skd import DropoutList, ElasticViT, Subnet
from skd.elastic.budget import LatencyTable, multiple_of_for
from skd.io import load_tensors, save_tensors

FRACTIONS = [0.05, 0.1, 0.2, 0.24, 0.2499, 0.25, 0.3, 1 / 3, 0.4, 0.5, 0.6, 2 / 3, 0.75, 0.9, 0.97, 1.0]


def _vit_small(**kw) -> ElasticViT:
    """ViT-S widths (6 heads of 64, hidden 1536) at 224 px, four blocks (the per-block shares are ViT-S's)."""
    return ElasticViT(timm.create_model("vit_small_patch16_224", depth=4, num_classes=10), **kw)


def _swin(**kw) -> ElasticViT:
    """Swin with head dim 32 and hidden sizes 128 and 256: blocks of different widths."""
    return ElasticViT(SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2),
                                      num_heads=(1, 2), num_classes=5), **kw)


def _tiny(**kw) -> ElasticViT:
    """Head dim 16, hidden 192: too narrow for the default alignment."""
    return ElasticViT(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=3,
                                        num_heads=3, num_classes=10), **kw)


def _allowed(w: int, n: int, g: int) -> bool:
    return w in (0, n) or (0 < w <= n and w % g == 0)


def _nearest(t: float, n: int, g: int) -> int:
    """Oracle: the allowed width nearest t*n, ties to the larger (by enumeration)."""
    return min((w for w in range(n + 1) if _allowed(w, n, g)), key=lambda w: (abs(w - t * n), -w))


def _reachable(e: ElasticViT) -> list[float]:
    """FRACTIONS at or above the empty subnet's (the layers outside attention and MLP)."""
    empty = e.macs(Subnet(attn=[0] * len(e.head_dims), mlp=[0] * len(e.hiddens)))
    return [f for f in FRACTIONS if f * e.full_macs >= empty]


def _aligned_members(e: ElasticViT) -> list[tuple[int, Subnet]]:
    """Oracle for a model with one head dim and one hidden size: (MACs, subnet) of every (attention a,
    MLP m) pair of allowed widths whose attention is the one nearest its own MACs fraction's share."""
    g, (hd,), (n,) = e.multiple_of, set(e.head_dims), set(e.hiddens)
    blocks = len(e.head_dims)
    other = e.macs(Subnet(attn=[0] * blocks, mlp=[0] * blocks))
    out = []
    for a in (w for w in range(hd + 1) if _allowed(w, hd, g)):
        for m in (w for w in range(n + 1) if _allowed(w, n, g)):
            s = Subnet(attn=[a] * blocks, mlp=[m] * blocks)
            macs = e.macs(s)
            if _nearest((macs - other) / (e.full_macs - other), hd, g) == a:
                out.append((macs, s))
    return out


def _brute_force_floor_uniform(e: ElasticViT, limit: float) -> Subnet:
    """Oracle of the landed behaviour: the floor(t*n) subnet with the most MACs <= limit over every t."""
    points = {i / n for n in (*e.head_dims, *e.hiddens) for i in range(n + 1)}
    subnets = [Subnet(attn=[math.floor(t * n + 1e-9) for n in e.head_dims],
                      mlp=[math.floor(t * n + 1e-9) for n in e.hiddens]) for t in points]
    return max((s for s in subnets if e.macs(s) <= limit), key=e.macs)


def test_default_granularity() -> None:
    assert _vit_small().multiple_of == 8
    assert _swin().multiple_of == 1 and _tiny().multiple_of == 1  # head dims 32 and 16
    assert multiple_of_for(None, [64, 64], [1536, 1540]) == 1  # a hidden size that is not a multiple of 8
    assert multiple_of_for(None, [64], [256]) == 8 and multiple_of_for(None, [64, 32], [256, 128]) == 1
    assert multiple_of_for(4, [64], [256]) == 4
    assert _vit_small(multiple_of=1).multiple_of == 1 and _tiny(multiple_of=4).multiple_of == 4


@pytest.mark.parametrize("make, g", [(_vit_small, 8), (_swin, 8), (_tiny, 8), (_tiny, 12), (_vit_small, 16)])
def test_budget_widths_are_aligned_within_budget_and_monotone(make, g: int) -> None:
    e = make(multiple_of=g)
    last = 0
    for f in _reachable(e):
        s = e.set_subnet(macs=f).subnet
        for widths, fulls in ((s.attn, e.head_dims), (s.mlp, e.hiddens)):
            assert all(_allowed(w, n, g) for w, n in zip(widths, fulls, strict=True)), (f, s)
        assert e.macs() <= f * e.full_macs
        assert e.macs() >= last  # a bigger budget never gets a smaller subnet
        last = e.macs()
        # the MLP is proportional to each block's hidden size: one fraction t floors to every block's width
        lo = max(m / n for m, n in zip(s.mlp, e.hiddens, strict=True))
        hi = min((m + g) / n if m < n else 1.0 for m, n in zip(s.mlp, e.hiddens, strict=True))
        assert lo <= hi + 1e-12, s
        keep = e.uniform(f)
        assert all(_allowed(w, n, g) for w, n in zip(keep.attn + keep.mlp, e.head_dims + e.hiddens, strict=True))
    assert e.set_subnet(macs=1.0).subnet == Subnet(attn=e.head_dims, mlp=e.hiddens)


@pytest.mark.parametrize("g", [8, 16])
def test_budget_is_the_largest_aligned_member(g: int) -> None:
    e = _vit_small(multiple_of=g)
    members = _aligned_members(e)
    for f in _reachable(e):
        best = max((m for m in members if m[0] <= f * e.full_macs), key=lambda m: m[0])[1]
        assert e.set_subnet(macs=f).subnet == best, f


def test_just_under_a_quarter_keeps_the_attention_near_its_share() -> None:
    """Flooring both modules to multiples of 8 would give head dim 8 just under 1/4 of the MACs (t*64 < 16):
    the attention keeps 16 and the MLP gives way."""
    e = _vit_small()
    for f in (0.2499, 0.25):
        s = e.set_subnet(macs=f).subnet
        assert s.attn == (16,) * 4 and s.mlp[0] < 384, s
        # the MLP is the largest that fits beside that attention
        assert e.macs(Subnet(attn=s.attn, mlp=[m + 8 for m in s.mlp])) > f * e.full_macs
    assert e.uniform(0.24) == Subnet(attn=[16] * 4, mlp=[368] * 4)  # 15.4 -> 16; 368.6 -> 368
    assert e.set_subnet(keep=0.24).subnet == e.uniform(0.24)


@pytest.mark.parametrize("make", [_vit_small, _swin, _tiny])
def test_multiple_of_1_is_the_floor_uniform_family(make) -> None:
    e = make(multiple_of=1)
    for f in _reachable(e):
        assert e.set_subnet(macs=f).subnet == _brute_force_floor_uniform(e, f * e.full_macs), f
        assert e.uniform(f) == Subnet(attn=[math.floor(f * n + 1e-9) for n in e.head_dims],
                                      mlp=[math.floor(f * n + 1e-9) for n in e.hiddens])
    assert e.narrowest() == e.uniform(1 / max(*e.head_dims, *e.hiddens))  # what the CLI used before


def test_narrowest_and_smallest_budget() -> None:
    e = _vit_small()
    narrow, nothing = e.narrowest(), Subnet(attn=[0] * 4, mlp=[0] * 4)
    assert narrow != nothing and narrow.attn == nothing.attn and set(narrow.mlp) == {8}
    empty = e.macs(nothing)
    below = (empty + e.macs(narrow)) / 2 / e.full_macs
    with pytest.raises(ValueError, match="below the smallest reachable"):
        e.set_subnet(macs=empty / e.full_macs * 0.999)
    assert e.set_subnet(macs=below).subnet == nothing  # the empty subnet is a member
    assert e.set_subnet(macs=e.macs(narrow) / e.full_macs * (1 + 1e-12)).subnet == narrow


def test_latency_budget_is_aligned() -> None:
    e = ElasticViT(timm.create_model("vit_small_patch16_224", img_size=32, depth=2, num_classes=10)).eval()
    table = e.profile_latency(torch.randn(1, 3, 32, 32), points=3, repeats=1)
    # the budgets at the table's monotonised points: a raw point measured faster than a smaller subnet (a loaded
    # machine) can be under every prediction
    for _, ms in LatencyTable(table).points:
        s = e.set_subnet(latency_ms=ms * 1.01).subnet
        assert all(_allowed(w, n, 8) for w, n in zip(s.attn + s.mlp, e.head_dims + e.hiddens, strict=True))


def test_explicit_subnets_and_dropout_lists_are_not_aligned() -> None:
    e = _vit_small()
    odd = Subnet(attn=[15, 31, 1, 64], mlp=[375, 767, 0, 3])
    assert e.set_subnet(subnet=odd).subnet == odd
    dl = DropoutList([(0, "mlp"), (1, "attn"), (0, "mlp")], e.head_dims, e.hiddens, attn_groups=7, mlp_groups=13)
    e.dropout_list = dl
    assert e.set_subnet(index=2).subnet == dl.subnet(2)
    for s in range(len(dl) + 1):  # macs= follows the list: its first prefix within budget, unaligned widths
        assert e.set_subnet(macs=e.macs(dl.subnet(s)) / e.full_macs).subnet == dl.subnet(s)
    assert dl.subnet(3).mlp[0] % 8 != 0


@pytest.mark.parametrize("bad", [0, -8, 8.0, True, "8"])
def test_bad_multiple_of_is_refused(bad) -> None:
    with pytest.raises(ValueError, match="multiple_of"):
        _tiny(multiple_of=bad)
    e = _tiny()
    with pytest.raises(ValueError, match="multiple_of"):
        e.multiple_of = bad
    assert e.multiple_of == 1  # unchanged


def test_saved_granularity_loads_and_older_files_get_the_default(tmp_path) -> None:
    e = _vit_small(multiple_of=1)
    path = tmp_path / "m.safetensors"
    skd.save(e, path)
    loaded = skd.load(path)
    assert loaded.multiple_of == 1
    assert loaded.set_subnet(macs=0.25).subnet == e.set_subnet(macs=0.25).subnet
    tensors, meta = load_tensors(path)
    del meta["multiple_of"]  # as written before the granularity existed
    save_tensors(tmp_path / "old.safetensors", tensors, meta)
    assert skd.load(tmp_path / "old.safetensors").multiple_of == 8


def test_pickles_from_before_the_granularity_load_with_floor_uniform_widths() -> None:
    """A pickled (torch.save of the module, not skd.save) ElasticViT whose budgets predate multiple_of
    chose floor-uniform widths: unpickled, it has multiple_of 1 and picks the same subnets as before."""
    e = _vit_small()
    old = pickle.loads(pickle.dumps(e))
    del old._budgets.__dict__["multiple_of"]  # as pickled before the granularity existed
    loaded = pickle.loads(pickle.dumps(old))
    assert loaded.multiple_of == 1 and e.multiple_of == 8
    assert loaded.set_subnet(macs=0.25).subnet == _brute_force_floor_uniform(loaded, 0.25 * loaded.full_macs)
    assert pickle.loads(pickle.dumps(e)).multiple_of == 8  # a current pickle keeps its own


def test_cli_multiple_of(tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    skd.save(_vit_small(), path)
    outs = {}
    for flag in ((), ("--multiple-of", "1")):
        out = tmp_path / f"x{len(flag)}.safetensors"
        r = run_skd("extract", str(path), "--macs", "0.25", "--out", str(out), *flag)
        assert r.returncode == 0, r.stderr
        outs[flag] = skd.load(out).skd_subnet
    assert outs[()]["attn"] == [16] * 4 and all(m % 8 == 0 for m in outs[()]["mlp"])
    assert outs[("--multiple-of", "1")] == _vit_small(multiple_of=1).set_subnet(macs=0.25).subnet.to_dict()
    info = run_skd("info", str(path), "--multiple-of", "4")
    assert info.returncode == 0 and "budget widths: multiples of 4" in info.stdout
    bad = run_skd("info", str(path), "--multiple-of", "0")
    assert bad.returncode == 2 and "--multiple-of" in bad.stderr
