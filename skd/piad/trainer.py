"""PIADTrainer: the training loop that composes the schedule, a subnet sampler, the recipe, the data
side, the epoch report and checkpoints (each in its own module of `skd.piad`)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .. import batches
from .._checks import check_fraction, check_int
from .._dist import all_reduce_flat, init_from_env, rank_world
from ..elastic import ElasticViT
from ..evaluate import EVAL_BATCH_SIZE, eval_mode
from ..importance import Importance, estimate_importance
from ..subnet import DropoutList, Subnet
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .data import map_dataset, proxy_loader, reseed, train_loader
from .distill import distillation_loss
from .recipe import OPTIMIZERS, WarmupCosine, build_optimizer, soft_cross_entropy
from .report import EpochReport
from .samplers import METHODS, SAMPLERS, Draw
from .schedule import ProgressiveSchedule

LossFn = Callable[[Any, Any], torch.Tensor]  # loss_fn(output, batch) -> scalar


def check_compile(compile: bool, amp: bool, device: torch.device) -> None:
    """Refuses compiled bf16-autocast training on CUDA (ValueError): inductor's dynamic-shape graphs of ElasticViT's
    training step gave gradients 0.40-0.42 (relative) off eager's and fp32's there, while the same graph compiled
    without inductor (aot_eager) matched exactly, compiled in fp32 to 2-5e-4, and compiled statically to 7e-3, as a
    dense model does (an H200, torch 2.11: benchmarks/RESULTS.md, "NVIDIA H200, session 18"). Eager bf16 training
    and compiled fp32 training stay available; CPU's compiled bf16 gradients match eager's."""
    if compile and amp and device.type == "cuda":
        raise ValueError("compile=True with bf16 autocast on CUDA trains on wrong gradients (inductor's dynamic-shape "
                         "graphs were 0.4 off eager's on an H200, torch 2.11): use compile=False, or amp=False")


class PIADTrainer:
    """Train an ElasticViT super-network so every subnetwork along its Dropout List is good (or a baseline).

    model: a model an adapter serves (timm ViT/DeiT/Swin, HF encoders; wrapped here) or an
    `skd.ElasticViT`, ideally after `skd.wpac`.
    train_data / val_data: a map-style Dataset of samples — (image (C, H, W) float, label int64) tuples or
    dicts of tensors (`input_ids`, `attention_mask`, ..., `labels`), see `skd.batches` — or a DataLoader
    of such batches. A Dataset is batched here (`batch_size` per process, a seeded shuffle shared by all
    processes, each taking its slice of every global batch). A DataLoader is used as given (under
    torchrun give each process its own shard); its dataset also supplies the proxy set.
    loss_fn(output, batch) -> scalar: the task loss (default: label-smoothed cross-entropy on the
    batch's labels for classifiers, else the model adapter's `default_loss`).
    teacher: a frozen copy of the original full model (e.g. `copy.deepcopy(model)` before training);
    each step also distils its output on the same batch (`skd.piad.distill`), and the loss is
    (1 − distill_weight)·task + distill_weight·distillation (distill_weight 1: distillation only, no
    labels needed — what an unlabeled encoder needs).
    target_macs: the smallest subnet's MACs as a fraction of the full model, in (0, 1).
    epochs, progressive_epochs (P_e, 1..epochs; default epochs // 3, at least 1): training length and
    how many first epochs grow the list (`skd.piad.schedule`). mhsa_groups, mlp_groups: droppable groups
    per attention (over each head's dims) and per MLP. method: one of METHODS (`skd.piad.samplers`).
    proxy_samples: samples (from train_data, fixed by seed) used to estimate importance.
    Recipe (`skd.piad.recipe` states the rule: defaults for short fine-tuning of a pretrained model):
    optimizer "adamw" ("sgd"), lr = 5e-4 · global batch / 512 when None, weight_decay 0.05, per-step
    cosine schedule with warmup_epochs (clamped to a tenth of the run) from warmup_lr to min_lr,
    label_smoothing 0.1, mixup / cutmix alphas (image classifiers; off by default, DeiT's 0.8 / 1.0
    suit long runs from scratch; batch size must then be even), clip_grad None (max grad norm),
    amp None (= bf16 autocast on CUDA, off on CPU).
    compile: run the training steps' forwards (the model's, with its backward, and the teacher's) through
    `torch.compile(..., dynamic=True)`: the widths are symbolic (skd/elastic/symbolic.py), so one graph serves
    every width that keeps both branches of every block (full, narrower or mixed), and each pattern of
    skipped branches compiles its own (a width of 0: a Dropout List at a low target drops whole modules, nested,
    so at most one pattern per module; layerdrop any). Each graph costs seconds to a minute of compiling (ViT-S on
    an H200: ~50 s); it pays where an eager step is host-bound, on a GPU (benchmarks/piad_step.py --compile).
    Not with bf16 autocast on CUDA, which raises (`check_compile`: inductor's graphs gave wrong gradients there).
    Evaluation and importance passes stay eager.
    Reporting (`skd.piad.report`): progress bars (training and importance passes) that keep their final
    state when `progress`; one line per epoch when `verbose` (default: as `progress`; loss, lr, list
    MACs, val top-1 at the list target and at full when val_data has labels), both on rank 0 only;
    `trainer.history` (one dict per epoch); `log_path` (appends each epoch's dict as a JSON line, rank
    0) and `on_epoch(record)` (called on every rank after each epoch).
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
        loss_fn: LossFn | None = None,
        teacher: nn.Module | None = None,
        distill_weight: float = 1.0,
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
        mixup: float = 0.0,
        cutmix: float = 0.0,
        clip_grad: float | None = None,
        amp: bool | None = None,
        compile: bool = False,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        seed: int = 0,
        progress: bool = True,
        verbose: bool | None = None,
        log_path: str | os.PathLike | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
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
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} must be one of {OPTIMIZERS}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        if teacher is not None and (not isinstance(teacher, nn.Module) or teacher is model
                                    or teacher is getattr(model, "model", None)):
            raise ValueError(f"teacher must be a separate nn.Module, a frozen copy of the full model (e.g. "
                             f"copy.deepcopy(model) before training), got {type(teacher).__name__}"
                             + (" (the model itself)" if isinstance(teacher, nn.Module) else ""))
        if isinstance(distill_weight, bool) or not isinstance(distill_weight, (int, float)) \
                or not 0 <= distill_weight <= 1:
            raise ValueError(f"distill_weight={distill_weight!r} must be in [0, 1]")
        self.distill_weight = float(distill_weight)
        self.teacher = None if teacher is None else teacher.eval()
        self.loss_fn, self.label_smoothing = loss_fn, label_smoothing
        self.seed, self.clip_grad = seed, clip_grad

        self.device = next(model.parameters()).device
        if teacher is not None and next(teacher.parameters()).device != self.device:
            raise ValueError(f"the teacher is on {next(teacher.parameters()).device}, the model on {self.device}: "
                             "move both to one device")
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)
        check_compile(compile, self.amp, self.device)  # before the model is wrapped: a refused call changes nothing

        init_from_env()
        self.rank, self.world = rank_world()
        self.elastic = model if isinstance(model, ElasticViT) else ElasticViT(model)
        self.adapter = self.elastic.adapter
        # what the steps call: the modules themselves, or compiled wrappers sharing their parameters
        self._student = torch.compile(self.elastic, dynamic=True) if compile else self.elastic
        self._teacher = torch.compile(self.teacher, dynamic=True) if compile and teacher is not None else self.teacher
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
        self._val_labelled = self._labelled(val_data)
        self.loader = train_loader(train_data, batch_size, self.rank, self.world, seed)
        self.steps_per_epoch = len(self.loader)
        self._proxy, self._proxy_size = proxy_loader(self.train_dataset, self.proxy_samples, seed, self.rank,
                                                     self.world)

        num_classes = self.adapter.num_classes
        per_process = self.loader.batch_size or self.batch_size
        self.mixup = None if num_classes is None else self.adapter.mixup(num_classes, mixup, cutmix, label_smoothing)
        lr = 5e-4 * per_process * self.world / 512 if lr is None else lr
        self.optimizer = build_optimizer(self.elastic, optimizer, lr, weight_decay)
        self.lr_schedule = WarmupCosine(lr, self.epochs * self.steps_per_epoch,
                                        int(warmup_epochs * self.steps_per_epoch), warmup_lr, min_lr)
        self.bars = progress and self.rank == 0
        self.report = EpochReport(self.epochs, show=(progress if verbose is None else verbose) and self.rank == 0,
                                  log_path=log_path if self.rank == 0 else None, on_epoch=on_epoch)
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

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per finished epoch (see `skd.piad.report.EpochReport`), restored on resume."""
        return self.report.history

    def list_macs_fraction(self) -> float:
        """MACs of the dropout list's smallest subnet as a fraction of the full model."""
        return self.elastic.macs(self.dropout_list.subnet(len(self.dropout_list))) / self.elastic.full_macs

    def smallest_subnet(self) -> Subnet:
        """The subnet trained at the list target: the list's end ("piad"), else the largest uniform subnet
        within target_macs at the ElasticViT's width granularity (`multiple_of`; the baselines have no list)."""
        if self.method == "piad":
            return self.dropout_list.subnet(len(self.dropout_list))
        with eval_mode(self.elastic) as el:
            return el.set_subnet(macs=self.target_macs).subnet

    def _importance(self, subnet: Subnet | None) -> Importance:
        """Importance of `subnet` on the proxy set under the task loss (not the distillation: a WPAC'd
        model starts equal to its teacher, where relative sensitivities are undefined). loss_fn gives a
        batch mean; importance sums over samples, hence × batch size."""
        loss_fn = None if self.loss_fn is None else (
            lambda output, batch: self.loss_fn(output, batch) * batches.batch_size(batch))
        return estimate_importance(self.elastic, self._proxy, self._proxy_size, subnet, loss_fn,
                                   progress=self.bars)

    # -------------------------------------------------------------------------------- training
    def fit(self, max_epochs: int | None = None) -> ElasticViT:
        """Train the remaining epochs (at most `max_epochs` of them, e.g. to fit a time slot; resume later).

        Returns the ElasticViT (eval mode, full width) carrying its dropout_list (None for the baselines).
        """
        stop = self.epochs if max_epochs is None else min(self.epochs, self.start_epoch + max_epochs)
        for epoch in range(self.start_epoch, stop):
            t0 = time.perf_counter()
            gen = reseed(self.seed, epoch, self.rank, self.loader)
            if self.sampler.uses_importance and self.schedule.refreshes(epoch):
                self.sampler.refresh(self._importance, self.schedule.goal_macs(epoch, self.elastic.full_macs))
            loss = self._train_epoch(epoch, gen)
            record = {"epoch": epoch, "loss": loss, "lr": self.lr_schedule(epoch * self.steps_per_epoch +
                                                                           self.steps_per_epoch - 1)}
            if self.method == "piad":
                record |= {"list_units": len(self.dropout_list), "list_macs": self.list_macs_fraction()}
            if self._val_labelled:
                record |= self._val_metrics()
            self.report.epoch_done(record, seconds=time.perf_counter() - t0)
            self.start_epoch = epoch + 1
            if self.checkpoint_path is not None:
                if self.rank == 0:
                    save_checkpoint(self.checkpoint_path, self.elastic, self.optimizer, epoch + 1, self._config(),
                                    {**self.sampler.state(), "history": self.history})
                if self.world > 1:
                    dist.barrier()
        self.elastic.set_subnet(Subnet(attn=self.elastic.head_dims, mlp=self.elastic.hiddens))
        return self.elastic.eval()

    def _train_epoch(self, epoch: int, gen: torch.Generator) -> float:
        self.elastic.train()
        total, count = 0.0, 0
        bar = tqdm(self.loader, desc=f"PIAD[{self.method}] epoch {epoch + 1}/{self.epochs}",
                   disable=not self.bars)
        for i, batch in enumerate(bar):
            step = epoch * self.steps_per_epoch + i
            loss = self._step(batches.to_device(batch, self.device), step, gen)
            total, count = total + loss, count + 1
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.close()
        return total / max(count, 1)

    def _step(self, batch: Any, step: int, gen: torch.Generator) -> float:
        draw = self.sampler.draw(self.schedule.strength(gen), gen)
        self.elastic.set_subnet(draw.subnet)
        if self.mixup is not None:
            batch = type(batch)(self.mixup(batch[0], batch[1]))  # (images, soft targets)
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext():
            args, kwargs = batches.model_inputs(batch)
            output = self._student(*args, masks=draw.masks or None, **kwargs)
            loss = self._loss(output, batch)
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

    def _loss(self, output: Any, batch: Any) -> torch.Tensor:
        """(1 − w)·task + w·distillation with w = distill_weight when a teacher is given, else the task loss."""
        w = self.distill_weight if self.teacher is not None else 0.0
        loss = torch.zeros((), device=self.device)
        if w < 1:
            loss = loss + (1 - w) * self._task_loss(output, batch)
        if w > 0:
            with torch.no_grad():
                target = batches.call(self._teacher, batch)
            loss = loss + w * distillation_loss(output, target, self.adapter.token_weights(batch))
        return loss

    def _task_loss(self, output: Any, batch: Any) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(output, batch)
        labels = batches.labels(batch)
        if labels is not None and self.adapter.num_classes is not None:
            return soft_cross_entropy(self.adapter.logits(output), labels, self.label_smoothing)
        return self.adapter.default_loss(output, batch)

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
    def _labelled(self, data: Dataset | DataLoader | None) -> bool:
        """Whether top-1 is defined on `data`: a classifier, and data whose first sample has labels."""
        if data is None or self.adapter.num_classes is None:
            return False
        ds = data.dataset if isinstance(data, DataLoader) else data
        first = ds[0] if isinstance(ds, Dataset) and hasattr(ds, "__getitem__") else next(iter(data), None)
        return first is not None and batches.labels(first) is not None

    def _val_metrics(self) -> dict[str, float]:
        """Top-1 on val_data at the list target and at full width (every process, its share of a Dataset)."""
        loader, shared = self._eval_loader(self.val_data), not isinstance(self.val_data, DataLoader)
        full = Subnet(attn=self.elastic.head_dims, mlp=self.elastic.hiddens)
        return {"val_top1_target": self._accuracy(loader, self.smallest_subnet(), shared),
                "val_top1_full": self._accuracy(loader, full, shared)}

    def _eval_loader(self, data: Dataset | DataLoader) -> DataLoader:
        """A DataLoader as given; a Dataset's share of this process (every world-th sample), in order."""
        if isinstance(data, DataLoader):
            return data
        ds = map_dataset(data, "data")
        return DataLoader(Subset(ds, range(self.rank, len(ds), self.world)), batch_size=EVAL_BATCH_SIZE)

    @torch.no_grad()
    def _accuracy(self, loader: DataLoader, subnet: Subnet, shared: bool) -> float:
        """Top-1 accuracy of `subnet` over `loader`; shared: each process holds a share, counts are summed."""
        counts = torch.zeros(2, dtype=torch.float64)
        with eval_mode(self.elastic) as el:
            el.set_subnet(subnet)
            for batch in loader:
                batch = batches.to_device(batch, self.device)
                pred = self.adapter.logits(batches.call(el, batch)).argmax(-1)
                counts += torch.tensor([int((pred == batches.labels(batch)).sum()), len(pred)], dtype=torch.float64)
        if shared:
            all_reduce_flat([counts])
        return float(counts[0] / counts[1])

    def evaluate(self, data: Dataset | DataLoader | None = None,
                 budgets: Iterable[float] = (1 / 3, 1 / 2, 2 / 3, 1)) -> dict[float, dict[str, float]]:
        """Top-1 accuracy at each MACs budget (default data: val_data; batches with labels).

        Each budget f selects the largest subnet with MACs <= f · full (along the dropout list for "piad",
        uniform widths otherwise). Returns {f: {"accuracy": [0, 1], "macs": per sample, "macs_fraction"}}.
        Under torch.distributed each process scores its share (of a Dataset) and the counts are summed.
        """
        data = self.val_data if data is None else data
        if data is None:
            raise ValueError("evaluate() needs data (no val_data was given)")
        loader = self._eval_loader(data)
        out = {}
        with eval_mode(self.elastic) as el:
            for f in budgets:
                subnet = el.set_subnet(macs=f).subnet
                out[f] = {"accuracy": self._accuracy(loader, subnet, shared=not isinstance(data, DataLoader)),
                          "macs": el.macs(subnet), "macs_fraction": el.macs(subnet) / el.full_macs}
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
        self.report.history = meta["history"]
        self.start_epoch = meta["epoch"]
        if self.start_epoch >= self.epochs:
            warnings.warn(f"{path} is already at epoch {self.start_epoch} of {self.epochs}: nothing left to train",
                          stacklevel=3)
