"""Batches: what the model takes, one vocabulary for every family.

A batch is one of
  - a tuple/list `(inputs, labels, ...)`: the model is called as `model(inputs)` (timm images
    (B, C, H, W)); labels (B,) int64 class indices (or (B, classes) soft targets);
  - a dict of tensors (HF): `input_ids`, `attention_mask`, `token_type_ids`, `pixel_values`, ...; the
    model is called as `model(**batch)` without `labels`, which `labels()` returns;
  - a bare tensor: `model(tensor)`, no labels.
`loss_fn(output, batch) -> scalar` is the one loss signature everywhere (statistics, importance, PIAD).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

Batch = Any  # tuple | list | dict[str, Tensor] | Tensor, as above
LABELS = "labels"


def _kind(batch: Batch) -> str:
    if isinstance(batch, torch.Tensor):
        return "tensor"
    if isinstance(batch, dict):
        if not batch or not all(isinstance(v, torch.Tensor) for v in batch.values()):
            raise ValueError(f"a dict batch must map names to tensors, got keys {sorted(batch)}")
        return "dict"
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return "tuple"
    raise ValueError(f"a batch must be (inputs, labels), a dict of tensors or a tensor, got {type(batch).__name__}")


def model_inputs(batch: Batch) -> tuple[tuple, dict[str, torch.Tensor]]:
    """(args, kwargs) to call the model with: everything but the labels."""
    kind = _kind(batch)
    if kind == "tensor":
        return (batch,), {}
    if kind == "dict":
        return (), {k: v for k, v in batch.items() if k != LABELS}
    return (batch[0],), {}


def labels(batch: Batch) -> torch.Tensor | None:
    """The batch's labels, or None when it has none."""
    kind = _kind(batch)
    if kind == "dict":
        return batch.get(LABELS)
    if kind == "tuple" and len(batch) > 1:
        return batch[1]
    return None


def call(model: nn.Module, batch: Batch) -> Any:
    """model(*args, **kwargs) on the batch's inputs: the model's own output type."""
    args, kwargs = model_inputs(batch)
    return model(*args, **kwargs)


def batch_size(batch: Batch) -> int:
    """B: the leading dim of the batch's inputs."""
    args, kwargs = model_inputs(batch)
    return (args[0] if args else next(iter(kwargs.values()))).shape[0]


def map_tensors(batch: Batch, fn: Any) -> Batch:
    """The batch with fn applied to each of its tensors (same structure)."""
    kind = _kind(batch)
    if kind == "tensor":
        return fn(batch)
    if kind == "dict":
        return {k: fn(v) for k, v in batch.items()}
    return type(batch)(fn(v) if isinstance(v, torch.Tensor) else v for v in batch)


def to_device(batch: Batch, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
    """The batch with every tensor on `device`; with `dtype`, floating-point inputs (not labels) cast too."""
    moved = map_tensors(batch, lambda t: t.to(device))
    if dtype is None:
        return moved
    args, kwargs = model_inputs(moved)
    cast = {id(t) for t in (*args, *kwargs.values()) if t.is_floating_point()}
    return map_tensors(moved, lambda t: t.to(dtype) if id(t) in cast else t)


def slice_batch(batch: Batch, k: int) -> Batch:
    """The first k samples of every tensor of the batch."""
    return map_tensors(batch, lambda t: t[:k])


def take(batches: Iterable[Batch], n: int) -> Iterator[Batch]:
    """Batches truncated so that exactly min(n, available) samples are yielded."""
    left = n
    for batch in batches:
        if left <= 0:
            return
        k = min(left, batch_size(batch))
        if k == 0:
            continue
        yield batch if k == batch_size(batch) else slice_batch(batch, k)
        left -= k


def concat(parts: list[Batch]) -> Batch:
    """One batch of the samples of `parts` (same structure each), in order."""
    first = parts[0]
    kind = _kind(first)
    if kind == "tensor":
        return torch.cat(parts)
    if kind == "dict":
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    return type(first)(torch.cat([p[j] for p in parts]) if isinstance(v, torch.Tensor) else v
                       for j, v in enumerate(first))


def check_finite(batch: Batch, where: str) -> None:
    """ValueError "{where}: {name} contain NaN or Inf" when a floating-point input is not finite."""
    args, kwargs = model_inputs(batch)
    named = [("images", args[0])] if args else list(kwargs.items())
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name} contain NaN or Inf")
