"""Distillation from a frozen teacher (the original full model): how far a student's output is from it.

The teacher sees the same (augmented) batch; its output type is the model's own:
- logits (a tensor (B, K), or an output object with `logits`): KL(teacher ‖ student) of the softmaxes,
  averaged over the batch — 0 when the student's class distribution equals the teacher's;
- token embeddings (an output object with `last_hidden_state` (B, T, D), e.g. a bare text encoder):
  relative squared error Σ_t w_t ‖s_t − t_t‖² / Σ_t w_t ‖t_t‖², w_t the token weights (padding 0), so
  every pooled sentence embedding follows the teacher's — scale-free, 0 at a perfect match.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _field(output: Any, name: str) -> torch.Tensor | None:
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None)


def distillation_loss(student: Any, teacher: Any, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar fp32 distance of the student's output from the teacher's (see the module docstring).

    student, teacher: the model's outputs (same type); token_weights: (B, T) float weights of the
    tokens (e.g. the attention mask), used for token embeddings only; None weighs every token 1.
    """
    if isinstance(student, torch.Tensor) or _field(student, "logits") is not None:
        s = student if isinstance(student, torch.Tensor) else _field(student, "logits")
        t = teacher if isinstance(teacher, torch.Tensor) else _field(teacher, "logits")
        if s.dim() != 2:
            raise ValueError(f"distillation needs logits (B, classes), got a tensor of shape {tuple(s.shape)}")
        return F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
                        reduction="batchmean")
    s, t = _field(student, "last_hidden_state"), _field(teacher, "last_hidden_state")
    if s is None:
        raise ValueError(f"cannot distil a {type(student).__name__}: it has neither logits nor last_hidden_state")
    w = torch.ones(s.shape[:2], device=s.device) if token_weights is None else token_weights.to(s.device).float()
    err = (s.float() - t.float()).square().sum(-1)
    return (w * err).sum() / (w * t.float().square().sum(-1)).sum().clamp_min(1e-12)
