"""ElasticViT: run any prefix-truncated subnetwork of a transformer in O(1), with no weight copy.

Rooms: `layout` (the rank-major weight layout and its permutations), `budget` (MACs, the uniform family,
MACs/latency budget selection), `plan` (a subnet's bound ops), `symbolic` (widths under torch.compile),
`capture` (a forward as a CUDA graph, for serving) and `module` (the nn.Module: widths, forward, extract).
"""

from .budget import Budgets, LatencyTable
from .capture import CapturedForward
from .layout import LAYOUT_VERSION, RankMajorLayout, qkv_permutation, rank_major_permutation
from .module import ElasticViT, Masks

Elastic = ElasticViT  # family-neutral alias: the same class serves every adapter family

__all__ = ["LAYOUT_VERSION", "Budgets", "CapturedForward", "Elastic", "ElasticViT", "LatencyTable", "Masks",
           "RankMajorLayout", "qkv_permutation", "rank_major_permutation"]
