"""Triton taylor_scores: token |Σ_c g·a| and channel Σ_b |Σ_t g·a| in one pass over act and grad.

One program per (sample b, block of tokens), all on grid axis 0, walks all channels: its token sums are complete, so it
stores their |·| directly; its per-channel partial sums over its tokens are atomically added into an
fp32 (B, C) scratch, whose |·| summed over b (one small torch reduction, B·C floats) is the channel
score. The fp32 atomics make the channel scores exact to rounding but not bitwise reproducible.

Equivalent to::

    p = grad.float() * act.float(); p.sum(-1).abs(), p.sum(1).abs().sum(0)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.taylor_scores import fake
from ._utils import checked_grid, on_device, pick_configs


def _cfg(bt: int, bc: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_T": bt, "BLOCK_C": bc}, num_warps=warps)


# Streaming kernel: wide channel blocks for coalesced loads, enough token rows to keep the atomics
# (one per channel per token block) a few percent of the traffic.
# No shared memory to speak of and no spills (compiled for sm_90: <= 4 KB and <= 128 registers).
_GPU_CONFIGS = [_cfg(16, 256, 4), _cfg(32, 128, 4), _cfg(32, 256, 8), _cfg(64, 128, 8), _cfg(64, 64, 4)]
_CONFIGS = pick_configs(_GPU_CONFIGS, _cfg(32, 128, 4))


@triton.autotune(configs=_CONFIGS, key=["T", "C"], reset_to_zero=["chan_ptr"])
@triton.jit
def _taylor_kernel(
    a_ptr, g_ptr, tok_ptr, chan_ptr,
    T, C,
    stride_ab, stride_at, stride_ac, stride_gb, stride_gt, stride_gc,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """tok[b, t] = |Σ_c a·g| for the program's tokens; chan[b, c] += Σ_t a·g over them (atomic).

    program_id(0) = b · cdiv(T, BLOCK_T) + token block. Offsets that multiply a stride are int64.
    """
    blocks = tl.cdiv(T, BLOCK_T)
    pid = tl.program_id(0)
    b = (pid // blocks).to(tl.int64)
    rows = (pid % blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok_t = rows < T
    a_rows = a_ptr + b * stride_ab + rows.to(tl.int64)[:, None] * stride_at
    g_rows = g_ptr + b * stride_gb + rows.to(tl.int64)[:, None] * stride_gt
    tok = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok_c = cols < C
        mask = ok_t[:, None] & ok_c[None, :]
        cols64 = cols.to(tl.int64)[None, :]
        a = tl.load(a_rows + cols64 * stride_ac, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_rows + cols64 * stride_gc, mask=mask, other=0.0).to(tl.float32)
        p = a * g
        tok += tl.sum(p, axis=1)
        # relaxed: nothing in this kernel reads the sums back; the torch reduction runs after it.
        tl.atomic_add(chan_ptr + b * C + cols, tl.sum(p, axis=0), mask=ok_c, sem="relaxed")
    tl.store(tok_ptr + b * T + rows, tl.abs(tok), mask=ok_t)


def grid(b: int, t: int, block_t: int) -> tuple[int]:
    """The launch grid: one program per (sample, token block), all on axis 0 (up to 2^31 - 1 programs)."""
    return checked_grid((b * triton.cdiv(t, block_t),))


@torch.library.custom_op("skd_kernels::triton_taylor_scores", mutates_args=())
def taylor_scores(act: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order Taylor scores, reading act and grad once (custom op skd_kernels::triton_taylor_scores).

    act, grad: (B, T, C) fp32/fp16/bf16, any strides.
    Returns token (B, T) fp32 = |Σ_c g·a| and channel (C,) fp32 = Σ_b |Σ_t g·a|.
    """
    b, t, c = act.shape
    # The kernel writes every token score; with C == 0 they are sums of nothing, zero.
    token = (torch.empty if c else torch.zeros)((b, t), dtype=torch.float32, device=act.device)
    per_sample = torch.zeros((b, c), dtype=torch.float32, device=act.device)  # atomics add into it
    if b and t and c:
        with on_device(act):
            _taylor_kernel[lambda meta: grid(b, t, meta["BLOCK_T"])](
                act, grad, token, per_sample,
                t, c,
                *act.stride(), *grad.stride(),
            )
    return token, torch.linalg.vector_norm(per_sample, ord=1, dim=0)


taylor_scores.register_fake(fake)
