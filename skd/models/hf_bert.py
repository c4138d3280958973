"""Adapter for HuggingFace BERT and RoBERTa encoders: BertModel / RobertaModel and their encoder task
models (sequence, token and multiple-choice classification, question answering, masked LM, BERT
pre-training and next-sentence prediction), e.g. sentence-transformers' all-MiniLM-L6-v2 (a BertModel).

Post-norm layers: x = LN1(x + dropout(o(attention(x)))), x = LN2(x + dropout(fc2(act(fc1(x))))); a
width-0 branch adds zero but its norm still runs. Decoders (BertLMHeadModel, RobertaForCausalLM, any
config with is_decoder or cross-attention) are refused: causal caching is not modelled.

MACs "per sample" are per input sequence. A multiple-choice model (BertForMultipleChoice,
RobertaForMultipleChoice) runs one sequence per (context, choice) pair, so a sample of C choices costs
C times the MACs reported; budgets are fractions of the full model, which C leaves unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.models.bert import modeling_bert as mb
from transformers.models.roberta import modeling_roberta as mr

from ..errors import UnsupportedModelError
from ..subnet import Subnet
from . import AttnFn, BlockSpec, MlpFn, check_type, nominal_tokens, register
from .hf_common import HFAdapter, additive_bias, fused_activation, linear_macs, supports
from .inert import through
from .residual import add_norm

_HEADS = ("SequenceClassification", "TokenClassification", "QuestionAnswering", "MultipleChoice", "MaskedLM")
# Per family: the layer's module classes, checked exactly (a subclass may change the computation).
_FAMILIES = {
    "Bert": (mb.BertLayer, mb.BertAttention, mb.BertSelfAttention, mb.BertSelfOutput, mb.BertIntermediate,
             mb.BertOutput),
    "Roberta": (mr.RobertaLayer, mr.RobertaAttention, mr.RobertaSelfAttention, mr.RobertaSelfOutput,
                mr.RobertaIntermediate, mr.RobertaOutput),
}
# Heads that run once per sample (on one pooled token) rather than once per token, by class-name suffix.
_PER_SAMPLE_HEADS = {"ForSequenceClassification": ("classifier",), "ForMultipleChoice": ("classifier",),
                     "ForNextSentencePrediction": ("cls",), "ForPreTraining": ("cls.seq_relationship",)}


@register(mb.BertPreTrainedModel, mr.RobertaPreTrainedModel)
@supports("BertModel", "BertForPreTraining", "BertForNextSentencePrediction",
          *(f"BertFor{h}" for h in _HEADS), "RobertaModel", *(f"RobertaFor{h}" for h in _HEADS))
class BertAdapter(HFAdapter):
    qkvo_names = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    mlp_names = ("intermediate.dense", "output.dense")

    def __init__(self, model: nn.Module) -> None:
        self.refuse_unsupported(model, "skd serves BERT/RoBERTa encoders (BertModel, RobertaModel and their "
                                "classification, QA and masked-LM heads); decoders and causal LMs are not modelled")
        config = model.config
        if config.is_decoder or config.add_cross_attention:
            raise UnsupportedModelError(f"{type(model).__name__} is configured as a decoder (is_decoder or "
                                        "add_cross_attention): causal attention with a cache is not supported")
        family = "Bert" if isinstance(model, mb.BertPreTrainedModel) else "Roberta"
        layer_t, attn_t, self_t, out_t, inter_t, output_t = _FAMILIES[family]
        self.base = model.base_model
        names = {id(m): n for n, m in model.named_modules()}
        self.base_prefix = names[id(self.base)]
        tokens = min(nominal_tokens(model), config.max_position_embeddings)  # no longer sequences exist
        blocks, layers = [], []
        for layer in self.base.encoder.layer:
            where = names[id(layer)]
            check_type(layer, layer_t, where)
            check_type(layer.attention, attn_t, f"{where}.attention")
            check_type(layer.attention.self, self_t, f"{where}.attention.self")
            check_type(layer.attention.output, out_t, f"{where}.attention.output")
            check_type(layer.intermediate, inter_t, f"{where}.intermediate")
            check_type(layer.output, output_t, f"{where}.output")
            sa, fc1 = layer.attention.self, layer.intermediate.dense
            act = layer.intermediate.intermediate_act_fn
            if not isinstance(act, nn.Module):
                raise UnsupportedModelError(f"{where}.intermediate: hidden_act given as a plain function; use a "
                                            "transformers activation name")
            blocks.append(BlockSpec(
                name=where, block=layer, q=sa.query, k=sa.key, v=sa.value, proj=layer.attention.output.dense,
                fc1=fc1, fc2=layer.output.dense, act=act, fused_act=fused_activation(act),
                num_heads=sa.num_attention_heads, head_dim=sa.attention_head_size, hidden=fc1.out_features,
                attn_dropout=sa.dropout.p, tokens=tokens, sequences=1,
            ))
            layers.append(layer)
        super().__init__(model, blocks, layers)

    def _layer_forward(self, i: int, layer: nn.Module, subnet: Subnet, attn_fn: AttnFn,
                       mlp_fn: MlpFn) -> Callable[..., torch.Tensor]:
        attn_out, mlp_out = layer.attention.output, layer.output

        def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any,
                    **kwargs: Any) -> torch.Tensor:
            x = hidden_states
            if subnet.attn[i]:
                x = add_norm(x, through(attn_out.dropout, attn_fn(i, x, additive_bias(attention_mask, x.dtype))),
                             attn_out.LayerNorm)[1]
            else:
                x = attn_out.LayerNorm(x)
            if subnet.mlp[i]:
                return add_norm(x, through(mlp_out.dropout, mlp_fn(i, x)), mlp_out.LayerNorm)[1]
            return mlp_out.LayerNorm(x)

        return forward

    def _set_head_dim(self, spec: BlockSpec, r: int) -> None:
        sa = spec.block.attention.self
        sa.attention_head_size, sa.all_head_size, sa.scaling = r, r * sa.num_attention_heads, r**-0.5

    def default_loss(self, output: Any, batch: Any, reduction: str = "mean") -> torch.Tensor:
        """Bare encoders (no logits): `skd.losses.contrastive_loss` on the mean-pooled sentence embeddings
        (sentence-transformers' objective, span-crop positives); reduction "sum" scales it by the batch
        size. Task models: cross-entropy of their logits against the batch's labels (token-level logits
        (B, N, K) against labels (B, N), -100 ignored, as transformers does)."""
        if getattr(output, "logits", None) is not None:
            return self._labelled_loss(output, batch, reduction)
        from ..losses import contrastive_loss

        loss = contrastive_loss(output, batch)
        return loss * output.last_hidden_state.shape[0] if reduction == "sum" else loss

    def other_macs(self) -> int:
        """The Linears outside the encoder layers at the nominal tokens per sequence: the pooler and
        sequence-level heads once per sample, token-level heads (masked LM decoder, token classifier,
        QA span head) per token. Embedding lookups cost no MACs. Multiple-choice models count one choice's
        sequence (see the module docstring)."""
        per_sample = [f"{self.base_prefix}.pooler" if self.base_prefix else "pooler"]
        for suffix, heads in _PER_SAMPLE_HEADS.items():
            if type(self.model).__name__.endswith(suffix):
                per_sample += heads
        encoder = f"{self.base_prefix}.encoder" if self.base_prefix else "encoder"
        return linear_macs(self.model, tuple(per_sample), self.blocks[0].tokens, (encoder,))

    def init_kwargs(self) -> dict[str, Any]:
        if self.base is self.model:  # BertModel / RobertaModel themselves take add_pooling_layer
            return {"add_pooling_layer": self.model.pooler is not None}
        return {}
