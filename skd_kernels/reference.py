"""Plain-PyTorch reference of every skd_kernels op: the oracle for tests and the last fallback.

Each function computes one batch's contribution exactly as the op's contract in skd_kernels/ops/<op>.py
states (where it is defined, beside the op); accumulation is fp32 (inputs of lower precision are upcast
first), float64 for float64 input.
"""

from ._common import accumulation_dtype
from .ops.add_layer_norm import reference as add_layer_norm
from .ops.prefix_attention import reference as prefix_attention
from .ops.prefix_attention_separate import reference as prefix_attention_separate
from .ops.prefix_linear import ACTIVATIONS
from .ops.prefix_linear import reference as prefix_linear
from .ops.taylor_scores import reference as taylor_scores
from .ops.weighted_covariance import reference as weighted_covariance

__all__ = [
    "ACTIVATIONS", "accumulation_dtype", "add_layer_norm", "prefix_attention", "prefix_attention_separate",
    "prefix_linear", "taylor_scores", "weighted_covariance",
]
