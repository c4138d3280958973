"""torch.compile of an ElasticViT: graphs, compile time and speed vs eager and vs the compiled extract()ed model.

A timm ViT (random init, its own image size: ViT-Ti/S 224 px, the digits ViT 16 px), MACs fractions 1/4,
1/2, 1. The compiled ElasticViT meets the fractions in turn (set_subnet, then a call); each extracted model
is compiled on its own. Per fraction the table gives the graphs Dynamo has built so far (torch._dynamo
counters) and the first call's wall time (compile plus one forward; only the forward and a guard check once
one graph serves every width). Then every repeat times, per fraction, eager elastic, compiled elastic,
compiled extracted and eager extracted back to back, so load from other processes lands on every column
alike; medians are shown.

`--ab-against DIR` instead times the eager elastic forward of this tree against the skd at DIR (e.g. a
checkout of main), in alternating subprocesses (this, DIR, DIR, this, ...), and prints the ratio per
fraction.

    python -m benchmarks.elastic_compile [--model vit_tiny] [--batch 8] [--repeats 7] [--threads 1]
        [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--compile-backend inductor] [--mode MODE]
        [--inference-mode] [--ab-against DIR --rounds 3]

On a GPU, `--device cuda --batch 1 --mode reduce-overhead` measures the captured path for batch-1 serving
(inductor's CUDA graphs) against the compiled extracted models under the same mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import timm
import torch
import torch._functorch.config
import torch._inductor.config
from torch._dynamo.utils import counters

from skd import ElasticViT
from skd.timing import call_ms

FRACTIONS = (1 / 4, 1 / 2, 1.0)
MODELS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224", "digits": "vit_digits"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROOT = Path(__file__).resolve().parents[1]


def _setup(args: argparse.Namespace) -> tuple[ElasticViT, torch.Tensor, list]:
    """The ElasticViT (eval), an input batch and the subnets at FRACTIONS of the MACs."""
    from skd import digits  # noqa: F401  registers vit_digits with timm

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    elastic = ElasticViT(timm.create_model(MODELS[args.model]).to(args.device, dtype).eval()).eval()
    size = elastic.model.patch_embed.img_size
    x = torch.randn(args.batch, elastic.model.patch_embed.proj.in_channels, *size, device=args.device, dtype=dtype)
    return elastic, x, [elastic.set_subnet(macs=f).subnet for f in FRACTIONS]


def _grad_mode(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    # inference_mode also skips the autograd dispatch layer of skd's ops (registered from Python: ~3.5 µs
    # per call even under no_grad), which matters for small models at batch 1
    return torch.inference_mode() if args.inference_mode else torch.no_grad()


def _ms(fn, x: torch.Tensor) -> float:
    return call_ms(lambda: fn(x), x.device)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _first_calls(fns: list, x: torch.Tensor, before_each) -> tuple[list[int], list[float]]:
    """(graphs built so far, first-call seconds) after calling fns[j] after before_each(j), per fraction j."""
    start, graphs, seconds = _graphs(), [], []
    for j, fn in enumerate(fns):
        before_each(j)
        seconds.append(_ms(fn, x) / 1e3)
        graphs.append(_graphs() - start)
    return graphs, seconds


def compile_bench(args: argparse.Namespace) -> None:
    elastic, x, subnets = _setup(args)
    dense = [elastic.extract(s).eval() for s in subnets]
    options = dict(backend=args.compile_backend, mode=args.mode)
    # cold compiles: inductor's on-disk caches (graphs, generated C++) would turn a rerun's compile times into
    # cache loads; an empty cache directory of this run's own (read when inductor first needs it)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    with tempfile.TemporaryDirectory(prefix="skd_elastic_compile_") as cache, _grad_mode(args):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        compiled = torch.compile(elastic, **options)
        e_graphs, e_first = _first_calls([compiled] * len(FRACTIONS), x,
                                         lambda j: elastic.set_subnet(subnet=subnets[j]))
        compiled_dense = [torch.compile(d, **options) for d in dense]
        d_graphs, d_first = _first_calls(compiled_dense, x, lambda j: None)
        columns = {"eager elastic": lambda j: elastic, "compiled elastic": lambda j: compiled,
                   "compiled extracted": lambda j: compiled_dense[j], "eager extracted": lambda j: dense[j]}
        ms = {name: [[] for _ in FRACTIONS] for name in columns}
        for rep in range(args.repeats + 1):  # repeat 0 warms up
            for j, s in enumerate(subnets):
                elastic.set_subnet(subnet=s)
                for name, fn in columns.items():
                    t = _ms(fn(j), x)
                    if rep:
                        ms[name][j].append(t)
    med = {name: [statistics.median(t) for t in times] for name, times in ms.items()}
    print("| f | MACs frac | graphs so far: compiled elastic | compiled extracted | first call s: compiled elastic | "
          "compiled extracted | eager elastic ms | compiled elastic ms | compiled extracted ms | eager extracted ms | "
          "compiled/eager elastic | compiled elastic/compiled extracted | eager elastic/eager extracted |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for j, (f, s) in enumerate(zip(FRACTIONS, subnets, strict=True)):
        ee, ce, cd, ed = (med[n][j] for n in columns)
        print(f"| {f:.3f} | {elastic.macs(s) / elastic.full_macs:.3f} | {e_graphs[j]} | {d_graphs[j]} | "
              f"{e_first[j]:.1f} | {d_first[j]:.1f} | {ee:.2f} | {ce:.2f} | {cd:.2f} | {ed:.2f} | "
              f"{ce / ee:.3f} | {ce / cd:.3f} | {ee / ed:.3f} |", flush=True)
    print(f"first calls in all: compiled elastic {sum(e_first):.1f} s, compiled extracted {sum(d_first):.1f} s")


def eager_only(args: argparse.Namespace) -> None:
    """Prints JSON: per fraction, the median eager elastic forward ms (the --ab-against subprocess)."""
    elastic, x, subnets = _setup(args)
    times = [[] for _ in FRACTIONS]
    with _grad_mode(args):
        for rep in range(args.repeats + 1):
            for j, s in enumerate(subnets):
                elastic.set_subnet(subnet=s)
                t = _ms(elastic, x)
                if rep:
                    times[j].append(t)
    print(json.dumps([statistics.median(t) for t in times]))


def ab_bench(args: argparse.Namespace, passthrough: list[str]) -> None:
    """Eager elastic forward, this tree vs args.ab_against, alternating subprocesses; ratio of medians."""
    trees = {"this": str(ROOT), "other": str(Path(args.ab_against).resolve())}
    results: dict[str, list[list[float]]] = {k: [] for k in trees}
    for i in range(args.rounds):
        for name in (("this", "other") if i % 2 == 0 else ("other", "this")):  # ABBA: no order bias
            env = {**os.environ, "PYTHONPATH": trees[name]}
            out = subprocess.run([sys.executable, __file__, "--eager-only", *passthrough], env=env, check=True,
                                 capture_output=True, text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"eager elastic forward, this tree ({trees['this']}) vs {trees['other']}, {args.rounds} rounds (ABBA)")
    print("| f | this ms | other ms | this/other (ratio of medians) | per-round ratios min–max |")
    print("|---|---|---|---|---|")
    for j, f in enumerate(FRACTIONS):
        a = statistics.median(r[j] for r in results["this"])
        b = statistics.median(r[j] for r in results["other"])
        per_round = [t[j] / o[j] for t, o in zip(results["this"], results["other"], strict=True)]
        print(f"| {f:.3f} | {a:.2f} | {b:.2f} | {a / b:.3f} | {min(per_round):.3f}–{max(per_round):.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny", choices=list(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--inference-mode", action="store_true", help="run under torch.inference_mode (default no_grad)")
    p.add_argument("--ab-against", default=None, metavar="DIR", help="time eager elastic vs the skd at DIR")
    p.add_argument("--rounds", type=int, default=3, help="alternating subprocess rounds of --ab-against")
    p.add_argument("--eager-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.eager_only:
        return eager_only(args)
    passthrough = ["--model", args.model, "--batch", str(args.batch), "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype] + (
        ["--inference-mode"] if args.inference_mode else [])
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{device}; {args.dtype}; mode {args.mode}; torch {torch.__version__}; timm {timm.__version__}; "
          f"{args.model} batch {args.batch}; {args.repeats} repeats; "
          f"{'inference_mode' if args.inference_mode else 'no_grad'}")
    if args.ab_against:
        return ab_bench(args, passthrough)
    return compile_bench(args)


if __name__ == "__main__":
    main()
