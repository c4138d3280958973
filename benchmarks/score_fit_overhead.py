"""What the score fit (skd.score_fit) costs ElasticViT: the same weights with and without random fits stored,
at widths with a fit (r <= R = min(hd // 2, 16)), timed side by side.

Per width: inference (no grad: the bound corrected copy; the GEMM is the same size as without) and a training
step (forward + backward: the corrected rows are recomputed per call from W and b) in ms without and with the
fit, their ratios, the one-off bound plan build of each (with the fit: the corrected copies computed and
bound) and the memory the bound copies hold per plan. Every repeat times both models back to back (A, B, A,
B, ...), medians.

    python -m benchmarks.score_fit_overhead [--model vit_tiny_patch16_224] [--batch 8] [--repeats 15]
        [--threads 1] [--cpu-time]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

from skd import ElasticViT, Subnet, score_fit
from skd.models import adapter_for
from skd.timing import add_cpu_time_option
from skd.timing import clock as timing_clock


def _with_fits(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with a random fit (scale 0.3) on every block's q-producing Linear."""
    out = copy.deepcopy(model)
    for spec in adapter_for(out).blocks:
        big_r = score_fit.fit_ranks(spec.head_dim)
        fit = torch.randn(spec.num_heads, big_r, big_r + 1, big_r) * 0.3 * score_fit.block_mask(big_r)
        score_fit.set_score_fit(score_fit.q_linear(spec), fit, spec.num_heads, spec.head_dim)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    add_cpu_time_option(parser)
    args = parser.parse_args()
    clock = timing_clock(parser, args, args.threads == 1)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model).eval()
    models = {"plain": ElasticViT(copy.deepcopy(base)).eval(), "fit": ElasticViT(_with_fits(base)).eval()}
    hd = models["fit"].head_dims[0]
    big_r = score_fit.fit_ranks(hd)
    x = torch.randn(args.batch, 3, 224, 224)
    print(f"{args.model}, batch {args.batch}, fp32, {args.threads} thread(s), head dim {hd}, fits for r <= {big_r}; "
          f"{'CPU' if args.cpu_time else 'wall'} time, medians of {args.repeats}")
    print("| r | infer ms plain | infer ms fit | fit/plain | train ms plain | train ms fit | fit/plain | "
          "plan build ms plain | fit | bound copies MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted({1, big_r // 2, big_r}):
        subnet = Subnet(attn=[r] * len(models["fit"].head_dims), mlp=list(models["fit"].hiddens))
        build_ms = {}
        for name, elastic in models.items():  # the bound plans, first use: the fit's computes the copies
            start = time.perf_counter()
            elastic._plan(subnet)
            build_ms[name] = (time.perf_counter() - start) * 1e3
        # the bound copies: each block's corrected (3*H*r, D) qkv block and (3*H*r,) bias, fp32
        copies = sum(3 * s.num_heads * r * (s.dim + 1) * 4 for s in models["fit"].adapter.blocks)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for name, elastic in models.items():
                with torch.no_grad():
                    t0 = clock()
                    elastic(x, subnet=subnet)
                    times.setdefault(("infer", name), []).append(clock() - t0)
                elastic.zero_grad()
                t0 = clock()
                elastic(x, subnet=subnet).square().mean().backward()
                times.setdefault(("train", name), []).append(clock() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"| {r} | {med['infer', 'plain']:.1f} | {med['infer', 'fit']:.1f} | "
              f"{med['infer', 'fit'] / med['infer', 'plain']:.3f} | {med['train', 'plain']:.1f} | "
              f"{med['train', 'fit']:.1f} | {med['train', 'fit'] / med['train', 'plain']:.3f} | "
              f"{build_ms['plain']:.2f} | {build_ms['fit']:.2f} | {copies / 2**20:.2f} |")


if __name__ == "__main__":
    main()
