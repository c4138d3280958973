"""Bias compensation for truncated subnetworks (FLAP-style): the dropped dims' mean contribution comes back
through the output bias.

A Linear whose input is truncated to its first k features (an attention output projection reading the
kept rank dims of every head, an MLP's fc2 reading the kept hidden units) loses W[:, k:] x[k:]. Its
expectation, W[:, k:] E[x[k:]], is a constant: adding it to the bias keeps the mean of the branch's output
exactly and leaves only the dropped features' centred part lost. (For attention the context's mean is the
values' mean over the attended tokens, since each query's attention weights sum to 1.)

The mean E[x] (in_features,) is a non-persistent buffer `skd_input_mean` of the Linear, set by
`skd.wpac(..., compensate=True | "attn" | "mlp")` from its calibration statistics (over all real tokens), in
the Linear's current input layout
(ElasticViT's rank-major layout permutes it along with the weights' columns). A model without the buffer
computes exactly what it did before. At full width the correction is zero, so the function is unchanged;
it depends only on the kept width (one mat-vec per block and width), and `ElasticViT.extract` folds it into
the smaller model's bias (`fold`), which then runs without skd. skd.save / skd.load store the buffers as
tensors named `skd_input_mean:<module name>`; files without them load as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .models import BlockSpec
from .subnet import Subnet

BUFFER = "skd_input_mean"
FILE_PREFIX = "skd_input_mean:"  # tensor name prefix in skd files: FILE_PREFIX + the Linear's module name


def input_mean(linear: nn.Module) -> torch.Tensor | None:
    """The Linear's stored input mean (in_features,), or None when it has none."""
    return getattr(linear, BUFFER, None)


def set_input_mean(linear: nn.Linear, mean: torch.Tensor | None) -> None:
    """Store (mean: (in_features,) any float dtype, cast to the weight's dtype/device) or remove (None) the
    Linear's input mean. ValueError for a Linear without bias (nothing to fold the correction into), a
    wrong shape or non-finite values."""
    if mean is None:
        if BUFFER in linear._buffers:
            del linear._buffers[BUFFER]
        return
    if linear.bias is None:
        raise ValueError("bias compensation needs a Linear with a bias (the correction is folded into it)")
    if mean.shape != (linear.in_features,):
        raise ValueError(f"input mean must have shape ({linear.in_features},) (the Linear's in_features), "
                         f"got {tuple(mean.shape)}")
    if not bool(torch.isfinite(mean).all()):
        raise ValueError("input mean contains NaN or Inf")
    w = linear.weight
    linear.register_buffer(BUFFER, mean.detach().to(device=w.device, dtype=w.dtype).clone(), persistent=False)


def compensated_bias(linear: nn.Linear, k_in: int) -> torch.Tensor | None:
    """The bias of `linear` when only its first k_in input features are kept: b + W[:, k_in:] E[x[k_in:]]
    ((out_features,), differentiable in W and b), or plain b (possibly None) when it stores no input mean
    or nothing is dropped."""
    mean = input_mean(linear)
    if mean is None or k_in >= linear.in_features:
        return linear.bias
    return linear.bias + linear.weight[:, k_in:] @ mean[k_in:]


def fold(blocks: Sequence[BlockSpec], subnet: Subnet) -> None:
    """Fold the compensation of `subnet` into every block's output-projection and fc2 bias and drop the
    stored means, in place (`blocks` in the rank-major layout, where every width is a prefix). A width-0
    branch is skipped by the model as a whole, so it gets none."""
    with torch.no_grad():
        for spec, r, h in zip(blocks, subnet.attn, subnet.mlp, strict=True):
            for linear, k_in in ((spec.proj, spec.num_heads * r), (spec.fc2, h)):
                if input_mean(linear) is None:
                    continue
                if k_in > 0:
                    linear.bias.copy_(compensated_bias(linear, k_in))
                set_input_mean(linear, None)


def means(model: nn.Module) -> dict[str, torch.Tensor]:
    """{FILE_PREFIX + module name: stored input mean} of every Linear in `model` (for skd.save)."""
    return {FILE_PREFIX + name: m for name, mod in model.named_modules() if (m := input_mean(mod)) is not None}


def pop_means(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove and return the stored means of a loaded file's tensors: {module name: mean}."""
    return {k[len(FILE_PREFIX):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(FILE_PREFIX)]}


def restore_means(model: nn.Module, stored: dict[str, torch.Tensor]) -> None:
    """Set the input means `pop_means` returned on `model`'s Linears; ValueError naming a module that is
    missing or not a Linear."""
    modules = dict(model.named_modules())
    for name, mean in stored.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"stored input mean for {name!r}: the model has no Linear of that name")
        set_input_mean(linear, mean)
