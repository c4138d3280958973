"""Wall-clock timing of a callable, synchronising CUDA so GPU work is counted."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], repeats: int = 5, device: torch.device | None = None) -> float:
    """Median wall time of `fn()` in milliseconds over `repeats` runs after one warm-up run."""
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
