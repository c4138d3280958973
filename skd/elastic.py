"""ElasticViT: run any prefix-truncated subnetwork of a timm ViT/DeiT/Swin in O(1), with no weight copy.

Layout (LAYOUT_VERSION 1, "rank-major"). At wrap time each block's qkv rows and proj columns are
permuted once, in place, so that "keep the first r dims of every head, for q, k and v" is one prefix:

    qkv row  = rank * (3*H) + which * H + head     (which: 0 q, 1 k, 2 v)
    proj col = rank * H + head

so the subnetwork's qkv is `prefix_linear(x, Wqkv, k_out=3*H*r)` and its proj is
`prefix_linear(o, Wproj, k_in=H*r)`. MLP hidden units are already a prefix of fc1 rows / fc2 columns.
Attention always uses the full head's softmax scale hd^-1/2, whatever r is.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from timm.layers import GELU as TimmGELU
from timm.layers import GELUTanh, Mlp
from torch import nn

import skd_kernels

from ._checks import check_fraction, check_int, check_positive
from .errors import UnsupportedModelError
from .models import BlockSpec, adapter_for
from .subnet import DropoutList, Subnet
from .timing import time_ms

LAYOUT_VERSION = 1


def qkv_permutation(num_heads: int, head_dim: int) -> torch.Tensor:
    """(3*H*hd,) int64: rank-major row n holds head-major row perm[n] of timm's qkv weight."""
    head_major = torch.arange(3 * num_heads * head_dim).view(3, num_heads, head_dim)  # [which, head, rank]
    return head_major.permute(2, 0, 1).reshape(-1)  # enumerate in (rank, which, head) order


def proj_permutation(num_heads: int, head_dim: int) -> torch.Tensor:
    """(H*hd,) int64: rank-major proj column n holds head-major column perm[n]."""
    return torch.arange(num_heads * head_dim).view(num_heads, head_dim).t().reshape(-1)


def _fused_activation(act: nn.Module) -> str | None:
    """prefix_linear's fused name for an activation module, or None when it must run separately."""
    if (type(act) is nn.GELU and act.approximate == "none") or type(act) is TimmGELU:
        return "gelu"
    if (type(act) is nn.GELU and act.approximate == "tanh") or type(act) is GELUTanh:
        return "gelu_tanh"
    return None


def _permute_rows_(p: torch.Tensor, perm: torch.Tensor, dim: int) -> None:
    """p <- p.index_select(dim, perm) in place (storage and data_ptr kept), its .grad likewise."""
    for t in (p.data, p.grad):
        if t is not None:
            t.copy_(t.index_select(dim, perm.to(t.device)))


class ElasticViT(nn.Module):
    """A timm ViT/DeiT/Swin whose every prefix-truncated subnetwork runs in O(1) without weight copies.

    The wrapped model is re-laid in place (see module docstring) and is this module's only child, so
    parameters, `.to()`, `.train()` and `state_dict()` are the model's own. `self.model`'s own forward is
    only valid inside `standard_layout()`. Raises UnsupportedModelError for models that cannot be
    prefix-truncated (qk_norm, scale_norm, gated attention, unknown architectures).
    """

    def __init__(self, model: nn.Module, dropout_list: DropoutList | None = None) -> None:
        super().__init__()
        adapter = adapter_for(model)
        reasons = [r for spec in adapter.blocks for r in spec.blocking]
        if reasons:
            raise UnsupportedModelError("; ".join(reasons))
        if getattr(model, "_skd_wrapped", False):
            raise ValueError("model is already wrapped by an ElasticViT (its weights are re-laid in place)")
        self.model = model
        self._adapter = adapter
        self._perms = [(qkv_permutation(s.num_heads, s.head_dim), proj_permutation(s.num_heads, s.head_dim))
                       for s in adapter.blocks]
        self._acts = [_fused_activation(s.act) for s in adapter.blocks]
        self.head_dims = tuple(s.head_dim for s in adapter.blocks)
        self.hiddens = tuple(s.hidden for s in adapter.blocks)
        # MACs are linear in the widths: other + sum_b attn_coef[b]*r_b + mlp_coef[b]*h_b.
        self._other_macs = adapter.other_macs()
        self._attn_coef = [self._attn_macs_per_dim(s) for s in adapter.blocks]
        self._mlp_coef = [s.tokens * s.sequences * (s.fc1.in_features + s.fc2.out_features) for s in adapter.blocks]
        # Every distinct uniform subnet is reached at one of these fractions (widths are floor(t*n)).
        self._uniform_points = sorted({i / n for n in (*self.head_dims, *self.hiddens) for i in range(n + 1)})
        self._full = Subnet(attn=self.head_dims, mlp=self.hiddens)
        self._empty = Subnet(attn=[0] * len(self.head_dims), mlp=[0] * len(self.hiddens))
        self._subnet = self._full
        self._dropout_list: DropoutList | None = None
        self.dropout_list = dropout_list
        self._latency_table: list[tuple[int, float]] | None = None
        self._standard = False
        self._relayout(to_standard=False)
        model._skd_wrapped = True
        self._guard = model.register_forward_pre_hook(self._refuse_bare_forward)

    # ----------------------------------------------------------------------------------------- layout
    def _relayout(self, to_standard: bool) -> None:
        with torch.no_grad():
            for spec, (pq, pp) in zip(self._adapter.blocks, self._perms, strict=True):
                if to_standard:
                    pq, pp = pq.argsort(), pp.argsort()
                for p in (spec.qkv.weight, spec.qkv.bias):
                    if p is not None:
                        _permute_rows_(p, pq, 0)
                _permute_rows_(spec.proj.weight, pp, 1)

    def _refuse_bare_forward(self, module: nn.Module, args: tuple) -> None:
        if not self._standard:
            raise RuntimeError("this model is wrapped by an ElasticViT and its weights are in skd's rank-major "
                               "layout: call the ElasticViT, or use `with elastic.standard_layout():`")

    @contextlib.contextmanager
    def standard_layout(self) -> Iterator[nn.Module]:
        """Temporarily restore timm's head-major layout in place; yields `self.model`, valid inside only.

        On exit the weights (as modified inside, e.g. by WPAC) are re-laid rank-major. Gradients are
        permuted along; optimizer state is not, so do not step an optimizer across the boundary.
        """
        if self._standard:
            raise RuntimeError("already inside standard_layout()")
        self._relayout(to_standard=True)
        self._standard = True
        try:
            yield self.model
        finally:
            self._relayout(to_standard=False)
            self._standard = False

    # ---------------------------------------------------------------------------------------- widths
    @property
    def subnet(self) -> Subnet:
        """The active subnetwork (set by `set_subnet`; full width after wrapping)."""
        return self._subnet

    @property
    def dropout_list(self) -> DropoutList | None:
        """The PIAD dropout list that macs=/index= budgets follow; None: uniform widths."""
        return self._dropout_list

    @dropout_list.setter
    def dropout_list(self, value: DropoutList | None) -> None:
        if value is not None:
            if not isinstance(value, DropoutList):
                raise ValueError(f"dropout_list must be a DropoutList or None, got {type(value).__name__}")
            if value.head_dims != self.head_dims or value.hiddens != self.hiddens:
                raise ValueError(f"dropout_list was built for head_dims={value.head_dims}, hiddens={value.hiddens}; "
                                 f"this model has {self.head_dims}, {self.hiddens}")
        self._dropout_list = value

    def _checked(self, subnet: Subnet | None) -> Subnet:
        if subnet is None:
            return self._subnet
        if not isinstance(subnet, Subnet):
            raise ValueError(f"subnet must be a skd.Subnet, got {type(subnet).__name__}")
        subnet.validate(self.head_dims, self.hiddens)
        return subnet

    def uniform(self, keep: float) -> Subnet:
        """The subnet keeping floor(keep * n) dims of every module (every head, every MLP)."""
        keep = check_fraction("keep", keep)
        # +1e-9: i/n * n must floor to i despite float rounding.
        return Subnet(attn=[math.floor(keep * n + 1e-9) for n in self.head_dims],
                      mlp=[math.floor(keep * n + 1e-9) for n in self.hiddens])

    def _family(self) -> tuple[int, Callable[[int], Subnet]]:
        """(count, j -> j-th subnet), largest first: the dropout list's prefixes, else the uniform subnets.

        Built lazily so a budget lookup costs O(log count) subnets, not the whole family.
        """
        dl = self._dropout_list
        if dl is not None:
            return len(dl) + 1, dl.subnet
        points = self._uniform_points  # ascending, points[0] == 0
        return len(points), lambda j: self._empty if j == len(points) - 1 else self.uniform(points[-1 - j])

    def _largest_under(self, cost: Callable[[Subnet], float], limit: float, name: str, value: float) -> Subnet:
        """The largest subnet of the family with cost(subnet) <= limit (cost is non-increasing along it)."""
        count, nth = self._family()
        lo, hi = 0, count  # bisect the first candidate within the limit
        while lo < hi:
            mid = (lo + hi) // 2
            if cost(nth(mid)) <= limit:
                hi = mid
            else:
                lo = mid + 1
        if lo == count:
            raise ValueError(f"{name}={value} is below the smallest reachable subnetwork "
                             f"({cost(nth(count - 1)):.4g} vs limit {limit:.4g})")
        return nth(lo)

    def set_subnet(
        self,
        subnet: Subnet | None = None,
        *,
        keep: float | None = None,
        macs: float | None = None,
        index: int | None = None,
        latency_ms: float | None = None,
    ) -> ElasticViT:
        """Choose the active subnetwork by exactly one of:

        subnet: explicit per-block widths; keep: the same fraction of every module (floor(keep*n));
        macs: the largest subnet with MACs/image <= macs * full (along the dropout list if any, else
        uniform); index: the dropout list's first `index` units dropped; latency_ms: the largest subnet
        predicted under that latency by the table `profile_latency` measured. Returns self.
        No weight is copied or allocated.
        """
        given = {k: v for k, v in dict(subnet=subnet, keep=keep, macs=macs, index=index,
                                        latency_ms=latency_ms).items() if v is not None}
        if len(given) != 1:
            raise ValueError(f"set_subnet takes exactly one of subnet=, keep=, macs=, index=, latency_ms=; "
                             f"got {sorted(given) or 'none'}")
        if subnet is not None:
            self._subnet = self._checked(subnet)
        elif keep is not None:
            self._subnet = self.uniform(keep)
        elif macs is not None:
            f = check_fraction("macs", macs)
            self._subnet = self._largest_under(self.macs, f * self.full_macs, "macs", f)
        elif index is not None:
            if self._dropout_list is None:
                raise ValueError("index= needs a dropout list (elastic.dropout_list is None)")
            self._subnet = self._dropout_list.subnet(index)
        else:
            self._subnet = self._by_latency(latency_ms)
        return self

    # ------------------------------------------------------------------------------------------ MACs
    @staticmethod
    def _attn_macs_per_dim(s: BlockSpec) -> int:
        # Per kept dim of every head: its q, k, v rows and proj column over all rows (tokens*sequences),
        # plus one dim of the scores q k^T and of attn @ v in each sequence.
        rows = s.tokens * s.sequences
        return s.num_heads * (rows * (3 * s.qkv.in_features + s.proj.out_features) + 2 * s.sequences * s.tokens ** 2)

    def macs(self, subnet: Subnet | None = None) -> int:
        """Multiply-accumulates per image of `subnet` (default: the active one), counted analytically.

        Counts every Linear (and patch-embedding conv) incl. the head, attention scores and attn @ v
        (per window for Swin); norms, softmax and activations are not MACs.
        """
        s = self._checked(subnet)
        return self._other_macs + sum(a * r for a, r in zip(self._attn_coef, s.attn, strict=True)) + sum(
            m * h for m, h in zip(self._mlp_coef, s.mlp, strict=True))

    @property
    def full_macs(self) -> int:
        """Multiply-accumulates per image of the full-width model."""
        return self.macs(self._full)

    # --------------------------------------------------------------------------------------- latency
    def profile_latency(
        self, example_input: torch.Tensor, points: int = 9, repeats: int = 5
    ) -> list[tuple[int, float]]:
        """Measure forward latency (ms, median of `repeats`, no grad) at `points` subnets spread over MACs.

        example_input: (B, C, H, W) on the model's device. The table (MACs, ms) is cached and used by
        set_subnet(latency_ms=...); the active subnet is restored afterwards.
        """
        check_int("points", points, 2)
        check_int("repeats", repeats, 1)
        active, table = self._subnet, []
        try:
            with torch.no_grad():
                count, nth = self._family()
                lowest, full = self.macs(nth(count - 1)), self.full_macs
                for j in range(points):  # MACs evenly spaced from the smallest subnet (j = 0) to full
                    target = lowest + j / (points - 1) * (full - lowest)
                    self._subnet = self._largest_under(self.macs, target, "macs", target / full)
                    table.append((self.macs(), time_ms(lambda: self(example_input), repeats, example_input.device)))
        finally:
            self._subnet = active
        table.sort()
        # Kept monotonised: measurement noise must not make a bigger subnet look faster.
        running, self._latency_table = 0.0, []
        for m, ms in table:
            running = max(running, ms)
            self._latency_table.append((m, running))
        return table

    def _predict_ms(self, subnet: Subnet) -> float:
        """Latency predicted by linear interpolation in MACs over the (monotonised) profile table."""
        xs, mono = zip(*self._latency_table, strict=True)
        m = self.macs(subnet)
        k = bisect.bisect_left(xs, m)
        if k == 0:
            return mono[0] * m / xs[0] if xs[0] else mono[0]
        if k == len(xs):
            return mono[-1] * m / xs[-1]
        w = (m - xs[k - 1]) / (xs[k] - xs[k - 1])
        return mono[k - 1] + w * (mono[k] - mono[k - 1])

    def _by_latency(self, latency_ms: float) -> Subnet:
        check_positive("latency_ms", latency_ms)
        if not self._latency_table:
            raise ValueError("latency_ms= needs a latency table: call elastic.profile_latency(example_input) first")
        return self._largest_under(self._predict_ms, latency_ms, "latency_ms", latency_ms)

    # --------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) images -> the model's output (logits (B, classes)) at the active subnet."""
        if self._standard:
            raise RuntimeError("ElasticViT cannot run inside standard_layout(); use elastic.model there")
        return self._adapter.forward(x, self._subnet, self._attention, self._mlp)

    def _attention(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x: (S, N, C) -> (S, N, C_out) through the first r dims of every head; bias: (S|1, H, N, N)."""
        spec, r = self._adapter.blocks[i], self._subnet.attn[i]
        h = spec.num_heads
        s, n, _ = x.shape
        qkv = skd_kernels.prefix_linear(x, spec.qkv.weight, spec.qkv.bias, k_out=3 * h * r)  # (S, N, r*3*H)
        # One activation copy: each token's (r, 3H) block transposed to (3H, r), i.e. timm's head-major
        # order. SDPA needs each head's dims contiguous for its fast CPU path (DESIGN trap), and a per-token
        # transpose is cache-local (2.5x cheaper on ViT-B than gathering straight into (3, S, H, N, r)).
        qkv = qkv.view(s * n, r, 3 * h).transpose(1, 2).contiguous()
        q, k, v = qkv.view(s, n, 3, h, r).permute(2, 0, 3, 1, 4).unbind(0)  # each (S, H, N, r) views
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=spec.attn.attn_drop.p if self.training else 0.0, scale=spec.scale)
        o = o.permute(0, 2, 3, 1).reshape(s, n, r * h)  # (S, N, r, H): rank-major proj columns
        return spec.attn.proj_drop(skd_kernels.prefix_linear(o, spec.proj.weight, spec.proj.bias, k_in=h * r))

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """x: (..., C) -> (..., C) through the first h hidden units."""
        spec, h, act = self._adapter.blocks[i], self._subnet.mlp[i], self._acts[i]
        y = skd_kernels.prefix_linear(x, spec.fc1.weight, spec.fc1.bias, k_out=h, activation=act)
        if act is None:
            y = spec.act(y)
        y = spec.mlp.drop1(y)  # timm Mlp: act, drop1, norm (Identity, checked at wrap), fc2, drop2
        return spec.mlp.drop2(skd_kernels.prefix_linear(y, spec.fc2.weight, spec.fc2.bias, k_in=h))

    # --------------------------------------------------------------------------------------- extract
    def extract(self, subnet: Subnet | None = None) -> nn.Module:
        """A standalone, physically smaller copy of the model at `subnet` (default: the active one).

        Built from timm modules only: each block gets a timm attention with `r` dims per head (q rows
        scaled by sqrt(r/hd) so timm's default 1/sqrt(r) softmax scale equals the full head's) and a
        timm Mlp with `h` hidden units. timm cannot build 0-width modules, so a skipped branch becomes a
        width-1 module with all-zero weights and biases (its output is exactly 0, as when skipped).
        """
        subnet = self._checked(subnet)
        self._guard.remove()  # the copy must not carry the wrapped-model guard
        try:
            out = copy.deepcopy(self.model)
        finally:
            self._guard = self.model.register_forward_pre_hook(self._refuse_bare_forward)
        del out._skd_wrapped
        with torch.no_grad():
            for i, (spec, r, h) in enumerate(zip(self._adapter.blocks, subnet.attn, subnet.mlp, strict=True)):
                block = out.get_submodule(spec.name)
                # fresh modules start in train mode; follow the copied block's (dropout would differ)
                block.attn = self._extract_attention(i, spec, r).train(block.training)
                block.mlp = self._extract_mlp(spec, h).train(block.training)
        # Plain data (no skd type) so the model still pickles and runs without skd; skd.save reads it
        # to record how to rebuild this shape.
        out.skd_subnet = subnet.to_dict()
        return out

    def _extract_attention(self, i: int, spec: BlockSpec, r: int) -> nn.Module:
        attn = self._adapter.new_attention(i, max(r, 1))
        if r == 0:
            for p in (*attn.qkv.parameters(), *attn.proj.parameters()):
                p.zero_()
            return attn
        h, d = spec.num_heads, spec.qkv.in_features
        # rank-major (r, 3, H) rows -> timm's head-major (3, H, r)
        attn.qkv.weight.copy_(spec.qkv.weight[: 3 * h * r].view(r, 3, h, d).permute(1, 2, 0, 3).reshape(-1, d))
        if spec.qkv.bias is not None:
            attn.qkv.bias.copy_(spec.qkv.bias[: 3 * h * r].view(r, 3, h).permute(1, 2, 0).reshape(-1))
        # timm's SDPA uses 1/sqrt(r); fold sqrt(r/hd) into q so scores keep the full head's 1/sqrt(hd).
        q_factor = math.sqrt(r / spec.head_dim)
        attn.qkv.weight[: h * r] *= q_factor
        if spec.qkv.bias is not None:
            attn.qkv.bias[: h * r] *= q_factor
        out_dim = spec.proj.out_features
        attn.proj.weight.copy_(spec.proj.weight[:, : h * r].view(out_dim, r, h).permute(0, 2, 1).reshape(out_dim, -1))
        if spec.proj.bias is not None:
            attn.proj.bias.copy_(spec.proj.bias)
        return attn

    @staticmethod
    def _extract_mlp(spec: BlockSpec, h: int) -> nn.Module:
        old, w = spec.mlp, spec.fc1.weight
        mlp = Mlp(spec.fc1.in_features, hidden_features=max(h, 1), out_features=spec.fc2.out_features,
                  bias=(spec.fc1.bias is not None, spec.fc2.bias is not None),
                  drop=(old.drop1.p, old.drop2.p), device=w.device, dtype=w.dtype)
        mlp.act = copy.deepcopy(spec.act)  # keeps e.g. nn.GELU(approximate="tanh") exactly
        if h == 0:
            for p in mlp.fc2.parameters():
                p.zero_()
            return mlp
        mlp.fc1.weight.copy_(spec.fc1.weight[:h])
        if spec.fc1.bias is not None:
            mlp.fc1.bias.copy_(spec.fc1.bias[:h])
        mlp.fc2.weight.copy_(spec.fc2.weight[:, :h])
        if spec.fc2.bias is not None:
            mlp.fc2.bias.copy_(spec.fc2.bias)
        return mlp
