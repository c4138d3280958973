"""PIAD step cost: a training step (forward, backward, AdamW step) of the 1/3-MACs subnet vs the full model.

Target (docs/design.md, issue 14): ≤ 0.4 × a full step on ViT-S, because the subnet runs at its own size
through prefix views (masking would cost 1.0 ×). The two widths are timed interleaved (full, 1/3, full, ...)
so load from other processes hits both alike; medians.

    python -m benchmarks.piad_step [--model vit_digits] [--batch 64] [--repeats 7] [--threads N] [--cpu-time]
    python -m benchmarks.piad_step --model vit_small_patch16_224 --batch 16 --repeats 3 --threads 1 --cpu-time
"""

from __future__ import annotations

import argparse
import statistics

import timm
import torch
import torch.nn.functional as F

import skd
import skd.digits  # registers vit_digits with timm
from skd.piad.recipe import build_optimizer
from skd.timing import add_cpu_time_option
from skd.timing import clock as timing_clock

FRACTIONS = (1.0, 1 / 3)


def step(elastic: skd.ElasticViT, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(elastic(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vit_digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    add_cpu_time_option(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = timing_clock(ap, args, torch.get_num_threads() == 1)
    torch.manual_seed(0)
    model = timm.create_model(args.model)
    elastic = skd.ElasticViT(model).train()
    cfg = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x, y = torch.randn(args.batch, *cfg), torch.randint(0, model.num_classes, (args.batch,))
    opt = build_optimizer(elastic, "adamw", lr=1e-4, weight_decay=0.05)  # PIAD's optimizer
    subnets = [elastic.set_subnet(macs=f).subnet for f in FRACTIONS]
    times: list[list[float]] = [[] for _ in FRACTIONS]
    for i in range(args.repeats + 1):  # round 0 warms up
        for j, s in enumerate(subnets):
            elastic.set_subnet(subnet=s)
            t0 = clock()
            step(elastic, opt, x, y)
            if i:
                times[j].append((clock() - t0) * 1e3)
    full = statistics.median(times[0])
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, device cpu, "
          f"{'process CPU' if args.cpu_time else 'wall'} time")
    print("| budget | MACs fraction | step ms | / full |\n|---|---|---|---|")
    for f, s, t in zip(FRACTIONS, subnets, times, strict=True):
        ms = statistics.median(t)
        print(f"| {f:.3f} | {elastic.macs(s) / elastic.full_macs:.3f} | {ms:.1f} | {ms / full:.2f} |")


if __name__ == "__main__":
    main()
