"""`weighted_covariance`: streaming weighted second moments, per group, in one read of the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dispatch import select
from ._validate import check_covariance, check_finite_result


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
        self.weight_sum += weight_sum.double()
        self.sum += s.double()
        self.sum_outer += sum_outer.double()
        return self

    def merge(self, other: CovState) -> CovState:
        """Adds `other`'s statistics into this state (in place) and returns it."""
        if other.sum_outer.shape != self.sum_outer.shape:
            raise ValueError(f"cannot merge states of shapes {tuple(self.sum_outer.shape)} and "
                             f"{tuple(other.sum_outer.shape)}")
        return self.add_(other.weight_sum, other.sum, other.sum_outer)

    def all_reduce(self, group: object = None) -> CovState:
        """Sums the statistics of every process of `group` (torch.distributed), in place."""
        import torch.distributed as dist

        flat = torch.cat([self.weight_sum.reshape(1), self.sum.reshape(-1), self.sum_outer.reshape(-1)])
        dist.all_reduce(flat, group=group)
        g, r = self.sum.shape
        self.weight_sum.copy_(flat[0])
        self.sum.copy_(flat[1 : 1 + g * r].view(g, r))
        self.sum_outer.copy_(flat[1 + g * r :].view(g, r, r))
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
    check_covariance(x, w, groups)
    if state is not None and state.sum.shape != (groups, x.shape[1] // groups):
        raise ValueError(f"state has shape {tuple(state.sum.shape)}, x gives ({groups}, {x.shape[1] // groups})")
    if x.dtype != w.dtype:
        w = w.to(x.dtype)
    weight_sum, s, sum_outer = select(x.device, x.dtype).weighted_covariance(x, w, groups)
    # NaN/Inf in x shows in Σwx and the diagonal of Σwxx^T; checked before the state is touched.
    check_finite_result((s, sum_outer.diagonal(dim1=1, dim2=2)), {"x": x})
    if state is None:  # the batch's own sums, in float64, are the new state
        return CovState(weight_sum.double(), s.double(), sum_outer.double())
    return state.add_(weight_sum, s, sum_outer)
