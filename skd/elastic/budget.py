"""Budgets: analytic MACs of any subnet, the uniform family, and MACs/latency budget selection.

MACs per sample are linear in the widths: other + Σ_b attn_coef[b]·r_b + mlp_coef[b]·h_b, where per kept
dim of every head a block pays its q, k, v rows and o column over all tokens plus one dim of the scores
q k^T and of attn @ v per sequence, and per hidden unit its fc1 row and fc2 column over all tokens.
Text models count at the adapter's nominal tokens per sequence (`BlockSpec.tokens`).

Width granularity g (`multiple_of`): budget-chosen widths are multiples of g, a module's full width, or 0.
GPUs want it: SDPA's flash kernels need head dims in multiples of 8 and tensor-core GEMMs want aligned sizes
(on an H200 the extracted ViT-S at floor-uniform widths, head dim 15 at 1/4 of the MACs, ran slower than the
full model); on CPU aligned widths ran 3-5 % faster at equal MACs. g = 1 is floor(t*n) for every module.
For g > 1 the uniform fraction t sets each block's attention width to the allowed width nearest t*hd (an
attention step of 8 is an eighth of a 64-dim head: flooring both modules together would halve the attention
just under 1/4 of the MACs), and the MLP, whose steps are fine, takes the rest of the budget.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Callable, Sequence

from .._checks import check_fraction, check_int
from ..models import BlockSpec
from ..subnet import DropoutList, Subnet


def attn_macs_per_dim(s: BlockSpec) -> int:
    """MACs per sample of one kept dim of every head of block `s`."""
    rows = s.tokens * s.sequences
    return s.num_heads * (rows * (3 * s.dim + s.proj.out_features) + 2 * s.sequences * s.tokens ** 2)


def mlp_macs_per_unit(s: BlockSpec) -> int:
    """MACs per sample of one hidden unit of block `s` (its fc1 row and fc2 column over all tokens)."""
    return s.tokens * s.sequences * (s.fc1.in_features + s.fc2.out_features)


# The default granularity where a model's widths allow it, and the narrowest head it applies to. A step of 8
# is a quarter of a 32-dim head: on the digits ViT (WPAC'd) top-1 at 0.15 of the MACs fell from 93.6 to 87.3 %
# (attention 8 and MLP 24 instead of 4 and 58) and at 0.1 from 81 to 10 % (attention skipped: 8 dims do not
# fit), so 32-dim heads (Swin, MiniLM, the digits ViT) keep 1 unless asked.
ALIGNMENT = 8
MIN_ALIGNED_HEAD_DIM = 64


def multiple_of_for(value: int | None, head_dims: Sequence[int], hiddens: Sequence[int]) -> int:
    """The granularity `value` asks for (an int >= 1; ValueError otherwise), or for None the default:
    ALIGNMENT when every head dim and hidden size is a multiple of it and every head dim is at least
    MIN_ALIGNED_HEAD_DIM (ViT/DeiT-Ti/S/B/L, BERT-base: 64-dim heads), else 1."""
    if value is not None:
        return check_int("multiple_of", value, 1)
    ok = all(n % ALIGNMENT == 0 for n in (*head_dims, *hiddens)) and min(head_dims) >= MIN_ALIGNED_HEAD_DIM
    return ALIGNMENT if ok else 1


def allowed_widths(n: int, g: int) -> list[int]:
    """The widths a module of full width n takes at granularity g, ascending: 0, g, 2g, ... and n."""
    return sorted({*range(0, n + 1, g), n})


def floor_width(t: float, n: int, g: int) -> int:
    """The largest allowed width (`allowed_widths`) at most t*n, for t in [0, 1]."""
    if t >= 1:
        return n
    return math.floor(t * n / g + 1e-9) * g  # +1e-9: i*g/n * n / g must floor to i despite float rounding


def nearest_width(t: float, n: int, g: int) -> int:
    """The allowed width nearest t*n (ties up), for t in [0, 1]."""
    lo = floor_width(t, n, g)
    hi = min(lo + g, n)
    return hi if 2 * t * n + 1e-9 >= lo + hi else lo


class Budgets:
    """MACs, the uniform family and the largest-subnet-under-a-cost search for one model's widths, with
    budget-chosen widths at granularity `multiple_of` (module docstring; None: the default, `multiple_of_for`)."""

    def __init__(self, blocks: Sequence[BlockSpec], other_macs: int, multiple_of: int | None = 1) -> None:
        self.head_dims = tuple(s.head_dim for s in blocks)
        self.hiddens = tuple(s.hidden for s in blocks)
        self.multiple_of = multiple_of_for(multiple_of, self.head_dims, self.hiddens)
        self._other = other_macs
        self._attn_coef = [attn_macs_per_dim(s) for s in blocks]
        self._mlp_coef = [mlp_macs_per_unit(s) for s in blocks]
        self.full = Subnet(attn=self.head_dims, mlp=self.hiddens)
        self.empty = Subnet(attn=[0] * len(self.head_dims), mlp=[0] * len(self.hiddens))

    def __setstate__(self, state: dict) -> None:
        # pickles from before multiple_of existed: their widths were floor-uniform (g = 1)
        self.__dict__.update({"multiple_of": 1, **state})

    @functools.cached_property
    def _uniform_points(self) -> list[float]:
        """g = 1: every distinct uniform subnet is reached at one of these fractions (widths floor(t*n))."""
        return sorted({i / n for n in (*self.head_dims, *self.hiddens) for i in range(n + 1)})

    @functools.cached_property
    def _aligned(self) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], list[tuple[int, int]]]:
        """g > 1: (attention patterns, MLP patterns, family members (attention index, MLP index) ascending in
        MACs).

        Attention pattern k holds where t is in [start_k, start_k+1): each block's width nearest t*hd. MLP
        pattern j is each block's floor width at the j-th point where one changes (per block proportional
        to its hidden size). Pattern k's members are the (k, j) whose MACs lie in its share of the MACs,
        [M(start_k), M(start_k+1)) with M(t) = other + t * (full - other) (the last share includes full):
        a budget gets the attention its fraction rounds to and the largest MLP that fits beside it, and the
        members ascend in MACs (shares are disjoint and ascending, the MLP patterns nested), so a bigger
        budget never gets fewer MACs. Built on first use: O(patterns * blocks + attention x MLP patterns).
        """
        g, heads, hiddens = self.multiple_of, self.head_dims, self.hiddens
        starts = sorted({0.0} | {(a + b) / (2 * n) for n in heads for a, b in itertools.pairwise(allowed_widths(n, g))})
        attn = [tuple(nearest_width(t, n, g) for n in heads) for t in starts]
        points = sorted({w / n for n in hiddens for w in allowed_widths(n, g)})
        mlp = [tuple(floor_width(t, n, g) for n in hiddens) for t in points]
        attn_macs = [sum(c * w for c, w in zip(self._attn_coef, a, strict=True)) for a in attn]
        mlp_macs = [sum(c * w for c, w in zip(self._mlp_coef, m, strict=True)) for m in mlp]
        full = self.macs(self.full)
        body = full - self._other
        members = []
        for k, (start, a_macs) in enumerate(zip(starts, attn_macs, strict=True)):
            lo = self._other + start * body
            hi = full + 1 if k == len(starts) - 1 else self._other + starts[k + 1] * body  # MACs are ints
            members += [(k, j) for j, m_macs in enumerate(mlp_macs) if lo <= self._other + a_macs + m_macs < hi]
        return attn, mlp, members

    def macs(self, s: Subnet) -> int:
        """MACs per sample of the (validated) subnet `s`."""
        return self._other + sum(a * r for a, r in zip(self._attn_coef, s.attn, strict=True)) + sum(
            m * h for m, h in zip(self._mlp_coef, s.mlp, strict=True))

    def uniform(self, keep: float) -> Subnet:
        """The subnet keeping the fraction `keep` of every module: floor(keep * n) dims of every head and MLP
        (g = 1); for g > 1 the allowed width nearest keep * hd per head and the floor one per MLP."""
        keep, g = check_fraction("keep", keep), self.multiple_of
        attn_width = floor_width if g == 1 else nearest_width
        return Subnet(attn=[attn_width(keep, n, g) for n in self.head_dims],
                      mlp=[floor_width(keep, n, g) for n in self.hiddens])

    def family(self, dropout_list: DropoutList | None) -> tuple[int, Callable[[int], Subnet]]:
        """(count, j -> j-th subnet), largest first, ascending in MACs from the last: the dropout list's
        prefixes (never aligned: PIAD's order), else the uniform subnets (g = 1) or the aligned family
        (`_aligned`).

        Lazy, so a budget lookup costs O(log count) subnets, not the whole family.
        """
        if dropout_list is not None:
            return len(dropout_list) + 1, dropout_list.subnet
        if self.multiple_of > 1:
            attn, mlp, members = self._aligned
            return len(members), lambda j: Subnet(attn=attn[members[-1 - j][0]], mlp=mlp[members[-1 - j][1]])
        points = self._uniform_points  # ascending, points[0] == 0
        return len(points), lambda j: self.empty if j == len(points) - 1 else self.uniform(points[-1 - j])

    def narrowest(self, dropout_list: DropoutList | None) -> Subnet:
        """The family's smallest subnet that keeps any width: the end of the dropout list, else the smallest
        non-empty uniform or aligned subnet."""
        count, nth = self.family(dropout_list)
        smallest = nth(count - 1)
        return nth(count - 2) if smallest == self.empty and count > 1 else smallest

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
