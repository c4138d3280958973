"""skd.attention_stats: the explicit-attention pass computes the model's own output (timm ViT, Swin with
window bias and shift mask, HF BERT with padding, HF ViT), and its two accumulators equal brute-force
float64 references (explicit loops over heads and token pairs; the score fit as a weighted least squares over
explicit pair features) on tiny random models; the stored fit never predicts the calibration scores worse
than no fit."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

import skd
from skd import score_fit as fits
from skd.attention_stats import (
    LENGTH_GROUPS,
    RIDGE,
    JointQK,
    ScoreFit,
    _length_groups,
    attention_pass,
    explicit_forward,
)
from skd.models import adapter_for
from skd.score_fit import q_linear
from skd.stats import CalibrationStats, calibrate
from skd.wpac import SCORE_FIT_SHARE
from tests import hf_helpers
from tests.test_wpac_plus import MODELS, _randomised

TIMM = ("vit_cls", "vit_reg_nobias", "vit_qk_norm", "swin")
HF = ("BertModel", "ViTForImageClassification")


def text_batches(n: int = 3, size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded token batches (lengths 3..9 of 9) for the tiny HF text models."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(3, 10, (size,), generator=g)
        mask = (torch.arange(9)[None] < lengths[:, None]).long()
        ids = torch.randint(3, 50, (size, 9), generator=g) * mask
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def image_batches(shape: tuple[int, ...], n: int = 3, size: int = 4, seed: int = 0) -> list:
    """(images, labels) batches of images of `shape` (C, H, W), labels in 0..4."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


def model_and_data(name: str, seed: int = 0) -> tuple[nn.Module, list]:
    """A tiny randomised model of `name` (TIMM or HF) and calibration batches for it."""
    if name in HF:
        model = hf_helpers.tiny(name)
        data = text_batches(seed=seed) if name == "BertModel" else \
            [{"pixel_values": x, "labels": y} for x, y in image_batches((3, 16, 16), seed=seed)]
        return model, data
    return _randomised(MODELS[name]), image_batches((3, 32, 32), seed=seed)


def output(model: nn.Module, batch) -> torch.Tensor:
    return hf_helpers.main_output(skd.batches.call(model, batch)) if isinstance(batch, dict) else \
        skd.batches.call(model, batch)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", [*TIMM, *HF, "BertModel/eager"])
def test_explicit_forward_is_the_models_forward(name: str) -> None:
    model, data = model_and_data(name.split("/")[0], seed=5)  # fresh inputs: another seed than calibration
    if name.endswith("/eager"):  # transformers' eager path: a float additive mask instead of a bool one
        model = hf_helpers.tiny("BertModel", impl="eager")
    adapter = adapter_for(model)
    seen = []

    class Count:
        def update(self, i, q, k, v, a, w):
            seen.append(i)
            assert torch.allclose(a.sum(-1), torch.ones_like(a[..., 0]), atol=1e-5)

        def tensors(self):
            return []

    for batch in data[:2]:
        with torch.no_grad():
            ref = output(model, batch)
            got = explicit_forward(adapter, batch, [Count()])
        got = hf_helpers.main_output(got) if isinstance(batch, dict) else got
        assert rel(got, ref) <= 1e-5
    assert seen == list(range(len(adapter.blocks))) * 2


@pytest.mark.parametrize("name", ["vit_cls", "BertModel"])
def test_pass_through_a_block_feeds_the_same_statistics_and_runs_nothing_after(name: str) -> None:
    """attention_pass(through=i) (the score fit's pass ends at the last fitted block): the accumulators see
    blocks 0..i only, with the statistics of the whole pass, and no MLP from block i on runs."""
    model, data = model_and_data(name)
    adapter = adapter_for(model)
    blocks = adapter.blocks
    assert len(blocks) >= 2
    through = len(blocks) - 2
    full, part = (ScoreFit(blocks, torch.device("cpu")) for _ in range(2))
    attention_pass(adapter, data, [full], num_samples=12, progress=False)
    seen, mlps = [], []

    class Count:
        def update(self, i, q, k, v, a, w):
            seen.append(i)

        def tensors(self):
            return []

    hooks = [spec.fc1.register_forward_hook(lambda m, a, o, i=i: mlps.append(i)) for i, spec in enumerate(blocks)]
    try:
        attention_pass(adapter, data, [part, Count()], num_samples=12, progress=False, through=through)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == list(range(through + 1)) * len(data)
    assert mlps == list(range(through)) * len(data)
    for i in range(len(blocks)):
        for got, ref in zip(part.moments[i], full.moments[i], strict=True):
            assert bool(ref.any())
            if i <= through:
                torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
            else:
                assert not bool(got.any())
    with pytest.raises(ValueError, match=f"through={len(blocks)}: the model has blocks 0 to {len(blocks) - 1}"):
        attention_pass(adapter, data, [part], num_samples=12, progress=False, through=len(blocks))


@pytest.mark.parametrize("name", ["vit_cls", "vit_qk_norm"])
def test_score_fit_pass_runs_only_when_a_block_can_be_fitted(name: str) -> None:
    """skd.wpac(score_fit=True) reads the data a second time (the fit's pass) only when some block has a fit
    to gather: every block of vit_qk_norm has qk_norm (no fit, ScoreFit.last_block None)."""
    model, data = model_and_data(name)
    blocks = adapter_for(model).blocks
    last = ScoreFit(blocks, torch.device("cpu")).last_block
    assert last == (None if name == "vit_qk_norm" else len(blocks) - 1)

    class Counted:
        iterations = 0

        def __iter__(self):
            Counted.iterations += 1
            return iter(data)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qk_norm's permutation warning
        skd.wpac(model, Counted(), num_samples=12, criterion="wpac+", progress=False, score_fit=True)
    assert Counted.iterations == (1 if last is None else 2)


# ------------------------------------------------------------------------------ brute-force references
def _per_head(model: nn.Module, batch) -> list[dict[str, torch.Tensor]]:
    """Per block, from the model's own forward (hooks on the q/k/v Linears): q, k, v (B, H, T, hd) and the
    attention A (B, H, T, T) float64 with padding keys masked, the token mask (B, T) and W_o (H, D, hd)."""
    blocks = adapter_for(model).blocks
    outs = {}
    hooks = []
    for i, spec in enumerate(blocks):
        for name, lin in ([("qkv", spec.qkv)] if spec.fused else [("q", spec.q), ("k", spec.k), ("v", spec.v)]):
            hooks.append(lin.register_forward_hook(lambda m, a, o, key=(i, name): outs.__setitem__(key, o.detach())))
    with torch.no_grad():
        skd.batches.call(model, batch)
    for h in hooks:
        h.remove()
    res = []
    for i, spec in enumerate(blocks):
        h, hd = spec.num_heads, spec.head_dim
        if spec.fused:
            q, k, v = outs[i, "qkv"].double().chunk(3, -1)
        else:
            q, k, v = (outs[i, n].double() for n in "qkv")
        q, k, v = (t.reshape(t.shape[0], t.shape[1], h, hd).transpose(1, 2) for t in (q, k, v))
        mask = batch["attention_mask"].double() if isinstance(batch, dict) and "attention_mask" in batch \
            else torch.ones(q.shape[0], q.shape[2], dtype=torch.float64)
        logits = q @ k.mT * spec.scale
        logits = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        w_o = spec.proj.weight.detach().double().view(-1, h, hd).transpose(0, 1)
        res.append(dict(q=q, k=k, v=v, a=logits.softmax(-1), mask=mask, w_o=w_o))
    return res


def _calibrate(model: nn.Module, data: list, accumulators: list, **kwargs) -> CalibrationStats:
    """skd.stats.calibrate as skd.wpac(criterion="wpac+", compensate=True, cross_head=True) runs it, feeding
    `accumulators` in its gradient pass when given."""
    adapter = adapter_for(model)
    return calibrate(model, adapter.blocks, data, num_samples=12, covariance="weighted", progress=False,
                     loss_fn=functools.partial(adapter.default_loss, reduction="sum"),
                     token_weights=adapter.token_weights, context=True, moments=True, context_full=True,
                     accumulators=accumulators, adapter=adapter if accumulators else None, **kwargs)


@pytest.mark.parametrize("via", ["attention_pass", "calibrate"])
@pytest.mark.parametrize("name", ["vit_cls", "BertModel"])
def test_joint_qk_covariances_equal_a_brute_force_reference(name: str, via: str) -> None:
    """Collected by the no-grad attention pass or by calibrate's gradient pass (skd.wpac's joint_qk)."""
    model, data = model_and_data(name)
    adapter = adapter_for(model)
    acc = JointQK(adapter.blocks, torch.device("cpu"))
    if via == "attention_pass":
        assert attention_pass(adapter, data, [acc], num_samples=12, progress=False) == 12
    else:
        assert int(_calibrate(model, data, [acc]).samples) == 12
    for i, spec in enumerate(adapter.blocks):
        h = spec.num_heads
        sums = {n: [torch.zeros(h, dtype=torch.float64), torch.zeros(h, spec.head_dim, dtype=torch.float64),
                    torch.zeros(h, spec.head_dim, spec.head_dim, dtype=torch.float64)] for n in "qk"}
        for batch in data:
            t = _per_head(model, batch)[i]
            for b in range(t["q"].shape[0]):
                real = [j for j in range(t["q"].shape[2]) if t["mask"][b, j] > 0]
                for hh in range(h):
                    a = t["a"][b, hh]
                    v = t["v"][b, hh]
                    ctx = {i_: sum(a[i_, j] * v[j] for j in real) for i_ in real}
                    w = {(i_, j): a[i_, j] ** 2 * (t["w_o"][hh] @ (v[j] - ctx[i_])).square().sum()
                         for i_ in real for j in real}
                    query_w = {p: sum(w[p, j] for j in real) for p in real}  # a_i = Σ_j w_ij
                    key_w = {p: sum(w[i_, p] for i_ in real) for p in real}  # b_j = Σ_i w_ij
                    for n, x, weight in (("q", t["q"][b, hh], query_w), ("k", t["k"][b, hh], key_w)):
                        for p in real:
                            wp = weight[p]
                            sums[n][0][hh] += wp
                            sums[n][1][hh] += wp * x[p]
                            sums[n][2][hh] += wp * torch.outer(x[p], x[p])
        ref = 0
        for n in "qk":
            total, first, second = sums[n]
            mean = first / total[:, None]
            ref = ref + second / total[:, None, None] - mean[:, :, None] * mean[:, None, :]
        got = acc.covariance(i)
        assert got.dtype == torch.float64 and got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def _joint_weights_formed(spec, v: torch.Tensor, a: torch.Tensor, w: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """JointQK's query and key weights (S, H, N) the direct way (session 4's formula, the oracle): the pair
    weights w_ij = A_ij² ‖W_o,h (v_j − ctx_i)‖² formed as (S, H, N, N), masked, summed over keys / queries."""
    h, hd = spec.num_heads, spec.head_dim
    w_o = spec.proj.weight.detach().view(-1, h, hd).transpose(0, 1).to(v.dtype)
    metric = w_o.mT @ w_o
    ctx = a @ v
    vm, cm = v @ metric[None], ctx @ metric[None]
    dist = (vm * v).sum(-1)[:, :, None, :] - 2 * cm @ v.mT + (cm * ctx).sum(-1)[..., None]
    pair = a.square() * dist.clamp_min(0)
    if w is not None:
        pair = pair * w[:, None, :, None] * w[:, None, None, :]
    return pair.sum(-1), pair.sum(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padded", [False, True])
def test_joint_qk_update_equals_the_formed_pair_weights(dtype: torch.dtype, padded: bool) -> None:
    """JointQK.update sums the pair weights by GEMMs without forming them: its moments equal those of the
    formed (S, H, N, N) weights on random q, k, v and attention, with padding (queries and keys of each
    sequence's tail weigh 0, and the padding keys still get attention, so the masks must do the zeroing)."""
    model, _ = model_and_data("vit_cls")
    spec = adapter_for(model).blocks[0]
    h, hd = spec.num_heads, spec.head_dim
    g = torch.Generator().manual_seed(11)
    s, n = 5, 13
    q, k, v = (torch.randn(s, h, n, hd, generator=g, dtype=torch.float64) for _ in range(3))
    a = (3 * torch.randn(s, h, n, n, generator=g, dtype=torch.float64)).softmax(-1)
    lengths = torch.tensor([13, 9, 4, 1, 7])
    w = (torch.arange(n)[None] < lengths[:, None]).to(torch.float64) if padded else None
    acc = JointQK([spec], torch.device("cpu"))
    with torch.no_grad():
        acc.update(0, *(t.to(dtype) for t in (q, k, v, a)), None if w is None else w.to(dtype))
        q_weight, k_weight = _joint_weights_formed(spec, v, a, w)  # float64
    for name, x, weight in (("q", q, q_weight), ("k", k, k_weight)):
        x, weight = x.transpose(0, 1).reshape(h, -1, hd), weight.transpose(0, 1).reshape(h, -1)
        ref = [weight.sum(-1), torch.einsum("ht,htd->hd", weight, x), (x * weight[..., None]).mT @ x]
        for got, r in zip(acc.moments[0][name], ref, strict=True):
            assert bool(r.abs().max() > 0)
            tol = 1e-6 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(got, r, rtol=tol, atol=tol * float(r.abs().max()))


@pytest.mark.parametrize("padding", ["ragged", "all short", "left", "with an empty sequence"])
def test_joint_qk_length_groups_give_the_formed_pair_weights(padding: str) -> None:
    """JointQK.update trims padded batches (sorted into length groups, or the whole batch to its longest
    sequence, or nothing: left padding) and still equals the formed (S, H, N, N) pair weights, padding keys
    getting attention as in test_joint_qk_update_equals_the_formed_pair_weights."""
    model, _ = model_and_data("vit_cls")
    spec = adapter_for(model).blocks[0]
    h, hd = spec.num_heads, spec.head_dim
    g = torch.Generator().manual_seed(13)
    s, n = 9, 16
    lengths = {"ragged": [16, 3, 5, 12, 7, 9, 2, 14, 11], "all short": [10, 9, 10, 8, 10, 10, 7, 10, 9],
               "left": [16] * 9, "with an empty sequence": [0, 4, 6, 3, 5, 16, 2, 5, 4]}[padding]
    w = (torch.arange(n)[None] < torch.tensor(lengths)[:, None]).double()
    if padding == "left":
        w = (torch.arange(n)[None] >= torch.tensor([0, 4, 9, 2, 15, 7, 1, 3, 6])[:, None]).double()
    groups = _length_groups(w, s, n)
    if padding in ("all short", "left"):  # one group, all sequences, trimmed to the longest
        assert groups == [(None, 10 if padding == "all short" else n)]
    else:
        assert len(groups) == LENGTH_GROUPS
        assert sorted(torch.cat([seqs for seqs, _ in groups]).tolist()) == list(range(s))
    q, k, v = (torch.randn(s, h, n, hd, generator=g, dtype=torch.float64) for _ in range(3))
    a = (3 * torch.randn(s, h, n, n, generator=g, dtype=torch.float64)).softmax(-1)
    acc = JointQK([spec], torch.device("cpu"))
    with torch.no_grad():
        acc.update(0, q, k, v, a, w)
        q_weight, k_weight = _joint_weights_formed(spec, v, a, w)
    for name, x, weight in (("q", q, q_weight), ("k", k, k_weight)):
        x, weight = x.transpose(0, 1).reshape(h, -1, hd), weight.transpose(0, 1).reshape(h, -1)
        ref = [weight.sum(-1), torch.einsum("ht,htd->hd", weight, x), (x * weight[..., None]).mT @ x]
        for got, r in zip(acc.moments[0][name], ref, strict=True):
            assert bool(r.abs().max() > 0)
            torch.testing.assert_close(got, r, rtol=1e-12, atol=1e-12 * float(r.abs().max()))


def test_joint_qk_metric_factor_follows_w_o_and_allows_a_singular_metric() -> None:
    """JointQK reuses a block's factor of W_o,hᵀW_o,h across updates only while W_o is unchanged: after an
    in-place change of proj's weight, and after its replacement by a new Parameter, the next update uses the new
    metric. A rank-deficient W_o,h (a singular metric: head 0's output reads only two of its value dims) is fine.
    Oracle: the formed pair weights, summed over the three updates (float64)."""
    model, _ = model_and_data("vit_cls")
    spec = adapter_for(model).blocks[0]
    h, hd = spec.num_heads, spec.head_dim
    g = torch.Generator().manual_seed(12)
    s, n = 3, 11
    acc = JointQK([spec], torch.device("cpu"))
    refs = {name: [0, 0, 0] for name in "qk"}
    weight = spec.proj.weight
    with torch.no_grad():
        low_rank = torch.zeros(weight.shape[0], hd)
        low_rank[:, :2] = torch.randn(weight.shape[0], 2, generator=g)
        for step in range(3):
            if step == 1:
                weight[:, :hd] = low_rank  # head 0's columns, in place (the cached factor is now stale)
            if step == 2:  # a new Parameter with the old one's version count: only its identity tells them apart
                new = torch.randn(weight.shape, generator=g)
                while new._version < weight._version:
                    new.mul_(1)
                spec.proj.weight = nn.Parameter(new)
                assert spec.proj.weight._version == weight._version
            q, k, v = (torch.randn(s, h, n, hd, generator=g, dtype=torch.float64) for _ in range(3))
            a = (3 * torch.randn(s, h, n, n, generator=g, dtype=torch.float64)).softmax(-1)
            acc.update(0, q, k, v, a, None)
            q_weight, k_weight = _joint_weights_formed(spec, v, a, None)
            for name, x, wt in (("q", q, q_weight), ("k", k, k_weight)):
                x, wt = x.transpose(0, 1).reshape(h, -1, hd), wt.transpose(0, 1).reshape(h, -1)
                for j, r in enumerate((wt.sum(-1), torch.einsum("ht,htd->hd", wt, x), (x * wt[..., None]).mT @ x)):
                    refs[name][j] = refs[name][j] + r
    assert torch.linalg.matrix_rank(weight[:, :hd]) == 2
    for name in "qk":
        for got, r in zip(acc.moments[0][name], refs[name], strict=True):
            torch.testing.assert_close(got, r, rtol=1e-10, atol=1e-10 * float(r.abs().max()))


@pytest.mark.parametrize("name", ["vit_cls", "swin", "vit_qk_norm", "BertModel", "ViTForImageClassification"])
def test_calibrate_statistics_are_the_same_with_accumulators_fed(name: str) -> None:
    """With accumulators, calibrate's pass runs through the explicit-attention forward (the same function,
    the hooks on the same modules): every Taylor sum, covariance, context statistic and moment equals the
    model's own forward's to float rounding, and the accumulators are fed once per block and batch."""
    model, data = model_and_data(name)
    plain = _calibrate(model, data, [])
    calls = []

    class Count:
        def update(self, i, q, k, v, a, w):
            assert not any(t.requires_grad for t in (q, k, v, a))  # fed under no_grad
            calls.append(i)

        def tensors(self):
            return []

    fed = _calibrate(model, data, [Count()])
    blocks = adapter_for(model).blocks
    assert calls == list(range(len(blocks))) * len(data)
    assert fed.samples == plain.samples == 12
    compared = 0
    for spec, got, ref in zip(blocks, fed.blocks, plain.blocks, strict=True):
        assert got.keys() == ref.keys()
        for feat in ref:
            for n, (g, r) in enumerate(zip(got[feat].tensors(), ref[feat].tensors(), strict=True)):
                if spec.has_qk_norm and feat in "qk" and n > 0:
                    # The Θ-weighted covariance: Θ_t = |Σ_c g·a| of a head's pre-norm q or k is 0 up to
                    # rounding (the norm is scale-invariant), so these are rounding noise in either pass
                    # (and unused: qk_norm blocks' Q/K follow their Taylor sums, compared).
                    continue
                assert bool(r.any())
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))
                compared += 1
    assert compared >= 15 * len(blocks)
    with pytest.raises(ValueError, match="accumulators= needs adapter="):
        calibrate(model, adapter_for(model).blocks, data, num_samples=12, covariance=None, progress=False,
                  accumulators=[Count()])


def _pair_system(model: nn.Module, data: list, i: int, hh: int, r: int, constant: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head hh of block i at width r, every real (query, key) pair of every sequence as one row: features
    [1; q_k,i] ⊗ k~_k,j ((r+1)·r, or r·r without the constant), target q_d,i · k~_d,j, weight A_ij."""
    rows, targets, weights = [], [], []
    for batch in data:
        t = _per_head(model, batch)[i]
        for b in range(t["q"].shape[0]):
            real = t["mask"][b] > 0
            q, k, a = t["q"][b, hh][real], t["k"][b, hh][real], t["a"][b, hh][real][:, real]
            kc = k - k.mean(0)
            qa = torch.cat([torch.ones(len(q), 1, dtype=torch.float64), q[:, :r]], 1) if constant else q[:, :r]
            for p in range(len(q)):
                for j in range(len(q)):
                    rows.append(torch.outer(qa[p], kc[j, :r]).reshape(-1))
                    targets.append(q[p, r:] @ kc[j, r:])
                    weights.append(a[p, j])
    return torch.stack(rows), torch.stack(targets), torch.stack(weights)


def _ridge_lstsq(f: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """argmin Σ w (f x - y)² + δ‖x‖², δ = RIDGE · tr(fᵀ W f)/n, as an augmented least-squares problem."""
    n = f.shape[1]
    sw = w.sqrt()[:, None]
    delta = RIDGE * float((f * f * w[:, None]).sum()) / n
    lhs = torch.cat([sw * f, delta ** 0.5 * torch.eye(n, dtype=torch.float64)])
    rhs = torch.cat([sw[:, 0] * y, torch.zeros(n, dtype=torch.float64)])
    return torch.linalg.lstsq(lhs, rhs[:, None]).solution[:, 0]


@pytest.mark.parametrize("name", ["vit_cls", "vit_reg_nobias", "BertModel"])
def test_score_fit_solution_equals_brute_force_least_squares(name: str) -> None:
    model, data = model_and_data(name)
    data = data[:2]
    adapter = adapter_for(model)
    acc = ScoreFit(adapter.blocks, torch.device("cpu"))
    attention_pass(adapter, data, [acc], num_samples=8, progress=False)
    i = len(adapter.blocks) - 1
    spec = adapter.blocks[i]
    constant = q_linear(spec).bias is not None
    assert constant == (name != "vit_reg_nobias")
    fit = acc.solve(i, constant)
    big_r = fits.fit_ranks(spec.head_dim)
    assert fit.shape == (spec.num_heads, big_r, big_r + 1, big_r) and fit.dtype == torch.float64
    assert not bool((fit * ~fits.block_mask(big_r)).any())
    for hh in (0, spec.num_heads - 1):
        for r in range(1, big_r + 1):
            f, y, w = _pair_system(model, data, i, hh, r, constant)
            ref = _ridge_lstsq(f, y, w).view(-1, r)
            got = fit[hh, r - 1, 1 - constant:r + 1, :r]
            torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-4 * float(ref.abs().max()))
            if not constant:
                assert bool((fit[hh, r - 1, 0] == 0).all())


def _lu_fit(m_full: torch.Tensor, p_tail: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """The oracle of ScoreFit.solve for one head: M (R+1, R+1, R, R), P_tail (R+1, R) float64 -> (R, R+1, R),
    each width's ridge-regularised normal equations built entry by entry and solved by LU."""
    big_r = m_full.shape[-1]
    first = 0 if has_bias else 1
    fit = torch.zeros(big_r, big_r + 1, big_r, dtype=torch.float64)
    for r in range(1, big_r + 1):
        unknowns = [(a, b) for a in range(first, r + 1) for b in range(r)]
        g = torch.tensor([[float(m_full[a, c, b, d]) for c, d in unknowns] for a, b in unknowns],
                         dtype=torch.float64)
        # Σ_{m >= r} P[a, b, m], P[a, b, m] = M[a, m + 1, b, m] below R
        rhs = torch.tensor([float(p_tail[a, b]) + sum(float(m_full[a, m + 1, b, m]) for m in range(r, big_r))
                            for a, b in unknowns], dtype=torch.float64)
        delta = RIDGE * float(g.trace()) / len(unknowns)
        if delta > 0:
            x = torch.linalg.solve(g + delta * torch.eye(len(unknowns), dtype=torch.float64), rhs)
            fit[r - 1, first:r + 1, :r] = x.view(r + 1 - first, r)
    return fit


@pytest.mark.parametrize("has_bias", [True, False])
def test_score_fit_cholesky_solve_equals_lu_and_falls_back_to_it(has_bias: bool) -> None:
    """ScoreFit.solve (Cholesky) equals an LU solve of the same systems built entry by entry, per head and
    width: on real statistics (head 0), on statistics that are not positive semi-definite, where the
    Cholesky factorization fails and the LU fallback must give the same answer (head 1), and on a head
    without weight (head 2: fit 0)."""
    model, data = model_and_data("vit_cls")
    adapter = adapter_for(model)
    acc = ScoreFit(adapter.blocks, torch.device("cpu"))
    attention_pass(adapter, data, [acc], num_samples=12, progress=False)
    i = 0
    h, big_r = adapter.blocks[i].num_heads, fits.fit_ranks(adapter.blocks[i].head_dim)
    assert h >= 3
    packed, p_tail = acc.moments[i]
    ac, bd = torch.triu_indices(big_r + 1, big_r + 1), torch.triu_indices(big_r, big_r)
    with torch.no_grad():
        # head 1: G = I plus a 10 coupling (a = 0 with a = 1, b = d = 0): indefinite at every width with a
        # constant row (without one the coupling is not in the system, and G = I)
        packed[1] = 0
        packed[1, (ac[0] == ac[1]).nonzero()[:, None], (bd[0] == bd[1]).nonzero()[None, :, 0]] = 1.0
        packed[1, int(((ac[0] == 0) & (ac[1] == 1)).nonzero()), int(((bd[0] == 0) & (bd[1] == 0)).nonzero())] = 10.0
        p_tail[1] = torch.randn(big_r + 1, big_r, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        packed[2], p_tail[2] = 0, 0
    m_full = acc.moment(i)
    assert m_full.shape == (h, big_r + 1, big_r + 1, big_r, big_r)
    if has_bias:
        g = m_full[1, :2, :2, 0, 0]
        assert float(torch.linalg.eigvalsh(g).min()) < -1  # the Cholesky path cannot take head 1
    fit = acc.solve(i, has_bias)
    for hh in range(3):
        ref = _lu_fit(m_full[hh], p_tail[hh], has_bias)
        if hh < 2:
            assert float(ref.abs().max()) > 0
        torch.testing.assert_close(fit[hh], ref, rtol=1e-9, atol=1e-9 * max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("name", ["vit_cls", "BertModel"])
def test_stored_fit_never_predicts_the_calibration_scores_worse(name: str) -> None:
    """After skd.wpac(score_fit=True), the q rows corrected by the stored fit (skd.score_fit.corrected_q) give
    scores whose A-weighted error against the full scores (keys centred per sequence) is at most that of
    plain truncation, at every fitted width, on the calibration tokens; and strictly smaller somewhere."""
    model, data = model_and_data(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The fit reads num_samples // SCORE_FIT_SHARE samples: ask for that many times the 12 there are, so it
        # reads all of them, the tokens checked below (calibration warns and uses the 12).
        skd.wpac(model, data, num_samples=12 * SCORE_FIT_SHARE, criterion="wpac+", progress=False, score_fit=True)
    spec = adapter_for(model).blocks[0]
    h, hd = spec.num_heads, spec.head_dim
    fit = fits.score_fit(q_linear(spec))
    wq, bq = (None if t is None else t.detach() for t in spec.qkv_weights()[0])
    per_head = [_per_head(model, b)[0] for b in data]
    x_in = []  # the block's input, to recompute q with corrected rows
    hook = (spec.qkv if spec.fused else spec.q).register_forward_hook(lambda m, a, o: x_in.append(a[0].detach()))
    with torch.no_grad():
        for b in data:
            skd.batches.call(model, b)
    hook.remove()
    better = False
    for r in range(1, fit.shape[1] + 1):
        b_kept = None if bq is None else bq.double().view(h, hd)[:, :r]
        w_r, b_r = fits.corrected_q(wq.double().view(h, hd, -1)[:, :r], b_kept, fit.double(), r)
        err_fit = err_plain = 0.0
        for t, x in zip(per_head, x_in, strict=True):
            q_new = torch.einsum("hrd,btd->bhtr", w_r, x.double()) + (0 if b_r is None else b_r[None, :, None])
            mask = t["mask"]
            k_mean = (t["k"] * mask[:, None, :, None]).sum(2, keepdim=True) / mask.sum(1)[:, None, None, None]
            kc = t["k"] - k_mean
            full = t["q"] @ kc.mT
            weight = t["a"] * mask[:, None, :, None] * mask[:, None, None, :]
            err_fit += float((weight * (q_new @ kc[..., :r].mT - full).square()).sum())
            err_plain += float((weight * (t["q"][..., :r] @ kc[..., :r].mT - full).square()).sum())
        assert err_fit <= err_plain * (1 + 1e-6)
        better |= err_fit < 0.99 * err_plain
    assert better
