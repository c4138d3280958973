"""The explicit-attention forward, its no-grad calibration pass and two accumulators (skd.wpac(joint_qk=,
score_fit=)).

`explicit_forward` runs the model's own forward (`ModelAdapter.run`) on a calibration batch with every
block's attention computed explicitly from its modules in the standard layout: per head q, k, v
(S, H, N, hd), A = softmax(q kᵀ·scale + bias) (S, H, N, N) (the model's own mask and position bias
included), ctx = A v, output proj(ctx). So it computes the model's own output, and the
accumulators see each block's q, k, v and attention weights A together, which hooks cannot give.
`attention_pass` streams data through it without gradients (the score fit, on the transformed model, unless
skd.attention_inputs replays it from inputs the calibration pass recorded); skd.stats.calibrate(accumulators=)
runs its gradient pass through it (the joint statistic, on the original model, in the same pass as the Taylor
scores and covariances).

Accumulators (per block, per head; padding queries and keys weigh 0; one batch in fp32 GEMMs, the totals
in float64, like skd.stats):
  JointQK: the centred covariances C_q, C_k of the queries and keys, query i weighted by a_i = Σ_j w_ij and
    key j by b_j = Σ_i w_ij, w_ij = A_ij² ‖W_o,h (v_j − ctx_i)‖² (how much the head's output moves when
    score ij does: the softmax's sensitivity). Their sum's eigenvectors are wpac+'s joint Q/K rotation.
  ScoreFit: for skd.score_fit, the moments of the weighted least-squares fit of each width's dropped score
    part (q̃ = [1; q], k̃ = keys centred per sequence over its real tokens, w_ij = A_ij, R = fit_ranks(hd)):
    M[a, c, b, d] = Σ_i q̃_ia q̃_ic Σ_j w_ij k̃_jb k̃_jd   (a, c <= R; b, d < R)   and
    P[a, b, m]    = Σ_i q̃_ia q_im Σ_j w_ij k̃_jb k̃_jm    (a <= R; b < R; m < hd),
    from which `ScoreFit.solve` gives every width r <= R its fit (normal equations M[:r+1, :r+1, :r, :r],
    right side Σ_{m >= r} P[:r+1, :r, m]). Accumulated without redundancy: M only for a <= c and b <= d
    (it is symmetric in both pairs: about a quarter of the multiply-adds), and of P only the tail
    P_tail[a, b] = Σ_{m >= R} P[a, b, m] (through the score part t_ij = Σ_{m >= R} q_im k̃_jm), because
    P[a, b, m] = M[a, m + 1, b, m] for m < R.
Blocks with qk_norm get neither (their Q/K is permuted, not rotated, and a norm over each head's dims
changes when dims are dropped); the pass still computes their attention, norms included.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from . import batches
from ._threads import one_thread
from .models import BlockSpec, ModelAdapter
from .passes import stream_pass
from .score_fit import fit_ranks
from .subnet import Subnet

if TYPE_CHECKING:  # attention_inputs replays through this module's `heads`
    from .attention_inputs import AttentionInputs

RIDGE = 1e-3  # score fit: δ = RIDGE · tr(G)/n added to the normal equations G (n unknowns)
# ScoreFit.add works through a batch this many (padded) tokens at a time, so that its temporaries stay in cache
# (1 thread, captured batches: digits ViT's (128, 3, 65, 65) 1.5x faster than whole, MiniLM's (32, 12, 56, 56) 1.07x)
CHUNK_TOKENS = 1024


class Accumulator(Protocol):
    """What `explicit_forward` feeds: `update` once per block and batch, `tensors` for the all-reduce."""

    def update(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
               w: torch.Tensor | None) -> None:
        """Block i: q, k, v (S, H, N, hd) and attention A (S, H, N, N), fp32 at least; w (S, N) token
        weights (padding 0) or None (all 1)."""

    def tensors(self) -> list[torch.Tensor]:
        """Every accumulated float64 tensor, in a fixed order."""


def _packed_products(x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """x_a y_c for a <= c, in torch.triu_indices' order, along `dim` of x and y (same shape, R entries along
    it): R(R+1)/2 entries there, each product of two whole slices written in place."""
    size = x.shape[dim]
    out = x.new_empty(*x.shape[:dim], size * (size + 1) // 2, *x.shape[dim + 1:])
    start = 0
    for a in range(size):
        torch.mul(x.narrow(dim, a, 1), y.narrow(dim, a, size - a), out=out.narrow(dim, start, size - a))
        start += size - a
    return out


def _packed_positions(size: int) -> torch.Tensor:
    """(size, size) int64: the position of pair (a, c) (either order) in torch.triu_indices(size, size)'s order."""
    rows, cols = torch.triu_indices(size, size)
    out = torch.empty(size, size, dtype=torch.int64)
    out[rows, cols] = out[cols, rows] = torch.arange(len(rows))
    return out


def _by_shell(big_r: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) (n,) int64 of the score fit's unknowns X[a, b] (first <= a <= R, b < R), ordered by shell
    max(a, b + 1) (then a, b): width r's unknowns, a <= r and b < r, are the first (r + 1 - first)·r."""
    pairs = sorted(((a, b) for a in range(first, big_r + 1) for b in range(big_r)),
                   key=lambda p: (max(p[0], p[1] + 1), p))
    return torch.tensor(pairs, dtype=torch.int64).unbind(1)


def _dot(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_c x[..., c] y[..., c]: (...,) of x, y (..., C), as a batched GEMM of one-row matrices (faster here
    than a product and a sum); into `out` (..., possibly a strided view, e.g. a column of a buffer) if given."""
    c = x.shape[-1]
    res = torch.bmm(x.reshape(-1, 1, c), y.reshape(-1, c, 1), out=None if out is None else out.view(-1, 1, 1))
    return res.view(x.shape[:-1]) if out is None else out


LENGTH_GROUPS = 4  # JointQK: padded sequences in up to this many groups of similar length


def real_lengths(w: torch.Tensor) -> torch.Tensor:
    """(S,) int64: one past each sequence's last real token (token weight > 0; 0 for an all-padding one), of
    w (S, N) token weights. Padded text's groupings (JointQK's `_length_groups`, the replay's chunks) sort by it:
    a sequence's tokens from there on are all padding."""
    positions = torch.arange(1, w.shape[1] + 1, device=w.device)
    return torch.where(w > 0, positions, 0).amax(1)


def _length_groups(w: torch.Tensor | None, s: int, n: int) -> list[tuple[torch.Tensor | None, int]]:
    """(sequences, m) groups covering the S sequences, each trimmed to m tokens: every token from m on is padding
    in all of the group's sequences (w (S, N) token weights or None: one group, all N). Padded text batches
    (right padding) are sorted by length into LENGTH_GROUPS groups, cutting the A² GEMMs' work (MiniLM's
    calibration batches of 32 sentences padded to 56 tokens: to 26-37 %); a batch that this would hardly trim
    (the groups' gathers copy what they keep) stays one group (None: all sequences, no gather), trimmed to its
    longest sequence. Reads the lengths on the host (a few syncs per update on a GPU)."""
    if w is None:
        return [(None, n)]
    lengths = real_lengths(w)
    groups = [(seqs, int(lengths[seqs].max())) for seqs in lengths.argsort().tensor_split(min(LENGTH_GROUPS, s))]
    longest = int(lengths.max())
    if sum(len(seqs) * m * m for seqs, m in groups) > 0.75 * s * longest * longest:
        return [(None, longest)]
    return groups


class JointQK:
    """Per block, per head: Σa (H,), Σ a q (H, hd), Σ a q qᵀ (H, hd, hd) of the queries and the same of
    the keys (weights in the module docstring), float64; None for qk_norm blocks.

    The output metric G = W_o,hᵀ W_o,h enters through a factor L (L Lᵀ = G, from G's eigendecomposition in
    float64, so a singular G is fine): with v' = v L and c' = ctx L, ‖W_o,h (v_j − ctx_i)‖² = ‖v'_j − c'_i‖².
    A block's factor is computed at its first update and reused while proj's weight is the same tensor with
    the same version counter (weights do not change during a calibration; a replaced weight or an in-place
    update of it gets a new factor, as ElasticViT's plans see them: writes through `.data` are not seen)."""

    def __init__(self, blocks: list[BlockSpec], device: torch.device) -> None:
        self.blocks = blocks
        f64 = dict(dtype=torch.float64, device=device)
        self.moments = [None if s.has_qk_norm else
                        {n: [torch.zeros(s.num_heads, **f64), torch.zeros(s.num_heads, s.head_dim, **f64),
                             torch.zeros(s.num_heads, s.head_dim, s.head_dim, **f64)] for n in "qk"}
                        for s in blocks]
        # per block: (proj's weight the factor was computed from, its version, [L, 0, 0] (H, hd, hd + 2) float64)
        self._factors: list[tuple[torch.Tensor, int, torch.Tensor] | None] = [None] * len(blocks)

    def _factor(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """(H, hd, hd + 2) [L, 0, 0] of block i in `dtype`: L (H, hd, hd) with L Lᵀ = W_o,hᵀ W_o,h; the two
        zero columns make v @ it leave room for the GEMM operands' extra columns."""
        spec = self.blocks[i]
        weight = spec.proj.weight
        cached = self._factors[i]
        if cached is None or cached[0] is not weight or cached[1] != weight._version:
            h, hd = spec.num_heads, spec.head_dim
            w = weight.detach().double().view(-1, h, hd).transpose(0, 1)  # (H, D_out, hd)
            eigenvalues, eigenvectors = torch.linalg.eigh(w.mT @ w)
            ext = w.new_zeros(h, hd, hd + 2)
            ext[..., :hd] = eigenvectors * eigenvalues.clamp_min(0).sqrt()[:, None, :]  # PSD: negatives are rounding
            cached = self._factors[i] = (weight, weight._version, ext)
        return cached[2].to(dtype)

    def update(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
               w: torch.Tensor | None) -> None:
        acc = self.moments[i]
        if acc is None:
            return
        s, h, n, hd = q.shape
        c = hd + 2
        # a_i = Σ_j w_ij and b_j = Σ_i w_ij, w_ij = A_ij² ‖v'_j − c'_i‖², as two GEMMs of A² with hd + 2 columns,
        # not by forming w (S, H, N, N): with P = [v', ‖v'‖², 1] and C = [−2c', 1, ‖c'‖²] per token,
        # a_i = C_i · (A² P)_i and b_j = P_j · (A²ᵀ C)_j. The padding masks (query rows, key columns)
        # go on P's and C's rows: each GEMM then sums over real tokens only and each dot is 0 for a padding one.
        p = v @ self._factor(i, v.dtype)  # [v', 0, 0] (S, H, N, c)
        # C from the unmasked v' (c' is the model's own ctx L), before P's extra columns are filled
        cq = torch.baddbmm(p.view(s * h, n, c), a.reshape(s * h, n, n), p.view(s * h, n, c), beta=0, alpha=-2)
        cq = cq.view(s, h, n, c)  # [−2c', 0, 0]
        _dot(p[..., :hd], p[..., :hd], out=p[..., hd])
        p[..., hd + 1] = 1
        cq[..., hd] = 1
        _dot(cq[..., :hd], cq[..., :hd], out=cq[..., hd + 1])
        cq[..., hd + 1] *= 0.25  # ‖−2c'‖² / 4
        if w is not None:
            mask = w[:, None, :, None].to(a.dtype)  # (S, 1, N, 1)
            p.mul_(mask)
            cq.mul_(mask)
        q_weight, k_weight = p.new_zeros(s, h, n), p.new_zeros(s, h, n)
        for seqs, m in _length_groups(w, s, n):
            # padding queries' and keys' rows of P and C are 0: the GEMMs need A² only up to the longest
            # sequence's last real token (padding past it adds nothing, and its weights stay 0)
            a2 = a[:, :, :m, :m].square() if seqs is None else a[:, :, :m, :m].index_select(0, seqs).square_()
            pm, cm = (t[:, :, :m] if seqs is None else t[:, :, :m].index_select(0, seqs) for t in (p, cq))
            rows = slice(None) if seqs is None else seqs
            q_weight[rows, :, :m] = _dot(cm, a2 @ pm)
            k_weight[rows, :, :m] = _dot(pm, a2.mT @ cm)
        # sums of non-negative terms: a negative total is rounding
        q_weight.clamp_min_(0)
        k_weight.clamp_min_(0)
        for name, x, weight in (("q", q, q_weight), ("k", k, k_weight)):
            x = x.transpose(0, 1).reshape(h, -1, hd)  # (H, S*N, hd), a view for the model's q/k layouts
            weight = weight.transpose(0, 1).reshape(h, -1, 1)
            # into a contiguous buffer: laid out like x (strided rows), the product costs about twice as much
            weighted = torch.mul(x, weight, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
            total, first, second = acc[name]
            total += weight.sum((1, 2)).double()
            first += weighted.sum(1).double()
            second += (weighted.mT @ x).double()

    def tensors(self) -> list[torch.Tensor]:
        return [t for acc in self.moments if acc is not None for n in "qk" for t in acc[n]]

    def covariance(self, i: int) -> torch.Tensor | None:
        """(H, hd, hd) float64 CPU C_q + C_k of block i (centred, each normalised by its own weight sum; a
        head whose weights sum to 0 gives zeros), or None for a qk_norm block. ValueError for NaN/Inf."""
        acc = self.moments[i]
        if acc is None:
            return None
        out = 0
        for n in "qk":
            total, first, second = (t.cpu() for t in acc[n])
            denom = total.clamp_min(torch.finfo(torch.float64).tiny)
            mean = first / denom[:, None]
            cov = second / denom[:, None, None] - mean[:, :, None] * mean[:, None, :]
            out = out + torch.where((total > 0)[:, None, None], cov, 0.0)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"{self.blocks[i].name}: the joint Q/K covariance contains NaN or Inf")
        return 0.5 * (out + out.mT)


class ScoreFit:
    """Per block: the packed M (H, (R+1)(R+2)/2, R(R+1)/2) and P_tail (H, R+1, R) float64 (module docstring),
    R = fit_ranks(hd); None for qk_norm blocks and heads too small to fit (R = 0)."""

    def __init__(self, blocks: list[BlockSpec], device: torch.device) -> None:
        self.blocks = blocks
        f64 = dict(dtype=torch.float64, device=device)
        self.moments = []
        for s in blocks:
            big_r, h = fit_ranks(s.head_dim), s.num_heads
            self.moments.append(None if s.has_qk_norm or big_r == 0 else
                                (torch.zeros(h, *(n * (n + 1) // 2 for n in (big_r + 1, big_r)), **f64),
                                 torch.zeros(h, big_r + 1, big_r, **f64)))

    def update(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
               w: torch.Tensor | None) -> None:
        self.add(i, q, k, a, w)

    def add(self, i: int, q: torch.Tensor, k: torch.Tensor, a: torch.Tensor, w: torch.Tensor | None) -> None:
        """`update` without v, which the fit does not read (skd.attention_inputs replays q, k and A alone)."""
        if self.moments[i] is None:
            return
        step = max(1, CHUNK_TOKENS // q.shape[2])  # whole sequences: keys are centred per sequence
        for start in range(0, q.shape[0], step):
            part = slice(start, start + step)
            self._add(i, q[part], k[part], a[part], None if w is None else w[part])

    def _add(self, i: int, q: torch.Tensor, k: torch.Tensor, a: torch.Tensor, w: torch.Tensor | None) -> None:
        """`add` on one chunk of sequences."""
        m_acc, p_acc = self.moments[i]
        s, h, n, _ = q.shape
        big_r = p_acc.shape[-1]
        if w is None:
            k_mean = k.mean(2, keepdim=True)
        else:  # over each sequence's real tokens (an all-padding sequence has no weight anyway)
            k_mean = (k * w[:, None, :, None]).sum(2, keepdim=True) / w.sum(1).clamp_min(1)[:, None, None, None]
        kc = k - k_mean  # a per-query constant does not change the softmax: fit what does
        if w is not None:  # padding keys weigh 0: zero their centred keys rather than A's columns (S, H, N, N)
            kc = kc * w[:, None, :, None]
        # Per query token (padding queries left out: text batches are mostly padding; a real query's weight
        # w_i goes on one factor of its q̃ products), (H, ·, tokens): Σ_j A_ij k̃_jb k̃_jd (b <= d < R); for the
        # dropped dims >= R, which enter only through their score part t_ij = Σ_{m >= R} q_im k̃_jm,
        # Σ_j A_ij t_ij k̃_jb; and w_i q̃_a q̃_c (a <= c). Feature-major (·, N) rows: the packed pairs are
        # products of whole rows written in place in triu_indices' order (slices of a token-major last dim
        # and their concatenation cost three times as much; index gathers more than the GEMM work they save).
        real = None if w is None else (w > 0).nonzero().unbind(1)  # (sequence, token) of each real token

        def tokens(x: torch.Tensor) -> torch.Tensor:
            """(S, H, C, N) -> (H, C, tokens), contiguous."""
            x = x.permute(1, 2, 0, 3)
            return x.reshape(h, -1, s * n) if real is None else x[:, :, real[0], real[1]]

        kept = kc[..., :big_r].transpose(-1, -2).contiguous()  # (S, H, R, N)
        pairs = _packed_products(kept, kept, 2)  # (S, H, R(R+1)/2, N)
        mixed = tokens(pairs @ a.mT)  # (H, R(R+1)/2, tokens)
        tail = tokens(kept @ (a * (q[..., big_r:] @ kc[..., big_r:].mT)).mT)  # (H, R, tokens)
        qt = tokens(torch.cat([q.new_ones(s, h, n, 1), q[..., :big_r]], -1).transpose(-1, -2))  # q̃ (H, R+1, tokens)
        qw = qt if real is None else qt * w[real]  # w_i q̃_i
        m_acc += (_packed_products(qw, qt, 1) @ mixed.mT).double()
        p_acc += (qw @ tail.mT).double()

    def tensors(self) -> list[torch.Tensor]:
        return [t for acc in self.moments if acc is not None for t in acc]

    @property
    def fitted(self) -> list[int]:
        """The blocks with statistics (not qk_norm, heads wide enough), in order."""
        return [i for i, acc in enumerate(self.moments) if acc is not None]

    @property
    def last_block(self) -> int | None:
        """The last block with statistics (the pass need not run past its attention), or None: no block has
        any (all qk_norm, or heads too small)."""
        return max(self.fitted, default=None)

    def moment(self, i: int) -> torch.Tensor | None:
        """Block i's full M (H, R+1, R+1, R, R) float64 on the accumulators' device, unpacked (symmetric in
        (a, c) and in (b, d)), or None (qk_norm, R = 0)."""
        if self.moments[i] is None:
            return None
        packed, big_r = self.moments[i][0], self.moments[i][1].shape[-1]
        ac, bd = (_packed_positions(n).to(packed.device) for n in (big_r + 1, big_r))
        return packed[:, ac[:, :, None, None], bd]

    def solve(self, i: int, has_bias: bool) -> torch.Tensor | None:
        """Block i's fit (H, R, R+1, R) float64 CPU in skd.score_fit's format, or None (qk_norm, R = 0).

        Width r: the normal equations G (n = (r+1)·r unknowns X[a, b], G[(a, b), (c, d)] = M[a, c, b, d])
        plus δ = RIDGE·tr(G)/n on the diagonal, solved in float64 by Cholesky (G is positive semi-definite,
        so positive definite after the ridge; a head whose factorization fails anyway, statistics that are
        not PSD, is solved by LU); without a bias (has_bias False) the constant row is fixed at 0 (the
        reduced system, n = r·r). A head whose weights were all 0 gets 0. ValueError for NaN/Inf statistics."""
        if self.moments[i] is None:
            return None
        if not all(bool(torch.isfinite(t).all()) for t in self.moments[i]):
            raise ValueError(f"{self.blocks[i].name}: the score-fit statistics contain NaN or Inf")
        packed, p_tail = (t.cpu() for t in self.moments[i])
        h, big_r = p_tail.shape[0], p_tail.shape[-1]
        fit = torch.zeros(h, big_r, big_r + 1, big_r, dtype=torch.float64)
        first = 0 if has_bias else 1  # row 0 is the constant
        # The unknowns (a, b) by shell max(a, b + 1): width r's are the first (r + 1 - first)·r, so its G is a
        # leading block of the widest one's, gathered from the packed M once
        a, b = _by_shell(big_r, first)
        ac, bd = _packed_positions(big_r + 1), _packed_positions(big_r)
        g_all = packed[:, ac[a[:, None], a], bd[b[:, None], b]]  # (H, n, n)
        # P[a, b, m] = M[a, m + 1, b, m] for m < R (q̃_{m+1} = q_m); dropped[..., r] = Σ_{m >= r} P[..., m]
        m = torch.arange(big_r)
        below = packed[:, ac[a[:, None], m + 1], bd[b[:, None], m]]  # (H, n, R)
        dropped = torch.cat([below, p_tail[:, a, b, None]], -1).flip(-1).cumsum(-1).flip(-1)  # (H, n, R + 1)
        with one_thread():
            for r in range(1, big_r + 1):
                n = (r + 1 - first) * r
                g = g_all[:, :n, :n].clone()  # a copy: the ridge goes in place
                rhs = dropped[:, :n, r:r + 1]
                diagonal = g.diagonal(dim1=1, dim2=2)
                delta = RIDGE * diagonal.sum(-1) / n  # (H,)
                live = delta > 0  # tr(G) = 0: no weight; solve I x = 0
                diagonal += delta[:, None]
                if not bool(live.all()):
                    g[~live] = torch.eye(n, dtype=torch.float64)
                    rhs = torch.where(live[:, None, None], rhs, 0.0)
                factor, info = torch.linalg.cholesky_ex(g)
                # two triangular solves: about half of cholesky_solve's time on these batches of small systems
                x = torch.linalg.solve_triangular(
                    factor.mT, torch.linalg.solve_triangular(factor, rhs, upper=False), upper=True)
                failed = info > 0
                if bool(failed.any()):
                    x[failed] = torch.linalg.solve(g[failed], rhs[failed])
                fit[:, r - 1, a[:n], b[:n]] = x[..., 0]
        return fit


def check_supported(blocks: list[BlockSpec]) -> None:
    """ValueError naming the blocks whose attention `attention_pass` cannot compute: ElasticViT's reasons
    (scale_norm, gated attention, an MLP norm), except qk_norm, whose norms the pass applies."""
    unsupported = [r for s in blocks for r in s.blocking if not (s.has_qk_norm and "qk_norm" in r)]
    if unsupported:
        raise ValueError("the explicit attention pass (joint_qk/score_fit) cannot compute these blocks: "
                         + "; ".join(unsupported))


def heads(spec: BlockSpec, x: torch.Tensor, values: bool = True) -> tuple[torch.Tensor, ...]:
    """q, k and (with `values`) v (S, H, N, hd) of block `spec`'s attention input x (S, N, D), qk_norm applied,
    half precision promoted to fp32. With values the block's Linears are called as modules (their hooks fire
    as in the model's own forward); without, only q and k are computed (for the fused qkv, from a view of
    its first 2·C rows)."""
    s, n, _ = x.shape
    h, hd, c = spec.num_heads, spec.head_dim, spec.channels
    parts = 3 if values else 2
    if spec.fused:  # rows which*C + head*hd + rank (BlockSpec)
        bias = spec.qkv.bias
        out = spec.qkv(x) if values else F.linear(x, spec.qkv.weight[:2 * c], None if bias is None else bias[:2 * c])
        q, k, *v = out.view(s, n, parts, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, *v = (lin(x).view(s, n, h, hd).transpose(1, 2) for lin in (spec.q, spec.k, spec.v)[:parts])
    if spec.has_qk_norm:
        q, k = spec.qk_norms[0](q), spec.qk_norms[1](k)
    return tuple(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in (q, k, *v))


def attention_weights(spec: BlockSpec, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A = softmax(q kᵀ·scale + bias) (S, H, N, N) of q, k (S, H, N, hd) (`heads`), bias broadcastable to it
    (skd.models.AttnFn) or None, in q's dtype."""
    s, h, n, hd = q.shape
    # the scale inside the GEMM (alpha): no pass over the (S, H, N, N) scores for it, forward or backward
    scores = torch.baddbmm(q.new_zeros(()), q.reshape(s * h, n, hd), k.reshape(s * h, n, hd).mT, beta=0,
                           alpha=spec.scale).view(s, h, n, n)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    return scores.softmax(-1)


def explicit_forward(adapter: ModelAdapter, batch: Any, accumulators: Sequence[Accumulator],
                     through: int | None = None, inputs: AttentionInputs | None = None) -> Any:
    """The model's own output on `batch` (skd.batches, on the model's device), every block's attention
    computed explicitly (module docstring) and fed to the accumulators with the batch's token weights
    (`adapter.token_weights`, (B, T) mapped to the attention's (S, N): sequences are contiguous per sample).
    The model runs in eval mode and the standard layout. q, k, v come from calling the block's own Linears
    (the fused qkv once, then split), proj, fc1 and fc2 are called too, so module hooks on them fire as in
    the model's own forward (skd.stats.calibrate's gradient pass runs through here with joint_qk). Grad
    mode is the caller's; the accumulators are fed detached tensors under no_grad. ValueError for blocks
    whose attention cannot be computed (`check_supported`).

    through: when the accumulators read nothing after block `through`'s attention, every branch after it
    (its MLP, the later blocks) is skipped, as a width-0 branch (`ModelAdapter.run`); the output is then
    not the model's. None: everything runs.

    inputs: also record every block's attention input, bias and token weights there
    (skd.attention_inputs: the score fit replays them on the transformed model)."""
    blocks = adapter.blocks
    check_supported(blocks)
    last = len(blocks) - 1 if through is None else through
    if not 0 <= last < len(blocks):
        raise ValueError(f"through={through}: the model has blocks 0 to {len(blocks) - 1}")
    subnet = Subnet(attn=[s.head_dim if i <= last else 0 for i, s in enumerate(blocks)],
                    mlp=[s.hidden if i < last or through is None else 0 for i, s in enumerate(blocks)])
    weights = adapter.token_weights(batch)

    def attn_fn(i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        spec = blocks[i]
        s, n, _ = x.shape
        h, hd = spec.num_heads, spec.head_dim
        q, k, v = heads(spec, x)
        a = attention_weights(spec, q, k, bias)
        w = weights
        if w is not None:
            if w.numel() != s * n:
                raise ValueError(f"{spec.name}: token weights have {tuple(w.shape)} entries but the attention has "
                                 f"{s} sequences of {n} tokens")
            w = w.reshape(s, n).to(a.dtype)
        if inputs is not None:
            inputs.record(i, x.detach(), None if bias is None else bias.detach(), w)
        # Statistics of the forward, never differentiated (no_grad: they also read weights, which require
        # grad in calibrate's pass)
        with torch.no_grad():
            for acc in accumulators:
                acc.update(i, q.detach(), k.detach(), v.detach(), a.detach(), w)
        ctx = (a @ v).to(x.dtype).transpose(1, 2).reshape(s, n, h * hd)
        return spec.proj(ctx)

    def mlp_fn(i: int, x: torch.Tensor) -> torch.Tensor:
        spec = blocks[i]
        return spec.fc2(spec.hidden_dropout(spec.act(spec.fc1(x))))

    args, kwargs = batches.model_inputs(batch)
    return adapter.run(args, kwargs, subnet, attn_fn, mlp_fn)


def attention_pass(adapter: ModelAdapter, data: Iterable | Dataset,
                   accumulators: Sequence[Accumulator], *, num_samples: int, progress: bool = True,
                   group: object = None, through: int | None = None) -> int:
    """One no-grad pass over at most `num_samples` samples of `data` (skd.passes.stream_pass, as
    skd.stats.calibrate: batches or a map-style Dataset, this process's share under torch.distributed, the
    accumulators all-reduced over `group` afterwards), every block's attention computed explicitly
    (`explicit_forward`) and fed to each accumulator; with `through`, nothing after block `through`'s
    attention runs (what the accumulators read ends there). (skd.stats.calibrate(accumulators=) feeds them
    in its gradient pass instead.)

    adapter: the adapter of the bare model (standard layout), which runs in eval mode (its training flag is
    restored). Returns the number of samples used (all processes). ValueError for blocks whose
    attention the pass cannot compute (scale_norm, gated attention, an MLP norm: the reasons ElasticViT
    refuses them, except qk_norm), an empty loader or NaN/Inf inputs; warns when fewer than num_samples
    samples were available.
    """
    with torch.no_grad():
        return stream_pass(adapter.model, data, lambda batch: explicit_forward(adapter, batch, accumulators, through),
                           lambda: [t for acc in accumulators for t in acc.tensors()], num_samples=num_samples,
                           desc="skd attention statistics", progress=progress, group=group)
