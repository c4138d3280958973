"""`skd demo`: the whole method on the built-in digits, end to end, with a table, plots and a report.

Train (or load the cached) digits ViT → WPAC → PIAD; then accuracy, MACs and latency at several budgets
for the PIAD super-network against WPAC alone and a Taylor-ordered baseline (both without training).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import io
from ._atomic import atomic_path
from .digits import load_digits_split, pretrained_digits_vit
from .elastic import ElasticViT
from .evaluate import evaluate_budgets
from .piad import PIADTrainer
from .plots import plot_lines
from .wpac import wpac

BUDGETS = (0.15, 0.25, 1 / 3, 0.5, 2 / 3, 1.0)
LATENCY_BATCH = 64


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run; `quick()` is a smoke version for tests. The target sits below 1/3 of the MACs
    because on the digits WPAC alone already holds up at 1/3: the methods separate further down."""

    calib_samples: int = 1024
    proxy_samples: int = 512
    epochs: int = 20
    progressive_epochs: int = 6
    target_macs: float = 0.15
    budgets: tuple[float, ...] = BUDGETS

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(calib_samples=256, proxy_samples=128, epochs=1, progressive_epochs=1, target_macs=1 / 3,
                   budgets=(1 / 3, 1.0))


def format_table(results: dict[str, list[dict[str, float]]]) -> str:
    """A Markdown table: one row per (method, budget)."""
    lines = ["| method | budget | MACs (M) | MACs fraction | accuracy (%) | latency (ms) |",
             "|---|---|---|---|---|---|"]
    for method, rows in results.items():
        for r in rows:
            lines.append(f"| {method} | {r['budget']:.3g} | {r['macs'] / 1e6:.2f} | {r['macs_fraction']:.3f} "
                         f"| {100 * r['accuracy']:.1f} | {r.get('latency_ms', float('nan')):.2f} |")
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def run_demo(out: str | os.PathLike = "skd-demo", config: DemoConfig | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Runs the demo, writes results.json, two PNG plots, the saved super-network (supernet.safetensors)
    and report.md into `out`, and returns the results dict."""
    config = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, test = load_digits_split()
    base = pretrained_digits_vit(progress=progress)
    calib = DataLoader(train, batch_size=64)

    stratified = wpac(copy.deepcopy(base), calib, num_samples=config.calib_samples, progress=progress)
    taylor = wpac(copy.deepcopy(base), calib, num_samples=config.calib_samples, criterion="taylor",
                  progress=progress)
    trainer = PIADTrainer(ElasticViT(copy.deepcopy(stratified)), train, test, target_macs=config.target_macs,
                          epochs=config.epochs, progressive_epochs=config.progressive_epochs,
                          proxy_samples=config.proxy_samples, progress=progress)
    supernet = trainer.fit()
    io.save(supernet, out / "supernet.safetensors")

    models = {"PIAD (WPAC + PIAD)": supernet, "WPAC only": ElasticViT(stratified),
              "Taylor order": ElasticViT(taylor)}
    results = {name: evaluate_budgets(m, test, config.budgets, latency_batch=LATENCY_BATCH, progress=progress)
               for name, m in models.items()}
    table = format_table(results)
    # Latencies are only meaningful with where they were measured: the device and its thread count.
    device = next(supernet.parameters()).device
    where = f"{device.type}, {torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    summary = {"config": config.__dict__ | {"budgets": list(config.budgets)}, "results": results,
               "latency": {"device": where, "batch": LATENCY_BATCH},
               "dropout_list_units": len(supernet.dropout_list), "seconds": time.perf_counter() - t0}
    _write_text(out / "results.json", json.dumps(summary, indent=2))
    for key, ylabel, name in (("accuracy", "top-1 accuracy (%)", "accuracy_vs_macs.png"),
                              ("latency_ms", f"latency (ms, batch {LATENCY_BATCH}, {where})", "latency_vs_macs.png")):
        scale = 100 if key == "accuracy" else 1
        plot_lines({m: [(r["macs_fraction"], scale * r[key]) for r in rows] for m, rows in results.items()},
                   out / name, xlabel="fraction of the full model's MACs", ylabel=ylabel,
                   title=f"digits ViT: {key.replace('_ms', '')} vs MACs")
    _write_text(out / "report.md", "\n".join([
        "# skd demo: digits ViT", "",
        f"WPAC on {config.calib_samples} calibration samples, then PIAD for {config.epochs} epochs "
        f"(dropout list grown over {config.progressive_epochs}, target {config.target_macs:.2f} of the MACs). "
        "WPAC only and Taylor order are evaluated without training, with uniform widths. Latency: median "
        f"forward time of a batch of {LATENCY_BATCH} held-out digits on {where} (other work on the machine "
        "slows it).", "",
        table, "", "![accuracy vs MACs](accuracy_vs_macs.png)", "", "![latency vs MACs](latency_vs_macs.png)", ""]))
    print(table)
    print(f"\nwrote {out}/: results.json, accuracy_vs_macs.png, latency_vs_macs.png, supernet.safetensors, report.md")
    return summary
