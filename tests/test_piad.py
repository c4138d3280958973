"""PIADTrainer on the digits ViT: resume exactness, bad input, baselines, and (slow) the quality targets."""

import itertools

import pytest
import timm
import torch
from torch import nn
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
    kw = dict(epochs=2, progressive_epochs=2, mixup=0.8, cutmix=1.0, **FAST)  # DeiT's mixup/cutmix, label smoothing
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
    with pytest.raises(ValueError, match=r"teacher must be a separate nn\.Module.*\(the model itself\)"):
        PIADTrainer(digits_vit, train, teacher=digits_vit, epochs=1, **FAST)
    with pytest.raises(ValueError, match=r"teacher must be a separate nn\.Module"):
        PIADTrainer(digits_vit, train, teacher="vit", epochs=1, **FAST)
    for w in (-0.1, 1.5, True, float("nan")):
        with pytest.raises(ValueError, match="distill_weight"):
            PIADTrainer(digits_vit, train, distill_weight=w, epochs=1, **FAST)
    with pytest.raises(ValueError, match="optimizer='lamb' must be one of"):
        PIADTrainer(digits_vit, train, optimizer="lamb", epochs=1, **FAST)
    with pytest.raises(ValueError, match="mixup/cutmix need an even batch_size, got 31"):
        PIADTrainer(digits_vit, train, mixup=0.8, epochs=1, **{**FAST, "batch_size": 31})


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


# ------------------------------------------------------------------------------ training reports itself
def test_training_reports_itself(digits_vit, digits_data, tmp_path, capsys):
    """One line per epoch, history == JSONL log == on_epoch records, val top-1 at the list end and at full."""
    import json

    from skd.digits import accuracy

    val = Subset(digits_data[1], range(64))
    seen, log = [], tmp_path / "log.jsonl"
    tr = PIADTrainer(digits_vit, _small(digits_data[0]), val, epochs=2, progressive_epochs=1, mixup=0, cutmix=0,
                     log_path=log, on_epoch=seen.append, **{**FAST, "progress": True})
    out = tr.fit()
    assert [json.loads(line) for line in log.read_text().splitlines()] == tr.history == seen
    assert [r["epoch"] for r in tr.history] == [0, 1]
    for r in tr.history:
        assert r["loss"] > 0 and r["lr"] > 0 and r["list_units"] == len(tr.dropout_list)
        assert r["list_macs"] == tr.list_macs_fraction()
    # the val metrics are those of the list's end and of the full model, measured independently here
    assert tr.history[-1]["val_top1_full"] == accuracy(out, val)
    out.set_subnet(index=len(tr.dropout_list))
    assert tr.history[-1]["val_top1_target"] == accuracy(out, val)
    printed = capsys.readouterr().out
    assert "epoch 1/2  loss" in printed and "epoch 2/2  loss" in printed
    assert f"val top-1 {100 * tr.history[-1]['val_top1_target']:.1f} % at the list target" in printed


def test_quiet_run_prints_nothing_and_verbose_prints_only_lines(digits_vit, digits_data, capsys):
    import copy

    tr = PIADTrainer(copy.deepcopy(digits_vit), _small(digits_data[0], 64), epochs=1, method="random", **FAST)
    tr.fit()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert set(tr.history[0]) == {"epoch", "loss", "lr"}  # no list for a baseline, no val data
    PIADTrainer(digits_vit, _small(digits_data[0], 64), epochs=1, method="random", verbose=True, **FAST).fit()
    captured = capsys.readouterr()
    assert captured.out.startswith("epoch 1/1  loss") and captured.out.count("\n") == 1 and captured.err == ""


def test_warmup_is_clamped_to_the_run():
    from skd.piad import WarmupCosine
    from skd.piad.recipe import WARMUP_MAX_FRACTION

    s = WarmupCosine(peak=1e-3, total_steps=40, warmup_steps=200, warmup_lr=1e-6, min_lr=1e-5)
    assert s.warmup_steps == int(WARMUP_MAX_FRACTION * 40) == 4
    lrs = [s(i) for i in range(41)]
    assert lrs[0] == 1e-6 and lrs[4] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert all(a < b for a, b in itertools.pairwise(lrs[:5]))  # rising warm-up
    assert all(a > b for a, b in itertools.pairwise(lrs[4:]))  # then cosine decay
    assert lrs[40] == pytest.approx(1e-5)


def test_short_run_reaches_peak_lr(digits_vit, digits_data):
    """Default warmup_epochs=5 in a 2-epoch run: the clamp lets the lr reach its peak."""
    tr = PIADTrainer(digits_vit, _small(digits_data[0]), epochs=2, progressive_epochs=1, method="random",
                     **{**FAST, "warmup_epochs": 5, "lr": 3e-4})
    total = tr.epochs * tr.steps_per_epoch
    assert max(tr.lr_schedule(i) for i in range(total)) == pytest.approx(3e-4)
    tr.fit()
    assert tr.optimizer.param_groups[0]["lr"] == tr.lr_schedule(total - 1)  # the schedule drove the optimizer


def test_optimizer_follows_timms_no_decay_rule(digits_vit):
    from timm.optim import create_optimizer_v2

    from skd.piad.recipe import build_optimizer

    el = skd.ElasticViT(digits_vit)
    ours = build_optimizer(el, "adamw", 1e-3, 0.05)
    theirs = create_optimizer_v2(el, "adamw", lr=1e-3, weight_decay=0.05)
    by_decay = [{g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups} for opt in (ours, theirs)]
    assert by_decay[0] == by_decay[1] and set(by_decay[0]) == {0.0, 0.05}
    assert isinstance(ours, torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer='lamb' must be one of"):
        build_optimizer(el, "lamb", 1e-3, 0.05)


def test_cross_entropies_match_timm():
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from skd.piad.recipe import soft_cross_entropy

    logits, labels = torch.randn(16, 10), torch.randint(0, 10, (16,))
    soft = torch.softmax(torch.randn(16, 10), -1)
    torch.testing.assert_close(soft_cross_entropy(logits, labels, 0.1), LabelSmoothingCrossEntropy(0.1)(logits, labels))
    torch.testing.assert_close(soft_cross_entropy(logits, soft), SoftTargetCrossEntropy()(logits, soft))


def test_loss_fn_replaces_the_default_loss(digits_vit, digits_data):
    """A loss_fn with zero gradient and no weight decay leaves every weight unchanged: it is what is trained."""
    calls = []

    def loss_fn(output, batch):
        calls.append((tuple(output.shape), len(batch)))
        return 0 * output.sum()

    tr = PIADTrainer(digits_vit, _small(digits_data[0]), epochs=1, method="random", loss_fn=loss_fn,
                     weight_decay=0, **FAST)
    before = _params(tr.elastic)
    out = tr.fit()
    assert calls == [((32, 10), 2)] * tr.steps_per_epoch
    assert all(torch.equal(before[k], v) for k, v in out.state_dict().items())
    assert tr.history[0]["loss"] == 0


def test_distillation_from_a_teacher_needs_no_labels(digits_vit, digits_data):
    """Unlabelled (images,) batches with a teacher: the student learns to match the teacher's logits."""
    import copy

    from skd.piad.distill import distillation_loss

    images = digits_data[0].tensors[0][:96]
    teacher = copy.deepcopy(digits_vit).eval()
    student = copy.deepcopy(digits_vit)
    with torch.no_grad():  # perturb the student so there is something to distil
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = digits_data[1].tensors[0][:64]
    with torch.no_grad():
        before = float(distillation_loss(student.eval()(x), teacher(x)))
    tr = PIADTrainer(student, TensorDataset(images), teacher=teacher, epochs=3, method="random", mixup=0, cutmix=0,
                     **{**FAST, "lr": 1e-3})
    out = tr.fit()
    with torch.no_grad():
        after = float(distillation_loss(out(x), teacher(x)))
    assert after < 0.5 * before, (before, after)
    assert tr.history[-1]["loss"] < tr.history[0]["loss"]


def test_distillation_loss():
    from skd.piad.distill import distillation_loss

    s, t = torch.randn(8, 10), torch.randn(8, 10)
    assert float(distillation_loss(t, t)) == pytest.approx(0, abs=1e-6)
    p = torch.softmax(t, -1)
    expected = (p * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(s, t), expected)
    torch.testing.assert_close(distillation_loss({"logits": s}, {"logits": t}), expected)
    # token embeddings: padding tokens (weight 0) do not count
    hs, ht = torch.randn(4, 6, 5), torch.randn(4, 6, 5)
    mask = (torch.arange(6)[None] < torch.tensor([[6], [3], [4], [2]])).float()
    loss = distillation_loss({"last_hidden_state": hs}, {"last_hidden_state": ht}, mask)
    hs2 = hs.clone()
    hs2[mask == 0] = 100.0
    torch.testing.assert_close(distillation_loss({"last_hidden_state": hs2}, {"last_hidden_state": ht}, mask), loss)
    keep = mask.bool()
    torch.testing.assert_close(loss, (hs[keep] - ht[keep]).square().sum() / ht[keep].square().sum())
    with pytest.raises(ValueError, match="neither logits nor last_hidden_state"):
        distillation_loss({"pooled": hs}, {"pooled": ht})


def test_dict_batches_and_distillation_on_an_encoder():
    """A text-like encoder (tests/test_port.py's one-class family): dict batches with padding, no labels,
    the list grown from the adapter's own default loss, distillation of the token embeddings."""
    import copy

    from skd.piad.distill import distillation_loss
    from tests.test_port import _batch, _tiny

    class Texts(torch.utils.data.Dataset):
        def __init__(self, batch):
            self.batch = batch

        def __len__(self):
            return len(self.batch["input_ids"])

        def __getitem__(self, i):
            return {k: v[i] for k, v in self.batch.items()}

    teacher = _tiny()
    data, held_out = Texts(_batch(64, seed=2)), _batch(16, seed=3)
    tr = PIADTrainer(copy.deepcopy(teacher), data, Texts(held_out), teacher=teacher, target_macs=0.5, epochs=2,
                     progressive_epochs=1, batch_size=16, proxy_samples=32, lr=1e-3, warmup_epochs=0, progress=False)
    out = tr.fit()
    assert tr.list_macs_fraction() <= 0.5 and len(tr.dropout_list) > 0
    out.set_subnet(index=len(tr.dropout_list))
    assert all(r["loss"] > 0 and "val_top1_full" not in r for r in tr.history)  # no labels: no top-1
    with torch.no_grad():
        small = distillation_loss(out(**held_out), teacher(**held_out), held_out["attention_mask"])
    assert torch.isfinite(small) and 0 < float(small) < 1


def test_old_checkpoint_format_is_refused(digits_vit, digits_data, tmp_path):
    from skd.io import load_tensors, save_tensors
    from skd.piad import CHECKPOINT_FORMAT

    kw = dict(epochs=2, progressive_epochs=1, mixup=0, cutmix=0, checkpoint_dir=tmp_path, method="random", **FAST)
    PIADTrainer(digits_vit, _small(digits_data[0], 64), **kw).fit(max_epochs=1)
    path = tmp_path / "piad-last.safetensors"
    tensors, meta = load_tensors(path)
    assert meta["format"] == CHECKPOINT_FORMAT == 2
    save_tensors(path, tensors, {**meta, "format": 1})
    with pytest.raises(ValueError, match="checkpoint of format 1; this skd reads format 2 only"):
        PIADTrainer(timm.create_model("vit_digits"), _small(digits_data[0], 64), resume=True, **kw)


def test_piad_imports_no_model_library():
    from tests.test_port import LIBRARIES, _skd_modules_reached

    reached = _skd_modules_reached(["piad"])
    assert {"piad.trainer", "piad.samplers", "piad.recipe"} <= set(reached)
    assert not {m: t & LIBRARIES for m, t in reached.items() if t & LIBRARIES}


def test_amp_trains_in_bf16_autocast_on_cpu(digits_vit, digits_data):
    """amp=True (bf16 autocast, `skd train --amp`) trains through the prefix kernels: finite loss, weights
    stay fp32 and move, and the subnets still evaluate."""
    before = _params(digits_vit)
    trainer = PIADTrainer(digits_vit, _small(digits_data[0], 64), digits_data[1], target_macs=0.5, epochs=1,
                          progressive_epochs=1, amp=True, **FAST)
    out = trainer.fit()
    assert trainer.history[0]["loss"] == trainer.history[0]["loss"] < 10  # finite
    after = _params(out.model)  # rank-major now: any moved entry (e.g. cls_token) shows training
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert trainer.evaluate(budgets=(0.5, 1.0))[1.0]["accuracy"] > 0.5


def test_compiled_steps_train_like_eager_ones():
    """compile=True (`skd train --compile`): the steps run through inductor's graphs (widths symbolic: one for the
    narrower widths, one for full) and give the eager run's losses, dropout list and weights (fp32)."""
    import copy

    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = timm.create_model("vit_digits", depth=1)  # one block: inductor compiles it in seconds
    data = TensorDataset(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))
    kw = dict(epochs=2, progressive_epochs=1, target_macs=0.4, mixup=0, cutmix=0, **{**FAST, "batch_size": 16})
    eager = PIADTrainer(copy.deepcopy(model), data, **kw)
    eager.fit()
    before = counters["stats"]["unique_graphs"]
    compiled = PIADTrainer(copy.deepcopy(model), data, compile=True, **kw)
    compiled.fit()
    assert 1 <= counters["stats"]["unique_graphs"] - before <= 2
    assert compiled.dropout_list == eager.dropout_list and len(eager.dropout_list) > 0
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    # AdamW turns rounding-level gradient differences into whole steps where a gradient is ~0: compare the moves
    start = _params(model)
    with eager.elastic.standard_layout() as e, compiled.elastic.standard_layout() as c:
        want, got = _params(e), _params(c)
    moved = torch.cat([(want[k] - start[k]).flatten() for k in start])
    apart = torch.cat([(got[k] - want[k]).flatten() for k in start])
    print(f"weights apart / moved: {apart.norm() / moved.norm():.1e}")
    assert apart.norm() <= 1e-3 * moved.norm()


def test_compiled_bf16_training_on_cuda_is_refused():
    """compile=True with bf16 autocast on CUDA raises before anything is compiled (inductor's graphs gave wrong
    gradients there: tests/test_gpu.py); CPU, fp32 on CUDA and eager bf16 on CUDA pass the check."""
    from skd.piad.trainer import check_compile

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with pytest.raises(ValueError, match="compile=True with bf16 autocast on CUDA"):
        check_compile(True, True, cuda)
    for compile, amp, device in ((True, False, cuda), (False, True, cuda), (True, True, cpu)):
        check_compile(compile, amp, device)


def test_fused_adamw_steps_column_major_matrices_through_their_transposes():
    """PIAD's AdamW updates column-major matrices (skd's stored proj and fc2) as torch's fused AdamW updates the same
    values stored contiguously (to rounding: the kernel's vector loop and scalar tail take other elements), without
    copying them (the CPU kernel copies a non-contiguous tensor in and out); parameters and moments keep their
    shapes and strides."""
    from skd.piad.recipe import FusedAdamW

    torch.manual_seed(0)
    values = [torch.randn(5, 7), torch.randn(6, 6), torch.randn(4, 3), torch.randn(9)]
    layouts = [True, True, False, False]  # column-major?
    ours = [nn.Parameter(v.t().contiguous().t() if col else v.clone()) for v, col in zip(values, layouts, strict=True)]
    twins = [nn.Parameter(v.clone()) for v in values]
    assert [not p.is_contiguous() for p in ours] == layouts
    opt = FusedAdamW([{"params": ours[:3], "weight_decay": 0.05}, {"params": ours[3:], "weight_decay": 0.0}],
                     lr=1e-2, fused=True)
    ref = torch.optim.AdamW([{"params": twins[:3], "weight_decay": 0.05}, {"params": twins[3:], "weight_decay": 0.0}],
                            lr=1e-2, fused=True)
    for step in range(3):
        for p, q in zip(ours, twins, strict=True):
            g = torch.randn(p.shape)
            p.grad, q.grad = torch.empty_like(p).copy_(g), g.clone()  # gradients take their parameter's strides
        ref.step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            opt.step()
        copies = [e.input_shapes for e in prof.events() if e.key in ("aten::copy_", "aten::clone")]
        assert not [shapes for shapes in copies if shapes and shapes[0]], step  # (the step counters' are 0-dim)
    for p, q, v, col in zip(ours, twins, values, layouts, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, v) and p.is_contiguous() != col  # stepped, in its own layout
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-6, atol=1e-9)
            assert opt.state[p][key].shape == p.shape and opt.state[p][key].stride() == p.stride()
