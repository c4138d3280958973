"""WPAC vs the paper's pruning criteria (and "wpac+") on the digits ViT: our reproduction of the paper's
comparison (DeiT-B: WPAC 41.8 / 76.9 / 81.2 vs Taylor 6.0 / 52.4 / 78.1 at 1/4, 2/4, 3/4 of attention dims).

Each criterion transforms a copy of the trained `vit_digits`, calibrated on `--draws` disjoint slices of N
training samples (the spread over draws says which gaps are real), then the test accuracy is measured with
the leading fraction f of the dims kept in one of five modes:
  attn: every head's q, k, v and proj dims (through ElasticViT, the product's own truncation);
  qk / vo: only the q/k dims, or only the v/proj dims, of every head (MLP and the other pair full);
  mlp: only the MLP hidden units (attention full); all: attention dims and MLP units together.
qk, vo and mlp cannot be expressed as an skd Subnet (q, k and v share one width), so they zero the
dropped rows/columns of a copy of the transformed model, which is exact for "keep the first r dims".
"none" is the untransformed model truncated. A criterion suffixed "/comp", "/attn" or "/mlp" runs
skd.wpac(..., compensate=True, "attn" or "mlp"): truncation adds the dropped dims' mean contribution to the
output bias (skd.compensation; in the zeroing modes too); "/cross" and "/attn-cross" are "/comp" and
"/attn" with cross_head=True (the output projection also predicts its dropped dims from the kept ones);
"wpac+/cross-joint" (and "/attn-cross-joint") adds joint_qk=True (Q/K rotated by the output-sensitivity-weighted
statistic) and "wpac+/cross-joint-fit" (and "/attn-cross-joint-fit") also score_fit=True (the kept q rows
predict the dropped score part: ElasticViT applies the stored fit in "attn", the zeroing modes apply it to the
kept q rows here).
Prints Markdown tables (accuracy %, mean [min, max] over the draws) and writes a PNG plot of the attn mode.

    python -m benchmarks.wpac_quality [--samples 512] [--draws 3] [--modes attn qk vo mlp all]
        [--fractions 0.0625 0.125 0.25 0.5 0.75 1] [--criteria none wpac wpac+ wpac+/comp wpac+/attn-cross ...]
        [--plot PATH]
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import skd
from skd import compensation, score_fit
from skd.digits import accuracy, load_digits_split, pretrained_digits_vit
from skd.models import adapter_for
from skd.wpac import CRITERIA

# criterion label suffix -> skd.wpac's compensation arguments
COMPENSATE_SUFFIXES: dict[str, dict[str, bool | str]] = {
    "/comp": {"compensate": True}, "/attn": {"compensate": "attn"}, "/mlp": {"compensate": "mlp"},
    "/cross": {"compensate": True, "cross_head": True}, "/attn-cross": {"compensate": "attn", "cross_head": True},
    "/cross-joint": {"compensate": True, "cross_head": True, "joint_qk": True},
    "/cross-joint-fit": {"compensate": True, "cross_head": True, "joint_qk": True, "score_fit": True},
    "/attn-cross-joint": {"compensate": "attn", "cross_head": True, "joint_qk": True},
    "/attn-cross-joint-fit": {"compensate": "attn", "cross_head": True, "joint_qk": True, "score_fit": True}}
LABELS = ("none", *CRITERIA, *(c + suffix for c in CRITERIA for suffix, kwargs in COMPENSATE_SUFFIXES.items()
                               if c == "wpac+" or not kwargs.get("joint_qk")))  # joint_qk: wpac+ only


def parse_label(label: str) -> tuple[str, dict[str, bool | str]]:
    """"wpac+/attn" -> ("wpac+", {"compensate": "attn"}); "wpac" -> ("wpac", {})."""
    for suffix, kwargs in COMPENSATE_SUFFIXES.items():
        if label.endswith(suffix):
            return label.removesuffix(suffix), kwargs
    return label, {}

DEFAULT_PLOT = Path(__file__).with_name("wpac_quality.png")
MODES = ("attn", "qk", "vo", "mlp", "all")


def truncated(bare: nn.Module, qk: float, vo: float, mlp: float) -> nn.Module:
    """A copy of the head-major timm model keeping the leading fraction qk of every head's q and k dims,
    vo of its v and proj dims, and mlp of the MLP units (at least one of each); the rest zeroed. Where the
    model stores bias compensation's input means, the dropped proj/fc2 columns' mean contribution is added
    to their bias (cross-head compensation's correction of the kept proj columns too, where stored); where it
    stores a score fit (skd.score_fit), the kept q rows absorb the fit of their width."""
    m = copy.deepcopy(bare)
    with torch.no_grad():
        for spec in adapter_for(m).blocks:
            h, hd = spec.num_heads, spec.head_dim
            r_qk, r_vo, r_mlp = (max(1, math.floor(f * n + 1e-9)) for f, n in ((qk, hd), (vo, hd), (mlp, spec.hidden)))
            dropped = ((spec.proj, (torch.arange(h * hd) % hd >= r_vo)), (spec.fc2, torch.arange(spec.hidden) >= r_mlp))
            for lin, mask in dropped:
                mean = compensation.input_mean(lin)
                if compensation.input_cov(lin) is not None and bool(mask.any()):
                    _cross_head_(lin, ~mask)
                elif mean is not None:
                    lin.bias += lin.weight @ (mean * mask.to(mean))
                compensation.set_input_mean(lin, None)
            w = spec.qkv.weight.view(3, h, hd, -1)
            fit = score_fit.score_fit(spec.qkv)
            if fit is not None and r_qk < hd:
                b = None if spec.qkv.bias is None else spec.qkv.bias.view(3, h, hd)[0, :, :r_qk]
                w_q, b_q = score_fit.corrected_q(w[0, :, :r_qk], b, fit, r_qk)
                w[0, :, :r_qk] = w_q
                if b is not None:
                    b.copy_(b_q)
            w[:2, :, r_qk:] = 0
            w[2, :, r_vo:] = 0
            if spec.qkv.bias is not None:
                b = spec.qkv.bias.view(3, h, hd)
                b[:2, :, r_qk:] = 0
                b[2, :, r_vo:] = 0
            spec.proj.weight.view(-1, h, hd)[:, :, r_vo:] = 0
            spec.fc1.weight[r_mlp:] = 0
            if spec.fc1.bias is not None:
                spec.fc1.bias[r_mlp:] = 0
            spec.fc2.weight[:, r_mlp:] = 0
    return m


def _cross_head_(lin: nn.Linear, kept: torch.Tensor) -> None:
    """Fold cross-head compensation into `lin` for the kept input set (in_features,) bool, through the
    product's own formula on a copy whose inputs are ordered kept first (there the kept set is a prefix)."""
    order = torch.cat([kept.nonzero().squeeze(1), (~kept).nonzero().squeeze(1)])
    k = int(kept.sum())
    tmp = nn.Linear(lin.in_features, lin.out_features).to(lin.weight)
    tmp.weight.copy_(lin.weight[:, order])
    tmp.bias.copy_(lin.bias)
    compensation.set_input_mean(tmp, compensation.input_mean(lin)[order])
    compensation.set_input_cov(tmp, compensation.input_cov(lin)[order][:, order])
    weight, bias = compensation.compensated_linear(tmp, k)
    lin.weight[:, order[:k]] = weight
    lin.bias.copy_(bias)


def _mode_accuracy(elastic: skd.ElasticViT, mode: str, f: float, test: torch.utils.data.TensorDataset) -> float:
    if mode == "attn":
        keep = [max(1, math.floor(f * hd + 1e-9)) for hd in elastic.head_dims]
        elastic.set_subnet(subnet=skd.Subnet(attn=keep, mlp=list(elastic.hiddens)))
        return 100 * accuracy(elastic, test)
    fractions = {"qk": (f, 1, 1), "vo": (1, f, 1), "mlp": (1, 1, f), "all": (f, f, f)}[mode]
    with elastic.standard_layout() as bare:
        model = truncated(bare, *fractions)
    return 100 * accuracy(model, test)


def quality_table(samples: int, draws: int, modes: list[str], fractions: list[float],
                  criteria: list[str]) -> dict[tuple[str, str], list]:
    """(criterion, mode) -> per fraction, the test accuracies (%) of the `draws` calibration draws."""
    train, test = load_digits_split()
    base = pretrained_digits_vit()
    samples = min(samples, len(train) // draws)
    table: dict[tuple[str, str], list[list[float]]] = {}
    for criterion in criteria:
        for d in range(1 if criterion in ("none", "magnitude", "random") else draws):
            calib = DataLoader(Subset(train, range(d * samples, (d + 1) * samples)), batch_size=128)
            elastic = skd.ElasticViT(copy.deepcopy(base)).eval()
            t0 = time.perf_counter()
            if criterion != "none":
                name, kwargs = parse_label(criterion)
                skd.wpac(elastic, calib, num_samples=samples, criterion=name, progress=False, **kwargs)
            seconds = time.perf_counter() - t0
            for mode in modes:
                row = table.setdefault((criterion, mode), [[] for _ in fractions])
                for cell, f in zip(row, fractions, strict=True):
                    cell.append(_mode_accuracy(elastic, mode, f, test))
            print(f"{criterion:>10} draw {d}: {seconds:.1f} s", flush=True)
    return table


def markdown(table: dict[tuple[str, str], list], modes: list[str], fractions: list[float]) -> str:
    out = []
    for mode in modes:
        out += [f"\nmode {mode}:", "| criterion | " + " | ".join(f"{f:g} kept" for f in fractions) + " |",
                "|---|" + "---:|" * len(fractions)]
        for (criterion, m), row in table.items():
            if m == mode:
                cells = [f"{sum(c) / len(c):.1f}" + (f" [{min(c):.1f}, {max(c):.1f}]" if len(c) > 1 else "")
                         for c in row]
                out.append(f"| {criterion} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(table: dict[tuple[str, str], list], fractions: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (criterion, mode), row in table.items():
        if mode != "attn":
            continue
        accs = [sum(c) / len(c) for c in row]
        # wpac thick, pca dashed above it: where they coincide both stay visible
        ax.plot(fractions, accs, marker="o", label=criterion, linewidth=3 if criterion.startswith("wpac") else 1.2,
                zorder={"wpac": 3, "pca": 4}.get(criterion, 2), linestyle="--" if criterion == "pca" else "-")
    ax.set_xlabel("fraction of every head's dims kept (MLP full)")
    ax.set_ylabel("test accuracy (%, mean over draws)")
    ax.set_title("vit_digits: truncation without fine-tuning")
    ax.set_xscale("log", base=2)
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512, help="calibration samples per draw (training split)")
    parser.add_argument("--draws", type=int, default=3, help="disjoint calibration draws (spread)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    # below the paper's fractions: on this small task 1/4 is already easy for WPAC
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0625, 0.125, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--criteria", nargs="+", default=["none", *CRITERIA],
                        choices=LABELS)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = quality_table(args.samples, args.draws, args.modes, args.fractions, args.criteria)
    print(markdown(table, args.modes, args.fractions))
    if "attn" in args.modes:
        plot(table, args.fractions, args.plot)


if __name__ == "__main__":
    main()
