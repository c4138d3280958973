"""ElasticViT's no-grad forward below the dispatcher's autograd layer (session 16) vs the same forward through
it (before), and the extract()ed dense model, side by side in one run (CPU, one thread, process CPU time).

    python -m benchmarks.below_autograd            # the digits ViT at batch 1, 8, 64; ViT-Ti/S at batch 1

Every row times the three no-grad forwards interleaved (round-robin, median over rounds,
benchmarks.prefix_attention.side_by_side) at f = 1/3 and 1 of the MACs and prints after/before (< 1: the
guard saves host time) and elastic/extracted before and after.
"""

from __future__ import annotations

import functools
import time

import timm
import torch

import skd.digits  # noqa: F401  registers vit_digits with timm
from skd import ElasticViT

from .prefix_attention import side_by_side

CASES = (("vit_digits", 1), ("vit_digits", 8), ("vit_digits", 64), ("vit_tiny_patch16_224", 1),
         ("vit_small_patch16_224", 1))


def through_autograd(elastic: ElasticViT, *args: object, **kwargs: object) -> object:
    """ElasticViT's forward at its active subnet as before session 16: each op through the autograd layer (the
    plan's bound ones excepted, as then)."""
    plan = elastic._plan(elastic.subnet)
    return elastic.adapter.run(args, kwargs, plan.subnet, functools.partial(elastic._attention, plan, {}),
                               functools.partial(elastic._mlp, plan, {}))


def main() -> None:
    torch.set_num_threads(1)
    print("clock: process CPU time, 1 thread; ms per no-grad forward")
    print(f"{'model':22} {'batch':>5} {'f':>5} {'before':>8} {'after':>8} {'dense':>8} {'after/before':>12} "
          f"{'before/dense':>12} {'after/dense':>11}")
    for name, batch in CASES:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        elastic = ElasticViT(model).eval()
        x = torch.randn(batch, *model.pretrained_cfg["input_size"])
        for f in (1 / 3, 1.0):
            elastic.set_subnet(macs=f)
            dense = elastic.extract().eval()
            with torch.no_grad():
                calls = [functools.partial(through_autograd, elastic, x), functools.partial(elastic, x),
                         functools.partial(dense, x)]
                before, after, d = side_by_side(calls, time.process_time, rounds=21)
            print(f"{name:22} {batch:5d} {f:5.2f} {before * 1e3:8.3f} {after * 1e3:8.3f} {d * 1e3:8.3f} "
                  f"{after / before:12.3f} {before / d:12.3f} {after / d:11.3f}", flush=True)


if __name__ == "__main__":
    main()
