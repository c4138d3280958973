"""skd_kernels: fused kernels for stratified ViTs — weighted covariance, Taylor scores, prefix GEMM and attention,
residual add + LayerNorm.

One module per op in skd_kernels/ops/. Every op dispatches CUDA ext → Triton → CPU ext → reference by
device, dtype and availability (the attention ops' CUDA backend is copies + torch's SDPA, faster there than
their Triton kernel); `available_backends(device)` lists the usable ones and `use_backend(name)`
forces one. Nothing here knows about models.
"""

from ._dispatch import BACKENDS, available_backends, forced_backend, use_backend
from ._ops import LOAD_ERROR as EXTENSION_LOAD_ERROR
from .ops.add_layer_norm import add_layer_norm
from .ops.prefix_attention import prefix_attention
from .ops.prefix_attention_separate import prefix_attention_separate
from .ops.prefix_linear import prefix_linear
from .ops.taylor_scores import taylor_scores
from .ops.weighted_covariance import CovState, weighted_covariance

__all__ = [
    "BACKENDS",
    "EXTENSION_LOAD_ERROR",
    "CovState",
    "add_layer_norm",
    "available_backends",
    "forced_backend",
    "prefix_attention",
    "prefix_attention_separate",
    "prefix_linear",
    "taylor_scores",
    "use_backend",
    "weighted_covariance",
]
