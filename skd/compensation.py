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

Cross-head compensation (`skd.wpac(..., cross_head=True)`, the output projection only) also stores the
input's centred covariance C (in_features, in_features) as buffer `skd_input_cov` (file name
`skd_input_cov:<module name>`). Keeping the first k inputs, the dropped ones (d = k:) are predicted from the
kept ones by least squares over the calibration tokens, x_d ~ m_d + B (x_k - m_k) with
    B = C_dk (C_kk + delta I)^-1,  delta = 1e-3 tr(C_kk) / k   (a light ridge: C_kk can be near-singular),
so the Linear reads W[:, :k] + W[:, k:] B and b + W[:, k:] (m_d - B m_k) (`compensated_linear`). Mean
compensation is the case B = 0. The correction mixes the kept dims of all heads, since real heads' contexts
are correlated; the covariance is the one statistic it adds. It needs the mean stored first, and removing the
mean removes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .models import BlockSpec
from .subnet import Subnet

BUFFER = "skd_input_mean"
FILE_PREFIX = "skd_input_mean:"  # tensor name prefix in skd files: FILE_PREFIX + the Linear's module name
COV_BUFFER = "skd_input_cov"
COV_FILE_PREFIX = "skd_input_cov:"
RIDGE = 1e-3  # delta = RIDGE * tr(C_kk) / k


def input_mean(linear: nn.Module) -> torch.Tensor | None:
    """The Linear's stored input mean (in_features,), or None when it has none."""
    return linear._buffers.get(BUFFER)  # not getattr: a miss costs ~1 us in Module.__getattr__ (Plan.current)


def set_input_mean(linear: nn.Linear, mean: torch.Tensor | None) -> None:
    """Store (mean: (in_features,) any float dtype, cast to the weight's dtype/device) or remove (None) the
    Linear's input mean. ValueError for a Linear without bias (nothing to fold the correction into), a
    wrong shape or non-finite values."""
    if mean is None:
        for name in (BUFFER, COV_BUFFER):  # the covariance is meaningless without its mean
            if name in linear._buffers:
                del linear._buffers[name]
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


def input_cov(linear: nn.Module) -> torch.Tensor | None:
    """The Linear's stored input covariance (in_features, in_features), or None when it has none."""
    return linear._buffers.get(COV_BUFFER)


def set_input_cov(linear: nn.Linear, cov: torch.Tensor | None) -> None:
    """Store (cov: (in_features, in_features) any float dtype, symmetrised and cast to the weight's
    dtype/device) or remove (None) the Linear's input covariance (cross-head compensation). ValueError when
    the Linear stores no input mean (set it first), for a wrong shape or non-finite values."""
    if cov is None:
        if COV_BUFFER in linear._buffers:
            del linear._buffers[COV_BUFFER]
        return
    if input_mean(linear) is None:
        raise ValueError("cross-head compensation needs the Linear's input mean stored first (set_input_mean)")
    n = linear.in_features
    if cov.shape != (n, n):
        raise ValueError(f"input covariance must have shape ({n}, {n}) (the Linear's in_features), "
                         f"got {tuple(cov.shape)}")
    if not bool(torch.isfinite(cov).all()):
        raise ValueError("input covariance contains NaN or Inf")
    w = linear.weight
    cov = 0.5 * (cov.detach() + cov.detach().mT)
    linear.register_buffer(COV_BUFFER, cov.to(device=w.device, dtype=w.dtype).clone(), persistent=False)


def cross_head_map(linear: nn.Linear, k_in: int) -> torch.Tensor:
    """B = C_dk (C_kk + delta I)^-1 ((in_features - k_in, k_in), the weight's dtype, no grad) of the stored
    covariance (module docstring): the least-squares prediction of the dropped inputs from the kept ones.
    Solved in float64. Needs a stored covariance and 0 < k_in < in_features."""
    cov = input_cov(linear).detach().double()
    kk, dk = cov[:k_in, :k_in], cov[k_in:, :k_in]
    delta = RIDGE * kk.diagonal().sum().clamp_min(torch.finfo(torch.float64).tiny) / k_in
    ridge = kk + delta * torch.eye(k_in, dtype=kk.dtype, device=kk.device)
    return torch.linalg.solve(ridge, dk.mT).mT.to(linear.weight.dtype)  # C_kk symmetric: (C_kk^-1 C_kd)^T


def compensated_linear(linear: nn.Linear, k_in: int, b_map: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (out_features, k_in), bias (out_features,)) of `linear` reading only its first k_in inputs
    under cross-head compensation: W[:, :k] + W[:, k:] B and b + W[:, k:] (m_d - B m_k), differentiable in
    W and b (B constant). b_map: B if already computed (`cross_head_map`). Needs a stored covariance and
    0 < k_in < in_features; out of place, whatever W's strides."""
    b_map = cross_head_map(linear, k_in) if b_map is None else b_map
    mean = input_mean(linear)
    dropped = linear.weight[:, k_in:]
    weight = linear.weight[:, :k_in] + dropped @ b_map
    bias = linear.bias + dropped @ (mean[k_in:] - b_map @ mean[:k_in])
    return weight, bias


def compensated_bias(linear: nn.Linear, k_in: int) -> torch.Tensor | None:
    """The bias of `linear` when only its first k_in input features are kept: b + W[:, k_in:] E[x[k_in:]]
    ((out_features,), differentiable in W and b), or plain b (possibly None) when it stores no input mean
    or nothing is dropped."""
    mean = input_mean(linear)
    if mean is None or k_in >= linear.in_features:
        return linear.bias
    return linear.bias + linear.weight[:, k_in:] @ mean[k_in:]


def fold(blocks: Sequence[BlockSpec], subnet: Subnet) -> None:
    """Fold the compensation of `subnet` into every block's output-projection and fc2 bias (cross-head: and
    the kept columns of the weight) and drop the stored means and covariances, in place (`blocks` in the
    rank-major layout, where every width is a prefix). A width-0 branch is skipped by the model as a whole,
    so it gets none."""
    with torch.no_grad():
        for spec, r, h in zip(blocks, subnet.attn, subnet.mlp, strict=True):
            for linear, k_in in ((spec.proj, spec.num_heads * r), (spec.fc2, h)):
                if input_mean(linear) is None:
                    continue
                if 0 < k_in < linear.in_features and input_cov(linear) is not None:
                    weight, bias = compensated_linear(linear, k_in)
                    linear.weight[:, :k_in].copy_(weight)
                    linear.bias.copy_(bias)
                elif k_in > 0:
                    linear.bias.copy_(compensated_bias(linear, k_in))
                set_input_mean(linear, None)


def means(model: nn.Module) -> dict[str, torch.Tensor]:
    """{FILE_PREFIX + module name: stored input mean, COV_FILE_PREFIX + module name: stored input covariance}
    of every Linear in `model` (for skd.save)."""
    out = {}
    for name, mod in model.named_modules():
        for prefix, value in ((FILE_PREFIX, input_mean(mod)), (COV_FILE_PREFIX, input_cov(mod))):
            if value is not None:
                out[prefix + name] = value
    return out


def pop_means(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove and return the stored means and covariances of a loaded file's tensors, keyed as `means`
    names them."""
    return {k: tensors.pop(k) for k in [k for k in tensors if k.startswith((FILE_PREFIX, COV_FILE_PREFIX))]}


def restore_means(model: nn.Module, stored: dict[str, torch.Tensor]) -> None:
    """Set the input means and covariances `pop_means` returned on `model`'s Linears (means first);
    ValueError naming a module that is missing or not a Linear, or a covariance without its mean."""
    modules = dict(model.named_modules())
    for prefix, what, setter in ((FILE_PREFIX, "mean", set_input_mean), (COV_FILE_PREFIX, "covariance",
                                                                          set_input_cov)):
        for key, value in stored.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            linear = modules.get(name)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"stored input {what} for {name!r}: the model has no Linear of that name")
            setter(linear, value)
