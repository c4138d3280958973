"""PIAD importance: module sensitivity, dimension and unit importance, MACs per unit.

For a subnetwork `subnet` of an ElasticViT (the super-network as truncated so far) and a proxy set:

- module sensitivity  γ_m = (L(bypass m) − L) / L, L the subnet's mean loss per sample on the proxy set
  (`loss_fn(output, batch)` summed over the batch; default: the adapter's cross-entropy)
  and "bypass m" the subnet with module m's residual branch skipped (width 0);
- dimension importance I_i = γ_m · α_i, α the first-order Taylor channel importance
  Σ_samples |Σ_tokens g·a| of the full network (WPAC's streamed calibration pass, `skd.stats.calibrate`,
  reused rather than collected a second way), normalised to sum 1 over the module's kept dims. An
  attention dim is a rank index j: q, k and v of dim j of every head together (a PIAD group drops it in
  all heads at once); an MLP dim is a hidden unit;
- unit importance      I_u = Σ_{i∈u} I_i / MACs(u), MACs(u) the analytic MACs per image of the unit's
  dims (ElasticViT.macs is linear in the widths).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import batches
from ._dist import all_reduce_flat, rank_world
from .elastic import ElasticViT
from .evaluate import eval_mode
from .stats import QKV, LossFn, calibrate
from .subnet import DropoutList, Group, Subnet

Module = tuple[int, str]  # (block index, "attn" | "mlp")


@dataclass
class Importance:
    """Importance of one subnetwork's modules and dims.

    gamma[(b, m)]: module sensitivity (float; may be < 0 when bypassing m lowers the loss).
    alpha[(b, m)]: (kept width,) float64 Taylor importance of the module's kept dims, summing to 1
    (uniform when all scores are 0). loss: the subnet's mean proxy-set loss per sample.
    """

    gamma: dict[Module, float]
    alpha: dict[Module, torch.Tensor]
    loss: float

    def dims(self, module: Module) -> torch.Tensor:
        """(kept width,) float64 dimension importance I_i = γ_m · α_i."""
        return self.gamma[module] * self.alpha[module]


def _bypass(subnet: Subnet, module: Module) -> Subnet:
    """`subnet` with `module`'s residual branch skipped (its width set to 0)."""
    widths = {"attn": list(subnet.attn), "mlp": list(subnet.mlp)}
    widths[module[1]][module[0]] = 0
    return Subnet(**widths)


def _device(elastic: ElasticViT) -> torch.device:
    return next(elastic.parameters()).device


def _sum_loss(elastic: ElasticViT, loss_fn: LossFn | None) -> LossFn:
    """`loss_fn`, or the adapter's default loss summed over the batch."""
    return loss_fn or functools.partial(elastic.adapter.default_loss, reduction="sum")


@torch.no_grad()
def _mean_losses(elastic: ElasticViT, data: Iterable, subnets: list[Subnet], loss_fn: LossFn,
                 progress: bool) -> list[float]:
    """Mean loss per sample of each subnet over `data` (all processes' shares together)."""
    dev = _device(elastic)
    sums = torch.zeros(len(subnets) + 1, dtype=torch.float64, device=dev)  # last entry: sample count
    bar = tqdm(data, desc=f"importance: {len(subnets)} subnets' losses", unit="batch",
               disable=not progress or rank_world()[0] != 0)
    for batch in bar:
        batch = batches.to_device(batch, dev)
        args, kwargs = batches.model_inputs(batch)
        for j, s in enumerate(subnets):
            sums[j] += loss_fn(elastic(*args, subnet=s, **kwargs), batch).double()
        sums[-1] += batches.batch_size(batch)
    all_reduce_flat([sums])  # the proxy shares' sums add up
    if sums[-1] == 0:
        raise ValueError("the proxy set is empty")
    return (sums[:-1] / sums[-1]).tolist()


def _taylor(elastic: ElasticViT, data: Iterable, num_samples: int, loss_fn: LossFn,
            progress: bool) -> dict[Module, torch.Tensor]:
    """Full-width Taylor channel scores (width,) float64 per module, from WPAC's calibration pass.

    Attention: q, k and v scores of rank j summed over heads (head-major channels h*hd + j).
    """
    adapter = elastic.adapter
    with elastic.standard_layout() as model:
        stats = calibrate(model, adapter.blocks, data, num_samples=num_samples, covariance=None, progress=progress,
                          loss_fn=loss_fn, token_weights=adapter.token_weights)
    out: dict[Module, torch.Tensor] = {}
    for b, (spec, feats) in enumerate(zip(adapter.blocks, stats.blocks, strict=True)):
        out[b, "attn"] = sum(feats[f].taylor.view(spec.num_heads, spec.head_dim).sum(0) for f in QKV)
        out[b, "mlp"] = feats["hidden"].taylor
    return out


def estimate_importance(
    elastic: ElasticViT, data: Iterable, num_samples: int, subnet: Subnet | None = None,
    loss_fn: LossFn | None = None, *, progress: bool = False,
) -> Importance:
    """Module sensitivity and normalised Taylor importance of `subnet` (default: full) on the proxy `data`.

    data: a re-iterable of batches (skd.batches), e.g. a DataLoader over the proxy set; loss_fn(output,
    batch) -> scalar summed over the batch (default: the adapter's cross-entropy, summed); num_samples:
    the proxy set's size (over all processes). Under torch.distributed each
    process passes its own shard (num_samples // world, +1 on the first num_samples % world ranks) and
    the statistics are all-reduced. Runs in eval mode; train/eval mode and active subnet are restored.
    progress: show the two passes (every subnet's loss, then the Taylor scores) as progress bars on rank 0.
    """
    base = Subnet(attn=elastic.head_dims, mlp=elastic.hiddens) if subnet is None else subnet
    base.validate(elastic.head_dims, elastic.hiddens)
    with eval_mode(elastic):
        modules = [(b, m) for m in ("attn", "mlp") for b, w in enumerate(getattr(base, m)) if w]
        loss_fn = _sum_loss(elastic, loss_fn)
        losses = _mean_losses(elastic, data, [base, *(_bypass(base, mod) for mod in modules)], loss_fn, progress)
        if losses[0] <= 0:
            raise ValueError(f"the subnet's proxy loss is {losses[0]}: relative sensitivities are undefined")
        gamma = {mod: (lb - losses[0]) / losses[0] for mod, lb in zip(modules, losses[1:], strict=True)}
        alpha = {}
        for mod, t in _taylor(elastic, data, num_samples, loss_fn, progress).items():
            t = t[: getattr(base, mod[1])[mod[0]]]  # the kept dims (a prefix) share the module's mass
            if len(t) == 0:
                continue
            total = t.sum()
            alpha[mod] = t / total if total > 0 else torch.full_like(t, 1.0 / len(t))
        return Importance(gamma=gamma, alpha=alpha, loss=losses[0])


def macs_per_dim(elastic: ElasticViT) -> dict[Module, int]:
    """MACs per image that one dim of each module costs (exact: ElasticViT.macs is linear in widths)."""
    full = Subnet(attn=elastic.head_dims, mlp=elastic.hiddens)
    full_macs = elastic.macs(full)
    return {(b, m): (full_macs - elastic.macs(_bypass(full, (b, m)))) // n
            for m, widths in (("attn", elastic.head_dims), ("mlp", elastic.hiddens)) for b, n in enumerate(widths)}


def unit_macs(per_dim: dict[Module, int], module: Module, group: Group) -> int:
    """MACs per image of the dims [group.start, group.stop) of `module`."""
    return per_dim[module] * (group.stop - group.start)


def unit_importance(imp: Importance, per_dim: dict[Module, int], module: Module, group: Group) -> float:
    """I_u = Σ_{i∈u} γ_m α_i / MACs(u) for the group of `module` (its dims within the kept width).

    An empty group (more groups than dims) costs and holds nothing: -inf, so it is dropped first.
    """
    if group.stop == group.start:
        return float("-inf")
    return float(imp.dims(module)[group.start : group.stop].sum()) / unit_macs(per_dim, module, group)


def extend_dropout_list(
    dl: DropoutList, imp: Importance, per_dim: dict[Module, int], goal_macs: float
) -> list[tuple[int, str]]:
    """Append the least important droppable unit until the list's dropped MACs reach goal_macs; return them.

    Importance was estimated on dl.subnet(len(dl)), whose kept dims are exactly what is droppable.
    Only a module's last kept group is droppable, so the list stays prefix-consistent.
    """
    dropped = sum(unit_macs(per_dim, dl.units[n], dl.unit_group(n)) for n in range(len(dl)))
    added = []
    while dropped < goal_macs:
        candidates = dl.droppable()
        if not candidates:
            raise ValueError(f"every unit is dropped and the list covers {dropped} MACs < goal {goal_macs:.0f}")
        unit = min(candidates, key=lambda u: (unit_importance(imp, per_dim, u, candidates[u]), u))
        dl.append(unit)
        added.append(unit)
        dropped += unit_macs(per_dim, unit, candidates[unit])
    return added
