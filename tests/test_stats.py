"""skd.stats: the streamed calibration statistics against a direct computation from stored activations,
batching invariance, hook hygiene, and flat memory in the number of samples."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from skd.models import adapter_for
from skd.stats import CONTEXT, CONTEXT_FULL, FEATURES, QKV, calibrate

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
ROOT = Path(__file__).resolve().parents[1]


def _data(n: int = 24, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = torch.randn(n, 3, 32, 32), torch.randint(0, 5, (n,))
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _direct(model: torch.nn.Module, data: list) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Every block's (activation, gradient) pairs (N, T, C) float64, kept in full — what streaming avoids."""
    blocks = adapter_for(model).blocks
    x = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    acts: dict = {}
    handles = []
    for i, spec in enumerate(blocks):
        handles.append(spec.qkv.register_forward_hook(lambda m, a, out, i=i: acts.__setitem__((i, "qkv"), out)))
        handles.append(spec.fc2.register_forward_pre_hook(lambda m, a, i=i: acts.__setitem__((i, "hidden"), a[0])))
    x.requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    keys = list(acts)
    grads = torch.autograd.grad(loss, [acts[k] for k in keys])
    for h in handles:
        h.remove()
    out = []
    for i, spec in enumerate(blocks):
        c = spec.num_heads * spec.head_dim
        a, g = acts[i, "qkv"].detach().double(), grads[keys.index((i, "qkv"))].double()
        feats = {f: (a[..., j * c : (j + 1) * c], g[..., j * c : (j + 1) * c]) for j, f in enumerate(QKV)}
        feats["hidden"] = (acts[i, "hidden"].detach().double(), grads[keys.index((i, "hidden"))].double())
        out.append(feats)
    return out


def _weighted_cov(a: torch.Tensor, w: torch.Tensor, heads: int) -> torch.Tensor:
    """Centred weighted covariance by its definition: (H, hd, hd) = Σ w (x-μ)(x-μ)^T / Σ w."""
    x = a.reshape(-1, heads, a.shape[-1] // heads)
    w = w.reshape(-1)
    mu = (w[:, None, None] * x).sum(0) / w.sum()
    xc = x - mu
    return torch.einsum("n,nhi,nhj->hij", w, xc, xc) / w.sum()


@pytest.mark.parametrize("mode", ["weighted", "uniform"])
def test_streamed_statistics_match_direct_computation(mode: str) -> None:
    model = VisionTransformer(**TINY).eval()
    data = _data()
    stats = calibrate(model, adapter_for(model).blocks, data, num_samples=24, covariance=mode, fisher=True,
                      progress=False)
    assert int(stats.samples) == 24
    for feats, direct in zip(stats.blocks, _direct(model, data), strict=True):
        for name in FEATURES:
            a, g = direct[name]
            per_sample = (g * a).sum(1)  # (N, C): Σ_t g·a
            torch.testing.assert_close(feats[name].taylor, per_sample.abs().sum(0), rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(feats[name].fisher, per_sample.square().sum(0), rtol=1e-4, atol=1e-12)
            if name == "hidden":
                assert feats[name].cov is None
                continue
            theta = (g * a).sum(-1).abs() if mode == "weighted" else torch.ones(a.shape[:2], dtype=torch.float64)
            expected = _weighted_cov(a, theta, 3)
            got = feats[name].cov.covariance()
            err = float((got - expected).abs().max() / expected.abs().max())
            print(f"{name}: max rel error {err:.2e}")
            assert err <= 1e-4


def test_batching_does_not_change_statistics() -> None:
    """The summed loss makes each sample's gradient independent of its batch: 3 batches of 8 and one of
    24 give the same statistics up to fp32 rounding of the activations."""
    model = VisionTransformer(**TINY).eval()
    data = _data()
    blocks = adapter_for(model).blocks
    kw = dict(num_samples=24, covariance="weighted", fisher=True, progress=False)
    a = calibrate(model, blocks, data, **kw)
    b = calibrate(model, blocks, [(torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data]))], **kw)
    for s, t in zip(a.tensors(), b.tensors(), strict=True):
        assert float((s - t).abs().max()) <= 1e-5 * float(t.abs().max())


def test_num_samples_truncates_and_hooks_are_removed() -> None:
    model = VisionTransformer(**TINY).train()
    blocks = adapter_for(model).blocks
    stats = calibrate(model, blocks, _data(), num_samples=13, covariance="weighted", progress=False)
    assert int(stats.samples) == 13
    assert model.training, "the training flag is restored"
    for spec in blocks:
        assert not spec.qkv._forward_hooks and not spec.fc2._forward_pre_hooks
    bad = _data()
    bad[2][0][0] = float("nan")
    with pytest.raises(ValueError):
        calibrate(model, blocks, bad, num_samples=24, covariance=None, progress=False)
    for spec in blocks:
        assert not spec.qkv._forward_hooks and not spec.fc2._forward_pre_hooks, "hooks removed after an error"


def test_forward_only_pass_gives_the_gradient_pass_forward_statistics_without_labels() -> None:
    """calibrate(features=()) runs under no_grad with no loss (batches without labels are fine): every
    taylor is None, and the context, its full covariance, the hidden moments and the uniform q/k/v covariances
    equal the gradient pass's."""
    model = VisionTransformer(**TINY).eval()
    blocks = adapter_for(model).blocks
    data = _data()
    grad_modes = []
    handle = blocks[-1].fc2.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    kw = dict(num_samples=24, covariance="uniform", progress=False, context=True, context_full=True, moments=True)
    with_grad = calibrate(model, blocks, data, **kw)
    assert grad_modes == [True] * 3
    grad_modes.clear()
    forward = calibrate(model, blocks, [x for x, _ in data], features=(), **kw)
    handle.remove()
    assert grad_modes == [False] * 3 and int(forward.samples) == 24
    for a, b in zip(with_grad.blocks, forward.blocks, strict=True):
        assert all(b[name].taylor is None for name in FEATURES)
        assert all(a[name].taylor is not None for name in FEATURES)
        for name in (CONTEXT, CONTEXT_FULL, "hidden"):
            expected = a[name].tensors()
            got = b[name].tensors()
            assert len(got) == len(expected) - (name == "hidden") >= 3  # all but the taylor sums
            for x, y in zip(expected[-len(got):], got, strict=True):
                torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-9)
        for name in QKV:
            assert float(b[name].cov.weight_sum) == 24 * 17  # every token of every sample (16 patches + cls)
            torch.testing.assert_close(b[name].cov.covariance(), a[name].cov.covariance(), rtol=1e-6, atol=1e-9)
    for bad in (dict(covariance="weighted"), dict(fisher=True)):
        with pytest.raises(ValueError, match="features=\\(\\) collects forward statistics only"):
            calibrate(model, blocks, data, **{**kw, **bad}, features=())
    with pytest.raises(ValueError, match="each must be one of"):
        calibrate(model, blocks, data, **kw, features=("q", "context"))


@pytest.mark.parametrize("features", [("q", "k"), ("v",), ("hidden",)])
def test_only_the_features_asked_for_are_collected(features: tuple[str, ...]) -> None:
    """The others' statistics are None and their Linears are not hooked; the collected ones equal those of a
    pass over every feature (the same hooks and kernels)."""
    model = VisionTransformer(**TINY).eval()
    blocks = adapter_for(model).blocks
    data = _data()
    kw = dict(num_samples=24, covariance="weighted", fisher=True, progress=False)
    every = calibrate(model, blocks, data, **kw)
    some = calibrate(model, blocks, data, features=features, **kw)
    for a, b in zip(every.blocks, some.blocks, strict=True):
        for name in FEATURES:
            if name in features:
                for x, y in zip(a[name].tensors(), b[name].tensors(), strict=True):
                    torch.testing.assert_close(y, x, rtol=1e-6, atol=0)
            else:
                assert b[name].tensors() == []


def test_bad_covariance_mode() -> None:
    model = VisionTransformer(**TINY).eval()
    with pytest.raises(ValueError, match="covariance"):
        calibrate(model, adapter_for(model).blocks, _data(), num_samples=8, covariance="pca", progress=False)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, sys, torch
    from timm.models.vision_transformer import VisionTransformer
    from skd.models import adapter_for
    from skd.stats import calibrate

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = VisionTransformer(img_size=64, patch_size=4, embed_dim=96, depth=2, num_heads=3, num_classes=5).eval()
    blocks = adapter_for(model).blocks
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 5, (16,))

    def batches(n):
        for _ in range(n // 16):
            yield x, y

    peaks = []
    for n in (int(a) for a in sys.argv[1:]):
        calibrate(model, blocks, batches(n), num_samples=n, covariance="weighted", fisher=True, progress=False)
        # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over fork+exec)
        status = open("/proc/self/status").read()
        peaks.append(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024)  # MiB
    print(json.dumps(peaks))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from Linux's /proc")
def test_peak_memory_does_not_grow_with_samples() -> None:
    """Peak RSS (a high-water mark) after 64 samples, then after 256 more: keeping the hooked activations
    across batches would add ≈ 1.3 MiB per sample (≈ 340 MiB over 256); streaming adds nothing."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, "64", "256"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, check=True)
    small, large = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"peak RSS: 64 samples {small:.0f} MiB, then 256 samples {large:.0f} MiB")
    assert large <= small * 1.10
