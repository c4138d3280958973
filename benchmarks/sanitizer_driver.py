"""Runs every public op once on the tail shapes, for `compute-sanitizer` (memcheck, racecheck) to watch.

    compute-sanitizer --tool memcheck python -m benchmarks.sanitizer_driver [--device cuda] \
        [--backend cuda] [--backend triton:bfloat16]

Tail shapes: T = 197 tokens (not a multiple of any tile), C in {3, 129} channels (narrower than a vector
load, and one past a multiple of it), a vector-loadable C = 264 whose last token tile is partial, groups of
r = 48 (a partial 64-wide covariance tile) with N = 1 and N = 197 rows, prefix widths k = 0 and k = 1; the
attention ops (on the backends with a kernel of their own for them: not the CUDA backend's copies + SDPA) at
N = 1 and 197 tokens, head widths r = 0, 1, 5 and 48, with a broadcast bias.
Each result is compared with skd_kernels.reference, so a kernel that reads or writes the wrong memory
fails here even where the sanitizer has nothing to say. Prints one line per call and "driver ok" last.
`--backend NAME:DTYPE,...` narrows a backend to some dtypes (the device check runs Triton, whose autotuning
compiles and runs every config under the sanitizer, in one dtype only, to fit its time limit).
"""

from __future__ import annotations

import argparse

import torch

import skd_kernels
from skd_kernels import _dispatch, reference
from skd_kernels.ops import prefix_attention as prefix_attention_op
from skd_kernels.ops import prefix_attention_separate as separate_op

TOKENS = 197
CHANNELS = (3, 129, 264)
COV_SHAPES = ((1, 48, 1), (197, 48, 1), (197, 3 * 48, 3), (1, 3 * 48, 3))  # (N, width, groups)
PREFIX_KS = ((0, 1), (1, 0), (1, 1), (0, 0), (129, 48))  # (k_in, k_out) of a (257, 129) weight
ATTENTION_SHAPES = ((1, 3, 1), (TOKENS, 3, 48), (TOKENS, 12, 5), (TOKENS, 3, 0))  # (N, H, r)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(name: str, got: tuple[torch.Tensor, ...] | torch.Tensor, want: tuple[torch.Tensor, ...] | torch.Tensor,
           tol: float) -> None:
    got_t = got if isinstance(got, tuple) else (got,)
    want_t = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got_t, want_t, strict=True):
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")
    print(f"ok {name}")


def backends_for(device: torch.device) -> list[str]:
    """The compiled and Triton backends that run on `device` (not Triton's slow CPU interpreter)."""
    names = [b for b in skd_kernels.available_backends(device) if b != "reference"]
    return [b for b in names if not (b == "triton" and device.type == "cpu")]


def run(device: torch.device, backends: list[str],
        dtypes: dict[str, tuple[torch.dtype, ...]] | None = None) -> None:
    """Every op × dtype × tail shape on `device`, on each of `backends`, checked against the reference;
    dtypes[backend], where given, replaces DTYPES for that backend."""
    if not backends:
        raise RuntimeError(f"no compiled or Triton backend runs on {device}")
    for backend in backends:
        print(f"backend {backend}")
        with skd_kernels.use_backend(backend):
            _run_ops(device, (dtypes or {}).get(backend, DTYPES))
    print("driver ok")


def parse_backend(spec: str) -> tuple[str, tuple[torch.dtype, ...]]:
    """"NAME" -> (NAME, DTYPES); "NAME:bfloat16,float16" -> (NAME, those dtypes)."""
    name, _, listed = spec.partition(":")
    if not listed:
        return name, DTYPES
    by_name = {str(d).removeprefix("torch."): d for d in DTYPES}
    unknown = [d for d in listed.split(",") if d not in by_name]
    if unknown:
        raise ValueError(f"--backend {spec!r}: unknown dtype(s) {unknown}; choose from {list(by_name)}")
    return name, tuple(by_name[d] for d in listed.split(","))


def _run_ops(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> None:
    """Every op × dtype × tail shape once on `device` with the backend in force."""
    for dtype in dtypes:
        tag = str(dtype).removeprefix("torch.")
        stat_tol = 1e-4 if dtype == torch.float32 else 2e-4
        for c in CHANNELS:
            act = torch.randn(2, TOKENS, c, device=device, dtype=dtype)
            grad = torch.randn(2, TOKENS, c, device=device, dtype=dtype)
            _check(f"taylor_scores {tag} (2,{TOKENS},{c})", skd_kernels.taylor_scores(act, grad),
                   reference.taylor_scores(act, grad), stat_tol)
        for n, width, groups in COV_SHAPES:
            x = (torch.randn(n, width, device=device) + 0.5).to(dtype)
            w = torch.rand(n, device=device)
            state = skd_kernels.weighted_covariance(x, w, groups)
            _check(f"weighted_covariance {tag} N={n} r={width // groups} G={groups}",
                   (state.weight_sum, state.sum, state.sum_outer), reference.weighted_covariance(x, w, groups),
                   stat_tol)
        weight = torch.randn(257, 129, device=device, dtype=dtype) / 129**0.5
        bias = torch.randn(257, device=device, dtype=dtype)
        out_tol = 1e-4 if dtype == torch.float32 else 3e-2
        for rows in (1, TOKENS):
            x = torch.randn(rows, 129, device=device, dtype=dtype)
            for k_in, k_out in PREFIX_KS:
                for act_name in ("none", "gelu"):
                    want = reference.prefix_linear(x.float(), weight.float(), bias.float(), k_in, k_out,
                                                   act_name)
                    name = f"prefix_linear {tag} M={rows} k_in={k_in} k_out={k_out} {act_name}"
                    _check(name, skd_kernels.prefix_linear(x, weight, bias, k_in, k_out, act_name), want, out_tol)
                    if skd_kernels.forced_backend() in ("cpu", "cuda"):
                        # without a gradient the public op runs the compiled kernel's computation on views
                        # (F.linear): the kernel itself is called directly
                        got = _dispatch.below_autograd(torch.ops.skd_kernels.prefix_linear.default, x, weight,
                                                       bias, k_in, k_out, act_name)
                        _check(f"{name} (compiled kernel)", got, want, out_tol)
        _run_attention(device, dtype, out_tol)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_attention(device: torch.device, dtype: torch.dtype, tol: float) -> None:
    """prefix_attention (fused qkv) and prefix_attention_separate on the tail shapes, if the backend in force
    has a kernel of its own for them (not `via_sdpa`, the CUDA backend's copies + torch's SDPA: torch's kernels,
    not skd's, to sanitize)."""
    tag = str(dtype).removeprefix("torch.")
    for n, h, r in ATTENTION_SHAPES:
        bias = torch.randn(1, h, n, n, device=device, dtype=dtype)
        qkv = torch.randn(2, n, 3 * h * r, device=device, dtype=dtype)
        separate = tuple(qkv[..., i * h * r : (i + 1) * h * r] for i in range(3))  # views with qkv's strides
        for module, inputs in ((prefix_attention_op, (qkv,)), (separate_op, separate)):
            op = module.OP
            if _dispatch.has_kernel(op, device, dtype) and _dispatch.kernel(op, device, dtype) is not module.via_sdpa:
                got = getattr(skd_kernels, op)(*inputs, h, 0.125, bias)
                _check(f"{op} {tag} N={n} H={h} r={r}", got, getattr(reference, op)(*inputs, h, 0.125, bias), tol)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", action="append", help="a backend to run, NAME or NAME:DTYPE,... (repeatable; "
                        "default: every compiled or Triton backend usable on the device, every dtype)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    try:
        plan = dict(map(parse_backend, args.backend or backends_for(device)))
    except ValueError as e:
        parser.error(str(e))
    run(device, list(plan), plan)


if __name__ == "__main__":
    main()
