"""PIAD's training recipe: optimizer, learning-rate schedule, loss and batch augmentation (DeiT's defaults)."""

from __future__ import annotations

from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.optim import Optimizer


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> Optimizer:
    """timm's optimizer `name` ("adamw", "sgd", ...) over `model`'s parameters (no decay on 1-D ones)."""
    return create_optimizer_v2(model, name, lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer: Optimizer, total_steps: int, warmup_steps: int, warmup_lr: float,
                    min_lr: float) -> CosineLRScheduler:
    """Per-step cosine decay to min_lr after a linear warm-up from warmup_lr over warmup_steps."""
    return CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=min_lr, warmup_t=warmup_steps,
                             warmup_lr_init=warmup_lr, t_in_epochs=False)


def build_mixup(mixup: float, cutmix: float, label_smoothing: float, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix batch augmentation (soft targets), or None when both are 0."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)


def build_criterion(soft_targets: bool, label_smoothing: float) -> nn.Module:
    """Cross-entropy on mixup's soft targets, else label-smoothed (or plain) cross-entropy."""
    if soft_targets:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return nn.CrossEntropyLoss()
