"""Independent oracle for elastic execution tests: a copy of the bare timm model with the dropped
q/k/v rows and proj/fc2 columns zeroed, run through timm's own forward (full head's scale kept).

A width-0 branch is "skipped" in skd; here it is zeroed including its output bias, so it adds 0 too.
Relies on act(0) == 0 (true for GELU variants), so zeroed fc1 rows contribute nothing.
"""

from __future__ import annotations

import copy
import random

import torch
from torch import nn

from skd import Subnet
from skd.models import adapter_for


def compiled_counting(module: nn.Module, backend: str = "eager", **kwargs: object) -> tuple[nn.Module, object]:
    """(torch.compile(module, **kwargs), its counter): the backend ("eager", or "aot_eager" to trace the
    backward too) behind a counter of the graphs it is given (`counter.frame_count`); earlier tests' graphs are
    forgotten first, so they are neither reused nor counted."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    return torch.compile(module, backend=counter, **kwargs), counter


def masked_copy(bare: nn.Module, subnet: Subnet) -> nn.Module:
    """A deep copy of the head-major timm model `bare` with everything outside `subnet` zeroed."""
    m = copy.deepcopy(bare)
    with torch.no_grad():
        for spec, r, h in zip(adapter_for(m).blocks, subnet.attn, subnet.mlp, strict=True):
            heads, hd = spec.num_heads, spec.head_dim
            spec.qkv.weight.view(3, heads, hd, -1)[:, :, r:] = 0
            if spec.qkv.bias is not None:
                spec.qkv.bias.view(3, heads, hd)[:, :, r:] = 0
            spec.proj.weight.view(-1, heads, hd)[:, :, r:] = 0
            if r == 0 and spec.proj.bias is not None:
                spec.proj.bias.zero_()
            spec.fc1.weight[h:] = 0
            if spec.fc1.bias is not None:
                spec.fc1.bias[h:] = 0
            spec.fc2.weight[:, h:] = 0
            if h == 0 and spec.fc2.bias is not None:
                spec.fc2.bias.zero_()
    return m


def kept_masks(bare: nn.Module, subnet: Subnet) -> dict[str, torch.Tensor]:
    """Per parameter name of qkv/proj/fc1/fc2 weights and biases: bool mask of the entries `subnet` uses
    (head-major layout); the mask of a width-0 branch's output bias is all False."""
    names = {id(p): n for n, p in bare.named_parameters()}
    masks = {}
    for spec, r, h in zip(adapter_for(bare).blocks, subnet.attn, subnet.mlp, strict=True):
        heads, hd = spec.num_heads, spec.head_dim
        qkv_rows = torch.zeros(3, heads, hd, dtype=torch.bool)
        qkv_rows[:, :, :r] = True
        qkv_rows = qkv_rows.reshape(-1)
        proj_cols = torch.zeros(heads, hd, dtype=torch.bool)
        proj_cols[:, :r] = True
        proj_cols = proj_cols.reshape(-1)
        hidden = torch.arange(spec.hidden) < h
        for lin, rows, cols, width in (
            (spec.qkv, qkv_rows, None, r), (spec.proj, None, proj_cols, r),
            (spec.fc1, hidden, None, h), (spec.fc2, None, hidden, h),
        ):
            out_f, in_f = lin.weight.shape
            row_mask = torch.ones(out_f, dtype=torch.bool) if rows is None else rows
            col_mask = torch.ones(in_f, dtype=torch.bool) if cols is None else cols
            masks[names[id(lin.weight)]] = row_mask[:, None] & col_mask[None, :]
            if lin.bias is not None:
                masks[names[id(lin.bias)]] = row_mask & (width > 0)
    return masks


def random_subnets(head_dims: tuple[int, ...], hiddens: tuple[int, ...], n: int, seed: int = 0) -> list[Subnet]:
    """n random subnets with per-block different widths, always including 0 and full somewhere."""
    rng = random.Random(seed)

    def width(full: int) -> int:
        return rng.choice([0, 1, full - 1, full, rng.randint(0, full)])

    out = [Subnet(attn=[0] * len(head_dims), mlp=list(hiddens)), Subnet(attn=list(head_dims), mlp=[0] * len(hiddens))]
    out += [Subnet(attn=[width(d) for d in head_dims], mlp=[width(h) for h in hiddens]) for _ in range(n - 2)]
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def frozen_forward(elastic: nn.Module, subnet: Subnet, *args: object, **kwargs: object) -> object:
    """What `ElasticViT.capture(..., subnet=subnet, frozen=True)` records, run eagerly (CUDA graphs are GPU-only):
    the forward through a frozen plan, built now (its attention weight copies made now)."""
    from skd.elastic.plan import Plan

    return elastic._run(Plan(elastic.adapter.blocks, subnet, bound=True, frozen=True), None, *args, **kwargs)
