"""`prefix_linear`: a Linear layer restricted to the leading block of its weight, without copying it.

Kernels: csrc/cpu/prefix_linear.cpp, csrc/cuda/prefix_linear.cu, skd_kernels/triton/prefix_linear.py;
`reference` below is the oracle and last fallback. The compiled and Triton ops share the fake kernel and
the backward defined here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import _dispatch, _ops
from .._common import FLOAT_DTYPES, check_float

OP = "prefix_linear"
ACTIVATIONS = ("none", "gelu", "gelu_tanh")
# k_in, k_out: ints, or symbolic ints while torch.compile traces (one graph then serves every width)
WIDTH_TYPES = (int, torch.SymInt)


def prefix_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    k_in: int | None = None,
    k_out: int | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """y = act(x[..., :k_in] @ weight[:k_out, :k_in]^T + bias[:k_out]), bias and activation fused.

    x: (..., I') with I' >= k_in; weight: (O, I); bias: (O,) or None; all one dtype (fp32/bf16/fp16/fp64).
    k_in in [0, I] (default I), k_out in [0, O] (default O), ints or symbolic sizes (torch.SymInt: under
    torch.compile the widths stay symbolic, so one graph serves every width); activation None | "gelu" |
    "gelu_tanh".
    Returns (..., k_out) in x's dtype. Only weight[:k_out, :k_in] is read and nothing is copied.
    Differentiable in x, weight (gradient zero outside the block) and bias. Inside `torch.autocast` it
    computes in the autocast dtype, like F.linear (the leading block of weight is cast, not all of it).
    Where autograd records (eagerly, or traced by torch.compile with grad mode on) and no backend is forced, it
    runs the equivalent below (`_torch_autograd`).

    Equivalent to::

        y = F.linear(x[..., :k_in], weight[:k_out, :k_in], bias[:k_out]); y = F.gelu(y) if gelu
    """
    k_in = weight.shape[1] if k_in is None else k_in
    k_out = weight.shape[0] if k_out is None else k_out
    activation = activation or "none"
    x, weight, bias = _autocast(x, weight, bias, k_in, k_out)
    check(x, weight, bias, k_in, k_out, activation)
    fn = _dispatch.kernel(OP, x.device, x.dtype)
    if _dispatch.needs_grad(x, weight, bias):
        if _torch_autograd(x.device):
            return reference(x, weight, bias, k_in, k_out, activation)
        return fn(x, weight, bias, k_in, k_out, activation)
    if _views_run(fn, x.device):  # needs_grad is True while torch.compile traces: the graph keeps the op
        w_blk, b_blk = weight[:k_out, :k_in], None if bias is None else bias[:k_out]
        return _on_views(x, w_blk, b_blk, k_in, activation, _onednn_runs(w_blk, k_in, k_out))
    return _dispatch.below_autograd(fn, x, weight, bias, k_in, k_out, activation)


def bind(
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    k_in: int | None = None,
    k_out: int | None = None,
    activation: str | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x -> prefix_linear(x, weight, bias, k_in, k_out, activation)` with all but x checked once and the
    kernel chosen once (for weight's device and dtype, under the backend forced now, if any), for a
    caller that runs one weight block many times (skd.ElasticViT's per-subnet plan).

    Per call only x is checked (its dtype, device and width; a bad x raises prefix_linear's ValueError)
    and autograd is recorded only when needed. For use outside torch.autocast (where prefix_linear
    casts). The callable holds views of weight and bias: rebind after their storage is replaced (e.g.
    by `module.to()`); in-place updates (optimizer steps) are seen.
    """
    k_in = weight.shape[1] if k_in is None else k_in
    k_out = weight.shape[0] if k_out is None else k_out
    activation = activation or "none"
    check_float("weight", weight)
    # an empty x of width k_in in weight's dtype and device: every check but x's own (done per call)
    probe = weight.new_empty((0, k_in if isinstance(k_in, int) and k_in >= 0 else 0))
    check(probe, weight, bias, k_in, k_out, activation)
    dtype, device = weight.dtype, weight.device
    fn = _dispatch.kernel(OP, device, dtype)
    with torch.no_grad():  # views for the no-grad path only: they must not record autograd
        w_blk, b_blk = weight[:k_out, :k_in], None if bias is None else bias[:k_out]
    on_views = _views_run(fn, device)
    onednn = on_views and _onednn_runs(w_blk, k_in, k_out)
    torch_autograd = _torch_autograd(device)

    def call(x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype != dtype or x.device != device or not x.dim() \
                or x.shape[-1] < k_in:
            check(x, weight, bias, k_in, k_out, activation)  # raises prefix_linear's error for this x
        if _dispatch.needs_grad(x, weight, bias):
            if torch_autograd and not _dispatch.traced_without_grad():
                return reference(x, weight, bias, k_in, k_out, activation)
            return fn(x, weight, bias, k_in, k_out, activation)
        if not on_views:
            return _dispatch.below_autograd(fn, x, weight, bias, k_in, k_out, activation)
        return _on_views(x, w_blk, b_blk, k_in, activation, onednn)

    return call


def _torch_autograd(device: torch.device) -> bool:
    """Whether a call that autograd records runs `reference` (F.linear on the views, GELU; PyTorch's own C++
    autograd nodes) instead of the op: on CPU and CUDA under the automatic choice, eagerly. The op adds a Python
    autograd layer (custom-op wrapper, setup_context, `backward`; ~40 Python calls a GEMM's forward and backward)
    and its backward recomputes a GELU GEMM's pre-activation (fc1's GEMM once more), which F.gelu's node keeps, as
    a dense MLP does. On CUDA, where the compiled kernel is the same cuBLAS GEMM on the same views
    (csrc/cuda/prefix_linear.cu), PIAD's step is host-bound and was 1.17x its extracted model's (ViT-S batch 64,
    bf16 autocast: 4508 vs 2040 Python calls a step; benchmarks/RESULTS.md, "session 14"). On CPU the op made
    ElasticViT's training step 1.07x slower on ViT-S batch 16 in fp32 (1.08-1.10x on the digits ViT) and
    0.99-1.02x in bf16 and under bf16 autocast, its bf16 oneDNN forward notwithstanding (benchmarks/RESULTS.md,
    "Session 17"). Also while torch.compile traces with grad mode on (a training graph): inductor then fuses the
    bias and GELU itself and its backward keeps the pre-activation (the digits ViT's compiled CPU step at 1/3 of the
    MACs: 0.94x the op's). Not in a compiled no-grad forward, which keeps the op's kernel (oneDNN's bf16 linear on
    CPU), and not for a forced backend (that kernel is asked for)."""
    return device.type in ("cpu", "cuda") and not _dispatch._forced_name() and not _dispatch.traced_without_grad()


def _views_run(fn: Callable[..., object], device: torch.device) -> bool:
    """Whether a no-grad call with kernel `fn` on `device` runs `_on_views` instead: the compiled kernel (one
    OpOverload serves the CPU and CUDA keys), whose computation `_on_views` is on either device. On CUDA the
    kernel is cuBLAS on the same strided views plus one bias/GELU pass (csrc/cuda/prefix_linear.cu), the
    GPU work of F.linear + GELU, while the boxed op's host work costs ~20 µs more per call than F.linear's.
    That is what separated elastic from extracted ViT-S at batch 64 on an H200, host-bound there (54 vs
    34 µs of CPU per GEMM; benchmarks/RESULTS.md, "H200")."""
    return device.type in ("cpu", "cuda") and fn is _CPU_KERNEL


def _on_views(x: torch.Tensor, w_blk: torch.Tensor, b_blk: torch.Tensor | None, k_in: int, activation: str,
              onednn: bool) -> torch.Tensor:
    """The compiled kernel's computation (csrc/cpu/prefix_linear.cpp, csrc/cuda/prefix_linear.cu) from Python,
    no grad: x (..., >= k_in), w_blk (k_out, k_in) and b_blk (k_out,) views of the weight and bias. bf16 CPU
    blocks dense in one order (`onednn`) through oneDNN's linear, bias and GELU fused; else a BLAS/cuBLAS GEMM
    on the block with the bias, GELU in place. Calling the op from Python costs ~10 µs more than F.linear
    (its boxed dispatch), 1-4 % of a ViT-S proj GEMM on CPU (benchmarks/RESULTS.md, "prefix_linear's public
    op on CPU"), ~20 µs on CUDA (see `_views_run`)."""
    x = x if x.shape[-1] == k_in else x[..., :k_in]
    if onednn:
        attr, algorithm = ONEDNN_ACTIVATIONS[activation]
        return _ONEDNN_LINEAR(x, w_blk, b_blk, attr, [], algorithm)
    y = F.linear(x, w_blk, b_blk)
    approximate = _GELU_APPROXIMATE[activation]
    return y if approximate is None else torch._C._nn.gelu_(y, approximate=approximate)


# oneDNN's linear (mkldnn::_linear_pointwise: bias and GELU fused, reads a dense weight block in place, no
# weight copy) runs bf16 prefix GEMMs on CPU 0-25 % faster than F.linear's route, ViT-S and ViT-B shapes,
# 197 and 1576 rows (benchmarks/RESULTS.md, "Column-major input-truncated weights"); in fp32 it is slower
# than MKL's sgemm (up to 1.25x), so fp32/fp16/fp64 keep F.linear. Its (attr, algorithm) per activation:
ONEDNN_ACTIVATIONS = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}
_GELU_APPROXIMATE = {"none": None, "gelu": "none", "gelu_tanh": "tanh"}  # F.gelu's argument per activation
_CPU_KERNEL = _ops.compiled_kernel(OP, "CPU")
_ONEDNN_LINEAR = getattr(getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None), "default", None)


def _onednn_runs(w_blk: torch.Tensor, k_in: int, k_out: int) -> bool:
    """Whether a bound no-grad bf16 CPU GEMM goes through oneDNN's linear: the block is dense in one order
    (ElasticViT's always are: skd/elastic/layout.py; a strided panel could be copied) and not empty."""
    return (w_blk.device.type == "cpu" and w_blk.dtype == torch.bfloat16 and _ONEDNN_LINEAR is not None
            and torch.backends.mkldnn.is_available()
            and isinstance(k_in, int) and isinstance(k_out, int) and k_in > 0 and k_out > 0
            and (w_blk.is_contiguous() or w_blk.t().is_contiguous()))


def _autocast(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k_in: int, k_out: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inside `torch.autocast` the op behaves like F.linear there: it runs in the autocast dtype. Only the
    leading block of the weight is cast (the cast is a copy either way, as F.linear's is), so a
    mixed-precision subnetwork never copies more than it reads. Outside autocast: the inputs unchanged."""
    device = x.device.type
    if not (torch.is_autocast_enabled(device) and x.is_floating_point()):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device)
    if x.dtype == weight.dtype == dtype and (bias is None or bias.dtype == dtype):
        return x, weight, bias
    sizes = ((k_out, weight.shape[0]), (k_in, weight.shape[-1]))
    if weight.dim() != 2 or not all(isinstance(k, WIDTH_TYPES) and 0 <= k <= n for k, n in sizes):
        return x, weight, bias  # `check` names the bad argument
    bias = None if bias is None else _leading(bias, 0, k_out).to(dtype)
    return x.to(dtype), _block(weight, k_out, k_in).to(dtype), bias


def _leading(t: torch.Tensor, dim: int, k: int | torch.SymInt) -> torch.Tensor:
    """t's first k entries along dim: t itself where that is all of it, else a view. Not `t[:k]`, which is a view op
    even then: one more autograd node, and an identity slice's backward writes a zero-filled copy. Always a view
    while torch.compile traces: comparing a symbolic width with the full one would guard on it (Dynamo traces the
    widths as ints), a graph per pattern of full-width blocks; the compiled graph drops identity views anyway."""
    return t if not torch.compiler.is_compiling() and k == t.shape[dim] else t.narrow(dim, 0, k)


def _block(weight: torch.Tensor, k_out: int | torch.SymInt, k_in: int | torch.SymInt) -> torch.Tensor:
    """weight[:k_out, :k_in] (`_leading` in each dim); a column-major weight's (skd's stored proj and fc2) through
    its transpose. A slice's backward writes the block into a zero-filled row-major buffer: through the transpose
    that buffer is laid out like the weight, so its gradient needs no copy into the weight's layout, and the block
    is dense at every width, so torch.compile does not guard on the width being full (a graph per pattern of
    full-width MLPs in training, H200 and CPU, under autocast)."""
    out_f, in_f = weight.shape
    if not torch.compiler.is_compiling() and k_out == out_f and k_in == in_f:
        return weight
    if out_f > 1 and weight.stride() == (1, out_f):  # column-major
        return _leading(_leading(weight.t(), 0, k_in), 1, k_out).t()
    return _leading(_leading(weight, 0, k_out), 1, k_in)


def check(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k_in: int, k_out: int, activation: str
) -> None:
    """Shape and range checks only (ValueError naming the argument): scanning x for NaN would cost a pass
    over it on the hot path."""
    check_float("x", x)
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    out_f, in_f = weight.shape
    if not isinstance(k_in, WIDTH_TYPES) or not 0 <= k_in <= in_f:
        raise ValueError(f"k_in={k_in!r} out of range [0, {in_f}]")
    if not isinstance(k_out, WIDTH_TYPES) or not 0 <= k_out <= out_f:
        raise ValueError(f"k_out={k_out!r} out of range [0, {out_f}]")
    if x.shape[-1] < k_in:
        raise ValueError(f"x's last dim {x.shape[-1]} is smaller than k_in={k_in}")
    if bias is not None:
        check_float("bias", bias)
        if bias.dim() != 1 or bias.shape[0] < k_out:
            raise ValueError(f"bias must be 1-D with at least k_out={k_out} entries, got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} must be one of {ACTIVATIONS} (or None)")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}"
                         + ("" if bias is None else f", {bias.dtype}"))
    if x.device != weight.device or (bias is not None and bias.device != weight.device):
        raise ValueError("x, weight and bias must be on one device")


def reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k_in: int,
    k_out: int,
    activation: str = "none",
) -> torch.Tensor:
    """y = act(x[..., :k_in] @ weight[:k_out, :k_in]^T + bias[:k_out]) in plain PyTorch.

    x: (..., >= k_in), weight: (out, in), bias: (out,) or None. Returns (..., k_out) in x's dtype.
    """
    w_blk, b_blk = _block(weight, k_out, k_in), None if bias is None else _leading(bias, 0, k_out)
    if torch.compiler.is_compiling() or x.shape[-1] != k_in:
        # x's first k_in columns as 2-D rows the GEMM reads in place: F.linear on a narrowed (..., k_in) view folds
        # its leading dims by a reshape, which copies it and, traced, guards on k_in being x's whole width (a
        # graph per case)
        rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).narrow(-1, 0, k_in)
        y = F.linear(rows, w_blk, b_blk).view(*x.shape[:-1], k_out)
    else:
        y = F.linear(x, w_blk, b_blk)
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    return y


def fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k_in: int, k_out: int, activation: str
) -> torch.Tensor:
    """Output metadata of the compiled and Triton ops (torch.compile, FakeTensorMode); k_in and k_out may be
    symbolic (one check each: `a <= b and c` would force a symbolic bool to a concrete one)."""
    torch._check(k_in >= 0, lambda: "k_in < 0")
    torch._check(k_in <= weight.shape[1], lambda: "k_in > weight's in_features")
    torch._check(k_out >= 0, lambda: "k_out < 0")
    torch._check(k_out <= weight.shape[0], lambda: "k_out > weight's out_features")
    torch._check(x.shape[-1] >= k_in, lambda: "x narrower than k_in")
    return x.new_empty((*x.shape[:-1], k_out))


def _gelu_grad(grad: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return grad
    return torch.ops.aten.gelu_backward(grad, z, approximate=_GELU_APPROXIMATE[activation])


def backward(
    op: object, ctx: object, grad_y: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None, None]:
    """Gradients of prefix_linear; `op` is the forward op, used to recompute the pre-activation.

    Gradients outside the leading block are zero; x's beyond k_in too.
    """
    x, weight, bias = ctx.saved_tensors
    k_in, k_out, activation = ctx.k_in, ctx.k_out, ctx.activation
    if activation != "none":
        z = op(x, weight, bias, k_in, k_out, "none")
        grad_y = _gelu_grad(grad_y, z, activation)
    w_blk = weight[:k_out, :k_in]
    rows = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous when k_out = 0
    g2 = grad_y.reshape(rows, k_out)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        gx = grad_y @ w_blk
        grad_x = gx if x.shape[-1] == k_in else F.pad(gx, (0, x.shape[-1] - k_in))
    if ctx.needs_input_grad[1]:
        grad_w = torch.zeros_like(weight)
        # the GEMM writes straight into the block (BLAS with the weight's row stride), no temporary copy
        grad_w[:k_out, :k_in].addmm_(g2.t(), x.reshape(rows, x.shape[-1])[:, :k_in], beta=0)
    if bias is not None and ctx.needs_input_grad[2]:
        grad_b = torch.zeros_like(bias)
        grad_b[:k_out] = g2.sum(0)
    return grad_x, grad_w, grad_b, None, None, None


def setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias, k_in, k_out, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.k_in, ctx.k_out, ctx.activation = k_in, k_out, activation


def register_autograd(qualname: str, op: object) -> None:
    """Attach prefix_linear's backward to a registered operator (compiled or Triton)."""
    torch.library.register_autograd(qualname, functools.partial(backward, op), setup_context=setup_context)


_ops.register_differentiable(OP, fake, lambda name: register_autograd(name, torch.ops.skd_kernels.prefix_linear))

# Triton runs only when forced: on an H200 it ran at 0.14-0.72x F.linear on the extracted block, where the
# reference (F.linear on the same views, cuBLAS) runs the CUDA kernel's computation (benchmarks/RESULTS.md,
# "H200, session 10"), so a GPU without the CUDA extension gets cuBLAS.
_dispatch.register_op(OP, {
    "cuda": _dispatch.compiled(OP, "CUDA"),
    "triton": _dispatch.triton(OP),
    "cpu": _dispatch.compiled(OP, "CPU"),
    "reference": _dispatch.Kernel(reference, FLOAT_DTYPES),
}, forced_only=("triton",))
