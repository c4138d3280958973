"""Subnetwork widths and the PIAD dropout list that orders their truncation.

A `Subnet` says, per block, how many leading dims of every attention head and how many leading MLP
hidden units are kept. A `DropoutList` is an ordered list of droppable units; dropping its first s
units gives `subnet(s)`. Only a module's current last kept group is ever appended, so every prefix of
the list is a prefix truncation of every module (prefix-consistency by construction).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ._checks import check_int

MODULES = ("attn", "mlp")


@dataclass(frozen=True)
class Subnet:
    """Per-block widths of a subnetwork.

    attn[b]: dims kept in every head of block b, 0..head_dim (0 skips the attention branch).
    mlp[b]:  MLP hidden units kept in block b, 0..hidden (0 skips the MLP branch).
    Types are checked here; ranges are checked against a model by `validate`.
    """

    attn: tuple[int, ...]
    mlp: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in MODULES:
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
                raise ValueError(f"subnet.{name} must be a list of ints, got {values!r}")
            values = tuple(check_int(f"subnet.{name}[{i}]", v) for i, v in enumerate(values))
            object.__setattr__(self, name, values)  # frozen: normalise lists to hashable tuples
        if len(self.attn) != len(self.mlp):
            raise ValueError(f"subnet.attn has {len(self.attn)} blocks but subnet.mlp has {len(self.mlp)}")

    def validate(self, head_dims: Sequence[int], hiddens: Sequence[int]) -> None:
        """Raise ValueError naming the entry when a width is outside 0..full for this model."""
        for name, full in (("attn", head_dims), ("mlp", hiddens)):
            values = getattr(self, name)
            if len(values) != len(full):
                raise ValueError(f"subnet.{name} has {len(values)} entries, the model has {len(full)} blocks")
            for i, (v, n) in enumerate(zip(values, full, strict=True)):
                if not 0 <= v <= n:
                    raise ValueError(f"subnet.{name}[{i}]={v} is outside 0..{n}")

    def to_dict(self) -> dict[str, list[int]]:
        """{"attn": [...], "mlp": [...]}: plain JSON-serialisable widths."""
        return {"attn": list(self.attn), "mlp": list(self.mlp)}

    @classmethod
    def from_dict(cls, d: dict[str, list[int]]) -> Subnet:
        """Inverse of `to_dict` (types checked; ranges are checked by `validate`)."""
        return cls(attn=d["attn"], mlp=d["mlp"])


class Group(NamedTuple):
    """One droppable group of a module: its index and the dims [start, stop) it covers."""

    index: int
    start: int
    stop: int


def group_bound(g: int, size: int, groups: int) -> int:
    """First dim of group g when `size` dims are split into `groups` groups: round(g*size/groups)."""
    return (2 * g * size + groups) // (2 * groups)  # integer round-half-up: no float drift


class DropoutList:
    """Ordered droppable units (block, "attn"|"mlp"); the n-th occurrence of a module drops its last kept group.

    head_dims[b], hiddens[b]: full widths of block b. Attention group g of block b covers dims
    [round(g*hd/G), round((g+1)*hd/G)) of every head (q, k and v together), G = attn_groups; MLP
    groups likewise over the hidden units with mlp_groups.
    """

    def __init__(
        self,
        units: Iterable[tuple[int, str]],
        head_dims: Sequence[int],
        hiddens: Sequence[int],
        attn_groups: int = 8,
        mlp_groups: int = 32,
    ) -> None:
        if len(head_dims) != len(hiddens):
            raise ValueError(f"head_dims has {len(head_dims)} blocks but hiddens has {len(hiddens)}")
        for name, sizes in (("head_dims", head_dims), ("hiddens", hiddens)):
            for i, n in enumerate(sizes):
                check_int(f"{name}[{i}]", n, 1)
        for name, g in (("attn_groups", attn_groups), ("mlp_groups", mlp_groups)):
            check_int(name, g, 1)
        self.head_dims = tuple(head_dims)
        self.hiddens = tuple(hiddens)
        self.attn_groups = attn_groups
        self.mlp_groups = mlp_groups
        self._units: list[tuple[int, str]] = []
        self._dropped: Counter[tuple[int, str]] = Counter()
        for unit in units:
            self.append(unit)

    @property
    def units(self) -> list[tuple[int, str]]:
        """A copy of the ordered (block, "attn"|"mlp") units."""
        return list(self._units)

    def __len__(self) -> int:
        return len(self._units)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DropoutList) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"DropoutList({len(self)} units over {len(self.head_dims)} blocks)"

    def _size_groups(self, module: str, block: int) -> tuple[int, int]:
        if module == "attn":
            return self.head_dims[block], self.attn_groups
        return self.hiddens[block], self.mlp_groups

    def _check_unit(self, unit: object) -> tuple[int, str]:
        if not (isinstance(unit, (tuple, list)) and len(unit) == 2):
            raise ValueError(f"unit must be a (block_index, 'attn'|'mlp') pair, got {unit!r}")
        block, module = check_int("unit block index", unit[0]), unit[1]
        if not 0 <= block < len(self.head_dims):
            raise ValueError(f"unit block index {block} is outside 0..{len(self.head_dims) - 1}")
        if module not in MODULES:
            raise ValueError(f"unit module must be 'attn' or 'mlp', got {module!r}")
        return block, module

    def append(self, unit: tuple[int, str]) -> None:
        """Drop `unit`'s module's current last kept group next; ValueError if it has none left."""
        block, module = self._check_unit(unit)
        _, groups = self._size_groups(module, block)
        if self._dropped[block, module] >= groups:
            raise ValueError(f"unit {unit!r}: block {block} {module} has no group left to drop")
        self._units.append((block, module))
        self._dropped[block, module] += 1

    def _check_index(self, s: int) -> int:
        if not 0 <= check_int("index", s) <= len(self):
            raise ValueError(f"index={s} is outside 0..{len(self)} (the dropout list's length)")
        return s

    def _dropped_after(self, s: int) -> Counter[tuple[int, str]]:
        return self._dropped if s == len(self) else Counter(self._units[:s])

    def subnet(self, s: int) -> Subnet:
        """The subnetwork with the first s units dropped (s in 0..len)."""
        dropped = self._dropped_after(self._check_index(s))
        widths = {
            m: [group_bound(self._size_groups(m, b)[1] - dropped[b, m], *self._size_groups(m, b))
                for b in range(len(self.head_dims))]
            for m in MODULES
        }
        return Subnet(attn=widths["attn"], mlp=widths["mlp"])

    def droppable(self, s: int | None = None) -> dict[tuple[int, str], Group]:
        """Each module's current last kept group after the first s units (default: all) are dropped.

        Modules with nothing left are absent. Appending one of these keys is always valid (for s = len).
        """
        dropped = self._dropped_after(len(self) if s is None else self._check_index(s))
        out: dict[tuple[int, str], Group] = {}
        for b in range(len(self.head_dims)):
            for m in MODULES:
                size, groups = self._size_groups(m, b)
                g = groups - dropped[b, m] - 1
                if g >= 0:
                    out[b, m] = Group(g, group_bound(g, size, groups), group_bound(g + 1, size, groups))
        return out

    def unit_group(self, n: int) -> Group:
        """The group that the n-th unit of the list drops (n in 0..len-1)."""
        if not 0 <= check_int("n", n) < len(self):
            raise ValueError(f"n={n} is outside 0..{len(self) - 1}")
        block, module = self._units[n]
        size, groups = self._size_groups(module, block)
        g = groups - self._units[: n + 1].count((block, module))
        return Group(g, group_bound(g, size, groups), group_bound(g + 1, size, groups))

    def to_json(self) -> str:
        """The list, its widths and group counts as a JSON document (see `from_json`)."""
        return json.dumps({
            "units": [list(u) for u in self._units],
            "head_dims": list(self.head_dims),
            "hiddens": list(self.hiddens),
            "attn_groups": self.attn_groups,
            "mlp_groups": self.mlp_groups,
        })

    @classmethod
    def from_json(cls, text: str) -> DropoutList:
        """Inverse of `to_json`; ValueError on malformed text."""
        try:
            d = json.loads(text)
            return cls([tuple(u) for u in d["units"]], d["head_dims"], d["hiddens"],
                       d["attn_groups"], d["mlp_groups"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"text is not a DropoutList JSON document: {e}") from e
