"""PIADTrainer: the training loop that composes the schedule, a subnet sampler, the recipe, the data
side and checkpoints (each in its own module of `skd.piad`)."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .._checks import check_fraction, check_int
from .._dist import all_reduce_flat, init_from_env, rank_world
from ..elastic import ElasticViT
from ..evaluate import EVAL_BATCH_SIZE, correct_count, eval_mode
from ..importance import estimate_importance
from ..subnet import DropoutList, Subnet
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .data import map_dataset, proxy_loader, reseed, train_loader
from .recipe import WarmupCosine, build_mixup, build_optimizer, soft_cross_entropy
from .samplers import METHODS, SAMPLERS, Draw
from .schedule import ProgressiveSchedule
from .taps import masked


class PIADTrainer:
    """Train an ElasticViT super-network so every subnetwork along its Dropout List is good (or a baseline).

    model: a timm ViT/DeiT/Swin (wrapped here) or an `skd.ElasticViT`, ideally after `skd.wpac`.
    train_data / val_data: a map-style Dataset of (image (C, H, W) float, label int64) or a DataLoader
    of such batches. A Dataset is batched here (`batch_size` per process, a seeded shuffle shared by
    all processes, each taking its slice of every global batch). A DataLoader is used as given (under
    torchrun give each process its own shard); its dataset also supplies the proxy set.
    target_macs: the smallest subnet's MACs as a fraction of the full model, in (0, 1).
    epochs, progressive_epochs (P_e, 1..epochs; default epochs // 3, at least 1): training length and how
    many first epochs grow the list (`skd.piad.schedule`). mhsa_groups, mlp_groups: droppable groups per attention (over each head's
    dims) and per MLP. method: one of METHODS (`skd.piad.samplers`). proxy_samples: images (from
    train_data, fixed by seed) used to estimate importance.
    Recipe (DeiT's defaults): optimizer "adamw", lr = 5e-4 · global batch / 512 when None,
    weight_decay 0.05, cosine schedule per step with warmup_epochs 5 from warmup_lr 1e-6 to min_lr 1e-5,
    label_smoothing 0.1, mixup 0.8 / cutmix 1.0 (0 disables; batch size must be even),
    clip_grad None (max grad norm), amp None (= bf16 autocast on CUDA, off on CPU).
    checkpoint_dir: where `piad-last.safetensors` is written atomically after every epoch (rank 0);
    resume=True continues from it (bit-identical on CPU to an uninterrupted run).
    Under torchrun (WORLD_SIZE > 1) the process group is initialised (nccl on CUDA, gloo on CPU) unless
    it already is; gradients are averaged with one all-reduce per step.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset | DataLoader,
        val_data: Dataset | DataLoader | None = None,
        *,
        target_macs: float = 1 / 3,
        epochs: int,
        progressive_epochs: int | None = None,
        mhsa_groups: int = 8,
        mlp_groups: int = 32,
        method: str = "piad",
        batch_size: int = 64,
        proxy_samples: int = 1024,
        optimizer: str = "adamw",
        lr: float | None = None,
        weight_decay: float = 0.05,
        warmup_epochs: float = 5,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        label_smoothing: float = 0.1,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        clip_grad: float | None = None,
        amp: bool | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.target_macs = check_fraction("target_macs", target_macs, include_one=False)
        self.epochs = check_int("epochs", epochs, 1)
        if progressive_epochs is None:
            progressive_epochs = max(1, epochs // 3)
        self.progressive_epochs = check_int("progressive_epochs", progressive_epochs, 1)
        if progressive_epochs > epochs:
            raise ValueError(f"progressive_epochs={progressive_epochs} must be <= epochs={epochs}")
        if method not in METHODS:
            raise ValueError(f"method={method!r} must be one of {METHODS}")
        self.method = method
        self.schedule = ProgressiveSchedule(self.target_macs, self.progressive_epochs)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.proxy_samples = check_int("proxy_samples", proxy_samples, 1)
        if (mixup > 0 or cutmix > 0) and batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even batch_size, got {batch_size}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        self.seed, self.progress, self.clip_grad = seed, progress, clip_grad

        init_from_env()
        self.rank, self.world = rank_world()
        self.elastic = model if isinstance(model, ElasticViT) else ElasticViT(model)
        self.device = next(self.elastic.parameters()).device
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)
        floor = self.elastic.macs(Subnet(attn=[0] * len(self.elastic.head_dims), mlp=[0] * len(self.elastic.hiddens)))
        if floor >= self.target_macs * self.elastic.full_macs:
            raise ValueError(f"target_macs={target_macs} is unreachable: the layers outside attention and MLP "
                             f"alone cost {floor / self.elastic.full_macs:.3f} of the MACs")
        dropout_list = DropoutList([], self.elastic.head_dims, self.elastic.hiddens,
                                   attn_groups=check_int("mhsa_groups", mhsa_groups, 1),
                                   mlp_groups=check_int("mlp_groups", mlp_groups, 1))
        self.sampler = SAMPLERS[method](self.elastic, dropout_list, self.target_macs)

        self.train_dataset = map_dataset(train_data, "train_data")
        self.val_data = val_data
        self.loader = train_loader(train_data, batch_size, self.rank, self.world, seed)
        self.steps_per_epoch = len(self.loader)
        self._proxy, self._proxy_size = proxy_loader(self.train_dataset, self.proxy_samples, seed, self.rank,
                                                     self.world)

        self.mixup = build_mixup(mixup, cutmix, label_smoothing, self.elastic.model.num_classes)
        self.label_smoothing = label_smoothing
        per_process = self.loader.batch_size or self.batch_size
        lr = 5e-4 * per_process * self.world / 512 if lr is None else lr
        self.optimizer = build_optimizer(self.elastic, optimizer, lr, weight_decay)
        self.lr_schedule = WarmupCosine(lr, self.epochs * self.steps_per_epoch,
                                        int(warmup_epochs * self.steps_per_epoch), warmup_lr, min_lr)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.checkpoint_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
        if self.rank == 0 and self.checkpoint_path is not None:
            self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.checkpoint_path.exists():
            self._resume(self.checkpoint_path)
        elif self.world > 1:
            for p in self.elastic.state_dict().values():
                dist.broadcast(p, 0)  # every rank starts from rank 0's weights

    @property
    def dropout_list(self) -> DropoutList:
        """The Dropout List (grown by "piad"; empty for the baselines)."""
        return self.sampler.dropout_list

    def list_macs_fraction(self) -> float:
        """MACs of the dropout list's smallest subnet as a fraction of the full model."""
        return self.elastic.macs(self.dropout_list.subnet(len(self.dropout_list))) / self.elastic.full_macs

    def _estimate(self, subnet: Subnet | None) -> Any:
        return estimate_importance(self.elastic, self._proxy, self._proxy_size, subnet)

    # -------------------------------------------------------------------------------- training
    def fit(self, max_epochs: int | None = None) -> ElasticViT:
        """Train the remaining epochs (at most `max_epochs` of them, e.g. to fit a time slot; resume later).

        Returns the ElasticViT (eval mode, full width) carrying its dropout_list (None for the baselines).
        """
        stop = self.epochs if max_epochs is None else min(self.epochs, self.start_epoch + max_epochs)
        for epoch in range(self.start_epoch, stop):
            gen = reseed(self.seed, epoch, self.rank, self.loader)
            if self.sampler.uses_importance and self.schedule.refreshes(epoch):
                self.sampler.refresh(self._estimate, self.schedule.goal_macs(epoch, self.elastic.full_macs))
            record = {"epoch": epoch, "loss": self._train_epoch(epoch, gen)}
            if self.method == "piad":
                record |= {"list_units": len(self.dropout_list), "list_macs": self.list_macs_fraction()}
            self.history.append(record)
            self.start_epoch = epoch + 1
            if self.checkpoint_path is not None:
                if self.rank == 0:
                    save_checkpoint(self.checkpoint_path, self.elastic, self.optimizer, epoch + 1, self._config(),
                                    {**self.sampler.state(),
                                     "history": self.history})
                if self.world > 1:
                    dist.barrier()
        self.elastic.set_subnet(Subnet(attn=self.elastic.head_dims, mlp=self.elastic.hiddens))
        return self.elastic.eval()

    def _train_epoch(self, epoch: int, gen: torch.Generator) -> float:
        self.elastic.train()
        total, count = 0.0, 0
        bar = tqdm(self.loader, desc=f"PIAD[{self.method}] epoch {epoch + 1}/{self.epochs}",
                   disable=not self.progress or self.rank != 0, leave=False)
        for i, (images, labels) in enumerate(bar):
            step = epoch * self.steps_per_epoch + i
            loss = self._step(images.to(self.device), labels.to(self.device), step, gen)
            total, count = total + loss, count + 1
            bar.set_postfix(loss=f"{loss:.4f}")
        return total / max(count, 1)

    def _step(self, images: torch.Tensor, labels: torch.Tensor, step: int, gen: torch.Generator) -> float:
        draw = self.sampler.draw(self.schedule.strength(gen), gen)
        self.elastic.set_subnet(draw.subnet)
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        with ExitStack() as stack:
            if self.amp:
                stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
            if draw.masks:
                stack.enter_context(masked(self.elastic, draw.masks))
            loss = soft_cross_entropy(self.elastic(images), targets, self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = self._average_gradients(loss.detach())
        if not math.isfinite(value):
            self._non_finite(value, step, draw)
        if self.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.elastic.parameters(), self.clip_grad)
        self.lr_schedule.apply(self.optimizer, step)
        self.optimizer.step()
        return value

    def _non_finite(self, value: float, step: int, draw: Draw) -> None:
        where = f"last good checkpoint kept at {self.checkpoint_path}" if self.checkpoint_path else "no checkpoint"
        raise FloatingPointError(f"non-finite loss {value} at step {step} (epoch {step // self.steps_per_epoch}) "
                                 f"with {draw.what}, subnet {draw.subnet}; {where}")

    def _average_gradients(self, loss: torch.Tensor) -> float:
        """Average gradients and the loss over processes with one flat all-reduce; returns the mean loss.

        Every rank trains the same subnet, so the same parameters have gradients (skipped branches have
        none) and the flat layouts agree. The result equals one process on the global batch.
        """
        mean = loss.float().reshape(1).clone()
        all_reduce_flat([p.grad for p in self.elastic.parameters() if p.grad is not None] + [mean],
                        dtype=torch.float32, average=True)
        return float(mean)

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data: Dataset | DataLoader | None = None,
                 budgets: Iterable[float] = (1 / 3, 1 / 2, 2 / 3, 1)) -> dict[float, dict[str, float]]:
        """Top-1 accuracy at each MACs budget (default data: val_data).

        Each budget f selects the largest subnet with MACs <= f · full (along the dropout list for "piad",
        uniform widths otherwise). Returns {f: {"accuracy": [0, 1], "macs": per image, "macs_fraction"}}.
        Under torch.distributed each process scores its share (of a Dataset) and the counts are summed.
        """
        data = self.val_data if data is None else data
        if data is None:
            raise ValueError("evaluate() needs data (no val_data was given)")
        if isinstance(data, DataLoader):
            loader = data
        else:
            ds = map_dataset(data, "data")
            loader = DataLoader(Subset(ds, range(self.rank, len(ds), self.world)), batch_size=EVAL_BATCH_SIZE)
        out = {}
        with eval_mode(self.elastic) as el:
            for f in budgets:
                el.set_subnet(macs=f)
                counts = torch.tensor(correct_count(el, loader, self.device), dtype=torch.float64)
                if not isinstance(data, DataLoader):
                    all_reduce_flat([counts])
                out[f] = {"accuracy": float(counts[0] / counts[1]), "macs": el.macs(),
                          "macs_fraction": el.macs() / el.full_macs}
        return out

    # ----------------------------------------------------------------------------- checkpoints
    def _config(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed by this trainer."""
        return {"method": self.method, "target_macs": self.target_macs, "epochs": self.epochs,
                "progressive_epochs": self.progressive_epochs, "attn_groups": self.dropout_list.attn_groups,
                "mlp_groups": self.dropout_list.mlp_groups, "seed": self.seed, "steps_per_epoch": self.steps_per_epoch,
                "lr_schedule": dataclasses.asdict(self.lr_schedule)}

    def _resume(self, path: Path) -> None:
        meta = load_checkpoint(path, self.elastic, self.optimizer, self._config())
        self.sampler.load_state(meta)
        self.history = meta["history"]
        self.start_epoch = meta["epoch"]
        if self.start_epoch >= self.epochs:
            warnings.warn(f"{path} is already at epoch {self.start_epoch} of {self.epochs}: nothing left to train",
                          stacklevel=3)
