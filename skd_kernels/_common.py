"""Dtype rules and input checks shared by every op: bad input raises one ValueError naming the argument."""

from __future__ import annotations

import math

import torch

# The dtypes every op accepts (the compiled and reference backends run all of them).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and returned in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float(name: str, t: torch.Tensor) -> None:
    """`t` is a tensor of one of FLOAT_DTYPES."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (fp32/bf16/fp16/fp64), got {t.dtype}")


def _finite(name: str, t: torch.Tensor) -> None:
    # A sum is finite only if every element is (NaN and Inf propagate), and a plain sum is ~7x cheaper
    # than isfinite().all() on CPU; the element-wise test only runs to rule out an overflowing sum.
    if not bool(torch.isfinite(t.sum(dtype=accumulation_dtype(t.dtype)))) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_finite_result(outputs: tuple[torch.Tensor, ...], inputs: dict[str, torch.Tensor]) -> None:
    """NaN/Inf check of an op's inputs through its small outputs, so the inputs are read only once.

    Every NaN or ±Inf of an input reaches the outputs given here (products and sums propagate them, and
    0·Inf is NaN), so finite outputs prove finite inputs. Only when they are not are the inputs scanned,
    to name the culprit; finite inputs whose result overflows the accumulation dtype are an error too.
    """
    # One float64 sum per output (it cannot overflow for fp32 outputs): cheaper than isfinite().all(), which
    # costs several small parallel kernels per output on every call.
    if math.isfinite(sum(float(o.sum(dtype=torch.float64)) for o in outputs)):
        return
    for name, t in inputs.items():
        _finite(name, t)
    raise ValueError(f"{' and '.join(inputs)} are finite but the result overflows {outputs[0].dtype}; rescale "
                     f"{' and '.join(inputs)}")
