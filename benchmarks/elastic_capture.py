"""Serving on a GPU: ElasticViT captured as CUDA graphs (`ElasticViT.capture`) vs eager, and vs its extract()ed
dense model captured the same way (skd.elastic.CapturedForward).

Per MACs fraction (1/4, 1/2, 1): capture time, then ms per call of eager elastic, captured elastic, captured
elastic with frozen attention weights (`capture(frozen=True)`: head-major copies made at capture, no per-call
reordering), eager extracted and captured extracted, timed back to back in every repeat (medians), and the
ratios captured elastic / captured extracted, the same frozen (the issue-14 GPU target: <= 1.05) and captured /
eager elastic.

    python -m benchmarks.elastic_capture [--models vit_small] [--batches 1 64] [--dtype bf16] [--repeats 5]
        [--calls 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from skd import ElasticViT
from skd.elastic import CapturedForward
from skd.timing import synchronize

FRACTIONS = (1 / 4, 1 / 2, 1.0)
MODELS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _ms(fn, x: torch.Tensor, calls: int) -> float:
    synchronize(x.device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    synchronize(x.device)
    return (time.perf_counter() - t0) / calls * 1e3


def bench(name: str, batch: int, dtype: torch.dtype, repeats: int, calls: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(MODELS[name]).to("cuda", dtype).eval()
    elastic = ElasticViT(model).eval()
    x = torch.randn(batch, *model.pretrained_cfg["input_size"], device="cuda", dtype=dtype)
    rows = []
    with torch.no_grad():
        for f in FRACTIONS:
            subnet = elastic.set_subnet(macs=f).subnet
            dense = elastic.extract(subnet).eval()
            t0 = time.perf_counter()
            captured = elastic.capture(x)
            seconds = time.perf_counter() - t0
            columns = {"eager elastic": elastic, "captured elastic": captured,
                       "captured frozen": elastic.capture(x, frozen=True), "eager extracted": dense,
                       "captured extracted": CapturedForward(dense, dense, (x,), {})}
            times: dict[str, list[float]] = {c: [] for c in columns}
            for rep in range(repeats + 1):  # repeat 0 warms up
                for c, fn in columns.items():
                    t = _ms(fn, x, calls)
                    if rep:
                        times[c].append(t)
            med = {c: statistics.median(t) for c, t in times.items()}
            rows.append((f, subnet, seconds, med))
    print(f"\n{name}, batch {batch}, {dtype}: ms per call, medians of {repeats} x {calls} calls")
    print("| f | widths (hd/hidden) | capture s | eager elastic | captured elastic | captured frozen | "
          "eager extracted | captured extracted | captured elastic/captured extracted | "
          "captured frozen/captured extracted | captured/eager elastic |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f, subnet, seconds, med in rows:
        ee, ce, cf, ed, cd = (med[c] for c in ("eager elastic", "captured elastic", "captured frozen",
                                               "eager extracted", "captured extracted"))
        print(f"| {f:.3f} | {subnet.attn[0]}/{subnet.mlp[0]} | {seconds:.3f} | {ee:.3f} | {ce:.3f} | {cf:.3f} | "
              f"{ed:.3f} | {cd:.3f} | {ce / cd:.3f} | {cf / cd:.3f} | {ce / ee:.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit_small"], choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("CUDA graphs need a CUDA device (on CPU see benchmarks/elastic_compile.py)")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; timm {timm.__version__}")
    for name in args.models:
        for batch in args.batches:
            bench(name, batch, DTYPES[args.dtype], args.repeats, args.calls)


if __name__ == "__main__":
    main()
