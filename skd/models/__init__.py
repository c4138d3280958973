"""The model port: the only code in skd that knows a model library (timm, transformers, ...).

A family is one `ModelAdapter` subclass in one file, registered for the model classes it serves:

    @register(SomeModelClass, OtherModelClass)
    class SomeAdapter(ModelAdapter):
        source = "somelib"          # names the rebuilder in saved files (see `record`/`rebuild`)
        ...

`adapter_for(model)` returns the adapter of the most specific registered class in `type(model).__mro__`,
or raises `skd.UnsupportedModelError` naming the class (and, when an adapter claimed it but cannot
serve it, the reason). Family files of a library are imported lazily, the first time a model from that
library is seen (`FAMILY_MODULES`), so skd itself imports neither timm nor transformers.

Everything else in skd (elastic, stats, wpac, importance, evaluate, io, piad) talks to models only
through `ModelAdapter` and its `BlockSpec`s, and to batches only through `skd.batches`.

Terms used throughout (per block): H heads of hd dims (`num_heads`, `head_dim`), C = H*hd attention
channels, m MLP hidden units (`hidden`), D the residual width. The "standard layout" is the model's own
(head-major: q/k/v row and o column `head*hd + rank`); ElasticViT re-lays the weights rank-major while it
wraps the model (skd/elastic/layout.py) and restores the standard layout inside `standard_layout()`.
Every adapter method except `run` sees the standard layout.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..subnet import Subnet

# attn_fn(block_index, x (S, N, D), bias broadcastable to (S, H, N, N) or None) -> (S, N, D_out).
# x is the attention input after any pre-norm; the bias is additive (masks: 0 kept, large negative
# dropped, e.g. padding keys, Swin's shifted-window mask, relative position bias). The result is the
# output projection's output (bias included) BEFORE the output dropout, which `run` applies itself.
AttnFn = Callable[[int, torch.Tensor, torch.Tensor | None], torch.Tensor]
# mlp_fn(block_index, x (..., D)) -> (..., D): fc1, activation, hidden dropout, fc2 (bias included),
# BEFORE the MLP's output dropout, which `run` applies itself.
MlpFn = Callable[[int, torch.Tensor], torch.Tensor]

# library root module -> family modules to import the first time a model of that library is seen
FAMILY_MODULES: dict[str, tuple[str, ...]] = {
    "timm": ("skd.models.timm_vit", "skd.models.timm_swin"),
    "transformers": ("skd.models.hf_bert", "skd.models.hf_vit"),
}


@dataclass(frozen=True, eq=False)
class BlockSpec:
    """One transformer block's truncatable layers: the model's own modules (not copies), standard layout.

    name: the block's qualified name in the model (`model.get_submodule(name)`); block: that module.
    Attention projections, exactly one of:
      qkv: fused Linear (3*C, D), rows `which*C + head*hd + rank` (which: 0 q, 1 k, 2 v) — timm;
      q, k, v: three Linears (C, D), rows `head*hd + rank` — HF BertSelfAttention query/key/value.
    proj: the output projection `o`, Linear (D_out, C), columns `head*hd + rank` (HF: BertSelfOutput.dense).
    fc1: Linear (m, D) (HF: BertIntermediate.dense); act: the activation module after fc1 (must map 0 to 0:
    GELU variants, ReLU, SiLU); fc2: Linear (D, m) (HF: BertOutput.dense). fused_act: the name of
    `skd_kernels.prefix_linear`'s fused activation that equals `act` exactly ("gelu": erf GELU,
    "gelu_tanh"), or None to run `act` itself after fc1.
    hidden_dropout: the module applied to the activated hidden units before fc2 (timm Mlp.drop1;
    nn.Identity() when the family has none); attn_dropout: dropout probability on the attention weights.
    num_heads (H), head_dim (hd), hidden (m).
    qk_norms: modules normalising each head's q or k over its hd dims (timm qk_norm): their per-dim
    weight/bias (hd,) is shared by all heads; empty when there are none.
    tokens: tokens in one attention sequence (one window for Swin; the nominal sequence length for text,
    see `ModelAdapter.tokens`); sequences: attention sequences per sample (windows per image for Swin,
    else 1). Together they give the MACs per sample.
    blocking: why this block cannot be prefix-truncated (empty when it can).
    """

    name: str
    block: nn.Module
    proj: nn.Linear
    fc1: nn.Linear
    fc2: nn.Linear
    act: nn.Module
    num_heads: int
    head_dim: int
    hidden: int
    tokens: int
    sequences: int
    qkv: nn.Linear | None = None
    q: nn.Linear | None = None
    k: nn.Linear | None = None
    v: nn.Linear | None = None
    fused_act: str | None = None
    hidden_dropout: nn.Module = field(default_factory=nn.Identity)
    attn_dropout: float = 0.0
    qk_norms: tuple[nn.Module, ...] = ()
    blocking: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        separate = (self.q, self.k, self.v)
        if (self.qkv is None) == all(p is None for p in separate) or (self.qkv is None and None in separate):
            raise ValueError(f"{self.name}: give either the fused qkv Linear or all of q, k and v")

    @property
    def fused(self) -> bool:
        """True for one fused qkv Linear, False for separate q, k, v Linears."""
        return self.qkv is not None

    @property
    def has_qk_norm(self) -> bool:
        """True when q/k are normalised over each head's dims (dropping dims would change the norm)."""
        return bool(self.qk_norms)

    @property
    def channels(self) -> int:
        """C = num_heads * head_dim: the width of each of q, k, v and of o's input."""
        return self.num_heads * self.head_dim

    @property
    def dim(self) -> int:
        """D: the block's input width (in_features of the q/k/v projections and fc1)."""
        return self.fc1.in_features

    @property
    def scale(self) -> float:
        """Softmax scale of the full head, kept for every truncated width."""
        return self.head_dim ** -0.5

    def qkv_weights(self) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
        """((weight (C, D), bias (C,) | None) for q, k, v): views of the live parameters, standard layout."""
        if self.qkv is None:
            return tuple((lin.weight, lin.bias) for lin in (self.q, self.k, self.v))
        c, b = self.channels, self.qkv.bias
        return tuple((self.qkv.weight[j * c : (j + 1) * c], None if b is None else b[j * c : (j + 1) * c])
                     for j in range(3))


class ModelAdapter:
    """Family-specific knowledge of one model instance. Subclass per family, register with `@register`.

    The constructor takes the model, validates it (UnsupportedModelError naming the module and reason
    for anything the adapter cannot serve at all; per-block reasons that only forbid truncation go to
    `BlockSpec.blocking`) and calls `super().__init__(model, blocks)`. Class attributes: `source` (the
    library name in saved records). Methods marked "override" must be implemented by every family; the
    others have defaults that suit image classifiers.

    Batches (skd.batches): `(inputs, labels)` tuples/lists, a bare tensor, or a dict of tensors
    (`input_ids`, `attention_mask`, `token_type_ids`, `pixel_values`, `labels`).

    MACs of variable-length text: counted per sample at a nominal sequence length, `BlockSpec.tokens`
    = `nominal_tokens(model)` (the model attribute `skd_tokens` if set, else NOMINAL_TEXT_TOKENS),
    padding included; image models count their actual tokens. Only ratios between subnets matter for
    budgets, and they depend on the length only through the attention-score term.
    """

    source: ClassVar[str]

    def __init__(self, model: nn.Module, blocks: list[BlockSpec]) -> None:
        self.model = model
        self.blocks = blocks

    # ------------------------------------------------------------------------------ elastic forward
    def run(self, args: tuple, kwargs: dict[str, Any], subnet: Subnet, attn_fn: AttnFn, mlp_fn: MlpFn) -> Any:
        """Override. The model's forward on its own inputs `model(*args, **kwargs)`, returning the model's
        own output type (logits tensor, HF ModelOutput, ...), with every block's attention branch computed
        by `attn_fn(i, x, bias)` and MLP branch by `mlp_fn(i, x)` instead of the block's own modules.

        Everything else (embeddings, norms, residuals, layer scale, drop path, output dropouts, heads,
        attention-mask -> additive bias) is the model's own code path. A branch whose width in `subnet`
        is 0 is skipped: it adds a zero residual (for post-norm blocks such as BERT the norm still runs
        on `x + 0`). Called with the weights in rank-major layout: never call the wrapped modules whose
        weights the callbacks replace (q/k/v/qkv, proj, fc1, fc2).
        """
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- statistics
    def token_weights(self, batch: Any) -> torch.Tensor | None:
        """(B, T) float 0/1 weight of each token of each sample in the tapped features, or None (all 1).

        T is the feature's token count per sample, i.e. a feature (B*S, N, C) reshaped to (B, T, C).
        Text models return the attention_mask (padding tokens 0): every statistic and score skips them.
        """
        return None

    def default_loss(self, output: Any, batch: Any, reduction: str = "mean") -> torch.Tensor:
        """The loss skd uses when the caller gives none: cross-entropy of the logits against the batch's
        labels, in fp32. reduction "mean" (training) or "sum" (calibration statistics: per-sample
        gradients then do not depend on batching/sharding). ValueError when the batch has no labels;
        families without labels (bare encoders) override this."""
        from .. import batches

        labels = batches.labels(batch)
        if labels is None:
            raise ValueError(f"{type(self.model).__name__}: the batch has no labels, so the default "
                             "cross-entropy loss is undefined; pass loss_fn=")
        return torch.nn.functional.cross_entropy(self.logits(output).float(), labels.to(self.device),
                                                 reduction=reduction)

    def logits(self, output: Any) -> torch.Tensor:
        """(B, classes) logits from the model's output (default: the output itself)."""
        return output

    @property
    def num_classes(self) -> int | None:
        """Classes of the classification head, or None for a bare encoder."""
        return getattr(self.model, "num_classes", None)

    def mixup(self, num_classes: int, mixup: float, cutmix: float, label_smoothing: float) -> Callable | None:
        """A batch augmentation `aug(inputs, labels) -> (inputs, soft targets (B, classes))` for image
        classifiers (timm's Mixup), or None when it does not apply (text, mixup == cutmix == 0)."""
        return None

    # ----------------------------------------------------------------------------------------- MACs
    def other_macs(self) -> int:
        """Override. Multiply-accumulates per sample of every Linear/conv outside the blocks' attention and
        MLP branches (patch embedding, heads, patch merging, poolers), at `tokens` tokens per sample."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ extraction
    def shrink(self, subnet: Subnet) -> None:
        """Override. Make `self.model` physically smaller, in place (it is a private copy in standard layout).

        Block b keeps the first subnet.attn[b] dims of every head of q, k and v (and the matching
        proj columns) and the first subnet.mlp[b] hidden units (fc1 rows, fc2 columns), and must compute
        exactly what ElasticViT computes at `subnet`: the attention scores keep the full head's scale
        head_dim^-1/2 (fold sqrt(r/hd) into q when the family's attention uses 1/sqrt(r)). A width-0
        branch must add exactly 0 (e.g. a width-1 module with all-zero weights and output bias). Use
        `truncated_linear` for the slicing. Modules of the model's library only: the result must run
        without skd.
        """
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- save / load
    def record(self) -> dict[str, Any]:
        """Override. A JSON-serialisable description from which `rebuild` builds the same architecture
        (random or default weights; skd.load then loads the tensors). Must include "source": cls.source.
        ValueError when the model cannot be described (e.g. not built by the library's factory)."""
        raise NotImplementedError

    @classmethod
    def rebuild(cls, record: dict[str, Any]) -> nn.Module:
        """Override. The full-size model described by `record` (from `record()`), without downloading."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


NOMINAL_TEXT_TOKENS = 128


def nominal_tokens(model: nn.Module) -> int:
    """Tokens per sequence at which a text model's MACs are counted: `model.skd_tokens` or NOMINAL_TEXT_TOKENS."""
    return int(getattr(model, "skd_tokens", NOMINAL_TEXT_TOKENS))


# model class -> adapter class
_REGISTRY: dict[type, type[ModelAdapter]] = {}


def register(*model_classes: type) -> Callable[[type[ModelAdapter]], type[ModelAdapter]]:
    """Class decorator: the adapter serves `model_classes` (and their subclasses, unless a more specific
    class is registered too). Registering a class twice is a programming error (ValueError)."""

    def deco(adapter_cls: type[ModelAdapter]) -> type[ModelAdapter]:
        for c in model_classes:
            if c in _REGISTRY and _REGISTRY[c] is not adapter_cls:
                raise ValueError(f"{c.__qualname__} is already served by {_REGISTRY[c].__qualname__}")
            _REGISTRY[c] = adapter_cls
        return adapter_cls

    return deco


def _import_families(model: nn.Module) -> None:
    """Import the family modules of every library in `type(model).__mro__` (registering their adapters)."""
    for cls in type(model).__mro__:
        for name in FAMILY_MODULES.get(cls.__module__.split(".")[0], ()):
            if name not in sys.modules:
                try:
                    importlib.import_module(name)
                except ModuleNotFoundError as e:
                    if e.name != name:  # the library itself is broken or missing a part: say so
                        raise


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`; UnsupportedModelError naming the model's class (and reason) otherwise."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _import_families(model)
    for cls in type(model).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls](model)
    supported = ", ".join(sorted({c.__name__ for c in _REGISTRY})) or "none registered"
    raise UnsupportedModelError(f"{type(model).__module__}.{type(model).__name__} is not supported: skd handles "
                                f"{supported}")


def rebuild(record: dict[str, Any]) -> nn.Module:
    """The model a saved `ModelAdapter.record()` describes; records without "source" are timm's (skd <= 0.1)."""
    source = record.get("source", "timm")
    for name in FAMILY_MODULES.get(source, ()):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise ValueError(f"the saved model needs {source}, which is not installed ({e})") from e
    for adapter_cls in _REGISTRY.values():
        if getattr(adapter_cls, "source", None) == source:
            return adapter_cls.rebuild(record)
    raise ValueError(f"no adapter rebuilds models of source {source!r}")


def check_type(module: nn.Module, expected: type, where: str) -> None:
    """Exact type check: a subclass may override forward in a way truncation would silently break."""
    if type(module) is not expected:
        raise UnsupportedModelError(
            f"{where} is {type(module).__module__}.{type(module).__name__}; only "
            f"{expected.__module__}.{expected.__name__} is supported there"
        )


def truncated_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                     *, keep_bias: bool = True, zero: bool = False) -> nn.Linear:
    """A new Linear (same dtype/device) holding lin.weight[rows][:, cols] and lin.bias[rows].

    rows, cols: int64 index tensors (None: all). Empty rows/cols give a width-1 Linear with zero weights
    (many libraries cannot build 0-width modules); zero=True zeroes weights and bias too (a skipped
    branch's output projection must add exactly 0). keep_bias=False drops the bias.
    """
    w = lin.weight
    out_idx = torch.arange(w.shape[0], device=w.device) if rows is None else rows.to(w.device)
    in_idx = torch.arange(w.shape[1], device=w.device) if cols is None else cols.to(w.device)
    has_bias = keep_bias and lin.bias is not None
    new = nn.Linear(max(len(in_idx), 1), max(len(out_idx), 1), bias=has_bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.zero_()
        if len(out_idx) and len(in_idx) and not zero:
            new.weight.copy_(w[out_idx][:, in_idx])
        if has_bias:
            new.bias.zero_()
            if len(out_idx) and not zero:
                new.bias.copy_(lin.bias[out_idx])
    new.train(lin.training)
    return new


def head_rows(num_heads: int, head_dim: int, r: int, which: int = 1) -> torch.Tensor:
    """(which*H*r,) int64 standard-layout rows keeping the first r dims of every head, for `which`
    consecutive (C,)-sized parts (3 for a fused qkv, 1 for q, k, v or o's columns)."""
    return torch.arange(which * num_heads * head_dim).view(which, num_heads, head_dim)[:, :, :r].reshape(-1)
