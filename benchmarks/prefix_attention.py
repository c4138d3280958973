"""prefix_attention vs the extracted dense model's attention and vs the copy path, side by side in one run (CPU).

    python -m benchmarks.prefix_attention                 # ViT-Ti/S/B, r = hd/4, hd/2, hd, fp32 + bf16,
                                                          # batch 1 and 8, threads 1 and 2
    python -m benchmarks.prefix_attention --quick         # ViT-S only, threads 1
    python -m benchmarks.prefix_attention --threads 1 --cpu-time   # process CPU time instead of wall time:
                                                          # stable on a shared (oversubscribed) machine
    python -m benchmarks.prefix_attention --threads 1 --widths 15 21 31 42 64   # the widths ElasticViT's
                                                          # MACs fractions 1/4 ... 1 give ViT-S/B (odd ones too)

Dense: what the extract()ed model of the same width runs per block (timm's Attention): its qkv Linear's
head-major (S, N, 3*H*r) output reshaped and permuted to per-head views, SDPA(scale=), transposed back to
(S, N, H*r). The target: op / dense <= 1.
Today's path (skd.ElasticViT._attention before this op, and the separate-q/k/v path now): the qkv prefix
GEMM's (S, N, r*3H) rank-major output is copied per token to head-major order, SDPA(scale=) runs on
per-head views, and the result is permuted back to the proj's rank-major columns. The op reads and writes
those layouts directly. Each row times the three interleaved (round-robin, median over rounds) on inputs
of the same size, so machine noise hits them alike, and prints op / dense (lower is better: <= 1 means the
elastic attention is as fast as the dense model's) and today / op (> 1: the op is faster than the copy).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import skd_kernels
from skd.timing import add_cpu_time_option
from skd.timing import clock as timing_clock
from skd_kernels.ops import prefix_attention as prefix_attention_op

TOKENS = 197
HEAD_DIM = 64
MODELS = {"vit_ti": 3, "vit_s": 6, "vit_b": 12}  # heads (head_dim 64)


def todays_path(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """(S, N, r*3H) rank-major -> copy to head-major -> SDPA -> (S, N, r*H) rank-major (the op's `via_sdpa`)."""
    return prefix_attention_op.via_sdpa(qkv, num_heads, scale)


def dense_path(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """(S, N, 3*H*r) head-major (timm's qkv Linear) -> per-head views -> SDPA -> (S, N, H*r)."""
    s, n, c = qkv.shape
    h, r = num_heads, c // (3 * num_heads)
    q, k, v = qkv.reshape(s, n, 3, h, r).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(s, n, h * r)


def side_by_side(fns: list[Callable[[], object]], clock: Callable[[], float] = time.perf_counter, rounds: int = 15,
                 min_s: float = 0.02) -> list[float]:
    """Seconds per call of each fn on `clock`: calls interleaved round-robin, the median over rounds."""
    for fn in fns:
        fn()  # warm up
    reps = []
    for fn in fns:  # calls per sample so that one sample lasts about min_s
        t0 = clock()
        fn()
        reps.append(max(1, int(min_s / max(clock() - t0, 1e-6))))
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, n, out in zip(fns, reps, samples, strict=True):
            t0 = clock()
            for _ in range(n):
                fn()
            out.append((clock() - t0) / n)
    return [statistics.median(s) for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ViT-S only, one thread")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="CPU thread counts (default 1 2)")
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="per-head widths r (default hd/4, hd/2, hd = 16 32 64)")
    add_cpu_time_option(parser)
    args = parser.parse_args()
    models = {"vit_s": MODELS["vit_s"]} if args.quick else MODELS
    threads = args.threads or ([1] if args.quick else [1, 2])
    clock = timing_clock(parser, args, threads == [1])
    print(f"clock: {'process CPU time' if args.cpu_time else 'wall'}")
    scale = HEAD_DIM**-0.5
    print(f"{'model':7} {'thr':>3} {'batch':>5} {'r':>3} {'dtype':9} {'dense ms':>9} {'today ms':>9} {'op ms':>8} "
          f"{'op/dense':>8} {'today/op':>8}")
    vs_dense, vs_today = [], []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for model, heads in models.items():
            for batch in (1, 8):
                for r in args.widths or (HEAD_DIM // 4, HEAD_DIM // 2, HEAD_DIM):
                    for dtype in (torch.float32, torch.bfloat16):
                        qkv = torch.randn(batch, TOKENS, r * 3 * heads).to(dtype)
                        torch.testing.assert_close(skd_kernels.prefix_attention(qkv, heads, scale),
                                                   todays_path(qkv, heads, scale), rtol=2e-2, atol=2e-2)
                        call = (qkv, heads, scale)
                        paths = (dense_path, todays_path, skd_kernels.prefix_attention)
                        t_dense, t_today, t_op = side_by_side([functools.partial(f, *call) for f in paths], clock)
                        vs_dense.append(t_op / t_dense)
                        vs_today.append(t_today / t_op)
                        print(f"{model:7} {n_threads:3d} {batch:5d} {r:3d} {str(dtype)[6:]:9} {t_dense * 1e3:9.3f} "
                              f"{t_today * 1e3:9.3f} {t_op * 1e3:8.3f} {t_op / t_dense:8.2f} {t_today / t_op:8.2f}",
                              flush=True)
    print(f"geometric mean over {len(vs_dense)} rows: op/dense {statistics.geometric_mean(vs_dense):.3f}, "
          f"today/op {statistics.geometric_mean(vs_today):.3f}")

if __name__ == "__main__":
    main()
