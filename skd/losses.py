"""Losses for text encoders without labels, in skd's one loss signature `loss_fn(output, batch) -> scalar`.

- `contrastive_loss`: the in-batch contrastive sentence-embedding loss sentence-transformers trains
  all-MiniLM-L6-v2 with (MultipleNegativesRankingLoss: cross-entropy over scaled cosine similarities,
  each anchor's positive is its own pair, every other sentence in the batch a negative), with the positive
  made from the same forward pass: the mean-pooled states of a random contiguous span of each sentence's
  tokens (a span crop of the contextual token states). The loss thus needs only the one output that skd
  passes, yet rewards embeddings whose meaning survives dropping part of the sentence.
- `distillation_loss`: agreement with a frozen teacher's output for the same batch — 1 - cosine of the
  mean-pooled sentence embeddings for an encoder, temperature-scaled KL divergence for logits.

Both are means over the batch, in fp32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .embeddings import mean_pool, sentence_embeddings, token_states

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


def distillation_loss(output: Any, teacher_output: Any, batch: Mapping[str, torch.Tensor], *,
                      temperature: float = 1.0) -> torch.Tensor:
    """Distance of a student's output from a frozen teacher's output on the same batch, float32 scalar.

    Encoders (outputs with last_hidden_state (B, N, C)): mean over the batch of 1 - cos(student, teacher)
    of the mean-pooled sentence embeddings. Classifiers (outputs with logits (B, K), or (B, K) tensors):
    KL(teacher || student) of the temperature-softened distributions, times temperature² (Hinton et al.),
    averaged over the batch. The teacher's output is detached.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    s_logits, t_logits = _logits(output), _logits(teacher_output)
    if s_logits is None and t_logits is None:
        s, t = sentence_embeddings(output, batch).float(), sentence_embeddings(teacher_output, batch).float()
        return (1 - F.cosine_similarity(s, t.detach(), dim=-1)).mean()
    if s_logits is None or t_logits is None or s_logits.shape != t_logits.shape:
        raise ValueError("student and teacher outputs must be of one kind and shape (both encoder states or "
                         "both logits)")
    log_p = F.log_softmax(s_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(t_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2


def _logits(output: Any) -> torch.Tensor | None:
    """A classifier's logits (B, K) from a tensor or an output/dict with `logits`; None for encoder states."""
    if isinstance(output, torch.Tensor):
        return output if output.dim() == 2 else None
    if isinstance(output, Mapping):
        return output.get("logits")
    return None
