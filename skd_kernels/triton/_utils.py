"""Launch helpers shared by the Triton kernels: autotune configs and their pruning, dot operand dtypes,
grid limits, SM counts and the device guard.

Under TRITON_INTERPRET=1 (kernels run on CPU tensors through numpy) every kernel gets ONE small config,
so nothing is autotuned and the interpreter stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Read once, like Triton itself, which picks interpreter vs compiler when @triton.jit runs at import.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# CUDA grid limits: axis 0 takes up to 2^31 - 1 programs, axes 1 and 2 only 65535. Kernels put their
# large index on axis 0.
MAX_GRID = (2**31 - 1, 65535, 65535)


@dataclass(frozen=True)
class Target:
    """What config pruning needs to know of a GPU: its compute capability major and the shared memory one
    program may use."""

    major: int
    shared_bytes: int


# The reference targets (tools and tests without a GPU): H100 (sm_90, 227 KiB) and A100 (sm_80, 163 KiB).
TARGETS = {90: Target(9, 227 * 1024), 80: Target(8, 163 * 1024)}


def launch_target(device: torch.device | None) -> Target:
    """The Target of a CUDA device (its own capability and shared memory limit); sm_90's without one."""
    if device is None or device.type != "cuda":
        return TARGETS[90]
    return _device_target(device.index if device.index is not None else torch.cuda.current_device())


def max_shared_bytes(device: torch.device | None) -> int:
    """Shared memory one program may use on `device` (sm_90's 227 KiB when it is not a CUDA device)."""
    return launch_target(device).shared_bytes


@functools.cache
def _device_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    return Target(props.major, getattr(props, "shared_memory_per_block_optin", TARGETS[90].shared_bytes))


def checked_grid(grid: tuple[int, ...]) -> tuple[int, ...]:
    """`grid`, or a ValueError when an axis exceeds what CUDA can launch (MAX_GRID)."""
    for axis, (n, limit) in enumerate(zip(grid, MAX_GRID, strict=False)):
        if n > limit:
            raise ValueError(f"launch grid {grid} exceeds CUDA's limit {limit} on axis {axis}: the input is too large")
    return grid


def pick_configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The autotune configs for the current mode: the GPU list, or the single interpreter config."""
    return [interpreter] if INTERPRET else gpu


class ConfigPruner:
    """An autotune `early_config_prune`: drops the configs that would not fit the launch device's shared
    memory or that spill registers there.

    shared_bytes(config, operand_bytes, **launch) estimates a config's shared memory (within ~15 % of what
    Triton 3.8 allocates, see benchmarks/triton_resources.py) for dot operands of operand_bytes (the kernel's
    DOT_DTYPE); `launch` holds the launch's constexprs named in launch_keys (tile sizes the caller fixes,
    such as the attention's head width BLOCK_D), which `keep` omits when there is no launch (the estimate's
    defaults: the largest). Spills cannot be estimated as simply, so they are measured:
    spills[(major, operand_bytes)] holds the configs that spilled when compiled for that compute capability
    (benchmarks/triton_resources.py). Keeps the smallest config if none survives.
    """

    def __init__(self, shared_bytes: Callable[..., int], spills: dict[tuple[int, int], list[triton.Config]],
                 launch_keys: tuple[str, ...] = ()) -> None:
        self.shared_bytes = shared_bytes
        self.spills = spills
        self.launch_keys = launch_keys

    def keep(self, configs: list[triton.Config], operand_bytes: int, target: Target,
             **launch: object) -> list[triton.Config]:
        spilling = self.spills.get((target.major, operand_bytes), [])
        kept = [c for c in configs
                if self.shared_bytes(c, operand_bytes, **launch) <= target.shared_bytes and c not in spilling]
        return kept or [min(configs, key=lambda c: self.shared_bytes(c, operand_bytes, **launch))]

    def __call__(self, configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
        device = next((a.device for a in named_args.values() if isinstance(a, torch.Tensor)), None)
        return self.keep(configs, kwargs["DOT_DTYPE"].primitive_bitwidth // 8, launch_target(device),
                         **{k: kwargs[k] for k in self.launch_keys})


def bucket(n: int, cap: int) -> int:
    """n rounded up to a power of two, at most `cap`: an autotune key that does not change with every size."""
    return min(triton.next_power_of_2(max(n, 1)), cap)


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The operand dtype `tl.dot` gets for inputs of `dtype` (the accumulator is always fp32).

    fp16/bf16 stay in their dtype for the tensor cores. The interpreter computes bf16 arithmetic
    through numpy, which has no bfloat16 and returns garbage (measured with triton 3.8), so there
    bf16 tiles are widened to fp32 first: bf16 products are exact in fp32, so the result is the same.
    """
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16:
        return tl.float32 if INTERPRET else tl.bfloat16
    return tl.float32


def fp32_dot_precision() -> str:
    """`input_precision` of fp32 dots, following torch's matmul setting like cuBLAS does.

    "highest" (torch's default) gets tf32x3: three TF32 tensor-core products, about fp32 accuracy and
    still faster than FMA-based fp32. "high"/"medium" allow plain TF32. Ignored by the interpreter.
    """
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context that makes t's CUDA device current, so a launch runs on t's device and its current stream
    (Triton launches on the current device); nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (used to size split-N grids)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
