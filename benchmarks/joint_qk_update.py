"""What one JointQK.update (skd.wpac(joint_qk=True)'s statistic) costs on real calibration batches: this
checkout's skd/attention_stats.py against the same file at another git revision (`--before`, loaded beside it),
per update, side by side.

The batches' (q, k, v, A, token weights) are captured once from `explicit_forward` (the first and last block
of the first two batches) on the digits ViT (4 batches of 128 images: (S, H, N, hd) = (128, 3, 65, 32)) and
all-MiniLM-L6-v2 (batches of 32 sentences: (32, 12, 56, 32), padded); every repeat runs all captures with
the old and then the new update (A, B, A, B, ...), timing process CPU time per update; medians (the first two
repeats are warm-up), their ratio, and each version's largest relative error (to the largest entry) of the
moments and of the covariances C_q + C_k after one pass over the captures, against a float64 reference (this
checkout's update on float64 copies).

    python -m benchmarks.joint_qk_update [--before e5c578a] [--repeats 20] [--models "digits ViT" MiniLM]

One torch thread (process CPU time would count other threads' spin-waits).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from benchmarks.compensation_cost import MODELS
from skd.attention_stats import JointQK, explicit_forward
from skd.models import BlockSpec, adapter_for


def _revision_module(revision: str) -> ModuleType:
    """skd/attention_stats.py at git `revision`, imported as a module of the skd package (its relative imports
    resolve to this checkout's modules)."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{revision}:skd/attention_stats.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("skd._attention_stats_before", f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def _captures(name: str) -> tuple[list[BlockSpec], list[tuple]]:
    """The model's blocks and (block, q, k, v, A, w) of its first and last block on its first two batches."""
    model, data, _ = MODELS[name]()
    adapter = adapter_for(model)
    last = len(adapter.blocks) - 1
    out = []

    class Capture:
        def update(self, i, q, k, v, a, w):
            if i in (0, last):
                out.append((i, *(None if t is None else t.clone() for t in (q, k, v, a, w))))

        def tensors(self):
            return []

    with torch.no_grad():
        for b, batch in enumerate(data):
            if b == 2:
                break
            explicit_forward(adapter, batch, [Capture()])
    return adapter.blocks, out


def _errors(classes: dict[str, type], blocks: list[BlockSpec], captures: list[tuple]
            ) -> dict[str, tuple[float, float]]:
    """Per class: the largest relative error (to the largest entry) of its moments and of its C_q + C_k over
    one pass of `captures`, against this checkout's JointQK on float64 copies of them."""
    reference = JointQK(blocks, torch.device("cpu"))
    accs = {label: cls(blocks, torch.device("cpu")) for label, cls in classes.items()}
    with torch.no_grad():
        for capture in captures:
            reference.update(capture[0], *(None if t is None else t.double() for t in capture[1:]))
            for acc in accs.values():
                acc.update(*capture)
    seen = {c[0] for c in captures}

    def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
        return float((got - ref).abs().max() / ref.abs().max())

    return {label: (max(rel(a, b) for i in seen for n in "qk"
                        for a, b in zip(acc.moments[i][n], reference.moments[i][n], strict=True)),
                    max(rel(acc.covariance(i), reference.covariance(i)) for i in seen))
            for label, acc in accs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="e5c578a", help="git revision of the old skd/attention_stats.py")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    before = _revision_module(args.before)
    rows = []
    for name in args.models:
        blocks, captures = _captures(name)
        accs = {"before": before.JointQK(blocks, torch.device("cpu")), "after": JointQK(blocks, torch.device("cpu"))}
        times: dict[str, list[float]] = {label: [] for label in accs}
        with torch.no_grad():
            for r in range(args.repeats + 2):
                for label, acc in accs.items():
                    t0 = time.process_time()
                    for capture in captures:
                        acc.update(*capture)
                    if r >= 2:
                        times[label].append((time.process_time() - t0) / len(captures) * 1e3)
        errors = _errors({label: type(acc) for label, acc in accs.items()}, blocks, captures)
        old, new = (statistics.median(times[label]) for label in accs)
        shape = tuple(captures[0][1].shape)
        rows.append(f"| {name} {shape} | {old:.2f} ms | {new:.2f} ms | {new / old:.2f} | "
                    + " | ".join(f"{errors[label][0]:.1e} / {errors[label][1]:.1e}" for label in accs) + " |")
    print(f"JointQK.update, process CPU time per update, 1 thread, medians of {args.repeats}")
    print(f"| model (S, H, N, hd) | {args.before} | this checkout | ratio | error {args.before}: moments / C_q + C_k "
          "| error this checkout |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
