"""PIAD's defaults on a short run: the digits ViT, WPAC first, then PIADTrainer with its default recipe.

Prints top-1 at the list target and at full width for WPAC alone (no training, uniform widths at the
list's MACs) and after PIAD. Overrides for trying recipes: --set mixup=0.8 --set lr=1e-4 ...;
--teacher distils from the original model.
Usage: python -m benchmarks.piad_short_run [--epochs 10] [--target 0.15] [--teacher] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import ast
import copy
import time

import torch

import skd
from skd.digits import accuracy, load_digits_split, pretrained_digits_vit
from skd.piad import PIADTrainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--target", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", action="store_true", help="distil from the original model (teacher=)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a PIADTrainer keyword")
    args = ap.parse_args()
    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    train, test = load_digits_split()
    base = pretrained_digits_vit(progress=False)
    full_before = accuracy(base, test)
    stratified = skd.wpac(copy.deepcopy(base), train, num_samples=512, progress=False)
    t0 = time.perf_counter()
    trainer = PIADTrainer(skd.ElasticViT(copy.deepcopy(stratified)), train, test, target_macs=args.target,
                          epochs=args.epochs, seed=args.seed, progress=False,
                          teacher=copy.deepcopy(base) if args.teacher else None, **overrides)
    trainer.fit()
    seconds = time.perf_counter() - t0
    frac = trainer.list_macs_fraction()
    wpac_alone = skd.ElasticViT(stratified).eval()
    res = trainer.evaluate(test, budgets=(frac, 1.0))
    print(f"digits ViT, {args.epochs} epochs, target {args.target}, teacher {args.teacher}, "
          f"overrides {overrides or 'none'}, "
          f"seed {args.seed}, {torch.get_num_threads()} threads, {seconds:.0f} s")
    print("| model | top-1 at list target | top-1 full |\n|---|---|---|")
    print(f"| original model | - | {100 * full_before:.1f} |")
    print(f"| WPAC alone | {100 * accuracy(wpac_alone.set_subnet(macs=frac), test):.1f} "
          f"| {100 * accuracy(wpac_alone.set_subnet(macs=1.0), test):.1f} |")
    print(f"| WPAC + PIAD | {100 * res[frac]['accuracy']:.1f} | {100 * res[1.0]['accuracy']:.1f} |")
    print(f"list target: {frac:.3f} of the MACs; history: {trainer.history}")


if __name__ == "__main__":
    main()
