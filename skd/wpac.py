"""WPAC: the function-preserving transform that puts each block's most important knowledge first.

Per block (docs/design.md, "The method, precisely"), with per-head transforms applied block-diagonally:
  V/O: rows of T_h = eigenvectors (descending) of the Θ-weighted covariance of v_h;
       Wv_h <- T_h Wv_h, bv_h <- T_h bv_h, Wo[:, h] <- Wo[:, h] T_h^T.
  Q/K: U_h from C^q_h + C^k_h, applied to the q and k rows and biases (scores q·k unchanged).
  MLP: hidden units permuted into Taylor importance order (fc1 rows and bias, fc2 columns).
Criterion "wpac+" (beyond the paper) keeps WPAC's Q/K rotation and MLP order but chooses V/O for what
the head computes: an invertible, not only orthogonal, per-head T whose leading dims best preserve the
head's output W_o·context (skd.transforms.output_preserving, from the context's uniform second moment).
Before that it moves b_v exactly into the output bias (W_o b_v: the attention weights sum to 1), so
truncated subnetworks keep it in full. (A score-preserving Q/K transform, q <- A q, k <- A^-T k from the SVD
of C_q^{1/2} C_k^{1/2}, measured no better than the rotation on MiniLM and worse on the digits ViT; so were
layer-by-layer error-aware statistics, worse, and unweighted Q/K, worse on the digits ViT: benchmarks/RESULTS.md,
"issue 12, session 3".)
Bias compensation (any criterion; skd.compensation): compensate="attn" stores each block's mean context in the new
basis, so a subnetwork's truncated heads add their dropped dims' mean contribution back through the
output bias; compensate="mlp" does the same for the MLP's mean activation and orders the units by what
compensation cannot restore, their centred output variance Var[h_j]·||W_2[:, j]||², instead of by the
criterion's score (under the Taylor order, compensation wrecks MiniLM's MLP: mean cosine 0.03 at 1/4 of
the units, vs 0.58 without and 0.72 with the variance order, because units with rare, huge activations
are dropped and their mean is then added to every token); compensate=True is both. The means are over
all tokens: right where the output is read from all of them (mean-pooled encoders: MiniLM), wrong for
the MLP where a classifier reads one token (the digits ViT loses up to 30 points of accuracy with "mlp";
"attn" helps it). cross_head=True (with "attn") also stores the context's full covariance, so a truncated
output projection predicts its dropped dims linearly from the kept dims of all heads (skd.compensation).
joint_qk=True (wpac+ only) replaces the Q/K rotation's statistic: the eigenvectors of C_q + C_k, the queries'
and keys' covariances weighted by how much the head's output moves with their scores
(skd.attention_stats.JointQK, collected in the calibration pass, which then computes every attention
explicitly: no extra pass).
score_fit=True (any criterion) stores, after the transform, every narrow width's least-squares prediction of
its dropped score part from its kept q/k dims (skd.score_fit; skd.attention_stats.ScoreFit over the first
quarter of the samples, on the transformed model: with joint_qk replayed from the attention inputs its calibration
pass recorded, skd.attention_inputs; otherwise, or when they exceed skd.attention_inputs.byte_bound, from one more
pass, which reads `data` again, so it must be re-iterable).
Baseline criteria ("taylor", "magnitude", "random", "hessian") permute dims into their importance order
instead (one permutation per head shared by q and k, one per head for v/o, one for the MLP units).
Transforms are computed and applied in float64, then cast back to the weights' dtype.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from skd_kernels import CovState

from . import compensation
from . import score_fit as fits
from ._checks import check_int
from ._dist import rank_share
from ._threads import one_thread
from .attention_inputs import AttentionInputs, byte_bound
from .attention_stats import JointQK, ScoreFit, attention_pass, check_supported
from .models import BlockSpec, ModelAdapter, adapter_for
from .stats import CONTEXT, CONTEXT_FULL, FEATURES, QKV, CalibrationStats, FeatureStats, LossFn, calibrate
from .transforms import output_preserving

CRITERIA = ("wpac", "wpac+", "pca", "taylor", "magnitude", "random", "hessian")
COMPENSATE = (False, True, "attn", "mlp")  # skd.wpac(compensate=): none, both, attention only, MLP only
CROSS_HEAD = "cross_head"  # in the set of compensated parts: skd.wpac(cross_head=True)
ROTATIONS = ("wpac", "pca")  # criteria that rotate V/O and Q/K; the others permute
RELATIVE_DAMPING = 1e-10  # δ = RELATIVE_DAMPING * tr(C)/r added to C before eigh
RANDOM_SEED = 0
# The score fit's pass reads the first 1/SCORE_FIT_SHARE of the calibration samples: its unknowns are few
# ((r+1)·r per head and width) and its moments settle fast (MiniLM attn 1/4, 3 draws: 0.7852 from 64 of 256
# sentences vs 0.7858 from all; benchmarks/RESULTS.md), while a pass costs ~0.7 of the calibration's per sample.
SCORE_FIT_SHARE = 4


@dataclass
class BlockReport:
    """What WPAC did to one block. H heads of hd dims, m MLP hidden units; all float64 on CPU.

    qk / vo: "rotation", "rotation (joint)" (qk under joint_qk), "transform" (wpac+: invertible) or
    "permutation". qk_spectrum, vo_spectrum:
    (H, hd) eigenvalues of the per-head covariance, descending, or for "transform" the singular values of
    the per-head problem (skd.transforms); None for permutation criteria. qk_importance, vo_importance: (H, hd) scores
    of the dims in their new order (None for rotations). mlp_importance: (m,) scores in the new order.
    score_fit: whether the block's q Linear holds a score fit (skd.score_fit) after the call.
    """

    name: str
    qk: str
    vo: str
    qk_spectrum: torch.Tensor | None
    vo_spectrum: torch.Tensor | None
    qk_importance: torch.Tensor | None
    vo_importance: torch.Tensor | None
    mlp_importance: torch.Tensor
    score_fit: bool = False


@dataclass
class WPACReport:
    """`model.skd_report` after `skd.wpac`: criterion, samples used, wall time (s), one BlockReport per block."""

    criterion: str
    samples: int
    seconds: float
    blocks: list[BlockReport]


def wpac(
    model: nn.Module,
    data: Iterable | Dataset,
    *,
    num_samples: int = 1024,
    criterion: str = "wpac",
    loss_fn: LossFn | None = None,
    progress: bool = True,
    compensate: bool | str = False,
    cross_head: bool = False,
    joint_qk: bool = False,
    score_fit: bool = False,
) -> nn.Module:
    """Stratify `model` in place so the leading dims of every head and MLP hold the most knowledge.

    model: any model with a `skd.models` adapter (timm ViT/DeiT/Swin, HF encoders and ViTs, ...), or an
    `skd.ElasticViT` (transformed through its `standard_layout()`); any float dtype (statistics are
    fp32, transforms float64). data: yields batches (skd.batches: (images, labels) tuples, dicts of
    tensors, ...), or a map-style Dataset of single samples; at most `num_samples` samples are used
    (under torch.distributed: in total over all processes, each reading its own shard); padding tokens
    (attention_mask 0) carry no weight. criterion: one of CRITERIA; "magnitude" and "random" read no data;
    "wpac" is the paper's method, "wpac+" this project's extension (module docstring; uniform token
    weights, one more covariance: the attention context's).
    loss_fn(output, batch) -> scalar summed over the batch; default: the adapter's `default_loss` (cross-entropy
    against the labels) summed. Only recipes that read a gradient statistic use it (`gradient_features`); "wpac+"
    with joint_qk and the MLP compensated (compensate=True or "mlp"), "magnitude" and "random" calibrate forward
    only, with no loss, backward or labels. compensate: bias compensation (module docstring, skd.compensation), one of
    COMPENSATE: "attn" gives every block's output projection (with a bias) its input's mean as buffer
    `skd_input_mean`, which ElasticViT's truncated widths, `extract` and skd.save use; "mlp" does so for fc2 and
    orders the MLP units by centred output variance whatever the criterion; True is both (for encoders read from all
    tokens, e.g. mean pooling); False stores none and removes stale means a previous call stored. The calibration
    pass then also collects the context's covariance and the MLP activation's moments ("magnitude"/"random" read
    data too). cross_head: with the attention part compensated (True or "attn"; ValueError otherwise), also store
    the context's full covariance in the transformed basis as buffer `skd_input_cov` of every output projection
    (skd.compensation): truncated widths then predict the dropped context dims from the kept dims of all heads (one
    more (C, C) covariance in the calibration pass). joint_qk (criterion "wpac+" only; ValueError otherwise): the
    Q/K rotation from the output-sensitivity-weighted query and key covariances (module docstring; collected in the
    calibration pass, whose attention is then computed explicitly). score_fit: after the transform, store each
    block's per-width score fit on the Linear producing q (skd.score_fit: buffer `skd_score_fit`; blocks with
    qk_norm get none); False removes fits a previous call stored. score_fit reads the first num_samples // 4 samples
    of `data` (under torch.distributed: the first quarter of each process's share) once more, unless joint_qk's
    calibration pass recorded their attention inputs (skd.attention_inputs, up to its byte_bound), so it must be
    re-iterable (a DataLoader, list or Dataset; a one-shot iterator is a ValueError, raised before the model is
    touched). Returns the same model, computing the same function, with `model.skd_report` (a WPACReport).

    Raises UnsupportedModelError for models without an adapter, ValueError for bad data (empty, NaN/Inf
    images, activations or gradients). Models with qk_norm keep their V/O rotation and MLP order, but Q/K
    is only permuted, with one order shared by all heads because the norm's affine is shared (warned).
    """
    from .elastic import ElasticViT  # deferred: elastic is only needed when given a wrapped model

    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} must be one of {CRITERIA}")
    check_int("num_samples", num_samples, 1)
    if compensate not in COMPENSATE or not isinstance(compensate, bool | str):
        raise ValueError(f"compensate must be one of {COMPENSATE}, got {compensate!r}")
    parts = frozenset({True: ("attn", "mlp"), False: ()}.get(compensate, (compensate,)))
    if not isinstance(cross_head, bool):
        raise ValueError(f"cross_head must be True or False, got {cross_head!r}")
    if cross_head:
        if "attn" not in parts:
            raise ValueError(f"cross_head=True needs the attention part compensated (compensate=True or 'attn'), "
                             f"got compensate={compensate!r}")
        parts |= {CROSS_HEAD}
    for name, value in (("joint_qk", joint_qk), ("score_fit", score_fit)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if joint_qk and criterion != "wpac+":
        raise ValueError(f"joint_qk=True chooses wpac+'s Q/K rotation: it needs criterion='wpac+', got {criterion!r}")
    if score_fit and isinstance(data, Iterator):
        raise ValueError("score_fit needs to read the data again: pass a re-iterable, e.g. a DataLoader or list "
                         f"(got a one-shot iterator, {type(data).__name__})")
    args = (data, num_samples, criterion, loss_fn, progress, parts, joint_qk, score_fit)
    if isinstance(model, ElasticViT):
        with model.standard_layout() as inner:
            model.skd_report = _stratify(inner, model.adapter, *args)
        return model
    model.skd_report = _stratify(model, adapter_for(model), *args)
    return model


def _stratify(model: nn.Module, adapter: ModelAdapter, data: Iterable | Dataset, num_samples: int,
              criterion: str, loss_fn: LossFn | None, progress: bool, compensate: frozenset[str], joint_qk: bool,
              score_fit: bool) -> WPACReport:
    start = time.perf_counter()
    blocks = adapter.blocks
    if joint_qk or score_fit:
        check_supported(blocks)  # before anything changes
    # joint_qk: fed by the calibration pass itself, on the original model (the statistics describe the
    # function being preserved); joint_qk needs wpac+, so that pass runs
    joint = JointQK(blocks, adapter.device) if joint_qk else None
    fit = ScoreFit(blocks, adapter.device) if score_fit else None
    fit_samples = max(1, num_samples // SCORE_FIT_SHARE)
    # the fit's attention inputs, recorded by a calibration pass that computes every attention explicitly anyway
    # (joint_qk) and replayed after the transform: no pass of its own (skd.attention_inputs)
    inputs = (AttentionInputs(blocks, fit.fitted, rank_share(fit_samples)[0], byte_bound(adapter.device))
              if joint_qk and fit is not None and fit.fitted else None)
    stats = None
    if criterion not in ("magnitude", "random") or compensate:
        features = gradient_features(criterion, compensate, joint_qk, blocks)
        # the q/k/v covariances: pca's (uniform, forward), the paper's rotations and wpac+'s Θ-weighted Q/K
        # rotation (not joint_qk's)
        covariance = ("uniform" if criterion == "pca" else
                      "weighted" if criterion in ("wpac", "wpac+") and features & set(QKV) and not joint_qk else None)
        stats = calibrate(model, blocks, data, num_samples=num_samples, progress=progress,
                          accumulators=[joint] if joint_qk else (), attention_inputs=inputs, adapter=adapter,
                          loss_fn=loss_fn or functools.partial(adapter.default_loss, reduction="sum"),
                          token_weights=adapter.token_weights, features=features, covariance=covariance,
                          fisher=criterion == "hessian", context=criterion == "wpac+" or "attn" in compensate,
                          moments="mlp" in compensate, context_full=CROSS_HEAD in compensate)
    normed = [s.name for s in blocks if s.has_qk_norm]
    if normed:
        warnings.warn(f"{', '.join(normed)}: qk_norm normalises over each head's dims, so Q/K cannot be rotated; "
                      "Q/K dims are permuted into importance order instead, one order shared by all heads "
                      "(the norm's affine is shared). V/O and MLP are transformed as usual.", stacklevel=3)
    generator = torch.Generator().manual_seed(RANDOM_SEED)
    rotations = _rotations(blocks, stats) if criterion in ROTATIONS else [None] * len(blocks)
    with torch.no_grad():
        if criterion == "wpac+":
            reports = [_transform_block_plus(spec, feats, compensate, None if joint is None else joint.covariance(i))
                       for i, (spec, feats) in enumerate(zip(blocks, stats.blocks, strict=True))]
        else:
            reports = [_transform_block(spec, i, stats, criterion, generator, rot, compensate)
                       for i, (spec, rot) in enumerate(zip(blocks, rotations, strict=True))]
    _store_score_fits(adapter, data, reports, fit, fit_samples, progress, inputs)
    samples = 0 if stats is None else int(stats.samples)
    return WPACReport(criterion, samples, time.perf_counter() - start, reports)


def gradient_features(criterion: str, compensate: frozenset[str], joint_qk: bool,
                      blocks: list[BlockSpec]) -> frozenset[str]:
    """The features (skd.stats.FEATURES) whose gradient statistics (Taylor scores, the Fisher, the Θ-weighted
    q/k/v covariances, all collected in the calibration pass's backward) the transform reads; none: that pass
    runs forward only. "magnitude" and "random" read none (their compensation reads forward statistics). With
    the MLP compensated its units are ordered by centred output variance (forward moments), not by "hidden"'s
    scores. "pca" rotates by uniform covariances (forward) and "wpac+" takes V/O from the context's: neither
    reads "v"'s. Neither reads "q"/"k"'s either (pca's rotation and wpac+ with joint_qk use forward
    statistics) unless a block has qk_norm (its Q/K permutation is in Taylor order)."""
    if criterion in ("magnitude", "random"):
        return frozenset()
    features = set(FEATURES)
    if "mlp" in compensate:
        features.discard("hidden")
    if criterion in ("pca", "wpac+"):
        features.discard("v")
        if (criterion == "pca" or joint_qk) and not any(s.has_qk_norm for s in blocks):
            features -= {"q", "k"}
    return frozenset(features)


# ----------------------------------------------------------------------------------------- per block
Axes = tuple[torch.Tensor, torch.Tensor]  # (transforms (H, hd, hd), spectrum (H, hd)), float64


def _rotations(blocks: list[BlockSpec], stats: CalibrationStats) -> list[tuple[Axes, Axes | None]]:
    """Per block: (V/O axes, Q/K axes or None under qk_norm), from all blocks' covariances at once."""
    covs = []
    for spec, feats in zip(blocks, stats.blocks, strict=True):
        cov = {n: _covariance(spec, n, feats[n].cov) for n in ("q", "k", "v")}
        covs.append(cov["v"])
        if not spec.has_qk_norm:
            covs.append(cov["q"] + cov["k"])
    axes = iter(principal_axes_many(covs))
    return [(next(axes), None if spec.has_qk_norm else next(axes)) for spec in blocks]


def _transform_block(spec: BlockSpec, i: int, stats: CalibrationStats | None, criterion: str,
                     generator: torch.Generator, rotation: tuple[Axes, Axes | None] | None,
                     compensate: frozenset[str]) -> BlockReport:
    feats = None if stats is None else stats.blocks[i]
    h, hd = spec.num_heads, spec.head_dim

    def scores(name: str) -> torch.Tensor:
        """(channels,) importance of feature `name` under a permutation criterion."""
        if criterion == "random":
            return torch.rand(spec.hidden if name == "hidden" else h * hd, generator=generator, dtype=torch.float64)
        if criterion == "magnitude":  # L2 norms of every weight attached to the dim, in and out
            if name == "hidden":
                return (spec.fc1.weight.double().norm(dim=1) + spec.fc2.weight.double().norm(dim=0)).cpu()
            rows = spec.qkv_weights()["qkv".index(name)][0].double().norm(dim=-1)
            return (rows + spec.proj.weight.double().norm(dim=0) if name == "v" else rows).cpu()
        f = feats[name]
        score = f.fisher if criterion == "hessian" else f.taylor
        return None if score is None else score.cpu()  # None: not collected (hidden, with "mlp" compensated)

    def qk_scores() -> torch.Tensor:
        return (scores("q") + scores("k")).view(h, hd)

    report = dict(name=spec.name, qk_spectrum=None, vo_spectrum=None, qk_importance=None, vo_importance=None)
    if rotation is not None:
        (vo, report["vo_spectrum"]), qk_axes = rotation
        report["vo"] = "rotation"
        if qk_axes is None:
            qk_imp = (feats["q"].taylor + feats["k"].taylor).cpu().view(h, hd)
        else:
            qk, report["qk_spectrum"] = qk_axes
            report["qk"] = "rotation"
        mlp_imp = feats["hidden"].taylor  # None with "mlp" compensated: replaced below
    else:
        qk_imp, vo_imp, mlp_imp = qk_scores(), scores("v").view(h, hd), scores("hidden")
        vo, report["vo_importance"] = _permutation_matrices(vo_imp)
        report["vo"] = "permutation"
        if not spec.has_qk_norm:
            qk, report["qk_importance"] = _permutation_matrices(qk_imp)
            report["qk"] = "permutation"
    if spec.has_qk_norm:
        qk, report["qk_importance"], report["qk"] = *_shared_qk_permutation(spec, qk_imp), "permutation"
    mlp_imp = _centred_output_variance(spec, feats["hidden"]) if "mlp" in compensate else mlp_imp.cpu()
    mlp_order = torch.sort(mlp_imp, descending=True, stable=True).indices
    _apply_attention(spec, qk, qk, vo, vo.mT)
    _permute_mlp(spec, mlp_order)
    _store_means(spec, feats, compensate, vo, None, mlp_order)
    return BlockReport(mlp_importance=mlp_imp[mlp_order], **report)


def _shared_qk_permutation(spec: BlockSpec, qk_imp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qk_norm blocks: the norm's weight/bias has hd entries shared by the heads, so only one common order
    can be absorbed. qk_imp (H, hd) -> (permutation matrices (H, hd, hd) float64, importance in the new
    order (H, hd)); the norms' affine parameters are permuted here."""
    h, hd = qk_imp.shape
    shared = torch.sort(qk_imp.sum(0), descending=True, stable=True).indices
    for norm in spec.qk_norms:
        for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)):
            if p is not None:
                p.copy_(p[shared.to(p.device)])
    return torch.eye(hd, dtype=torch.float64)[shared].expand(h, hd, hd), qk_imp[:, shared]


def _store_score_fits(adapter: ModelAdapter, data: Iterable | Dataset, reports: list[BlockReport],
                      fit: ScoreFit | None, num_samples: int, progress: bool, inputs: AttentionInputs | None) -> None:
    """With a ScoreFit (score_fit=True), its statistics on the transformed model over at most num_samples samples
    and every block's fit stored (skd.score_fit; qk_norm blocks get none): replayed from the attention inputs the
    calibration pass recorded when it recorded them all (`inputs`), else from one attention pass through the last
    fitted block's attention (none without any block to fit). Every other stored fit is removed."""
    blocks = adapter.blocks
    solved = [None] * len(blocks)
    if fit is not None and fit.fitted:
        if inputs is not None and inputs.complete:
            inputs.replay(fit)
        else:
            attention_pass(adapter, data, [fit], num_samples=num_samples, progress=progress, through=fit.last_block)
        solved = [fit.solve(i, fits.q_linear(spec).bias is not None) for i, spec in enumerate(blocks)]
    with torch.no_grad():
        for spec, solution, report in zip(blocks, solved, reports, strict=True):
            fits.set_score_fit(fits.q_linear(spec), solution, spec.num_heads, spec.head_dim)
            report.score_fit = solution is not None


def _transform_block_plus(spec: BlockSpec, feats: dict[str, FeatureStats], compensate: frozenset[str],
                          joint_qk: torch.Tensor | None) -> BlockReport:
    """Criterion "wpac+" on one block: fold b_v, output-preserving V/O, WPAC's Q/K rotation, and the MLP in
    Taylor order (with MLP compensation: centred output-variance order, as every criterion). joint_qk: (H, hd, hd)
    float64 C_q + C_k of skd.attention_stats.JointQK to rotate Q/K by instead of the Θ-weighted one, or None."""
    h, hd = spec.num_heads, spec.head_dim
    moved = _fold_value_bias(spec)
    cc = _second_moment(spec, CONTEXT, feats[CONTEXT].cov, shift=moved)
    # V/O metric: the head's own output W_o c (on MiniLM as good as the loss-gradient K-FAC metric
    # E[g g^T] and better at 1/2 of the dims, and it needs no gradient statistic).
    w_out = spec.proj.weight.double().view(-1, h, hd).permute(1, 0, 2).cpu()  # (H, D_out, hd)
    t, t_inv, vo_spectrum = output_preserving(cc, w_out)
    report = dict(name=spec.name, vo="transform", vo_spectrum=vo_spectrum, vo_importance=None)
    if spec.has_qk_norm:
        qk, qk_imp = _shared_qk_permutation(spec, (feats["q"].taylor + feats["k"].taylor).cpu().view(h, hd))
        a = b = qk
        report.update(qk="permutation", qk_spectrum=None, qk_importance=qk_imp)
    else:
        qk_cov = (_covariance(spec, "q", feats["q"].cov) + _covariance(spec, "k", feats["k"].cov)
                  if joint_qk is None else joint_qk)
        a, qk_spectrum = principal_axes(qk_cov)
        b = a  # orthogonal: a^-T = a
        report.update(qk="rotation" if joint_qk is None else "rotation (joint)", qk_spectrum=qk_spectrum,
                      qk_importance=None)
    mlp_imp = (_centred_output_variance(spec, feats["hidden"]) if "mlp" in compensate
               else feats["hidden"].taylor.cpu())
    mlp_order = torch.sort(mlp_imp, descending=True, stable=True).indices
    _apply_attention(spec, a, b, t, t_inv)
    _permute_mlp(spec, mlp_order)
    _store_means(spec, feats, compensate, t, moved, mlp_order)
    return BlockReport(mlp_importance=mlp_imp[mlp_order], **report)


def _centred_output_variance(spec: BlockSpec, hidden: FeatureStats) -> torch.Tensor:
    """(m,) float64 CPU Var[h_j]·||W_2[:, j]||²: the output energy a dropped unit takes with it once its mean
    is compensated (the MLP order under compensation; module docstring)."""
    return (hidden.moments.variance().cpu() * spec.fc2.weight.double().square().sum(0).cpu())


def _store_means(spec: BlockSpec, feats: dict[str, FeatureStats] | None, parts: frozenset[str], v_t: torch.Tensor,
                 moved: torch.Tensor | None, mlp_order: torch.Tensor) -> None:
    """Bias compensation's means in the transformed basis (skd.compensation) for `parts` ("attn", "mlp",
    CROSS_HEAD): the context c_h becomes v_t[h] (c_h - moved[h]) (moved: the b_v folded out, (H, hd), or
    None), so its covariance becomes T C T^T (T = blockdiag(v_t[h]), the shift cancels); hidden unit
    mlp_order[n] becomes unit n. Blocks without an output bias get none (nothing to fold into); every other
    stored mean and covariance is removed."""
    compensation.set_input_mean(spec.proj, None)
    compensation.set_input_mean(spec.fc2, None)
    if "attn" in parts and spec.proj.bias is not None and float(feats[CONTEXT].cov.weight_sum) > 0:
        ctx = (feats[CONTEXT].cov.sum / feats[CONTEXT].cov.weight_sum).double().cpu()  # (H, hd)
        if moved is not None:
            ctx = ctx - moved
        compensation.set_input_mean(spec.proj, torch.einsum("hij,hj->hi", v_t, ctx).reshape(-1))
        if CROSS_HEAD in parts:
            h, hd = ctx.shape
            cov = _covariance(spec, CONTEXT_FULL, feats[CONTEXT_FULL].cov)[0].view(h, hd, h, hd)
            cov = torch.einsum("hij,hjgk,glk->higl", v_t.double(), cov, v_t.double()).reshape(h * hd, h * hd)
            compensation.set_input_cov(spec.proj, cov)
    if "mlp" in parts and spec.fc2.bias is not None and float(feats["hidden"].moments.weight_sum) > 0:
        compensation.set_input_mean(spec.fc2, feats["hidden"].moments.mean().cpu()[mlp_order.cpu()])


def _fold_value_bias(spec: BlockSpec) -> torch.Tensor:
    """b_o <- b_o + W_o b_v, b_v <- 0 when both biases exist: exactly function-preserving, since the attention
    weights of a query sum to 1 and b_v reaches the output as W_o b_v. Returns the removed b_v as (H, hd)
    float64 CPU (zeros if none was moved)."""
    v_b = spec.qkv_weights()[2][1]
    moved = torch.zeros(spec.channels, dtype=torch.float64)
    if v_b is not None and spec.proj.bias is not None:
        moved = v_b.double().cpu()
        spec.proj.bias.copy_(spec.proj.bias.double() + spec.proj.weight.double() @ moved.to(v_b.device))
        v_b.zero_()
    return moved.view(spec.num_heads, spec.head_dim)


def _second_moment(spec: BlockSpec, name: str, state: CovState, shift: torch.Tensor | None = None) -> torch.Tensor:
    """(H, hd, hd) float64 CPU uncentred second moment E[(x - shift)(x - shift)^T] of feature `name`
    (shift: (H, hd) or None); zeros when it carried no weight."""
    if float(state.weight_sum) <= 0:
        warnings.warn(f"{spec.name} {name}: all token weights were zero; its heads are left as they are",
                      stacklevel=5)
        return torch.zeros_like(state.sum_outer, device="cpu")
    moment = (state.sum_outer / state.weight_sum).cpu()
    if shift is not None:
        mean = (state.sum / state.weight_sum).cpu()
        moment = moment - shift[:, :, None] * mean[:, None, :] - mean[:, :, None] * shift[:, None, :] \
            + shift[:, :, None] * shift[:, None, :]
    if not bool(torch.isfinite(moment).all()):
        raise ValueError(f"{spec.name} {name}: second moment contains NaN or Inf (activations overflowed fp32)")
    return 0.5 * (moment + moment.mT)


def _covariance(spec: BlockSpec, name: str, state: CovState) -> torch.Tensor:
    """(H, hd, hd) float64 CPU covariance of feature `name`; zeros when it carried no weight (Σw = 0)."""
    if float(state.weight_sum) <= 0:
        warnings.warn(f"{spec.name} {name}: all token weights were zero (no gradient reached it); "
                      "its heads are left as they are", stacklevel=5)
        return torch.zeros_like(state.sum_outer, device="cpu")
    cov = state.covariance().cpu()
    if not bool(torch.isfinite(cov).all()):
        raise ValueError(f"{spec.name} {name}: covariance contains NaN or Inf (activations overflowed fp32)")
    return cov


def principal_axes(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal per-group transforms from covariances.

    cov: (G, r, r) float64 symmetric PSD. Returns T (G, r, r) float64 whose rows are the eigenvectors by
    descending eigenvalue, each signed so its largest-magnitude entry is positive (deterministic, so runs
    on slightly different sums agree), and the eigenvalues (G, r) float64 descending, clamped at 0.
    eigh runs on C + δI with δ = RELATIVE_DAMPING·tr(C)/r: the eigenvectors are C's, and ill-conditioned
    or singular C neither fails nor gives NaN. An all-zero group gets T = I.
    """
    g, r, _ = cov.shape
    eye = torch.eye(r, dtype=torch.float64).expand(g, r, r)
    delta = RELATIVE_DAMPING * cov.diagonal(dim1=1, dim2=2).sum(-1) / r  # (G,)
    with one_thread():
        evals, evecs = torch.linalg.eigh(cov + delta[:, None, None] * eye)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    idx = evecs.abs().argmax(dim=1, keepdim=True)  # (G, 1, r): row of each column's largest entry
    evecs = evecs * torch.gather(evecs, 1, idx).sign()
    transform, evals = evecs.transpose(1, 2), (evals - delta[:, None]).clamp_min(0)
    zero = delta <= 0
    return torch.where(zero[:, None, None], eye, transform), torch.where(zero[:, None], 0.0, evals)


def principal_axes_many(covs: list[torch.Tensor]) -> list[Axes]:
    """`principal_axes` of each (G_i, r_i, r_i) covariance, with one eigh call per distinct r: eighs of
    small matrices cost mostly per-call (threading) overhead, so the blocks share calls."""
    out: list[Axes | None] = [None] * len(covs)
    by_size: dict[int, list[int]] = {}
    for n, c in enumerate(covs):
        by_size.setdefault(c.shape[-1], []).append(n)
    for idx in by_size.values():
        sizes = [covs[n].shape[0] for n in idx]
        transforms, spectra = principal_axes(torch.cat([covs[n] for n in idx]))
        for n, t, e in zip(idx, transforms.split(sizes), spectra.split(sizes), strict=True):
            out[n] = (t, e)
    return out


def _permutation_matrices(importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """importance (H, hd) -> (permutation matrices (H, hd, hd) float64 sorting each head's dims by
    descending importance, the sorted importance (H, hd))."""
    hd = importance.shape[1]
    order = torch.sort(importance, dim=1, descending=True, stable=True).indices
    return torch.eye(hd, dtype=torch.float64)[order], torch.gather(importance, 1, order)


def _apply_attention(spec: BlockSpec, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                     o_t: torch.Tensor) -> None:
    """Each (H, hd, hd) float64, k_t = q_t^-T and o_t = v_t^-1 (function-preserving; orthogonal criteria
    pass U, U, T, T^T). q_h, k_h, v_h rows and biases <- q_t[h]·, k_t[h]·, v_t[h]·; proj[:, h] <- ·o_t[h]."""
    h, hd = spec.num_heads, spec.head_dim
    for (w, b), t in zip(spec.qkv_weights(), (q_t, k_t, v_t), strict=True):  # views: written in place
        t = t.to(w.device)
        w.copy_(torch.einsum("hij,hjd->hid", t, w.double().view(h, hd, -1)).reshape(w.shape))
        if b is not None:
            b.copy_(torch.einsum("hij,hj->hi", t, b.double().view(h, hd)).reshape(-1))
    proj_w = spec.proj.weight
    o = torch.einsum("ohj,hji->ohi", proj_w.double().view(-1, h, hd), o_t.to(proj_w.device))
    proj_w.copy_(o.reshape(proj_w.shape))


def _permute_mlp(spec: BlockSpec, order: torch.Tensor) -> None:
    """Hidden unit order[n] becomes unit n: fc1 rows and bias, fc2 columns."""
    order = order.to(spec.fc1.weight.device)
    spec.fc1.weight.copy_(spec.fc1.weight[order])
    if spec.fc1.bias is not None:
        spec.fc1.bias.copy_(spec.fc1.bias[order])
    spec.fc2.weight.copy_(spec.fc2.weight[:, order])
