"""skd.wpac(..., joint_qk=True, score_fit=True) end to end: the full-width function is kept on timm ViT, Swin,
HF BERT (padded) and HF ViT, plain and wrapped in ElasticViT (whose narrow widths then equal a masked copy
with the stored fit absorbed by the kept q rows); the joint rotation is the eigenbasis of the joint
statistic; fits of the right shape are stored and a later call without score_fit removes them; bad
arguments are refused before the model changes; the CLI flags reach skd.wpac and the file keeps the fits."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from cli_helpers import fails, skd
from torch import nn

import skd as skd_api
from skd import score_fit as fits
from skd.attention_stats import JointQK, attention_pass
from skd.models import adapter_for
from skd.score_fit import q_linear
from skd.stats import FEATURES
from skd.wpac import principal_axes
from tests.test_attention_stats import HF, TIMM, model_and_data, output, rel

FULL = dict(criterion="wpac+", compensate=True, cross_head=True, joint_qk=True, score_fit=True, progress=False)


def _wpac(model: nn.Module, data: list, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*qk_norm.*")
        skd_api.wpac(model, data, num_samples=12, **{**FULL, **kwargs})


def _check_fits(model: nn.Module, present: bool) -> None:
    for spec, rep in zip(adapter_for(model).blocks, model.skd_report.blocks, strict=True):
        fit = fits.score_fit(q_linear(spec))
        stored = present and not spec.has_qk_norm
        assert rep.score_fit == stored and (fit is not None) == stored
        if stored:
            big_r = fits.fit_ranks(spec.head_dim)
            assert fit.shape == (spec.num_heads, big_r, big_r + 1, big_r) and fit.dtype == spec.proj.weight.dtype
            assert bool(fit.any()) and not bool((fit * ~fits.block_mask(big_r)).any())
            assert rep.qk == "rotation (joint)"
        else:
            assert rep.qk == ("permutation" if spec.has_qk_norm else "rotation (joint)")


@pytest.mark.parametrize("name", [*TIMM, *HF])
def test_full_width_function_is_kept_and_fits_are_stored_then_removed(name: str) -> None:
    model, data = model_and_data(name)
    fresh = model_and_data(name, seed=9)[1][:2]
    with torch.no_grad():
        refs = [output(model, b) for b in fresh]
    _wpac(model, data)
    with torch.no_grad():
        for b, ref in zip(fresh, refs, strict=True):
            assert rel(output(model, b), ref) <= 1e-5
    _check_fits(model, True)
    _wpac(model, data, joint_qk=False, score_fit=False)
    for spec, rep in zip(adapter_for(model).blocks, model.skd_report.blocks, strict=True):
        assert fits.score_fit(q_linear(spec)) is None and not rep.score_fit
        assert rep.qk == ("permutation" if spec.has_qk_norm else "rotation")


def test_joint_rotation_is_the_eigenbasis_of_the_joint_statistic() -> None:
    """On the original model's joint statistic C (skd.attention_stats), the applied Q/K rotation U: the new
    q rows are U times the old ones and U C Uᵀ is diagonal and descending (the qk_spectrum reported)."""
    model, data = model_and_data("vit_cls")
    before = copy.deepcopy(model)
    adapter = adapter_for(before)
    joint = JointQK(adapter.blocks, torch.device("cpu"))
    attention_pass(adapter, data, [joint], num_samples=12, progress=False)
    _wpac(model, data, score_fit=False)
    for i, (old, new, rep) in enumerate(zip(adapter.blocks, adapter_for(model).blocks, model.skd_report.blocks,
                                            strict=True)):
        h, hd = old.num_heads, old.head_dim
        cov = joint.covariance(i)
        u, spectrum = principal_axes(cov)
        w_old, w_new = (s.qkv_weights()[0][0].detach().double().view(h, hd, -1) for s in (old, new))
        torch.testing.assert_close(w_new, u @ w_old, rtol=1e-5, atol=1e-6 * float(w_old.abs().max()))
        rotated = u @ cov @ u.mT
        torch.testing.assert_close(rotated.diagonal(dim1=1, dim2=2), spectrum, rtol=1e-6, atol=1e-9)
        assert bool((spectrum[:, :-1] >= spectrum[:, 1:]).all())
        torch.testing.assert_close(rep.qk_spectrum, spectrum)


def test_elastic_wrapped_model_keeps_its_function_and_narrow_widths_use_the_fits() -> None:
    model, data = model_and_data("vit_cls")
    elastic = skd_api.ElasticViT(model).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = elastic(x)
    _wpac(elastic, data, compensate=False, cross_head=False)  # the masking oracle below does not compensate
    with torch.no_grad():
        assert rel(elastic(x), ref) <= 1e-5
    assert all(rep.score_fit and rep.qk == "rotation (joint)" for rep in elastic.skd_report.blocks)
    with elastic.standard_layout() as inner:
        bare = copy.deepcopy(inner)
    # Narrow widths use the fits wpac stored: equal to a masked copy whose kept q rows absorb the fit.
    from tests.elastic_oracle import masked_copy

    big_r = fits.fit_ranks(elastic.head_dims[0])
    for r in (1, big_r, big_r + 1):
        subnet = skd_api.Subnet(attn=[r] * len(elastic.head_dims), mlp=list(elastic.hiddens))
        fitted = copy.deepcopy(bare)
        with torch.no_grad():
            for spec in adapter_for(fitted).blocks:
                h, hd = spec.num_heads, spec.head_dim
                w, b = (t.view(h, hd, -1)[:, :r] if t.dim() == 2 else t.view(h, hd)[:, :r]
                        for t in spec.qkv_weights()[0])
                new_w, new_b = fits.corrected_q(w, b, fits.score_fit(q_linear(spec)), r)
                w.copy_(new_w)
                b.copy_(new_b)
            y = elastic(x, subnet=subnet)
            assert rel(y, masked_copy(fitted, subnet)(x)) <= 1e-5
            assert (rel(y, masked_copy(bare, subnet)(x)) > 1e-4) == (r <= big_r)  # the fit changed something


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, the non-persistent ones (means, covariances, score fits) too."""
    return {f"{m}.{n}": t for m, module in model.named_modules()
            for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None}


@pytest.mark.parametrize("name", ["vit_cls", "swin", "ViTForImageClassification", "vit_qk_norm"])
def test_full_recipe_calibrates_forward_only(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """wpac+ with joint_qk and the MLP compensated reads no gradient statistic (skd.wpac.gradient_features): its
    calibration runs no loss and no backward, so data without labels is fine, and the model equals the one
    calibrated through the gradient pass, up to rounding: a forward that records a gradient runs ATen's LayerNorm
    where a no-grad one runs skd's fused add_layer_norm, and the joint Q/K solve amplifies that (4e-5 of the largest
    qkv weight, vit_cls). A qk_norm model's Q/K permutation is in Taylor order: it still needs labels, refused
    before the model changes."""
    module = importlib.import_module("skd.wpac")
    model, data = model_and_data(name)
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} if isinstance(b, dict) else b[0] for b in data]
    before = _tensors(copy.deepcopy(model))
    if name == "vit_qk_norm":
        with pytest.raises(ValueError, match="no labels"):
            _wpac(model, unlabelled)
        assert all(torch.equal(t, before[k]) for k, t in _tensors(model).items())
        return
    through_gradients = copy.deepcopy(model)
    _wpac(model, unlabelled)
    monkeypatch.setattr(module, "gradient_features", lambda *args: frozenset(FEATURES))
    _wpac(through_gradients, data)
    expected, got = _tensors(through_gradients), _tensors(model)
    assert expected.keys() == got.keys() and len(got) > len(before)  # means, covariances and fits stored
    for key, t in expected.items():
        torch.testing.assert_close(got[key], t, rtol=1e-4, atol=1e-4 * float(t.detach().abs().max()), msg=key)


@pytest.mark.parametrize("block", [0, 1])
def test_overflowing_activations_are_refused_before_the_model_changes(block: int) -> None:
    """The forward-only pass has no gradient kernel to refuse NaN/Inf activations per batch: its statistics are
    checked after the pass, naming the first block they reach, before any block is transformed."""
    model, data = model_and_data("vit_cls")
    with torch.no_grad():
        adapter_for(model).blocks[block].fc1.weight[0] = 1e38  # the hidden activation overflows fp32
    before = _tensors(copy.deepcopy(model))
    with pytest.raises(ValueError, match=f"blocks.{block} hidden: .*NaN or Inf"):
        _wpac(model, data)
    assert all(torch.equal(t, before[k]) for k, t in _tensors(model).items())


def test_which_features_each_recipe_reads_gradients_of() -> None:
    from skd.wpac import gradient_features

    plain, qk_norm = (adapter_for(model_and_data(n)[0]).blocks for n in ("vit_cls", "vit_qk_norm"))
    both, attn, none = frozenset({"attn", "mlp"}), frozenset({"attn"}), frozenset()
    assert gradient_features("wpac+", both, True, plain) == frozenset()  # the full recipe: forward only
    assert gradient_features("wpac+", both, True, qk_norm) == {"q", "k"}  # Q/K permuted by Taylor scores
    assert gradient_features("wpac+", none, False, plain) == {"q", "k", "hidden"}  # Θ-weighted Q/K, Taylor MLP
    assert gradient_features("wpac+", attn, True, plain) == {"hidden"}  # the MLP in Taylor order
    assert not gradient_features("magnitude", both, False, plain)
    assert not gradient_features("random", attn, False, plain)
    assert all(gradient_features(c, none, False, plain) == set(FEATURES) for c in ("wpac", "taylor", "hessian"))
    assert gradient_features("pca", none, False, plain) == {"hidden"}  # rotations by forward covariances
    assert gradient_features("pca", both, False, plain) == frozenset()
    assert gradient_features("pca", both, False, qk_norm) == {"q", "k"}
    assert gradient_features("taylor", both, False, plain) == {"q", "k", "v"}  # the MLP by centred output variance


def test_bad_arguments_are_refused_before_the_model_changes() -> None:
    model, data = model_and_data("vit_cls")
    state = copy.deepcopy(model.state_dict())
    cases = [
        (dict(criterion="wpac"), "joint_qk=True .* needs criterion='wpac\\+'"),
        (dict(criterion="pca"), "needs criterion='wpac\\+'"),
        (dict(joint_qk="yes"), "joint_qk must be True or False"),
        (dict(joint_qk=False, score_fit=1), "score_fit must be True or False"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            _wpac(model, data, **kwargs)
    for kwargs in (dict(), dict(joint_qk=False)):
        with pytest.raises(ValueError, match="read the data again: pass a re-iterable"):
            _wpac(model, iter(data), **kwargs)
        with pytest.raises(ValueError, match="read the data again"):
            _wpac(model, (b for b in data), **kwargs)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert not any(fits.score_fit(q_linear(s)) is not None for s in adapter_for(model).blocks)
    _wpac(model, iter(data), joint_qk=False, score_fit=False)  # a generator is fine when it is read once


def test_blocks_the_pass_cannot_compute_are_refused_before_the_model_changes() -> None:
    from timm.models.vision_transformer import VisionTransformer

    from tests.test_wpac_plus import TINY

    model, data = VisionTransformer(**TINY, scale_attn_norm=True).eval(), model_and_data("vit_cls")[1]
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"cannot compute these blocks: .*scale_norm"):
        _wpac(model, data, joint_qk=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_flags_reach_wpac_and_joint_qk_needs_wpac_plus(tmp_path, monkeypatch) -> None:
    from skd import io as skd_io

    saved = []
    real_save = skd_io.save
    monkeypatch.setattr(skd_io, "save", lambda model, path, **kw: (saved.append(model), real_save(model, path, **kw)))
    out = tmp_path / "j.safetensors"
    r = skd("wpac", "vit_digits", "--pretrained", "--samples", "32", "--criterion", "wpac+", "--joint-qk",
            "--score-fit", "--out", str(out))
    assert r.returncode == 0, r.stderr
    (elastic,) = saved
    assert all(rep.qk == "rotation (joint)" and rep.score_fit for rep in elastic.skd_report.blocks)
    loaded = skd_api.load(out)  # the file keeps the fits
    with elastic.standard_layout() as inner, loaded.standard_layout() as inner_loaded:
        for a, b in zip(adapter_for(inner).blocks, adapter_for(inner_loaded).blocks, strict=True):
            torch.testing.assert_close(fits.score_fit(q_linear(b)), fits.score_fit(q_linear(a)))
    r = skd("wpac", "vit_digits", "--pretrained", "--samples", "32", "--joint-qk", "--out",
            str(tmp_path / "bad.safetensors"))
    fails(r, "--joint-qk needs --criterion wpac+")
    assert not (tmp_path / "bad.safetensors").exists()
