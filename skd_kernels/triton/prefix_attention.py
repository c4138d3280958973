"""Triton prefix_attention: flash attention that reads q, k, v of each head straight from the rank-major
prefix layout and writes the output in the proj's rank-major columns (j·H + h).

One kernel serves both ops, as the CPU kernel does: three base pointers (q, k, v) with their own sequence
and token strides and one rank stride, so rank j of head h sits at column j·rank_stride + h of each —
the fused qkv (column j·3H + w·H + h) is rank stride 3H with k and v starting H and 2H columns in, and
separate q, k, v (skd_kernels/triton/prefix_attention_separate.py) are rank stride H.

One program per (sequence, head, query tile): it loads its q tile through the layout's strides, walks the
key tiles with an online softmax in fp32, and stores once. Registered as the custom op
`skd_kernels::triton_prefix_attention` with the op's fake kernel and shared backward.

Equivalent to::

    q, k, v = qkv.unflatten(-1, (r, 3, H)).permute(3, 0, 4, 1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale).permute(0, 2, 3, 1).flatten(2)
"""

import torch
import triton
import triton.language as tl

from ..ops.prefix_attention import fake, register_autograd
from ._utils import ConfigPruner, bucket, checked_grid, dot_dtype, fp32_dot_precision, on_device, pick_configs

# Autotune key: the sequence length rounded up to a power of two (at most this), so a new N reuses its bucket.
_KEY_CAP = 1 << 13


def _cfg(bm: int, bn: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=stages, num_warps=warps)


# The widest head tile (BLOCK_D, r rounded up to a power of two) the configs are sized for: head widths
# up to 128.
MAX_BLOCK_D = 128


def _shared_bytes(config: triton.Config, operand_bytes: int, BLOCK_D: int = MAX_BLOCK_D) -> int:
    """Shared memory estimate: the q tile plus, per pipeline stage, a k and a v tile, BLOCK_D columns each."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return (bm + 2 * config.num_stages * bn) * BLOCK_D * operand_bytes


# Query/key tiles for N = 49 (Swin windows) ... 4k tokens and head widths up to 128 (not timed on a GPU: none
# was lent; autotuning picks among them), pruned per launch by the shared memory at the launch's BLOCK_D.
# Not pruned for spills yet: compiled for sm_90 (benchmarks/triton_resources.py, triton 3.8), fp16/bf16 spill
# nothing at BLOCK_D <= 64 but the two largest tiles spill at 128, and fp32 (tf32x3 dots) spills in most
# configs (in all at 128); the estimate is also 1.05-1.75x low for fp32 and high for fp16/bf16 (no async
# copies: each head's ranks are strided gathers). benchmarks/RESULTS.md has the table. Tuning needs a GPU.
_GPU_CONFIGS = [_cfg(128, 64, 3, 8), _cfg(64, 64, 3, 4), _cfg(64, 32, 4, 4), _cfg(32, 32, 4, 4), _cfg(16, 32, 2, 2)]
_CONFIGS = pick_configs(_GPU_CONFIGS, _cfg(16, 16, 1, 4))


@triton.autotune(configs=_CONFIGS, key=["N_BUCKET", "BLOCK_D", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": ConfigPruner(_shared_bytes, {}, ("BLOCK_D",))})
@triton.jit
def _prefix_attention_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr,
    N, H, R, RANK_STRIDE, scale, N_BUCKET,
    stride_qs, stride_qn, stride_ks, stride_kn, stride_vs, stride_vn,
    stride_bs, stride_bh, stride_bi, stride_bj,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[s, i, j*H + h] = Σ_t softmax_t(q·k_t * scale + bias) v_t[j], rank j of head h read at column
    j*RANK_STRIDE + h of q, k and v; grid (S*H, cdiv(N, BLOCK_M))."""
    sh = tl.program_id(0)
    s = (sh // H).to(tl.int64)
    h = sh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < R
    m_ok = offs_m < N
    col = offs_d * RANK_STRIDE + h
    q = tl.load(q_ptr + s * stride_qs + offs_m.to(tl.int64)[:, None] * stride_qn + col[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_seq = k_ptr + s * stride_ks + col[None, :]
    v_seq = v_ptr + s * stride_vs + col[None, :]
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        rows = offs_n.to(tl.int64)[:, None]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_seq + rows * stride_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_seq + rows * stride_vn, mask=kv_mask, other=0.0)
        x = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale
        if HAS_BIAS:
            b_ptrs = (bias_ptr + s * stride_bs + h * stride_bh
                      + offs_m.to(tl.int64)[:, None] * stride_bi + offs_n[None, :] * stride_bj)
            x += tl.load(b_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        x = tl.where(n_ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        # Rows masked to -inf so far keep p = 0 (exp(-inf - -inf) would be NaN).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(x - shift[:, None])
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptrs = out_ptr + (s * N + offs_m.to(tl.int64))[:, None] * (R * H) + (offs_d * H + h)[None, :]
    tl.store(o_ptrs, out, mask=m_ok[:, None] & d_ok[None, :])


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: int, rank_stride: int, num_heads: int, scale: float,
    attn_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Runs the kernel: rank j of head h at column j*rank_stride + h of q, k and v (S, N, ≥ (r-1)*rank_stride
    + H columns each, any sequence and token strides, column stride 1; one dtype, fp32/fp16/bf16);
    attn_bias (S or 1, H or 1, N, N) or None. Returns (S, N, r*H) in q's dtype, column j*H + h."""
    s, n, _ = q.shape
    h = num_heads
    out = torch.empty((s, n, r * h), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    b = attn_bias
    # broadcast bias dims (size 1) are read with stride 0
    b_strides = (0, 0, 0, 0) if b is None else tuple(0 if b.shape[d] == 1 and d < 2 else b.stride(d) for d in range(4))

    def grid(meta: dict) -> tuple[int, int]:
        # (sequence, head) pairs on axis 0 (up to 2^31 - 1), query tiles on axis 1 (up to 65535)
        return checked_grid((s * h, triton.cdiv(n, meta["BLOCK_M"])))

    with on_device(q):
        _prefix_attention_kernel[grid](
            q, k, v, b if b is not None else q, out,
            n, h, r, rank_stride, scale, bucket(n, _KEY_CAP),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), *b_strides,
            HAS_BIAS=b is not None, DOT_DTYPE=dot_dtype(q.dtype), PRECISION=fp32_dot_precision(),
            BLOCK_D=max(16, triton.next_power_of_2(r)),
        )
    return out


@torch.library.custom_op("skd_kernels::triton_prefix_attention", mutates_args=())
def _prefix_attention_op(
    qkv: torch.Tensor, num_heads: int, scale: float, attn_bias: torch.Tensor | None
) -> torch.Tensor:
    h = num_heads
    r = qkv.shape[-1] // (3 * h)
    if qkv.stride(2) != 1:  # columns are addressed as offsets from the row start
        qkv = qkv.contiguous()
    # q, k and v start 0, H and 2H columns in (views, no copy); rank j is 3H columns further on
    return attend(qkv, qkv[..., h:], qkv[..., 2 * h:], r, 3 * h, h, scale, attn_bias)


_prefix_attention_op.register_fake(fake)
register_autograd("skd_kernels::triton_prefix_attention")


def prefix_attention(
    qkv: torch.Tensor, num_heads: int, scale: float, attn_bias: torch.Tensor | None
) -> torch.Tensor:
    """prefix_attention through the Triton flash kernel.

    qkv: (S, N, r·3·H) rank-major, any strides; attn_bias: (S or 1, H or 1, N, N) in qkv's dtype or None;
    fp32/fp16/bf16. Returns (S, N, r·H), column j·H + h, in qkv's dtype. Differentiable in qkv and attn_bias.
    """
    return _prefix_attention_op(qkv, num_heads, scale, attn_bias)
