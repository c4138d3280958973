"""Backend selection: CUDA ext → Triton → CPU ext → reference, by device, dtype and availability.

A backend is usable for a tensor when its code is present and it runs on that tensor's device and dtype.
`use_backend(name)` (a context manager) or the env var SKD_KERNELS_BACKEND forces one; a forced backend
that cannot run the given tensor raises instead of silently falling back.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import reference
from ._ops import COMPILED_KERNELS
from ._validate import FLOAT_DTYPES

BACKENDS = ("cuda", "triton", "cpu", "reference")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("skd_kernels_backend", default=None)


@dataclass(frozen=True)
class Backend:
    """One implementation of the three ops (each computes one batch, inputs already validated)."""

    name: str
    dtypes: tuple[torch.dtype, ...]
    runs_on: Callable[[torch.device], bool]
    weighted_covariance: Callable[..., tuple[torch.Tensor, ...]]
    taylor_scores: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    prefix_linear: Callable[..., torch.Tensor]

    def usable(self, device: torch.device | str, dtype: torch.dtype | None = None) -> bool:
        device = torch.device(device)
        return self.runs_on(device) and (dtype is None or dtype in self.dtypes)


def _compiled(device_type: str) -> Backend:
    ops = torch.ops.skd_kernels
    # The ops are looked up at call time: without a built _C they do not exist, and the package must import.
    return Backend(
        name=device_type,
        dtypes=FLOAT_DTYPES,
        runs_on=lambda d: d.type == device_type and COMPILED_KERNELS[device_type.upper()],
        weighted_covariance=lambda x, w, groups: ops.weighted_covariance(x, w, groups),
        taylor_scores=lambda a, g: ops.taylor_scores(a, g),
        prefix_linear=lambda x, wt, b, ki, ko, act: ops.prefix_linear(x, wt, b, ki, ko, act),
    )


def _triton_runs_on(device: torch.device) -> bool:
    from . import triton as triton_backend

    if not triton_backend.AVAILABLE:
        return False
    # The mode Triton fixed when the kernels were decorated, not the env var as it reads now.
    from .triton._utils import INTERPRET

    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def _triton_op(name: str) -> Callable[..., object]:
    # Imported on first use: importing Triton (and decorating its kernels) is slow and often not needed.
    def call(*args: object) -> object:
        from . import triton as triton_backend

        return getattr(triton_backend, name)(*args)

    return call


_REGISTRY: dict[str, Backend] = {
    "cuda": _compiled("cuda"),
    "triton": Backend(
        name="triton",
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        runs_on=_triton_runs_on,
        weighted_covariance=_triton_op("weighted_covariance"),
        taylor_scores=_triton_op("taylor_scores"),
        prefix_linear=_triton_op("prefix_linear"),
    ),
    "cpu": _compiled("cpu"),
    "reference": Backend(
        name="reference",
        dtypes=FLOAT_DTYPES,
        runs_on=lambda d: True,
        weighted_covariance=reference.weighted_covariance,
        taylor_scores=reference.taylor_scores,
        prefix_linear=reference.prefix_linear,
    ),
}


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on `device`, in BACKENDS order.

    Automatic choice tries only some of them (on CPU: cpu, then reference; Triton's interpreter runs
    only when forced).
    """
    device = torch.device(device)
    return [n for n in BACKENDS if _REGISTRY[n].usable(device)]


def forced_backend() -> str | None:
    """The backend forced by `use_backend` or SKD_KERNELS_BACKEND, or None for automatic choice."""
    name = _forced.get() or os.environ.get("SKD_KERNELS_BACKEND") or None
    if name is not None:
        _check_name(name)
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force backend `name` ("cuda", "triton", "cpu", "reference") for ops called inside the block.

    Raises RuntimeError at entry when `name` cannot run on this machine at all.
    """
    _check_name(name)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if not any(_REGISTRY[name].usable(d) for d in devices):
        raise RuntimeError(f"backend {name!r} is not usable here (usable on cpu: {available_backends('cpu')})")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def select(device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs an op on tensors of this device and dtype."""
    name = forced_backend()
    if name is not None:
        backend = _REGISTRY[name]
        if not backend.usable(device, dtype):
            raise RuntimeError(f"forced backend {name!r} cannot run {dtype} tensors on {device}; "
                               f"usable there: {available_backends(device)}")
        return backend
    for name in _AUTO_ORDER.get(device.type, ("reference",)):
        if _REGISTRY[name].usable(device, dtype):
            return _REGISTRY[name]
    return _REGISTRY["reference"]
