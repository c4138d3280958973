"""Save and load super-networks: safetensors for tensors + JSON metadata; atomic writes; no pickle.

File format: one safetensors file whose metadata holds the key "skd" with a JSON document:
    format ("skd"), skd_version, kind ("elastic" | "model" | "extracted" | "tensors"), and for models:
    the adapter's record (`ModelAdapter.record()`: "source" — "timm" when absent, as in files of skd 0.1 —
    and the source's own keys, e.g. timm's architecture and model_args), layout (LAYOUT_VERSION for
    rank-major ElasticViT weights, "timm" for the model's own head-major layout, whatever its library),
    subnet, dropout_list, multiple_of (an ElasticViT's width granularity for budgets; files without it get
    the default), and `extra` (the caller's JSON metadata, e.g. the CLI's class names and training
    history; absent when none),
and the key "skd_sha256" with a JSON document {"metadata": hex, "tensors": {name: hex}}: the SHA-256 of the
"skd" document's text and of every tensor's bytes, so a flipped byte, or a tag (say the layout) edited
without its tensors, is refused on load. Files written before the digests existed have no "skd_sha256"
and load unchecked (only the non-finite check applies).
The tensors are the model's state_dict plus bias compensation's input means (skd.compensation: buffers
outside the state_dict), named "skd_input_mean:<module name>", and cross-head compensation's input
covariances, "skd_input_cov:<module name>", in the file's layout, and the score fits (skd.score_fit:
buffers of the q-producing Linears, in head/rank terms whatever the layout), "skd_score_fit:<module name>";
files without them load as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from . import __version__, compensation, score_fit
from ._atomic import atomic_path
from .elastic import LAYOUT_VERSION, ElasticViT
from .models import adapter_for, rebuild
from .subnet import DropoutList, Subnet

_META_KEY = "skd"
STANDARD_LAYOUT = "timm"  # the model's own head-major layout (named after skd 0.1's only library)
_DIGEST_KEY = "skd_sha256"


def _sha256(t: torch.Tensor) -> str:
    """Hex SHA-256 of a CPU contiguous tensor's raw bytes (as safetensors stores them; any dtype)."""
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _check_finite(path: str | os.PathLike, tensors: dict[str, torch.Tensor], doing: str) -> None:
    """ValueError naming the first floating tensor holding NaN or Inf: such weights give silent garbage."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {name!r} holds NaN or Inf values; refusing to {doing} it")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write `tensors` (name -> tensor, any device/dtype) and JSON-serialisable `metadata` to `path` atomically,
    with the SHA-256 of the metadata and of every tensor (see the module docstring).

    Raises ValueError for metadata that is not JSON, a non-tensor value, or a floating tensor holding NaN/Inf
    (nothing is written then). The file is written to a temporary file in the same folder and renamed over
    `path`, so a crash never leaves a half-written file under `path`. Tensors must not share storage (safetensors rule).
    """
    try:
        meta = json.dumps(metadata)
    except TypeError as e:
        raise ValueError(f"metadata is not JSON-serialisable: {e}") from e
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _check_finite(path, flat, "save")
    digests = json.dumps({"metadata": hashlib.sha256(meta.encode()).hexdigest(),
                          "tensors": {k: _sha256(v) for k, v in flat.items()}})
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(flat, str(tmp), metadata={_META_KEY: meta, _DIGEST_KEY: digests})


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by `save_tensors`: (tensors on CPU, metadata dict). Never unpickles.

    Raises ValueError when the file is truncated, corrupted (a digest disagrees with the metadata or a
    tensor), was not written by skd, its metadata is not a JSON object, or a floating tensor holds NaN/Inf.
    """
    try:
        with safetensors.safe_open(os.fspath(path), framework="pt") as f:
            header = f.metadata() or {}
            raw = header.get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error type for bad headers / short files
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e
    if raw is None:
        raise ValueError(f"{path} has no skd metadata: it was not written by skd")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: skd metadata is not valid JSON: {e}") from e
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: skd metadata must be a JSON object, got {type(metadata).__name__}")
    if _DIGEST_KEY in header:
        _verify(path, raw, header[_DIGEST_KEY], tensors)
    _check_finite(path, tensors, "load")
    return tensors, metadata


def _verify(path: str | os.PathLike, raw_meta: str, raw_digests: str, tensors: dict[str, torch.Tensor]) -> None:
    """ValueError unless the recorded SHA-256 digests match the metadata text and every tensor's bytes."""
    try:
        digests = json.loads(raw_digests)
        meta_digest, tensor_digests = digests["metadata"], dict(digests["tensors"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: its SHA-256 record is malformed ({e}); the file is corrupted") from e
    if hashlib.sha256(raw_meta.encode()).hexdigest() != meta_digest:
        raise ValueError(f"{path}: the skd metadata does not match its SHA-256 (edited or corrupted); refusing it")
    if set(tensor_digests) != set(tensors):
        raise ValueError(f"{path}: the tensor names do not match the SHA-256 record; the file is corrupted")
    bad = [k for k, t in tensors.items() if _sha256(t) != tensor_digests[k]]
    if bad:
        raise ValueError(f"{path}: tensor {bad[0]!r} does not match its SHA-256 "
                         f"({len(bad)} of {len(tensors)} differ): the file is corrupted")


def save(obj: ElasticViT | nn.Module, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> None:
    """Save an ElasticViT (weights in its layout, subnet, dropout list, width granularity `multiple_of`), a
    model from `ElasticViT.extract()` or a bare model of a supported family, atomically. The model is
    recorded by its adapter (no pickle).
    `extra`: JSON-serialisable metadata kept alongside (e.g. the CLI's class names and training history);
    read it back with `load_tensors(path)[1]["extra"]`."""
    if isinstance(obj, ElasticViT):
        if obj.in_standard_layout:  # the weights are head-major right now; the file would claim rank-major
            raise ValueError("obj cannot be saved inside standard_layout(); save it after the block")
        model, adapter, layout = obj.model, obj.adapter, LAYOUT_VERSION
        described = {"kind": "elastic", "subnet": obj.subnet.to_dict(), "multiple_of": obj.multiple_of,
                     "dropout_list": None if obj.dropout_list is None else obj.dropout_list.to_json()}
    elif isinstance(obj, nn.Module):
        model, adapter, layout = obj, adapter_for(obj), STANDARD_LAYOUT
        described = ({"kind": "extracted", "subnet": Subnet.from_dict(obj.skd_subnet).to_dict()}
                     if hasattr(obj, "skd_subnet") else {"kind": "model"})  # skd_subnet: set by ElasticViT.extract()
    else:
        raise ValueError(f"obj must be an ElasticViT or a model, got {type(obj).__name__}")
    metadata = {"format": "skd", "skd_version": __version__, "layout": layout, **described}
    if extra is not None:
        if not isinstance(extra, dict):
            raise ValueError(f"extra must be a dict of JSON metadata, got {type(extra).__name__}")
        metadata["extra"] = extra
    record = adapter.record()
    clash = sorted(record.keys() & metadata.keys())
    if clash:
        raise ValueError(f"{type(adapter).__name__}.record() uses reserved keys {clash}")
    state = model.state_dict()
    with torch.device("meta"):  # what load will rebuild, shapes only: a file that would not load is not written
        try:
            problem = _mismatch(_rebuilt({**metadata, **record}).state_dict(), state)
        except ValueError as e:  # e.g. an extract's subnet that does not fit the rebuilt depth
            problem = str(e)
    if problem:
        raise ValueError(f"{type(adapter).__name__} cannot record how to rebuild this model: from its record, "
                         f"load rebuilds another ({problem})")
    save_tensors(path, {**state, **compensation.means(model), **score_fit.fits(model)}, {**metadata, **record})


def _rebuilt(meta: dict[str, Any]) -> nn.Module:
    """The model a file's metadata describes, before its tensors are loaded: rebuilt from its adapter's record,
    and for a saved extract() shrunk to its subnet (ValueError from the record)."""
    model = rebuild(meta)
    if meta["kind"] == "extracted":
        model = ElasticViT(model).extract(Subnet.from_dict(meta["subnet"]))
    return model


def _mismatch(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> str | None:
    """How the names and shapes of `tensors` differ from the state dict `expected`, or None where they agree."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(k for k in expected.keys() & tensors.keys() if expected[k].shape != tensors[k].shape)
    if not (missing or unexpected or shapes):
        return None
    return f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {shapes[:5]}"


def _restore_buffers(path: str | os.PathLike, model: nn.Module, means: dict[str, torch.Tensor],
                     fits: dict[str, torch.Tensor]) -> None:
    """Set the file's input means and covariances, then its score fits, on `model` (ValueError naming path)."""
    try:
        compensation.restore_means(model, means)
        if fits:
            score_fit.restore_fits(model, adapter_for(model).blocks, fits)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def load(path: str | os.PathLike) -> ElasticViT | nn.Module:
    """Load a file written by `save`: an ElasticViT (rebuilding the model from its adapter's record), or for
    a saved `extract()` the standalone smaller model. Every tensor keeps the dtype it was saved in (e.g. a
    bf16 model loads as bf16).

    Raises ValueError when the file is truncated/corrupted, not an skd model file, written with an
    unknown layout, or when its tensors do not match the architecture its metadata names.
    """
    tensors, meta = load_tensors(path)
    means, fits = compensation.pop_means(tensors), score_fit.pop_fits(tensors)
    if meta.get("format") != "skd" or meta.get("kind") not in ("elastic", "model", "extracted"):
        raise ValueError(f"{path} is not an skd model file (metadata kind={meta.get('kind')!r})")
    if meta.get("layout") not in (LAYOUT_VERSION, STANDARD_LAYOUT):
        raise ValueError(f"{path} has weight layout {meta.get('layout')!r}; this skd reads {LAYOUT_VERSION} and "
                         f"{STANDARD_LAYOUT!r}")
    try:
        model = _rebuilt(meta)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    problem = _mismatch(model.state_dict(), tensors)
    if problem:
        raise ValueError(f"{path}: tensors do not match the rebuilt {type(model).__name__}: {problem}")
    # assign=True everywhere: the model takes the file's tensors themselves, so their dtypes (a bf16 model
    # stays bf16) come back as saved instead of being copied into the freshly built fp32 parameters.
    if meta["kind"] == "extracted":
        if means or fits:
            raise ValueError(f"{path}: an extracted model's file holds input means or score fits (extract() "
                             "folds them)")
        model.load_state_dict(tensors, assign=True)
        _unsaved_buffers_follow(model, tensors)
        return model
    rank_major = meta["layout"] == LAYOUT_VERSION
    if not rank_major:
        model.load_state_dict(tensors, assign=True)
        _restore_buffers(path, model, means, fits)
    elastic = ElasticViT(model)
    if rank_major:  # the file holds the re-laid weights (and means): load them after wrapping
        model.load_state_dict(tensors, assign=True)
        _restore_buffers(path, model, means, fits)
    _unsaved_buffers_follow(model, tensors)
    if meta.get("dropout_list") is not None:
        elastic.dropout_list = DropoutList.from_json(meta["dropout_list"])
    elastic.multiple_of = meta.get("multiple_of")  # absent (older files): the default
    if meta.get("subnet") is not None:
        elastic.set_subnet(subnet=Subnet.from_dict(meta["subnet"]))
    return elastic


def _unsaved_buffers_follow(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Floating buffers the file does not hold (non-persistent ones, e.g. timm Swin's shifted-window
    attn_mask) come out of `rebuild` in fp32. When every floating tensor of the file has one dtype, they
    are cast to it, as `model.to(dtype)` had cast them before saving: a bf16 Swin would otherwise mix a
    float32 mask into its bf16 attention (a dtype error in timm's own forward)."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    for name, buf in list(model.named_buffers()):
        if name not in tensors and buf.is_floating_point() and buf.dtype != dtype:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, buf.to(dtype))
