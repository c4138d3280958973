"""PIAD step cost: a training step (forward, backward, AdamW step) of the 1/3-MACs subnet vs the full model.

Target (docs/design.md, issue 14): ≤ 0.4 × a full step on ViT-S, because the subnet runs at its own size
through prefix views (masking would cost 1.0 ×). The two widths are timed interleaved (full, 1/3, full, ...)
so load from other processes hits both alike; medians.

    python -m benchmarks.piad_step [--model vit_digits] [--batch 64] [--repeats 7] [--threads N] [--cpu-time]
        [--device cpu|cuda] [--amp]
    python -m benchmarks.piad_step --model vit_small_patch16_224 --batch 16 --repeats 3 --threads 1 --cpu-time

On a GPU, `--device cuda --amp` is PIAD's own setting there (bf16 autocast); a step's time includes its kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import timm
import torch
import torch.nn.functional as F

import skd
import skd.digits  # registers vit_digits with timm
from skd.piad.recipe import build_optimizer
from skd.timing import add_device_options, call_ms, device_clock

FRACTIONS = (1.0, 1 / 3)


def step(elastic: skd.ElasticViT, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: bool) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
        loss = F.cross_entropy(elastic(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vit_digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast, as PIAD trains on a GPU")
    add_device_options(ap)
    args = ap.parse_args()
    clock = device_clock(ap, args)
    torch.manual_seed(0)
    model = timm.create_model(args.model).to(args.device)
    elastic = skd.ElasticViT(model).train()
    cfg = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(args.batch, *cfg, device=args.device)
    y = torch.randint(0, model.num_classes, (args.batch,), device=args.device)
    opt = build_optimizer(elastic, "adamw", lr=1e-4, weight_decay=0.05)  # PIAD's optimizer
    subnets = [elastic.set_subnet(macs=f).subnet for f in FRACTIONS]
    times: list[list[float]] = [[] for _ in FRACTIONS]
    for i in range(args.repeats + 1):  # round 0 warms up
        for j, s in enumerate(subnets):
            elastic.set_subnet(subnet=s)
            ms = call_ms(lambda: step(elastic, opt, x, y, args.amp), x.device, clock)
            if i:
                times[j].append(ms)
    full = statistics.median(times[0])
    where = torch.cuda.get_device_name() if x.is_cuda else f"{torch.get_num_threads()} threads, cpu"
    print(f"{args.model}, batch {args.batch}, {where}, {'bf16 autocast' if args.amp else 'fp32'}, "
          f"{'process CPU' if args.cpu_time else 'wall'} time")
    print("| budget | MACs fraction | step ms | / full |\n|---|---|---|---|")
    for f, s, t in zip(FRACTIONS, subnets, times, strict=True):
        ms = statistics.median(t)
        print(f"| {f:.3f} | {elastic.macs(s) / elastic.full_macs:.3f} | {ms:.1f} | {ms / full:.2f} |")


if __name__ == "__main__":
    main()
