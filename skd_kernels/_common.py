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


def check_finite_result(
    outputs: tuple[torch.Tensor, ...], inputs: dict[str, torch.Tensor], result_dtype: torch.dtype
) -> None:
    """NaN/Inf check of an op's inputs through some of its outputs, so the inputs are read only once.

    outputs: tensors that every NaN or ±Inf of an input reaches (products and sums propagate them, and
    0·Inf is NaN) and whose largest entries bound the rest of the result (|·| scores, Σw, Σ w x x^T whose
    non-negative diagonal bounds it): their maximum, which propagates NaN and cannot overflow, is finite
    exactly when the result is.
    On CPU the maxima are read at once; only when one is not finite are the inputs scanned, to name the
    culprit, and finite inputs whose result overflows `result_dtype` are an error too (ValueError). On other
    devices the check is an asynchronous device assert with the same facts: no host sync.
    """
    if not outputs[0].is_cpu:
        peak = torch.stack([o.amax() for o in outputs if o.numel()] or [outputs[0].new_zeros(())]).amax()
        names = " and ".join(inputs)
        torch._assert_async(torch.isfinite(peak), f"{names} contain NaN or Inf, or the result overflows "
                                                  f"{result_dtype} (run on CPU to name the culprit)")
        return
    for o in outputs:  # a loop, not all(<generator>): this runs on every call and µs count
        if o.numel() and not math.isfinite((o if o.dim() == 0 else o.max()).item()):
            break
    else:
        return
    for name, t in inputs.items():
        _finite(name, t)
    names = " and ".join(inputs)
    raise ValueError(f"{names} are finite but the result overflows {result_dtype}; rescale {names}")


def check_nonnegative(name: str, t: torch.Tensor) -> None:
    """min(t) >= 0, NaN and -Inf excluded (+Inf must be caught by check_finite_result); as there, an
    immediate ValueError on CPU and an asynchronous device assert elsewhere."""
    if not t.numel():
        return
    lo = t.min()
    if not t.is_cpu:
        torch._assert_async(lo >= 0, f"{name} must be >= 0 and not NaN")
        return
    lo = lo.item()
    if math.isnan(lo) or lo == -math.inf:
        raise ValueError(f"{name} contains NaN or Inf")
    if lo < 0:
        raise ValueError(f"{name} must be >= 0")
