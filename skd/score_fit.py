"""Score fit: a truncated head's dropped score part, predicted from its kept dims (`skd.wpac(..., score_fit=True)`).

Keeping the first r of a head's hd q/k dims drops s_d = q_d · k_d from every attention score
q·k = q_k·k_k + q_d·k_d. The kept dims still predict part of it: over the calibration tokens,
    s_d,ij ~ [1; q_k,i]^T X k_k,j,   X = [x_0^T; X_q]  ((r + 1) × r),
by least squares weighted by the full model's attention A_ij (keys centred per sequence: a per-query
constant does not change the softmax). The kept q rows absorb it exactly,
    q_k <- (I + X_q^T) q_k + x_0,
so a subnet of width r computes q_k'·k_k = q_k·k_k + [1; q_k]^T X k_k with the full head's score scale.
At full width nothing is dropped and nothing changes. The fit depends on r, so one is stored per width
r = 1 … R (R = `fit_ranks(hd)`); wider subnets run without one.

Storage: a non-persistent buffer `skd_score_fit` of the Linear that produces q (timm: the fused qkv; HF: q),
(H, R, R + 1, R), the weight's dtype, in head/rank terms (ElasticViT's layout does not permute it):
fit[h, r - 1, :r + 1, :r] is head h's X for width r, row 0 its constant x_0 (zero when the Linear has no
bias); every other entry is zero. skd.save / skd.load store it as tensor `skd_score_fit:<module name>`
(`fits`, `pop_fits`, `restore_fits`); files without them load as before.

Use: ElasticViT's plan (skd/elastic/plan.py) runs the q GEMM of a block whose width has a fit with the
corrected q rows; `ElasticViT.extract` folds the fit of its width into the smaller model's q rows and bias
(`fold`), which then runs without skd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .models import BlockSpec
from .subnet import Subnet

BUFFER = "skd_score_fit"
FILE_PREFIX = "skd_score_fit:"
MAX_RANK = 16  # widths fitted: r <= min(hd // 2, MAX_RANK); the statistic grows as r^4 per head


def fit_ranks(head_dim: int) -> int:
    """R: the widest rank with a fit, min(head_dim // 2, MAX_RANK) (0 for head_dim 1)."""
    return min(head_dim // 2, MAX_RANK)


def score_fit(linear: nn.Module) -> torch.Tensor | None:
    """The Linear's stored fit (H, R, R + 1, R), or None when it has none."""
    # not getattr: a miss raises and catches inside Module.__getattr__ (~1 us; Plan.current asks every block
    # on every forward)
    return linear._buffers.get(BUFFER)


def q_linear(spec: BlockSpec) -> nn.Linear:
    """The Linear of `spec` that produces q, where its fit is stored: the fused qkv, or the separate q."""
    return spec.qkv if spec.fused else spec.q


def set_score_fit(linear: nn.Linear, fit: torch.Tensor | None, num_heads: int, head_dim: int) -> None:
    """Store (fit: (H, R, R + 1, R), 1 <= R < head_dim, any float dtype, cast to the weight's dtype/device)
    or remove (None) the fit of the Linear producing q. ValueError for a wrong shape, entries outside each
    width's (r + 1) × r block, a constant row without a bias to absorb it, or non-finite values."""
    if fit is None:
        if BUFFER in linear._buffers:
            del linear._buffers[BUFFER]
        return
    linear.register_buffer(BUFFER, _checked(linear, fit, num_heads, head_dim), persistent=False)


def _checked(linear: nn.Linear, fit: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """`fit` validated as `set_score_fit` states, as the buffer to store (a detached copy in the weight's
    dtype and device)."""
    h, big_r = num_heads, fit.shape[1] if fit.dim() == 4 else 0
    if fit.dim() != 4 or fit.shape != (h, big_r, big_r + 1, big_r) or not 1 <= big_r < head_dim:
        raise ValueError(f"score fit must have shape (H, R, R + 1, R) with H = {h} and 1 <= R < {head_dim} "
                         f"(the head dim), got {tuple(fit.shape)}")
    if not bool(torch.isfinite(fit).all()):
        raise ValueError("score fit contains NaN or Inf")
    if bool((fit * ~block_mask(big_r, fit.device)).any()):
        raise ValueError("score fit has entries outside each width's (r + 1) x r block")
    if linear.bias is None and bool(fit[:, :, 0].any()):
        raise ValueError("score fit has a constant row but the Linear has no bias to absorb it")
    w = linear.weight
    return fit.detach().to(device=w.device, dtype=w.dtype).clone()


def block_mask(big_r: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(R, R + 1, R) bool: True where width r = index + 1 has an entry (rows :r + 1, columns :r)."""
    r = torch.arange(1, big_r + 1, device=device)[:, None, None]
    rows = torch.arange(big_r + 1, device=device)[None, :, None]
    cols = torch.arange(big_r, device=device)[None, None, :]
    return (rows <= r) & (cols < r)


def fitted(fit: torch.Tensor | None, r: int) -> bool:
    """Whether `fit` (a stored fit, or None) has a fit for width r: 1 <= r <= R."""
    return fit is not None and 1 <= r <= fit.shape[1]


def q_map(fit: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(M (H, r, r), c (H, r)), fit's dtype/device, with q_k' = M q_k + c at width r (M = I + X_q^T, c = x_0);
    None when width r has no fit (r = 0 or r > R)."""
    if not fitted(fit, r):
        return None
    x = fit.select(1, r - 1)[:, :r + 1, :r]  # (H, r + 1, r); select, not [:, r - 1]: under torch.compile
    # indexing with a symbolic width would specialise it (one graph per width), select keeps it symbolic
    eye = torch.eye(r, dtype=fit.dtype, device=fit.device)
    return eye + x[:, 1:].mT, x[:, 0]


def corrected_q(weight: torch.Tensor, bias: torch.Tensor | None, fit: torch.Tensor, r: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kept q rows at width r with the fit absorbed, differentiable in weight and bias (fit constant).

    weight (H, r, D), bias (H, r) or None: head h's q rows of ranks < r (any strides). Returns new tensors
    of the same shapes (bias None stays None: `set_score_fit` then holds a zero constant), or the inputs
    themselves when width r has no fit."""
    maps = q_map(fit.detach(), r)
    if maps is None:
        return weight, bias
    m, c = maps
    weight = torch.einsum("hij,hjd->hid", m, weight)
    if bias is not None:
        bias = torch.einsum("hij,hj->hi", m, bias) + c
    return weight, bias


def fold(blocks: Sequence[BlockSpec], subnet: Subnet) -> None:
    """Fold the fit of each block's width into its q rows and bias and drop the stored fits, in place
    (`blocks` in the model's own head-major layout, q row head * hd + rank; for `ElasticViT.extract`).
    A width without a fit (0, > R, full) leaves the weights as they are."""
    with torch.no_grad():
        for spec, r in zip(blocks, subnet.attn, strict=True):
            linear = q_linear(spec)
            fit = score_fit(linear)
            if fit is None:
                continue
            h, hd = spec.num_heads, spec.head_dim
            weight, bias = spec.qkv_weights()[0]  # q's (C, D) rows and (C,) bias: views
            kept_w = weight.view(h, hd, -1)[:, :r]
            kept_b = None if bias is None else bias.view(h, hd)[:, :r]
            new_w, new_b = corrected_q(kept_w, kept_b, fit, r)
            kept_w.copy_(new_w)
            if kept_b is not None:
                kept_b.copy_(new_b)
            set_score_fit(linear, None, h, hd)


def fits(model: nn.Module) -> dict[str, torch.Tensor]:
    """{FILE_PREFIX + module name: stored fit} of every module of `model` that stores one (for skd.save)."""
    return {FILE_PREFIX + name: fit for name, mod in model.named_modules() if (fit := score_fit(mod)) is not None}


def pop_fits(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove and return the stored fits of a loaded file's tensors, keyed as `fits` names them."""
    return {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(FILE_PREFIX)]}


def restore_fits(model: nn.Module, blocks: Sequence[BlockSpec], stored: dict[str, torch.Tensor]) -> None:
    """Set the fits `pop_fits` returned on `model`, whose blocks (its adapter's) are `blocks`. All are
    checked before any is set: ValueError naming a module that is missing, not the q-producing Linear of a
    block, or whose fit `set_score_fit` refuses (shape, entries, constant row, values)."""
    modules = dict(model.named_modules())
    specs = {q_linear(spec): spec for spec in blocks}
    checked = []
    for key, value in stored.items():
        name = key[len(FILE_PREFIX):]
        linear = modules.get(name)
        spec = specs.get(linear) if isinstance(linear, nn.Linear) else None
        if spec is None:
            raise ValueError(f"stored score fit for {name!r}: the model has no q-producing Linear of that name")
        try:
            checked.append((linear, _checked(linear, value, spec.num_heads, spec.head_dim)))
        except ValueError as e:
            raise ValueError(f"stored score fit for {name!r}: {e}") from e
    for linear, value in checked:
        linear.register_buffer(BUFFER, value, persistent=False)
