"""Loads the compiled `skd_kernels._C` operators (if built) and says which kernels it registered.

The schemas live in csrc/registration.cpp; each op's fake kernel and autograd are registered by its
front end in skd_kernels/ops/<op>.py (a differentiable op's autograd on its twin, `autograd_twin`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

try:
    from . import _C  # registers torch.ops.skd_kernels.*

    LOAD_ERROR: str | None = None
    # Whether the extension was compiled with csrc/cuda (a CUDA toolkit and a CUDA torch at build time).
    BUILT_WITH_CUDA: bool = bool(_C.WITH_CUDA)
except ImportError as exc:  # a build without the extension still imports; ops fall back
    LOAD_ERROR = str(exc)
    BUILT_WITH_CUDA = False


def has_schema(op: str) -> bool:
    """True when the compiled extension defines operator `skd_kernels::<op>`."""
    return LOAD_ERROR is None and torch._C._dispatch_has_kernel(f"skd_kernels::{op}")


def autograd_twin(op: str) -> str:
    """The qualified name of differentiable `op`'s twin: the same schema and kernels, and the autograd registered
    in Python. `op`'s own Autograd kernel is C++ (csrc/registration.cpp): it runs the op below autograd when no
    gradient is to be recorded and hands the call to the twin when one is, so calls without a gradient skip
    the Python autograd layer (4-14 µs each, e.g. every op of a compiled model under no_grad)."""
    return f"skd_kernels::_{op}_autograd"


def register_differentiable(op: str, fake: Callable[..., object], register_autograd: Callable[[str], None]) -> None:
    """Differentiable compiled `op`'s Python registrations: its fake kernel on it and on its twin, and its autograd
    (`register_autograd(qualname)`) on the twin. Nothing when the extension does not define `op`."""
    if not has_schema(op):
        return
    for qualname in (f"skd_kernels::{op}", autograd_twin(op)):
        torch.library.register_fake(qualname)(fake)
    register_autograd(autograd_twin(op))


def compiled_kernel(op: str, dispatch_key: str) -> torch._ops.OpOverload | None:
    """`torch.ops.skd_kernels.<op>.default` when the extension registered it for `dispatch_key` ("CPU" or
    "CUDA"), else None. Asked once per op at import: a lookup on every call would be traced by torch.compile."""
    if not has_schema(op) or not torch._C._dispatch_has_kernel_for_dispatch_key(f"skd_kernels::{op}", dispatch_key):
        return None
    return getattr(torch.ops.skd_kernels, op).default


def why_not_compiled(op: str, dispatch_key: str) -> str:
    """Why compiled_kernel(op, dispatch_key) is None, for error messages."""
    if LOAD_ERROR is not None:
        return f"the compiled extension did not load ({LOAD_ERROR})"
    if dispatch_key == "CUDA" and not BUILT_WITH_CUDA:
        return "the extension was built without CUDA"
    return f"the extension registers no {dispatch_key} kernel for {op}"
