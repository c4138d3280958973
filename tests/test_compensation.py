"""Bias compensation (`skd.wpac(..., compensate=True)`, skd.compensation): the stored means are the real
means, the function is preserved at full width, truncated subnets equal an independent masking oracle that
adds the dropped dims' mean contribution to the output bias, extract() folds it, files keep it."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import skd
from skd import Subnet, compensation
from skd.io import load_tensors, save_tensors
from skd.models import adapter_for

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)


def _model(arch: str = "vit_tiny_patch16_224", seed: int = 0, **kw) -> nn.Module:
    """A timm model (so skd.save can record it) with every parameter perturbed: timm's init leaves biases at
    0 and activations near-centred, which would hide the means."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, **{**TINY, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _batches(n: int = 24, batch: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 32, 32, generator=gen) + 0.5, torch.randint(0, 5, (n,), generator=gen)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _feed(model: nn.Module, batches: list, weights, hooks: list) -> None:
    """Run `batches` through `model` without grad, with a forward pre-hook per (module, fn) in `hooks`:
    fn(x, w) gets the module's input x and the batch's token weights w = weights(batch) (B, T), or None."""
    current: dict[str, torch.Tensor | None] = {}
    handles = [module.register_forward_pre_hook(lambda _, inputs, fn=fn: fn(inputs[0], current["w"]))
               for module, fn in hooks]
    try:
        with torch.no_grad():
            for batch in batches:
                current["w"] = None if weights is None else weights(batch)
                model(**batch) if isinstance(batch, dict) else model(batch[0])
    finally:
        for h in handles:
            h.remove()


def _input_moments(model: nn.Module, batches: list, weights=None) -> list[dict[str, torch.Tensor]]:
    """Per block, measured by forward hooks on the (standard-layout) model: mean of the output projection's
    input, mean and variance of fc2's input, float64 (tokens weighted by weights(batch) (B, T) or 1)."""
    blocks = adapter_for(model).blocks
    sums: dict[tuple[int, str], list] = {}

    def hook(i: int, name: str, x: torch.Tensor, w: torch.Tensor | None) -> None:
        x = x.double()
        x = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x[None]
        w = torch.ones(x.shape[:2], dtype=torch.float64) if w is None else w.double().reshape(x.shape[:2])
        s = sums.setdefault((i, name), [0.0, 0.0, 0.0])
        s[0] += w.sum()
        s[1] += (w[..., None] * x).sum((0, 1))
        s[2] += (w[..., None] * x * x).sum((0, 1))

    _feed(model, batches, weights, [(lin, functools.partial(hook, i, name)) for i, spec in enumerate(blocks)
                                    for lin, name in ((spec.proj, "proj"), (spec.fc2, "fc2"))])
    out = []
    for i in range(len(blocks)):
        (np_, sp, _), (nf, sf, qf) = sums[i, "proj"], sums[i, "fc2"]
        out.append({"proj": sp / np_, "fc2": sf / nf, "fc2_var": qf / nf - (sf / nf) ** 2})
    return out


def _compensated_oracle(bare: nn.Module, subnet: Subnet) -> nn.Module:
    """The masking oracle (dropped rows/columns zeroed) with b + W[:, dropped] E[x_dropped] as the output
    projection's and fc2's bias, the dropped set written out per head in the model's own head-major layout."""
    from tests.elastic_oracle import masked_copy

    out = masked_copy(bare, subnet)
    with torch.no_grad():
        for full, spec, r, h in zip(adapter_for(bare).blocks, adapter_for(out).blocks, subnet.attn, subnet.mlp,
                                    strict=True):
            heads, hd = full.num_heads, full.head_dim
            dropped_ctx = (torch.arange(heads * hd) % hd >= r).to(torch.float32)
            dropped_hidden = (torch.arange(full.hidden) >= h).to(torch.float32)
            if r > 0:
                spec.proj.bias += full.proj.weight @ (dropped_ctx * compensation.input_mean(full.proj))
            if h > 0:
                spec.fc2.bias += full.fc2.weight @ (dropped_hidden * compensation.input_mean(full.fc2))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------- the math
def test_compensated_bias_adds_the_dropped_columns_mean_contribution() -> None:
    gen = torch.Generator().manual_seed(1)
    lin = nn.Linear(6, 4)
    mean = torch.randn(6, generator=gen)
    assert compensation.compensated_bias(lin, 3) is lin.bias  # nothing stored: the plain bias
    compensation.set_input_mean(lin, mean)
    assert "skd_input_mean" not in lin.state_dict()  # a non-persistent buffer: state_dicts are unchanged
    for k in range(7):
        expected = lin.bias + sum((lin.weight[:, j] * mean[j] for j in range(k, 6)), torch.zeros(4))
        torch.testing.assert_close(compensation.compensated_bias(lin, k), expected)
    assert compensation.compensated_bias(lin, 6) is lin.bias  # full width: exactly the bias
    compensation.set_input_mean(lin, None)
    assert compensation.input_mean(lin) is None


def test_set_input_mean_rejects_bad_means() -> None:
    lin = nn.Linear(6, 4)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        compensation.set_input_mean(lin, torch.zeros(5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        compensation.set_input_mean(lin, torch.full((6,), float("nan")))
    with pytest.raises(ValueError, match="needs a Linear with a bias"):
        compensation.set_input_mean(nn.Linear(6, 4, bias=False), torch.zeros(6))


# --------------------------------------------------------------------------------- through skd.wpac
@pytest.mark.parametrize("criterion", ["wpac+", "wpac", "taylor"])
def test_stored_means_are_the_measured_means_and_the_function_is_kept(criterion: str) -> None:
    """Every criterion stores the means of its own transformed basis: they equal the means measured by hooks
    on the transformed model over the calibration data; the full-width function is unchanged."""
    model = _model()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    data = _batches()
    skd.wpac(model, data, num_samples=24, criterion=criterion, progress=False, compensate=True)
    with torch.no_grad():
        assert _rel(model(x), ref) <= 1e-5
    measured = _input_moments(model, data)
    for spec, m in zip(adapter_for(model).blocks, measured, strict=True):
        torch.testing.assert_close(compensation.input_mean(spec.proj).double(), m["proj"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compensation.input_mean(spec.fc2).double(), m["fc2"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_weight_criteria_compensate_from_unlabelled_data(criterion: str) -> None:
    """"magnitude" and "random" read no gradient, so their compensation's calibration runs forward only: images
    without labels are enough, and the stored means are the measured ones."""
    model = _model(seed=1)
    data = _batches()
    skd.wpac(model, [x for x, _ in data], num_samples=24, criterion=criterion, progress=False, compensate=True)
    for spec, m in zip(adapter_for(model).blocks, _input_moments(model, data), strict=True):
        torch.testing.assert_close(compensation.input_mean(spec.proj).double(), m["proj"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compensation.input_mean(spec.fc2).double(), m["fc2"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("criterion", ["wpac+", "wpac", "random"])
def test_mlp_units_are_ordered_by_centred_output_variance_under_compensation(criterion: str) -> None:
    model = _model(seed=2)
    data = _batches()
    skd.wpac(model, data, num_samples=24, criterion=criterion, progress=False, compensate=True)
    measured = _input_moments(model, data)
    for spec, rep, m in zip(adapter_for(model).blocks, model.skd_report.blocks, measured, strict=True):
        score = m["fc2_var"] * spec.fc2.weight.double().square().sum(0)  # in the new unit order
        torch.testing.assert_close(rep.mlp_importance, score, rtol=1e-3, atol=1e-6)
        assert bool((score[:-1] >= score[1:] - 1e-6 * score.max()).all())


def test_compensate_false_removes_stale_means() -> None:
    model = _model()
    skd.wpac(model, _batches(), num_samples=24, criterion="wpac+", progress=False, compensate=True)
    assert compensation.means(model)
    skd.wpac(model, _batches(), num_samples=24, criterion="wpac+", progress=False)
    assert compensation.means(model) == {}
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="compensate must be one of"):
            skd.wpac(model, _batches(), num_samples=24, progress=False, compensate=bad)


@pytest.mark.parametrize("part", ["attn", "mlp"])
def test_compensating_one_part_leaves_the_other_as_without(part: str) -> None:
    """compensate="attn" stores only the output projections' means and keeps the criterion's MLP order;
    "mlp" only fc2's (and the variance order), with the attention transformed as without compensation."""
    model = _model(seed=4)
    plain, one = copy.deepcopy(model), copy.deepcopy(model)
    skd.wpac(plain, _batches(), num_samples=24, criterion="wpac+", progress=False)
    skd.wpac(one, _batches(), num_samples=24, criterion="wpac+", progress=False, compensate=part)
    for a, b in zip(adapter_for(plain).blocks, adapter_for(one).blocks, strict=True):
        assert (compensation.input_mean(b.proj) is not None) == (part == "attn")
        assert (compensation.input_mean(b.fc2) is not None) == (part == "mlp")
        same = (a.fc1.weight, b.fc1.weight) if part == "attn" else (a.proj.weight, b.proj.weight)
        torch.testing.assert_close(*same, rtol=1e-6, atol=1e-6)


def _swin() -> nn.Module:
    from tests.test_wpac_plus import _randomised, _tiny_swin

    return _randomised(_tiny_swin)


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "swin"])
def test_elastic_equals_compensated_oracle_and_extract_at_every_width(arch: str) -> None:
    from tests.elastic_oracle import random_subnets

    elastic = skd.ElasticViT(_swin() if arch == "swin" else _model(arch)).eval()
    skd.wpac(elastic, _batches(), num_samples=24, criterion="wpac+", progress=False, compensate=True)
    with elastic.standard_layout() as inner:
        bare = copy.deepcopy(inner)
    x = torch.randn(2, 3, 32, 32) + 0.5
    hd = elastic.head_dims[0]  # every family here has one head size
    uniform = [Subnet(attn=[r] * len(elastic.head_dims), mlp=[h * r // hd for h in elastic.hiddens])
               for r in range(hd + 1)]
    with torch.no_grad():
        full = elastic(x, subnet=uniform[-1])
        plain = masked = None
        for subnet in uniform + random_subnets(elastic.head_dims, elastic.hiddens, n=6, seed=3):
            y = elastic(x, subnet=subnet)
            assert _rel(y, _compensated_oracle(bare, subnet)(x)) <= 1e-5
            extracted = elastic.extract(subnet).eval()
            assert compensation.means(extracted) == {}  # folded into its biases: runs without skd
            assert _rel(extracted(x), y) <= 1e-5
            if subnet == uniform[hd // 2]:
                from tests.elastic_oracle import masked_copy

                plain, masked = masked_copy(bare, subnet)(x), y
        assert _rel(elastic(x), full) <= 1e-6 and _rel(full, bare(x)) <= 1e-5
    assert (masked - plain).abs().max() > 1e-3 * plain.abs().max()  # the compensation does change subnets


def test_text_family_means_ignore_padding_and_match_the_oracle() -> None:
    """BERT-like port family with padded batches: the stored means count real tokens only."""
    from tests.elastic_oracle import random_subnets
    from tests.test_port import _assert_tokens_close, _batch, _tiny

    elastic = skd.ElasticViT(_tiny(seed=3))
    data = [_batch(8, seed=k) for k in range(3)]
    skd.wpac(elastic, data, num_samples=24, criterion="wpac+", progress=False, compensate=True)
    with elastic.standard_layout() as inner:
        bare = copy.deepcopy(inner)
    measured = _input_moments(bare, data, weights=lambda b: b["attention_mask"])
    for spec, m in zip(adapter_for(bare).blocks, measured, strict=True):
        torch.testing.assert_close(compensation.input_mean(spec.proj).double(), m["proj"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compensation.input_mean(spec.fc2).double(), m["fc2"], rtol=1e-4, atol=1e-5)
    batch = _batch(5, seed=9)
    with torch.no_grad():
        for subnet in random_subnets(elastic.head_dims, elastic.hiddens, n=4, seed=5):
            oracle = _hf_compensated_oracle(bare, subnet)(**batch)
            _assert_tokens_close(elastic(**batch, subnet=subnet), oracle, batch["attention_mask"])


def _hf_compensated_oracle(bare: nn.Module, subnet: Subnet) -> nn.Module:
    """`_compensated_oracle` for the separate-q/k/v families (the port's BERT-like model)."""
    from tests.test_port import _masked_copy

    out = _masked_copy(bare, subnet)
    with torch.no_grad():
        for full, spec, r, h in zip(adapter_for(bare).blocks, adapter_for(out).blocks, subnet.attn, subnet.mlp,
                                    strict=True):
            dropped_ctx = (torch.arange(full.num_heads * full.head_dim) % full.head_dim >= r).float()
            if r > 0:
                spec.proj.bias += full.proj.weight @ (dropped_ctx * compensation.input_mean(full.proj))
            if h > 0:
                dropped = (torch.arange(full.hidden) >= h).float()
                spec.fc2.bias += full.fc2.weight @ (dropped * compensation.input_mean(full.fc2))
    return out


# ------------------------------------------------------------------------------------------- files
def test_save_load_round_trips_the_means(tmp_path: Path) -> None:
    model = _model()
    skd.wpac(model, _batches(), num_samples=24, criterion="wpac+", progress=False, compensate=True)
    bare = copy.deepcopy(model)
    elastic = skd.ElasticViT(model).eval()
    x = torch.randn(2, 3, 32, 32) + 0.5
    subnet = Subnet(attn=[5, 2, 16], mlp=[100, 7, 192])
    with torch.no_grad():
        expected = elastic(x, subnet=subnet)
    for obj, name in ((elastic, "elastic"), (bare, "bare")):  # rank-major and head-major files
        path = tmp_path / f"{name}.safetensors"
        skd.save(obj, path)
        tensors, _ = load_tensors(path)
        assert sum(k.startswith("skd_input_mean:") for k in tensors) == 2 * 3
        loaded = skd.load(path).eval()
        with torch.no_grad():
            assert torch.allclose(loaded(x, subnet=subnet), expected, rtol=1e-6, atol=1e-6)
    extracted = elastic.extract(subnet)
    skd.save(extracted, tmp_path / "small.safetensors")
    assert not any(k.startswith("skd_input_mean:") for k in load_tensors(tmp_path / "small.safetensors")[0])
    with torch.no_grad():
        torch.testing.assert_close(skd.load(tmp_path / "small.safetensors").eval()(x), expected,
                                   rtol=1e-5, atol=1e-5)


def test_files_without_means_load_uncompensated_and_bad_means_are_refused(tmp_path: Path) -> None:
    model = _model()
    skd.wpac(model, _batches(), num_samples=24, criterion="wpac+", progress=False)
    skd.save(model, tmp_path / "old.safetensors")
    loaded = skd.load(tmp_path / "old.safetensors")
    assert compensation.means(loaded.model) == {}
    tensors, meta = load_tensors(tmp_path / "old.safetensors")
    save_tensors(tmp_path / "bad.safetensors", {**tensors, "skd_input_mean:blocks.9.attn.proj": torch.zeros(48)},
                 meta)
    with pytest.raises(ValueError, match="no Linear of that name"):
        skd.load(tmp_path / "bad.safetensors")
    small = skd.ElasticViT(model).extract(Subnet(attn=[8, 8, 8], mlp=[64, 64, 64]))
    skd.save(small, tmp_path / "small.safetensors")
    tensors, meta = load_tensors(tmp_path / "small.safetensors")
    save_tensors(tmp_path / "bad_small.safetensors", {**tensors, "skd_input_mean:blocks.0.mlp.fc2": torch.zeros(64)},
                 meta)
    with pytest.raises(ValueError, match="extracted model's file holds input means"):
        skd.load(tmp_path / "bad_small.safetensors")


def test_piad_trains_a_compensated_model_and_keeps_its_means(digits_vit, digits_data) -> None:
    """PIAD trains through the compensated biases (the means stay fixed); the trained super-network's subnets
    still equal their extracted models."""
    from torch.utils.data import DataLoader, Subset

    from skd.piad import PIADTrainer

    train = Subset(digits_data[0], range(96))
    model = copy.deepcopy(digits_vit)
    skd.wpac(model, DataLoader(train, batch_size=32), num_samples=96, criterion="wpac+", progress=False,
             compensate="attn")
    stored = {k: v.clone() for k, v in compensation.means(model).items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = PIADTrainer(model, train, epochs=1, progressive_epochs=1, batch_size=32, proxy_samples=32, lr=5e-4,
                      warmup_epochs=0, progress=False).fit()
    assert any(not torch.equal(v, before[k]) for k, v in out.model.state_dict().items())  # it trained
    with out.standard_layout() as inner:
        assert all(torch.equal(v, stored[k]) for k, v in compensation.means(inner).items())
        assert compensation.means(inner).keys() == stored.keys()
    x = torch.stack([digits_data[1][i][0] for i in range(8)])
    subnet = out.dropout_list.subnet(len(out.dropout_list))
    with torch.no_grad():
        assert _rel(out.eval().extract(subnet).eval()(x), out(x, subnet=subnet)) <= 1e-5


def test_cached_plans_follow_means_and_in_place_weight_updates() -> None:
    """ElasticViT caches per-subnet plans: storing or removing means (skd.wpac on the wrapped model) rebuilds
    them, and an in-place weight update (an optimizer step) reaches the compensated bias."""
    from tests.elastic_oracle import masked_copy

    elastic = skd.ElasticViT(_model(seed=5)).eval()
    x = torch.randn(2, 3, 32, 32) + 0.5
    subnet = Subnet(attn=[4, 9, 2], mlp=[50, 120, 7])

    def oracle(compensated: bool) -> torch.Tensor:
        with elastic.standard_layout() as inner:
            bare = copy.deepcopy(inner)
        return (_compensated_oracle if compensated else masked_copy)(bare, subnet)(x)

    with torch.no_grad():
        elastic(x, subnet=subnet)  # a plan without compensation is cached
        skd.wpac(elastic, _batches(), num_samples=24, criterion="wpac", progress=False, compensate=True)
        assert _rel(elastic(x, subnet=subnet), oracle(True)) <= 1e-5
        for spec in elastic.adapter.blocks:
            spec.proj.weight.mul_(1.1)
            spec.fc2.weight.add_(0.01)
        assert _rel(elastic(x, subnet=subnet), oracle(True)) <= 1e-5
        skd.wpac(elastic, _batches(), num_samples=24, criterion="wpac", progress=False)
        assert _rel(elastic(x, subnet=subnet), oracle(False)) <= 1e-5


def test_threads_sharing_a_compensated_plan_get_the_single_thread_output() -> None:
    """Serving from threads: every no-grad call of a compensated GEMM refreshes the plan's bias buffer while
    other threads' GEMMs may be reading it; each thread must still get exactly the single-thread result."""
    from concurrent.futures import ThreadPoolExecutor

    elastic = skd.ElasticViT(_model(seed=6)).eval()
    skd.wpac(elastic, _batches(), num_samples=24, criterion="wpac+", progress=False, compensate=True)
    subnet = Subnet(attn=[4, 9, 2], mlp=[50, 120, 7])
    xs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) + 0.5 for i in range(4)]
    with torch.no_grad():
        alone = [elastic(x, subnet=subnet) for x in xs]

    def serve(i: int) -> float:
        with torch.no_grad():
            return max(float((elastic(xs[i], subnet=subnet) - alone[i]).abs().max()) for _ in range(30))

    with ThreadPoolExecutor(4) as pool:
        assert max(pool.map(serve, range(4))) == 0.0
