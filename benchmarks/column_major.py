"""Column-major input-truncated weights (skd/elastic/layout.py): what storing proj/fc2 column-major gains.

ElasticViT stores every weight whose elastic prefix is a block of columns (attention output projection, MLP
fc2) column-major, so W[:, :k] is one contiguous block. Three tables, each pair timed interleaved (A, B, A,
B, ...) in one run, medians of per-repeat ratios (< 1: the first is faster):

  gemm     routes on W[:, :k], each / F.linear on a contiguous copy of the block (what an extracted model
           runs), ViT-S/B proj and fc2 shapes, M = 197 x batch rows (batch 1 and 8), fp32 and bf16, no grad:
           F.linear on the block of a row-major and of a column-major weight, oneDNN's linear
           (mkldnn::_linear_pointwise, CPU only) and torch.matmul on the column-major block, and the bound
           prefix_linear ElasticViT's plans run (oneDNN for bf16, F.linear for fp32). With --device cuda
           each sample ends with a synchronize: at batch 1 a GEMM's kernel is shorter than its launch, so the
           ratio is the host's (what an ElasticViT forward on a GPU is bound by), at batch 64 the GPU's.
  elastic  ElasticViT forward, column-major (as wrapped) / the same model with those weights re-strided
           row-major (the layout before this change), no grad, MACs fractions 1/4 ... 1.
  piad     one PIAD training step (forward, backward, fused AdamW step), column-major / row-major, at the
           full width and 1/3 of the MACs.

    python -m benchmarks.column_major --threads 1 [--tables gemm elastic piad] [--repeats 7] [--cpu-time]
        [--device cpu|cuda (gemm only)] [--dtypes fp32 bf16] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F

import skd
from skd.elastic.layout import store_columns_
from skd.piad.recipe import build_optimizer
from skd.timing import add_device_options, call_ms, device_clock, synchronize
from skd_kernels.ops.prefix_linear import bind

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (d, hidden) of ViT-S and ViT-B
SHAPES = {"vit_s": (384, 1536), "vit_b": (768, 3072)}
MODELS = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}
FRACTIONS = (1 / 4, 1 / 3, 1 / 2, 2 / 3, 1.0)


# time.perf_counter, or time.process_time with --cpu-time (stable on an oversubscribed machine, 1 thread)
CLOCK = [time.perf_counter]


# the gemm table's device, synchronised around each sample: on a GPU a sample ends when its kernels have run
DEVICE: list[torch.device | None] = [None]


def _ms(fn: Callable[[], object], min_s: float = 0.02) -> float:
    """Milliseconds per call of fn, over enough back-to-back calls to last min_s."""
    clock, device = CLOCK[0], DEVICE[0]
    once = call_ms(fn, device, clock) / 1e3
    n = max(1, round(min_s / max(once, 1e-7)))
    t0 = clock()
    for _ in range(n):
        fn()
    synchronize(device)
    return (clock() - t0) / n * 1e3


def side_by_side(fns: dict[str, Callable[[], object]], repeats: int, min_s: float = 0.02) -> dict[str, list[float]]:
    """ms per call of each fn, `repeats` samples taken round-robin (after one warm-up round)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_ms(fn, min_s))
    return times


def _ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repeats of a's time / b's time (same repeat: the same load)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def _routes(x: torch.Tensor, w: torch.Tensor, w_col: torch.Tensor, b: torch.Tensor,
            k: int) -> dict[str, Callable[[], object]]:
    """x (M, k) through the first k columns of w (row-major (out, in)) and of w_col (the same, column-major)."""
    blk, blk_col, contiguous = w[:, :k], w_col[:, :k], w[:, :k].contiguous()
    bound = bind(w_col, b, k_in=k)
    routes = {"contiguous": lambda: F.linear(x, contiguous, b),
              "row": lambda: F.linear(x, blk, b),
              "col": lambda: F.linear(x, blk_col, b),
              "onednn": lambda: torch.ops.mkldnn._linear_pointwise.default(x, blk_col, b, "none", [], ""),
              "matmul": lambda: torch.matmul(x, blk_col.t()).add_(b),
              "bound": lambda: bound(x)}
    if not x.is_cpu:
        del routes["onednn"]
    return routes


def gemm_table(repeats: int, device: torch.device, dtypes: list[str], batches: list[int]) -> None:
    print("\n## gemm: time / F.linear on the contiguous block (no grad; <= 1.02 is the issue-14 target)\n")
    print("| shape | dtype | M | k/in | F.linear row-major W[:, :k] | F.linear col-major | oneDNN linear col-major | "
          "matmul col-major | bound prefix_linear col-major (ElasticViT's) | contiguous ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, (d, m) in SHAPES.items():
        for layer, (out_f, in_f) in (("proj", (d, d)), ("fc2", (d, m))):
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                for rows in (197 * b for b in batches):
                    w = torch.randn(out_f, in_f, dtype=dtype, device=device) * in_f**-0.5
                    w_col = w.t().contiguous().t()
                    b = torch.randn(out_f, dtype=dtype, device=device)
                    for frac in (1 / 4, 1 / 2, 1.0):
                        k = round(frac * in_f)
                        fns = _routes(torch.randn(rows, k, dtype=dtype, device=device), w, w_col, b, k)
                        with torch.inference_mode():
                            t = side_by_side(fns, repeats)
                        r = {k2: f"{_ratio(t, k2, 'contiguous'):.3f}" for k2 in fns}
                        print(f"| {model}.{layer} ({out_f}, {in_f}) | {dtype_name} | {rows} | {frac:.2f} | "
                              f"{r['row']} | {r['col']} | {r.get('onednn', '—')} | {r['matmul']} | "
                              f"{r['bound']} | {statistics.median(t['contiguous']):.3f} |", flush=True)


def _pair(name: str, dtype: torch.dtype, train: bool) -> tuple[skd.ElasticViT, skd.ElasticViT]:
    """(column-major ElasticViT as wrapped, the same weights with proj/fc2 re-strided row-major)."""
    torch.manual_seed(0)
    model = timm.create_model(MODELS[name]).to(dtype)
    col, row = skd.ElasticViT(copy.deepcopy(model)), skd.ElasticViT(model)
    store_columns_(row.adapter.blocks, column_major=False)
    assert row.adapter.blocks[0].fc2.weight.is_contiguous() and col.adapter.blocks[0].fc2.weight.t().is_contiguous()
    return col.train(train), row.train(train)


def elastic_table(repeats: int, models: list[str], batches: list[int]) -> None:
    print("\n## elastic: ElasticViT forward, column-major / row-major proj+fc2 (no grad)\n")
    print("| model | batch | dtype | " + " | ".join(f"f = {f:.2f}" for f in FRACTIONS) + " |")
    print("|---|---|---|" + "---:|" * len(FRACTIONS))
    for name in models:
        for dtype_name, dtype in DTYPES.items():
            col, row = _pair(name, dtype, train=False)
            for batch in batches:
                x = torch.randn(batch, 3, 224, 224, dtype=dtype)
                cells = []
                for f in FRACTIONS:
                    col.set_subnet(macs=f)
                    row.set_subnet(subnet=col.subnet)
                    with torch.no_grad():
                        t = side_by_side({"col": functools.partial(col, x), "row": functools.partial(row, x)},
                                         repeats, min_s=0.0)
                    cells.append(_ratio(t, "col", "row"))
                print(f"| {name} | {batch} | {dtype_name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |",
                      flush=True)


def piad_table(repeats: int, batch: int) -> None:
    print(f"\n## piad: training step (forward, backward, fused AdamW), column-major / row-major, ViT-S batch "
          f"{batch}, fp32\n")
    print("| MACs fraction | col-major ms | row-major ms | col / row |")
    print("|---:|---:|---:|---:|")
    col, row = _pair("vit_small", torch.float32, train=True)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    opts = {id(e): build_optimizer(e, "adamw", lr=1e-4, weight_decay=0.05) for e in (col, row)}

    def step(e: skd.ElasticViT) -> None:
        loss = F.cross_entropy(e(x), y)
        opts[id(e)].zero_grad(set_to_none=True)
        loss.backward()
        opts[id(e)].step()

    for f in (1.0, 1 / 3):
        col.set_subnet(macs=f)
        row.set_subnet(subnet=col.subnet)
        t = side_by_side({"col": lambda: step(col), "row": lambda: step(row)}, repeats, min_s=0.0)
        print(f"| {f:.3f} | {statistics.median(t['col']):.1f} | {statistics.median(t['row']):.1f} | "
              f"{_ratio(t, 'col', 'row'):.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables", nargs="+", choices=("gemm", "elastic", "piad"), default=["gemm", "elastic", "piad"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--piad-batch", type=int, default=16)
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES), help="the gemm table's")
    add_device_options(ap)  # --device: the gemm table's
    args = ap.parse_args()
    CLOCK[0] = device_clock(ap, args)
    device = torch.device(args.device)
    if device.type == "cuda":
        if set(args.tables) != {"gemm"}:
            ap.error("--device cuda runs the gemm table alone")
        DEVICE[0] = device
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{where}, {'process CPU' if args.cpu_time else 'wall'} time, medians of {args.repeats} interleaved repeats")
    if "gemm" in args.tables:
        gemm_table(args.repeats, device, args.dtypes, args.batches)
    if "elastic" in args.tables:
        elastic_table(args.repeats, args.models, args.batches)
    if "piad" in args.tables:
        piad_table(args.repeats, args.piad_batch)


if __name__ == "__main__":
    main()
