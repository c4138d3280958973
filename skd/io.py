"""Save and load super-networks: safetensors for tensors + JSON metadata; atomic writes; no pickle.

File format: one safetensors file whose metadata holds a single key "skd" with a JSON document:
    format ("skd"), skd_version, kind ("elastic" | "model" | "extracted" | "tensors"), and for models:
    the adapter's record (`ModelAdapter.record()`: "source" — "timm" when absent, as in files of skd 0.1 —
    and the source's own keys, e.g. timm's architecture and model_args), layout (LAYOUT_VERSION for
    rank-major ElasticViT weights, "timm" for the model's own head-major layout, whatever its library),
    subnet, dropout_list.
"""

from __future__ import annotations

import json
import os
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from . import __version__
from ._atomic import atomic_path
from .elastic import LAYOUT_VERSION, ElasticViT
from .models import adapter_for, rebuild
from .subnet import DropoutList, Subnet

_META_KEY = "skd"
STANDARD_LAYOUT = "timm"  # the model's own head-major layout (named after skd 0.1's only library)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write `tensors` (name -> tensor, any device/dtype) and JSON-serialisable `metadata` to `path` atomically.

    The file is written to a temporary file in the same folder and renamed over `path`, so a crash
    never leaves a half-written file under `path`. Tensors must not share storage (safetensors rule).
    """
    try:
        meta = json.dumps(metadata)
    except TypeError as e:
        raise ValueError(f"metadata is not JSON-serialisable: {e}") from e
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(flat, str(tmp), metadata={_META_KEY: meta})


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by `save_tensors`: (tensors on CPU, metadata). Never unpickles.

    Raises ValueError when the file is truncated, corrupted or was not written by skd.
    """
    try:
        with safetensors.safe_open(os.fspath(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
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
    return tensors, metadata


def save(obj: ElasticViT | nn.Module, path: str | os.PathLike) -> None:
    """Save an ElasticViT (weights in its layout, subnet, dropout list), a model from `ElasticViT.extract()`
    or a bare model of a supported family, atomically. The model is recorded by its adapter (no pickle)."""
    if isinstance(obj, ElasticViT):
        if obj.in_standard_layout:  # the weights are head-major right now; the file would claim rank-major
            raise ValueError("obj cannot be saved inside standard_layout(); save it after the block")
        model, adapter, layout = obj.model, obj.adapter, LAYOUT_VERSION
        extra = {"kind": "elastic", "subnet": obj.subnet.to_dict(),
                 "dropout_list": None if obj.dropout_list is None else obj.dropout_list.to_json()}
    elif isinstance(obj, nn.Module):
        model, adapter, layout = obj, adapter_for(obj), STANDARD_LAYOUT
        extra = ({"kind": "extracted", "subnet": Subnet.from_dict(obj.skd_subnet).to_dict()}
                 if hasattr(obj, "skd_subnet") else {"kind": "model"})  # skd_subnet: set by ElasticViT.extract()
    else:
        raise ValueError(f"obj must be an ElasticViT or a model, got {type(obj).__name__}")
    metadata = {"format": "skd", "skd_version": __version__, "layout": layout, **extra}
    record = adapter.record()
    clash = sorted(record.keys() & metadata.keys())
    if clash:
        raise ValueError(f"{type(adapter).__name__}.record() uses reserved keys {clash}")
    save_tensors(path, model.state_dict(), {**metadata, **record})


def load(path: str | os.PathLike) -> ElasticViT | nn.Module:
    """Load a file written by `save`: an ElasticViT (rebuilding the model from its adapter's record), or for
    a saved `extract()` the standalone smaller model.

    Raises ValueError when the file is truncated/corrupted, not an skd model file, written with an
    unknown layout, or when its tensors do not match the architecture its metadata names.
    """
    tensors, meta = load_tensors(path)
    if meta.get("format") != "skd" or meta.get("kind") not in ("elastic", "model", "extracted"):
        raise ValueError(f"{path} is not an skd model file (metadata kind={meta.get('kind')!r})")
    if meta.get("layout") not in (LAYOUT_VERSION, STANDARD_LAYOUT):
        raise ValueError(f"{path} has weight layout {meta.get('layout')!r}; this skd reads {LAYOUT_VERSION} and "
                         f"{STANDARD_LAYOUT!r}")
    try:
        model = rebuild(meta)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    if meta["kind"] == "extracted":  # rebuild the smaller shape from the full one, then load its weights
        model = ElasticViT(model).extract(Subnet.from_dict(meta["subnet"]))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [k for k in expected.keys() & tensors.keys() if expected[k].shape != tensors[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: tensors do not match the rebuilt {type(model).__name__}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {sorted(shapes)[:5]}")
    if meta["kind"] == "extracted":
        model.load_state_dict(tensors)
        return model
    rank_major = meta["layout"] == LAYOUT_VERSION
    if not rank_major:
        model.load_state_dict(tensors, assign=True)
    elastic = ElasticViT(model)
    if rank_major:  # the file holds the re-laid weights: load them after wrapping
        model.load_state_dict(tensors, assign=True)
    if meta.get("dropout_list") is not None:
        elastic.dropout_list = DropoutList.from_json(meta["dropout_list"])
    if meta.get("subnet") is not None:
        elastic.set_subnet(subnet=Subnet.from_dict(meta["subnet"]))
    return elastic
