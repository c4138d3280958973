"""skd.importance on the trained digits ViT: MACs per unit, module sensitivity, Taylor α, list growth."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import skd
from skd.importance import estimate_importance, extend_dropout_list, macs_per_dim, unit_importance, unit_macs
from skd.subnet import DropoutList, Group, Subnet

N_PROXY = 48


@pytest.fixture
def elastic(digits_vit):
    return skd.ElasticViT(digits_vit)


@pytest.fixture
def proxy(digits_data):
    return DataLoader(Subset(digits_data[0], range(N_PROXY)), batch_size=16)


def test_macs_per_dim_is_exact(elastic):
    per_dim = macs_per_dim(elastic)
    zero = elastic.macs(Subnet(attn=[0] * 4, mlp=[0] * 4))
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        attn = torch.randint(0, 33, (4,), generator=gen).tolist()
        mlp = torch.randint(0, 385, (4,), generator=gen).tolist()
        predicted = zero + sum(per_dim[b, "attn"] * a for b, a in enumerate(attn)) + sum(
            per_dim[b, "mlp"] * h for b, h in enumerate(mlp))
        assert predicted == elastic.macs(Subnet(attn=attn, mlp=mlp))
    assert unit_macs(per_dim, (0, "mlp"), Group(31, 372, 384)) == 12 * per_dim[0, "mlp"]


def _mean_ce(elastic, loader, subnet):
    elastic.eval().set_subnet(subnet)
    with torch.no_grad():
        return sum(F.cross_entropy(elastic(x), y, reduction="sum").item() for x, y in loader) / N_PROXY


def _taylor_oracle(elastic, loader):
    """Plain PyTorch: bare timm model in head-major layout, hooks on qkv and fc1's activation."""
    scores, acts = {}, {}
    with elastic.standard_layout() as model:
        model.eval()
        for x, y in loader:
            acts.clear()
            hooks = []
            for b, blk in enumerate(model.blocks):
                hooks.append(blk.attn.qkv.register_forward_hook(lambda m, i, o, b=b: acts.__setitem__((b, "attn"), o)))
                hooks.append(blk.mlp.act.register_forward_hook(lambda m, i, o, b=b: acts.__setitem__((b, "mlp"), o)))
            loss = F.cross_entropy(model(x), y, reduction="sum")
            for h in hooks:
                h.remove()
            keys = list(acts)
            grads = torch.autograd.grad(loss, [acts[k] for k in keys])
            for k, g in zip(keys, grads, strict=True):
                per_channel = (g * acts[k]).sum(1).abs().sum(0).double()  # Σ_b |Σ_t g·a|
                if k[1] == "attn":  # (3·H·hd) head-major -> per rank index, summed over q/k/v and heads
                    per_channel = per_channel.view(3, 3, 32).sum((0, 1))
                scores[k] = scores.get(k, 0) + per_channel
    return scores


def test_importance_matches_definitions(elastic, proxy):
    subnet = Subnet(attn=[32, 24, 32, 16], mlp=[384, 384, 192, 384])
    imp = estimate_importance(elastic, proxy, N_PROXY, subnet)
    assert elastic.subnet == elastic.uniform(1.0)  # active subnet restored
    base = _mean_ce(elastic, proxy, subnet)
    assert imp.loss == pytest.approx(base, rel=1e-5)
    for b, m in [(1, "attn"), (2, "mlp"), (0, "mlp")]:
        widths = {"attn": list(subnet.attn), "mlp": list(subnet.mlp)}
        widths[m][b] = 0
        expected = (_mean_ce(elastic, proxy, Subnet(**widths)) - base) / base
        print(b, m, imp.gamma[b, m], expected)
        assert imp.gamma[b, m] == pytest.approx(expected, rel=1e-4)
    oracle = _taylor_oracle(elastic, proxy)
    for (b, m), alpha in imp.alpha.items():
        kept = getattr(subnet, m)[b]
        assert alpha.shape == (kept,)
        assert float(alpha.sum()) == pytest.approx(1.0)
        ref = oracle[b, m][:kept] / oracle[b, m][:kept].sum()
        err = (alpha - ref).abs().max().item()
        print(b, m, "max |α - oracle|", err)
        assert err < 1e-5
        assert torch.allclose(imp.dims((b, m)), imp.gamma[b, m] * alpha)


def test_extend_dropout_list_greedy_and_prefix_consistent(elastic, proxy):
    imp = estimate_importance(elastic, proxy, N_PROXY)
    per_dim = macs_per_dim(elastic)
    dl = DropoutList([], elastic.head_dims, elastic.hiddens)
    first = dl.droppable()
    cheapest = min(first, key=lambda u: unit_importance(imp, per_dim, u, first[u]))
    goal = 0.3 * elastic.full_macs
    added = extend_dropout_list(dl, imp, per_dim, goal)
    assert added == dl.units and added[0] == cheapest
    dropped = elastic.full_macs - elastic.macs(dl.subnet(len(dl)))
    last = unit_macs(per_dim, dl.units[-1], dl.unit_group(len(dl) - 1))
    assert goal <= dropped < goal + last  # stops at the first unit that reaches the goal
    for s in range(len(dl)):
        a, b = dl.subnet(s), dl.subnet(s + 1)
        assert all(y <= x for x, y in zip(a.attn + a.mlp, b.attn + b.mlp, strict=True))
        assert sum(x - y for x, y in zip(a.attn + a.mlp, b.attn + b.mlp, strict=True)) > 0


def test_empty_group_is_dropped_first(elastic, proxy):
    imp = estimate_importance(elastic, proxy, N_PROXY)
    assert unit_importance(imp, macs_per_dim(elastic), (0, "attn"), Group(3, 5, 5)) == float("-inf")
