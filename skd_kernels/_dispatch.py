"""Backend selection per op: CUDA ext → Triton → CPU ext → reference, by device, dtype and availability.

Each op (skd_kernels/ops/<op>.py) registers its kernels here, one per backend that implements it (a kernel
may be a composite of torch ops where that measured fastest: the attention ops' CUDA one); a backend may
implement only some ops, or only some dtypes of an op, and an op may leave a backend out of its
automatic choice (`forced_only`: measured slower than the next in line). `use_backend(name)` (a context
manager) or the env var SKD_KERNELS_BACKEND forces one backend; a forced backend that cannot run an op
on the given tensors raises, saying why (wrong device, op not implemented, dtype not supported), instead
of silently falling back.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from . import _ops
from ._common import FLOAT_DTYPES

BACKENDS = ("cuda", "triton", "cpu", "reference")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("skd_kernels_backend", default=None)
ENV_VAR = "SKD_KERNELS_BACKEND"
# os.environ.get encodes the key on every call (~0.6 µs, half of an op's dispatch cost). CPython's
# os.environ keeps its current contents in `_data` (what os.environ.get reads after encoding the key), so
# the key is encoded once; any other os.environ falls back to .get.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENV_DATA is not None else ENV_VAR


def _env_backend() -> str | None:
    """SKD_KERNELS_BACKEND as os.environ holds it now."""
    if _ENV_DATA is None:
        return os.environ.get(ENV_VAR)
    value = _ENV_DATA.get(_ENV_KEY)
    return None if value is None else os.environ.decodevalue(value)


def _forced_name() -> str | None:
    """The forced backend's name, unchecked: use_backend's, else SKD_KERNELS_BACKEND, else None."""
    return _forced.get() or _env_backend() or None


# Dynamo before torch 2.13 cannot trace ContextVar.get: each op call broke the graph (torch 2.11 on an H200: a
# compiled ElasticViT forward in 27 graphs, 3x slower than eager). There the name is a constant of the trace,
# read when the graph is built: a backend forced later is not seen until a recompile (2.11 on the H200: one
# graph for every width). From 2.13 Dynamo traces the lookup and guards on it.
if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13):
    _forced_name = torch.compiler.assume_constant_result(_forced_name)

# Triton kernels take fp32, fp16 and bf16 (no fp64 tensor-core dot).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Kernel:
    """One backend's implementation of one op: `fn` takes the op's validated inputs; `dtypes` it runs."""

    fn: Callable[..., object]
    dtypes: tuple[torch.dtype, ...]


def _device_type_reason(backend: str) -> Callable[[torch.device], str | None]:
    def reason(device: torch.device) -> str | None:
        return None if device.type == backend else f"it runs only on {backend} tensors"

    return reason


def _triton_device_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        # The mode Triton fixed when the kernels were decorated (at import), not the env var as it reads now.
        from .triton._utils import INTERPRET

        return None if INTERPRET else "it runs on cpu tensors only under TRITON_INTERPRET=1 (set before import)"
    return "it runs only on cuda tensors (or cpu ones under TRITON_INTERPRET=1)"


@dataclass
class Backend:
    """One implementation family: where it runs and, per op, its kernel or why it has none."""

    name: str
    device_reason: Callable[[torch.device], str | None]  # why it cannot run on a device, None if it can
    kernels: dict[str, Kernel] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # op -> why there is no kernel

    def not_supported_reasons(
        self, device: torch.device | str, dtype: torch.dtype | None = None, op: str | None = None
    ) -> list[str]:
        """Why this backend cannot run `op` (any op if None) on `dtype` (any if None) tensors on `device`."""
        reasons = []
        device_reason = self.device_reason(torch.device(device))
        if device_reason is not None:
            reasons.append(device_reason)
        if op is not None and op not in self.kernels:
            reasons.append(f"it has no {op} kernel ({self.missing.get(op, 'not implemented')})")
        elif op is None and not self.kernels:
            reasons.append(f"it has no kernels ({'; '.join(sorted(set(self.missing.values()))) or 'none registered'})")
        if op is None:
            kernels = list(self.kernels.values())
        else:
            kernels = [self.kernels[op]] if op in self.kernels else []
        if dtype is not None and kernels and not any(dtype in k.dtypes for k in kernels):
            names = sorted({str(d).removeprefix("torch.") for k in kernels for d in k.dtypes})
            reasons.append(f"{op or 'its ops'} take{'s' if op else ''} {'/'.join(names)}, not {dtype}")
        return reasons

    def usable(self, device: torch.device | str, dtype: torch.dtype | None = None, op: str | None = None) -> bool:
        return not self.not_supported_reasons(device, dtype, op)


# The automatic choice, (op, device type, dtype) -> kernel, computed when ops register: a dict lookup is all
# an unforced call pays (and torch.compile traces a constant table, not a cache filled at run time).
_AUTO: dict[tuple[str, str, torch.dtype], Callable[..., object]] = {}
# register_op's forced_only per op
_FORCED_ONLY: dict[str, tuple[str, ...]] = {}

_REGISTRY: dict[str, Backend] = {
    "cuda": Backend("cuda", _device_type_reason("cuda")),
    "triton": Backend("triton", _triton_device_reason),
    "cpu": Backend("cpu", _device_type_reason("cpu")),
    "reference": Backend("reference", lambda device: None),
}


def compiled(op: str, dispatch_key: str) -> Kernel | str:
    """The compiled extension's kernel of `op` for "CPU" or "CUDA" (every float dtype), or why there is none."""
    fn = _ops.compiled_kernel(op, dispatch_key)
    return _ops.why_not_compiled(op, dispatch_key) if fn is None else Kernel(fn, FLOAT_DTYPES)


def triton(op: str, dtypes: tuple[torch.dtype, ...] = TRITON_DTYPES) -> Kernel:
    """`skd_kernels.triton.<op>.<op>`, imported on first use: importing Triton (and decorating its kernels)
    is slow and often not needed."""
    resolved: list[Callable[..., object]] = []

    def call(*args: object) -> object:
        if not resolved:
            resolved.append(getattr(importlib.import_module(f"{__package__}.triton.{op}"), op))
        return resolved[0](*args)

    return Kernel(call, dtypes)


def register_op(op: str, kernels: dict[str, Kernel | str], forced_only: tuple[str, ...] = ()) -> None:
    """Registers an op's kernel per backend name (a str instead of a Kernel says why that backend has none;
    an omitted backend does not implement the op). Every op needs a reference kernel of every float dtype:
    it is the last fallback. forced_only: backends the automatic choice passes over for this op, measured
    slower than the next in line; they run when forced (`use_backend`)."""
    unknown = set(kernels) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)} for {op}; choose from {BACKENDS}")
    reference = kernels.get("reference")
    if not isinstance(reference, Kernel) or set(reference.dtypes) != set(FLOAT_DTYPES):
        raise ValueError(f"{op} needs a reference Kernel taking every dtype of {FLOAT_DTYPES}")
    for name, kernel in kernels.items():
        if isinstance(kernel, Kernel):
            _REGISTRY[name].kernels[op] = kernel
        else:
            _REGISTRY[name].missing[op] = kernel
    _FORCED_ONLY[op] = forced_only
    for device_type in _AUTO_ORDER:
        for dtype in FLOAT_DTYPES:
            name = next(n for n in (*auto_order(device_type, op), "reference")
                        if _REGISTRY[n].usable(device_type, dtype, op))
            _AUTO[op, device_type, dtype] = _REGISTRY[name].kernels[op].fn


def auto_order(device_type: str, op: str | None = None) -> tuple[str, ...]:
    """The backends the automatic choice tries for `op` (any op if None) on this device type, in order."""
    skip = _FORCED_ONLY.get(op, ())
    return tuple(n for n in _AUTO_ORDER.get(device_type, ("reference",)) if n not in skip)


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run (some op) on `device`, in BACKENDS order.

    Automatic choice tries only some of them (on CPU: cpu, then reference; Triton's interpreter runs
    only when forced).
    """
    return [n for n in BACKENDS if _REGISTRY[n].usable(device)]


def forced_backend() -> str | None:
    """The backend forced by `use_backend` or SKD_KERNELS_BACKEND, or None for automatic choice."""
    name = _forced_name()
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
        why = "; ".join(_REGISTRY[name].not_supported_reasons(devices[-1]))
        raise RuntimeError(f"backend {name!r} is not usable here: {why} (usable on cpu: {available_backends('cpu')})")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def select(device: torch.device, dtype: torch.dtype, op: str | None = None) -> Backend:
    """The backend that runs `op` (any op if None) on tensors of this device and dtype."""
    name = forced_backend()
    if name is not None:
        backend = _REGISTRY[name]
        reasons = backend.not_supported_reasons(device, dtype, op)
        if reasons:
            raise RuntimeError(f"forced backend {name!r} cannot run {op or 'ops'} on {dtype} tensors on {device}: "
                               f"{'; '.join(reasons)}. Usable there: {available_backends(device)}")
        return backend
    for name in auto_order(device.type, op):
        if _REGISTRY[name].usable(device, dtype, op):
            return _REGISTRY[name]
    return _REGISTRY["reference"]


def has_kernel(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `op` on tensors of this device and dtype runs a kernel, not only its reference: the forced
    backend's if one is forced (False, without raising, when it cannot run them), else the automatic choice's.

    For callers that have another path where there is no kernel (the elastic forward's copies + SDPA)."""
    name = forced_backend()
    if name is not None:
        return name != "reference" and _REGISTRY[name].usable(device, dtype, op)
    fn = _AUTO.get((op, device.type, dtype))  # the automatic choice's table: a per-call check costs ~0.3 µs
    if fn is not None:
        return fn is not _REGISTRY["reference"].kernels[op].fn
    return select(device, dtype, op).name != "reference"


def kernel(op: str, device: torch.device, dtype: torch.dtype) -> Callable[..., object]:
    """The function that runs `op` on tensors of this device and dtype (see `select`)."""
    if not _forced_name():
        fn = _AUTO.get((op, device.type, dtype))
        if fn is not None:
            return fn
    return select(device, dtype, op).kernels[op].fn


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on `tensors` must record autograd: grad mode is on and one of them requires grad.

    True while torch.compile traces, so the compiler always sees the differentiable op."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def traced_without_grad() -> bool:
    """Whether torch.compile is tracing a no-grad forward: `needs_grad` is True there too, but nothing records, so
    an op keeps its kernel in the graph where a recorded call (eager, or a traced training graph) would run its
    PyTorch composite (prefix_linear's `_torch_autograd`, add_layer_norm's `run_checked`)."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled()


def below_autograd(fn: Callable[..., object], *args: object) -> object:
    """`fn(*args)` (`fn` a kernel from `kernel`, or any code in which nothing must record autograd: skd's
    no-grad elastic forward) run below the dispatcher's autograd layer, for callers whose inputs need no
    gradient (`needs_grad` is False) and are validated.

    The Triton ops register their autograd from Python, and that layer costs ~5-8 µs per call even under
    no_grad, the order of a small GEMM (the compiled ops' own Autograd kernel is C++ and skips itself without
    a gradient: skd_kernels._ops.autograd_twin); below it the kernel runs directly. The result is the kernel's
    own (same values, no grad_fn)."""
    with torch._C._AutoDispatchBelowAutograd():
        return fn(*args)
