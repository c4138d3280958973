"""skd.wpac: function preservation for every criterion and model family, the real-model quality
comparison on the digits ViT, the eigen-solver's edge cases, and bad input."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Subset, TensorDataset

import skd
from skd.digits import accuracy
from skd.wpac import CRITERIA, principal_axes

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)


def tiny_swin() -> torch.nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=24, depths=(2, 2),
                           num_heads=(2, 4), num_classes=5)


def _qk_norm_vit() -> torch.nn.Module:
    m = VisionTransformer(**TINY, qk_norm=True)
    with torch.no_grad():  # a non-trivial affine, so a wrong permutation of it would show
        for blk in m.blocks:
            for norm in (blk.attn.q_norm, blk.attn.k_norm):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.1)
    return m


MODELS = {
    "vit_cls": lambda: VisionTransformer(**TINY),
    "vit_avg": lambda: VisionTransformer(**TINY, class_token=False, global_pool="avg"),
    "vit_reg_nobias": lambda: VisionTransformer(**TINY, reg_tokens=2, qkv_bias=False),
    "deit_distilled": lambda: VisionTransformerDistilled(**TINY),
    "vit_qk_norm": _qk_norm_vit,
    "swin": tiny_swin,
}


def random_batches(n: int = 24, batch: int = 8, classes: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = torch.randn(n, 3, 32, 32), torch.randint(0, classes, (n,))
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("make", list(MODELS.values()), ids=list(MODELS))
def test_function_preserved(make, criterion: str) -> None:
    model = make().eval()
    data = random_batches()
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*qk_norm.*")
        out_model = skd.wpac(model, data, num_samples=24, criterion=criterion, progress=False)
    assert out_model is model
    with torch.no_grad():
        err = max_rel_error(model(x), ref)
    print(f"max rel error {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("criterion", CRITERIA)
def test_function_preserved_digits(digits_vit, digits_data, criterion: str) -> None:
    train, test = digits_data
    images = test.tensors[0][:64]
    with torch.no_grad():
        ref = digits_vit(images)
    skd.wpac(digits_vit, DataLoader(Subset(train, range(64)), batch_size=64), num_samples=64,
             criterion=criterion, progress=False)
    with torch.no_grad():
        err = max_rel_error(digits_vit(images), ref)
    print(f"max rel error {err:.2e}")
    assert err <= 1e-4


def test_transform_really_changes_weights_and_reports() -> None:
    model = VisionTransformer(**TINY).eval()
    before = copy.deepcopy(model.state_dict())
    skd.wpac(model, random_batches(), num_samples=24, progress=False)
    rep = model.skd_report
    assert rep.criterion == "wpac" and rep.samples == 24 and rep.seconds > 0 and len(rep.blocks) == 2
    for b, blk in zip(rep.blocks, model.blocks, strict=True):
        assert (b.qk, b.vo) == ("rotation", "rotation")
        for spectrum in (b.qk_spectrum, b.vo_spectrum):
            assert spectrum.shape == (3, 16) and bool((spectrum >= 0).all())
            assert bool((spectrum[:, :-1] >= spectrum[:, 1:]).all()), "eigenvalues must be descending"
        assert b.mlp_importance.shape == (192,)
        assert bool((b.mlp_importance[:-1] >= b.mlp_importance[1:]).all())
        assert not torch.equal(blk.attn.qkv.weight, before[f"{b.name}.attn.qkv.weight"])


def test_rotation_diagonalises_value_covariance() -> None:
    """After WPAC with uniform weights ("pca"), v's per-head covariance on the same data is diagonal and
    sorted: the leading dims carry the most variance."""
    from skd.models import adapter_for
    from skd.stats import calibrate

    model = VisionTransformer(**TINY).eval()
    data = random_batches()
    skd.wpac(model, data, num_samples=24, criterion="pca", progress=False)
    blocks = adapter_for(model).blocks
    stats = calibrate(model, blocks, data, num_samples=24, covariance="uniform", progress=False)
    for i, feats in enumerate(stats.blocks):
        cov = feats["v"].cov.covariance()
        diag = cov.diagonal(dim1=1, dim2=2)
        off = cov - torch.diag_embed(diag)
        assert float(off.abs().max()) <= 1e-5 * float(diag.max())
        assert bool((diag[:, :-1] >= diag[:, 1:] - 1e-9 * diag.max()).all())
        torch.testing.assert_close(diag, model.skd_report.blocks[i].vo_spectrum.to(diag), rtol=1e-4, atol=1e-10)


WEIGHT = {"vit_cls": "blocks.0.attn.qkv.weight", "swin": "layers.0.blocks.0.attn.qkv.weight"}  # one rotated


@pytest.mark.parametrize("family", ["vit_cls", "swin"])
def test_pca_with_the_mlp_compensated_calibrates_forward_only(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """"pca" rotates by uniform q/k/v covariances, forward statistics: with the MLP compensated its calibration
    reads no gradient (skd.wpac.gradient_features), runs under no_grad from images without labels, and gives
    the model the gradient pass gives."""
    from skd import compensation
    from skd.models import adapter_for
    from skd.stats import FEATURES

    module = importlib.import_module("skd.wpac")
    torch.manual_seed(0)
    model = (tiny_swin() if family == "swin" else VisionTransformer(**TINY)).eval()
    data = random_batches()
    through_gradients = copy.deepcopy(model)
    original = copy.deepcopy(model.state_dict())
    grad_modes = []
    handle = adapter_for(model).blocks[0].fc2.register_forward_hook(
        lambda *_: grad_modes.append(torch.is_grad_enabled()))
    skd.wpac(model, [x for x, _ in data], num_samples=24, criterion="pca", compensate=True, progress=False)
    handle.remove()
    assert grad_modes == [False] * len(data)
    monkeypatch.setattr(module, "gradient_features", lambda *args: frozenset(FEATURES))
    skd.wpac(through_gradients, data, num_samples=24, criterion="pca", compensate=True, progress=False)
    means = compensation.means(model)
    expected = {**through_gradients.state_dict(), **compensation.means(through_gradients)}
    got = {**model.state_dict(), **means}
    assert expected.keys() == got.keys() and means  # the compensation's means stored
    for key, t in expected.items():
        torch.testing.assert_close(got[key], t, rtol=0, atol=0, msg=key)
    assert not torch.equal(got[WEIGHT[family]], original[WEIGHT[family]])


def test_wpac_on_elastic_equals_bare_then_wrap() -> None:
    data = random_batches()
    bare = VisionTransformer(**TINY).eval()
    wrapped = skd.ElasticViT(copy.deepcopy(bare))
    skd.wpac(bare, data, num_samples=24, progress=False)
    assert skd.wpac(wrapped, data, num_samples=24, progress=False) is wrapped
    assert wrapped.skd_report.samples == 24
    expected = skd.ElasticViT(bare)
    for name, p in wrapped.state_dict().items():
        torch.testing.assert_close(p, expected.state_dict()[name], rtol=0, atol=1e-6)


def test_qk_norm_warns_once_and_permutes_norm() -> None:
    model = _qk_norm_vit().eval()
    weights = [blk.attn.q_norm.weight.clone() for blk in model.blocks]
    with pytest.warns(UserWarning, match="qk_norm") as record:
        skd.wpac(model, random_batches(), num_samples=24, progress=False)
    assert sum("qk_norm" in str(w.message) for w in record) == 1
    for blk, w, rep in zip(model.blocks, weights, model.skd_report.blocks, strict=True):
        assert (rep.qk, rep.vo) == ("permutation", "rotation")
        assert torch.equal(blk.attn.q_norm.weight.sort().values, w.sort().values)  # permuted, not changed


def test_dataset_input_is_batched(digits_data) -> None:
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=10).eval()
    skd.wpac(model, Subset(digits_data[0], range(100)), num_samples=100, criterion="taylor", progress=False)
    assert model.skd_report.samples == 100


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_calibrates_in_fp32(dtype: torch.dtype) -> None:
    model = VisionTransformer(**TINY).eval()
    data = random_batches()
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        ref = model(x)
    with torch.no_grad():
        cast_err = max_rel_error(copy.deepcopy(model).to(dtype).float()(x), ref)  # rounding alone
    model = model.to(dtype)
    skd.wpac(model, data, num_samples=24, progress=False)
    rep = model.skd_report.blocks[0]
    assert rep.vo_spectrum.dtype == torch.float64 and bool(torch.isfinite(rep.vo_spectrum).all())
    assert float(rep.vo_spectrum.max()) > 0
    with torch.no_grad():
        err = max_rel_error(model.float()(x), ref)
    print(f"max rel error {err:.2e}; casting alone {cast_err:.2e}")
    assert err <= 3 * cast_err  # WPAC adds no more than the rounding of the transformed weights


# ----------------------------------------------------------------------------------- eigen solver
def test_principal_axes_ill_conditioned_and_zero() -> None:
    g = torch.randn(8, 8, dtype=torch.float64)
    rank1 = torch.outer(g[0], g[0])
    scaled = g * torch.logspace(0, -15, 8, dtype=torch.float64)  # condition number ~1e30
    graded = scaled @ scaled.T
    cov = torch.stack([rank1, graded, torch.zeros(8, 8, dtype=torch.float64), g @ g.T])
    t, evals = principal_axes(cov)
    assert bool(torch.isfinite(t).all()) and bool(torch.isfinite(evals).all())
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(t @ t.transpose(1, 2), eye.expand(4, 8, 8), rtol=0, atol=1e-12)
    assert torch.equal(t[2], eye) and torch.equal(evals[2], torch.zeros(8, dtype=torch.float64))
    torch.testing.assert_close(t[0, 0].abs(), g[0].abs() / g[0].norm())  # the rank-1 direction first
    assert bool((evals[:, :-1] >= evals[:, 1:]).all()) and bool((evals >= 0).all())
    # T C T^T is diagonal with the spectrum
    torch.testing.assert_close(t[3] @ cov[3] @ t[3].T, torch.diag(evals[3]), rtol=0, atol=1e-9)


def test_zero_gradient_feature_is_left_alone() -> None:
    """A loss that ignores the model gives zero token weights everywhere: warn, keep heads as they are."""
    model = VisionTransformer(**TINY).eval()
    qkv = model.blocks[0].attn.qkv.weight.clone()
    with pytest.warns(UserWarning, match="token weights were zero"):
        skd.wpac(model, random_batches(), num_samples=24, loss_fn=lambda out, y: (out * 0).sum(), progress=False)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, qkv, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- quality
@pytest.fixture(scope="module")
def digits_table(_digits_vit_trained, digits_data) -> dict[str, list[float]]:
    """Test accuracy (%) per criterion with 1/4, 2/4, 3/4 of every head's dims kept (MLP full)."""
    train, test = digits_data
    calib = DataLoader(Subset(train, range(512)), batch_size=128)
    table = {}
    for criterion in ("wpac", "taylor", "magnitude", "random"):
        elastic = skd.wpac(skd.ElasticViT(copy.deepcopy(_digits_vit_trained)), calib, num_samples=512,
                           criterion=criterion, progress=False)
        table[criterion] = []
        for keep in (8, 16, 24):
            elastic.set_subnet(subnet=skd.Subnet(attn=[keep] * 4, mlp=list(elastic.hiddens)))
            table[criterion].append(100 * accuracy(elastic, test))
    print(table)
    return table


def test_wpac_beats_baselines_on_digits(digits_table: dict[str, list[float]]) -> None:
    wpac = digits_table["wpac"]
    for criterion in ("taylor", "magnitude", "random"):
        for f, (ours, theirs) in enumerate(zip(wpac, digits_table[criterion], strict=True)):
            assert ours >= theirs, f"{f + 1}/4 kept: wpac {ours:.1f} < {criterion} {theirs:.1f}"
    assert wpac[0] >= max(digits_table[c][0] for c in ("taylor", "magnitude", "random")) + 5, "1/4: clearly better"
    assert wpac[0] >= 90


# ------------------------------------------------------------------------------------- bad input
def test_unsupported_model() -> None:
    with pytest.raises(skd.UnsupportedModelError):
        skd.wpac(torch.nn.Linear(3, 3), random_batches(), progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_images(value: float) -> None:
    data = random_batches()
    data[1][0][0, 0, 0, 0] = value
    with pytest.raises(ValueError, match="batch 1: images contain NaN or Inf"):
        skd.wpac(VisionTransformer(**TINY).eval(), data, num_samples=24, progress=False)


def test_nonfinite_gradient_names_block_and_tensor() -> None:
    def loss_fn(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (out * float("inf")).sum()

    with pytest.raises(ValueError, match=r"blocks\.1 hidden: gradient contains NaN or Inf"):
        skd.wpac(VisionTransformer(**TINY).eval(), random_batches(), num_samples=24, loss_fn=loss_fn,
                 progress=False)


def test_empty_loader() -> None:
    model = VisionTransformer(**TINY).eval()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no samples"):
        skd.wpac(model, [], progress=False)
    with pytest.raises(ValueError, match="no samples"):
        skd.wpac(model, DataLoader(TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0).long())), progress=False)
    for name, p in model.state_dict().items():
        assert torch.equal(p, state[name]), "a failed wpac must not change weights"


def test_fewer_samples_than_asked_warns_and_uses_them() -> None:
    model = VisionTransformer(**TINY).eval()
    with pytest.warns(UserWarning, match="only 24 samples of the 1024"):
        skd.wpac(model, random_batches(), progress=False)
    assert model.skd_report.samples == 24


@pytest.mark.parametrize("kwargs", [dict(criterion="obd"), dict(num_samples=0), dict(num_samples=2.5)])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        skd.wpac(VisionTransformer(**TINY).eval(), random_batches(), progress=False, **kwargs)
