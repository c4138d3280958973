"""PIAD step cost: a training step (forward, backward, AdamW step) of the 1/3-MACs subnet vs the full model.

Target (docs/design.md, issue 14): ≤ 0.4 × a full step on ViT-S, because the subnet runs at its own size
through prefix views (masking would cost 1.0 ×). The two widths are timed interleaved (full, 1/3, full, ...)
so load from other processes hits both alike; medians.

    python -m benchmarks.piad_step [--model vit_digits] [--batch 64 [256 ...]] [--repeats 7] [--threads N]
        [--cpu-time] [--device cpu|cuda] [--amp] [--compile]
    python -m benchmarks.piad_step --model vit_small_patch16_224 --batch 16 --repeats 3 --threads 1 --cpu-time

On a GPU, `--device cuda --amp` is PIAD's own setting there (bf16 autocast); a step's time includes its kernels.
There a small batch is host-bound (ViT-S at 64 on an H200: the 1/3 step took 1.03x the full one), and the MACs
saved show only once the GPU's work outlasts the host's: give several batches to see where. `--compile` also
times the step through `torch.compile(elastic, dynamic=True)` (PIADTrainer(compile=True)): one graph serves every
narrower width, and inductor's fused kernels take most of the host's per-op work away.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics

import timm
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import skd
import skd.digits  # registers vit_digits with timm
from skd.piad.recipe import build_optimizer
from skd.timing import add_device_options, call_ms, device_clock

FRACTIONS = (1.0, 1 / 3)


def step(elastic: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: bool) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
        loss = F.cross_entropy(elastic(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vit_digits")
    ap.add_argument("--batch", type=int, nargs="+", default=[64])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast, as PIAD trains on a GPU")
    ap.add_argument("--compile", action="store_true", help="also time the step compiled (torch.compile)")
    add_device_options(ap)
    args = ap.parse_args()
    clock = device_clock(ap, args)
    torch.manual_seed(0)
    model = timm.create_model(args.model).to(args.device)
    elastic = skd.ElasticViT(model).train()
    cfg = model.pretrained_cfg.get("input_size", (3, 224, 224))
    opt = build_optimizer(elastic, "adamw", lr=1e-4, weight_decay=0.05)  # PIAD's optimizer
    subnets = [elastic.set_subnet(macs=f).subnet for f in FRACTIONS]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads, cpu"
    print(f"{args.model}, {where}, {'bf16 autocast' if args.amp else 'fp32'}, "
          f"{'process CPU' if args.cpu_time else 'wall'} time")
    modes = {"eager": elastic} | ({"compiled": torch.compile(elastic, dynamic=True)} if args.compile else {})
    print("| batch | mode | budget | MACs fraction | step ms | / full | / eager |\n|---|---|---|---|---|---|---|")
    for batch in args.batch:
        x = torch.randn(batch, *cfg, device=args.device)
        y = torch.randint(0, model.num_classes, (batch,), device=args.device)
        times = {(mode, j): [] for mode in modes for j in range(len(FRACTIONS))}
        compiling = 0.0
        for i in range(args.repeats + 1):  # round 0 warms up (and compiles)
            for (mode, j), t in times.items():
                elastic.set_subnet(subnet=subnets[j])
                ms = call_ms(functools.partial(step, modes[mode], opt, x, y, args.amp), x.device, clock)
                if i:
                    t.append(ms)
                elif mode == "compiled":
                    compiling += ms / 1e3
        ms = {key: statistics.median(t) for key, t in times.items()}
        for (mode, j), t in ms.items():
            print(f"| {batch} | {mode} | {FRACTIONS[j]:.3f} | {elastic.macs(subnets[j]) / elastic.full_macs:.3f} "
                  f"| {t:.1f} | {t / ms[mode, 0]:.2f} | {t / ms['eager', j]:.2f} |", flush=True)
        if args.compile:
            print(f"(batch {batch}: the compiled steps' first calls took {compiling:.1f} s; "
                  f"Dynamo graphs so far: {counters['stats']['unique_graphs']})", flush=True)


if __name__ == "__main__":
    main()
