"""Channel masks on an ElasticViT forward: the channel-dropout baselines' way to drop single dims.

`branch_taps` routes each active block's q, k, v and MLP hidden units through callbacks; `masked`
multiplies them by a step's masks. Masking a rank dim of q, k and v (or a hidden unit) by 0 equals
truncating it, so the masked full-width forward is the dropped subnetwork (at full cost).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..elastic import ElasticViT
from ..models import adapter_for

# on_qkv(block, q, k, v) -> (q, k, v), each (S, H, N, r); on_hidden(block, h (..., kept hidden)) -> h
QkvFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
HiddenFn = Callable[[int, torch.Tensor], torch.Tensor]


class _SDPATap(TorchFunctionMode):
    """Routes the q, k, v of each SDPA call through on_qkv; the i-th call is the i-th active attention block."""

    def __init__(self, blocks: list[int], on_qkv: QkvFn) -> None:
        super().__init__()
        self.blocks, self.on_qkv, self.calls = blocks, on_qkv, 0

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> object:
        if func is F.scaled_dot_product_attention:
            if self.calls >= len(self.blocks):
                raise RuntimeError(f"more attention calls than the {len(self.blocks)} active attention branches")
            args = (*self.on_qkv(self.blocks[self.calls], *args[:3]), *args[3:])
            self.calls += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def branch_taps(elastic: ElasticViT, on_qkv: QkvFn, on_hidden: HiddenFn) -> Iterator[None]:
    """For one ElasticViT forward inside the context, pass each block's q, k, v and MLP hidden units through
    the callbacks (e.g. to mask channels).

    on_qkv(b, q, k, v) gets block b's (S, H, N, r) tensors (r dims kept per head, in rank order) and
    returns the ones attention uses; on_hidden(b, h) likewise for the (..., h) post-activation hidden
    units: a forward hook on the MLP's `drop1`, which ElasticViT (and timm's Mlp) call right after the
    activation. ElasticViT runs attention as one `F.scaled_dot_product_attention` call per active
    block, in block order, which a torch-function mode intercepts. Skipped branches are not called.
    """
    blocks = adapter_for(elastic.model).blocks
    handles = [spec.mlp.drop1.register_forward_hook(lambda _m, _a, out, b=b: on_hidden(b, out))
               for b, spec in enumerate(blocks)]
    try:
        with _SDPATap([b for b, r in enumerate(elastic.subnet.attn) if r], on_qkv):
            yield
    finally:
        for h in handles:
            h.remove()


def masked(elastic: ElasticViT, masks: dict[tuple[int, str], torch.Tensor]) -> AbstractContextManager[None]:
    """Context: multiply block b's q, k, v rank dims by masks[b, "attn"] (r_b,) and its post-activation
    hidden units by masks[b, "mlp"] (h_b,) in every ElasticViT forward inside."""
    return branch_taps(elastic, lambda b, q, k, v: (q * masks[b, "attn"], k * masks[b, "attn"], v * masks[b, "attn"]),
                       lambda b, h: h * masks[b, "mlp"])
