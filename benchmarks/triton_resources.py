"""What each Triton autotune config costs on a real GPU, found on a machine without one: every config of
every kernel is compiled for an sm_XX target (Triton's bundled ptxas), specialised like a real launch
(unit strides are the constant 1, pointers and most sizes 16-divisible), and its shared memory,
registers, spill bytes and software pipelining (async copies) are printed.

    python -m benchmarks.triton_resources              # sm_90, fp16 / bf16 / fp32
    python -m benchmarks.triton_resources --arch 80 --kernels prefix_linear prefix_attention
    python -m benchmarks.triton_resources --largest --json  # per kernel and dtype, the largest config kept

Run it without TRITON_INTERPRET=1: under the interpreter Triton's own jit helpers (tl.cdiv, ...) cannot be
compiled.

The autotune pruning in skd_kernels/triton/*.py drops, per compute capability, the configs this shows spilling
(their _SPILLS) or exceeding shared memory. prefix_attention's kernel (serving prefix_attention_separate too)
is compiled at its widest head tile, BLOCK_D = 128, with a bias.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import torch

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Resources:
    """A compiled config: shared memory (bytes), registers per thread, spill store bytes, async copies."""

    shared: int
    registers: int
    spill_bytes: int
    async_copies: int


@dataclass(frozen=True)
class Spec:
    """How a kernel is launched: its module and kernel, argument types, unit strides, 16-divisible args."""

    module: str
    kernel: str
    pointers: dict[str, str | None]  # pointer argument -> element type, None = the input dtype
    ints: tuple[str, ...]
    unit_strides: tuple[str, ...]
    divisible: tuple[str, ...]
    floats: tuple[str, ...] = ()  # fp32 scalar arguments

    def constexprs(self, dtype: torch.dtype) -> dict[str, object]:
        import triton.language as tl

        dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
        if self.kernel == "_covariance_kernel":
            return {"DOT_DTYPE": dot, "SPLIT_PRODUCT": dtype != torch.float32, "PRECISION": "tf32x3"}
        if self.kernel == "_prefix_linear_kernel":
            return {"HAS_BIAS": True, "ACTIVATION": "gelu", "DOT_DTYPE": dot, "PRECISION": "tf32x3"}
        if self.kernel == "_prefix_attention_kernel":
            from skd_kernels.triton.prefix_attention import MAX_BLOCK_D

            return {"HAS_BIAS": True, "DOT_DTYPE": dot, "PRECISION": "tf32x3", "BLOCK_D": MAX_BLOCK_D}
        return {}


SPECS = {
    "weighted_covariance": Spec(
        "skd_kernels.triton.weighted_covariance", "_covariance_kernel",
        {"x_ptr": None, "w_ptr": "fp32", "outer_ptr": "fp32", "sum_ptr": "fp32", "wsum_ptr": "fp32"},
        ("N", "R", "rows_per_split", "ROWS_BUCKET", "stride_xn", "stride_xd", "stride_w"),
        ("stride_xd", "stride_w"), ("R", "rows_per_split", "ROWS_BUCKET", "stride_xn")),
    "prefix_linear": Spec(
        "skd_kernels.triton.prefix_linear", "_prefix_linear_kernel",
        {"x_ptr": None, "w_ptr": None, "b_ptr": None, "y_ptr": None},
        ("M", "N", "K", "M_BUCKET", "N_BUCKET", "K_BUCKET", "stride_xm", "stride_xk", "stride_wn", "stride_wk",
         "stride_b", "stride_ym"),
        ("stride_xk", "stride_wk", "stride_b"),
        ("N", "K", "M_BUCKET", "N_BUCKET", "K_BUCKET", "stride_xm", "stride_wn", "stride_ym")),
    "taylor_scores": Spec(
        "skd_kernels.triton.taylor_scores", "_taylor_kernel",
        {"a_ptr": None, "g_ptr": None, "tok_ptr": "fp32", "chan_ptr": "fp32"},
        ("T", "C", "stride_ab", "stride_at", "stride_ac", "stride_gb", "stride_gt", "stride_gc"),
        ("stride_ac", "stride_gc"), ("C", "stride_ab", "stride_at", "stride_gb", "stride_gt")),
    "prefix_attention": Spec(
        "skd_kernels.triton.prefix_attention", "_prefix_attention_kernel",
        {"q_ptr": None, "k_ptr": None, "v_ptr": None, "bias_ptr": None, "out_ptr": None},
        ("N", "H", "R", "RANK_STRIDE", "N_BUCKET", "stride_qs", "stride_qn", "stride_ks", "stride_kn", "stride_vs",
         "stride_vn", "stride_bs", "stride_bh", "stride_bi", "stride_bj"),
        ("stride_bj",), ("N_BUCKET", "stride_qs", "stride_qn", "stride_ks", "stride_kn", "stride_vs", "stride_vn",
                         "stride_bs", "stride_bh", "stride_bi"),
        ("scale",)),
}


def _jit_function(spec: Spec) -> object:
    """The kernel as a compilable JITFunction, also when TRITON_INTERPRET=1 made it an interpreted one."""
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(spec.module), spec.kernel).fn  # the autotuner's kernel
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def gpu_configs(name: str) -> list[object]:
    """The kernel's GPU autotune configs (its module's _GPU_CONFIGS)."""
    return list(importlib.import_module(SPECS[name].module)._GPU_CONFIGS)


def kept_configs(name: str, dtype: torch.dtype, arch: int) -> list[object]:
    """The configs that autotune pruning keeps for `dtype` on sm_<arch> (all of them for kernels without
    pruning: taylor_scores holds no tiles in shared memory)."""
    from skd_kernels.triton import _utils

    configs = gpu_configs(name)
    pruner = getattr(importlib.import_module(SPECS[name].module), SPECS[name].kernel).early_config_prune
    if pruner is None:
        return configs
    return pruner.keep(configs, 2 if dtype != torch.float32 else 4, _utils.TARGETS[arch])


def largest_config(name: str, dtype: torch.dtype, arch: int) -> object:
    """The kept config with the most shared memory (else the most warps): the one most at risk of spilling
    or not fitting."""
    module = importlib.import_module(SPECS[name].module)
    operand_bytes = 2 if dtype != torch.float32 else 4
    if hasattr(module, "_shared_bytes"):
        return max(kept_configs(name, dtype, arch), key=lambda c: module._shared_bytes(c, operand_bytes))
    return max(kept_configs(name, dtype, arch), key=lambda c: (c.num_warps, *c.kwargs.values()))


def compile_config(name: str, dtype: torch.dtype, config: object, arch: int = 90) -> Resources:
    """Compiles kernel `name` with `config` for inputs of `dtype` for sm_<arch>; raises if it does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = SPECS[name]
    jit = _jit_function(spec)
    constants = {**spec.constexprs(dtype), **config.kwargs, **{n: 1 for n in spec.unit_strides}}
    signature = {}
    for arg in jit.arg_names:
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg in spec.pointers:
            signature[arg] = "*" + (spec.pointers[arg] or DTYPE_NAMES[dtype])
        elif arg in spec.floats:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    attrs = {(jit.arg_names.index(a),): [["tt.divisibility", 16]] for a in (*spec.pointers, *spec.divisible)}
    kernel = triton.compile(ASTSource(jit, signature, constexprs=constants, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    registers, spills = _ptxas_usage(kernel.asm["ptx"], arch)
    return Resources(kernel.metadata.shared, registers, spills, kernel.asm["ttgir"].count("async_copy_global_to_local"))


def ptxas_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill store bytes) that ptxas -v reports for the PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([ptxas_path(), "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output: {text[:500]}")
    return int(registers.group(1)), int(spills.group(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 = A100, 90 = H100)")
    parser.add_argument("--kernels", nargs="*", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPE_NAMES.values()), choices=list(DTYPE_NAMES.values()))
    parser.add_argument("--kept", action="store_true", help="only the configs pruning keeps on that arch")
    parser.add_argument("--largest", action="store_true", help="only the largest config kept per kernel and dtype")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args(argv)
    dtypes = [d for d, n in DTYPE_NAMES.items() if n in args.dtypes]
    if not args.json:
        print(f"{'kernel':<20} {'dtype':<5} {'config':<36} {'shared KB':>9} {'regs':>5} {'spill B':>8} {'async':>6}")
    for name in args.kernels:
        for dtype in dtypes:
            configs = [largest_config(name, dtype, args.arch)] if args.largest else gpu_configs(name)
            if args.kept and not args.largest:
                configs = kept_configs(name, dtype, args.arch)
            for config in configs:
                label = " ".join(f"{v}" for v in config.kwargs.values()) + f" w{config.num_warps} s{config.num_stages}"
                try:
                    r = compile_config(name, dtype, config, args.arch)
                except Exception as exc:  # a config that does not compile is what this tool is for
                    error = str(exc)[:300]
                    print(json.dumps(dict(kernel=name, dtype=DTYPE_NAMES[dtype], config=label, error=error))
                          if args.json else f"{name:<20} {DTYPE_NAMES[dtype]:<5} {label:<36} FAILED: {error}")
                    continue
                if args.json:
                    print(json.dumps(dict(kernel=name, dtype=DTYPE_NAMES[dtype], config=label, **asdict(r))))
                else:
                    print(f"{name:<20} {DTYPE_NAMES[dtype]:<5} {label:<36} {r.shared / 1024:9.1f} {r.registers:5d} "
                          f"{r.spill_bytes:8d} {r.async_copies:6d}")


if __name__ == "__main__":
    main()
