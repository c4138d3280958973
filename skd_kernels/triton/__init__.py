"""Triton kernels, one file per op family. They run on CUDA, or on CPU under TRITON_INTERPRET=1
(which must be set before this package is imported: Triton picks interpreter vs compiler at @jit time).
"""

try:
    import triton  # noqa: F401

    AVAILABLE = True
except ImportError:  # no Triton: the dispatcher skips this backend
    AVAILABLE = False

if AVAILABLE:
    from .covariance import weighted_covariance
    from .prefix_linear import prefix_linear
    from .taylor import taylor_scores

    __all__ = ["prefix_linear", "taylor_scores", "weighted_covariance"]
