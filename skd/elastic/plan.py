"""What a subnet fixes for ElasticViT's eager forward, worked out once: per block the widths and the bound
prefix GEMMs and attention, checked and sliced when the plan is built instead of on every call.

On a small model (the digits ViT at batch 1) a block's GEMMs take ~15 µs each, and the public ops' per-call
work (checks, backend look-up, autograd layer, slicing) cost as much again; a plan leaves one kernel call per
GEMM. ElasticViT keeps a few recent plans per (subnet, forced backend, autocast) and rebuilds one whose
weights were replaced (`current`).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

import skd_kernels
from skd_kernels import _dispatch
from skd_kernels.ops import prefix_attention as prefix_attention_op
from skd_kernels.ops import prefix_attention_separate as separate_op
from skd_kernels.ops import prefix_linear as prefix_linear_op

from ..compensation import compensated_bias, compensated_linear, cross_head_map, input_cov, input_mean
from ..models import BlockSpec
from ..score_fit import corrected_q, fitted, q_linear, score_fit
from ..subnet import Subnet
from .capture import capturing
from .layout import head_major_order, q_rows, with_q_rows

Gemm = Callable[[torch.Tensor], torch.Tensor]
# (qkv (S, N, r*3*H) rank-major, bias (S or 1, H or 1, N, N) | None) -> (S, N, r*H) rank-major; for separate
# q, k, v: (q, k, v each (S, N, r*H) rank-major, bias) -> (S, N, r*H)
Attention = Callable[..., torch.Tensor]
# () -> (weight, bias | None): what a GEMM multiplies by, computed per call (differentiable in the Linear's
# parameters when autograd records) and corrected where the GEMM corrects it (compensation, score fit): a
# weight whose leading rows (a qkv GEMM's) or columns (proj's), rank-major, are the kept ones, and the bias of
# the weight's rows. Not sliced to the kept block: the head-major reorder selects it.
Weights = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]


class HeadMajor:
    """The kept attention weights in head-major order, for SDPA on reordered weights
    (ElasticViT._sdpa_reordering_weights): the qkv GEMMs' kept rows (3*H*r fused, H*r each separate) and proj's
    kept columns (H*r), selected from their `Weights` by head-major orders (skd.elastic.layout.head_major_order)
    built on first use (a plan that never takes this route builds none).

    Per call, or (frozen) once, now: then the copies are the plan's, and later updates of the weights are not
    seen (ElasticViT.capture(frozen=True)). The qkv biases' kept rows (3*H*r elements) are reordered once and
    kept while their tensor and its version stay the same, where nothing records autograd and nothing captures
    or compiles the call (`_bias`): one gather a call fewer, and as many kernels per block as the activations
    route's two copies (the qkv weight's and proj's gathers).
    """

    def __init__(self, qkv: tuple[Weights, ...], proj: Weights, r: int, num_heads: int, fused: bool,
                 device: torch.device, frozen: bool = False) -> None:
        self._qkv, self._proj = qkv, proj
        self._shape = r, num_heads, fused, device
        self._built: tuple[torch.Tensor, torch.Tensor] | None = None
        # per qkv GEMM: (the bias read, its version, its kept rows head-major)
        self._biases: list[tuple[torch.Tensor, int, torch.Tensor] | None] = [None] * len(qkv)
        self.frozen = None
        if frozen:
            with torch.no_grad():
                self.frozen = self.qkv(), self.proj()

    def _orders(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the qkv rows' head-major order, proj columns'), built on first use. Not functools.cached_property:
        before Python 3.12 it takes an RLock, which Dynamo cannot trace (a graph break per block when
        torch.compile traces a training step)."""
        if self._built is None:
            r, h, fused, device = self._shape
            proj = head_major_order(r, h, device)
            self._built = (head_major_order(r, 3 * h, device) if fused else proj), proj
        return self._built

    def qkv(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """[(weight, bias)] of each qkv GEMM, kept rows only, head-major: (3*H*r or H*r, D), (rows,) | None."""
        if self.frozen is not None:
            return self.frozen[0]
        order = self._orders()[0]
        return [(w.index_select(0, order), self._bias(i, b, order))
                for i, (w, b) in enumerate(weights() for weights in self._qkv)]

    def _bias(self, i: int, bias: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor | None:
        """The kept rows of qkv GEMM i's bias, head-major: gathered per call where autograd records, torch.compile
        traces or a CUDA graph is recorded (a replay must read the live bias); else kept until the bias is
        another tensor or updated in place (its version counter: writes through `.data` are not seen)."""
        if bias is None:
            return None
        if _dispatch.needs_grad(bias) or capturing():
            return bias.index_select(0, order)
        kept = self._biases[i]
        if kept is None or kept[0] is not bias or kept[1] != bias._version:
            kept = self._biases[i] = (bias, bias._version, bias.index_select(0, order))
        return kept[2]

    def proj(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (D_out, H*r), bias) of proj, kept columns only, head-major; column-major like the stored proj
        (skd/elastic/layout.py: MKL/oneDNN read it faster)."""
        if self.frozen is not None:
            return self.frozen[1]
        weight, bias = self._proj()
        return weight.t().index_select(0, self._orders()[1]).t(), bias


class BlockPlan(NamedTuple):
    """One block at one subnet. r: dims kept per head; hidden: MLP units kept (0: that branch is skipped
    and its fields are None). qkv: (fused qkv GEMM,) x (S, N, D) -> (S, N, r*3*H), or (q, k, v) GEMMs each
    -> (S, N, r*H), q's rows corrected where width r has a score fit (`_ScoreFit`); proj: (S, N, r*H) ->
    (S, N, D_out); fc1: (..., D) -> (..., hidden) with the fused activation, if any; fc2: (..., hidden) ->
    (..., D); attention: prefix_attention (fused qkv) or prefix_attention_separate (q, k, v; None where that
    op has no kernel, only its reference), used at inference; head_major: for SDPA on reordered weights."""

    r: int
    hidden: int
    qkv: tuple[Gemm, ...] | None
    proj: Gemm | None
    attention: Attention | None
    head_major: HeadMajor | None
    fc1: Gemm | None
    fc2: Gemm | None


class Plan:
    """The bound ops of every block at `subnet` (validated against the model's widths beforehand).

    bound=True: GEMMs from `skd_kernels.ops.prefix_linear.bind` and prefix_attention below the autograd
    layer when no gradient is needed — outside torch.autocast only. bound=False: partials of the public ops
    (inside autocast, and while torch.compile traces: nothing is sliced or cached outside the graph).
    frozen=True (bound only; ElasticViT.capture(frozen=True)): attention always through SDPA on head-major
    weight copies made now (`HeadMajor`), which later weight updates do not reach.
    """

    def __init__(self, blocks: Sequence[BlockSpec], subnet: Subnet, bound: bool, frozen: bool = False) -> None:
        self.subnet = subnet
        linears = [lin for spec in blocks for lin in
                   ((spec.qkv,) if spec.fused else (spec.q, spec.k, spec.v)) + (spec.proj, spec.fc1, spec.fc2)]
        # What the plan's ops read: the Parameters (held by both kinds), their storage and the weights' strides
        # (the views; skd/elastic/layout.py re-strides weights within their storage) (`current`). `current`
        # reads the Parameters from the module's dict: through Module.__getattr__ they cost ~0.4 µs each, 40 µs
        # of a ViT-S forward's host time (the GPU's, where that forward is host-bound).
        self._sources = [(lin._parameters, lin.weight, lin.bias, lin.weight.data_ptr(), lin.weight.stride(),
                          None if lin.bias is None else lin.bias.data_ptr()) for lin in linears]
        # bias compensation's means and covariances, the score fits, stored or removed
        self._means = [(lin, input_mean(lin), input_cov(lin)) for lin in linears]
        self._fits = [(lin, score_fit(lin)) for lin in map(q_linear, blocks)]
        if frozen and not bound:
            raise ValueError("a frozen plan is a bound one (no autocast, not compiling)")
        gemm = _bind if bound else _partial
        self.blocks = tuple(_block(spec, r, m, gemm, bound, frozen)
                            for spec, r, m in zip(blocks, subnet.attn, subnet.mlp, strict=True))
        # Cross-head compensation's and the score fit's bound GEMMs hold a corrected copy of the kept weight
        # columns or rows: an in-place update of the weight, bias, statistics or fit (an optimizer step) must
        # rebuild them.
        self._copied = [(t, t._version) for b in self.blocks for g in (b.proj, b.fc2, *(b.qkv or ()))
                        if isinstance(g, _CorrectedCopy) and g.fast is not None
                        for t in g.sources() if t is not None]

    def current(self) -> bool:
        """False once a weight or bias the plan was built from was replaced, moved to new storage
        (`module.to(...)`, a new Parameter) or re-strided (skd/elastic/layout.py), or an input mean,
        covariance or score fit was stored, replaced or removed (skd.wpac): the plan must be rebuilt. In-place
        updates keep it current, except under cross-head compensation and the score fit, whose corrected
        weight copies are rebuilt after any in-place update of what they were computed from (seen through the
        tensors' version counters: writes through `.data` are not seen)."""
        if any(input_mean(lin) is not mean or input_cov(lin) is not cov for lin, mean, cov in self._means):
            return False
        if any(score_fit(lin) is not fit for lin, fit in self._fits):
            return False
        if any(t._version != version for t, version in self._copied):
            return False
        for params, w, b, w_ptr, w_strides, b_ptr in self._sources:
            if params.get("weight") is not w or params.get("bias") is not b or w.data_ptr() != w_ptr \
                    or w.stride() != w_strides or (b is not None and b.data_ptr() != b_ptr):
                return False
        return True


def _bind(lin: nn.Linear, k_in: int | None = None, k_out: int | None = None, activation: str | None = None) -> Gemm:
    return prefix_linear_op.bind(lin.weight, lin.bias, k_in, k_out, activation)


def _partial(lin: nn.Linear, k_in: int | None = None, k_out: int | None = None,
             activation: str | None = None) -> Gemm:
    return functools.partial(skd_kernels.prefix_linear, weight=lin.weight, bias=lin.bias, k_in=k_in, k_out=k_out,
                             activation=activation)


def _own(lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `Weights` of a GEMM that reads `lin`'s own weight and bias."""
    return lin.weight, lin.bias


class _Compensated:
    """prefix_linear through the first k_in inputs of `lin` with bias compensation's bias (skd.compensation),
    b + W[:, k_in:] E[x[k_in:]], computed on every call so it follows any in-place weight update.

    When autograd must record (or unbound, under autocast/compile): the public op with that bias, so its
    gradient reaches W and b. Otherwise the bias is written into a buffer the bound GEMM reads (one small
    mat-vec per call, no per-call op overhead).
    """

    def __init__(self, lin: nn.Linear, k_in: int, bound: bool) -> None:
        self.lin, self.k_in = lin, k_in
        self.bias = self.fast = None
        if bound:
            with torch.no_grad():
                self.bias = compensated_bias(lin, k_in).detach().clone()
            self.fast = _bind(_Weights(lin.weight, self.bias), k_in=k_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lin, k = self.lin, self.k_in
        if self.fast is None or _dispatch.needs_grad(x, lin.weight, lin.bias):
            return skd_kernels.prefix_linear(x, lin.weight, compensated_bias(lin, k), k_in=k)
        # computed aside, then copied: threads sharing this plan (serving) write identical values, and
        # addmv(out=) would expose a half-accumulated bias to a concurrent reader
        self.bias.copy_(torch.addmv(lin.bias, lin.weight[:, k:], input_mean(lin)[k:]))
        return self.fast(x)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`Weights`: the weight and the compensated bias, computed now."""
        return self.lin.weight, compensated_bias(self.lin, self.k_in)


class _Weights(NamedTuple):
    """What `_bind` reads of a Linear, with another bias (and weight)."""

    weight: torch.Tensor
    bias: torch.Tensor | None


class _CorrectedCopy(abc.ABC):
    """A GEMM of `lin` by a corrected weight and bias (`_computed`, differentiable in `lin`'s). Bound (no grad):
    computed once, when the plan is built, and bound (`copy`, `fast`: an O(rows * cols) copy; `Plan.current`
    rebuilds the plan after an in-place update of its `sources`). When autograd must record, or unbound
    (autocast, torch.compile): computed per call through the public op, so the gradient reaches W and b."""

    lin: nn.Linear

    def _bind_copy(self, bound: bool) -> None:
        self.copy = self.fast = None
        if bound:
            with torch.no_grad():
                self.copy = _Weights(*(None if t is None else t.contiguous() for t in self._computed()))
            self.fast = _bind(self.copy)

    @abc.abstractmethod
    def _computed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias | None): the corrected kept block, computed now."""

    @abc.abstractmethod
    def sources(self) -> tuple[torch.Tensor | None, ...]:
        """What the bound copy was computed from."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.lin
        if self.fast is None or _dispatch.needs_grad(x, lin.weight, lin.bias):
            return skd_kernels.prefix_linear(x, *self._computed())
        return self.fast(x)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`Weights`: the bound copy, or computed now when autograd records (or unbound)."""
        lin = self.lin
        if self.copy is None or _dispatch.needs_grad(lin.weight, lin.bias):
            return self._computed()
        return self.copy


class _CrossHead(_CorrectedCopy):
    """prefix_linear of `lin`'s cross-head compensated weight and bias (skd.compensation.compensated_linear)
    through its first k_in inputs, 0 < k_in < in_features: the corrected (D_out, k_in) block. Bound, with the
    plan's B (a constant also when autograd records); unbound, B too is computed per call, so nothing computed
    outside the graph is baked into it.
    """

    def __init__(self, lin: nn.Linear, k_in: int, bound: bool) -> None:
        self.lin, self.k_in = lin, k_in
        self.b_map = None
        if bound:
            with torch.no_grad():
                self.b_map = cross_head_map(lin, k_in)
        self._bind_copy(bound)

    def sources(self) -> tuple[torch.Tensor, ...]:
        lin = self.lin
        return lin.weight, lin.bias, input_mean(lin), input_cov(lin)

    def _computed(self) -> tuple[torch.Tensor, torch.Tensor]:
        return compensated_linear(self.lin, self.k_in, self.b_map)


class _ScoreFit(_CorrectedCopy):
    """The q-producing GEMM of `spec` at width r (1 <= r <= R: a width with a score fit, skd.score_fit): its
    kept rows (fused qkv: the 3*H*r-row prefix; separate q: H*r rows) with the q rows and bias replaced by
    `corrected_q`'s (the fit a constant when autograd records).
    """

    def __init__(self, spec: BlockSpec, r: int, bound: bool) -> None:
        self.spec, self.lin, self.r = spec, q_linear(spec), r
        self._bind_copy(bound)

    def sources(self) -> tuple[torch.Tensor | None, ...]:
        lin = self.lin
        return lin.weight, lin.bias, score_fit(lin)

    def _computed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (rows, D), bias (rows,) | None): the kept rows, q rows corrected, new contiguous tensors."""
        spec, lin, r = self.spec, self.lin, self.r
        q_bias = None if lin.bias is None else q_rows(spec, lin.bias, r)
        q_weight, q_bias = corrected_q(q_rows(spec, lin.weight, r), q_bias, score_fit(lin), r)
        return (with_q_rows(spec, lin.weight, r, q_weight),
                None if q_bias is None else with_q_rows(spec, lin.bias, r, q_bias))


def _q_gemms(spec: BlockSpec, r: int, gemm: Callable[..., Gemm], bound: bool) -> tuple[tuple[Gemm, Weights], ...]:
    """The block's q/k/v GEMMs at width r > 0 with their `Weights`: (fused qkv,) or (q, k, v), the q-producing
    one under the score fit when its Linear stores one with a fit for width r."""
    h = spec.num_heads
    linears = (spec.qkv,) if spec.fused else (spec.q, spec.k, spec.v)
    rows = 3 * h * r // len(linears)
    if fitted(score_fit(q_linear(spec)), r):
        first = _ScoreFit(spec, r, bound)
        return ((first, first.weights), *((gemm(lin, k_out=rows), functools.partial(_own, lin)) for lin in linears[1:]))
    return tuple((gemm(lin, k_out=rows), functools.partial(_own, lin)) for lin in linears)


def _output_gemm(gemm: Callable[..., Gemm], lin: nn.Linear, k_in: int, bound: bool) -> tuple[Gemm, Weights]:
    """The GEMM of an output projection or fc2 with its `Weights`: `gemm`'s, or the compensated one when `lin`
    stores a mean (cross-head when it also stores a covariance and inputs are dropped)."""
    if input_mean(lin) is None:
        return gemm(lin, k_in=k_in), functools.partial(_own, lin)
    g = _CrossHead(lin, k_in, bound) if input_cov(lin) is not None and k_in < lin.in_features \
        else _Compensated(lin, k_in, bound)
    return g, g.weights


def _block(spec: BlockSpec, r: int, m: int, gemm: Callable[..., Gemm], bound: bool, frozen: bool) -> BlockPlan:
    h = spec.num_heads
    qkv = proj = attention = fc1 = fc2 = head_major = None
    if r:
        qkv, qkv_weights = zip(*_q_gemms(spec, r, gemm, bound), strict=True)
        proj, proj_weights = _output_gemm(gemm, spec.proj, h * r, bound)
        weight = spec.qkv.weight if spec.fused else spec.q.weight
        head_major = HeadMajor(qkv_weights, proj_weights, r, h, spec.fused, weight.device, frozen)
        if not frozen and _runs_attention_op(spec, weight):
            attention = _bound_attention(spec, weight) if bound else functools.partial(
                _public_attention if spec.fused else _public_separate, num_heads=h, scale=spec.scale)
    if m:
        fc1, fc2 = gemm(spec.fc1, k_out=m, activation=spec.fused_act), _output_gemm(gemm, spec.fc2, m, bound)[0]
    return BlockPlan(r, m, qkv, proj, attention, head_major, fc1, fc2)


def _runs_attention_op(spec: BlockSpec, weight: torch.Tensor) -> bool:
    """Whether the block's no-grad attention runs prefix_attention / prefix_attention_separate on the rank-major
    GEMM outputs (no activation copy) rather than the copies + SDPA (the plan's attention None).

    On CPU the ops' C++ kernel beats copies + SDPA. On CUDA their automatic kernel is those copies + SDPA
    (`via_sdpa`, faster there than their Triton kernel), which ElasticViT runs itself where it copies activations,
    choosing per call between that and reordering weights; so CUDA takes the plan's attention only when a backend
    is forced (use_backend). Where prefix_attention_separate has no kernel (a forced backend without one) its
    reference would materialise the (S, H, N, N) scores, so separate q, k, v keep the SDPA routes there too.
    """
    if weight.device.type != "cpu" and _dispatch.forced_backend() is None:
        return False
    return spec.fused or _dispatch.has_kernel(separate_op.OP, weight.device, weight.dtype)


def _public_attention(qkv: torch.Tensor, bias: torch.Tensor | None, num_heads: int, scale: float) -> torch.Tensor:
    return skd_kernels.prefix_attention(qkv, num_heads, scale, bias)


def _public_separate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
                     scale: float) -> torch.Tensor:
    return skd_kernels.prefix_attention_separate(q, k, v, num_heads, scale, bias)


def _bound_attention(spec: BlockSpec, weight: torch.Tensor) -> Attention:
    """prefix_attention (fused qkv) or prefix_attention_separate (q, k, v) for this block's heads and scale
    with the kernel chosen once (weight's device and dtype); below the autograd layer when no gradient is
    needed. The inputs are the plan's own GEMM outputs, so only an attention bias (built by the adapter) is
    checked."""
    h, scale = spec.num_heads, float(spec.scale)
    op = prefix_attention_op if spec.fused else separate_op
    fn = _dispatch.kernel(op.OP, weight.device, weight.dtype)

    def call(*args: torch.Tensor | None) -> torch.Tensor:  # (qkv, bias) or (q, k, v, bias)
        *inputs, bias = args
        if bias is not None:
            op.check(*inputs, h, scale, bias)
        if _dispatch.needs_grad(*args):
            return fn(*inputs, h, scale, bias)
        return _dispatch.below_autograd(fn, *inputs, h, scale, bias)

    return call
