"""PIAD checkpoints: one safetensors file with the model, the optimizer state and the trainer's JSON state.

Tensors: `model.<name>` (the ElasticViT's state_dict, rank-major layout) and `optim.<param index>.<key>`
(tensor entries of the optimizer state). Metadata: format, kind, epoch (epochs done), the trainer
config it must agree with, the model signature (layout version and every tensor's shape), the
optimizer's non-tensor state and param groups, plus whatever the trainer adds (schedule state,
sampler state, history). No generator state: every epoch reseeds from (seed, epoch, rank).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..elastic import LAYOUT_VERSION
from ..io import load_tensors, save_tensors

CHECKPOINT_NAME = "piad-last.safetensors"
CHECKPOINT_FORMAT = 2  # 2: no lr-scheduler state (the schedule is a function of the step)


def model_signature(model: nn.Module) -> dict[str, Any]:
    """The layout version and every state_dict tensor's shape: what a checkpoint's model must match."""
    return {"layout": LAYOUT_VERSION, "params": {k: list(v.shape) for k, v in model.state_dict().items()}}


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    config: dict[str, Any], state: dict[str, Any]) -> None:
    """Write `path` atomically: model and optimizer after `epoch` epochs, the config, and `state` (JSON)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    other_state: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                other_state.setdefault(str(idx), {})[k] = v
    save_tensors(path, tensors, {
        "format": CHECKPOINT_FORMAT, "kind": "piad_checkpoint", "epoch": epoch, "config": config,
        "model": model_signature(model), "optimizer": {"param_groups": opt["param_groups"], "state": other_state},
        **state,
    })


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    config: dict[str, Any]) -> dict[str, Any]:
    """Load `path` into `model` and `optimizer` after checking it was written for this model and config;
    return its metadata (epoch and the trainer's state). ValueError naming the mismatch otherwise."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "piad_checkpoint":
        raise ValueError(f"{path} is not a PIAD checkpoint")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is a PIAD checkpoint of format {meta.get('format')}; this skd reads format "
                         f"{CHECKPOINT_FORMAT} only: start the run again without resume")
    sig = model_signature(model)
    if meta["model"] != sig:
        theirs, ours = meta["model"]["params"], sig["params"]
        diff = sorted(set(theirs) ^ set(ours)) or [k for k in ours if theirs[k] != ours[k]]
        raise ValueError(f"{path} was written for another model (layout {meta['model']['layout']}, "
                         f"{len(theirs)} tensors; first differences: {diff[:3]}), not this one")
    bad = {k: (meta["config"].get(k), v) for k, v in config.items() if meta["config"].get(k) != v}
    if bad:
        raise ValueError(f"{path} was written with other settings (checkpoint, now): {bad}")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, st in meta["optimizer"]["state"].items():
        state.setdefault(int(idx), {}).update(st)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    _state_follows_strides(optimizer)
    return meta


def _state_follows_strides(optimizer: torch.optim.Optimizer) -> None:
    """Give per-element state (exp_avg, ...) its parameter's strides, as the optimizer creates it
    (zeros_like): the file holds it contiguous, and ElasticViT stores proj/fc2 weights column-major
    (skd/elastic/layout.py). Fused AdamW on mismatched strides computes (slightly) differently, so a resumed
    run would no longer be bit-identical to a straight one."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
