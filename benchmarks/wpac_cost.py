"""WPAC's cost: time vs one plain forward+backward over the same samples, and peak memory vs samples.

Targets (docs/design.md): WPAC on 1024 samples <= 1.5x the time of one plain forward+backward (loss.backward()
with weight gradients, as a training step computes) over them; peak memory at 1024 samples <= 1.15x
that at 256. Model: vit_small_patch16_224 (--model: any timm model skd.wpac takes), random init, random images
of its input size and random labels.

Time: every repeat runs the plain pass and WPAC back to back on one copy of the model, so load from other
processes hits both alike; the median ratio and the ratio of the best times are printed.
Memory: each sample count runs in a fresh child process, which reports its peak (CPU: VmHWM, the
process's RSS high-water mark; CUDA: torch.cuda.max_memory_allocated), before WPAC (model loaded) and
after; batches are made on the fly, as a loader streaming from disk would give them.
The default sizes are the targets'; this 2-core CPU needs smaller ones (say --samples 64
--memory-samples 32), and the report says what ran.

    python -m benchmarks.wpac_cost [--samples 1024] [--memory-samples 256] [--batch 32] [--repeats 3]
                                   [--device cpu|cuda] [--threads N] [--model vit_small_patch16_224]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import timm
import torch
import torch.nn.functional as F

import skd
import skd.digits  # registers vit_digits with timm
from skd.timing import synchronize

MODEL = "vit_small_patch16_224"


def _model(name: str, device: torch.device) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False).to(device).eval()


def _batches(model: torch.nn.Module, n: int, batch: int,
             device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """n random images of `model`'s input size and labels of its classes in batches, each made on the fly (a
    loader streaming from disk holds one batch at a time too), the same on every call."""
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    for i in range(0, n, batch):
        gen = torch.Generator().manual_seed(i)
        b = min(batch, n - i)
        yield (torch.randn(b, *size, generator=gen).to(device),
               torch.randint(0, model.num_classes, (b,), generator=gen).to(device))


def plain_forward_backward(model: torch.nn.Module, data: list) -> float:
    """Seconds for one forward+backward (with weight gradients) over every batch."""
    device = next(model.parameters()).device
    synchronize(device)
    t0 = time.perf_counter()
    for x, y in data:
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - t0


def wpac_seconds(model: torch.nn.Module, data: list, n: int) -> float:
    """Seconds of skd.wpac (calibration and transform) on `model`, in place."""
    device = next(model.parameters()).device
    synchronize(device)
    t0 = time.perf_counter()
    skd.wpac(model, data, num_samples=n, progress=False)
    synchronize(device)
    return time.perf_counter() - t0


def time_ratio(name: str, n: int, batch: int, repeats: int, device: torch.device) -> None:
    base = _model(name, device)
    data = list(_batches(base, n, batch, device))  # made before timing
    plain_forward_backward(base, data[:1])  # warm-up: allocator, kernels, thread pool
    ratios, plains, wpacs = [], [], []
    for _ in range(repeats):
        model = copy.deepcopy(base)
        plain = plain_forward_backward(model, data)
        total = wpac_seconds(model, data, n)
        plains.append(plain)
        wpacs.append(total)
        ratios.append(total / plain)
        print(f"  plain fwd+bwd {plain:7.2f} s   wpac {total:7.2f} s   ratio {total / plain:.3f}", flush=True)
    print(f"time, {n} samples (batch {batch}, {device}): plain {statistics.median(plains):.2f} s, "
          f"wpac {statistics.median(wpacs):.2f} s; ratio median {statistics.median(ratios):.3f}, "
          f"best-of-each {min(wpacs) / min(plains):.3f} (target <= 1.5)")


def _child(name: str, n: int, batch: int, device: torch.device) -> None:
    """Runs in a fresh process: prints JSON {before, after} peak memory in MiB around WPAC on n samples."""
    model = _model(name, device)

    def peak() -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20
        # VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's over fork+exec)
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1024

    before = peak()
    skd.wpac(model, _batches(model, n, batch, device), num_samples=n, progress=False)
    print(json.dumps({"before": before, "after": peak()}))


def memory_ratio(name: str, n: int, batch: int, device: torch.device, threads: int | None) -> None:
    peaks = {}
    for m in (n, 4 * n):
        cmd = [sys.executable, "-m", "benchmarks.wpac_cost", "--child", str(m), "--batch", str(batch),
               "--device", str(device), "--model", name] + (["--threads", str(threads)] if threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peaks[m] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {m:5d} samples: peak {peaks[m]['after']:8.1f} MiB (model loaded: "
              f"{peaks[m]['before']:8.1f} MiB)", flush=True)
    small, large = peaks[n], peaks[4 * n]
    added_small, added_large = small["after"] - small["before"], large["after"] - large["before"]
    print(f"peak memory, {4 * n} vs {n} samples (batch {batch}, {device}): raw {large['after'] / small['after']:.3f}, "
          f"increment over the loaded model {added_large:.1f} vs {added_small:.1f} MiB "
          f"(ratio {added_large / max(added_small, 1e-9):.3f}); target <= 1.15")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024, help="samples for the time ratio (0 skips it)")
    parser.add_argument("--memory-samples", type=int, default=256,
                        help="peak memory at 4x this vs this many samples (0 skips it)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child is not None:
        _child(args.model, args.child, args.batch, device)
        return
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model}, random init, {where}, {torch.get_num_threads()} threads")
    if args.samples:
        time_ratio(args.model, args.samples, args.batch, args.repeats, device)
    if args.memory_samples:
        memory_ratio(args.model, args.memory_samples, args.batch, device, args.threads)


if __name__ == "__main__":
    main()
