"""Argument checks shared by skd's entry points, with one message format: "name=value must be ...".

bool is an int subclass, and True as a width, count or fraction is always a bug: every check refuses it.
"""

from __future__ import annotations

import math
import numbers


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """`value` if it is an int (not a bool) and, when `minimum` is given, >= minimum; else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ValueError(f"{name}={value!r} must be an int" + ("" if minimum is None else f" >= {minimum}"))
    return value


def _finite_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return float(value)


def check_fraction(name: str, value: object, *, include_one: bool = True) -> float:
    """float(value) for a finite real in (0, 1] (or (0, 1) when include_one is False); else ValueError."""
    f = _finite_real(name, value)
    if not (0 < f <= 1 if include_one else 0 < f < 1):
        raise ValueError(f"{name}={value!r} must be in (0, 1{']' if include_one else ')'}")
    return f


def check_positive(name: str, value: object) -> float:
    """float(value) for a finite real > 0; else ValueError."""
    f = _finite_real(name, value)
    if f <= 0:
        raise ValueError(f"{name}={value!r} must be > 0")
    return f
