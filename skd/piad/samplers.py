"""Subnet samplers: one class per training method, behind one interface.

Every step the trainer draws a strength t ∈ [0, 1] (`ProgressiveSchedule.strength`) and asks the
method's sampler for that step's `Draw`: the subnet to run and, for dropout by masking, the channel
masks. All processes draw from the same seeded generator, so they train the same subnet. With
p = t·(1 − target_macs):

- "piad": the Dropout List's first s = min(L, floor(t·(L+1))) units dropped (L its length); the list
  grows by importance in the progressive epochs (`skd.piad.schedule`);
- "random": random truncation with no importance list — t = 0 full, t = 1 every module at its
  smallest width, otherwise each module keeps a uniform random number of its groups in
  [ceil(G·target_macs), G] (computed at its own size);
- "channel_dropout": every MHSA dim (rank index, q/k/v of all heads) and MLP hidden unit is dropped
  independently with probability p, one mask per batch, by masking;
- "weighted_channel_dropout": as above with probability min(1, p·w_i), w_i = 2·rank_i/(n-1) ∈ [0, 2]
  the dim's ascending-importance rank within its module (the most important dim is never dropped);
- "layerdrop": every block (both branches) is skipped with probability p.

Adding an ablation = one `SubnetSampler` subclass decorated with `@method("name")`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..elastic import ElasticViT, Masks
from ..importance import Importance, extend_dropout_list, macs_per_dim
from ..subnet import DropoutList, Subnet, group_bound

# estimate(subnet or None for full) -> the importance of that subnet on the proxy set
Estimate = Callable[[Subnet | None], Importance]

SAMPLERS: dict[str, type[SubnetSampler]] = {}


def method(name: str) -> Callable[[type[SubnetSampler]], type[SubnetSampler]]:
    """Class decorator registering a sampler under the training method `name`."""
    def register(cls: type[SubnetSampler]) -> type[SubnetSampler]:
        cls.name = name
        SAMPLERS[name] = cls
        return cls
    return register


@dataclass(frozen=True)
class Draw:
    """One step's choice: the subnet to run, channel masks (empty unless dropout by masking; each mask
    float32 (kept width,) on the model's device) and a description for error messages."""

    subnet: Subnet
    masks: Masks = field(default_factory=dict)
    what: str = ""


class SubnetSampler:
    """Turns a step's strength t into a `Draw`; may hold state refreshed from importance.

    elastic: the super-network; dropout_list: the trainer's list (its group counts give the random
    baseline's group bounds; only "piad" fills it); target_macs: the smallest subnet's MACs fraction.
    """

    name: ClassVar[str]
    uses_importance: ClassVar[bool] = False  # refreshed at the start of each progressive epoch

    def __init__(self, elastic: ElasticViT, dropout_list: DropoutList, target_macs: float) -> None:
        self.elastic, self.dropout_list, self.target_macs = elastic, dropout_list, target_macs
        self.device = next(elastic.parameters()).device

    def refresh(self, estimate: Estimate, goal_macs: float) -> None:
        """Update from importance at the start of a progressive epoch (only if `uses_importance`)."""

    def draw(self, t: float, gen: torch.Generator) -> Draw:
        """The step's Draw for strength t; random choices come from `gen` (shared by all processes)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """JSON-able state a checkpoint keeps: the dropout list and per-module dropout weights."""
        return {"dropout_list": self.dropout_list.to_json(), "weights": {}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Inverse of `state`; the model follows the list only for "piad"."""
        self.dropout_list = DropoutList.from_json(state["dropout_list"])
        self.elastic.dropout_list = None

    @property
    def full(self) -> Subnet:
        return Subnet(attn=self.elastic.head_dims, mlp=self.elastic.hiddens)

    def drop_probability(self, t: float) -> float:
        """p = t·(1 − target_macs): the baselines' drop rate at strength t."""
        return t * (1 - self.target_macs)


@method("piad")
class DropoutListSampler(SubnetSampler):
    """Truncates along the importance-ordered Dropout List, which grows toward the schedule's goal."""

    uses_importance = True

    def __init__(self, elastic: ElasticViT, dropout_list: DropoutList, target_macs: float) -> None:
        super().__init__(elastic, dropout_list, target_macs)
        self._per_dim = macs_per_dim(elastic)

    def refresh(self, estimate: Estimate, goal_macs: float) -> None:
        extend_dropout_list(self.dropout_list, estimate(self.dropout_list.subnet(len(self.dropout_list))),
                            self._per_dim, goal_macs)
        self.elastic.dropout_list = self.dropout_list

    def draw(self, t: float, gen: torch.Generator) -> Draw:
        s = min(len(self.dropout_list), int(t * (len(self.dropout_list) + 1)))
        return Draw(self.dropout_list.subnet(s), what=f"dropout-list index {s}")

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.elastic.dropout_list = self.dropout_list


@method("random")
class RandomTruncationSampler(SubnetSampler):
    """Each module keeps a uniform random number of its groups (no importance list)."""

    def draw(self, t: float, gen: torch.Generator) -> Draw:
        el, dl = self.elastic, self.dropout_list
        widths: dict[str, list[int]] = {"attn": [], "mlp": []}
        for m, sizes, groups in (("attn", el.head_dims, dl.attn_groups), ("mlp", el.hiddens, dl.mlp_groups)):
            lo = math.ceil(groups * self.target_macs)
            for n in sizes:
                keep = groups if t == 0 else lo if t == 1 else int(torch.randint(lo, groups + 1, (1,), generator=gen))
                widths[m].append(group_bound(keep, n, groups))
        return Draw(Subnet(**widths), what="random truncation")


@method("channel_dropout")
class ChannelDropoutSampler(SubnetSampler):
    """Full width; every attention rank dim and MLP hidden unit dropped with probability p (by masking)."""

    def weight(self, block: int, module: str, width: int) -> torch.Tensor:
        """(width,) float32 per-dim multiplier of the drop probability."""
        return torch.ones(width)

    def draw(self, t: float, gen: torch.Generator) -> Draw:
        p, el, masks = self.drop_probability(t), self.elastic, {}
        for b in range(len(el.head_dims)):
            for m, n in (("attn", el.head_dims[b]), ("mlp", el.hiddens[b])):
                prob = (p * self.weight(b, m, n)).clamp(max=1)
                masks[b, m] = (torch.rand(n, generator=gen) >= prob).to(self.device, torch.float32)
        return Draw(self.full, masks, f"{self.name} p={p:.3f}")


@method("weighted_channel_dropout")
class WeightedChannelDropoutSampler(ChannelDropoutSampler):
    """Channel dropout with probability min(1, p·w_i), w_i from the dim's importance rank in its module."""

    uses_importance = True

    def __init__(self, elastic: ElasticViT, dropout_list: DropoutList, target_macs: float) -> None:
        super().__init__(elastic, dropout_list, target_macs)
        self._weights: dict[tuple[int, str], torch.Tensor] = {}

    def refresh(self, estimate: Estimate, goal_macs: float) -> None:
        self._weights = self.rank_weights(estimate(None))

    @staticmethod
    def rank_weights(imp: Importance) -> dict[tuple[int, str], torch.Tensor]:
        """w_i = 2·(ascending importance rank)/(n-1) per module: mean 1, 0 for the least droppable dim."""
        out = {}
        for mod in imp.alpha:
            n = len(imp.alpha[mod])
            rank = torch.empty(n, dtype=torch.float32)
            rank[torch.argsort(imp.dims(mod), descending=True)] = torch.arange(n, dtype=torch.float32)
            out[mod] = 2 * rank / max(n - 1, 1)
        return out

    def weight(self, block: int, module: str, width: int) -> torch.Tensor:
        return self._weights[block, module]

    def state(self) -> dict[str, Any]:
        return super().state() | {"weights": {f"{b},{m}": w.tolist() for (b, m), w in self._weights.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self._weights = {(int(k.split(",")[0]), k.split(",")[1]): torch.tensor(w) for k, w in state["weights"].items()}


@method("layerdrop")
class LayerDropSampler(SubnetSampler):
    """Every block (both branches) skipped with probability p."""

    def draw(self, t: float, gen: torch.Generator) -> Draw:
        p, el = self.drop_probability(t), self.elastic
        keep = (torch.rand(len(el.head_dims), generator=gen) >= p).tolist()
        return Draw(Subnet(attn=[n * k for n, k in zip(el.head_dims, keep, strict=True)],
                           mlp=[n * k for n, k in zip(el.hiddens, keep, strict=True)]), what=f"layerdrop p={p:.3f}")


METHODS = tuple(SAMPLERS)
