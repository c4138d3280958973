"""`weighted_covariance`: streaming weighted second moments, per group, in one read of the batch.

Kernels: csrc/cpu/weighted_covariance.cpp, csrc/cuda/weighted_covariance.cu,
skd_kernels/triton/weighted_covariance.py; `reference` below is the oracle and last fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _dispatch, _ops
from .._common import FLOAT_DTYPES, accumulation_dtype, check_finite_result, check_float, check_nonnegative
from ..distributed import all_reduce_flat

OP = "weighted_covariance"
UPDATE_OP = "weighted_covariance_update"
# Results up to this many entries are checked for NaN/overflow whole rather than through their diagonal
# (kCheckWhole in csrc/cpu/weighted_covariance.cpp is the same rule).
_CHECK_WHOLE = 4096


@dataclass
class CovState:
    """Sufficient statistics of a weighted sample, accumulated in float64 across batches.

    weight_sum: () Σw, sum: (G, r) Σ w x, sum_outer: (G, r, r) Σ w x x^T; all float64.
    """

    weight_sum: torch.Tensor
    sum: torch.Tensor
    sum_outer: torch.Tensor

    @classmethod
    def zeros(cls, groups: int, r: int, device: torch.device | str = "cpu") -> CovState:
        f64 = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros((), **f64), torch.zeros(groups, r, **f64), torch.zeros(groups, r, r, **f64))

    @property
    def groups(self) -> int:
        return self.sum.shape[0]

    def add_(self, weight_sum: torch.Tensor, s: torch.Tensor, sum_outer: torch.Tensor) -> CovState:
        """Adds one batch's fp32 statistics (as returned by a backend) in float64."""
        # In-place adds promote to the float64 state exactly, without a float64 copy of each operand.
        self.weight_sum += weight_sum
        self.sum += s
        self.sum_outer += sum_outer
        return self

    def merge(self, other: CovState) -> CovState:
        """Adds `other`'s statistics into this state (in place) and returns it."""
        if other.sum_outer.shape != self.sum_outer.shape:
            raise ValueError(f"cannot merge states of shapes {tuple(self.sum_outer.shape)} and "
                             f"{tuple(other.sum_outer.shape)}")
        return self.add_(other.weight_sum, other.sum, other.sum_outer)

    def all_reduce(self, group: object = None) -> CovState:
        """Sums the statistics of every process of `group` (torch.distributed), in place, in one collective."""
        all_reduce_flat((self.weight_sum, self.sum, self.sum_outer), group)
        return self

    def mean(self) -> torch.Tensor:
        """(G, r) float64 weighted mean μ = Σ w x / Σ w."""
        if float(self.weight_sum) <= 0:
            raise ValueError("the state holds no weight (Σw = 0): feed it samples with positive weight")
        return self.sum / self.weight_sum

    def covariance(self) -> torch.Tensor:
        """(G, r, r) float64 centred weighted covariance Σ w (x-μ)(x-μ)^T / Σ w."""
        mu = self.mean()
        cov = self.sum_outer / self.weight_sum - mu[:, :, None] * mu[:, None, :]
        return 0.5 * (cov + cov.transpose(1, 2))


def weighted_covariance(
    x: torch.Tensor, w: torch.Tensor, groups: int = 1, state: CovState | None = None
) -> CovState:
    """Adds a batch to per-group weighted covariance statistics and returns the state.

    x: (N, G*r) fp32/bf16/fp16/fp64 — N samples, G groups of r features (group g is columns g*r:(g+1)*r).
    w: (N,) >= 0 sample weights. groups: G. state: a CovState to update in place (a new one if None).
    Within the batch the sums are fp32 (float64 for float64 x); across batches float64. x and w are read once.

    Equivalent to::

        xg = x.float().view(N, G, r)
        state.weight_sum += w.sum(); state.sum += einsum("n,ngi->gi", w, xg)
        state.sum_outer += einsum("n,ngi,ngj->gij", w, xg, xg)
    """
    check(x, w, groups)
    acc = accumulation_dtype(x.dtype)
    if w.dtype != acc:  # weights are never rounded to x's dtype: fp32 (fp64 for fp64 x) on every backend
        w = w.to(acc)
    kernel = _dispatch.kernel(OP, x.device, x.dtype)
    if kernel is _CPU_KERNEL and _CPU_UPDATE is not None:
        # The CPU extension checks, and adds into the state, in the same native call (csrc/cpu/
        # weighted_covariance.cpp); when it raises (a failed check, a state of the wrong shape or dtype), the
        # path below runs again and names the culprit.
        try:  # (not contextlib.suppress: its enter/exit cost 1 µs)
            if state is None:
                return CovState(*_CPU_UPDATE(x, w, groups, None, None, None))
            state.weight_sum, state.sum, state.sum_outer = _CPU_UPDATE(x, w, groups, state.weight_sum, state.sum,
                                                                       state.sum_outer)
            return state
        except RuntimeError:
            pass
    if state is not None and state.sum.shape != (groups, x.shape[1] // groups):
        raise ValueError(f"state has shape {tuple(state.sum.shape)}, x gives ({groups}, {x.shape[1] // groups})")
    weight_sum, s, sum_outer = kernel(x, w, groups)
    # Checked before the state is touched. NaN/Inf in w shows in Σw (or, -Inf, in min w); in x, in the
    # diagonal Σ w x_i² (w = 0 gives 0·Inf = NaN). A finite Σw and diagonal bound Σ w x and the off-diagonal
    # entries (Cauchy-Schwarz), so these d + 1 numbers prove the whole result finite.
    # Small results are checked whole: a contiguous max is cheaper than a strided one over the diagonal.
    check_nonnegative("w", w)
    peaks = sum_outer if sum_outer.numel() <= _CHECK_WHOLE else sum_outer.diagonal(0, 1, 2)
    check_finite_result((weight_sum, peaks), {"w": w, "x": x}, acc)
    if state is None:  # the batch's own sums, in float64, are the new state
        return CovState(weight_sum.double(), s.double(), sum_outer.double())
    return state.add_(weight_sum, s, sum_outer)


def check(x: torch.Tensor, w: torch.Tensor, groups: int) -> None:
    """Raises ValueError naming the bad argument."""
    check_float("x", x)
    check_float("w", w)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, G*r), got shape {tuple(x.shape)}")
    if w.dim() != 1 or w.shape[0] != x.shape[0]:
        raise ValueError(f"w must have shape ({x.shape[0]},) to match x, got {tuple(w.shape)}")
    if x.device != w.device:
        raise ValueError(f"x and w must be on one device, got {x.device} and {w.device}")
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups:
        raise ValueError(f"groups={groups!r} must be a positive int dividing x's width {x.shape[1]}")
    # The values of x and w are checked through the result (weighted_covariance): no extra pass here.


def reference(x: torch.Tensor, w: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    """One batch of weighted second-moment statistics in plain PyTorch.

    x: (N, G*r) fp32/bf16/fp16, w: (N,) >= 0.
    Returns (weight_sum () fp32, sum (G, r) fp32 = Σ w x, sum_outer (G, r, r) fp32 = Σ w x x^T);
    float64 instead of fp32 for float64 x.
    """
    n, d = x.shape
    r = d // groups
    acc = accumulation_dtype(x.dtype)
    xf = x.to(acc).reshape(n, groups, r)
    wf = w.to(acc)
    xw = xf * wf[:, None, None]
    sum_outer = torch.einsum("ngi,ngj->gij", xw, xf)
    return wf.sum(), xw.sum(0), sum_outer


def fake(x: torch.Tensor, w: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    """Output metadata of every backend's kernel (torch.compile, FakeTensorMode)."""
    torch._check(x.dim() == 2 and w.dim() == 1 and w.shape[0] == x.shape[0], lambda: "x (N, G*r), w (N,)")
    torch._check(groups >= 1 and x.shape[1] % groups == 0, lambda: "groups must divide x's width")
    r = x.shape[1] // groups
    acc = dict(dtype=accumulation_dtype(x.dtype), device=x.device)
    return x.new_empty((), **acc), x.new_empty((groups, r), **acc), x.new_empty((groups, r, r), **acc)


def fake_update(
    x: torch.Tensor, w: torch.Tensor, groups: int, weight_sum: torch.Tensor | None, sum: torch.Tensor | None,
    sum_outer: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Output metadata of the CPU extension's weighted_covariance_update: the state's three tensors in float64."""
    return tuple(t.to(torch.float64) for t in fake(x, w, groups))


if _ops.has_schema(OP):
    torch.library.register_fake(f"skd_kernels::{OP}")(fake)
if _ops.has_schema(UPDATE_OP):
    torch.library.register_fake(f"skd_kernels::{UPDATE_OP}")(fake_update)
# The CPU extension's batch kernel and its checked float64 update (None when the extension lacks them).
_CPU_KERNEL = _ops.compiled_kernel(OP, "CPU")
_CPU_UPDATE = _ops.compiled_kernel(UPDATE_OP, "CPU")

_dispatch.register_op(OP, {
    "cuda": _dispatch.compiled(OP, "CUDA"),
    "triton": _dispatch.triton(OP),
    "cpu": _dispatch.compiled(OP, "CPU"),
    "reference": _dispatch.Kernel(reference, FLOAT_DTYPES),
})
