"""Distributed calibration: 2 gloo processes on CPU, each reading its own shard, give the same
statistics and the same transformed weights (and bias compensation's means) as one process on all the
samples; so do the explicit-attention pass's statistics (joint Q/K rotation, stored score fits)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.models.vision_transformer import VisionTransformer

import skd
from skd import compensation
from skd import score_fit as fits
from skd.models import adapter_for

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
# label -> skd.wpac arguments
RUNS = {"wpac": dict(criterion="wpac"), "hessian": dict(criterion="hessian"),
        "wpac+": dict(criterion="wpac+", compensate=True),
        "wpac+joint": dict(criterion="wpac+", compensate=True, joint_qk=True, score_fit=True)}
WORLD = 2


def _setup() -> tuple[VisionTransformer, torch.Tensor, torch.Tensor]:
    """The same model and 40 samples in every process."""
    torch.manual_seed(0)
    model = VisionTransformer(**TINY).eval()
    return model, torch.randn(40, 3, 32, 32), torch.randint(0, 5, (40,))


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _shard(x: torch.Tensor, y: torch.Tensor, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank r's batches of its shard, as a DistributedSampler would give."""
    shard = slice(rank * 20, (rank + 1) * 20)
    return _batches(x[shard], y[shard])


def _stratified(model: VisionTransformer, data: list, kwargs: dict) -> tuple[dict, int]:
    """(state_dict, compensation means and score fits, samples used) of skd.wpac on a copy of model."""
    m = skd.wpac(copy.deepcopy(model), data, num_samples=40, progress=False, **kwargs)
    stored = {f"fit:{s.name}": fits.score_fit(fits.q_linear(s)) for s in adapter_for(m).blocks}
    return {**m.state_dict(), **compensation.means(m), **{k: v for k, v in stored.items() if v is not None}}, \
        m.skd_report.samples


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, x, y = _setup()
        for label, kwargs in RUNS.items():
            state, samples = _stratified(model, _shard(x, y, rank), kwargs)
            torch.save({"state": state, "samples": samples}, Path(out_dir) / f"{label}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    model, x, y = _setup()
    # The same thread count as the workers: the CPU kernels split a batch's fp32 sums by thread, so another
    # count rounds differently, and the eigenvectors of near-degenerate heads amplify that past 1e-6.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The shards' batches interleaved: the same batches (so the same fp32 sums within each), and the score
        # fit's first quarter of the samples is each shard's first quarter, as each process reads it.
        interleaved = [b for pair in zip(*(_shard(x, y, r) for r in range(WORLD)), strict=True) for b in pair]
        singles = {label: _stratified(model, interleaved, kwargs)[0] for label, kwargs in RUNS.items()}
    finally:
        torch.set_num_threads(threads)
    assert any(k.startswith("fit:") for k in singles["wpac+joint"])
    for criterion, single in singles.items():
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"{criterion}-{rank}.pt", weights_only=True)
            assert got["samples"] == 40
            for name, ref in single.items():
                err = float((got["state"][name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                assert err <= 1e-6, f"{criterion} rank {rank} {name}: relative difference {err:.2e}"
