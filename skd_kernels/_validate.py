"""Input checks shared by every backend: bad input raises a ValueError naming the argument."""

from __future__ import annotations

import math

import torch

from .reference import ACTIVATIONS, accumulation_dtype

# The dtypes every op accepts (the compiled and reference backends run all of them).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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


def _float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (fp32/bf16/fp16/fp64), got {t.dtype}")


def check_covariance(x: torch.Tensor, w: torch.Tensor, groups: int) -> None:
    _float("x", x)
    _float("w", w)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, G*r), got shape {tuple(x.shape)}")
    if w.dim() != 1 or w.shape[0] != x.shape[0]:
        raise ValueError(f"w must have shape ({x.shape[0]},) to match x, got {tuple(w.shape)}")
    if x.device != w.device:
        raise ValueError(f"x and w must be on one device, got {x.device} and {w.device}")
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups:
        raise ValueError(f"groups={groups!r} must be a positive int dividing x's width {x.shape[1]}")
    # x is not scanned here: a NaN/Inf in it reaches the result, which check_finite_result inspects.
    if w.numel():
        lo, hi = (float(v) for v in torch.aminmax(w))  # one pass: NaN shows in lo, ±Inf in lo or hi
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("w contains NaN or Inf")
        if lo < 0:
            raise ValueError("w must be >= 0")


def check_taylor(act: torch.Tensor, grad: torch.Tensor) -> None:
    _float("act", act)
    _float("grad", grad)
    if act.dim() != 3:
        raise ValueError(f"act must be 3-D (B, T, C), got shape {tuple(act.shape)}")
    if grad.shape != act.shape:
        raise ValueError(f"grad must have act's shape {tuple(act.shape)}, got {tuple(grad.shape)}")
    if act.device != grad.device:
        raise ValueError(f"act and grad must be on one device, got {act.device} and {grad.device}")
    # NaN/Inf in act or grad reach the scores, which check_finite_result inspects: no extra pass here.


def check_prefix_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k_in: int, k_out: int, activation: str
) -> None:
    """Shape and range checks only: scanning x for NaN would cost a pass over it on the hot path."""
    _float("x", x)
    _float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    out_f, in_f = weight.shape
    if not isinstance(k_in, int) or not 0 <= k_in <= in_f:
        raise ValueError(f"k_in={k_in!r} out of range [0, {in_f}]")
    if not isinstance(k_out, int) or not 0 <= k_out <= out_f:
        raise ValueError(f"k_out={k_out!r} out of range [0, {out_f}]")
    if x.shape[-1] < k_in:
        raise ValueError(f"x's last dim {x.shape[-1]} is smaller than k_in={k_in}")
    if bias is not None:
        _float("bias", bias)
        if bias.dim() != 1 or bias.shape[0] < k_out:
            raise ValueError(f"bias must be 1-D with at least k_out={k_out} entries, got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} must be one of {ACTIVATIONS} (or None)")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}"
                         + ("" if bias is None else f", {bias.dtype}"))
    if x.device != weight.device or (bias is not None and bias.device != weight.device):
        raise ValueError("x, weight and bias must be on one device")
