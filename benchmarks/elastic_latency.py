"""Elastic latency: ElasticViT at MACs fractions vs the extract()ed dense model of the same shape.

For the digits ViT (skd.digits: 4 blocks, width 96, 32 px), vit_tiny / vit_small / vit_base and swin_tiny
shapes (random init, 224 px) and MACs fractions 1/4, 1/3, 1/2, 2/3, 1, prints per fraction: elastic ms,
extracted ms, their ratio (issue 14: <= 1.03 on ViT-Ti/S/B, <= 1.10 on the digits ViT), latency(f) /
latency(1) (target <= f + 0.05 on ViT-S/B) and the width-switch time (target < 1 ms, flat across sizes).
`--multiple-of 1 8` chooses each budget's widths at both granularities (ElasticViT.multiple_of; default:
the model's default) in one run: the rows show g, block 0's widths (head dim / hidden) and, from the
second g on, the extracted model's time relative to the first g's at that fraction.
Every repeat times every distinct subnet, elastic and extracted back to back, so load from other processes
on the machine hits all columns alike; medians and best-of ratios are both shown.

    python -m benchmarks.elastic_latency [--device cpu|cuda] [--repeats 7] [--threads N] [--backend B]
        [--models ...] [--batches B ...] [--dtypes fp32 bf16] [--multiple-of G ...] [--cpu-time]

Issue 14's rows: `--threads 1 --models vit_digits` (batches 1 and 64 by default) and
`--threads 1 --models vit_tiny vit_small vit_base --batches 1 8 --dtypes fp32 bf16`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import timm
import torch

import skd.digits  # noqa: F401  registers vit_digits with timm
import skd_kernels
from skd import ElasticViT
from skd.timing import add_cpu_time_option, call_ms
from skd.timing import clock as timing_clock

FRACTIONS = (1 / 4, 1 / 3, 1 / 2, 2 / 3, 1.0)
# default batches per model: the digits ViT at serving (1) and training (64) size; the ViTs at a full
# forward of ~0.1-1 s on a 2-core CPU
MODELS = {"vit_digits": ("vit_digits", (1, 64)), "vit_tiny": ("vit_tiny_patch16_224", (8,)),
          "vit_small": ("vit_small_patch16_224", (4,)), "vit_base": ("vit_base_patch16_224", (1,)),
          "swin_tiny": ("swin_tiny_patch4_window7_224", (1,))}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# time.perf_counter, or time.process_time with --cpu-time (stable on an oversubscribed machine, 1 thread)
CLOCK = [time.perf_counter]


def _time_ms(fn, x: torch.Tensor) -> float:
    return call_ms(lambda: fn(x), x.device, CLOCK[0])


def _switch_us(elastic: ElasticViT, n: int = 2000) -> float:
    """Median over n calls of set_subnet(subnet=...) alternating between two subnets, in microseconds."""
    a, b = elastic.uniform(1 / 3), elastic.uniform(2 / 3)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        elastic.set_subnet(subnet=a if i % 2 else b)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _macs_switch_us(elastic: ElasticViT, n: int = 200) -> float:
    """Median time of set_subnet(macs=f) (budget search included), in microseconds."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        elastic.set_subnet(macs=FRACTIONS[i % len(FRACTIONS)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def bench(name: str, batch: int, dtype: str, device: str, repeats: int, multiples: list[int | None]) -> list[dict]:
    """One row per (granularity, MACs fraction). Every repeat times every distinct subnet, elastic then
    extracted, so a burst of load from other processes lands on every column alike; medians and best-of
    are both reported."""
    torch.manual_seed(0)
    model = timm.create_model(MODELS[name][0]).to(device, DTYPES[dtype]).eval()
    elastic = ElasticViT(model).eval()
    x = torch.randn(batch, *model.pretrained_cfg["input_size"], device=device, dtype=DTYPES[dtype])
    cases, switch = [], {}
    for g in multiples:
        elastic.multiple_of = g
        cases += [(elastic.multiple_of, f, elastic.set_subnet(macs=f).subnet) for f in FRACTIONS]
        switch[elastic.multiple_of] = _switch_us(elastic), _macs_switch_us(elastic)
    subnets = list(dict.fromkeys(s for _, _, s in cases))  # distinct, in order (f = 1 is shared)
    dense = [elastic.extract(s).eval() for s in subnets]
    e_ms: list[list[float]] = [[] for _ in subnets]
    d_ms: list[list[float]] = [[] for _ in subnets]
    with torch.no_grad():
        for rep in range(repeats + 1):  # repeat 0 warms up
            for j, (s, d) in enumerate(zip(subnets, dense, strict=True)):
                elastic.set_subnet(subnet=s)
                te, td = _time_ms(elastic, x), _time_ms(d, x)
                if rep:
                    e_ms[j].append(te)
                    d_ms[j].append(td)
    med = {s: statistics.median(t) for s, t in zip(subnets, e_ms, strict=True)}
    best = {s: min(t) for s, t in zip(subnets, e_ms, strict=True)}
    d_med = {s: statistics.median(t) for s, t in zip(subnets, d_ms, strict=True)}
    d_best = {s: min(t) for s, t in zip(subnets, d_ms, strict=True)}
    full = cases[-1][2]
    first = {f: s for g, f, s in cases if g == cases[0][0]}
    return [dict(model=name, batch=batch, dtype=dtype, g=g, f=f, widths=f"{s.attn[0]}/{s.mlp[0]}",
                 macs_frac=elastic.macs(s) / elastic.full_macs, elastic_ms=med[s], extract_ms=d_med[s],
                 ratio=med[s] / d_med[s], ratio_best=best[s] / d_best[s], rel=med[s] / med[full],
                 rel_best=best[s] / best[full], vs_first=d_med[s] / d_med[first[f]], switch_us=switch[g][0],
                 macs_switch_us=switch[g][1])
            for g, f, s in cases]


def main(stack: contextlib.ExitStack) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default: each model's own (MODELS)")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--multiple-of", nargs="+", type=int, default=[None],
                   help="width granularities of the budget subnets, compared in one run (default: the model's)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads; 1 avoids OpenMP spin-wait stalls when other processes load the cores")
    p.add_argument("--backend", default=None, choices=skd_kernels.BACKENDS,
                   help="force skd_kernels' prefix_linear backend (default: automatic choice)")
    add_cpu_time_option(p)
    args = p.parse_args()
    CLOCK[0] = timing_clock(p, args, args.threads == 1 and args.device == "cpu", needs="--device cpu --threads 1")
    if args.backend:
        stack.enter_context(skd_kernels.use_backend(args.backend))
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    dev += ", process CPU time" if args.cpu_time else ", wall time"
    print(f"device: {dev}; torch {torch.__version__}; timm {timm.__version__}; "
          f"prefix_linear backend: {args.backend or skd_kernels.available_backends(args.device)}")
    print("| model | batch | dtype | g | f | widths (hd/hidden) | MACs frac | elastic ms | extract ms | "
          "elastic/extract | (best-of) | lat(f)/lat(1) | (best-of) | f+0.05 | extract vs first g | "
          "switch µs (subnet=) | switch µs (macs=) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for batch in args.batches or MODELS[name][1]:
            for dtype in args.dtypes:
                for r in bench(name, batch, dtype, args.device, args.repeats, args.multiple_of):
                    print(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['g']} | {r['f']:.3f} | {r['widths']} | "
                          f"{r['macs_frac']:.3f} | {r['elastic_ms']:.2f} | {r['extract_ms']:.2f} | {r['ratio']:.3f} | "
                          f"{r['ratio_best']:.3f} | {r['rel']:.3f} | {r['rel_best']:.3f} | {r['f'] + 0.05:.3f} | "
                          f"{r['vs_first']:.3f} | {r['switch_us']:.1f} | {r['macs_switch_us']:.1f} |", flush=True)


if __name__ == "__main__":
    with contextlib.ExitStack() as s:
        main(s)
