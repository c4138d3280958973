"""Triton weighted_covariance: per group Σw, Σ w x and X^T diag(w) X in one read of x.

A GEMM-like kernel: the grid is groups × (output tile pairs) × N-splits, each program loops over its
rows of x. Only tiles on or above the diagonal are computed (the result is symmetric); they are stored
twice, mirrored. When a few tiles cannot fill the GPU (per-head r = 64 gives one tile per group), N is
split across programs and the fp32 partials are summed by one torch reduction.

Equivalent to::

    xg = x.float().reshape(N, G, r)
    w.float().sum(), (w[:, None, None] * xg).sum(0), torch.einsum("n,ngi,ngj->gij", w, xg, xg)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.weighted_covariance import fake
from ._utils import dot_dtype, fp32_dot_precision, num_sms, pick_configs

# Rows per N-split are a multiple of this, so every split but the last runs whole BLOCK_N steps.
_SPLIT_ROWS_QUANTUM = 256


def _cfg(br: int, bn: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_R": br, "BLOCK_N": bn}, num_stages=stages, num_warps=warps)


# BLOCK_R = 64 fits a ViT head (r = 64, memory-bound); 128 is for wide groups (compute-bound).
# fp32 tiles take 2x the shared memory: the big configs then fail to load and the autotuner skips them
# (OutOfResources), leaving the small ones.
_CONFIGS = pick_configs(
    [
        _cfg(64, 32, 3, 4),
        _cfg(32, 128, 4, 4),
        _cfg(64, 64, 4, 4),
        _cfg(64, 128, 3, 4),
        _cfg(64, 128, 3, 8),
        _cfg(128, 64, 3, 8),
        _cfg(128, 128, 3, 8),
    ],
    _cfg(32, 64, 1, 4),
)


@triton.autotune(configs=_CONFIGS, key=["R", "rows_per_split", "SPLIT_PRODUCT"])
@triton.jit
def _covariance_kernel(
    x_ptr, w_ptr, outer_ptr, sum_ptr, wsum_ptr,
    N, R, rows_per_split,
    stride_xn, stride_xd, stride_w,
    DOT_DTYPE: tl.constexpr, SPLIT_PRODUCT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (group g, tile pair (ti, tj), N-split s) program.

    Writes split s's partial sums: outer[s] (G, R, R), sum[s] (G, R), wsum[s] (), all contiguous fp32.
    """
    g = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    num_t = tl.cdiv(R, BLOCK_R)
    ti = tile // num_t
    tj = tile % num_t
    if ti > tj:  # below the diagonal: the mirrored store of tile (tj, ti) writes it
        return

    ri = ti * BLOCK_R + tl.arange(0, BLOCK_R)
    rj = tj * BLOCK_R + tl.arange(0, BLOCK_R)
    ok_i = ri < R
    ok_j = rj < R
    col_i = (g * R + ri) * stride_xd
    col_j = (g * R + rj) * stride_xd
    n_start = split * rows_per_split
    n_end = min(n_start + rows_per_split, N)

    acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        ok_n = rows < n_end
        row_off = rows.to(tl.int64)[:, None] * stride_xn
        w = tl.load(w_ptr + rows * stride_w, mask=ok_n, other=0.0).to(tl.float32)
        xi = tl.load(x_ptr + row_off + col_i[None, :], mask=ok_n[:, None] & ok_i[None, :], other=0.0)
        xj = tl.load(x_ptr + row_off + col_j[None, :], mask=ok_n[:, None] & ok_j[None, :], other=0.0)
        xw = xi.to(tl.float32) * w[:, None]
        s1 += tl.sum(xw, axis=0)
        s0 += w
        xj = xj.to(DOT_DTYPE)
        hi = xw.to(DOT_DTYPE)
        acc = tl.dot(tl.trans(hi), xj, acc, input_precision=PRECISION)
        if SPLIT_PRODUCT:
            # w*x rounded to fp16/bf16 would lose ~3 digits; its residual in a second product keeps the
            # statistics at fp32 accuracy (xj itself is exact in its own dtype).
            lo = (xw - hi.to(tl.float32)).to(DOT_DTYPE)
            acc = tl.dot(tl.trans(lo), xj, acc)

    groups = tl.num_programs(0)
    block = outer_ptr + (split.to(tl.int64) * groups + g) * R * R
    tl.store(block + ri[:, None] * R + rj[None, :], acc, mask=ok_i[:, None] & ok_j[None, :])
    if ti != tj:
        tl.store(block + rj[:, None] * R + ri[None, :], tl.trans(acc), mask=ok_j[:, None] & ok_i[None, :])
    else:
        tl.store(sum_ptr + (split.to(tl.int64) * groups + g) * R + ri, s1, mask=ok_i)
        if (g == 0) & (ti == 0):
            tl.store(wsum_ptr + split, tl.sum(s0, axis=0))


def _num_splits(x: torch.Tensor, groups: int, r: int) -> int:
    """N-splits that give the GPU about two programs per SM (1 under the interpreter: no parallelism)."""
    n = x.shape[0]
    if x.device.type != "cuda":
        return 1
    num_t = triton.cdiv(r, 64)
    tiles = groups * num_t * (num_t + 1) // 2
    want = triton.cdiv(2 * num_sms(x.device.index or 0), tiles)
    return max(1, min(want, triton.cdiv(n, _SPLIT_ROWS_QUANTUM)))


@torch.library.custom_op("skd_kernels::triton_weighted_covariance", mutates_args=())
def weighted_covariance(
    x: torch.Tensor, w: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of weighted second moments, read from x once.

    x: (N, G*r) fp32/fp16/bf16, any strides; w: (N,) >= 0, any float dtype; groups = G.
    Returns (weight_sum () fp32 = Σ w, sum (G, r) fp32 = Σ w x, sum_outer (G, r, r) fp32 = Σ w x x^T).
    """
    n, d = x.shape
    r = d // groups
    launch = n > 0 and r > 0
    splits = _num_splits(x, groups, r) if launch else 1
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), _SPLIT_ROWS_QUANTUM) * _SPLIT_ROWS_QUANTUM
    splits = triton.cdiv(n, rows_per_split) if launch else 1  # no split left without rows
    # Launched, the kernel writes every entry; with no rows (or r == 0) the statistics are zero.
    alloc = torch.empty if launch else torch.zeros
    f32 = dict(dtype=torch.float32, device=x.device)
    outer, s1, s0 = alloc((splits, groups, r, r), **f32), alloc((splits, groups, r), **f32), alloc((splits,), **f32)
    if launch:
        def grid(meta: dict) -> tuple[int, int, int]:
            return (groups, triton.cdiv(r, meta["BLOCK_R"]) ** 2, splits)

        ddt = dot_dtype(x.dtype)
        _covariance_kernel[grid](
            x, w, outer, s1, s0,
            n, r, rows_per_split,
            x.stride(0), x.stride(1), w.stride(0),
            DOT_DTYPE=ddt, SPLIT_PRODUCT=ddt != tl.float32, PRECISION=fp32_dot_precision(),
        )
    if splits == 1:
        return s0[0], s1[0], outer[0]
    return s0.sum(0), s1.sum(0), outer.sum(0)


weighted_covariance.register_fake(fake)
