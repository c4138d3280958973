"""PIAD's data side: seeds derived per (seed, epoch, rank), the global-batch sampler, the proxy set.

Randomness is re-derived at every epoch start from (seed, epoch, rank) for torch, numpy (mixup),
Python's `random`, the data order and the subnet sampler, so a checkpoint resumes exactly without
storing generator states, and on any number of processes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

PROXY_BATCH_SIZE = 128

# The `purpose` part of derive_seed: one independent stream each.
_ORDER, _PROXY, _TORCH, _NUMPY, _PYTHON, _SUBNETS = 1, 2, 3, 4, 5, 6


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, epoch, rank, purpose): independent streams, reproducible anywhere."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class GlobalBatchSampler(Sampler[list[int]]):
    """Index batches of one process: a seeded permutation per epoch, cut into global batches of
    batch_size * world samples, of which this rank takes slice [rank*batch_size, (rank+1)*batch_size).

    One process with batch_size·world therefore sees exactly the union of what `world` processes see.
    Incomplete last global batches are dropped.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int) -> None:
        super().__init__()
        if n < batch_size * world:
            raise ValueError(f"the training set has {n} samples, fewer than one global batch "
                             f"(batch_size {batch_size} x {world} processes)")
        self.n, self.batch_size, self.rank, self.world, self.seed, self.epoch = n, batch_size, rank, world, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0, _ORDER))
        perm = torch.randperm(self.n, generator=gen)
        per_global = self.batch_size * self.world
        for k in range(len(self)):
            start = k * per_global + self.rank * self.batch_size
            yield perm[start : start + self.batch_size].tolist()


def map_dataset(data: Dataset | DataLoader, what: str) -> Dataset:
    """The map-style Dataset behind `data` (itself, or a DataLoader's); ValueError naming `what` otherwise."""
    ds = data.dataset if isinstance(data, DataLoader) else data
    if not (isinstance(ds, Dataset) and hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise ValueError(f"{what} must be a map-style Dataset of samples or a DataLoader over one, "
                         f"got {type(data).__name__}")
    return ds


def train_loader(data: Dataset | DataLoader, batch_size: int, rank: int, world: int, seed: int) -> DataLoader:
    """A DataLoader is used as given (under torchrun give each process its own shard); a Dataset is
    batched by a GlobalBatchSampler (`batch_size` per process, a seeded shuffle shared by all)."""
    if isinstance(data, DataLoader):
        return data
    return DataLoader(data, batch_sampler=GlobalBatchSampler(len(data), batch_size, rank, world, seed))


def proxy_loader(dataset: Dataset, samples: int, seed: int, rank: int, world: int) -> tuple[DataLoader, int]:
    """(this process's shard of min(samples, len(dataset)) training samples chosen by seed, in a fixed
    order; that total size over all processes)."""
    n = min(samples, len(dataset))
    gen = torch.Generator().manual_seed(derive_seed(seed, 0, 0, _PROXY))
    idx = torch.randperm(len(dataset), generator=gen)[:n]
    return DataLoader(Subset(dataset, idx[rank::world].tolist()), batch_size=PROXY_BATCH_SIZE), n


def reseed(seed: int, epoch: int, rank: int, loader: DataLoader) -> torch.Generator:
    """Seed torch, numpy and Python from (seed, epoch, rank), set the loader's sampler epoch, and return
    the subnet generator, the same on every rank."""
    torch.manual_seed(derive_seed(seed, epoch, rank, _TORCH))
    np.random.seed(derive_seed(seed, epoch, rank, _NUMPY) % 2**32)
    random.seed(derive_seed(seed, epoch, rank, _PYTHON))
    sampler = getattr(loader, "batch_sampler", None) or getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    return torch.Generator().manual_seed(derive_seed(seed, epoch, 0, _SUBNETS))
