"""Where an elastic forward's time goes: torch.profiler op table of ElasticViT and of its extract()ed model.

For one model, batch and MACs fraction (no grad), prints per forward: wall ms of each, the ATen/custom
op calls and Python function calls (cProfile) per forward, then the top ops by self CPU time (µs per
forward and calls per forward). On CUDA also the host's ms to enqueue a forward (wall ≈ host: host-bound,
launches and Python are the cost) and the GPU's kernel ms and kernel launches per forward. The profiler
adds its own per-op cost, so read the op counts and the shares, and take speeds from
benchmarks/elastic_latency.py. `--train`: per training step instead, forward and backward (bf16: under
autocast on fp32 weights, as PIAD trains; benchmarks/piad_step.py times whole steps).

    python -m benchmarks.elastic_profile [--model vit_digits] [--batch 1] [--macs 0.25] [--iters 200]
        [--threads 1] [--dtype fp32|bf16] [--device cpu|cuda] [--train]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import pstats
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import skd.digits  # noqa: F401  registers vit_digits with timm
from skd import ElasticViT
from skd.timing import synchronize


def table(fn, x: torch.Tensor, iters: int, rows: int, unit: str = "forward") -> str:
    sync = functools.partial(synchronize, x.device)
    for _ in range(3):
        fn(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    enqueued = time.perf_counter()
    sync()
    wall = (time.perf_counter() - t0) / iters * 1e3
    host = f" (host {(enqueued - t0) / iters * 1e3:.3f} ms to enqueue)" if x.is_cuda else ""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn(x)
        sync()
    python = cProfile.Profile()
    python.runcall(lambda: [fn(x) for _ in range(iters)])
    sync()
    py_calls = pstats.Stats(python).total_calls / iters
    averages = prof.key_averages()
    kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = (f"; GPU {sum(e.self_device_time_total for e in kernels) / iters / 1e3:.3f} ms of kernels, "
           f"{sum(e.count for e in kernels) / iters:.0f} kernels/{unit}" if x.is_cuda else "")
    events = sorted((e for e in averages if e.device_type == torch.autograd.DeviceType.CPU),
                    key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / iters
    lines = [f"wall {wall:.3f} ms/{unit} unprofiled{host}{gpu}; profiled self CPU {total / 1e3:.3f} ms/{unit}, "
             f"{sum(e.count for e in events) / iters:.0f} op calls/{unit}, {py_calls:.0f} Python calls/{unit}",
             f"| op | self µs/{unit} | share | calls/{unit} |", "|---|---:|---:|---:|"]
    for e in events[:rows]:
        lines.append(f"| {e.key} | {e.self_cpu_time_total / iters:.1f} | {e.self_cpu_time_total / iters / total:.1%} "
                     f"| {e.count / iters:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_digits")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--macs", type=float, default=0.25)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--train", action="store_true", help="profile a training step's forward + backward")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    weights = torch.float32 if args.train else dtype  # training: fp32 weights, bf16 through autocast
    model = timm.create_model(args.model).to(args.device, weights)
    elastic = ElasticViT(model).set_subnet(macs=args.macs)
    dense = elastic.extract()
    x = torch.randn(args.batch, *model.pretrained_cfg["input_size"], device=args.device, dtype=weights)
    unit = "step" if args.train else "forward"
    print(f"{args.model}, {args.dtype}, batch {args.batch}, MACs {elastic.macs() / elastic.full_macs:.3f}, "
          f"{elastic.subnet}, {args.device}, {torch.get_num_threads()} threads, per {unit}")
    with contextlib.nullcontext() if args.train else torch.no_grad():
        for name, fn in (("elastic", elastic), ("extracted", dense)):
            fn.train(args.train)
            run = functools.partial(_step, fn, dtype) if args.train else fn
            print(f"\n{name}: {table(run, x, args.iters, args.rows, unit)}")


def _step(model: torch.nn.Module, dtype: torch.dtype, x: torch.Tensor) -> None:
    """A training step's forward and backward (the optimizer's step is the same for both models)."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(x).float().square().mean()
    loss.backward()


if __name__ == "__main__":
    main()
