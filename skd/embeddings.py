"""Sentence embeddings of a text encoder and how close a compressed model's embeddings stay to the full
model's: mean pooling (as sentence-transformers' all-MiniLM-L6-v2 pools), and three agreement metrics.

- mean cosine: mean over sentences of cos(e_full_i, e_sub_i) — does each embedding keep its direction;
- Spearman: rank correlation between the two models' pairwise cosine similarities (every pair i < j) —
  does the compressed model rank sentence pairs the way the full model does (what retrieval uses);
- top-1 agreement: fraction of sentences whose nearest other sentence (by cosine) is the same under
  both models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def token_states(output: Any) -> torch.Tensor:
    """The per-token output (B, N, C) of an encoder call: `last_hidden_state` of a HuggingFace output
    (or dict), or the tensor itself. TypeError naming what was found otherwise (e.g. a classifier's
    logits, which have no token states)."""
    if isinstance(output, torch.Tensor) and output.dim() == 3:
        return output
    states = output.get("last_hidden_state") if isinstance(output, Mapping) else None
    if states is None:
        raise TypeError(f"expected an encoder output with last_hidden_state (B, N, C), got {type(output).__name__}"
                        + (f" with keys {list(output.keys())}" if isinstance(output, Mapping) else ""))
    return states


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of each sequence's real-token states: states (B, N, C) float, attention_mask (B, N) 0/1 (None:
    all tokens real) -> (B, C) in states' dtype, accumulated in fp32. A sequence without real tokens
    pools to zeros."""
    if attention_mask is None:
        return states.float().mean(1).to(states.dtype)
    w = attention_mask.to(torch.float32).unsqueeze(-1)  # (B, N, 1)
    pooled = (states.float() * w).sum(1) / w.sum(1).clamp_min(1.0)
    return pooled.to(states.dtype)


def sentence_embeddings(output: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B, C) mean-pooled, unnormalised sentence embeddings of an encoder `output` for the dict `batch`
    it was computed from (its attention_mask marks the real tokens)."""
    return mean_pool(token_states(output), batch.get("attention_mask"))


@torch.no_grad()
def embed(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], **call_kwargs: Any) -> torch.Tensor:
    """(n, C) float32 L2-normalised sentence embeddings of every example in `batches` (dicts of tensors,
    passed to `model(**batch, **call_kwargs)` on the model's device), in order. The model is run in eval
    mode and restored."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            out.append(F.normalize(sentence_embeddings(model(**batch, **call_kwargs), batch).float(), dim=-1).cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("embed: no batches")
    return torch.cat(out)


def mean_cosine(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows: reference, other (n, C) float."""
    _check_pair(reference, other)
    return float(F.cosine_similarity(reference.double(), other.double(), dim=-1).mean())


def _similarities(e: torch.Tensor) -> torch.Tensor:
    e = F.normalize(e.double(), dim=-1)
    return e @ e.T


def spearman_pairwise(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Spearman rank correlation between the pairwise cosine similarities (all i < j) of `reference` and
    of `other` (n, C), n >= 3. Ties (exact equal floats) are ranked by position, which is harmless for
    real-valued similarities."""
    _check_pair(reference, other)
    if len(reference) < 3:
        raise ValueError(f"spearman_pairwise needs at least 3 sentences, got {len(reference)}")
    i, j = torch.triu_indices(len(reference), len(reference), offset=1)
    ranks = [_ranks(_similarities(e)[i, j]) for e in (reference, other)]
    a, b = (r - r.mean() for r in ranks)
    return float((a * b).sum() / (a.norm() * b.norm()))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x)
    r[torch.argsort(x)] = torch.arange(len(x), dtype=x.dtype)
    return r


def top1_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row by cosine is the same under `reference` and `other`
    (n, C), n >= 2."""
    _check_pair(reference, other)
    if len(reference) < 2:
        raise ValueError(f"top1_agreement needs at least 2 sentences, got {len(reference)}")
    eye = torch.eye(len(reference), dtype=torch.bool)
    nn_ref, nn_other = (_similarities(e).masked_fill(eye, -2.0).argmax(1) for e in (reference, other))
    return float((nn_ref == nn_other).double().mean())


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """All three metrics of `other` (n, C) against `reference` (n, C): mean_cosine, spearman, top1."""
    return {"mean_cosine": mean_cosine(reference, other), "spearman": spearman_pairwise(reference, other),
            "top1": top1_agreement(reference, other)}


def _check_pair(reference: torch.Tensor, other: torch.Tensor) -> None:
    if reference.dim() != 2 or reference.shape != other.shape:
        raise ValueError(f"embeddings must both be (n, C) of one shape, got {tuple(reference.shape)} and "
                         f"{tuple(other.shape)}")
    for name, e in (("reference", reference), ("other", other)):
        if not bool(torch.isfinite(e).all()):
            raise ValueError(f"{name} embeddings contain NaN or Inf")
