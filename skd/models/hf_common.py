"""What the HuggingFace transformers families share: record/rebuild from the saved config, running the
model's own forward with caller-supplied branches, attention-mask -> additive bias, activations, MACs of
the Linears outside the blocks, and cutting the attention/MLP Linears down for extraction.

Elastic forward (`run`): each transformer layer's `forward` is replaced, for the duration of one call,
by a function computing the same layer from the caller's attention/MLP branches; everything else
(embeddings, mask construction, poolers, heads, the output dataclass) is the model's own code. The
top-level module is entered through `model.forward` rather than `model(...)`, so forward hooks on the
model itself (ElasticViT's guard against running rank-major weights directly) do not fire; hooks on
inner modules do. Attention weights are never formed on this path (skd's attention kernels compute the
output directly), so `output_attentions=True` (as an argument or in the model's config) raises ValueError
rather than return an empty tuple; `output_hidden_states` works (the layers' outputs).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..subnet import Subnet
from . import AttnFn, BlockSpec, MlpFn, ModelAdapter, head_rows, truncated_linear


def additive_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The 4-D attention mask HuggingFace builds for its attention functions -> an additive float bias.

    mask: None (attend everywhere), bool (B, 1, N, N) True = attend (the SDPA path), or an additive
    float (B, 1, N, N) (the eager path, dtype-min for masked keys). Returns None or (B, 1, N, N) `dtype`.
    """
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def fused_activation(act: nn.Module) -> str | None:
    """prefix_linear's fused activation equal to a transformers activation module, or None (run `act`).

    GELUActivation is torch's erf GELU ("gelu"); GELUTanh is torch's tanh-approximate GELU ("gelu_tanh")
    unless built with its Python formula. Everything else (e.g. NewGELUActivation's own tanh formula,
    which differs from torch's in the last bits) runs as the module itself.
    """
    from transformers.activations import GELUActivation, GELUTanh

    if type(act) is GELUActivation and act.act is nn.functional.gelu:
        return "gelu"
    if type(act) is GELUTanh and getattr(act.act, "keywords", {}).get("approximate") == "tanh":
        return "gelu_tanh"
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}[act.approximate]
    return None


@contextlib.contextmanager
def replaced_forwards(replacements: list[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Each module's `forward` replaced by its function (an instance attribute) inside the block only."""
    try:
        for module, fn in replacements:
            module.forward = fn
        yield
    finally:
        for module, _ in replacements:
            module.__dict__.pop("forward", None)


def linear_macs(model: nn.Module, per_sample: tuple[str, ...], tokens: int, skip: tuple[str, ...]) -> int:
    """MACs per sample of every Linear outside the `skip` prefixes: those under a `per_sample` prefix run
    once per sample (poolers, sequence classifiers on one token), all others once per token."""
    macs = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or _under(name, skip):
            continue
        macs += mod.weight.numel() * (1 if _under(name, per_sample) else tokens)
    return macs


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class HFAdapter(ModelAdapter):
    """Base of the transformers families. Subclasses build the BlockSpecs, `layers` (the layer modules in
    order) and implement `_layer_forward` (one layer from the callbacks) and `_set_head_dim`."""

    source = "transformers"
    supported: ClassVar[tuple[str, ...]] = ()  # class names this family rebuilds and serves

    def __init__(self, model: nn.Module, blocks: list[BlockSpec], layers: list[nn.Module]) -> None:
        super().__init__(model, blocks)
        self.layers = layers

    @classmethod
    def refuse_unsupported(cls, model: nn.Module, reason: str) -> None:
        """UnsupportedModelError naming the class when it is not one of `supported`."""
        if type(model).__name__ not in cls.supported or type(model).__module__.split(".")[0] != "transformers":
            raise UnsupportedModelError(f"{type(model).__module__}.{type(model).__name__} is not supported: {reason}")

    # ----------------------------------------------------------------------------------- elastic
    def run(self, args: tuple, kwargs: dict[str, Any], subnet: Subnet, attn_fn: AttnFn, mlp_fn: MlpFn) -> Any:
        """The model's own forward on `model(*args, **kwargs)` (its own output type), every layer computed
        by `_layer_forward` from attn_fn/mlp_fn; width-0 branches add zero. ValueError for
        output_attentions=True (see the module docstring)."""
        asked = kwargs.get("output_attentions")  # None means the config's default, as in transformers
        if asked or (asked is None and getattr(self.model.config, "output_attentions", False)):
            raise ValueError("output_attentions=True: the elastic forward never forms attention weights (its "
                             "attention kernels compute the output directly), so it cannot return them; pass "
                             "output_attentions=False, or run elastic.extract(), a plain transformers model of "
                             "the same subnetwork with the same outputs, which returns them under transformers' "
                             "eager attention")
        replacements = [(layer, self._layer_forward(i, layer, subnet, attn_fn, mlp_fn))
                        for i, layer in enumerate(self.layers)]
        with replaced_forwards(replacements):
            return self.model.forward(*args, **kwargs)

    def _layer_forward(self, i: int, layer: nn.Module, subnet: Subnet, attn_fn: AttnFn,
                       mlp_fn: MlpFn) -> Callable[..., torch.Tensor]:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- batches
    def token_weights(self, batch: Any) -> torch.Tensor | None:
        """(B, T) attention_mask of a dict batch (padding tokens 0), flattened per sample; None otherwise."""
        if isinstance(batch, dict) and batch.get("attention_mask") is not None:
            mask = batch["attention_mask"]
            return mask.reshape(mask.shape[0], -1).float()
        return None

    def logits(self, output: Any) -> torch.Tensor:
        logits = getattr(output, "logits", None)
        if logits is None:
            raise ValueError(f"{type(self.model).__name__} has no classification head (its output has no "
                             "logits): pass loss_fn=")
        return logits

    @property
    def num_classes(self) -> int | None:
        return getattr(self.model, "num_labels", None)

    def default_loss(self, output: Any, batch: Any, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the model's logits against the batch's labels (`_labelled_loss`)."""
        return self._labelled_loss(output, batch, reduction)

    def _labelled_loss(self, output: Any, batch: Any, reduction: str) -> torch.Tensor:
        """fp32 cross-entropy of logits (B, K) against labels (B,), or of token logits (B, N, K) against
        labels (B, N) with -100 ignored (transformers' convention). ValueError when there are no labels."""
        from .. import batches

        labels = batches.labels(batch)
        if labels is None:
            raise ValueError(f"{type(self.model).__name__}: the batch has no labels, so the default "
                             "cross-entropy loss is undefined; pass loss_fn=")
        logits = self.logits(output).float()
        labels = labels.to(logits.device)
        if logits.dim() == 3:
            logits, labels = logits.flatten(0, 1), labels.flatten()
        return torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)

    # -------------------------------------------------------------------------------- extraction
    def shrink(self, subnet: Subnet) -> None:
        """Cut every layer's q/k/v/o and MLP Linears to `subnet`'s widths, in place.

        The smaller attention module is self-consistent: its head size is r and its `scaling` r^-1/2 (what
        transformers would build for that head size), with sqrt(r/hd) folded into q's weight and bias so
        the scores keep the full head's 1/sqrt(hd). Re-wrapping or re-saving the result thus needs no
        per-layer scale. A width-0 branch becomes width 1 with all-zero weights and output bias.
        """
        with torch.no_grad():
            for spec, r, h in zip(self.blocks, subnet.attn, subnet.mlp, strict=True):
                rows = head_rows(spec.num_heads, spec.head_dim, r)
                q, k, v = (truncated_linear(lin, rows, zero=r == 0) for lin in (spec.q, spec.k, spec.v))
                for p in q.parameters():
                    p.mul_(math.sqrt(r / spec.head_dim))
                for name, lin in zip(self.qkvo_names[:3], (q, k, v), strict=True):
                    _replace(spec.block, name, lin)
                _replace(spec.block, self.qkvo_names[3], truncated_linear(spec.proj, cols=rows, zero=r == 0))
                self._set_head_dim(spec, max(r, 1))
                keep = torch.arange(h)
                _replace(spec.block, self.mlp_names[0], truncated_linear(spec.fc1, keep))
                _replace(spec.block, self.mlp_names[1], truncated_linear(spec.fc2, cols=keep, zero=h == 0))

    qkvo_names: ClassVar[tuple[str, str, str, str]]  # q, k, v, o Linears' names relative to the layer
    mlp_names: ClassVar[tuple[str, str]]  # fc1, fc2 names relative to the layer

    def _set_head_dim(self, spec: BlockSpec, r: int) -> None:
        """Make layer `spec`'s attention module view its q/k/v as heads of r dims with scaling r^-1/2."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- save / load
    def record(self) -> dict[str, Any]:
        """{"source", "class": the transformers class name, "config": config.to_dict(),
        "attn_implementation", "init_kwargs"}: the full-size architecture (extracted widths are
        recorded by skd.save as the subnet)."""
        config = self.model.config
        return {"source": self.source, "class": type(self.model).__name__, "config": config.to_diff_dict(),
                "attn_implementation": config._attn_implementation,
                "init_kwargs": self.init_kwargs()}

    def init_kwargs(self) -> dict[str, Any]:
        """Constructor arguments beyond the config (JSON-able), e.g. add_pooling_layer."""
        return {}

    @classmethod
    def rebuild(cls, record: dict[str, Any]) -> nn.Module:
        """The model class named in `record`, built from its config (random weights, eval mode)."""
        import transformers

        name = record.get("class")
        if name not in _ALL_SUPPORTED:
            raise ValueError(f"transformers class {name!r} is not one skd rebuilds ({sorted(_ALL_SUPPORTED)})")
        model_cls = getattr(transformers, name)
        try:
            config = model_cls.config_class.from_dict(record["config"])
            config._attn_implementation = record.get("attn_implementation") or "eager"
            model = model_cls(config, **record.get("init_kwargs", {}))
        except Exception as e:
            raise ValueError(f"cannot rebuild transformers {name} from the saved config: {e}") from e
        return model.eval()


_ALL_SUPPORTED: set[str] = set()


def supports(*names: str) -> Callable[[type[HFAdapter]], type[HFAdapter]]:
    """Class decorator: the transformers class names the adapter serves and `rebuild` may construct."""

    def deco(cls: type[HFAdapter]) -> type[HFAdapter]:
        cls.supported = names
        _ALL_SUPPORTED.update(names)
        return cls

    return deco


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    """root.<name> = new, for a dotted name; the new module follows the old one's train/eval mode."""
    parent, _, leaf = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    new.train(getattr(owner, leaf).training)
    setattr(owner, leaf, new)
