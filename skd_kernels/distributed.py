"""Collectives over several tensors at once, for statistics that are summed across processes."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def all_reduce_flat(tensors: Sequence[torch.Tensor], group: object = None) -> Sequence[torch.Tensor]:
    """Sums each tensor over the processes of `group` (torch.distributed) in place, with ONE all_reduce.

    tensors: any shapes, one dtype and one device (e.g. float64 statistics). They are packed into one flat
    buffer, so a state of many small tensors costs one collective's latency, not one per tensor.
    Returns `tensors`.
    """
    import torch.distributed as dist

    if not tensors:
        return tensors
    first = tensors[0]
    for t in tensors:
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"all_reduce_flat needs one dtype and device, got {t.dtype} on {t.device} beside "
                             f"{first.dtype} on {first.device}")
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return tensors
