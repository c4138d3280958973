"""The rank-major weight layout (LAYOUT_VERSION 1) that makes every width a prefix.

While an ElasticViT wraps a model, each block's attention weights are permuted once, in place, so that
"keep the first r dims of every head, for q, k and v" is one prefix of rows and of o's columns:

    fused qkv row   = rank * (3*H) + which * H + head     (which: 0 q, 1 k, 2 v; timm)
    q, k, v rows    = rank * H + head                      (separate Linears, e.g. HF BERT)
    proj (o) column = rank * H + head

The subnetwork's fused qkv is then `prefix_linear(x, Wqkv, k_out=3*H*r)`, separate q is
`prefix_linear(x, Wq, k_out=H*r)`, and o is `prefix_linear(ctx, Wo, k_in=H*r)`. MLP hidden units are
already a prefix of fc1 rows / fc2 columns. The model's own layout is head-major (`head*hd + rank`).
Files saved with the fused layout keep loading: it is unchanged since version 1.

Storage order: while rank-major, the weights whose prefix is a block of COLUMNS (proj/o and fc2, read with
k_in) are stored column-major within their own storage (shape (out, in), strides (1, out)), so W[:, :k] is
one contiguous block that the GEMM reads as a dense (k, out) matrix: on a row-major weight it is a strided
panel (leading dimension in > k), which MKL/oneDNN packs 1-7 % slower than a contiguous one (benchmarks/
RESULTS.md, "Column-major input-truncated weights"). Row prefixes (qkv, q/k/v, fc1) are contiguous
row-major already. The standard layout is row-major again; the values (state_dict, files) are the same
either way, only the strides differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..compensation import input_cov, input_mean
from ..models import BlockSpec

LAYOUT_VERSION = 1


def qkv_permutation(num_heads: int, head_dim: int) -> torch.Tensor:
    """(3*H*hd,) int64: rank-major fused-qkv row n holds head-major row perm[n]."""
    head_major = torch.arange(3 * num_heads * head_dim).view(3, num_heads, head_dim)  # [which, head, rank]
    return head_major.permute(2, 0, 1).reshape(-1)  # enumerate in (rank, which, head) order


def rank_major_permutation(num_heads: int, head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(H*hd,) int64: rank-major index n (= rank*H + head) holds head-major index perm[n] (of q/k/v rows
    or o columns)."""
    return torch.arange(num_heads * head_dim, device=device).view(num_heads, head_dim).t().reshape(-1)


def head_major_order(r: int, cols: int, device: torch.device) -> torch.Tensor:
    """(r*cols,) int64 on `device`: head-major position c*r + rank holds rank-major index rank*cols + c, for the
    kept rows or columns of width r (c: which*H + head of fused qkv rows, cols = 3H; head of q/k/v rows and
    o's columns, cols = H). `t.index_select(dim, order)` reorders them. The inverse of
    `rank_major_permutation(cols, r)`, which is that function with the grid's two sides swapped."""
    return rank_major_permutation(r, cols, device)


def q_rows(spec: BlockSpec, t: torch.Tensor, r: int) -> torch.Tensor:
    """(H, r, *rest) view of the q rows of width r in `t`: the rank-major fused qkv (rows rank*3H + head) or
    separate q (rows rank*H + head) weight (rows, D) or bias (rows,) of `spec`. Head h, rank j is [h, j]."""
    h = spec.num_heads
    if spec.fused:
        return t[:3 * h * r].unflatten(0, (r, 3, h))[:, 0].transpose(0, 1)
    return t[:h * r].unflatten(0, (r, h)).transpose(0, 1)


def with_q_rows(spec: BlockSpec, t: torch.Tensor, r: int, q: torch.Tensor) -> torch.Tensor:
    """The rows of width r of the rank-major `t` (as `q_rows` reads it: the qkv's 3*H*r-row prefix, or q's
    H*r), a new contiguous tensor (differentiable in t and q) whose q rows are q (H, r, *rest)."""
    q = q.transpose(0, 1)  # (r, H, *rest): rank-major
    if not spec.fused:
        return q.flatten(0, 1)
    k_v = t[:3 * spec.num_heads * r].unflatten(0, (r, 3, spec.num_heads))[:, 1:]
    return torch.cat((q[:, None], k_v), 1).flatten(0, 2)


def _permute_(p: torch.Tensor | None, perm: torch.Tensor, dim: int) -> None:
    """p <- p.index_select(dim, perm) in place (storage and data_ptr kept), its .grad likewise."""
    if p is None:
        return
    for t in (p.data, p.grad):
        if t is not None:
            t.copy_(t.index_select(dim, perm.to(t.device)))


def _in_order(t: torch.Tensor, column_major: bool) -> torch.Tensor:
    """A (out, in) view of t's own storage region in the asked element order (values not kept), or t itself
    when it has that order already or is not dense in either order (it then keeps its strides: correct,
    only the GEMM is slower)."""
    row_major, col_major = t.is_contiguous(), t.t().is_contiguous()
    if (col_major if column_major else row_major) or not (row_major or col_major):
        return t
    out_f, in_f = t.shape
    return t.as_strided((out_f, in_f), (1, out_f) if column_major else (in_f, 1), t.storage_offset())


def store_order_(p: torch.Tensor, column_major: bool) -> None:
    """Re-stride the 2-D Parameter p (and its .grad) in place to column-major (strides (1, out)) or row-major
    (strides (in, 1)), values unchanged: same storage and data_ptr (one temporary copy of the values), same
    Parameter object (its `.data` is replaced by the re-strided view)."""
    for t in (p, p.grad):
        if t is None:
            continue
        target = _in_order(t.data, column_major)
        if target is not t.data:
            values = t.data.clone()
            t.data = target
            t.data.copy_(values)


def column_truncated(blocks: Sequence[BlockSpec]) -> list[nn.Linear]:
    """The Linears whose elastic prefix is a block of columns (k_in): every block's proj (o) and fc2."""
    return [lin for spec in blocks for lin in (spec.proj, spec.fc2)]


def store_columns_(blocks: Sequence[BlockSpec], column_major: bool) -> None:
    """Store the `column_truncated` weights of `blocks` column-major (True: the rank-major layout's order)
    or row-major (False: the standard one), in place (`store_order_`)."""
    with torch.no_grad():
        for lin in column_truncated(blocks):
            store_order_(lin.weight, column_major)


class RankMajorLayout:
    """The permutations of a model's blocks; `apply` re-lays any blocks of the same shapes (the wrapped
    model's, or a deep copy's)."""

    def __init__(self, blocks: Sequence[BlockSpec]) -> None:
        self._perms = [(qkv_permutation(s.num_heads, s.head_dim) if s.fused else None,
                        rank_major_permutation(s.num_heads, s.head_dim)) for s in blocks]

    def apply(self, blocks: Sequence[BlockSpec], to_standard: bool) -> None:
        """Re-lay `blocks` in place: rank-major -> head-major and row-major proj/fc2 weights when to_standard,
        else head-major -> rank-major with column-major proj/fc2 weights (module docstring)."""
        if to_standard:
            store_columns_(blocks, column_major=False)
        with torch.no_grad():
            for spec, (fused, single) in zip(blocks, self._perms, strict=True):
                if to_standard:
                    fused, single = None if fused is None else fused.argsort(), single.argsort()
                rows: list[tuple[nn.Linear, torch.Tensor]] = (
                    [(spec.qkv, fused)] if spec.fused else [(lin, single) for lin in (spec.q, spec.k, spec.v)])
                for lin, perm in rows:
                    _permute_(lin.weight, perm, 0)
                    _permute_(lin.bias, perm, 0)
                _permute_(spec.proj.weight, single, 1)
                _permute_(input_mean(spec.proj), single, 0)  # bias compensation's context mean
                cov = input_cov(spec.proj)  # cross-head compensation's: both axes
                _permute_(cov, single, 0)
                _permute_(cov, single, 1)
        if not to_standard:
            store_columns_(blocks, column_major=True)
