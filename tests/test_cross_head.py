"""Cross-head compensation (`skd.wpac(..., compensate=..., cross_head=True)`, skd.compensation): the stored
covariance is the measured covariance of the transformed contexts, truncated subnets equal an independent
oracle that applies B = C_dk (C_kk + delta I)^-1 to a masked copy (head-major index sets, an explicit
inverse), full width is unchanged, extract() folds it, files keep it, cached plans follow in-place weight
updates, gradients match the oracle's, and the CLI flag works (and refuses a bad combination)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
from cli_helpers import fails, skd
from torch import nn

import skd as skd_api
from skd import Subnet, compensation
from skd.elastic.layout import rank_major_permutation
from skd.io import load_tensors
from skd.models import adapter_for
from tests.test_compensation import _batches, _feed, _model, _rel


def _measured_covariances(model: nn.Module, batches: list, weights=None) -> list[torch.Tensor]:
    """Per block: the centred (C, C) float64 covariance of the output projection's input, measured by a hook
    on the (standard-layout) model over `batches` (tokens weighted by weights(batch) (B, T), or 1)."""
    blocks = adapter_for(model).blocks
    acc: dict[int, list] = {}

    def hook(i: int, x: torch.Tensor, w: torch.Tensor | None) -> None:
        x = x.double().reshape(-1, x.shape[-1])
        w = torch.ones(x.shape[0], dtype=torch.float64) if w is None else w.double().reshape(-1)
        s = acc.setdefault(i, [0.0, 0.0, 0.0])
        s[0] += w.sum()
        s[1] += w @ x
        s[2] += (w[:, None] * x).T @ x

    _feed(model, batches, weights, [(spec.proj, functools.partial(hook, i)) for i, spec in enumerate(blocks)])
    out = []
    for i in range(len(blocks)):
        n, s, ss = acc[i]
        mean = s / n
        out.append(ss / n - torch.outer(mean, mean))
    return out


def _corrected(w: torch.Tensor, b: torch.Tensor, cov: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's formula on a head-major Linear: (W with dropped columns zeroed and kept ones corrected,
    corrected b), differentiable in w and b. kept: (C,) bool."""
    kk = cov[kept][:, kept].double()
    dk = cov[~kept][:, kept].double()
    delta = 1e-3 * torch.trace(kk) / int(kept.sum())
    b_map = (dk @ torch.linalg.inv(kk + delta * torch.eye(kk.shape[0], dtype=torch.float64))).to(w.dtype)
    kept_idx = kept.nonzero().squeeze(1)
    weight = (w * kept.to(w.dtype)).index_add(1, kept_idx, w[:, ~kept] @ b_map)
    bias = b + w[:, ~kept] @ (mean[~kept] - b_map @ mean[kept])
    return weight, bias


def _oracle_params(bare: nn.Module, subnet: Subnet, params: dict[str, torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
    """{parameter name: tensor} to override in the masked copy of `bare`: every truncated output projection's
    cross-head corrected weight and bias (mean-compensated bias when it stores no covariance), every fc2's
    mean-compensated bias (when it stores a mean).
    params: the bare model's parameters to compute from (e.g. leaves that require grad)."""
    params = dict(bare.named_parameters()) if params is None else params
    names = {mod: name for name, mod in bare.named_modules()}
    out = {}
    for spec, r, h in zip(adapter_for(bare).blocks, subnet.attn, subnet.mlp, strict=True):
        heads, hd = spec.num_heads, spec.head_dim
        proj = names[spec.proj]
        kept = torch.arange(heads * hd) % hd < r
        w, b, ctx_mean = params[proj + ".weight"], params[proj + ".bias"], compensation.input_mean(spec.proj)
        if 0 < r < hd and compensation.input_cov(spec.proj) is not None:
            out[proj + ".weight"], out[proj + ".bias"] = _corrected(w, b, compensation.input_cov(spec.proj),
                                                                    ctx_mean, kept)
        elif 0 < r < hd:  # mean compensation only: B = 0
            out[proj + ".bias"] = b + w[:, ~kept] @ ctx_mean[~kept]
        fc2, mean = names[spec.fc2], compensation.input_mean(spec.fc2)
        if mean is not None and 0 < h < spec.hidden:
            dropped = (torch.arange(spec.hidden) >= h).to(mean.dtype)
            out[fc2 + ".bias"] = params[fc2 + ".bias"] + params[fc2 + ".weight"] @ (dropped * mean)
    return out


def _oracle(bare: nn.Module, subnet: Subnet, masked_copy) -> nn.Module:
    """A masked copy of `bare` with the oracle's corrected parameters written in."""
    out = masked_copy(bare, subnet)
    with torch.no_grad():
        for name, value in _oracle_params(bare, subnet).items():
            out.get_parameter(name).copy_(value)
    return out


def _bare(elastic: skd_api.ElasticViT) -> nn.Module:
    with elastic.standard_layout() as inner:
        return copy.deepcopy(inner)


# ----------------------------------------------------------------------------------------- the math
def test_compensated_linear_is_the_least_squares_prediction_and_bad_statistics_are_refused() -> None:
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(6, 4).double()
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen,
                                                                              dtype=torch.float64)
    mean, cov = x.mean(0), torch.cov(x.T, correction=0)
    with pytest.raises(ValueError, match="input mean stored first"):
        compensation.set_input_cov(lin, cov)
    compensation.set_input_mean(lin, mean)
    compensation.set_input_cov(lin, cov)
    assert "skd_input_cov" not in lin.state_dict()  # non-persistent, like the mean
    for k in range(1, 6):
        weight, bias = compensation.compensated_linear(lin, k)
        kept = torch.arange(6) < k
        w_ref, b_ref = _corrected(lin.weight, lin.bias, cov, mean, kept)
        torch.testing.assert_close(weight, w_ref[:, :k])
        torch.testing.assert_close(bias, b_ref)
        # without the ridge, the correction is the least-squares fit of x_d on x_k: its residual is
        # uncorrelated with x_k, so the output error W_d (x_d - pred) is too (up to the light ridge)
        pred = mean[k:] + (x[:, :k] - mean[:k]) @ compensation.cross_head_map(lin, k).T
        resid = (x[:, k:] - pred) - (x[:, k:] - pred).mean(0)
        corr = (resid.T @ (x[:, :k] - mean[:k])) / len(x)
        assert corr.abs().max() <= 2e-2 * cov.diagonal().max()
    with pytest.raises(ValueError, match=r"shape \(6, 6\)"):
        compensation.set_input_cov(lin, torch.eye(5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        compensation.set_input_cov(lin, torch.full((6, 6), float("inf")))
    compensation.set_input_mean(lin, None)  # the covariance goes with its mean
    assert compensation.input_cov(lin) is None


def test_calibrate_refuses_the_full_context_covariance_without_the_context() -> None:
    from skd.stats import calibrate

    model = _model()
    with pytest.raises(ValueError, match="context_full=True needs context=True"):
        calibrate(model, adapter_for(model).blocks, _batches(), num_samples=8, covariance=None, context_full=True,
                  progress=False)


def test_wpac_refuses_cross_head_without_attention_compensation() -> None:
    model = _model()
    for compensate in (False, "mlp"):
        with pytest.raises(ValueError, match="cross_head=True needs the attention part compensated"):
            skd_api.wpac(model, _batches(), num_samples=8, progress=False, compensate=compensate, cross_head=True)
    with pytest.raises(ValueError, match="cross_head must be True or False"):
        skd_api.wpac(model, _batches(), num_samples=8, progress=False, compensate=True, cross_head="yes")


# --------------------------------------------------------------------------------- through skd.wpac
@pytest.mark.parametrize("criterion", ["wpac+", "wpac", "taylor"])
def test_stored_covariance_is_the_measured_one_and_the_function_is_kept(criterion: str) -> None:
    model = _model(seed=1)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    data = _batches()
    skd_api.wpac(model, data, num_samples=24, criterion=criterion, progress=False, compensate="attn",
                 cross_head=True)
    with torch.no_grad():
        assert _rel(model(x), ref) <= 1e-5
    for spec, cov in zip(adapter_for(model).blocks, _measured_covariances(model, data), strict=True):
        stored = compensation.input_cov(spec.proj).double()
        torch.testing.assert_close(stored, cov, rtol=1e-4, atol=1e-5 * float(cov.abs().max()))
        assert compensation.input_cov(spec.fc2) is None  # the MLP keeps mean compensation
    skd_api.wpac(model, data, num_samples=24, criterion=criterion, progress=False, compensate="attn")
    assert all(compensation.input_cov(s.proj) is None for s in adapter_for(model).blocks)  # stale ones removed


@pytest.mark.parametrize(("arch", "compensate"), [("vit_tiny_patch16_224", "attn"),
                                                  ("deit_tiny_distilled_patch16_224", True), ("swin", "attn")])
def test_elastic_equals_the_oracle_extract_and_full_width(arch: str, compensate: bool | str) -> None:
    from tests.elastic_oracle import frozen_forward, masked_copy, random_subnets
    from tests.test_compensation import _swin

    model = _swin() if arch == "swin" else _model(arch, seed=2)
    x = torch.randn(2, 3, 32, 32) + 0.5
    with torch.no_grad():
        uncompensated = model(x)
    elastic = skd_api.ElasticViT(model).eval()
    skd_api.wpac(elastic, _batches(), num_samples=24, criterion="wpac+", progress=False, compensate=compensate,
                 cross_head=True)
    bare = _bare(elastic)
    hd = elastic.head_dims[0]
    uniform = [Subnet(attn=[r] * len(elastic.head_dims), mlp=[h * r // hd for h in elastic.hiddens])
               for r in range(1, hd + 1)]
    with torch.no_grad():
        for subnet in uniform + random_subnets(elastic.head_dims, elastic.hiddens, n=4, seed=3):
            y = elastic(x, subnet=subnet)
            assert _rel(y, _oracle(bare, subnet, masked_copy)(x)) <= 1e-5
            assert _rel(frozen_forward(elastic, subnet, x), y) <= 1e-5  # capture(frozen=True)'s compensated copies
            extracted = elastic.extract(subnet).eval()
            assert compensation.means(extracted) == {}  # folded: runs without skd
            assert _rel(extracted(x), y) <= 1e-5
        assert _rel(elastic(x, subnet=uniform[-1]), uncompensated) <= 1e-5
        # cross-head does change subnets beyond mean compensation
        half, mean_only = uniform[hd // 2 - 1], copy.deepcopy(bare)
        for spec in adapter_for(mean_only).blocks:
            compensation.set_input_cov(spec.proj, None)
        assert (elastic(x, subnet=half) - _oracle(mean_only, half, masked_copy)(x)).abs().max() \
            > 1e-3 * uncompensated.abs().max()


def test_hf_bert_covariance_ignores_padding_and_matches_the_oracle() -> None:
    from tests import hf_helpers
    from tests.elastic_oracle import random_subnets

    name = "BertModel"
    elastic = skd_api.ElasticViT(hf_helpers.tiny(name))
    data = [hf_helpers.inputs(name, batch=4) for _ in range(2)]
    skd_api.wpac(elastic, data, num_samples=8, criterion="wpac+", progress=False, compensate=True, cross_head=True)
    bare = _bare(elastic)
    measured = _measured_covariances(bare, data, weights=lambda b: b["attention_mask"])
    with_padding = _measured_covariances(bare, data)
    for spec, cov, wrong in zip(adapter_for(bare).blocks, measured, with_padding, strict=True):
        stored, tol = compensation.input_cov(spec.proj).double(), 1e-4 * float(cov.abs().max())  # fp32 sums
        torch.testing.assert_close(stored, cov, rtol=1e-4, atol=tol)
        assert (stored - wrong).abs().max() > 10 * tol  # the padding tokens would have shown
    batch = hf_helpers.inputs(name, batch=3)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        for subnet in random_subnets(elastic.head_dims, elastic.hiddens, n=4, seed=5):
            y = hf_helpers.main_output(elastic(**batch, subnet=subnet))
            ref = hf_helpers.main_output(_oracle(bare, subnet, hf_helpers.masked_copy)(**batch))
            assert _rel(y[keep], ref[keep]) <= 1e-5


# ------------------------------------------------------------------------------------------- files
def test_save_load_round_trips_the_covariances(tmp_path: Path) -> None:
    model = _model(seed=3)
    skd_api.wpac(model, _batches(), num_samples=24, criterion="wpac+", progress=False, compensate="attn",
                 cross_head=True)
    bare = copy.deepcopy(model)
    elastic = skd_api.ElasticViT(model).eval()
    x = torch.randn(2, 3, 32, 32) + 0.5
    subnet = Subnet(attn=[5, 2, 16], mlp=[100, 7, 192])
    with torch.no_grad():
        expected = elastic(x, subnet=subnet)
    for obj, name in ((elastic, "elastic"), (bare, "bare")):  # rank-major and head-major files
        path = tmp_path / f"{name}.safetensors"
        skd_api.save(obj, path)
        tensors, _ = load_tensors(path)
        assert sum(k.startswith("skd_input_cov:") for k in tensors) == 3
        loaded = skd_api.load(path).eval()
        assert sorted(compensation.means(loaded.model)) == sorted(k for k in tensors if k.startswith("skd_input"))
        with torch.no_grad():
            assert torch.allclose(loaded(x, subnet=subnet), expected, rtol=1e-6, atol=1e-6)
    small = tmp_path / "small.safetensors"
    skd_api.save(elastic.extract(subnet), small)
    assert not any(k.startswith("skd_input") for k in load_tensors(small)[0])
    with torch.no_grad():
        assert _rel(skd_api.load(small).eval()(x), expected) <= 1e-5


# ------------------------------------------------------------------------------ plans and gradients
def test_cached_plan_follows_in_place_weight_updates() -> None:
    from tests.elastic_oracle import masked_copy

    elastic = skd_api.ElasticViT(_model(seed=5)).eval()
    skd_api.wpac(elastic, _batches(), num_samples=24, criterion="wpac", progress=False, compensate=True,
                 cross_head=True)
    x = torch.randn(2, 3, 32, 32) + 0.5
    subnet = Subnet(attn=[4, 9, 2], mlp=[50, 120, 7])
    with torch.no_grad():
        assert _rel(elastic(x, subnet=subnet), _oracle(_bare(elastic), subnet, masked_copy)(x)) <= 1e-5
        for spec in elastic.adapter.blocks:  # an optimizer step: in place, the cached plan's copy is stale
            spec.proj.weight.mul_(1.1)
            spec.proj.bias.add_(0.05)
        assert _rel(elastic(x, subnet=subnet), _oracle(_bare(elastic), subnet, masked_copy)(x)) <= 1e-5


def test_gradients_through_a_compensated_subnet_equal_the_oracle(sdpa_route: str) -> None:
    """PIAD-style: a loss on a truncated subnet, backward; the output projections' weight and bias gradients
    equal those of the oracle's formula applied to leaf copies of the same weights."""
    from tests.elastic_oracle import masked_copy

    elastic = skd_api.ElasticViT(_model(seed=6)).eval()
    skd_api.wpac(elastic, _batches(), num_samples=24, criterion="wpac+", progress=False, compensate="attn",
                 cross_head=True)
    bare = _bare(elastic)
    x = torch.randn(2, 3, 32, 32) + 0.5
    subnet = Subnet(attn=[3, 12, 7], mlp=[60, 192, 9])  # every block truncated: all use the formula
    target = torch.randn(2, 5)
    elastic.zero_grad()
    ((elastic(x, subnet=subnet) - target) ** 2).sum().backward()

    masked = masked_copy(bare, subnet)
    names = {mod: name for name, mod in bare.named_modules()}
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in bare.named_parameters()}
    params = {**dict(masked.named_parameters()), **_oracle_params(bare, subnet, leaves)}
    out = torch.func.functional_call(masked, params, (x,))
    ((out - target) ** 2).sum().backward()
    for spec, mine in zip(adapter_for(bare).blocks, elastic.adapter.blocks, strict=True):
        proj = names[spec.proj]
        perm = rank_major_permutation(spec.num_heads, spec.head_dim)
        grad_w = torch.empty_like(mine.proj.weight.grad)
        grad_w[:, perm] = mine.proj.weight.grad  # rank-major column n is head-major column perm[n]
        expected_w = leaves[proj + ".weight"].grad
        assert torch.isfinite(grad_w).all() and expected_w.abs().max() > 0
        torch.testing.assert_close(grad_w, expected_w, rtol=1e-4, atol=1e-5 * float(expected_w.abs().max()))
        torch.testing.assert_close(mine.proj.bias.grad, leaves[proj + ".bias"].grad, rtol=1e-4, atol=1e-6)


def test_compiled_model_gives_the_eager_outputs_in_at_most_two_graphs() -> None:
    """Under torch.compile the plan is unbound: the correction (B's solve included) is computed in the graph
    with symbolic widths; outputs equal the eager model's, and four widths take at most two graphs (full
    width, where nothing is dropped, splits off as with mean compensation)."""
    from tests.elastic_oracle import compiled_counting

    elastic = skd_api.ElasticViT(_model(seed=7)).eval()
    skd_api.wpac(elastic, _batches(), num_samples=24, criterion="wpac+", progress=False, compensate="attn",
                 cross_head=True)
    x = torch.randn(2, 3, 32, 32) + 0.5
    compiled, counter = compiled_counting(elastic, fullgraph=True)
    with torch.no_grad():
        for keep in (0.25, 0.5, 0.75, 1.0):
            elastic.set_subnet(keep=keep)
            assert _rel(compiled(x), elastic(x)) <= 1e-5
    assert counter.frame_count <= 2


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_cross_head_stores_the_covariances_and_refuses_a_bad_combination(tmp_path: Path) -> None:
    out = tmp_path / "c.safetensors"
    r = skd("wpac", "vit_digits", "--pretrained", "--samples", "32", "--criterion", "wpac+", "--compensate", "attn",
            "--cross-head", "--out", str(out))
    assert r.returncode == 0, r.stderr
    elastic = skd_api.load(out)
    stored = [k for k in load_tensors(out)[0] if k.startswith(compensation.COV_FILE_PREFIX)]
    assert len(stored) == len(elastic.head_dims)
    assert all(compensation.input_cov(s.proj) is not None for s in elastic.adapter.blocks)
    for flags in ((), ("--compensate", "mlp")):
        r = skd("wpac", "vit_digits", "--pretrained", "--samples", "32", *flags, "--cross-head",
                "--out", str(tmp_path / "bad.safetensors"))
        fails(r, "--cross-head needs --compensate")
        assert not (tmp_path / "bad.safetensors").exists()
