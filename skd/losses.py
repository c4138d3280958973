"""The loss of text encoders without labels, in skd's one loss signature `loss_fn(output, batch) -> scalar`.

`contrastive_loss`: the in-batch contrastive sentence-embedding loss sentence-transformers trains
all-MiniLM-L6-v2 with (MultipleNegativesRankingLoss: cross-entropy over scaled cosine similarities,
each anchor's positive is its own pair, every other sentence in the batch a negative), with the positive
made from the same forward pass: the mean-pooled states of a random contiguous span of each sentence's
tokens (a span crop of the contextual token states). The loss thus needs only the one output that skd
passes, yet rewards embeddings whose meaning survives dropping part of the sentence. A mean over the
batch, in fp32.

Distillation from a frozen teacher (what an unlabeled encoder trains with under PIAD) is PIAD's own
(`skd.piad.distill`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .embeddings import mean_pool, token_states

MNRL_SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default (cosine similarity * 20)
CROP = (0.5, 0.9)  # the positive keeps a random span of this fraction range of each sentence's real tokens


def span_crop_mask(attention_mask: torch.Tensor, keep: tuple[float, float] = CROP,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """attention_mask (B, N) 0/1 with each sequence's real tokens leading (right padding) -> (B, N) float32
    mask of one random contiguous span per sequence covering a fraction in [keep[0], keep[1]] of its real
    tokens (at least one token; a sequence without real tokens stays empty)."""
    lo, hi = keep
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"keep={keep} must satisfy 0 < keep[0] <= keep[1] <= 1")
    mask = attention_mask.to(torch.float32)
    length = mask.sum(1)  # (B,)
    u = torch.rand(2, len(mask), generator=generator).to(mask.device)
    span = (length * (lo + (hi - lo) * u[0])).round().clamp(min=1.0)
    span = torch.minimum(span, length)
    start = ((length - span + 1) * u[1]).floor().clamp(max=(length - span).clamp(min=0))
    pos = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32)
    return mask * ((pos >= start[:, None]) & (pos < (start + span)[:, None])).float()


def _batch_generator(batch: Mapping[str, torch.Tensor]) -> torch.Generator:
    """A generator seeded from the batch's real tokens (ids and count; padding does not count): the same
    sentences get the same crop however they are padded, so calibration statistics are reproducible,
    while different batches get different crops."""
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    if ids is None:
        return torch.Generator().manual_seed(0)
    real = torch.ones_like(ids) if mask is None else mask.long()
    return torch.Generator().manual_seed(int((ids.long() * real).sum()) * 1_000_003 + int(real.sum()))


def contrastive_loss(output: Any, batch: Mapping[str, torch.Tensor], *, scale: float = MNRL_SCALE,
                     keep: tuple[float, float] = CROP) -> torch.Tensor:
    """MultipleNegativesRankingLoss of the mean-pooled sentence embeddings (anchors) against span-crop
    positives (module docstring). output: an encoder output with last_hidden_state (B, N, C);
    batch: dict with attention_mask (B, N) (right padding; all tokens real when absent), B >= 2.
    Returns a float32 scalar, the mean cross-entropy over the B anchors."""
    states = token_states(output)
    b, n = states.shape[:2]
    if b < 2:
        raise ValueError(f"contrastive_loss needs at least 2 sentences per batch (in-batch negatives), got {b}")
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones(b, n, device=states.device)
    anchors = mean_pool(states, mask).float()
    positives = mean_pool(states, span_crop_mask(mask, keep, _batch_generator(batch))).float()
    logits = scale * F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T  # (B, B)
    return F.cross_entropy(logits, torch.arange(b, device=logits.device))
