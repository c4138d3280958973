"""Accuracy, MACs and latency of an ElasticViT at several MACs budgets."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import batches
from .elastic import ElasticViT
from .timing import time_ms

EVAL_BATCH_SIZE = 256


def loader_for(data: Dataset | DataLoader, batch_size: int = EVAL_BATCH_SIZE) -> DataLoader:
    """`data` itself if it is a DataLoader, else an ordered DataLoader over the Dataset."""
    return data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)


def first_batch(loader: DataLoader, n: int) -> Any:
    """One batch of the first n samples of `loader` (fewer if it holds fewer), reading only what is needed."""
    chunks = list(batches.take(loader, n))
    if not chunks:
        raise ValueError("the evaluation data is empty")
    return batches.concat(chunks)


@contextmanager
def eval_mode(elastic: ElasticViT) -> Iterator[ElasticViT]:
    """`elastic` in eval mode inside the block; its active subnet and train/eval mode are restored on exit."""
    active, was_training = elastic.subnet, elastic.training
    elastic.eval()
    try:
        yield elastic
    finally:
        elastic.set_subnet(active)
        elastic.train(was_training)


@torch.no_grad()
def correct_count(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                  logits: Callable[[Any], torch.Tensor] | None = None) -> tuple[int, int]:
    """(top-1 correct, samples) of `model` over `loader`'s labelled batches (skd.batches).

    logits(output) -> (B, classes): how to read the model's output (an adapter's `logits`); default: the
    output is the logits.
    """
    correct = total = 0
    for batch in loader:
        labels = batches.labels(batch)
        if labels is None:
            raise ValueError("accuracy needs labelled batches")
        out = batches.call(model, batches.to_device(batch, device))
        correct += int(((logits(out) if logits else out).argmax(-1).cpu() == labels.cpu()).sum())
        total += len(labels)
    return correct, total


def evaluate_budgets(
    elastic: ElasticViT,
    data: Dataset | DataLoader,
    budgets: Iterable[float],
    *,
    latency_batch: int | None = 64,
    progress: bool = False,
) -> list[dict[str, float]]:
    """One row per MACs budget f: {"budget", "accuracy" in [0, 1], "macs" per image, "macs_fraction",
    "latency_ms"} — the subnet is the largest with MACs <= f·full (along the dropout list when the model
    has one, else uniform widths). Latency is the median forward time of the first `latency_batch` samples
    of `data` (omitted when latency_batch is None). The active subnet is restored afterwards."""
    loader = loader_for(data)
    device = next(elastic.parameters()).device
    example = None if latency_batch is None else batches.to_device(first_batch(loader, latency_batch), device)
    rows = []
    with eval_mode(elastic):
        for f in tqdm(list(budgets), desc="evaluate budgets", disable=not progress):
            elastic.set_subnet(macs=f)
            correct, total = correct_count(elastic, loader, device, elastic.adapter.logits)
            row = {"budget": f, "accuracy": correct / total, "macs": elastic.macs(),
                   "macs_fraction": elastic.macs() / elastic.full_macs}
            if example is not None:
                with torch.no_grad():
                    row["latency_ms"] = time_ms(lambda: batches.call(elastic, example), device=device)
            rows.append(row)
    return rows
