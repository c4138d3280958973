"""Budgets: analytic MACs of any subnet, the uniform family, and MACs/latency budget selection.

MACs per sample are linear in the widths: other + Σ_b attn_coef[b]·r_b + mlp_coef[b]·h_b, where per kept
dim of every head a block pays its q, k, v rows and o column over all tokens plus one dim of the scores
q k^T and of attn @ v per sequence, and per hidden unit its fc1 row and fc2 column over all tokens.
Text models count at the adapter's nominal tokens per sequence (`BlockSpec.tokens`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

from .._checks import check_fraction
from ..models import BlockSpec
from ..subnet import DropoutList, Subnet


def attn_macs_per_dim(s: BlockSpec) -> int:
    """MACs per sample of one kept dim of every head of block `s`."""
    rows = s.tokens * s.sequences
    return s.num_heads * (rows * (3 * s.dim + s.proj.out_features) + 2 * s.sequences * s.tokens ** 2)


def mlp_macs_per_unit(s: BlockSpec) -> int:
    """MACs per sample of one hidden unit of block `s` (its fc1 row and fc2 column over all tokens)."""
    return s.tokens * s.sequences * (s.fc1.in_features + s.fc2.out_features)


class Budgets:
    """MACs, the uniform family and the largest-subnet-under-a-cost search for one model's widths."""

    def __init__(self, blocks: Sequence[BlockSpec], other_macs: int) -> None:
        self.head_dims = tuple(s.head_dim for s in blocks)
        self.hiddens = tuple(s.hidden for s in blocks)
        self._other = other_macs
        self._attn_coef = [attn_macs_per_dim(s) for s in blocks]
        self._mlp_coef = [mlp_macs_per_unit(s) for s in blocks]
        # Every distinct uniform subnet is reached at one of these fractions (widths are floor(t*n)).
        self._uniform_points = sorted({i / n for n in (*self.head_dims, *self.hiddens) for i in range(n + 1)})
        self.full = Subnet(attn=self.head_dims, mlp=self.hiddens)
        self.empty = Subnet(attn=[0] * len(self.head_dims), mlp=[0] * len(self.hiddens))

    def macs(self, s: Subnet) -> int:
        """MACs per sample of the (validated) subnet `s`."""
        return self._other + sum(a * r for a, r in zip(self._attn_coef, s.attn, strict=True)) + sum(
            m * h for m, h in zip(self._mlp_coef, s.mlp, strict=True))

    def uniform(self, keep: float) -> Subnet:
        """The subnet keeping floor(keep * n) dims of every module (every head, every MLP)."""
        keep = check_fraction("keep", keep)
        # +1e-9: i/n * n must floor to i despite float rounding.
        return Subnet(attn=[math.floor(keep * n + 1e-9) for n in self.head_dims],
                      mlp=[math.floor(keep * n + 1e-9) for n in self.hiddens])

    def family(self, dropout_list: DropoutList | None) -> tuple[int, Callable[[int], Subnet]]:
        """(count, j -> j-th subnet), largest first: the dropout list's prefixes, else the uniform subnets.

        Lazy, so a budget lookup costs O(log count) subnets, not the whole family.
        """
        if dropout_list is not None:
            return len(dropout_list) + 1, dropout_list.subnet
        points = self._uniform_points  # ascending, points[0] == 0
        return len(points), lambda j: self.empty if j == len(points) - 1 else self.uniform(points[-1 - j])

    def largest_under(self, dropout_list: DropoutList | None, cost: Callable[[Subnet], float], limit: float,
                      name: str, value: float) -> Subnet:
        """The largest subnet of the family with cost(subnet) <= limit (cost is non-increasing along it);
        ValueError naming `name`=`value` when even the smallest is over."""
        count, nth = self.family(dropout_list)
        lo, hi = 0, count  # bisect the first candidate within the limit
        while lo < hi:
            mid = (lo + hi) // 2
            if cost(nth(mid)) <= limit:
                hi = mid
            else:
                lo = mid + 1
        if lo == count:
            raise ValueError(f"{name}={value} is below the smallest reachable subnetwork "
                             f"({cost(nth(count - 1)):.4g} vs limit {limit:.4g})")
        return nth(lo)


class LatencyTable:
    """Measured (MACs, ms) points, monotonised, predicting latency by linear interpolation in MACs."""

    def __init__(self, measured: Sequence[tuple[int, float]]) -> None:
        running, self.points = 0.0, []
        for m, ms in sorted(measured):  # measurement noise must not make a bigger subnet look faster
            running = max(running, ms)
            self.points.append((m, running))

    def predict_ms(self, macs: int) -> float:
        xs, mono = zip(*self.points, strict=True)
        k = bisect.bisect_left(xs, macs)
        if k == 0:
            return mono[0] * macs / xs[0] if xs[0] else mono[0]
        if k == len(xs):
            return mono[-1] * macs / xs[-1]
        w = (macs - xs[k - 1]) / (xs[k] - xs[k - 1])
        return mono[k - 1] + w * (mono[k] - mono[k - 1])
