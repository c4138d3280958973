"""ElasticViT's no-grad forward below the dispatcher's autograd layer (session 16) vs the same forward through
it (before), and the extract()ed dense model, side by side in one run.

    python -m benchmarks.below_autograd --threads 1 --cpu-time     # CPU: the digits ViT at batch 1, 8, 64;
                                                                   # ViT-Ti/S at batch 1 (session 16's table)
    python -m benchmarks.below_autograd --device cuda --bf16 --batch 64 \\
        --models vit_small_patch16_224 vit_base_patch16_224       # the eager GPU forward, where host time rules

Every row times the three no-grad forwards interleaved (round-robin, median over rounds,
benchmarks.prefix_attention.side_by_side; on CUDA each call synchronised) at f = 1/3 and 1 of the MACs and prints
after/before (< 1: the guard saves time) and elastic/extracted before and after.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import timm
import torch

import skd.digits  # noqa: F401  registers vit_digits with timm
from skd import ElasticViT
from skd.timing import add_device_options, device_clock, synchronize

from .prefix_attention import side_by_side

CPU_CASES = (("vit_digits", 1), ("vit_digits", 8), ("vit_digits", 64), ("vit_tiny_patch16_224", 1),
             ("vit_small_patch16_224", 1))


def through_autograd(elastic: ElasticViT, *args: object, **kwargs: object) -> object:
    """ElasticViT's forward at its active subnet as before session 16: each op through the autograd layer (the
    plan's bound ones excepted, as then)."""
    plan = elastic._plan(elastic.subnet)
    return elastic.adapter.run(args, kwargs, plan.subnet, functools.partial(elastic._attention, plan, {}),
                               functools.partial(elastic._mlp, plan, {}))


def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """fn() and then the device's queued kernels waited for (nothing to wait for on CPU)."""
    def call() -> None:
        fn()
        synchronize(device)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_options(parser)
    parser.add_argument("--models", nargs="+", default=None, help="timm model names (default: the CPU table's)")
    parser.add_argument("--batch", type=int, default=None, help="one batch size for every model")
    parser.add_argument("--bf16", action="store_true", help="models and inputs in bfloat16")
    args = parser.parse_args()
    clock = device_clock(parser, args)
    device, dtype = torch.device(args.device), torch.bfloat16 if args.bf16 else torch.float32
    cases = CPU_CASES if args.models is None else [(m, 1) for m in args.models]
    if args.batch is not None:
        cases = list(dict.fromkeys((m, args.batch) for m, _ in cases))
    print(f"device {device}, {dtype}, clock: {'process CPU time' if args.cpu_time else 'wall'}, "
          f"{torch.get_num_threads()} threads; ms per no-grad forward")
    print(f"{'model':22} {'batch':>5} {'f':>5} {'before':>8} {'after':>8} {'dense':>8} {'after/before':>12} "
          f"{'before/dense':>12} {'after/dense':>11}")
    for name, batch in cases:
        torch.manual_seed(0)
        model = timm.create_model(name).to(device, dtype).eval()
        elastic = ElasticViT(model).eval()
        x = torch.randn(batch, *model.pretrained_cfg["input_size"], device=device, dtype=dtype)
        for f in (1 / 3, 1.0):
            elastic.set_subnet(macs=f)
            dense = elastic.extract().eval()
            with torch.no_grad():
                calls = [_synced(functools.partial(f, x), device)
                         for f in (functools.partial(through_autograd, elastic), elastic, dense)]
                before, after, d = side_by_side(calls, clock, rounds=21)
            print(f"{name:22} {batch:5d} {f:5.2f} {before * 1e3:8.3f} {after * 1e3:8.3f} {d * 1e3:8.3f} "
                  f"{after / before:12.3f} {before / d:12.3f} {after / d:11.3f}", flush=True)


if __name__ == "__main__":
    main()
