"""Training that reports itself: the per-epoch record, its one-line summary, the JSONL log, the callback.

A record (one per finished epoch, in `PIADTrainer.history`) holds: epoch (0-based index), loss (mean
training loss over the epoch's steps), lr (at the epoch's last step); for "piad" list_units and
list_macs (the Dropout List's length and its smallest subnet's MACs fraction); with labelled val data
val_top1_target and val_top1_full (top-1 in [0, 1] at the list target — the list's end, or the largest
uniform subnet within target_macs for the baselines — and at full width). Records are deterministic
(a resumed run's history equals an uninterrupted one's), so the epoch's wall time goes to the line only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def format_line(record: dict[str, Any], epochs: int, seconds: float) -> str:
    """One human line, e.g. "epoch 3/10  loss 0.8123  lr 4.1e-05  list 0.150 MACs (57 units)  val top-1 91.2 %
    at the list target, 97.8 % at full  (12 s)"."""
    parts = [f"epoch {record['epoch'] + 1}/{epochs}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
    if "list_macs" in record:
        parts.append(f"list {record['list_macs']:.3f} MACs ({record['list_units']} units)")
    if "val_top1_target" in record:
        parts.append(f"val top-1 {100 * record['val_top1_target']:.1f} % at the list target, "
                     f"{100 * record['val_top1_full']:.1f} % at full")
    return "  ".join(parts) + f"  ({seconds:.0f} s)"


class EpochReport:
    """Keeps the history and reports each finished epoch.

    epochs: the run's length (for "epoch k/N"); show: print the line (through tqdm, so bars stay
    intact); log_path: append each record as one JSON line (None: no log; give it on rank 0 only);
    on_epoch(record): called after each epoch (on every process).
    """

    def __init__(self, epochs: int, show: bool, log_path: str | os.PathLike | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> None:
        if on_epoch is not None and not callable(on_epoch):
            raise ValueError(f"on_epoch must be callable, got {type(on_epoch).__name__}")
        self.epochs, self.show, self.on_epoch = epochs, show, on_epoch
        self.log_path = None if log_path is None else Path(log_path)
        self.history: list[dict[str, Any]] = []

    def epoch_done(self, record: dict[str, Any], seconds: float) -> None:
        """Append `record` to the history and report it; `seconds`: the epoch's wall time (line only)."""
        self.history.append(record)
        if self.show:
            tqdm.write(format_line(record, self.epochs, seconds))
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.on_epoch is not None:
            self.on_epoch(record)
