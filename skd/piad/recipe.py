"""PIAD's training recipe in plain torch: optimizer, learning-rate schedule, classification loss.

Recipe rule (the defaults; PIAD fine-tunes a pretrained, WPAC-stratified model, usually briefly):
- AdamW, peak lr = 5e-4 · global batch / 512 (DeiT's scaling), weight decay 0.05 on matrices only
  (timm's rule: no decay on 1-D parameters — biases, norms, and on any `.bias`);
- per-step schedule: linear warm-up from warmup_lr, then cosine decay to min_lr. The warm-up is
  clamped to WARMUP_MAX_FRACTION of the run, so a short run still reaches its peak lr;
- loss: label-smoothed (0.1) cross-entropy, or the caller's `loss_fn(output, batch)`; with a teacher,
  distillation (`skd.piad.distill`);
- no mixup/cutmix by default: DeiT's 0.8 / 1.0 regularise 300 epochs from scratch, and in a short run
  they keep the subnets from fitting. Measured (benchmarks/piad_short_run.py: digits ViT, WPAC, then
  10 epochs to 0.15 of the MACs, top-1 at the list's end / full width; the original model 97.6 %):
  WPAC alone 93.6 / 97.6 %, PIAD with mixup/cutmix 94.9 / 96.7 %, PIAD on these defaults 98.4 / 98.9 %
  (seed 1: 97.8 / 98.4 %; 4× the lr: 98.7 / 98.2 %, so the DeiT lr scaling stays). Turn them on (the
  model port's `adapter.mixup`; soft targets then) for long runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

OPTIMIZERS = ("adamw", "sgd")
WARMUP_MAX_FRACTION = 0.1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[no-decay group (1-D parameters and biases), decay group]: timm's weight-decay rule, trainable only."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class FusedAdamW(torch.optim.AdamW):
    """torch's fused AdamW (one pass per parameter instead of a pass per Adam term: 27 vs 85 ms per step on ViT-S,
    CPU, 1 thread, a cost that does not shrink with the subnet: benchmarks/piad_step.py), stepping each column-major
    CPU matrix through its transpose.

    skd stores proj and fc2 weights column-major (skd/elastic/layout.py), and so are their gradients and moments.
    The CPU kernel copies every tensor it is given that is not contiguous in and out on each step: 1.75x the
    optimizer's time on ViT-S's proj and fc2 (benchmarks/RESULTS.md, "Session 18"). Their transposes are contiguous
    views of the same memory, and AdamW is elementwise, so the update is the same (to rounding: the kernel's vector
    loop and scalar tail take other elements); the optimizer's state keeps the parameters' shapes (checkpoints are
    unchanged). CUDA's fused kernel takes any tensors of matching strides as they are."""

    def _init_group(self, group: dict, params: list[torch.Tensor], *lists: list) -> object:
        """torch's: lists of the group's parameters that have gradients, their gradients, moments and steps; then each
        column-major matrix, and every tensor of its shape at its index in the lists, is replaced by its transpose.
        If torch renames this hook, the transposes are skipped, not the update."""
        out = super()._init_group(group, params, *lists)
        # column-major CPU matrices: unit stride down a column (a per-step test over every parameter: a cheap one)
        columns = {i: p.shape for i, p in enumerate(params)
                   if p.is_cpu and p.dim() == 2 and p.stride(0) == 1 and p.shape[0] > 1}
        for tensors in (params, *lists):
            for i, shape in columns.items():
                if i < len(tensors) and isinstance(tensors[i], torch.Tensor) and tensors[i].shape == shape:
                    tensors[i] = tensors[i].t()
        return out


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> Optimizer:
    """"adamw" (`FusedAdamW`: torch's fused AdamW, betas (0.9, 0.999)) or "sgd" (momentum 0.9, Nesterov), over
    `param_groups`."""
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return FusedAdamW(groups, lr=lr, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"optimizer={name!r} must be one of {OPTIMIZERS}")


@dataclass(frozen=True)
class WarmupCosine:
    """lr at each optimizer step: linear warm-up from warmup_lr to peak over warmup_steps, then cosine
    decay from peak to min_lr at total_steps. Stateless: the step number is all a resume needs.

    warmup_steps is clamped to WARMUP_MAX_FRACTION of total_steps (see the module docstring).
    """

    peak: float
    total_steps: int
    warmup_steps: int
    warmup_lr: float
    min_lr: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "warmup_steps",
                           min(self.warmup_steps, math.floor(WARMUP_MAX_FRACTION * self.total_steps)))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak - self.warmup_lr) * step / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + 0.5 * (self.peak - self.min_lr) * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: Optimizer, step: int) -> None:
        """Set every param group's lr to the schedule's value at `step`."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of logits (B, K) against class indices (B,) int64 (label-smoothed by
    `label_smoothing`) or soft targets (B, K) float (already smoothed by the augmentation); fp32."""
    logits = logits.float()
    if targets.dtype.is_floating_point:
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
