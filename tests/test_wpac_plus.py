"""Criterion "wpac+": its transforms (skd.transforms) on synthetic data, then on timm models end to end."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch

import skd
from skd.models import adapter_for
from skd.transforms import output_preserving


def _moments(x: torch.Tensor) -> torch.Tensor:
    """x: (N, G, r) -> (G, r, r) float64 second moments."""
    x = x.double()
    return torch.einsum("ngi,ngj->gij", x, x) / x.shape[0]


def _features(g: int, r: int, n: int, generator: torch.Generator, rank: int | None = None) -> torch.Tensor:
    """(n, g, r) correlated, anisotropic, non-centred features (optionally of rank < r)."""
    k = rank or r
    mix = torch.randn(g, k, r, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, k)[None, :, None]
    return torch.einsum("ngk,gkr->ngr", torch.randn(n, g, k, generator=generator, dtype=torch.float64), mix) + \
        torch.randn(g, r, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("rank", [None, 2])
def test_output_preserving_keeps_the_output_and_is_optimal(rank: int | None) -> None:
    gen = torch.Generator().manual_seed(3)
    g, r, d = 3, 8, 20
    c = _features(g, r, 1000, gen, rank)
    w = torch.randn(g, d, r, generator=gen, dtype=torch.float64)
    t, t_inv, sigma = output_preserving(_moments(c), w)
    assert torch.allclose(t @ t_inv, torch.eye(r, dtype=torch.float64).expand(g, r, r), atol=1e-8)
    fresh = _features(g, r, 30, gen, rank)
    out = torch.einsum("gdr,ngr->ngd", w, fresh)
    moved = torch.einsum("gdr,ngr->ngd", w @ t_inv, torch.einsum("gab,ngb->nga", t, fresh))
    assert ((moved - out).abs().max() / out.abs().max()).item() <= 1e-10
    assert bool((sigma[:, :-1] >= sigma[:, 1:] - 1e-12).all())
    full = torch.einsum("gdr,ngr->ngd", w, c)
    evals, evecs = torch.linalg.eigh(_moments(c))
    best = torch.linalg.svdvals(w @ evecs @ torch.diag_embed(evals.clamp_min(0).sqrt()) @ evecs.mT)  # (G, r)
    for keep in (1, 2, 5):
        ct = torch.einsum("gab,ngb->nga", t, c)
        ct[..., keep:] = 0
        err = (torch.einsum("gdr,ngr->ngd", w @ t_inv, ct) - full).square().sum(-1).mean(0)  # (G,)
        # Eckart–Young: the best rank-`keep` error is the sum of the dropped squared singular values of
        # W_o C^{1/2} (computed here without the transform's damping).
        assert torch.allclose(err, best[:, keep:].square().sum(-1), rtol=1e-5, atol=1e-6)  # atol: the 1e-6 damping


def test_transforms_reject_bad_statistics() -> None:
    good = torch.eye(4).expand(2, 4, 4)
    with pytest.raises(ValueError, match="cc must be"):
        output_preserving(torch.eye(4), torch.ones(2, 5, 4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        output_preserving(torch.full((2, 4, 4), float("nan")), torch.ones(2, 5, 4))
    with pytest.raises(ValueError, match="w_out must be"):
        output_preserving(good, torch.ones(2, 3, 4))


def test_zero_statistics_give_identity_like_invertible_transforms() -> None:
    """A head that never fired (all-zero moments) still gets a valid, exactly invertible transform."""
    zero = torch.zeros(2, 4, 4, dtype=torch.float64)
    t, t_inv, _ = output_preserving(zero, torch.randn(2, 6, 4, dtype=torch.float64))
    assert torch.isfinite(t).all() and torch.allclose(t @ t_inv, torch.eye(4, dtype=torch.float64).expand(2, 4, 4))


# ------------------------------------------------------------------------------ on timm models
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)


def _tiny_swin() -> torch.nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=24, depths=(2, 2),
                           num_heads=(2, 4), num_classes=5)


def _models() -> dict[str, Callable[[], torch.nn.Module]]:
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    return {
        "vit_cls": lambda: VisionTransformer(**TINY),
        "vit_avg_ls": lambda: VisionTransformer(**TINY, class_token=False, global_pool="avg", init_values=0.5),
        "vit_reg_nobias": lambda: VisionTransformer(**TINY, reg_tokens=2, qkv_bias=False),
        "deit_distilled": lambda: VisionTransformerDistilled(**TINY),
        "vit_qk_norm": lambda: VisionTransformer(**TINY, qk_norm=True),
        "swin": _tiny_swin,
    }


MODELS = _models()


def _randomised(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A model with every parameter perturbed: timm's init leaves biases at 0, which would hide the folds."""
    model = make().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _batches(n: int = 24, batch: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 5, (n,), generator=gen)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _head_norms(spec) -> torch.Tensor:
    """(3, H) Frobenius norms of each head's q, k, v weight rows."""
    return torch.stack([w.double().view(spec.num_heads, spec.head_dim, -1).norm(dim=(1, 2))
                        for w, _ in spec.qkv_weights()])


@pytest.mark.parametrize("name", list(MODELS))
def test_wpac_plus_preserves_function_and_folds_the_value_bias(name: str) -> None:
    model = _randomised(MODELS[name])
    blocks = adapter_for(model).blocks
    head_norms = [_head_norms(s) for s in blocks]
    x = torch.randn(6, 3, 32, 32)  # fresh inputs, not the calibration batches
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*qk_norm.*")
        skd.wpac(model, _batches(), num_samples=24, criterion="wpac+", progress=False)
    with torch.no_grad():
        err = ((model(x) - ref).abs().max() / ref.abs().max()).item()
    print(f"{name}: max rel error {err:.2e}")
    assert err <= 1e-5
    for spec, rep, before in zip(blocks, model.skd_report.blocks, head_norms, strict=True):
        assert rep.vo == "transform" and rep.qk == ("permutation" if spec.has_qk_norm else "rotation")
        # an orthogonal per-head transform would keep each head's Frobenius norm: these are not orthogonal
        assert not torch.allclose(_head_norms(spec)[2], before[2], rtol=1e-3)
        v_b = spec.qkv_weights()[2][1]
        if v_b is not None:  # moved into the output bias
            assert torch.equal(v_b, torch.zeros_like(v_b))


@pytest.mark.parametrize("name", ["vit_cls", "vit_avg_ls"])
def test_wpac_plus_elastic_matches_masking_oracle_and_extract(name: str) -> None:
    """Non-orthogonal transforms truncate like any weights: ElasticViT and extract() of a wpac+ model equal
    the independent masking oracle (which keeps the full head's softmax scale)."""
    from tests.elastic_oracle import masked_copy, random_subnets, rel_err

    model = _randomised(MODELS[name])
    elastic = skd.ElasticViT(model).eval()
    skd.wpac(elastic, _batches(), num_samples=24, criterion="wpac+", progress=False)
    with elastic.standard_layout() as inner:
        bare = copy.deepcopy(inner)
    x = torch.randn(2, 3, 32, 32)
    for subnet in random_subnets(elastic.head_dims, elastic.hiddens, n=5, seed=7):
        with torch.no_grad():
            y = elastic.set_subnet(subnet=subnet)(x)
            oracle = masked_copy(bare, subnet)(x)
            extracted = elastic.extract()(x)
        assert rel_err(y, oracle) <= 1e-5
        assert rel_err(extracted, y) <= 1e-5


def test_wpac_plus_on_a_text_family_with_padding() -> None:
    """The port's BERT-like family (separate q/k/v Linears, post-LayerNorm, padded batches): function
    preserved ≤ 1e-5 on fresh batches, and ElasticViT subnets equal the masking oracle of the result."""
    from tests.elastic_oracle import random_subnets
    from tests.test_port import _assert_tokens_close, _batch, _masked_copy, _tiny

    elastic = skd.ElasticViT(_tiny(seed=3))
    batch = _batch(7, seed=11)
    with torch.no_grad():
        before = elastic(**batch)
    skd.wpac(elastic, [_batch(8, seed=k) for k in range(3)], num_samples=24, criterion="wpac+", progress=False)
    assert {(b.qk, b.vo) for b in elastic.skd_report.blocks} == {("rotation", "transform")}
    with torch.no_grad():
        _assert_tokens_close(elastic(**batch), before, batch["attention_mask"])
        with elastic.standard_layout() as inner:
            bare = copy.deepcopy(inner)
        for subnet in random_subnets(elastic.head_dims, elastic.hiddens, n=4, seed=5):
            _assert_tokens_close(elastic(**batch, subnet=subnet), _masked_copy(bare, subnet)(**batch),
                                 batch["attention_mask"])


def test_wpac_plus_on_digits_keeps_more_than_wpac(digits_vit, digits_data) -> None:
    """On the trained digits ViT at 1/4 of every head's dims (attention only), wpac+ keeps at least the
    paper's WPAC accuracy (same 256 calibration samples)."""
    from torch.utils.data import DataLoader, Subset

    from skd.digits import accuracy

    train, test = digits_data
    calib = DataLoader(Subset(train, range(256)), batch_size=64)
    accs = {}
    for criterion in ("wpac", "wpac+"):
        elastic = skd.ElasticViT(copy.deepcopy(digits_vit)).eval()
        skd.wpac(elastic, calib, num_samples=256, criterion=criterion, progress=False)
        quarter = [d // 4 for d in elastic.head_dims]
        elastic.set_subnet(subnet=skd.Subnet(attn=quarter, mlp=list(elastic.hiddens)))
        accs[criterion] = accuracy(elastic, test)
    print(accs)
    assert accs["wpac+"] >= accs["wpac"] - 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wpac_plus_half_precision_adds_no_more_than_rounding(dtype: torch.dtype) -> None:
    """Non-orthogonal transforms are balanced (equal energy on both sides of every dim), so casting the
    transformed weights to half precision loses about what casting the original ones does."""
    model = _randomised(MODELS["vit_cls"])
    x = torch.cat([b[0] for b in _batches()])
    with torch.no_grad():
        ref = model(x)
        cast_err = ((copy.deepcopy(model).to(dtype).float()(x) - ref).abs().max() / ref.abs().max()).item()
    model = model.to(dtype)
    skd.wpac(model, _batches(), num_samples=24, criterion="wpac+", progress=False)
    with torch.no_grad():
        err = ((model.float()(x) - ref).abs().max() / ref.abs().max()).item()
    print(f"max rel error {err:.2e}; casting alone {cast_err:.2e}")
    assert err <= 3 * cast_err


def test_context_second_moment_is_uniform_under_weighted_covariance() -> None:
    """wpac+ calibrates q/k with the paper's Θ weights but the context uniformly: every token weighs 1."""
    from skd.stats import CONTEXT, calibrate

    model = _randomised(MODELS["vit_cls"])
    blocks = adapter_for(model).blocks
    stats = calibrate(model, blocks, _batches(8, 4), num_samples=8, covariance="weighted", context=True,
                      progress=False)
    tokens = 8 * blocks[0].tokens
    for feats in stats.blocks:
        assert float(feats[CONTEXT].cov.weight_sum) == tokens
        assert float(feats["q"].cov.weight_sum) != tokens  # Θ-weighted


@pytest.mark.parametrize("name", ["BertModel", "BertForSequenceClassification", "RobertaModel",
                                  "RobertaForTokenClassification", "ViTModel", "ViTForImageClassification",
                                  "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"])
def test_wpac_plus_on_hugging_face_families(name: str) -> None:
    """Every served Hugging Face family: function preserved ≤ 1e-5 on a fresh batch (padded text), and
    ElasticViT subnets of the result equal the masking oracle."""
    from hf_helpers import inputs, main_output, masked_copy, tiny

    from tests.elastic_oracle import random_subnets, rel_err

    model = tiny(name)
    x = inputs(name, batch=3)
    with torch.no_grad():
        ref = main_output(model(**x))
    calibration = [inputs(name, batch=4) for _ in range(2)]
    elastic = skd.ElasticViT(model).eval()
    skd.wpac(elastic, calibration, num_samples=8, criterion="wpac+", progress=False,
             loss_fn=lambda out, batch: main_output(out).float().square().sum())
    with torch.no_grad():
        assert rel_err(main_output(elastic(**x)), ref) <= 1e-5
        for sub in random_subnets(elastic.head_dims, elastic.hiddens, 3, seed=2):
            with elastic.standard_layout() as bare:
                oracle = main_output(masked_copy(bare, sub)(**x))
            assert rel_err(main_output(elastic(**x, subnet=sub)), oracle) <= 1e-5
