"""PIAD step cost: a training step (forward, backward, AdamW step) of the 1/3-MACs subnet vs the full model.

Target (docs/design.md): ≤ 0.4 × a full step, because the subnet runs at its own size through prefix views
(masking would cost 1.0 ×). Usage: python benchmarks/piad_step.py [--model vit_digits] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import skd
import skd.digits  # registers vit_digits with timm
from skd.piad.recipe import build_optimizer


def step_ms(elastic: skd.ElasticViT, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
            repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        loss = F.cross_entropy(elastic(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:  # two warm-up steps
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vit_digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model)
    elastic = skd.ElasticViT(model).train()
    cfg = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x, y = torch.randn(args.batch, *cfg), torch.randint(0, model.num_classes, (args.batch,))
    opt = build_optimizer(elastic, "adamw", lr=1e-4, weight_decay=0.05)  # PIAD's optimizer
    rows = []
    for f in (1.0, 1 / 3):
        elastic.set_subnet(macs=f)
        rows.append((f, elastic.macs() / elastic.full_macs, step_ms(elastic, opt, x, y, args.repeats)))
    full = rows[0][2]
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, device cpu")
    print("| budget | MACs fraction | step ms | / full |\n|---|---|---|---|")
    for f, frac, ms in rows:
        print(f"| {f:.3f} | {frac:.3f} | {ms:.1f} | {ms / full:.2f} |")


if __name__ == "__main__":
    main()
