"""Subnet widths that torch.compile keeps symbolic, so one compiled graph serves every width.

Dynamo specializes every plain int it reads from an nn.Module (the active subnet lives on the
ElasticViT), so each new width would trace and compile a new graph. A `DynamicInt` (torch's int subclass
that Dynamo always traces as a SymInt, wherever it is read) carries the same value: eager code sees an
int, the compiler a symbolic size, and `prefix_linear`'s k_in/k_out are SymInt in its schema, so the
widths stay symbolic through the GEMMs. Graphs still differ where control flow does: a width of 0 skips
its branch (the guard `width != 0` splits them).
"""

from __future__ import annotations

import functools

from ..subnet import Subnet

try:
    from torch.fx.experimental.sym_node import DynamicInt
except ImportError:  # an older torch without DynamicInt: widths stay plain ints (one graph per width)
    DynamicInt = int


class Width(DynamicInt):
    """A width that prints as the plain int it is (widths appear in error messages). Built by int's own
    constructor: DynamicInt's checks in Python cost 3x more, and set_subnet builds one per module."""

    __new__ = int.__new__
    __repr__ = int.__repr__
    __str__ = int.__repr__


@functools.lru_cache(maxsize=64)
def symbolic_widths(subnet: Subnet) -> Subnet:
    """`subnet`'s widths, each a distinct `Width` (a DynamicInt; a plain int on a torch without one).

    Distinct objects, never one shared by blocks of equal width: Dynamo gives one DynamicInt object one
    symbol, which would tie the widths of a uniform subnet together in the traced graph. Cached per subnet
    (a Subnet is an immutable value): switching among a few budgets then costs a lookup, not a rebuild.
    """
    return Subnet(attn=[Width(v) for v in subnet.attn], mlp=[Width(v) for v in subnet.mlp])
