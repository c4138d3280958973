"""PIAD ablation on the digits: accuracy at 1/3, 1/2, 2/3 and 1 of the MACs for piad and the four baselines.

Each method starts from the same WPAC-stratified digits ViT and trains with the same recipe; piad is
evaluated along its Dropout List, the baselines at uniform widths. Prints a Markdown table and writes
a PNG plot. Usage: python -m benchmarks.piad_ablation [--epochs 3] [--progressive-epochs 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import skd
from skd.digits import accuracy, load_digits_split, pretrained_digits_vit
from skd.piad import METHODS, PIADTrainer

BUDGETS = (1 / 3, 1 / 2, 2 / 3, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--progressive-epochs", type=int, default=2)
    ap.add_argument("--target", type=float, default=1 / 3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args()
    train, test = load_digits_split()
    base = skd.wpac(pretrained_digits_vit(progress=False), train, num_samples=512, progress=False)
    wpac_only = skd.ElasticViT(copy.deepcopy(base))
    results = {"wpac only (no training)": {f: accuracy(wpac_only.set_subnet(macs=f), test) for f in BUDGETS}}
    for method in METHODS:
        t0 = time.perf_counter()
        trainer = PIADTrainer(copy.deepcopy(base), train, target_macs=args.target, epochs=args.epochs,
                              progressive_epochs=args.progressive_epochs, method=method, batch_size=64,
                              proxy_samples=256, lr=5e-4, warmup_epochs=0, mixup=0, cutmix=0, progress=False)
        trainer.fit()
        results[method] = {f: r["accuracy"] for f, r in trainer.evaluate(test, budgets=BUDGETS).items()}
        print(f"{method}: {time.perf_counter() - t0:.0f} s", flush=True)
    header = "| method | " + " | ".join(f"{f:.3g} MACs" for f in BUDGETS) + " |"
    print(f"\ndigits, {args.epochs} epochs (P_e {args.progressive_epochs}), target {args.target:.3g}\n")
    print(header + "\n|---|" + "---|" * len(BUDGETS))
    for name, accs in results.items():
        print(f"| {name} | " + " | ".join(f"{100 * accs[f]:.1f}" for f in BUDGETS) + " |")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, accs in results.items():
        ax.plot(BUDGETS, [100 * accs[f] for f in BUDGETS], marker="o", label=name)
    ax.set_xlabel("MACs fraction")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("PIAD ablation, digits ViT")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "piad_ablation.png", dpi=120)


if __name__ == "__main__":
    main()
