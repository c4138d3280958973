"""PIADTrainer on the digits ViT: resume exactness, bad input, baselines, and (slow) the quality targets."""

import pytest
import timm
import torch
from torch.utils.data import Subset, TensorDataset

import skd
from skd.digits import accuracy
from skd.piad import METHODS, PIADTrainer

FAST = dict(batch_size=32, proxy_samples=32, lr=5e-4, warmup_epochs=0, progress=False)


def _small(train, n=96):
    return Subset(train, range(n))


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_is_bit_identical(digits_vit, digits_data, tmp_path):
    import copy

    train = _small(digits_data[0])
    kw = dict(epochs=2, progressive_epochs=2, **FAST)  # mixup/cutmix/label smoothing at DeiT defaults
    straight = PIADTrainer(copy.deepcopy(digits_vit), train, **kw)
    straight.fit()
    PIADTrainer(copy.deepcopy(digits_vit), train, checkpoint_dir=tmp_path, **kw).fit(max_epochs=1)
    resumed = PIADTrainer(copy.deepcopy(digits_vit), train, checkpoint_dir=tmp_path, resume=True, **kw)
    assert resumed.start_epoch == 1 and len(resumed.dropout_list) > 0
    out = resumed.fit()
    assert out.dropout_list == straight.dropout_list
    a, b = _params(straight.elastic), _params(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.history == straight.history


def test_dropout_list_reaches_target_and_is_prefix_consistent(digits_vit, digits_data):
    tr = PIADTrainer(digits_vit, _small(digits_data[0]), epochs=3, progressive_epochs=2, mixup=0, cutmix=0, **FAST)
    out = tr.fit()
    dl = out.dropout_list
    assert 1 / 3 + 0.2 < tr.history[0]["list_macs"] <= 2 / 3  # grown progressively: half way after epoch 1
    assert 1 / 3 - 0.05 < tr.history[1]["list_macs"] <= 1 / 3  # the target after P_e = 2 epochs
    assert tr.history[2]["list_units"] == tr.history[1]["list_units"]  # no growth after P_e epochs
    for s in range(len(dl)):
        a, b = dl.subnet(s), dl.subnet(s + 1)
        assert all(y <= x for x, y in zip(a.attn + a.mlp, b.attn + b.mlp, strict=True))
    result = tr.evaluate(digits_data[1], budgets=(1 / 3, 1))
    assert result[1 / 3]["macs_fraction"] <= 1 / 3 and result[1]["macs_fraction"] == 1


@pytest.mark.parametrize("method", [m for m in METHODS if m != "piad"])
def test_baselines_train_and_evaluate(digits_vit, digits_data, method):
    tr = PIADTrainer(digits_vit, _small(digits_data[0], 64), epochs=1, progressive_epochs=1, method=method,
                     mixup=0, cutmix=0, **FAST)
    before = _params(tr.elastic)
    out = tr.fit()
    assert out.dropout_list is None
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())
    res = tr.evaluate(Subset(digits_data[1], range(64)), budgets=(1 / 3, 1))
    assert set(res) == {1 / 3, 1} and all(0 <= r["accuracy"] <= 1 for r in res.values())


def test_channel_dropout_masks_by_zeroing(digits_vit, digits_data):
    """Zeroing rank dims >= r of q, k, v and hidden units >= h is the truncated subnet (why masking is valid).

    The channel-dropout baselines mask through ElasticViT's `masks=` (this test used to drive the same
    masks through a torch-function tap on SDPA; the assertion is unchanged)."""
    tr = PIADTrainer(digits_vit, _small(digits_data[0], 64), epochs=1, progressive_epochs=1,
                     method="channel_dropout", mixup=0, cutmix=0, **FAST)
    el = tr.elastic.eval()
    x = digits_data[1].tensors[0][:8]
    amask, hmask = (torch.arange(32) < 20).float(), (torch.arange(384) < 100).float()
    with torch.no_grad():
        masked = el(x, masks={**{(b, "attn"): amask for b in range(4)}, **{(b, "mlp"): hmask for b in range(4)}})
    el.set_subnet(skd.Subnet(attn=[20] * 4, mlp=[100] * 4))
    with torch.no_grad():
        truncated = el(x)
    torch.testing.assert_close(masked, truncated, rtol=1e-4, atol=1e-5)


def test_bad_input(digits_vit, digits_data, tmp_path):
    train = _small(digits_data[0], 64)
    for t in (0, 1, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="target_macs"):
            PIADTrainer(digits_vit, train, target_macs=t, epochs=2, progressive_epochs=1, **FAST)
    with pytest.raises(ValueError, match="progressive_epochs=3 must be <= epochs=2"):
        PIADTrainer(digits_vit, train, epochs=2, progressive_epochs=3, **FAST)
    with pytest.raises(ValueError, match="method"):
        PIADTrainer(digits_vit, train, epochs=2, progressive_epochs=1, method="nope", **FAST)
    with pytest.raises(ValueError, match="unreachable"):
        PIADTrainer(digits_vit, train, target_macs=0.001, epochs=1, progressive_epochs=1, **FAST)


def test_nan_loss_names_step_and_keeps_checkpoint(digits_vit, digits_data, tmp_path):
    import copy

    train = _small(digits_data[0], 64)
    kw = dict(epochs=2, progressive_epochs=1, mixup=0, cutmix=0, checkpoint_dir=tmp_path, **FAST)
    PIADTrainer(copy.deepcopy(digits_vit), train, **kw).fit(max_epochs=1)
    ckpt = tmp_path / "piad-last.safetensors"
    saved = ckpt.read_bytes()
    images, labels = (t.clone() for t in digits_data[0][:64])
    images[5] = float("nan")
    bad = PIADTrainer(copy.deepcopy(digits_vit), TensorDataset(images, labels), resume=True, **kw)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step \d+ \(epoch 1\).*subnet Subnet"):
        bad.fit()
    assert ckpt.read_bytes() == saved  # the last good checkpoint is untouched


def test_checkpoint_from_another_model_is_refused(digits_vit, digits_data, tmp_path):
    train = _small(digits_data[0], 64)
    kw = dict(epochs=1, progressive_epochs=1, mixup=0, cutmix=0, checkpoint_dir=tmp_path, **FAST)
    PIADTrainer(digits_vit, train, **kw).fit()
    other = timm.create_model("vit_digits", depth=2)
    with pytest.raises(ValueError, match="written for another model"):
        PIADTrainer(other, train, resume=True, **kw)
    with pytest.raises(ValueError, match="other settings"):
        PIADTrainer(timm.create_model("vit_digits"), train, resume=True, **{**kw, "progressive_epochs": 1,
                                                                            "method": "layerdrop"})


@pytest.mark.slow
def test_quality_after_wpac(digits_vit, digits_data):
    """WPAC then PIAD (3 epochs) on the digits. At target 1/3 WPAC alone is already near the full model on this
    easy task, so the list is trained to 0.1 of the MACs, where WPAC alone collapses, and checked at 1/3 too."""
    train, test = digits_data
    full_before = accuracy(digits_vit, test)
    elastic = skd.ElasticViT(skd.wpac(digits_vit, train, num_samples=256, progress=False))
    wpac_alone = {}
    for f in (0.1, 1 / 3):
        elastic.set_subnet(macs=f)
        wpac_alone[f] = accuracy(elastic, test)
    tr = PIADTrainer(elastic, train, target_macs=0.1, epochs=3, progressive_epochs=2, batch_size=64,
                     proxy_samples=256, lr=5e-4, warmup_epochs=0, mixup=0, cutmix=0, progress=False)
    tr.fit()
    res = tr.evaluate(test, budgets=(0.1, 1 / 3, 1))
    print("before", full_before, "wpac alone", wpac_alone, "piad", res)
    assert tr.list_macs_fraction() <= 0.1
    assert res[1]["accuracy"] >= full_before - 0.02
    assert res[1 / 3]["accuracy"] >= res[1]["accuracy"] - 0.05
    assert res[0.1]["accuracy"] >= wpac_alone[0.1] + 0.05
