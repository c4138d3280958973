"""The pure math of criterion "wpac+": per-head invertible V/O transforms from second-moment statistics.

V/O is function-preserving for ANY invertible T, not only an orthogonal one: v <- T v (rows and bias of
W_v) and W_o <- W_o T^-1 keep W_o·context. "wpac+" chooses T so that keeping only the leading r dims (for
every r at once: the choice is nested) loses the least of what the head outputs, instead of the most
variance of v: with S = C_c^{1/2} (C_c the second moment of the context c that W_o reads) and the SVD
W_o S = U Σ V^T, T = V^T S^-1 keeps the best rank-r approximation of W_o c in E||·||^2 (Eckart–Young).
Each leading dim is then rescaled (any diagonal is still function-preserving) so that both sides carry
equal energy: no dim has huge weights on one side and tiny ones on the other (fp16/bf16 stay safe).
Everything is float64 on CPU; statistics come from `skd.stats` (streamed weighted_covariance states).
(The Q/K analogue, the SVD of C_q^{1/2} C_k^{1/2} preserving the scores q·k, measured no better than
WPAC's rotation on MiniLM and worse on the digits ViT, so it is not part of the product.)
"""

from __future__ import annotations

import torch

from ._threads import one_thread

RELATIVE_DAMPING = 1e-6  # C + δI, δ = RELATIVE_DAMPING·tr(C)/r: C^{-1/2} exists and stays well conditioned


def _check_moments(name: str, c: torch.Tensor) -> None:
    if c.dim() != 3 or c.shape[1] != c.shape[2]:
        raise ValueError(f"{name} must be (G, r, r) second moments, got shape {tuple(c.shape)}")
    if not bool(torch.isfinite(c).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _sqrt_and_inverse(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c: (G, r, r) symmetric PSD float64 -> ((C+δI)^{1/2}, (C+δI)^{-1/2}), each (G, r, r) float64.

    An all-zero group (a head that never fired) gets I, I.
    """
    r = c.shape[-1]
    eye = torch.eye(r, dtype=torch.float64)
    delta = RELATIVE_DAMPING * c.diagonal(dim1=-2, dim2=-1).sum(-1) / r  # (G,)
    zero = delta <= 0
    damped = 0.5 * (c + c.mT) + torch.where(zero, 1.0, delta)[:, None, None] * eye
    with one_thread():
        evals, evecs = torch.linalg.eigh(damped)
    evals = evals.clamp_min(torch.where(zero, 1.0, delta)[:, None])
    root = evecs @ torch.diag_embed(evals.sqrt()) @ evecs.mT
    inv_root = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.mT
    return root, inv_root


def _sign_fix(rows: torch.Tensor) -> torch.Tensor:
    """(G, r, r) rows of singular vectors, each signed so its largest-magnitude entry is positive
    (deterministic across runs whose sums differ only by rounding)."""
    idx = rows.abs().argmax(dim=-1, keepdim=True)
    return rows * torch.gather(rows, -1, idx).sign()


def _balance(left_energy: torch.Tensor, right_energy: torch.Tensor) -> torch.Tensor:
    """(G, r) per-dim scale d = (right/left)^{1/4}, so that d^2·left = right/d^2; 1 where either is 0."""
    ok = (left_energy > 0) & (right_energy > 0)
    ratio = torch.where(ok, right_energy / torch.where(ok, left_energy, 1.0), 1.0)
    return ratio ** 0.25


def output_preserving(cc: torch.Tensor, w_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head V/O transforms whose leading dims best preserve the head's output W_o c.

    cc: (G, r, r) second moment E[c c^T] of each head's context c (the attention-weighted values that the
    output projection reads); w_out: (G, D, r), D >= r: the map whose output is preserved, each head's
    columns of the output projection (or any factor L of an output metric L^T L).
    Returns T (G, r, r), T_inv (G, r, r) = T^-1 (W_v <- T W_v, b_v <- T b_v, W_o <- W_o T_inv), and the
    spectrum (G, r): the singular values of W_o C_c^{1/2}, descending (output energy per new dim).
    """
    _check_moments("cc", cc)
    if (w_out.dim() != 3 or w_out.shape[0] != cc.shape[0] or w_out.shape[2] != cc.shape[1]
            or w_out.shape[1] < w_out.shape[2]):
        raise ValueError(f"w_out must be (G, D, r) = ({cc.shape[0]}, D >= r, {cc.shape[1]}), got {tuple(w_out.shape)}")
    if not bool(torch.isfinite(w_out).all()):
        raise ValueError("w_out contains NaN or Inf")
    cc, w_out = cc.double().cpu(), w_out.double().cpu()
    s, s_inv = _sqrt_and_inverse(cc)
    with one_thread():
        _, sigma, vt = torch.linalg.svd(w_out @ s, full_matrices=False)
    vt = _sign_fix(vt)
    t, t_inv = vt @ s_inv, s @ vt.mT  # t_inv = t^-1: vt is orthogonal (square: r <= D)
    d = _balance(torch.einsum("gij,gjk,gik->gi", t, cc, t), (w_out @ t_inv).square().sum(1))
    return t * d[..., None], t_inv / d[..., None, :], sigma
