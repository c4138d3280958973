"""The score fit (skd.score_fit) in elastic inference, on every family: ElasticViT with random fits stored
equals an oracle (a standard-layout copy whose q rows of every head are replaced by `corrected_q` at the
block's width, run by a plain ElasticViT) on the bound and the autograd paths, and widths without a fit
(0, > R, full) are unchanged; gradients equal those of the hand-corrected copy; cached plans follow
in-place updates and a stored, replaced or removed fit; extract() folds it (also beside compensation and
cross-head compensation); files keep it and refuse bad ones; torch.compile and autocast agree."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path

import hf_helpers
import pytest
import timm
import torch
from elastic_oracle import compiled_counting, frozen_forward, masked_copy, random_subnets, rel_err
from torch import nn

import skd
from skd import Subnet, compensation, score_fit
from skd.elastic.layout import qkv_permutation, rank_major_permutation
from skd.io import load_tensors, save_tensors
from skd.models import adapter_for

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)  # hd 16, R 8


def _perturbed(model: nn.Module, scale: float = 0.1) -> nn.Module:
    with torch.no_grad():  # random init leaves biases at 0: make every term matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _set_fits(model: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """A fresh random fit on every block's q-producing Linear (no constant row where it has no bias)."""
    gen = torch.Generator().manual_seed(seed)
    for spec in adapter_for(model).blocks:
        lin, big_r = score_fit.q_linear(spec), score_fit.fit_ranks(spec.head_dim)
        fit = torch.randn(spec.num_heads, big_r, big_r + 1, big_r, generator=gen) * scale * score_fit.block_mask(big_r)
        if lin.bias is None:
            fit[:, :, 0] = 0
        score_fit.set_score_fit(lin, fit, spec.num_heads, spec.head_dim)


def _plain_bare_fitted(model: nn.Module, scale: float) -> tuple[skd.ElasticViT, nn.Module, skd.ElasticViT]:
    """Random fits (`_set_fits`) stored on `model`: (its ElasticViT without them, a head-major copy with them
    for the oracle, its ElasticViT with them)."""
    plain = skd.ElasticViT(copy.deepcopy(model)).eval()
    _set_fits(model, scale=scale)
    return plain, copy.deepcopy(model), skd.ElasticViT(model).eval()


class Family:
    """A model builder, its input and its main output (HF: logits or last hidden state; padded text: the
    real tokens only)."""

    def __init__(self, make: Callable[[], nn.Module], inputs: dict, keep: torch.Tensor | None = None) -> None:
        self.make, self.inputs, self.keep = make, inputs, keep

    def out(self, model: nn.Module, **kw) -> torch.Tensor:
        y = hf_helpers.main_output(model(**self.inputs, **kw)) if "x" not in self.inputs else model(
            self.inputs["x"], **kw)
        return y if self.keep is None else y[self.keep]


def _timm(**kw) -> nn.Module:
    torch.manual_seed(0)
    return _perturbed(timm.create_model("vit_tiny_patch16_224", **{**TINY, **kw}))


def _swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return _perturbed(SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=24, depths=(2, 2),
                                      num_heads=(2, 4), num_classes=5))  # hd 12, R 6


def _families() -> dict[str, Family]:
    x = {"x": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) + 0.5}
    bert = hf_helpers.inputs("BertModel")
    return {
        "vit": Family(_timm, x),
        "vit_no_qkv_bias": Family(lambda: _timm(qkv_bias=False), x),
        "swin": Family(_swin, x),
        "hf_bert": Family(lambda: hf_helpers.tiny("BertModel"), bert, bert["attention_mask"].bool()),  # hd 8, R 4
        "hf_vit": Family(lambda: hf_helpers.tiny("ViTForImageClassification"),
                         hf_helpers.inputs("ViTForImageClassification")),
    }


FAMILIES = _families()


def _hand_corrected(bare: nn.Module, subnet: Subnet) -> nn.Module:
    """A copy of the standard-layout `bare` without fits whose q rows of every head at width r (rows
    head*hd + rank, rank < r) are `corrected_q` of the stored fit."""
    out = copy.deepcopy(bare)
    with torch.no_grad():
        for spec, r in zip(adapter_for(out).blocks, subnet.attn, strict=True):
            lin, h, hd = score_fit.q_linear(spec), spec.num_heads, spec.head_dim
            w, b = spec.qkv_weights()[0]
            new_w, new_b = score_fit.corrected_q(w.view(h, hd, -1)[:, :r], None if b is None else b.view(h, hd)[:, :r],
                                                 score_fit.score_fit(lin), r)
            w.view(h, hd, -1)[:, :r] = new_w
            if b is not None:
                b.view(h, hd)[:, :r] = new_b
            score_fit.set_score_fit(lin, None, h, hd)
    return out


def _oracle(bare: nn.Module, subnet: Subnet) -> skd.ElasticViT:
    return skd.ElasticViT(_hand_corrected(bare, subnet)).eval()


def _bare(elastic: skd.ElasticViT) -> nn.Module:
    with elastic.standard_layout() as inner:
        return copy.deepcopy(inner)


def _subnets(elastic: skd.ElasticViT) -> list[Subnet]:
    """Uniform attention widths 1, R, R + 1, full (MLP halved), then random ones (0 and full included)."""
    hd, big_r = elastic.head_dims[0], score_fit.fit_ranks(min(elastic.head_dims))
    half = [m // 2 for m in elastic.hiddens]
    uniform = [Subnet(attn=[min(r, d) for d in elastic.head_dims], mlp=half) for r in (1, big_r, big_r + 1, hd)]
    return uniform + random_subnets(elastic.head_dims, elastic.hiddens, n=5, seed=4)


# --------------------------------------------------------------------------------------- the forward
@pytest.mark.parametrize("name", FAMILIES)
def test_elastic_equals_the_hand_corrected_oracle_bound_and_recording(name: str) -> None:
    family = FAMILIES[name]
    model = family.make()
    plain, bare, elastic = _plain_bare_fitted(model, scale=1.0)
    for subnet in _subnets(elastic):
        oracle = _oracle(bare, subnet)
        with torch.no_grad():
            expected = family.out(oracle, subnet=subnet)
            bound = family.out(elastic, subnet=subnet)
            frozen = family.out(functools.partial(frozen_forward, elastic, subnet))
            without = family.out(plain, subnet=subnet)
        recording = family.out(elastic, subnet=subnet)  # grad mode on, weights require grad: per call
        assert recording.requires_grad
        assert rel_err(bound, expected) <= 1e-5, subnet
        assert rel_err(frozen, expected) <= 1e-5, subnet  # capture(frozen=True)'s copies of the fitted rows
        assert rel_err(recording.detach(), expected) <= 1e-5, subnet
        fitted = [score_fit.fitted(score_fit.score_fit(score_fit.q_linear(s)), r)
                  for s, r in zip(elastic.adapter.blocks, subnet.attn, strict=True)]
        if all(fitted):  # the fit is visible: 10x the tolerance
            assert (bound - without).abs().max() > 1e-4 * without.abs().max(), subnet
        elif not any(fitted):  # widths 0, > R and full: exactly what runs without a fit
            assert torch.equal(bound, without), subnet


def _leaf_params(bare: nn.Module, subnet: Subnet) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(leaves: {name: leaf copy requiring grad} of every q-producing Linear's weight and bias of `bare`,
    params: {name: tensor} for the masked copy of `bare` at `subnet`, those Linears' weight and bias computed
    from the leaves: q rows of rank < r corrected by `corrected_q`, the other rows of the subnet kept, the rows
    outside it zeroed)."""
    names = {mod: n for n, mod in bare.named_modules()}
    leaves, params = {}, {}
    for spec, r in zip(adapter_for(bare).blocks, subnet.attn, strict=True):
        lin, h, hd = score_fit.q_linear(spec), spec.num_heads, spec.head_dim
        c, kept = h * hd, (torch.arange(hd) < r).repeat(h)  # kept: (C,) head-major rows
        w, b = (leaves.setdefault(f"{names[lin]}.{kind}", getattr(lin, kind).detach().clone().requires_grad_(True))
                for kind in ("weight", "bias"))
        q_w, q_b = w[:c].unflatten(0, (h, hd)), b[:c].unflatten(0, (h, hd))
        new_w, new_b = score_fit.corrected_q(q_w[:, :r], q_b[:, :r], score_fit.score_fit(lin), r)
        zeros_w, zeros_b = q_w.new_zeros(h, hd - r, q_w.shape[-1]), q_b.new_zeros(h, hd - r)
        rows_w = [torch.cat((new_w, zeros_w), 1).flatten(0, 1)]
        rows_b = [torch.cat((new_b, zeros_b), 1).flatten(0, 1)]
        if spec.fused:  # k and v rows: kept or zeroed
            rows_w += [w[j * c:(j + 1) * c] * kept[:, None] for j in (1, 2)]
            rows_b += [b[j * c:(j + 1) * c] * kept for j in (1, 2)]
        params[f"{names[lin]}.weight"], params[f"{names[lin]}.bias"] = torch.cat(rows_w), torch.cat(rows_b)
    return leaves, params


@pytest.mark.parametrize("name", ["vit", "hf_bert"])
def test_gradients_reach_w_and_b_as_through_the_hand_corrected_copy(name: str, sdpa_route: str) -> None:
    """PIAD trains through the autograd path: the q-producing Linears' weight and bias gradients equal those
    of a masked standard-layout copy whose weights are computed from leaves by `corrected_q`."""
    family = FAMILIES[name]
    model = family.make()
    _set_fits(model, seed=1)
    bare = copy.deepcopy(model)
    elastic = skd.ElasticViT(model).eval()
    big_r = score_fit.fit_ranks(elastic.head_dims[0])
    subnet = Subnet(attn=[big_r, 2, 1][:len(elastic.head_dims)], mlp=[m // 2 for m in elastic.hiddens])
    elastic.zero_grad()
    out = family.out(elastic, subnet=subnet)
    target = torch.randn_like(out)
    ((out - target) ** 2).sum().backward()

    masker = masked_copy if name == "vit" else hf_helpers.masked_copy
    masked = masker(bare, subnet)
    for spec in adapter_for(masked).blocks:
        score_fit.set_score_fit(score_fit.q_linear(spec), None, spec.num_heads, spec.head_dim)
    leaves, params = _leaf_params(bare, subnet)
    ref = family.out(lambda *args, **kw: torch.func.functional_call(
        masked, {**dict(masked.named_parameters()), **params}, args=args, kwargs=kw))
    ((ref - target) ** 2).sum().backward()
    for spec, mine in zip(adapter_for(bare).blocks, elastic.adapter.blocks, strict=True):
        lin, h, hd = score_fit.q_linear(spec), spec.num_heads, spec.head_dim
        perm = qkv_permutation(h, hd) if spec.fused else rank_major_permutation(h, hd)
        name_of = {mod: n for n, mod in bare.named_modules()}[lin]
        for kind in ("weight", "bias"):
            got = getattr(score_fit.q_linear(mine), kind).grad
            head_major = torch.empty_like(got)
            head_major[perm] = got  # rank-major row n is head-major row perm[n]
            expected = leaves[f"{name_of}.{kind}"].grad
            assert expected.abs().max() > 0
            torch.testing.assert_close(head_major, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


# ------------------------------------------------------------------------------------------- plans
def test_cached_plan_follows_in_place_updates_and_stored_replaced_removed_fits() -> None:
    family = FAMILIES["vit"]
    model = family.make()
    # the same updates are made to bare (elementwise: the layout does not matter)
    plain, bare, elastic = _plain_bare_fitted(model, scale=0.3)
    subnet = Subnet(attn=[3, 8, 5], mlp=[100, 40, 192])

    def check() -> None:
        with torch.no_grad():
            assert rel_err(family.out(elastic, subnet=subnet), family.out(_oracle(bare, subnet), subnet=subnet)) <= 1e-5

    check()
    plan = elastic._plan(subnet)
    assert plan.current()
    with torch.no_grad():
        for m in (elastic.model, bare, plain.model):  # an optimizer step: in place, the bound corrected copy is stale
            for spec in adapter_for(m).blocks:
                spec.qkv.weight.mul_(1.1)
                spec.qkv.bias.add_(0.05)
    assert not plan.current()
    check()
    plan = elastic._plan(subnet)
    with torch.no_grad():
        for m in (elastic.model, bare):  # the fit itself, in place
            score_fit.score_fit(adapter_for(m).blocks[1].qkv).mul_(-1.0)
    assert not plan.current()
    check()
    plan = elastic._plan(subnet)
    for m in (elastic.model, bare):  # replaced
        _set_fits(m, seed=5)
    assert not plan.current()
    check()
    plan = elastic._plan(subnet)
    for spec in elastic.adapter.blocks:  # removed
        score_fit.set_score_fit(spec.qkv, None, spec.num_heads, spec.head_dim)
    assert not plan.current()
    with torch.no_grad():
        assert torch.equal(family.out(elastic, subnet=subnet), family.out(plain, subnet=subnet))


# ------------------------------------------------------------------------------------------ extract
def _with_compensation(model: nn.Module, seed: int = 0) -> None:
    """Random input means on every output projection and fc2, covariances (SPD) on the projections."""
    gen = torch.Generator().manual_seed(seed)
    for spec in adapter_for(model).blocks:
        for lin in (spec.proj, spec.fc2):
            compensation.set_input_mean(lin, torch.randn(lin.in_features, generator=gen))
        a = torch.randn(spec.proj.in_features, spec.proj.in_features, generator=gen)
        compensation.set_input_cov(spec.proj, a @ a.T / spec.proj.in_features)


@pytest.mark.parametrize("name", FAMILIES)
def test_extract_folds_the_fit_and_equals_elastic(name: str) -> None:
    family = FAMILIES[name]
    model = family.make()
    _set_fits(model, seed=2)
    _with_compensation(model)
    elastic = skd.ElasticViT(model).eval()
    for subnet in _subnets(elastic):
        extracted = elastic.extract(subnet).eval()
        assert score_fit.fits(extracted) == {} and compensation.means(extracted) == {}  # folded: runs without skd
        with torch.no_grad():
            assert rel_err(family.out(extracted), family.out(elastic, subnet=subnet)) <= 1e-5, subnet
    assert len(score_fit.fits(elastic.model)) == len(elastic.head_dims)  # the ElasticViT keeps its fits


# --------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("name", ["vit", "hf_bert"])
def test_save_load_round_trip_keeps_the_outputs(name: str, tmp_path: Path) -> None:
    family = FAMILIES[name]
    model = family.make()
    _set_fits(model, seed=3)
    bare = copy.deepcopy(model)
    elastic = skd.ElasticViT(model).eval()
    subnet = _subnets(elastic)[1]  # width R: fitted
    with torch.no_grad():
        expected = family.out(elastic, subnet=subnet)
    for obj, kind in ((elastic, "elastic"), (bare, "bare")):  # rank-major and head-major files
        path = tmp_path / f"{kind}.safetensors"
        skd.save(obj, path)
        stored = [k for k in load_tensors(path)[0] if k.startswith(score_fit.FILE_PREFIX)]
        assert len(stored) == len(elastic.head_dims)
        loaded = skd.load(path).eval()
        assert sorted(score_fit.fits(loaded.model)) == sorted(stored)
        with torch.no_grad():
            assert torch.equal(family.out(loaded, subnet=subnet), expected)
    small = tmp_path / "small.safetensors"
    skd.save(elastic.extract(subnet), small)
    assert not any(k.startswith(score_fit.FILE_PREFIX) for k in load_tensors(small)[0])
    with torch.no_grad():
        assert rel_err(family.out(skd.load(small).eval()), expected) <= 1e-5


def test_files_without_fits_load_as_before_and_bad_fits_are_refused(tmp_path: Path) -> None:
    model = FAMILIES["vit"].make()
    path = tmp_path / "plain.safetensors"
    skd.save(skd.ElasticViT(model), path)
    tensors, meta = load_tensors(path)
    assert not any(k.startswith(score_fit.FILE_PREFIX) for k in tensors)
    assert score_fit.fits(skd.load(path).model) == {}
    spec = adapter_for(FAMILIES["vit"].make()).blocks[0]
    big_r = score_fit.fit_ranks(spec.head_dim)
    good = torch.randn(spec.num_heads, big_r, big_r + 1, big_r) * score_fit.block_mask(big_r)
    for key, value, message in (
        ("blocks.0.attn.qkv", good[:, :, :, :2], r"'blocks.0.attn.qkv': score fit must have shape"),
        ("blocks.0.attn.qkv", good + 1.0, "outside each width's"),
        ("blocks.9.attn.qkv", good, "'blocks.9.attn.qkv': the model has no q-producing Linear"),
        ("blocks.0.mlp.fc1", good, "'blocks.0.mlp.fc1': the model has no q-producing Linear"),
        ("blocks.0.attn", good, "'blocks.0.attn': the model has no q-producing Linear"),
    ):
        bad = tmp_path / "bad.safetensors"
        save_tensors(bad, {**tensors, "skd_score_fit:blocks.1.attn.qkv": good.clone(),
                           score_fit.FILE_PREFIX + key: value}, meta)
        with pytest.raises(ValueError, match=message):
            skd.load(bad)
    extracted = tmp_path / "extracted.safetensors"
    elastic = skd.ElasticViT(FAMILIES["vit"].make())
    skd.save(elastic.extract(elastic.uniform(0.5)), extracted)
    tensors, meta = load_tensors(extracted)
    save_tensors(extracted, {**tensors, "skd_score_fit:blocks.0.attn.qkv": good}, meta)
    with pytest.raises(ValueError, match="extracted model's file holds input means or score fits"):
        skd.load(extracted)


# ------------------------------------------------------------------------------ compile and autocast
def _fitted_vit_tiny() -> nn.Module:
    """A 2-block ViT-Ti at 32 px (head dim 64: fits for r <= 16), perturbed, with random fits stored."""
    torch.manual_seed(0)
    model = _perturbed(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                         num_classes=10), 0.05)
    _set_fits(model)
    return model


def test_compiled_model_gives_the_eager_outputs_in_at_most_two_graphs() -> None:
    """Under torch.compile the plan is unbound: the corrected q rows are computed in the graph with symbolic
    widths. ViT-Ti's head dim 64 has fits for r <= 16: keep 0.25 (r = 16) is fitted, 0.5, 0.75 and full are
    not; the guard r <= R splits them into two graphs."""
    model = _fitted_vit_tiny()
    elastic = skd.ElasticViT(model).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled, counter = compiled_counting(elastic, fullgraph=True)
    with torch.no_grad():
        for keep in (0.25, 0.5, 0.75, 1.0):
            elastic.set_subnet(keep=keep)
            assert rel_err(compiled(x), elastic(x)) <= 1e-5
        elastic.set_subnet(keep=0.125)  # r = 8: another fitted width, the fitted graph serves it
        assert rel_err(compiled(x), elastic(x)) <= 1e-5
    assert counter.frame_count <= 2


def test_compiled_training_gives_the_eager_gradients_in_at_most_two_graphs() -> None:
    """Forward and backward under torch.compile (AOTAutograd) with a fit stored: gradients equal eager's."""
    model = _fitted_vit_tiny()
    elastic = skd.ElasticViT(model).train()
    x = torch.randn(2, 3, 32, 32)
    compiled, counter = compiled_counting(elastic, "aot_eager", fullgraph=True)
    for keep in (0.25, 0.5, 0.75, 1.0):
        elastic.set_subnet(keep=keep)
        grads = []
        for m in (compiled, elastic):
            elastic.zero_grad()
            m(x).square().sum().backward()
            grads.append({n: p.grad.clone() for n, p in elastic.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and "model.blocks.0.attn.qkv.weight" in grads[1]
        for n, want in grads[1].items():
            assert rel_err(grads[0][n], want) <= 1e-6 if want.any() else not grads[0][n].any(), n
    assert counter.frame_count <= 2


@pytest.mark.parametrize("name", ["vit", "hf_bert"])
def test_autocast_runs_the_fit_per_call(name: str) -> None:
    """Under autocast the plan is unbound: bfloat16 outputs near the oracle's under the same autocast, and
    far from those without the fit."""
    family = FAMILIES[name]
    model = family.make()
    plain, bare, elastic = _plain_bare_fitted(model, scale=0.5)
    subnet = _subnets(elastic)[1]
    oracle = _oracle(bare, subnet)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want, without = (family.out(m, subnet=subnet).float() for m in (elastic, oracle, plain))
    assert rel_err(got, want) <= 3e-2
    assert (got - without).abs().max() > 4 * (got - want).abs().max()


def test_bfloat16_model_casts_its_fits_and_round_trips(tmp_path: Path) -> None:
    """`.to(bfloat16)` casts the fit buffers (the cached fp32 plan is rebuilt); the bf16 ElasticViT is near the
    fp32 one, its extract() equals it, and a file keeps the fits in bf16."""
    family = FAMILIES["vit"]
    model = family.make()
    _set_fits(model, scale=1.0)
    elastic = skd.ElasticViT(model).eval()
    subnet = _subnets(elastic)[1]  # width R: fitted
    plain = skd.ElasticViT(_timm()).eval()
    with torch.no_grad():
        full_precision = family.out(elastic, subnet=subnet)
        without = family.out(plain, subnet=subnet)
        elastic.to(torch.bfloat16)
        assert all(score_fit.score_fit(s.qkv).dtype == torch.bfloat16 for s in elastic.adapter.blocks)
        x = family.inputs["x"].bfloat16()
        got = elastic(x, subnet=subnet).float()
        assert rel_err(got, full_precision) <= 3e-2
        assert (got - without).abs().max() > 4 * (got - full_precision).abs().max()  # the fit is there
        # bf16 rounding differs between the two forwards (timm's own, q scaled by sqrt(r/hd)): ~1e-2 without a
        # fit as well
        assert rel_err(elastic.extract(subnet).eval()(x).float(), got) <= 3e-2
        path = tmp_path / "bf16.safetensors"
        skd.save(elastic, path)
        loaded = skd.load(path).eval()
        assert all(score_fit.score_fit(s.qkv).dtype == torch.bfloat16 for s in loaded.adapter.blocks)
        assert torch.equal(loaded(x, subnet=subnet).float(), got)
