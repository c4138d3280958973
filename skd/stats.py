"""Streaming calibration statistics for WPAC: Taylor sums and per-head weighted covariances.

One calibration pass runs batches (skd.batches: (inputs, labels), dicts of tensors, ...) through the model
in eval mode (its own forward, or skd.attention_stats.explicit_forward when that pass also feeds
attention accumulators: skd.wpac(joint_qk=True)), takes the gradient of the loss w.r.t. each block's q,
k, v (the fused qkv Linear's output, or the separate q/k/v Linears' outputs) and MLP hidden activation
(the fc2 input), and folds each (activation, gradient) pair into sufficient statistics with
`skd_kernels.taylor_scores` and `skd_kernels.weighted_covariance` inside autograd hooks. Nothing is kept
beyond its batch, so peak memory does not depend on the number of samples, and the statistics of several
processes simply add up (one flat all-reduce of `CalibrationStats.tensors()`, skd.passes.stream_pass).
Only the features the caller reads are hooked (`calibrate(features=)`, skd.wpac.gradient_features); with none,
the pass runs forward only, under no_grad: no loss, no backward, no labels, and what it collects are the
forward statistics (the context, the hidden moments, the uniform q/k/v covariances, attention accumulators).

Features, per block (C = H*hd channels, head-major like the model's own rows):
  q, k, v: (B, T, C); hidden: (B, T, m) input of fc2; and, only when asked for (wpac+), context: (B, T, C)
  input of the output projection, forward only: its uniform per-head covariance, no gradient needed.
A feature computed as (B*S, N, C) (Swin's window batches) is viewed as (B, S*N, C): the sequences of one
sample are contiguous, so "per sample" always means per input sample. Token weights (B, T) from the
adapter (padding 0) multiply every token's contribution: a padding token adds nothing to any statistic.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import skd_kernels
from skd_kernels import CovState

from . import batches
from .attention_inputs import AttentionInputs
from .attention_stats import Accumulator, explicit_forward
from .models import BlockSpec, ModelAdapter
from .passes import stream_pass

QKV = ("q", "k", "v")
FEATURES = (*QKV, "hidden")
CONTEXT = "context"  # the output projection's input; collected only when asked (calibrate(context=True))
# The same input's full (C, C) covariance, one group across heads (cross-head compensation; calibrate(
# context_full=True))
CONTEXT_FULL = "context_full"
COVARIANCE_MODES = (None, "weighted", "uniform")
MOMENT_CHUNK_BYTES = 1 << 20  # Moments.update squares this much of x at a time (stays in cache)

# loss_fn(output, batch) -> scalar: the model's own output and the batch it came from (skd.batches)
LossFn = Callable[[Any, Any], torch.Tensor]
# token_weights(batch) -> (B, T) 0/1 weights of the tapped features' tokens, or None (all 1)
TokenWeightsFn = Callable[[Any], torch.Tensor | None]


def sum_cross_entropy(output: torch.Tensor, batch: Any) -> torch.Tensor:
    """Default calibration loss: cross-entropy of the output logits against the batch's labels, summed
    over the batch, in fp32.

    Summed, not averaged: each sample's gradient is then independent of how samples are batched or
    sharded across processes, which is what makes streamed and distributed statistics add up exactly.
    """
    labels = batches.labels(batch)
    if labels is None:
        raise ValueError("the calibration batches have no labels: pass loss_fn=")
    return F.cross_entropy(output.float(), labels.to(output.device), reduction="sum")


@dataclass
class FeatureStats:
    """Statistics of one feature of one block (C channels).

    taylor: (C,) float64 Σ_samples |Σ_t g·a| (first-order Taylor channel importance); None for the
    forward-only context feature and for features not collected (calibrate(features=)).
    fisher: (C,) float64 Σ_samples (Σ_t g·a)^2 (diagonal Fisher), or None when not requested or collected.
    cov: per-head CovState (H groups of hd) of the feature's tokens, weighted by Θ_t = |Σ_c g·a| (a gradient
    statistic: None for features not collected) or uniformly (times the token weight; a forward statistic,
    of q, k and v whatever `features`); None for the MLP hidden feature or when not requested.
    moments: the MLP hidden feature's per-unit first and second moments (tokens weighted by their token
    weight only), or None when not requested (calibrate(moments=True)) and for every other feature.
    """

    taylor: torch.Tensor | None
    fisher: torch.Tensor | None = None
    cov: CovState | None = None
    moments: Moments | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every accumulated tensor, in a fixed order (for flat all-reduce)."""
        out = [t for t in (self.taylor, self.fisher) if t is not None]
        if self.cov is not None:
            out += [self.cov.weight_sum, self.cov.sum, self.cov.sum_outer]
        if self.moments is not None:
            out += [self.moments.weight_sum, self.moments.sum, self.moments.sum_sq]
        return out


@dataclass
class Moments:
    """Per-channel weighted moments of C channels: weight_sum () Σw, sum (C,) Σ w·x, sum_sq (C,) Σ w·x²;
    all float64."""

    weight_sum: torch.Tensor
    sum: torch.Tensor
    sum_sq: torch.Tensor

    @classmethod
    def zeros(cls, channels: int, device: torch.device) -> Moments:
        f64 = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros((), **f64), torch.zeros(channels, **f64), torch.zeros(channels, **f64))

    def update(self, x: torch.Tensor, w: torch.Tensor | None) -> None:
        """Fold in x (S, T, C) any float dtype with token weights w (S, T) (None: all 1).

        One batch is reduced in fp32 (GEMVs, as cheap as reading x twice) and added to the fp64 totals,
        so rounding does not grow with the number of batches. x² is formed MOMENT_CHUNK_BYTES at a time: a
        temporary the size of x (an MLP's hidden activation, megabytes) costs twice the GEMV in page faults."""
        x = _fp32_at_least(x.detach()).reshape(-1, x.shape[-1])
        w = x.new_ones(x.shape[0]) if w is None else w.reshape(-1).to(x.dtype)
        total, sum_sq = w @ x, x.new_zeros(x.shape[1])
        rows = max(1, MOMENT_CHUNK_BYTES // (x.shape[1] * x.element_size()))
        for xs, ws in zip(x.split(rows), w.split(rows), strict=True):
            sum_sq.addmv_(xs.square().T, ws)
        if not bool(torch.isfinite(sum_sq).all()):  # NaN/Inf in x, or x² past fp32: every later sum would carry it
            raise ValueError("the activation contains NaN or Inf, or its square overflows fp32")
        self.weight_sum += w.sum().double()
        self.sum += total.double()
        self.sum_sq += sum_sq.double()

    def mean(self) -> torch.Tensor:
        """(C,) float64 E[x]; ValueError when no token carried weight."""
        if float(self.weight_sum) <= 0:
            raise ValueError("no token carried weight: the moments are undefined")
        return self.sum / self.weight_sum

    def variance(self) -> torch.Tensor:
        """(C,) float64 Var[x] = E[x²] - E[x]², clamped at 0 (rounding)."""
        mean = self.mean()
        return (self.sum_sq / self.weight_sum - mean.square()).clamp_min(0)


@dataclass
class CalibrationStats:
    """All blocks' statistics: blocks[i][feature] -> FeatureStats (FEATURES, plus CONTEXT and CONTEXT_FULL
    when collected);
    samples: () float64 count."""

    blocks: list[dict[str, FeatureStats]]
    samples: torch.Tensor

    @classmethod
    def zeros(cls, blocks: Sequence[BlockSpec], covariance: str | None, fisher: bool,
              device: torch.device, context: bool = False, moments: bool = False,
              context_full: bool = False, features: Collection[str] = FEATURES) -> CalibrationStats:
        """Empty statistics for `blocks`: float64 zeros on `device`, covariances/Fisher/context/hidden
        moments only if asked for (the context feature has a uniform covariance and nothing else); the gradient
        statistics (taylor, fisher, the weighted cov) only for `features`, None for the others."""
        f64 = dict(dtype=torch.float64, device=device)
        out = []
        for spec in blocks:
            c = spec.channels
            feats = {}
            for name in FEATURES:
                width, read = spec.hidden if name == "hidden" else c, name in features
                feats[name] = FeatureStats(
                    taylor=torch.zeros(width, **f64) if read else None,
                    fisher=torch.zeros(width, **f64) if fisher and read else None,
                    cov=CovState.zeros(spec.num_heads, spec.head_dim, device)
                    if name != "hidden" and (covariance == "uniform" or (covariance == "weighted" and read)) else None,
                    moments=Moments.zeros(width, device) if moments and name == "hidden" else None,
                )
            if context:
                feats[CONTEXT] = FeatureStats(taylor=None, cov=CovState.zeros(spec.num_heads, spec.head_dim, device))
            if context_full:
                feats[CONTEXT_FULL] = FeatureStats(taylor=None, cov=CovState.zeros(1, spec.channels, device))
            out.append(feats)
        return cls(out, torch.zeros((), **f64))

    def tensors(self) -> list[torch.Tensor]:
        """Every accumulated tensor, samples first, in a fixed order (for flat all-reduce)."""
        return [self.samples] + [t for feats in self.blocks for f in feats.values() for t in f.tensors()]


class _Collector:
    """Registers the hooks of one calibration pass and folds each batch into `stats`.

    Forward hooks on the features read (`features`) stash the detached activation (a view, no copy) and
    register a tensor hook on the graph's activation; the tensor hook receives the gradient during backward,
    updates the statistics and drops the activation. Forward statistics (uniform q/k/v covariances, the
    context's, the hidden moments) are folded in by the forward hooks themselves. `outputs` holds this batch's
    graph activations for `torch.autograd.grad`. `batch_size` and `weights` ((B, T) token weights or None)
    describe the current batch.
    """

    def __init__(self, blocks: Sequence[BlockSpec], stats: CalibrationStats, covariance: str | None,
                 context: bool, features: Collection[str]) -> None:
        self.blocks = blocks
        self.stats = stats
        self.covariance = covariance
        self.context = context
        self.features = features
        self.batch_size = 0
        self.weights: torch.Tensor | None = None
        self.outputs: list[torch.Tensor] = []
        self._acts: dict[tuple[int, str], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _Collector:
        for i, spec in enumerate(self.blocks):
            tapped = QKV if self.covariance == "uniform" else [n for n in QKV if n in self.features]
            if spec.fused:  # one output for all three: hooked if any is tapped
                taps = [(spec.qkv, "qkv")] if tapped else []
            else:
                taps = [(lin, name) for lin, name in zip((spec.q, spec.k, spec.v), QKV, strict=True)
                        if name in tapped]
            for lin, name in taps:
                self._handles.append(lin.register_forward_hook(functools.partial(self._on_output, i, name)))
            if "hidden" in self.features or self.stats.blocks[i]["hidden"].moments is not None:
                self._handles.append(spec.fc2.register_forward_pre_hook(functools.partial(self._on_input, i, "hidden")))
            if self.context:
                self._handles.append(spec.proj.register_forward_pre_hook(functools.partial(self._on_context, i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.end_batch()

    def end_batch(self) -> None:
        self.outputs.clear()
        self._acts.clear()

    # Activations are stashed by key and looked up in the gradient hook, not captured in a closure:
    # a tensor hook that references its own tensor forms a cycle through autograd that GC cannot free.
    def _stash(self, i: int, name: str, act: torch.Tensor) -> None:
        if not act.requires_grad:
            return  # not under the calibration pass's grad-enabled forward
        self._acts[i, name] = act.detach()
        self.outputs.append(act)
        act.register_hook(functools.partial(self._on_grad, i, name))

    def _on_output(self, i: int, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        """q, k, v (or the fused qkv): their uniform covariances here, forward; stashed for the gradient hook when
        a gradient statistic of one of them is read."""
        parts = [(name, output)] if name != "qkv" else list(zip(QKV, output.chunk(3, dim=-1), strict=True))
        if self.covariance == "uniform":
            for feat, act in parts:
                self._uniform_covariance(i, feat, act.detach())
        if any(feat in self.features for feat, _ in parts):
            self._stash(i, name, output)

    def _uniform_covariance(self, i: int, name: str, act: torch.Tensor) -> None:
        c = act.shape[-1]
        act = act.reshape(self.batch_size, -1, c)
        w = None if self.weights is None else self._checked_weights(i, name, act)
        if w is not None:
            act = act * w[..., None].to(act.dtype)  # as in the gradient statistics: padding adds nothing
        self._add_covariance(i, name, act, None if w is None else w.reshape(-1))

    def _add_covariance(self, i: int, name: str, act: torch.Tensor, tw: torch.Tensor | None) -> None:
        """act (..., C) token-weighted, tw (tokens,) the covariance's weights or None (all 1)."""
        spec = self.blocks[i]
        x = _fp32_at_least(act.reshape(-1, act.shape[-1]))
        tw = x.new_ones(x.shape[0]) if tw is None else tw.to(x.dtype)
        with _where(spec, name):
            skd_kernels.weighted_covariance(x, tw, spec.num_heads, state=self.stats.blocks[i][name].cov)

    def _on_input(self, i: int, name: str, module: nn.Module, inputs: tuple) -> None:
        moments = self.stats.blocks[i][name].moments
        if moments is not None:  # a forward statistic: collected here, with or without gradients
            act = inputs[0].detach()
            act = act.reshape(self.batch_size, -1, act.shape[-1])
            w = None if self.weights is None else self._checked_weights(i, name, act)
            with _where(self.blocks[i], name):
                moments.update(act, w)
        if name in self.features:
            self._stash(i, name, inputs[0])

    def _on_context(self, i: int, module: nn.Module, inputs: tuple) -> None:
        """Forward only: the context's uniform per-head covariance needs no gradient (padding weight 0)."""
        spec = self.blocks[i]
        x = _fp32_at_least(inputs[0].detach().reshape(self.batch_size, -1, spec.channels))
        w = x.new_ones(x.shape[:2]) if self.weights is None else self._checked_weights(i, CONTEXT, x)
        x, w = x.reshape(-1, spec.channels), w.reshape(-1).to(x.dtype)
        with _where(spec, CONTEXT):
            skd_kernels.weighted_covariance(x, w, spec.num_heads, state=self.stats.blocks[i][CONTEXT].cov)
            full = self.stats.blocks[i].get(CONTEXT_FULL)
            if full is not None:
                skd_kernels.weighted_covariance(x, w, 1, state=full.cov)

    def _checked_weights(self, i: int, name: str, act: torch.Tensor) -> torch.Tensor:
        """The batch's (B, T) token weights, after checking they match act (B, T, C)."""
        w = self.weights
        if w.shape != act.shape[:2]:
            raise ValueError(f"{self.blocks[i].name} {name}: token weights have shape {tuple(w.shape)} but the "
                             f"feature has (batch, tokens) = {tuple(act.shape[:2])}")
        return w

    def _on_grad(self, i: int, name: str, grad: torch.Tensor) -> None:
        act = self._acts.pop((i, name))
        if name != "qkv":
            self._update(i, name, act, grad)
            return
        c = self.blocks[i].channels
        for j, feat in enumerate(QKV):
            if feat in self.features:
                self._update(i, feat, act[..., j * c : (j + 1) * c], grad[..., j * c : (j + 1) * c])

    def _update(self, i: int, name: str, act: torch.Tensor, grad: torch.Tensor) -> None:
        """act, grad: (S, ..., C) in the model's dtype, S = batch or batch*sequences."""
        spec, st = self.blocks[i], self.stats.blocks[i][name]
        c = act.shape[-1]
        act, grad = act.reshape(self.batch_size, -1, c), grad.reshape(self.batch_size, -1, c)
        w = None if self.weights is None else self._checked_weights(i, name, act)
        if w is not None:
            act = act * w[..., None].to(act.dtype)  # padding tokens: g·a = 0 in every Taylor/Fisher sum
        with _where(spec, name):
            token, channel = skd_kernels.taylor_scores(act, grad)
        st.taylor += channel.double()
        if st.fisher is not None:
            # Σ_t g·a per sample, squared: the diagonal Fisher of a per-channel mask (plain PyTorch; only
            # the "hessian" baseline needs it).
            st.fisher += (grad.float() * act.float()).sum(1).square().sum(0).double()
        if self.covariance == "weighted" and st.cov is not None:
            tw = token.reshape(-1)
            self._add_covariance(i, name, act, tw if w is None else tw * w.reshape(-1).to(tw.dtype))


def _fp32_at_least(x: torch.Tensor) -> torch.Tensor:
    """Half-precision models: statistics (and the weights Θ) stay fp32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@contextlib.contextmanager
def _graph_guaranteed(model: nn.Module) -> Iterator[None]:
    """Every floating-point parameter requires grad inside (flags restored after), so the hooked activations
    are in a graph even for a frozen model and whatever the inputs are (token ids cannot require grad).
    `torch.autograd.grad` on the activations computes no weight gradient."""
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def calibrate(
    model: nn.Module,
    blocks: Sequence[BlockSpec],
    data: Iterable | Dataset,
    *,
    num_samples: int,
    covariance: str | None,
    fisher: bool = False,
    loss_fn: LossFn | None = None,
    token_weights: TokenWeightsFn | None = None,
    context: bool = False,
    moments: bool = False,
    context_full: bool = False,
    accumulators: Sequence[Accumulator] = (),
    attention_inputs: AttentionInputs | None = None,
    adapter: ModelAdapter | None = None,
    features: Collection[str] = FEATURES,
    progress: bool = True,
    group: object = None,
) -> CalibrationStats:
    """One streamed calibration pass over at most `num_samples` samples of `data`.

    model: the bare model (standard layout) whose `blocks` (adapter BlockSpecs) are hooked; run in eval
    mode, its training flag is restored afterwards. data: yields batches (skd.batches), or a map-style
    Dataset of single samples (batched here). covariance: None, "weighted" (w_t = Θ_t, a gradient statistic of
    the q/k/v in `features`) or "uniform" (w_t = 1, forward, of all three) per-head covariance of q, k, v.
    fisher: also accumulate Σ (Σ_t g·a)^2.
    loss_fn(output, batch) -> scalar, summed over the batch (default: `sum_cross_entropy`).
    token_weights(batch) -> (B, T) or None: the adapter's `token_weights` (padding tokens 0).
    context: also the CONTEXT feature (the output projection's input): its uniform per-head covariance,
    forward only (off by default: it costs one more covariance per block).
    context_full: with `context`, also CONTEXT_FULL, that input's full (C, C) covariance across heads (one
    group; cross-head compensation).
    moments: also the MLP hidden feature's per-unit first and second moments (`Moments`; off by default).
    accumulators: skd.attention_stats accumulators (JointQK, ScoreFit) to feed in this same pass: the
    forward then runs through `skd.attention_stats.explicit_forward(adapter, ...)` (the model's function,
    every block's attention computed explicitly from the same modules, so the hooks see the same
    activations and gradients up to rounding) and they are all-reduced with the statistics.
    attention_inputs: a skd.attention_inputs.AttentionInputs that the same explicit forward fills with the
    blocks' attention inputs (the score fit replays them after the transform). adapter: the model's
    ModelAdapter, needed with either. Without them the model's own forward runs.
    features: the FEATURES whose gradient statistics (taylor, and fisher and cov when asked for) are collected;
    the others' are None and are not hooked. Empty: the pass runs forward only, under no_grad: no loss, no
    backward, no labels needed; only forward statistics (context, context_full, moments, the uniform covariance,
    the accumulators, attention_inputs) can be collected then (ValueError with the weighted covariance or fisher).
    Under torch.distributed each process reads its own shard of num_samples / world samples from its
    `data` and the statistics are all-reduced over `group`: the result equals one process on all samples.

    Raises ValueError on an empty loader, NaN/Inf inputs, or NaN/Inf activations or gradients (naming the
    block and tensor); warns when fewer than num_samples samples were available in total.
    """
    if covariance not in COVARIANCE_MODES:
        raise ValueError(f"covariance={covariance!r} must be one of {COVARIANCE_MODES}")
    if context_full and not context:
        raise ValueError("context_full=True needs context=True (it extends the context statistics)")
    if not set(features) <= set(FEATURES):
        raise ValueError(f"features={tuple(features)!r}: each must be one of {FEATURES}")
    gradients = bool(features)
    if not gradients and (covariance == "weighted" or fisher):
        raise ValueError("features=() collects forward statistics only: the weighted covariance (weighted by the "
                         "gradients) and fisher are gradient statistics of the features")
    explicit = bool(accumulators) or attention_inputs is not None
    if explicit and (adapter is None or adapter.model is not model):
        raise ValueError("accumulators= needs adapter= (so does attention_inputs=), the adapter of the calibrated "
                         "model (its explicit-attention forward feeds them)")
    loss_fn = loss_fn or sum_cross_entropy
    stats = CalibrationStats.zeros(blocks, covariance, fisher, next(model.parameters()).device, context, moments,
                                   context_full, features)
    forward = (functools.partial(explicit_forward, adapter, accumulators=accumulators, inputs=attention_inputs)
               if explicit else functools.partial(batches.call, model))

    graph = (torch.enable_grad(), _graph_guaranteed(model)) if gradients else (torch.no_grad(),)
    with _Collector(blocks, stats, covariance, context, features) as collector, contextlib.ExitStack() as stack:
        for mode in graph:
            stack.enter_context(mode)

        def step(batch: Any) -> None:
            collector.batch_size = batches.batch_size(batch)
            collector.weights = None if token_weights is None else token_weights(batch)
            output = forward(batch)
            if gradients:
                torch.autograd.grad(loss_fn(output, batch), collector.outputs, allow_unused=True)
            collector.end_batch()

        # stats.tensors() starts with the sample count, which stream_pass counts and all-reduces itself
        stats.samples += stream_pass(
            model, data, step, lambda: [*stats.tensors()[1:], *(t for acc in accumulators for t in acc.tensors())],
            num_samples=num_samples, desc="skd calibration", progress=progress, group=group)
    for acc in accumulators:  # the features' statistics were checked per batch, by the kernels and Moments
        if not all(bool(torch.isfinite(t).all()) for t in acc.tensors()):
            raise ValueError(f"the attention statistics ({type(acc).__name__}) contain NaN or Inf: the activations "
                             "overflowed")
    return stats


@contextlib.contextmanager
def _where(spec: BlockSpec, name: str) -> Iterator[None]:
    """A ValueError raised inside (a kernel's or Moments', naming its own argument) gets the block and feature
    it came from in front."""
    try:
        yield
    except ValueError as e:
        message = re.sub(r"\bgrad\b", "gradient", str(e))
        raise ValueError(f"{spec.name} {name}: {message}") from e
