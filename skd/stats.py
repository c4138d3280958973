"""Streaming calibration statistics for WPAC: Taylor sums and per-head weighted covariances.

One calibration pass runs batches of (images, labels) through the model in eval mode, takes the
gradient of the loss w.r.t. each block's q, k, v (the qkv Linear output) and MLP hidden activation
(the fc2 input), and folds each (activation, gradient) pair into sufficient statistics with
`skd_kernels.taylor_scores` and `skd_kernels.weighted_covariance` inside autograd hooks. Nothing is kept
beyond its batch, so peak memory does not depend on the number of samples, and the statistics of several
processes simply add up (`CalibrationStats.all_reduce`).

Features, per block (C channels, H heads of hd dims, head-major like timm's qkv rows):
  q, k, v: (B, T, H*hd) slices of the qkv output; hidden: (B, T, m) input of fc2.
For Swin, the (B*windows, N, C) window batches are viewed as (B, windows*N, C): windows of one image
are contiguous in timm's window_partition, so "per sample" always means per image.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

import skd_kernels
from skd_kernels import CovState

from ._dist import all_reduce_flat, rank_share
from .models import BlockSpec

QKV = ("q", "k", "v")
FEATURES = (*QKV, "hidden")
COVARIANCE_MODES = (None, "weighted", "uniform")
DATASET_BATCH_SIZE = 64

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sum_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Default calibration loss: cross-entropy summed over the batch, in fp32.

    Summed, not averaged: each sample's gradient is then independent of how samples are batched or
    sharded across processes, which is what makes streamed and distributed statistics add up exactly.
    """
    return F.cross_entropy(logits.float(), labels, reduction="sum")


@dataclass
class FeatureStats:
    """Statistics of one feature of one block (C channels).

    taylor: (C,) float64 Σ_samples |Σ_t g·a| (first-order Taylor channel importance).
    fisher: (C,) float64 Σ_samples (Σ_t g·a)^2 (diagonal Fisher), or None when not requested.
    cov: per-head CovState (H groups of hd) of the feature's tokens, weighted by Θ_t = |Σ_c g·a| or
    uniformly; None for the MLP hidden feature or when not requested.
    """

    taylor: torch.Tensor
    fisher: torch.Tensor | None = None
    cov: CovState | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every accumulated tensor, in a fixed order (for flat all-reduce)."""
        out = [self.taylor]
        if self.fisher is not None:
            out.append(self.fisher)
        if self.cov is not None:
            out += [self.cov.weight_sum, self.cov.sum, self.cov.sum_outer]
        return out


@dataclass
class CalibrationStats:
    """All blocks' statistics: blocks[i][feature] -> FeatureStats; samples: () float64 count."""

    blocks: list[dict[str, FeatureStats]]
    samples: torch.Tensor

    @classmethod
    def zeros(cls, blocks: Sequence[BlockSpec], covariance: str | None, fisher: bool,
              device: torch.device) -> CalibrationStats:
        """Empty statistics for `blocks`: float64 zeros on `device`, covariances/Fisher only if asked for."""
        f64 = dict(dtype=torch.float64, device=device)
        out = []
        for spec in blocks:
            c = spec.num_heads * spec.head_dim
            feats = {}
            for name in FEATURES:
                width = spec.hidden if name == "hidden" else c
                feats[name] = FeatureStats(
                    taylor=torch.zeros(width, **f64),
                    fisher=torch.zeros(width, **f64) if fisher else None,
                    cov=CovState.zeros(spec.num_heads, spec.head_dim, device)
                    if covariance is not None and name != "hidden" else None,
                )
            out.append(feats)
        return cls(out, torch.zeros((), **f64))

    def tensors(self) -> list[torch.Tensor]:
        """Every accumulated tensor, samples first, in a fixed order (for flat all-reduce)."""
        return [self.samples] + [t for feats in self.blocks for f in feats.values() for t in f.tensors()]

    def all_reduce(self, group: object = None) -> CalibrationStats:
        """Sums every process's statistics in place with one all-reduce of a flat float64 buffer."""
        all_reduce_flat(self.tensors(), group=group)
        return self


def _batches(data: Iterable | Dataset) -> Iterable:
    """A map-style Dataset of single samples is batched; anything else must already yield batches."""
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        return DataLoader(data, batch_size=DATASET_BATCH_SIZE)
    return data


class _Collector:
    """Registers the hooks of one calibration pass and folds each batch into `stats`.

    Forward hooks stash the detached activation (a view, no copy) and register a tensor hook on the
    graph's activation; the tensor hook receives the gradient during backward, updates the statistics and
    drops the activation. `outputs` holds this batch's graph activations for `torch.autograd.grad`.
    """

    def __init__(self, blocks: Sequence[BlockSpec], stats: CalibrationStats, covariance: str | None) -> None:
        self.blocks = blocks
        self.stats = stats
        self.covariance = covariance
        self.batch_size = 0
        self.outputs: list[torch.Tensor] = []
        self._acts: dict[tuple[int, str], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _Collector:
        for i, spec in enumerate(self.blocks):
            self._handles.append(spec.qkv.register_forward_hook(functools.partial(self._on_qkv, i)))
            self._handles.append(spec.fc2.register_forward_pre_hook(functools.partial(self._on_hidden, i)))
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

    def _on_qkv(self, i: int, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._stash(i, "qkv", output)

    def _on_hidden(self, i: int, module: nn.Module, inputs: tuple) -> None:
        self._stash(i, "hidden", inputs[0])

    def _on_grad(self, i: int, name: str, grad: torch.Tensor) -> None:
        act = self._acts.pop((i, name))
        if name == "hidden":
            self._update(i, "hidden", act, grad)
            return
        c = self.blocks[i].num_heads * self.blocks[i].head_dim
        for j, feat in enumerate(QKV):
            self._update(i, feat, act[..., j * c : (j + 1) * c], grad[..., j * c : (j + 1) * c])

    def _update(self, i: int, name: str, act: torch.Tensor, grad: torch.Tensor) -> None:
        """act, grad: (S, ..., C) in the model's dtype, S = batch or batch*windows."""
        spec, st = self.blocks[i], self.stats.blocks[i][name]
        c = act.shape[-1]
        act, grad = act.reshape(self.batch_size, -1, c), grad.reshape(self.batch_size, -1, c)
        try:
            token, channel = skd_kernels.taylor_scores(act, grad)
        except ValueError as e:  # the kernel names the tensor; add where it came from
            raise ValueError(f"{spec.name} {name}: {str(e).replace('grad', 'gradient')}") from e
        st.taylor += channel.double()
        if st.fisher is not None:
            # Σ_t g·a per sample, squared: the diagonal Fisher of a per-channel mask (plain PyTorch; only
            # the "hessian" baseline needs it).
            st.fisher += (grad.float() * act.float()).sum(1).square().sum(0).double()
        if st.cov is not None:
            x = act.reshape(-1, c)
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()  # half-precision models: statistics (and the weights Θ) stay fp32
            w = token.reshape(-1) if self.covariance == "weighted" else torch.ones_like(token.reshape(-1))
            skd_kernels.weighted_covariance(x, w, spec.num_heads, state=st.cov)


def calibrate(
    model: nn.Module,
    blocks: Sequence[BlockSpec],
    data: Iterable | Dataset,
    *,
    num_samples: int,
    covariance: str | None,
    fisher: bool = False,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    group: object = None,
) -> CalibrationStats:
    """One streamed calibration pass over at most `num_samples` samples of `data`.

    model: the bare timm model whose `blocks` (adapter BlockSpecs) are hooked; run in eval mode, its
    training flag is restored afterwards. data: yields (images (B, C, H, W), labels (B,)) batches, or a
    map-style Dataset of single samples (batched here). covariance: None, "weighted" (w_t = Θ_t) or
    "uniform" (w_t = 1) per-head covariance of q, k, v. fisher: also accumulate Σ (Σ_t g·a)^2.
    loss_fn(outputs, labels) -> scalar, summed over the batch (default: `sum_cross_entropy`).
    Under torch.distributed each process reads its own shard of num_samples / world samples from its
    `data` and the statistics are all-reduced over `group`: the result equals one process on all samples.

    Raises ValueError on an empty loader, NaN/Inf images, or NaN/Inf activations or gradients (naming the
    block and tensor); warns when fewer than num_samples samples were available in total.
    """
    if covariance not in COVARIANCE_MODES:
        raise ValueError(f"covariance={covariance!r} must be one of {COVARIANCE_MODES}")
    loss_fn = loss_fn or sum_cross_entropy
    param = next(model.parameters())
    budget, rank, world = rank_share(num_samples)
    stats = CalibrationStats.zeros(blocks, covariance, fisher, param.device)
    was_training = model.training
    model.eval()
    bar = tqdm(total=budget, desc="skd calibration", unit="img", disable=not progress or rank != 0)
    try:
        with _Collector(blocks, stats, covariance) as collector, torch.enable_grad():
            seen = 0
            for n, (images, labels) in enumerate(_take(_batches(data), budget)):
                if not bool(torch.isfinite(images).all()):
                    raise ValueError(f"calibration batch {n}: images contain NaN or Inf")
                # requires_grad on the input only guarantees a graph (frozen parameters included);
                # autograd.grad below computes gradients for the hooked activations alone, not weights.
                images = images.to(param.device, param.dtype).requires_grad_(True)
                collector.batch_size = images.shape[0]
                loss = loss_fn(model(images), labels.to(param.device))
                torch.autograd.grad(loss, collector.outputs, allow_unused=True)
                collector.end_batch()
                seen += images.shape[0]
                bar.update(images.shape[0])
            stats.samples += seen
    finally:
        bar.close()
        model.train(was_training)
    if world > 1:
        stats.all_reduce(group)
    total = int(stats.samples)
    if total == 0:
        raise ValueError("the calibration data yielded no samples")
    if total < num_samples:
        warnings.warn(f"calibration data had only {total} samples of the {num_samples} asked for; using those",
                      stacklevel=3)
    return stats


def _take(batches: Iterable, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches truncated so that exactly min(n, available) samples are yielded."""
    if n <= 0:
        return
    left = n
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"calibration data must yield (images, labels) batches, got {type(batch).__name__}")
        images, labels = batch[0], batch[1]
        if images.dim() != 4:
            raise ValueError(f"calibration images must be (B, C, H, W), got shape {tuple(images.shape)}")
        k = min(left, images.shape[0])
        if k == 0:
            continue
        yield images[:k], labels[:k]
        left -= k
        if left == 0:
            return


