"""Timing a callable, synchronising CUDA so GPU work is counted (for skd and the benchmark scripts); and the
benchmark scripts' `--cpu-time` option (process CPU time, stable on a shared machine)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | None) -> None:
    """Waits for the kernels queued on `device` when it is a CUDA device; nothing otherwise (None included)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def call_ms(fn: Callable[[], object], device: torch.device | None = None,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Milliseconds of one `fn()` by `clock` (seconds), `device` synchronised before and after: its kernels count."""
    synchronize(device)
    t0 = clock()
    fn()
    synchronize(device)
    return (clock() - t0) * 1e3


def time_ms(fn: Callable[[], object], repeats: int = 5, device: torch.device | None = None) -> float:
    """Median wall time of `fn()` in milliseconds over `repeats` runs after one warm-up run."""
    fn()
    return statistics.median(call_ms(fn, device) for _ in range(repeats))


def add_cpu_time_option(parser: argparse.ArgumentParser) -> None:
    """`--cpu-time` for a benchmark script: process CPU time instead of wall time (`clock`)."""
    parser.add_argument("--cpu-time", action="store_true",
                        help="process CPU time instead of wall time (needs one CPU thread): stable on a shared machine")


def clock(parser: argparse.ArgumentParser, args: argparse.Namespace, single_thread: bool,
          needs: str = "--threads 1") -> Callable[[], float]:
    """time.process_time under --cpu-time, else time.perf_counter. --cpu-time on a run that is not
    `single_thread` is a parser error naming `needs`: other threads' spin-waits would count as CPU time."""
    if not args.cpu_time:
        return time.perf_counter
    if not single_thread:
        parser.error(f"--cpu-time needs {needs} (other threads' spin-waits count as CPU time)")
    return time.process_time


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """`--device cpu|cuda`, `--threads N` and `--cpu-time` for a benchmark script (`device_clock` reads them)."""
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    add_cpu_time_option(parser)


def device_clock(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Callable[[], float]:
    """`add_device_options`' arguments applied: the thread count set, `--device cuda` refused (a parser error)
    without a CUDA device or with `--cpu-time`; returns `clock`'s choice."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and (args.cpu_time or not torch.cuda.is_available()):
        parser.error("--device cuda needs a CUDA device and wall time")
    return clock(parser, args, torch.get_num_threads() == 1)
