"""ElasticViT: the module that runs any prefix-truncated subnetwork of a wrapped model in O(1)."""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import skd_kernels
from skd_kernels import _dispatch
from skd_kernels.ops import prefix_attention as prefix_attention_op
from skd_kernels.ops import prefix_attention_separate as separate_op

from .. import batches, score_fit
from .._checks import check_fraction, check_int, check_positive
from ..compensation import fold
from ..errors import UnsupportedModelError
from ..models import ModelAdapter, adapter_for
from ..models.inert import through
from ..subnet import DropoutList, Subnet
from ..timing import time_ms
from .budget import Budgets, LatencyTable, multiple_of_for
from .capture import CapturedForward
from .layout import RankMajorLayout, store_columns_
from .plan import Plan
from .symbolic import symbolic_widths

# {(block, "attn"): (r_b,), (block, "mlp"): (h_b,)} multiplicative masks on the kept dims
Masks = dict[tuple[int, str], torch.Tensor]
# forward plans kept (skd/elastic/plan.py): a few budgets in turn stay cached; PIAD's random subnets do not pile up
PLAN_CACHE_SIZE = 16


class ElasticViT(nn.Module):
    """A transformer (any family with a `skd.models` adapter: timm ViT/DeiT/Swin, HF BERT/ViT, ...) whose
    every prefix-truncated subnetwork runs in O(1) without weight copies.

    The wrapped model is re-laid in place (skd/elastic/layout.py) and is this module's only child, so
    parameters, `.to()`, `.train()` and `state_dict()` are the model's own. `self.model`'s own forward is
    only valid inside `standard_layout()`. `adapter` (the model's `ModelAdapter`, built once) and
    `in_standard_layout` are public. Raises UnsupportedModelError for models that cannot be
    prefix-truncated (qk_norm, scale_norm, gated attention, unknown architectures).
    `torch.compile(elastic)` traces the widths as symbols: one graph serves every subnet set by
    `set_subnet` that skips the same branches (width 0) (skd/elastic/symbolic.py).
    multiple_of: the granularity of the widths `set_subnet(keep=, macs=, latency_ms=)` choose (see the
    `multiple_of` property); None: 8 where every head dim and hidden size is a multiple of 8 and every
    head dim is >= 64, else 1 (floor-uniform widths).
    """

    def __init__(self, model: nn.Module, dropout_list: DropoutList | None = None,
                 multiple_of: int | None = None) -> None:
        super().__init__()
        adapter = adapter_for(model)
        reasons = [r for spec in adapter.blocks for r in spec.blocking]
        if reasons:
            raise UnsupportedModelError("; ".join(reasons))
        if getattr(model, "_skd_wrapped", False):
            raise ValueError("model is already wrapped by an ElasticViT (its weights are re-laid in place)")
        self.model = model
        self.adapter: ModelAdapter = adapter
        self._layout = RankMajorLayout(adapter.blocks)
        self._budgets = Budgets(adapter.blocks, adapter.other_macs(), multiple_of)
        self.head_dims = self._budgets.head_dims
        self.hiddens = self._budgets.hiddens
        self._activate(self._budgets.full)
        self._dropout_list: DropoutList | None = None
        self.dropout_list = dropout_list
        self._latency: LatencyTable | None = None
        self._plans: dict[tuple[Subnet, str | None, bool], Plan] = {}
        self._standard = False
        self._layout.apply(adapter.blocks, to_standard=False)
        model._skd_wrapped = True
        self._hooks = self._register_hooks()

    def __getstate__(self) -> dict[str, Any]:
        # Plans hold closures over this instance's weights: a copy or an unpickled module builds its own.
        return {**super().__getstate__(), "_plans": {}}

    # ----------------------------------------------------------------------------------------- layout
    @property
    def in_standard_layout(self) -> bool:
        """True inside `standard_layout()`: the weights are the model's own head-major layout right now."""
        return self._standard

    def _register_hooks(self) -> tuple[Any, ...]:
        """The wrapped model's hooks (removed while `extract` copies the model): the bare-forward guard, and
        the storage order restored after `load_state_dict(..., assign=True)` put new (row-major) tensors in."""
        return (self.model.register_forward_pre_hook(self._refuse_bare_forward),
                self.model.register_load_state_dict_post_hook(self._after_load))

    def _after_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        store_columns_(self.adapter.blocks, column_major=not self._standard)

    def _refuse_bare_forward(self, module: nn.Module, args: tuple) -> None:
        if not self._standard:
            raise RuntimeError("this model is wrapped by an ElasticViT and its weights are in skd's rank-major "
                               "layout: call the ElasticViT, or use `with elastic.standard_layout():`")

    @contextlib.contextmanager
    def standard_layout(self) -> Iterator[nn.Module]:
        """Temporarily restore the model's own head-major layout in place; yields `self.model`, valid inside only.

        On exit the weights (as modified inside, e.g. by WPAC) are re-laid rank-major. Gradients are
        permuted along; optimizer state is not, so do not step an optimizer across the boundary.
        """
        if self._standard:
            raise RuntimeError("already inside standard_layout()")
        self._layout.apply(self.adapter.blocks, to_standard=True)
        self._standard = True
        try:
            yield self.model
        finally:
            self._layout.apply(self.adapter.blocks, to_standard=False)
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

    @property
    def multiple_of(self) -> int:
        """The granularity g of the widths that `set_subnet(keep=, macs=, latency_ms=)` and `uniform`
        choose: multiples of g, a module's full width, or 0. g = 1: floor(t*n) of every module, the uniform
        subnets. g > 1: each head keeps the allowed width nearest its share, the MLPs (finer steps) take the
        rest of the budget (skd/elastic/budget.py); on GPU, head dims that are multiples of 8 keep SDPA's
        flash kernels and aligned GEMM sizes the tensor cores. Explicit `subnet=` and dropout-list budgets
        (`index=`, `macs=` along a list) are never aligned. Set None for the default (class docstring)."""
        return self._budgets.multiple_of

    @multiple_of.setter
    def multiple_of(self, value: int | None) -> None:
        g = multiple_of_for(value, self.head_dims, self.hiddens)
        if g != self._budgets.multiple_of:
            self._budgets = Budgets(self.adapter.blocks, self.adapter.other_macs(), g)

    def uniform(self, keep: float) -> Subnet:
        """The subnet keeping the fraction `keep` of every module: floor(keep * n) dims of every head and MLP
        (multiple_of 1), else each head's allowed width nearest keep * hd and each MLP's floor one."""
        return self._budgets.uniform(keep)

    def narrowest(self) -> Subnet:
        """The smallest subnet a budget (macs=, latency_ms=) can choose that keeps any width: the end of the
        dropout list, else the smallest non-empty uniform (or aligned) subnet."""
        return self._budgets.narrowest(self._dropout_list)

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

        subnet: explicit per-block widths; keep: the same fraction of every module (`uniform`);
        macs: the largest subnet with MACs/sample <= macs * full (along the dropout list if any, else
        uniform, at widths that are multiples of `multiple_of`); index: the dropout list's first `index`
        units dropped; latency_ms: the largest subnet predicted under that latency by the table
        `profile_latency` measured (as macs=). Returns self.
        No weight is copied or allocated.
        """
        given = {k: v for k, v in dict(subnet=subnet, keep=keep, macs=macs, index=index,
                                        latency_ms=latency_ms).items() if v is not None}
        if len(given) != 1:
            raise ValueError(f"set_subnet takes exactly one of subnet=, keep=, macs=, index=, latency_ms=; "
                             f"got {sorted(given) or 'none'}")
        if subnet is not None:
            chosen = self._checked(subnet)
        elif keep is not None:
            chosen = self.uniform(keep)
        elif macs is not None:
            f = check_fraction("macs", macs)
            chosen = self._budgets.largest_under(self._dropout_list, self.macs, f * self.full_macs, "macs", f)
        elif index is not None:
            if self._dropout_list is None:
                raise ValueError("index= needs a dropout list (elastic.dropout_list is None)")
            chosen = self._dropout_list.subnet(index)
        else:
            chosen = self._by_latency(latency_ms)
        self._activate(chosen)
        return self

    def _activate(self, subnet: Subnet) -> None:
        """Make `subnet` (validated) the active one. A forward that torch.compile traces reads its twin of
        symbolic widths (skd/elastic/symbolic.py), so one graph serves every active width."""
        self._subnet = subnet
        self._symbolic = symbolic_widths(subnet)

    # ------------------------------------------------------------------------------------------ MACs
    def macs(self, subnet: Subnet | None = None) -> int:
        """Multiply-accumulates per sample of `subnet` (default: the active one), counted analytically.

        Counts every Linear (and patch-embedding conv) incl. the head, attention scores and attn @ v
        (per window for Swin; at the adapter's nominal sequence length for text); norms, softmax and
        activations are not MACs.
        """
        return self._budgets.macs(self._checked(subnet))

    @property
    def full_macs(self) -> int:
        """Multiply-accumulates per sample of the full-width model."""
        return self._budgets.macs(self._budgets.full)

    # --------------------------------------------------------------------------------------- latency
    def profile_latency(self, example_input: Any, points: int = 9, repeats: int = 5) -> list[tuple[int, float]]:
        """Measure forward latency (ms, median of `repeats`, no grad) at `points` subnets spread over MACs.

        example_input: a batch (skd.batches: images (B, C, H, W), (inputs, labels) or a dict of tensors)
        on the model's device. The table (MACs, ms) is cached and used by set_subnet(latency_ms=...);
        the active subnet is restored afterwards.
        """
        check_int("points", points, 2)
        check_int("repeats", repeats, 1)
        active, table = self._subnet, []
        device = self.adapter.device
        try:
            with torch.no_grad():
                count, nth = self._budgets.family(self._dropout_list)
                lowest, full = self.macs(nth(count - 1)), self.full_macs
                for j in range(points):  # MACs evenly spaced from the smallest subnet (j = 0) to full
                    target = lowest + j / (points - 1) * (full - lowest)
                    chosen = self._budgets.largest_under(self._dropout_list, self.macs, target, "macs", target / full)
                    self._activate(chosen)
                    table.append((self.macs(), time_ms(lambda: batches.call(self, example_input), repeats, device)))
        finally:
            self._activate(active)
        table.sort()
        self._latency = LatencyTable(table)
        return table

    def _by_latency(self, latency_ms: float) -> Subnet:
        check_positive("latency_ms", latency_ms)
        if self._latency is None:
            raise ValueError("latency_ms= needs a latency table: call elastic.profile_latency(example_input) first")
        return self._budgets.largest_under(self._dropout_list, lambda s: self._latency.predict_ms(self.macs(s)),
                                           latency_ms, "latency_ms", latency_ms)

    # --------------------------------------------------------------------------------------- forward
    def forward(self, *args: Any, subnet: Subnet | None = None, masks: Masks | None = None, **kwargs: Any) -> Any:
        """The model's own inputs -> the model's own output type, at the active subnet.

        subnet: overrides the active subnet for this call only. masks: {(block, "attn"): (r_b,),
        (block, "mlp"): (h_b,)} multiplicative masks (any float dtype/device broadcastable to the
        activations) on the kept rank dims of q, k and v of every head, and on the kept post-activation
        MLP hidden units (e.g. channel dropout); absent keys mean no mask. Each subnet's ops are checked and
        bound once and kept for later calls (skd/elastic/plan.py). Without grad mode the whole forward runs below
        the autograd layer (`_run`): a hook inside it cannot record autograd by re-enabling grad mode.
        """
        self._check_rank_major()
        if subnet is None:  # compiling: the symbolic twin (one graph for every width); eager: plain ints, faster
            s = self._symbolic if torch.compiler.is_compiling() else self._subnet
        else:
            s = self._checked(subnet)
        return self._run(self._plan(s), masks, *args, **kwargs)

    def _check_rank_major(self) -> None:
        if self._standard:
            raise RuntimeError("ElasticViT cannot run inside standard_layout(); use elastic.model there")

    def _run(self, plan: Plan, masks: Masks | None, *args: Any, **kwargs: Any) -> Any:
        """The forward through `plan`'s ops (`forward`'s, or a frozen capture's). Where nothing can record
        autograd (grad mode off, eager), every op runs below the dispatcher's autograd layer, as under
        inference_mode but with ordinary tensors out: less host time per op (the digits ViT at batch 1 on CPU: 3 %
        of the forward, benchmarks/below_autograd.py)."""
        masks = self._checked_masks(plan.subnet, masks)
        attention, mlp = functools.partial(self._attention, plan, masks), functools.partial(self._mlp, plan, masks)
        run = functools.partial(self.adapter.run, args, kwargs, plan.subnet, attention, mlp)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return run()
        return _dispatch.below_autograd(run)

    def capture(self, *args: Any, subnet: Subnet | None = None, warmup: int = 3, frozen: bool = False,
                **kwargs: Any) -> CapturedForward:
        """The forward at `subnet` (default: the active one) and at these example inputs' shapes, captured as
        a CUDA graph for serving: `captured(*inputs)` replays it without Python or per-kernel launches.

        The capture keeps its subnet whatever `set_subnet` does later; capture once per served width
        (milliseconds, no compiler). Needs CUDA inputs and this module in eval mode on their device.
        Replays see in-place weight updates, not replaced weights (skd/elastic/capture.py). On CPU, use
        `torch.compile(elastic, dynamic=True)`: one graph serves every width.

        frozen=True: the kept attention weights (q/k/v rows, proj columns) are copied once, now, in the
        head-major order SDPA needs, and the graph reads the copies: no per-call reordering of weights or
        activations at any batch size, for the memory of those copies (at most a third of the model's
        weights, at full width). Replays then do not see later updates of the attention weights: capture again
        after changing weights. Runs in the model's own dtype (not under autocast).
        """
        s = self.subnet if subnet is None else self._checked(subnet)
        if not frozen:
            return CapturedForward(functools.partial(self, subnet=s), self, args, kwargs, warmup)
        self._check_rank_major()
        if torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"):
            raise ValueError("capture(frozen=True) copies the weights in the model's dtype: cast the model "
                             "(e.g. elastic.to(torch.bfloat16)) instead of capturing under autocast")
        plan = Plan(self.adapter.blocks, s, bound=True, frozen=True)
        return CapturedForward(functools.partial(self._run, plan, None), self, args, kwargs, warmup)

    def _plan(self, s: Subnet) -> Plan:
        """The forward plan of subnet `s` (validated), cached per (subnet, forced backend, autocast)."""
        if torch.compiler.is_compiling():
            return Plan(self.adapter.blocks, s, bound=False)
        autocast = torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
        key = (s, skd_kernels.forced_backend(), autocast)
        plan = self._plans.get(key)
        if plan is None or not plan.current():
            plan = self._plans[key] = Plan(self.adapter.blocks, s, bound=not autocast)
            while len(self._plans) > PLAN_CACHE_SIZE:
                del self._plans[next(iter(self._plans))]  # the oldest built
        return plan

    def _checked_masks(self, s: Subnet, masks: Masks | None) -> Masks:
        if masks is None:
            return {}
        if not isinstance(masks, dict):
            raise ValueError(f"masks must be a dict {{(block, 'attn'|'mlp'): tensor}}, got {type(masks).__name__}")
        for key, m in masks.items():
            if not (isinstance(key, tuple) and len(key) == 2 and key[1] in ("attn", "mlp")
                    and isinstance(key[0], int) and 0 <= key[0] < len(self.head_dims)):
                raise ValueError(f"masks key {key!r} must be (block index, 'attn'|'mlp')")
            width = getattr(s, key[1])[key[0]]
            if not isinstance(m, torch.Tensor) or m.shape != (width,):
                raise ValueError(f"masks[{key!r}] must be a tensor of shape ({width},) (the kept width), got "
                                 f"{getattr(m, 'shape', type(m).__name__)}")
        return masks

    def _attention(self, plan: Plan, masks: Masks, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x: (S, N, D) -> (S, N, D_out) through the first r dims of every head; bias: broadcastable to (S, H, N, N).

        Without autograd, where the attention op has a kernel (CPU), the op on the rank-major GEMM outputs;
        otherwise SDPA, which needs each head's dims contiguous: whichever of the activations or the kept
        attention weights is smaller is reordered head-major for it."""
        spec, p = self.adapter.blocks[i], plan.blocks[i]
        r = p.r
        s, n, _ = x.shape
        mask = masks.get((i, "attn"))
        dropout = spec.attn_dropout if self.training else 0.0
        if dropout == 0.0 and not torch.is_grad_enabled() and p.attention is not None:
            # prefix_attention (fused qkv) or prefix_attention_separate (q, k, v) reads the rank-major GEMM
            # outputs and writes rank-major proj columns: no activation copy. Training keeps SDPA below: its
            # fused backward beats the ops' plain-PyTorch one.
            ys = [gemm(x) for gemm in p.qkv]  # (S, N, r*3*H), or q, k, v each (S, N, r*H)
            if mask is not None:  # rank-major column j*W + c belongs to rank j
                ys = [(y.view(s, n, r, -1) * mask.to(y)[:, None]).view(y.shape) for y in ys]
            if bias is not None:  # the ops take (S or 1, H or 1, N, N): a padding mask's (S, 1, 1, N) is expanded
                bias = bias.to(ys[0].dtype).expand(*bias.shape[:2], n, n)  # (stride 0 over queries: no copy)
            return p.proj(p.attention(*ys, bias))
        # A frozen plan's copies are made. Otherwise, from S*N >= D tokens the kept weights are fewer to reorder. Until
        # session 18 eager CUDA forwards without autograd copied the activations anyway (host-bound, where the
        # weights route launched more kernels); since the qkv bias's reorder is kept (`HeadMajor._bias`) both launch
        # two a block, and the H200 measured the weights route at 0.84-1.04x the copies there (geometric mean 0.96,
        # ViT-S and ViT-B batch 64 bf16; 0.90x at ViT-B's full width; benchmarks/sdpa_routes.py).
        reorders_weights = p.head_major.frozen is not None or s * n >= x.shape[-1]
        route = self._sdpa_reordering_weights if reorders_weights else self._sdpa_copying_activations
        return route(plan, masks, i, x, bias, dropout)

    def _sdpa_copying_activations(self, plan: Plan, masks: Masks, i: int, x: torch.Tensor,
                                  bias: torch.Tensor | None, dropout: float) -> torch.Tensor:
        """`_attention` through SDPA on head-major copies of the rank-major q/k/v GEMM outputs, and o copied back
        to the rank-major proj columns (the attention ops' `via_sdpa`): two activation copies, no weight moved."""
        spec, p = self.adapter.blocks[i], plan.blocks[i]
        ys = [gemm(x) for gemm in p.qkv]
        mask = masks.get((i, "attn"))
        mask = None if mask is None else mask.to(ys[0])
        op = prefix_attention_op if spec.fused else separate_op
        return p.proj(op.via_sdpa(*ys, spec.num_heads, spec.scale, bias, dropout, mask))

    def _sdpa_reordering_weights(self, plan: Plan, masks: Masks, i: int, x: torch.Tensor,
                                 bias: torch.Tensor | None, dropout: float) -> torch.Tensor:
        """`_attention` through SDPA with the kept q/k/v rows and proj columns reordered head-major (copies of
        3*H*r*D + D_out*H*r weights, per call, so gradients and in-place updates need nothing more) instead of
        the activations (S*N*(3*H*r + H*r)): the GEMMs then write each head's dims contiguously and read o in
        the (S, N, H, r) order SDPA writes it, so no activation is copied."""
        spec, p = self.adapter.blocks[i], plan.blocks[i]
        h, r, heads = spec.num_heads, p.r, p.head_major
        s, n, _ = x.shape
        ys = [F.linear(x, w, b) for w, b in heads.qkv()]
        mask = masks.get((i, "attn"))
        if mask is not None:  # the last dim is a head's rank
            ys = [(y.view(s, n, -1, r) * mask.to(y)).view(y.shape) for y in ys]
        if spec.fused:
            q, k, v = ys[0].view(s, n, 3, h, r).permute(2, 0, 3, 1, 4).unbind(0)  # each (S, H, N, r) views
        else:
            q, k, v = (y.view(s, n, h, r).transpose(1, 2) for y in ys)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=spec.scale)
        weight, out_bias = heads.proj()
        # SDPA's CPU and CUDA kernels write o as (S, N, H, r): then this reshape is a view
        return F.linear(o.transpose(1, 2).reshape(s, n, h * r), weight, out_bias)

    def _mlp(self, plan: Plan, masks: Masks, i: int, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., D) through the first h hidden units."""
        spec, p = self.adapter.blocks[i], plan.blocks[i]
        y = p.fc1(x)
        if spec.fused_act is None:
            y = spec.act(y)
        mask = masks.get((i, "mlp"))
        if mask is not None:
            y = y * mask.to(y)
        y = through(spec.hidden_dropout, y)
        return p.fc2(y)

    # --------------------------------------------------------------------------------------- extract
    def extract(self, subnet: Subnet | None = None) -> nn.Module:
        """A standalone, physically smaller copy of the model at `subnet` (default: the active one).

        Built by the adapter from the model library's own modules (`ModelAdapter.shrink`), computing
        what this ElasticViT computes at `subnet`, bias compensation (skd.compensation) folded into its
        biases (cross-head: and the kept output-projection columns) and the score fit (skd.score_fit) of
        each block's width into its q rows and bias; it runs without skd. `out.skd_subnet` records the
        widths (plain data) so `skd.save` can record how to rebuild this shape.
        """
        subnet = self._checked(subnet)
        for hook in self._hooks:  # the copy must not carry the wrapped model's hooks
            hook.remove()
        try:
            out = copy.deepcopy(self.model)
        finally:
            self._hooks = self._register_hooks()
        del out._skd_wrapped
        shrinker = adapter_for(out)
        if self._standard:  # bias compensation folds where every width is a prefix
            self._layout.apply(shrinker.blocks, to_standard=False)
        fold(shrinker.blocks, subnet)
        self._layout.apply(shrinker.blocks, to_standard=True)
        score_fit.fold(shrinker.blocks, subnet)  # in the model's own layout: the fit is in head/rank terms
        shrinker.shrink(subnet)
        out.skd_subnet = subnet.to_dict()
        return out
