"""Triton kernels, one file per op (named like the op), each registered as a torch.library custom op.

They run on CUDA, or on CPU under TRITON_INTERPRET=1
(which must be set before this package is imported: Triton picks interpreter vs compiler at @jit time).
"""

try:
    import triton  # noqa: F401

    AVAILABLE = True
except ImportError:  # no Triton: the dispatcher skips this backend
    AVAILABLE = False

if AVAILABLE:
    from .prefix_attention import prefix_attention
    from .prefix_attention_separate import prefix_attention_separate
    from .prefix_linear import prefix_linear
    from .taylor_scores import taylor_scores
    from .weighted_covariance import weighted_covariance

    __all__ = ["prefix_attention", "prefix_attention_separate", "prefix_linear", "taylor_scores", "weighted_covariance"]
