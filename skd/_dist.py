"""torch.distributed in one place: this process's rank and world size, process-group setup under
torchrun, a process's share of a sample budget, and the flat all-reduce of many tensors (on top of
`skd_kernels.distributed.all_reduce_flat`, adding mixed dtypes, averaging and the one-process no-op).

Everything here is a no-op (or the one-process answer) when torch.distributed is not initialised.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

import skd_kernels.distributed


def is_distributed() -> bool:
    """True when a process group is initialised (this process is one of several, or of one)."""
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> None:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1) and none exists.

    nccl with this process's LOCAL_RANK GPU when CUDA is available, gloo on CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")


def rank_share(num_samples: int) -> tuple[int, int, int]:
    """(this process's share of num_samples, rank, world size); the shares sum to num_samples.

    The first num_samples % world ranks take one sample more.
    """
    rank, world = rank_world()
    return num_samples // world + int(rank < num_samples % world), rank, world


def all_reduce_flat(tensors: Sequence[torch.Tensor], *, dtype: torch.dtype | None = None, average: bool = False,
                    group: object = None) -> None:
    """Sum (average=True: average) `tensors` over processes, in place, with one all-reduce.

    tensors: any shapes, one device. Those not of `dtype` (default: the first tensor's) are reduced
    through a `dtype` copy and cast back, so one flat buffer (`skd_kernels.distributed.all_reduce_flat`:
    one collective, not one per tensor) carries them all. No-op with a single process.
    """
    _, world = rank_world()
    if world == 1 or not tensors:
        return
    dtype = dtype or tensors[0].dtype
    buffers = [t if t.dtype == dtype else t.to(dtype) for t in tensors]
    skd_kernels.distributed.all_reduce_flat(buffers, group=group)
    for t, b in zip(tensors, buffers, strict=True):
        if average:
            b /= world
        if b is not t:
            t.copy_(b)
