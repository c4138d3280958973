"""Which compiler setting makes ElasticViT's compiled training wrong: gradients of torch.compile'd steps against
eager ones, per variant, each in its own process.

Session 18's lease (an H200, torch 2.11) found inductor's dynamic-shape training graphs under bf16 autocast 0.40
(relative) off eager's gradients in every subnet, where aot_eager was exact, fp32 right to 5e-4 and a static
compile right to 7e-3; PIADTrainer has refused compile=True with bf16 autocast on CUDA since
(skd.piad.trainer.check_compile). This script narrows it on the next device: every variant changes one thing
against the failing case ("inductor": dynamic=True, bf16 autocast) and reports, per subnet (full width, then
narrower), the compiled forward's output error, the gradients' error (max-norm, relative), the worst
parameters and the wrong one nearest the output (where the error enters the backward). A variant that fixes it
names a workaround.

    python -m benchmarks.compiled_gradients --device cuda [--jobs 6] [--variants a,b] [--out report.md]
    python -m benchmarks.compiled_gradients --device cpu --variants inductor,aot_eager --jobs 2   # CPU check

The model is `tiny_elastic` (tests/test_elastic_compile.py's too: a 2-block timm ViT of 3 heads of 64, MLP
768, 17 tokens of 32 px images, weights perturbed), trained on the test's loss (the output's squared sum) with
backward outside autocast, as PIAD does. Batch 12 (204 tokens >= the width 192) takes ElasticViT's weights
route (SDPA on head-major weight copies), which PIAD's batches take; batch 3 the activations route (the failing
GPU test's). A plain run starts with the failing case on both routes, then every other variant on the weights
route, and narrows where the failing case is wrong (`_narrowed`). Variants run `--jobs` at a time (inductor's
compile workers split the cores); each row lands in the report as its process ends, so a run stopped at a
lease's end keeps what finished.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

from skd import ElasticViT, Subnet

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_ROUTE_BATCH, ACTIVATIONS_ROUTE_BATCH = 12, 3
TOLERANCE = 2e-2  # tests/test_elastic_compile.py's: bf16 GEMMs fused differently


@dataclass(frozen=True)
class Variant:
    """One change against the failing compile: torch.compile's backend and dynamic flag, bf16 autocast or fp32,
    config overrides (dotted names of torch._inductor.config / torch._functorch.config), the batch dimension
    marked static, or SDPA held to one backend (a torch.nn.attention.SDPBackend name) in both runs."""

    backend: str = "inductor"
    dynamic: bool = True
    amp: bool = True
    inductor: dict[str, object] = field(default_factory=dict)
    functorch: dict[str, object] = field(default_factory=dict)
    static_batch: bool = False
    sdpa: str | None = None


# Most telling first (a run cut short keeps these): session 18 already measured fp32 and the static compile right
VARIANTS = {
    "inductor": Variant(),
    "aot_eager": Variant(backend="aot_eager"),
    "static_batch": Variant(static_batch=True),
    "sdpa_math": Variant(sdpa="MATH"),
    "sdpa_efficient": Variant(sdpa="EFFICIENT_ATTENTION"),
    "no_mix_order_reduction": Variant(inductor={"triton.mix_order_reduction": False}),
    "backward_autocast_off": Variant(functorch={"backward_pass_autocast": "off"}),
    "emulate_precision_casts": Variant(inductor={"emulate_precision_casts": True}),
    "no_split_reductions": Variant(inductor={"split_reductions": False}),
    "no_persistent_reductions": Variant(inductor={"triton.persistent_reductions": False}),
    "no_pattern_matcher": Variant(inductor={"pattern_matcher": False}),
    "no_loop_ordering": Variant(inductor={"loop_ordering_after_fusion": False}),
    "no_padding": Variant(inductor={"comprehensive_padding": False, "shape_padding": False}),
    "static": Variant(dynamic=False),
    "fp32": Variant(amp=False),
}
# A plain run starts with the failing case on both routes, then every other variant on the weights route. Where
# the failing case is right on the weights route but wrong on the activations route, the variants not yet started
# move there; where it is right on both, nothing is left to narrow and the rest are not started.
BASELINES = [("inductor", WEIGHTS_ROUTE_BATCH), ("inductor", ACTIVATIONS_ROUTE_BATCH)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in fp32 (tests/elastic_oracle.py's measure, which session 18's 0.40 is in)."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@contextlib.contextmanager
def _config(variant: Variant) -> Iterator[list[str]]:
    """The variant's overrides set for the block; yields the names this torch lacks (left unset, reported)."""
    import torch._functorch.config
    import torch._inductor.config

    missing, patches = [], []
    for module, overrides in ((torch._inductor.config, variant.inductor), (torch._functorch.config, variant.functorch)):
        known = {k: v for k, v in overrides.items() if _has(module, k)}
        missing += [k for k in overrides if k not in known]
        if known:
            patches.append(module.patch(known))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield missing


def _has(module: object, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(module, part):
            return False
        module = getattr(module, part)
    return True


def tiny_elastic() -> ElasticViT:
    """A 2-block ViT-Ti-width model (head_dim 64, hidden 768) on 32 px inputs, weights perturbed (seeded), eval
    mode, on CPU."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    with torch.no_grad():  # random init leaves biases at 0: make every term matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ElasticViT(model).eval()


def run_variant(name: str, batch: int, device: str) -> dict:
    """One (variant, batch) in this process: per subnet, the compiled step's output and gradient errors against
    eager, the three worst parameters and the wrong one nearest the output. Returns the row as plain data."""
    variant = VARIANTS[name]
    elastic = tiny_elastic().to(device).train()
    torch.manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if variant.static_batch:
        torch._dynamo.mark_static(x, 0)
    r, m = elastic.head_dims[0], elastic.hiddens[0]
    subnets = [Subnet(attn=elastic.head_dims, mlp=elastic.hiddens), Subnet(attn=[r // 4, r], mlp=[m, m // 3])]
    names = [n for n, p in elastic.named_parameters() if p.requires_grad]
    sdpa = contextlib.nullcontext()
    if variant.sdpa is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa = sdpa_kernel(getattr(SDPBackend, variant.sdpa))
    row: dict = {"variant": name, "batch": batch, "subnets": [], "error": None}
    start = time.perf_counter()
    torch._dynamo.reset()
    with _config(variant) as missing, sdpa:
        row["missing"] = missing
        compiled = torch.compile(elastic, backend=variant.backend, dynamic=variant.dynamic)
        for subnet in subnets:
            elastic.set_subnet(subnet=subnet)
            outs, grads = [], []
            for model in (compiled, elastic):
                elastic.zero_grad(set_to_none=False)
                with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=variant.amp):
                    out = model(x)
                out.float().square().sum().backward()  # outside autocast, as PIAD's step
                outs.append(out.detach())
                grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                              for p in elastic.parameters() if p.requires_grad])
            errs = [(n, rel_err(a, b)) for n, a, b in zip(names, *grads, strict=True) if b.abs().sum() > 0]
            per_param = sorted(((e, n) for n, e in errs), reverse=True)
            # backward reaches parameters in roughly reverse model order: the wrong gradient nearest the output
            # marks where the error enters
            entry = next(((n, e) for n, e in reversed(errs) if e > TOLERANCE), None)
            row["subnets"].append({
                "subnet": f"attn={list(subnet.attn)} mlp={list(subnet.mlp)}",
                "out_err": rel_err(*outs),
                "grad_err": rel_err(torch.cat([g.flatten() for g in grads[0]]),
                                    torch.cat([g.flatten() for g in grads[1]])),
                "worst": [[n, e] for e, n in per_param[:3]],
                "entry": entry})
    row["seconds"] = time.perf_counter() - start
    return row


def _child(name: str, batch: int, device: str, threads: int, timeout: float) -> dict:
    """run_variant in a fresh process (its own Dynamo cache and config); a crash or timeout becomes the row's
    error."""
    # no compile caches: an artifact cached under another variant's settings must not stand in for this one's
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": str(threads), "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
    cmd = [sys.executable, "-m", "benchmarks.compiled_gradients", "--child", name, "--batch", str(batch),
           "--device", device]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"variant": name, "batch": batch, "subnets": [], "seconds": timeout,
                "error": f"stopped at its {timeout:g} s limit"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"variant": name, "batch": batch, "subnets": [], "seconds": time.perf_counter() - start,
            "error": f"exit {done.returncode}: {tail}"}


def right(row: dict) -> bool:
    """Whether a finished row's gradients are within TOLERANCE of eager's in every subnet."""
    return not row["error"] and bool(row["subnets"]) and all(s["grad_err"] <= TOLERANCE for s in row["subnets"])


def report(rows: list[dict], header: str, note: str = "") -> str:
    """The markdown table of rows (in run order) under `header`, which variants come within TOLERANCE, and `note`."""
    lines = [header, "", "| variant | batch | subnet | output err | gradient err | worst parameters (err) | "
             "wrong nearest the output | s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        note_missing = f" (lacks {', '.join(row['missing'])})" if row.get("missing") else ""
        if row["error"]:
            lines.append(f"| {row['variant']}{note_missing} | {row['batch']} | - | - | - | {row['error']} | - | "
                         f"{row['seconds']:.0f} |")
        for s in row["subnets"]:
            worst = ", ".join(f"{n} {e:.1e}" for n, e in s["worst"])
            entry = "none" if s["entry"] is None else f"{s['entry'][0]} {s['entry'][1]:.1e}"
            lines.append(f"| {row['variant']}{note_missing} | {row['batch']} | {s['subnet']} | {s['out_err']:.1e} | "
                         f"{s['grad_err']:.1e} | {worst} | {entry} | {row['seconds']:.0f} |")
    within = [f"{r['variant']}@{r['batch']}" for r in rows if right(r)]
    lines += ["", f"Within {TOLERANCE:g} of eager's gradients in every subnet: {', '.join(within) or 'none'}."]
    return "\n".join(lines + ([note] if note else [])) + "\n"


def _narrowed(rows: dict[tuple[str, int], dict]) -> tuple[list[tuple[str, int]] | None, str]:
    """Once both BASELINES have finished: the runs that replace those not yet started (None: keep them), and the
    report's note."""
    weights, activations = (rows[b] for b in BASELINES)
    if right(weights) and right(activations):
        return [], "The failing case is right here on both routes: nothing to narrow; the other variants were not run."
    if right(weights):
        return [(v, ACTIVATIONS_ROUTE_BATCH) for v in VARIANTS if v != "inductor"], (
            f"The failing case is wrong on the activations route only: the variants not yet started ran at batch "
            f"{ACTIVATIONS_ROUTE_BATCH}.")
    return None, ""


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", help=f"comma-separated, at batch {WEIGHTS_ROUTE_BATCH} (default: every variant, "
                    f"and inductor at batch {ACTIVATIONS_ROUTE_BATCH} too); of {', '.join(VARIANTS)}")
    ap.add_argument("--jobs", type=int, default=4, help="variants compiled at once")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per variant")
    ap.add_argument("--out", type=Path, help="the report, rewritten as each variant ends (also printed)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=WEIGHTS_ROUTE_BATCH, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args.child, args.batch, args.device)))
        return []
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    if args.variants:
        unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
        if unknown:
            ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
        runs = [(v, WEIGHTS_ROUTE_BATCH) for v in args.variants.split(",")]
    else:
        runs = BASELINES + [(v, WEIGHTS_ROUTE_BATCH) for v in VARIANTS if v != "inductor"]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    triton = importlib.util.find_spec("triton") and importlib.metadata.version("triton")
    header = (f"## Compiled training vs eager, {device}, torch {torch.__version__}, triton {triton or 'absent'}\n\n"
              "bf16 autocast unless the variant says fp32; errors max |compiled - eager| / max |eager|, the "
              "gradients' over every parameter")
    rows: dict[tuple[str, int], dict] = {}
    note, narrowing = "", not args.variants
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        def submit(todo: list[tuple[str, int]]) -> dict:
            return {pool.submit(_child, v, b, args.device, threads, args.timeout): (v, b) for v, b in todo}

        pending = submit(runs)
        while pending:
            finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                rows[pending.pop(future)] = future.result()
            if narrowing and all(b in rows for b in BASELINES):
                narrowing = False
                replacement, note = _narrowed(rows)
                if replacement is not None:
                    for future in [f for f in pending if f.cancel()]:
                        del pending[future]
                    runs += replacement
                    pending.update(submit(replacement))
            if args.out:
                args.out.write_text(report([rows[r] for r in runs if r in rows], header, note))
    done = [rows[r] for r in runs if r in rows]
    print(report(done, header, note))
    return done


if __name__ == "__main__":
    main()
