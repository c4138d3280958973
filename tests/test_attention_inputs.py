"""skd.attention_inputs: skd.wpac(joint_qk=True, score_fit=True) replays the score fit from the attention inputs
its calibration pass recorded, and the fits equal those of the fit's own pass (timm ViT with and without biases,
Swin's windows and masks, HF BERT padded, HF ViT; the fit's share ending inside a batch, and fewer samples than
asked for); the data are then read once, and twice above the byte bound (the pass); the replay feeds a ScoreFit
what attention_pass feeds it on the same model; bad arguments and sequences that are not whole samples are
refused."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import skd
from skd import attention_inputs
from skd import score_fit as fits
from skd.attention_inputs import AttentionInputs
from skd.attention_stats import ScoreFit, attention_pass, attention_weights, explicit_forward, heads
from skd.models import adapter_for
from tests.test_attention_stats import model_and_data, rel

FULL = dict(criterion="wpac+", compensate=True, cross_head=True, joint_qk=True, score_fit=True, progress=False)


class Counted:
    """The batches of `data`, counting how often they are iterated."""

    def __init__(self, data: list) -> None:
        self.data = data
        self.iterations = 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.data)


def _fits(model: nn.Module, data: list, num_samples: int) -> tuple[dict[str, torch.Tensor], int]:
    """The fits skd.wpac (the full recipe) stores, and how often it read the data."""
    counted = Counted(data)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*samples of the.*asked for")
        skd.wpac(model, counted, num_samples=num_samples, **FULL)
    return fits.fits(model), counted.iterations


@pytest.mark.parametrize("num_samples", [12, 40])  # 12: the fit's 3 samples end inside the first batch of 4
@pytest.mark.parametrize("name", ["vit_cls", "vit_reg_nobias", "swin", "BertModel", "ViTForImageClassification"])
def test_replayed_fit_equals_the_fit_of_its_own_pass(name: str, num_samples: int, monkeypatch) -> None:
    model, data = model_and_data(name)
    by_pass = copy.deepcopy(model)
    replayed, reads = _fits(model, data, num_samples)
    assert reads == 1  # the calibration pass only
    monkeypatch.setattr(attention_inputs, "MAX_BYTES", 0)  # nothing fits: the pass runs
    passed, reads = _fits(by_pass, data, num_samples)
    assert reads == 2
    assert replayed.keys() == passed.keys() and len(replayed) == len(adapter_for(model).blocks)
    for key, fit in passed.items():
        assert bool(fit.any())
        assert rel(replayed[key], fit) <= 1e-5, key  # the inputs before and after the transform: equal up to rounding


@pytest.mark.parametrize("name", ["vit_cls", "swin", "BertModel"])
def test_replay_feeds_what_the_pass_feeds(name: str) -> None:
    """On one model (no transform between): the recorded first 7 samples of a pass through explicit_forward,
    replayed, give a ScoreFit the moments attention_pass gives it over those samples (q and k from 2/3 of the
    fused GEMM rather than all of it: equal up to rounding)."""
    model, data = model_and_data(name)
    adapter = adapter_for(model)
    blocks = adapter.blocks
    cpu = torch.device("cpu")
    inputs = AttentionInputs(blocks, ScoreFit(blocks, cpu).fitted, 7)
    with torch.no_grad():
        for batch in data:
            explicit_forward(adapter, batch, [], inputs=inputs)
    assert inputs.samples == 7 and inputs.complete and inputs.nbytes > 0
    replayed, passed = ScoreFit(blocks, cpu), ScoreFit(blocks, cpu)
    assert inputs.replay(replayed) == 7
    assert attention_pass(adapter, data, [passed], num_samples=7, progress=False) == 7
    for got, ref in zip(replayed.tensors(), passed.tensors(), strict=True):
        assert bool(ref.any())
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_padded_text_replays_in_length_sorted_trimmed_chunks_with_the_same_fit(monkeypatch) -> None:
    """BERT's right padding is masked by its bias: the replay sorts each entry's sequences by length and cuts
    every chunk to its longest (chunks of at most 12 tokens here: several per batch, all-padding sequences left
    out), and the fit equals the one from whole batches."""
    model, data = model_and_data("BertModel")
    data[0]["attention_mask"][1] = 0  # an all-padding sequence
    adapter = adapter_for(model)
    blocks = adapter.blocks
    cpu = torch.device("cpu")
    fitted = ScoreFit(blocks, cpu).fitted
    recorded = AttentionInputs(blocks, fitted, 12)
    with torch.no_grad():
        for batch in data:
            explicit_forward(adapter, batch, [], inputs=recorded)
    entries = [(i, entry) for batch in recorded._batches for i, entry in batch.items()]
    monkeypatch.setattr(attention_inputs, "CHUNK_TOKENS", 12)
    for _, (x, bias, w) in entries:
        chunks = list(attention_inputs._chunks(x, bias, w))
        assert len(chunks) > 1
        lengths = [int(n) for _, _, cw in chunks for n in (cw > 0).sum(1)]
        assert lengths == sorted(int(n) for n in (w > 0).sum(1) if n > 0)  # sorted; all-padding ones left out
        for cx, cbias, cw in chunks:  # each cut to its longest, at most 12 tokens unless one sequence
            assert cx.shape[1] == cw.shape[1] == cbias.shape[-1] == int((cw > 0).sum(1).max())
            assert len(cx) * cx.shape[1] <= 12 or len(cx) == 1
    trimmed, whole = ScoreFit(blocks, cpu), ScoreFit(blocks, cpu)
    recorded.replay(trimmed)
    with torch.no_grad():
        for i, (x, bias, w) in entries:  # the same entries, fed whole
            q, k = heads(blocks[i], x, values=False)
            whole.add(i, q, k, attention_weights(blocks[i], q, k, bias), w)
    for got, ref in zip(trimmed.tensors(), whole.tensors(), strict=True):
        assert bool(ref.any())
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("case", ["left padding", "no bias", "bias not masking", "no padding"])
def test_only_right_padding_masked_by_the_bias_is_trimmed(case: str) -> None:
    s, n = 3, 6
    w = (torch.arange(n) < torch.tensor([[2], [6], [4]])).float()
    bias = torch.zeros(s, 1, n, n).masked_fill((w == 0)[:, None, None, :], torch.finfo(torch.float32).min)
    assert attention_inputs._padding_masked(bias, w)
    if case == "left padding":
        w, bias = w.flip(1), bias.flip(-1)
    elif case == "no bias":
        bias = None
    elif case == "bias not masking":
        bias[0, 0, 1, -1] = -1e4  # one query attends to a padding key a little
    else:
        w = torch.ones(s, n)
    assert not attention_inputs._padding_masked(bias, w)
    x = torch.randn(s, n, 4)
    ((got_x, got_bias, got_w),) = attention_inputs._chunks(x, bias, w)  # the entry, whole
    assert got_x is x and got_bias is bias and got_w is w


def test_recording_stops_above_its_bound_and_bad_arguments_are_refused() -> None:
    model, data = model_and_data("vit_cls")
    adapter = adapter_for(model)
    blocks = adapter.blocks
    inputs = AttentionInputs(blocks, [0, 1], 8, max_bytes=1000)
    with torch.no_grad():
        explicit_forward(adapter, data[0], [], inputs=inputs)
    assert not inputs.complete and inputs.samples == 4
    with pytest.raises(ValueError, match="exceeded 1000 bytes and were dropped"):
        inputs.replay(ScoreFit(blocks, torch.device("cpu")))
    with pytest.raises(ValueError, match="num_samples"):
        AttentionInputs(blocks, [0], 0)
    with pytest.raises(ValueError, match=rf"blocks \[{len(blocks)}\]: the model has blocks 0 to {len(blocks) - 1}"):
        AttentionInputs(blocks, [0, len(blocks)], 4)


def test_sequences_that_are_not_whole_samples_are_refused() -> None:
    blocks = adapter_for(model_and_data("swin")[0]).blocks
    spec = next(s for s in blocks if s.sequences > 1)
    i = blocks.index(spec)
    inputs = AttentionInputs(blocks, [i], 4)
    x = torch.randn(spec.sequences + 1, spec.tokens, spec.dim)
    with pytest.raises(ValueError, match=f"{spec.sequences + 1} attention sequences are not a whole number"):
        inputs.record(i, x, None, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["vit_cls", "BertModel"])
def test_half_precision_replay_and_pass_agree_to_its_rounding(name: str, dtype: torch.dtype, monkeypatch) -> None:
    """A half-precision model: the statistics are fp32, but the transformed weights the replay reads are rounded
    to the model's dtype, so the replayed and the passed fits agree to about that rounding (measured ≤ 2e-2
    relative; 5e-2 allowed), far from a wrong statistic (a fit of other inputs differs by O(1))."""
    model, data = model_and_data(name)
    model = model.to(dtype)
    by_pass = copy.deepcopy(model)
    replayed, _ = _fits(model, data, 12)
    monkeypatch.setattr(attention_inputs, "MAX_BYTES", 0)
    passed, _ = _fits(by_pass, data, 12)
    other, _ = _fits(copy.deepcopy(by_pass), model_and_data(name, seed=7)[1], 12)
    for key, fit in passed.items():
        assert replayed[key].dtype == dtype and bool(fit.any())
        err, far = rel(replayed[key].float(), fit.float()), rel(other[key].float(), fit.float())
        print(f"{key}: replay vs pass {err:.1e}, other data {far:.1e}")
        assert err <= 5e-2 < far


def test_the_bound_on_a_cuda_device_is_a_quarter_of_its_free_memory(monkeypatch) -> None:
    """The recording lives on the model's device: on CUDA it may take at most a quarter of the free memory (the
    query is faked here; tests/test_gpu.py runs skd.wpac's replay on a real device)."""
    assert attention_inputs.byte_bound(torch.device("cpu")) == attention_inputs.MAX_BYTES
    for free, expected in ((4 << 30, 1 << 30), (80 << 30, attention_inputs.MAX_BYTES)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 96 << 30))
        assert attention_inputs.byte_bound(torch.device("cuda", 0)) == expected
