"""A forward captured as a CUDA graph, for serving at one width and one input shape.

On a GPU a small model's forward is host-bound: Python and kernel launches take longer than the kernels
(ViT-S at batch 64 on an H200, benchmarks/RESULTS.md "H200, session 10"). A captured forward replays its
recorded kernels with one launch and no Python. `ElasticViT.capture` records one subnet. Another width is
another capture, which takes milliseconds and no compiler.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

_CAPTURING = contextvars.ContextVar("skd_capturing", default=False)


def capturing() -> bool:
    """True while a CapturedForward runs its warm-up or records its graph. Code that picks its kernels by host
    cost picks the GPU-time ones instead, and the same ones in both, so that nothing it builds and caches on
    first use is first built inside the capture (recorded, not run: its values would come only at a replay)."""
    return _CAPTURING.get()


class CapturedForward:
    """`fn(*args, **kwargs)` recorded once as a CUDA graph at the example inputs' shapes, dtypes and devices.

    Each call copies its tensors into the recorded inputs, replays the graph and returns a copy of the
    recorded output: the same structure, with new tensors. Calls must pass the example's structure, with
    tensors of its shapes, dtypes and devices and equal non-tensor values (ValueError otherwise).
    The graph reads the module's parameters at their addresses at capture time. In-place updates are seen.
    Replaced tensors (`module.to()`, a load that assigns new ones) are not: capture again.

    module: the nn.Module that `fn` runs (in eval mode, every parameter and buffer on CUDA). warmup: eager
    runs on a side stream before the capture (lazy initialisation, cuBLAS workspaces, Triton autotuning).
    """

    def __init__(self, fn: Callable[..., Any], module: nn.Module, args: tuple, kwargs: dict[str, Any],
                 warmup: int = 3) -> None:
        flat, self._spec = _flatten(args, kwargs)
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if not tensors or not all(t.is_cuda for t in tensors):
            raise ValueError("capture needs CUDA input tensors: CUDA graphs record GPU work (on CPU, "
                             "torch.compile(elastic, dynamic=True) serves every width from one graph)")
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(f"capture needs every input tensor on one CUDA device, got {sorted(map(str, devices))}")
        device = tensors[0].device
        elsewhere = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.device != device]
        if elsewhere:
            raise ValueError(f"capture needs the module on the inputs' device {device}: {elsewhere[0]} is not")
        if module.training:
            raise ValueError("capture needs an eval-mode module (call .eval()): dropout and batch statistics "
                             "would be frozen into the graph")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (eager runs before the capture), got {warmup}")
        with torch.inference_mode(False):  # ordinary tensors: calls copy into them under any grad mode
            self._inputs = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in flat]
        args, kwargs = pytree.tree_unflatten(self._inputs, self._spec)
        self._device = device
        self._fn = fn  # what the graph reads that only fn holds (a frozen plan's weight copies) stays alive
        self.graph = torch.cuda.CUDAGraph()
        token = _CAPTURING.set(True)
        try:
            with torch.no_grad(), torch.cuda.device(device):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(warmup):
                        fn(*args, **kwargs)
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(self.graph):
                    self._output = fn(*args, **kwargs)
        finally:
            _CAPTURING.reset(token)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = _flatten(args, kwargs)
        if spec != self._spec:
            raise ValueError(f"captured for arguments structured as {self._spec}, got {spec}: capture again")
        for i, (recorded, given) in enumerate(zip(self._inputs, flat, strict=True)):
            if isinstance(recorded, torch.Tensor):
                if not isinstance(given, torch.Tensor) or (given.shape, given.dtype, given.device) != (
                        recorded.shape, recorded.dtype, recorded.device):
                    got = (tuple(given.shape), given.dtype, given.device) if isinstance(given, torch.Tensor) \
                        else type(given).__name__
                    raise ValueError(f"argument {i}: captured for a tensor {tuple(recorded.shape)} "
                                     f"{recorded.dtype} on {recorded.device}, got {got}: capture again")
            elif given != recorded:
                raise ValueError(f"argument {i}: captured with {recorded!r}, got {given!r}: capture again")
        with torch.cuda.device(self._device):  # the graph replays on its device's current stream
            for recorded, given in zip(self._inputs, flat, strict=True):
                if isinstance(recorded, torch.Tensor):
                    recorded.copy_(given)
            self.graph.replay()
            return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self._output)


def _flatten(args: tuple, kwargs: dict[str, Any]) -> tuple[list[Any], pytree.TreeSpec]:
    """(leaves, structure) of a call's arguments; keyword order does not matter."""
    return pytree.tree_flatten((args, dict(sorted(kwargs.items()))))
