"""skd.timing: one timed call by a given clock, the device synchronised around it; medians over repeats."""

from __future__ import annotations

import pytest
import torch

from skd import timing


def test_call_ms_times_one_call_by_the_given_clock_and_synchronises_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clock is read right before and after the call (seconds -> ms); a CUDA device is synchronised before
    the first read and before the second, so the call's kernels count; a CPU device or None is not."""
    events = []
    ticks = iter([2.0, 2.25])

    def clock() -> float:
        events.append("clock")
        return next(ticks)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(f"sync {device}"))
    assert timing.call_ms(lambda: events.append("call"), torch.device("cuda", 1), clock) == 250.0
    assert events == ["sync cuda:1", "clock", "call", "sync cuda:1", "clock"]
    for device in (torch.device("cpu"), None):
        events.clear()
        ticks = iter([0.0, 0.001])
        assert timing.call_ms(lambda: events.append("call"), device, clock) == pytest.approx(1.0)
        assert events == ["clock", "call", "clock"]


def test_time_ms_is_the_median_after_a_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, samples = [], iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(timing, "call_ms", lambda fn, device: next(samples))
    assert timing.time_ms(lambda: calls.append(1), repeats=3) == 2.0
    assert calls == [1]  # the warm-up; the timed runs went through call_ms


def test_device_options_set_threads_pick_the_clock_and_refuse_cuda_without_a_device_or_in_cpu_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser()
    timing.add_device_options(parser)
    threads = torch.get_num_threads()
    try:
        assert timing.device_clock(parser, parser.parse_args(["--threads", "1", "--cpu-time"])) is time.process_time
        assert torch.get_num_threads() == 1
        assert timing.device_clock(parser, parser.parse_args([])) is time.perf_counter
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        timing.device_clock(parser, parser.parse_args(["--device", "cuda"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert timing.device_clock(parser, parser.parse_args(["--device", "cuda"])) is time.perf_counter
    with pytest.raises(SystemExit):
        timing.device_clock(parser, parser.parse_args(["--device", "cuda", "--threads", "1", "--cpu-time"]))
