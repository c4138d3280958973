"""Launch heuristics shared by the Triton kernels: autotune configs, dot operand dtypes, SM counts.

Under TRITON_INTERPRET=1 (kernels run on CPU tensors through numpy) every kernel gets ONE small config,
so nothing is autotuned and the interpreter stays fast.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Read once, like Triton itself, which picks interpreter vs compiler when @triton.jit runs at import.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pick_configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The autotune configs for the current mode: the GPU list, or the single interpreter config."""
    return [interpreter] if INTERPRET else gpu


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


@functools.cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (used to size split-N grids)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
