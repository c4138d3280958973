"""One intra-op thread around small batched LAPACK calls (eigh, svd, solve on head-sized matrices)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op threads set to 1 inside, the caller's setting restored after.

    Head-sized factorizations gain nothing from threads and lose in two ways with them: every LAPACK call pays
    thread barriers (on a busy 2-core CPU one batched eigh took 5 s, 1 ms on one thread), and a batched call
    runs MKL's own OpenMP team inside torch's parallel loop over the batch, which can livelock (a batched
    float64 solve, (12, 272, 272), spun for over 10 minutes with 2 threads).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
