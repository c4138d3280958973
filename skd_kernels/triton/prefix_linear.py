"""Triton prefix_linear: y = act(x[..., :k_in] @ weight[:k_out, :k_in]^T + bias[:k_out]).

A tiled GEMM that reads the leading (k_out, k_in) block of the full weight through its strides (the
weight is never copied or made contiguous), accumulates in fp32 and fuses bias + GELU (erf or tanh)
into the epilogue before the one cast back to x's dtype. Registered as the custom op
`skd_kernels::triton_prefix_linear` with a fake kernel (torch.compile) and the shared backward.

Equivalent to::

    y = F.gelu(F.linear(x[..., :k_in], weight[:k_out, :k_in], bias[:k_out]))  # activation="gelu"
"""

import math

import torch
import triton
import triton.language as tl

from ..ops.prefix_linear import fake, register_autograd
from ._utils import ConfigPruner, bucket, checked_grid, dot_dtype, fp32_dot_precision, on_device, pick_configs

# Autotune keys are the GEMM sizes rounded up to powers of two (at most this), so a new batch size or
# subnet width reuses the tuning of its bucket instead of tuning again.
_KEY_CAP = 1 << 14


def _cfg(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


def _shared_bytes(config: triton.Config, operand_bytes: int) -> int:
    """Shared memory estimate: each pipeline stage holds an x tile and a weight tile."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return config.num_stages * (bm + bn) * bk * operand_bytes


# Tiles that cover the shapes of ViT linears (M = batch*197 tokens, N and K 192..3072): big tiles for the
# compute-bound case ((128, 128, 64) for fp16/bf16; its 288 KB in fp32 is pruned, (128, 128, 32) serves
# fp32), narrow ones for small k_out/M where occupancy matters. Configs over the device's shared memory or
# that spill there are pruned before tuning. Measured with benchmarks/triton_resources.py (triton 3.8):
# (128, 256, 64, 3, 8), (256, 128, 64, 3, 8) and (128, 128, 32, 4, 4) spilled on sm_90 in every dtype and
# are gone; on sm_80 fp32's tf32x3 spills the two listed below.
_GPU_CONFIGS = [
    _cfg(128, 128, 64, 4, 8),
    _cfg(128, 128, 32, 4, 8),
    _cfg(128, 64, 32, 4, 4),
    _cfg(64, 128, 32, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(64, 64, 32, 3, 4),
    _cfg(64, 32, 32, 5, 2),
    _cfg(32, 64, 32, 5, 2),
]
_SPILLS = {(8, 4): [_cfg(128, 128, 32, 4, 8), _cfg(64, 64, 64, 4, 4)]}
_CONFIGS = pick_configs(_GPU_CONFIGS, _cfg(32, 32, 32, 1, 4))


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "ACTIVATION", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": ConfigPruner(_shared_bytes, _SPILLS)})
@triton.jit
def _prefix_linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET, N_BUCKET, K_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = act(x[M, :K] @ w[:N, :K]^T + b[:N]); one program per (BLOCK_M, BLOCK_N) output tile.

    *_BUCKET are the autotune key only. Offsets that multiply a stride are int64: they pass 2^31 for views.
    """
    # Grouped tile order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    # Rows/columns past M/N wrap around (always in bounds, so the K loop needs only the K mask);
    # the wrapped results are dropped by the masked store. int64: M * stride can pass 2^31.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = (k0 + offs_k).to(tl.int64)
        k_ok = k < K
        a = tl.load(x_rows + k[None, :] * stride_xk, mask=k_ok[None, :], other=0.0)
        b = tl.load(w_cols + k[:, None] * stride_wk, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols.to(tl.int64) * stride_b, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "gelu":
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 * (1 + tanh(u)) == sigmoid(2u), with u = sqrt(2/pi) * (z + 0.044715 z^3).
        acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


def grid(m: int, n: int, block_m: int, block_n: int) -> tuple[int]:
    """The launch grid: one program per output tile, all on axis 0 (up to 2^31 - 1 programs)."""
    return checked_grid((triton.cdiv(m, block_m) * triton.cdiv(n, block_n),))


@torch.library.custom_op("skd_kernels::triton_prefix_linear", mutates_args=())
def _prefix_linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k_in: int, k_out: int, activation: str
) -> torch.Tensor:
    # A view for any x whose leading dims can be flattened by strides; the row count is explicit because
    # reshape(-1, 0) is ambiguous for a zero-size x with k_in = 0.
    m = math.prod(x.shape[:-1])
    x2 = x.reshape(m, x.shape[-1])
    y = torch.empty((m, k_out), dtype=x.dtype, device=x.device)
    if m and k_out:  # k_in == 0 still launches: the epilogue gives act(bias) (or act(0))
        with on_device(x):
            _prefix_linear_kernel[lambda meta: grid(m, k_out, meta["BLOCK_M"], meta["BLOCK_N"])](
                x2, weight, bias if bias is not None else weight, y,
                m, k_out, k_in, bucket(m, _KEY_CAP), bucket(k_out, _KEY_CAP), bucket(k_in, _KEY_CAP),
                x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
                bias.stride(0) if bias is not None else 0, y.stride(0),
                HAS_BIAS=bias is not None, ACTIVATION=activation, DOT_DTYPE=dot_dtype(x.dtype),
                PRECISION=fp32_dot_precision(),
            )
    return y.reshape(*x.shape[:-1], k_out)


_prefix_linear_op.register_fake(fake)
register_autograd("skd_kernels::triton_prefix_linear", _prefix_linear_op)


def prefix_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k_in: int, k_out: int, activation: str
) -> torch.Tensor:
    """act(x[..., :k_in] @ weight[:k_out, :k_in]^T + bias[:k_out]) through the Triton GEMM.

    x: (..., I') with I' >= k_in, weight: (O, I), bias: (O,) or None, one dtype (fp32/fp16/bf16), any
    strides; 0 <= k_in <= I, 0 <= k_out <= O; activation "none" | "gelu" | "gelu_tanh".
    Returns (..., k_out) in x's dtype. Differentiable in x, weight and bias (the custom op's autograd).
    """
    return _prefix_linear_op(x, weight, bias, k_in, k_out, activation)
