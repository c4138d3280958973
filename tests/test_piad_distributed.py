"""PIAD under 2 gloo processes: ranks stay identical and match one process on the same global batches
(one 2-process run and one single-process run, shared by the tests).

SGD, not AdamW: Adam divides by sqrt(v) + eps, so on parameters with near-zero gradients (summation-order
differences of ~1e-9) it turns them into update differences of order lr; SGD keeps the comparison at
float rounding and still checks the gradient averaging, sharding and shared subnet sampling.
"""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Subset

N_TRAIN, PER_RANK = 64, 16
KW = dict(epochs=1, progressive_epochs=1, proxy_samples=32, optimizer="sgd", lr=0.01, warmup_epochs=0, mixup=0,
          cutmix=0, progress=False)


def _train(world: int, out: str) -> None:
    """One epoch with val data and a log; saves the weights, the dropout list and the history (val top-1
    counted over both ranks' shares)."""
    from skd.digits import load_digits_split, pretrained_digits_vit
    from skd.piad import PIADTrainer

    train, test = load_digits_split()
    tr = PIADTrainer(pretrained_digits_vit(progress=False), Subset(train, range(N_TRAIN)), Subset(test, range(45)),
                     batch_size=PER_RANK * 2 // world, log_path=out + ".jsonl", **KW)
    model = tr.fit()
    torch.save({"params": model.state_dict(), "list": tr.dropout_list.units, "history": tr.history}, out)


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    """One gloo process running `_train(world, its output path)`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _train(world, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, _digits_vit_trained) -> tuple[dict, dict, dict, Path]:
    """`_train` once under 2 gloo processes and once in this process: (rank 0, rank 1, single, their folder)."""
    tmp = tmp_path_factory.mktemp("piad_gloo")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp)), nprocs=2, join=True)
    _train(1, str(tmp / "single.pt"))
    return (*(torch.load(tmp / f, weights_only=True) for f in ("rank0.pt", "rank1.pt", "single.pt")), tmp)


def test_two_gloo_processes_match_single_process(runs):
    r0, r1, single, _ = runs
    assert r0["list"] == r1["list"] == single["list"]
    worst = 0.0
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k  # ranks identical, bit for bit
        worst = max(worst, (v - single["params"][k]).abs().max().item())
        torch.testing.assert_close(v, single["params"][k], rtol=1e-4, atol=1e-5)
    print("max |2-process - 1-process| =", worst)


def test_two_processes_report_the_same_history_as_one(runs):
    """45 val samples split 23/22 over the ranks: the summed counts give one process's top-1; only rank 0 logs."""
    r0, r1, single, tmp = runs
    r0, r1, single = r0["history"], r1["history"], single["history"]
    assert r0 == r1
    assert {k: r0[0][k] for k in ("val_top1_target", "val_top1_full", "list_units")} == \
        {k: single[0][k] for k in ("val_top1_target", "val_top1_full", "list_units")}
    assert (tmp / "rank0.pt.jsonl").exists() and not (tmp / "rank1.pt.jsonl").exists()
