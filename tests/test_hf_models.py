"""HuggingFace families on the model port, on tiny random-init models: ElasticViT at full width equals the
model, every subnet equals an independent masking oracle and its extract(), extracts are plain
transformers models of the same class that save/load, padding never leaks, unsupported classes raise."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from elastic_oracle import random_subnets
from hf_helpers import FAMILIES, TEXT, inputs, main_output, masked_copy, tiny

import skd
from skd import ElasticViT, UnsupportedModelError
from skd.models import adapter_for

NAMES = sorted(FAMILIES)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    err = ((a - b).abs().max() / b.abs().max()).item()
    print(f"max rel err {err:.2e}")
    assert err <= tol


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", NAMES)
def test_full_width_equals_model_with_own_output_type(name: str, impl: str) -> None:
    model, x = tiny(name, impl), inputs(name)
    ref = model(**x)
    elastic = ElasticViT(model).eval()
    out = elastic(**x)
    assert type(out) is type(ref)
    _close(main_output(out), main_output(ref))


@pytest.mark.parametrize("name", NAMES)
def test_subnets_match_masking_oracle_and_extract(name: str, tmp_path) -> None:
    model, x = tiny(name), inputs(name)
    elastic = ElasticViT(model).eval()
    for i, sub in enumerate(random_subnets(elastic.head_dims, elastic.hiddens, 5, seed=3)):
        with elastic.standard_layout() as bare:
            oracle = main_output(masked_copy(bare, sub)(**x))
        got = main_output(elastic(**x, subnet=sub))
        _close(got, oracle)
        small = elastic.extract(sub).eval()
        assert type(small) is type(model)
        _close(main_output(small(**x)), got)
        n_small = sum(p.numel() for p in small.parameters())
        if sum(sub.attn) + sum(sub.mlp) < sum(elastic.head_dims) + sum(elastic.hiddens) - 8:
            assert n_small < sum(p.numel() for p in model.parameters())
        if i == 2:  # save/load of an extract rebuilds it from the config and the subnet (no pickle)
            path = tmp_path / "small.safetensors"
            skd.save(small, path)
            loaded = skd.load(path)
            assert type(loaded) is type(model)
            torch.testing.assert_close(main_output(loaded.eval()(**x)), main_output(small(**x)), rtol=0, atol=0)


def test_extract_keeps_full_head_scale_and_rewraps() -> None:
    """The smaller attention is self-consistent (head size r, scaling r^-1/2, sqrt(r/hd) folded into q),
    so the extract wraps again and computes the same."""
    model, x = tiny("BertModel"), inputs("BertModel")
    elastic = ElasticViT(model).eval()
    sub = skd.Subnet(attn=[3, 5], mlp=[20, 48])
    small = elastic.extract(sub).eval()
    sa = small.encoder.layer[0].attention.self
    assert sa.attention_head_size == 3 and sa.query.out_features == 12 and sa.scaling == pytest.approx(3**-0.5)
    again = ElasticViT(small).eval()
    assert again.head_dims == (3, 5)
    _close(again(**x).last_hidden_state, elastic(**x, subnet=sub).last_hidden_state)


@pytest.mark.parametrize("name", ["BertModel", "RobertaModel"])
def test_padding_does_not_change_real_tokens(name: str) -> None:
    """Padding keys get no attention on the elastic path (the mask becomes an additive bias)."""
    model = tiny(name)
    elastic = ElasticViT(model).eval()
    x = inputs(name)
    n = int(x["attention_mask"][1].sum())
    short = {k: v[1:2, :n] for k, v in x.items()}
    sub = skd.Subnet(attn=[5, 2], mlp=[30, 7])
    padded = elastic(**x, subnet=sub).last_hidden_state[1, :n]
    unpadded = elastic(**short, subnet=sub).last_hidden_state[0]
    _close(padded, unpadded)


def test_gradients_reach_kept_weights_only() -> None:
    model, x = tiny("BertForSequenceClassification"), inputs("BertForSequenceClassification")
    elastic = ElasticViT(model).train()
    sub = skd.Subnet(attn=[2, 8], mlp=[10, 0])
    elastic(**x, subnet=sub).logits.sum().backward()
    first, second = elastic.adapter.blocks
    assert second.fc1.weight.grad is None  # width-0 MLP: skipped, no gradient
    assert first.q.weight.grad[: 2 * 4].abs().min() > 0  # rank-major: the first r*H rows are the kept ones
    assert first.q.weight.grad[2 * 4 :].abs().sum() == 0
    assert first.fc1.weight.grad[:10].abs().sum() > 0 and first.fc1.weight.grad[10:].abs().sum() == 0


def test_macs_count_heads_once_and_tokens() -> None:
    cls_model, tok_model = tiny("BertForSequenceClassification"), tiny("RobertaForTokenClassification")
    cls_ad, tok_ad = adapter_for(cls_model), adapter_for(tok_model)
    tokens = cls_ad.blocks[0].tokens
    assert tokens == 40  # min(nominal 128, max_position_embeddings 40)
    assert cls_ad.other_macs() == 32 * 32 + 3 * 32  # pooler + classifier, once per sequence
    assert tok_ad.other_macs() == tokens * 4 * 32  # token classifier on every token (no pooler)
    vit = adapter_for(tiny("DeiTForImageClassificationWithTeacher"))
    assert vit.blocks[0].tokens == 16 + 2  # patches + class + distillation token
    assert vit.other_macs() == 16 * (32 * 3 * 4 * 4) + 2 * 5 * 32


def test_multiple_choice_macs_are_per_choice_sequence() -> None:
    """Documented: a multiple-choice model counts the MACs of ONE (context, choice) sequence, the same as the
    one-label sequence classifier on that encoder; its budgets run all C choices at the same fraction."""
    mc = ElasticViT(tf.BertForMultipleChoice(tf.BertConfig(**TEXT)).eval())
    one = ElasticViT(tf.BertForSequenceClassification(tf.BertConfig(**TEXT, num_labels=1)).eval())
    assert mc.full_macs == one.full_macs
    assert mc.adapter.other_macs() == 32 * 32 + 32  # pooler + the 1-output choice scorer, once per sequence
    ids = torch.randint(3, 50, (2, 4, 9))  # 2 samples of 4 choices
    assert mc.set_subnet(macs=0.5)(input_ids=ids).logits.shape == (2, 4)


def test_default_losses() -> None:
    model, x = tiny("BertForSequenceClassification"), inputs("BertForSequenceClassification")
    ad = adapter_for(model)
    out = model(**x)
    labels = torch.tensor([0, 2, 1])
    expected = torch.nn.functional.cross_entropy(out.logits, labels)
    assert ad.default_loss(out, {**x, "labels": labels}).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="no labels"):
        ad.default_loss(out, x)
    tok = tiny("RobertaForTokenClassification")
    tout = tok(**inputs("RobertaForTokenClassification"))
    tl = torch.randint(0, 4, (3, 9))
    tl[0, 6:] = -100
    expected = torch.nn.functional.cross_entropy(tout.logits.flatten(0, 1), tl.flatten(), ignore_index=-100)
    assert adapter_for(tok).default_loss(tout, {"labels": tl}).item() == pytest.approx(expected.item(), rel=1e-6)
    bare = tiny("BertModel")
    from skd.losses import contrastive_loss

    bout = bare(**x)
    ad = adapter_for(bare)
    assert ad.default_loss(bout, x).item() == pytest.approx(contrastive_loss(bout, x).item())
    assert ad.default_loss(bout, x, "sum").item() == pytest.approx(3 * contrastive_loss(bout, x).item(), rel=1e-6)
    assert ad.token_weights(x).tolist() == x["attention_mask"].float().tolist()


def test_record_rebuild_round_trip(tmp_path) -> None:
    for name in ("BertModel", "RobertaModel", "ViTForImageClassification", "DeiTForImageClassificationWithTeacher"):
        model, x = tiny(name, "eager"), inputs(name)
        path = tmp_path / f"{name}.safetensors"
        skd.save(model, path)
        loaded = skd.load(path)
        inner = loaded.model if isinstance(loaded, ElasticViT) else loaded
        assert type(inner) is type(model) and inner.config._attn_implementation == "eager"
        _close(main_output(loaded.eval()(**x)), main_output(model(**x)))


def test_bf16_model_round_trip_keeps_dtype(tmp_path) -> None:
    """A bf16 HF super-network and its extract load back in bf16 with the same outputs."""
    model, x = tiny("BertForSequenceClassification").to(torch.bfloat16), inputs("BertForSequenceClassification")
    elastic = ElasticViT(model).set_subnet(macs=0.6)
    for obj, name in ((elastic, "elastic"), (elastic.extract(), "small")):
        skd.save(obj, tmp_path / f"{name}.safetensors")
        loaded = skd.load(tmp_path / f"{name}.safetensors").eval()
        dtypes = {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()}
        assert dtypes == {torch.bfloat16}, name
        with torch.no_grad():
            assert torch.equal(main_output(loaded(**x)), main_output(obj(**x))), name


@pytest.mark.parametrize("name", ["BertModel", "ViTForImageClassification"])
def test_output_attentions_refused_and_hidden_states_returned(name: str) -> None:
    """The elastic forward never forms attention weights: output_attentions (argument or config) raises
    naming the way out (extract()), never an empty tuple; every layer's hidden state is returned and equals
    the extracted model's (eager attention: transformers' SDPA path returns no attentions either)."""
    model, x = tiny(name, "eager"), inputs(name)
    elastic = ElasticViT(model).set_subnet(macs=0.6)
    small = elastic.extract().eval()
    with pytest.raises(ValueError, match=r"output_attentions=True: .*elastic\.extract\(\)"):
        elastic(**x, output_attentions=True)
    small_out = small(**x, output_attentions=True, output_hidden_states=True)
    assert len(small_out.attentions) == model.config.num_hidden_layers  # the way out works
    out = elastic(**x, output_attentions=False, output_hidden_states=True)
    assert out.attentions is None and len(out.hidden_states) == len(small_out.hidden_states)
    for mine, theirs in zip(out.hidden_states, small_out.hidden_states, strict=True):
        _close(mine, theirs)
    model.config.output_attentions = True
    for unset in ({}, {"output_attentions": None}):  # None: the config decides, as in transformers
        with pytest.raises(ValueError, match="output_attentions=True"):
            elastic(**x, **unset)
    assert elastic(**x, output_attentions=False).attentions is None


def test_unsupported_classes_raise_with_reason() -> None:
    decoder = tf.BertLMHeadModel(tf.BertConfig(**{**TEXT, "is_decoder": True}))
    with pytest.raises(UnsupportedModelError, match=r"BertLMHeadModel is not supported: .*decoders"):
        adapter_for(decoder)
    mim = tf.ViTForMaskedImageModeling(tf.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=4, intermediate_size=48))
    with pytest.raises(UnsupportedModelError, match=r"ViTForMaskedImageModeling is not supported: .*masked image"):
        ElasticViT(mim)
    gpt = tf.GPT2Model(tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=16))
    with pytest.raises(UnsupportedModelError, match="GPT2Model is not supported"):
        adapter_for(gpt)
    with pytest.raises(ValueError, match="is not one skd rebuilds"):
        skd.models.rebuild({"source": "transformers", "class": "GPT2Model", "config": {}})


@pytest.mark.parametrize(("act", "fused"), [("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_new", None),
                                            ("relu", None)])
def test_activations_fused_or_run_as_modules(act: str, fused: str | None) -> None:
    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(**{**TEXT, "hidden_act": act})).eval()
    x = inputs("BertModel")
    elastic = ElasticViT(model).eval()
    assert elastic.adapter.blocks[0].fused_act == fused
    sub = skd.Subnet(attn=[5, 8], mlp=[17, 40])
    with elastic.standard_layout() as bare:
        oracle = masked_copy(bare, sub)(**x).last_hidden_state
    _close(elastic(**x, subnet=sub).last_hidden_state, oracle)
