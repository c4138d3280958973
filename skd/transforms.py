"""The pure math of criterion "wpac+": per-head invertible transforms from second-moment statistics.

Both transforms are function-preserving for ANY invertible matrix, not only orthogonal ones:
  Q/K (score-preserving): q <- A q, k <- B k with B = A^-T keeps every score q^T k.
  V/O (output-preserving): v <- T v (rows and bias of W_v), W_o <- W_o T^-1 keeps W_o·context.
"wpac+" chooses A and T so that keeping only the leading r dims (for every r at once: the choices are
nested) loses the least of what the head computes, instead of the most variance of q, k or v:
  Q/K: the rank-r part of the scores. With S_q = C_q^{1/2}, S_k = C_k^{1/2} and the SVD
       S_q S_k = U Σ V^T, truncating A = U^T S_q^-1 and B = U^T S_q to r dims keeps the scores'
       best rank-r approximation in the calibration metric E_{i,j}(q_i^T k_j)^2 (Eckart–Young).
  V/O: the rank-r part of the head's output W_o c. With S = C_c^{1/2} (C_c the second moment of the
       context c that W_o reads) and the SVD W_o S = U Σ V^T, T = V^T S^-1 keeps the best rank-r
       approximation of W_o c in E||·||^2.
Each leading dim is then rescaled (any diagonal is still function-preserving) so that the two sides carry
equal energy: no dim has huge weights on one side and tiny ones on the other (fp16/bf16 stay safe).
Everything is float64 on CPU; statistics come from `skd.stats` (streamed weighted_covariance states).
"""

from __future__ import annotations

import torch

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
    evals, evecs = torch.linalg.eigh(damped)
    evals = evals.clamp_min(torch.where(zero, 1.0, delta)[:, None])
    root = evecs @ torch.diag_embed(evals.sqrt()) @ evecs.mT
    inv_root = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.mT
    return root, inv_root


def psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    """(G, r, r) symmetric PSD -> (G, r, r) float64 symmetric square root (negative eigenvalues clamped)."""
    _check_moments("c", c)
    evals, evecs = torch.linalg.eigh(0.5 * (c + c.mT).double().cpu())
    return evecs @ torch.diag_embed(evals.clamp_min(0).sqrt()) @ evecs.mT


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


def score_preserving(cq: torch.Tensor, ck: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head Q/K transforms whose leading dims best preserve the attention scores q^T k.

    cq: (G, r, r) second moment E[q q^T] of each head's queries; ck: (G, r, r) second moment of its keys
    (centred keys are the right statistic: a key component common to a whole sequence shifts every
    score of a query equally, which softmax ignores). Any float dtype; used in float64.
    Returns A (G, r, r), B (G, r, r) with B = A^-T (q' = A q, k' = B k), and the spectrum (G, r): the
    singular values of C_q^{1/2} C_k^{1/2}, descending (the score energy each new dim carries).
    """
    _check_moments("cq", cq)
    _check_moments("ck", ck)
    if cq.shape != ck.shape:
        raise ValueError(f"cq {tuple(cq.shape)} and ck {tuple(ck.shape)} must have the same shape")
    cq, ck = cq.double().cpu(), ck.double().cpu()
    sq, sq_inv = _sqrt_and_inverse(cq)
    sk, _ = _sqrt_and_inverse(ck)
    u, sigma, _ = torch.linalg.svd(sq @ sk)
    ut = _sign_fix(u.mT)
    a, b = ut @ sq_inv, ut @ sq  # b = a^-T since sq is symmetric
    d = _balance(torch.einsum("gij,gjk,gik->gi", a, cq, a), torch.einsum("gij,gjk,gik->gi", b, ck, b))
    return a * d[..., None], b / d[..., None], sigma


def output_preserving(cc: torch.Tensor, w_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head V/O transforms whose leading dims best preserve the head's output W_o c.

    cc: (G, r, r) second moment E[c c^T] of each head's context c (the attention-weighted values that the
    output projection reads); w_out: (G, D, r), D >= r: the map whose output is preserved, e.g. each head's
    columns of the output projection, or any factor L of an output metric L^T L (such as the square root
    of the loss gradient's second moment w.r.t. c, `psd_sqrt`).
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
    _, sigma, vt = torch.linalg.svd(w_out @ s, full_matrices=False)
    vt = _sign_fix(vt)
    t, t_inv = vt @ s_inv, s @ vt.mT  # t_inv = t^-1: vt is orthogonal (square: r <= D)
    d = _balance(torch.einsum("gij,gjk,gik->gi", t, cc, t), (w_out @ t_inv).square().sum(1))
    return t * d[..., None], t_inv / d[..., None, :], sigma
