"""The progressive schedule: when the Dropout List grows, how far, and how strong each step's subnet is.

List growth (method "piad"): at the start of each of the first P_e (`progressive_epochs`) epochs
the importance of the current list-end subnet is re-estimated on the proxy set and the least
important droppable units are appended until the list's dropped MACs reach

    goal(epoch) = (epoch + 1) / P_e · (1 − target_macs) · full MACs,

so after epoch P_e − 1 the list's smallest subnet sits at the target, and the list stays fixed after.
Refresh rule: importance is re-estimated exactly in those first P_e epochs (for "piad" and for
"weighted_channel_dropout", whose dropout weights follow the importance ranks).

Strength: every step draws t ∈ [0, 1] from the generator all processes share: t = 0 (the full
network) with probability 1/4, t = 1 (the smallest subnet) with probability 1/4, else uniform — a
sandwich-style mixture that trains both ends of the range every few steps. Each sampler
(`skd.piad.samplers`) turns t into its own subnet or masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProgressiveSchedule:
    """target_macs in (0, 1): the list's final smallest subnet as a fraction of the full MACs;
    progressive_epochs (P_e >= 1): how many first epochs grow the list / refresh importance."""

    target_macs: float
    progressive_epochs: int

    def refreshes(self, epoch: int) -> bool:
        """Whether importance is re-estimated at the start of `epoch` (0-based)."""
        return epoch < self.progressive_epochs

    def goal_macs(self, epoch: int, full_macs: int) -> float:
        """MACs per image the list must drop after growing at the start of `epoch` (formula above)."""
        return (epoch + 1) / self.progressive_epochs * (1 - self.target_macs) * full_macs

    @staticmethod
    def strength(gen: torch.Generator) -> float:
        """t = 0 w.p. 1/4, 1 w.p. 1/4, else U[0, 1): two float64 draws from `gen`."""
        u, v = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        return 0.0 if u < 0.25 else 1.0 if u < 0.5 else v
