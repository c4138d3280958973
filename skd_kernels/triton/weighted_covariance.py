"""Triton weighted_covariance: per group Σw, Σ w x and X^T diag(w) X in one read of x.

A GEMM-like kernel: programs are (group, output tile pair) on grid axis 0 and N-splits on axis 1; each
loops over its rows of x. Only tiles on or above the diagonal are computed (the result is symmetric);
they are stored twice, mirrored. When a few tiles cannot fill the GPU (per-head r = 64 gives one tile
per group), N is split across programs and the fp32 partials are summed by one torch reduction.
Registered as the custom op `skd_kernels::triton_weighted_covariance` with the op's fake kernel.

Equivalent to::

    xg = x.float().reshape(N, G, r)
    w.float().sum(), (w[:, None, None] * xg).sum(0), torch.einsum("n,ngi,ngj->gij", w, xg, xg)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.weighted_covariance import fake
from ._utils import ConfigPruner, bucket, checked_grid, dot_dtype, fp32_dot_precision, num_sms, on_device, pick_configs

# Rows per N-split are a multiple of this, so every split but the last runs whole BLOCK_N steps.
_SPLIT_ROWS_QUANTUM = 256
# The largest |w·x| of a tile is scaled to this before the fp16/bf16 split: 2^14 leaves fp16 (max 65504)
# a factor 4 of headroom, and 24 binades below it stay normal.
_SPLIT_SCALE = tl.constexpr(16384.0)


def _cfg(br: int, bn: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_R": br, "BLOCK_N": bn}, num_stages=stages, num_warps=warps)


def _shared_bytes(config: triton.Config, operand_bytes: int) -> int:
    """Shared memory estimate: each pipeline stage holds the two (BLOCK_N, BLOCK_R) x tiles."""
    return config.num_stages * 2 * config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_R"] * operand_bytes


# BLOCK_R = 64 fits a ViT head (r = 64, memory-bound); 128 is for wide groups (compute-bound). Configs that
# exceed the device's shared memory for the dtype are pruned before tuning (fp32 tiles take twice the memory),
# and so are those that spill registers there. Measured with benchmarks/triton_resources.py (triton 3.8):
# (128, 128, 3, 8) spilled on sm_90 and sm_80 in every dtype, (32, 128, 4, 4) and (64, 128, 3, 4) on sm_90
# in fp32: they are gone. On sm_80 (128, 64) spills in fp16/bf16, and fp32's tf32x3 all but the smallest.
_GPU_CONFIGS = [
    _cfg(64, 32, 3, 4),
    _cfg(64, 64, 4, 4),
    _cfg(64, 128, 3, 8),
    _cfg(128, 64, 3, 8),
]
_SPILLS = {
    (8, 2): [_cfg(128, 64, 3, 8)],
    (8, 4): [_cfg(64, 64, 4, 4), _cfg(64, 128, 3, 8), _cfg(128, 64, 3, 8)],
}
_CONFIGS = pick_configs(_GPU_CONFIGS, _cfg(32, 64, 1, 4))


@triton.autotune(configs=_CONFIGS, key=["R", "ROWS_BUCKET", "SPLIT_PRODUCT"],
                 prune_configs_by={"early_config_prune": ConfigPruner(_shared_bytes, _SPILLS)})
@triton.jit
def _covariance_kernel(
    x_ptr, w_ptr, outer_ptr, sum_ptr, wsum_ptr,
    N, R, rows_per_split, ROWS_BUCKET,
    stride_xn, stride_xd, stride_w,
    DOT_DTYPE: tl.constexpr, SPLIT_PRODUCT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (group g, tile pair (ti, tj), N-split s) program; program_id(0) = g·num_t² + ti·num_t + tj.

    Writes split s's partial sums: outer[s] (G, R, R), sum[s] (G, R), wsum[s] (), all contiguous fp32.
    Offsets that multiply a stride are int64: they pass 2^31 for views of large tensors.
    """
    num_t = tl.cdiv(R, BLOCK_R)
    pid = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    g = pid // (num_t * num_t)
    ti = (pid // num_t) % num_t
    tj = pid % num_t
    if ti > tj:  # below the diagonal: the mirrored store of tile (tj, ti) writes it
        return

    ri = ti * BLOCK_R + tl.arange(0, BLOCK_R)
    rj = tj * BLOCK_R + tl.arange(0, BLOCK_R)
    ok_i = ri < R
    ok_j = rj < R
    col_i = (g * R + ri).to(tl.int64) * stride_xd
    col_j = (g * R + rj).to(tl.int64) * stride_xd
    n_start = split * rows_per_split
    n_end = min(n_start + rows_per_split, N)

    acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        ok_n = rows < n_end
        row_off = rows.to(tl.int64)[:, None] * stride_xn
        w = tl.load(w_ptr + rows.to(tl.int64) * stride_w, mask=ok_n, other=0.0).to(tl.float32)
        xi = tl.load(x_ptr + row_off + col_i[None, :], mask=ok_n[:, None] & ok_i[None, :], other=0.0)
        xj = tl.load(x_ptr + row_off + col_j[None, :], mask=ok_n[:, None] & ok_j[None, :], other=0.0)
        xw = xi.to(tl.float32) * w[:, None]
        s1 += tl.sum(xw, axis=0)
        s0 += w
        xj = xj.to(DOT_DTYPE)
        if SPLIT_PRODUCT:
            # w·x rounded to fp16/bf16 would lose ~3 digits, so it is split into hi + lo parts (22 bits
            # together in fp16, 16 in bf16) and both are multiplied (xj is exact in its own dtype). The
            # tile is first scaled so its largest |w·x| is _SPLIT_SCALE: fp16's range (6e-8 .. 65504)
            # would otherwise overflow w·x = 1e5 or flush w·x = 1e-8 to zero. Unscaled in fp32.
            peak = tl.max(tl.max(tl.abs(xw), axis=1), axis=0)
            scale = _SPLIT_SCALE / tl.maximum(peak, 1e-30)
            xs = xw * scale
            hi = xs.to(DOT_DTYPE)
            lo = (xs - hi.to(tl.float32)).to(DOT_DTYPE)
            part = tl.dot(tl.trans(hi), xj)
            part = tl.dot(tl.trans(lo), xj, part)
            acc += part / scale
        else:
            acc = tl.dot(tl.trans(xw.to(DOT_DTYPE)), xj, acc, input_precision=PRECISION)

    num_groups = tl.num_programs(0) // (num_t * num_t)
    block = outer_ptr + (split * num_groups + g) * R * R
    out_ij = ri.to(tl.int64)[:, None] * R + rj[None, :]
    tl.store(block + out_ij, acc, mask=ok_i[:, None] & ok_j[None, :])
    if ti != tj:
        out_ji = rj.to(tl.int64)[:, None] * R + ri[None, :]
        tl.store(block + out_ji, tl.trans(acc), mask=ok_j[:, None] & ok_i[None, :])
    else:
        tl.store(sum_ptr + (split * num_groups + g) * R + ri, s1, mask=ok_i)
        if (g == 0) & (ti == 0):
            tl.store(wsum_ptr + split, tl.sum(s0, axis=0))


def grid(groups: int, r: int, splits: int, block_r: int) -> tuple[int, int]:
    """The launch grid: (groups · tile pairs, N-splits); the large count on axis 0 (up to 2^31 - 1)."""
    return checked_grid((groups * triton.cdiv(r, block_r) ** 2, splits))


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

    x: (N, G*r) fp32/fp16/bf16, any strides; w: (N,) >= 0, fp32 (any float dtype is read as fp32); groups = G.
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
        ddt = dot_dtype(x.dtype)
        with on_device(x):
            _covariance_kernel[lambda meta: grid(groups, r, splits, meta["BLOCK_R"])](
                x, w, outer, s1, s0,
                n, r, rows_per_split, bucket(rows_per_split, 1 << 16),
                x.stride(0), x.stride(1), w.stride(0),
                DOT_DTYPE=ddt, SPLIT_PRODUCT=ddt != tl.float32, PRECISION=fp32_dot_precision(),
            )
    if splits == 1:
        return s0[0], s1[0], outer[0]
    return s0.sum(0), s1.sum(0), outer.sum(0)


weighted_covariance.register_fake(fake)
