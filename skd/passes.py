"""One streamed pass over calibration data: what skd.stats.calibrate (the gradient pass) and
skd.attention_stats.attention_pass (the no-grad explicit-attention pass) share.

Batching (a map-style Dataset of single samples is batched here), this process's share of the sample
budget under torch.distributed, eval mode, the progress bar, the NaN/Inf check and device move of every
batch, one all-reduce of everything accumulated, and the sample-count checks. What a batch does (the
forward, gradients, which statistics) is the caller's `step`; so is the grad mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from . import batches
from ._dist import all_reduce_flat, rank_share

DATASET_BATCH_SIZE = 64


def data_batches(data: Iterable | Dataset) -> Iterable:
    """A map-style Dataset of single samples is batched; anything else must already yield batches."""
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        return DataLoader(data, batch_size=DATASET_BATCH_SIZE)
    return data


def stream_pass(model: nn.Module, data: Iterable | Dataset, step: Callable[[Any], None],
                tensors: Callable[[], Sequence[torch.Tensor]], *, num_samples: int, desc: str, progress: bool,
                group: object = None) -> int:
    """`step(batch)` on at most `num_samples` samples of `data`, then `tensors()` summed over processes.

    model: runs in eval mode (its training flag is restored afterwards); each batch (skd.batches) is
    checked for NaN/Inf and moved to the device and dtype of the model's first parameter before `step`.
    data: batches, or a map-style Dataset of single samples (`data_batches`). Under torch.distributed this
    process reads its `rank_share` of num_samples, and the float64 tensors `tensors()` returns after the
    loop (what `step` accumulated in place) are all-reduced over `group` together with the sample count,
    in one collective. desc: the progress bar's label (shown on rank 0 when `progress`).

    Returns the number of samples used (all processes). ValueError when the data yielded no samples;
    warns when fewer than num_samples were available.
    """
    param = next(model.parameters())
    budget, rank, world = rank_share(num_samples)
    was_training = model.training
    model.eval()
    bar = tqdm(total=budget, desc=desc, unit="sample", disable=not progress or rank != 0)
    seen = torch.zeros((), dtype=torch.float64, device=param.device)
    try:
        for n, batch in enumerate(batches.take(data_batches(data), budget)):
            batches.check_finite(batch, f"calibration batch {n}")
            batch = batches.to_device(batch, param.device, param.dtype)
            step(batch)
            size = batches.batch_size(batch)
            seen += size
            bar.update(size)
    finally:
        bar.close()
        model.train(was_training)
    if world > 1:
        all_reduce_flat([seen, *tensors()], group=group)
    total = int(seen)
    if total == 0:
        raise ValueError("the calibration data yielded no samples")
    if total < num_samples:
        warnings.warn(f"calibration data had only {total} samples of the {num_samples} asked for; using those",
                      stacklevel=4)
    return total
