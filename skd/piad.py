"""PIAD: progressive importance-aware dropout training of an ElasticViT super-network.

At the start of each of the first P_e epochs the importance of the current list-end subnet is
re-estimated on a proxy set (`skd.importance`) and the least important droppable units are appended
to the Dropout List until its dropped MACs reach (epoch+1)/P_e of (1 - target_macs) of the full
model. Each batch then trains the subnetwork with the list's first s units dropped, computed at its own
size (ElasticViT's prefix views), so gradients reach the shared super-network weights.

Subnet sampling (every process draws the same from one shared seeded generator): a "strength"
t ∈ [0, 1] is drawn per batch, t = 0 (the full network) with probability 1/4, t = 1 (the smallest
subnet) with probability 1/4, else uniform — a sandwich-style mixture that trains both ends of the
range every few steps. For "piad" the truncation index is s = min(L, floor(t·(L+1))), L the list's
length. The ablation baselines use the same t:

- "random": random truncation with no importance list — t = 0 full, t = 1 every module at its
  smallest width, otherwise each module keeps a uniform random number of its groups in
  [ceil(G·target_macs), G] (computed at its own size);
- "channel_dropout": every MHSA dim (rank index, q/k/v of all heads) and MLP hidden unit is dropped
  independently with probability p = t·(1 - target_macs), one mask per batch, by masking;
- "weighted_channel_dropout": as above with probability min(1, p·w_i), w_i = 2·rank_i/(n-1) ∈ [0, 2]
  the dim's ascending-importance rank within its module (the most important dim is never dropped);
- "layerdrop": every block (both branches) is skipped with probability p = t·(1 - target_macs).

Randomness is re-derived at every epoch start from (seed, epoch, rank) for torch, numpy (timm's Mixup),
Python's `random`, the data order and the subnet sampler, so a checkpoint resumes exactly without
storing generator states, and on any number of processes.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm

from ._checks import check_fraction, check_int
from .elastic import LAYOUT_VERSION, ElasticViT
from .evaluate import EVAL_BATCH_SIZE, correct_count, eval_mode
from .importance import Importance, estimate_importance, extend_dropout_list, macs_per_dim
from .io import load_tensors, save_tensors
from .stats import rank_world
from .subnet import DropoutList, Subnet, group_bound

METHODS = ("piad", "random", "channel_dropout", "weighted_channel_dropout", "layerdrop")
CHECKPOINT_NAME = "piad-last.safetensors"
CHECKPOINT_FORMAT = 1
PROXY_BATCH_SIZE = 128

# on_qkv(block, q, k, v) -> (q, k, v), each (S, H, N, r); on_hidden(block, h (..., kept hidden)) -> h
QkvFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
HiddenFn = Callable[[int, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------ branch taps
class _SDPATap(TorchFunctionMode):
    """Routes the q, k, v of each SDPA call through on_qkv; the i-th call is the i-th active attention block."""

    def __init__(self, blocks: list[int], on_qkv: QkvFn) -> None:
        super().__init__()
        self.blocks, self.on_qkv, self.calls = blocks, on_qkv, 0

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> object:
        if func is F.scaled_dot_product_attention:
            if self.calls >= len(self.blocks):
                raise RuntimeError(f"more attention calls than the {len(self.blocks)} active attention branches")
            args = (*self.on_qkv(self.blocks[self.calls], *args[:3]), *args[3:])
            self.calls += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def branch_taps(elastic: ElasticViT, on_qkv: QkvFn, on_hidden: HiddenFn) -> Iterator[None]:
    """For one ElasticViT forward inside the context, pass each block's q, k, v and MLP hidden units through
    the callbacks (e.g. to mask channels).

    on_qkv(b, q, k, v) gets block b's (S, H, N, r) tensors (r dims kept per head, in rank order) and
    returns the ones attention uses; on_hidden(b, h) likewise for the (..., h) post-activation hidden
    units: a forward hook on each block's `hidden_dropout` (timm's Mlp.drop1), which ElasticViT calls right
    after the activation. ElasticViT runs attention as one `F.scaled_dot_product_attention` call per active
    block, in block order, which a torch-function mode intercepts. Skipped branches are not called.
    """
    blocks = elastic.adapter.blocks
    handles = [spec.hidden_dropout.register_forward_hook(lambda _m, _a, out, b=b: on_hidden(b, out))
               for b, spec in enumerate(blocks)]
    try:
        with _SDPATap([b for b, r in enumerate(elastic.subnet.attn) if r], on_qkv):
            yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------ data
def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, epoch, rank, purpose): independent streams, reproducible anywhere."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class GlobalBatchSampler(Sampler[list[int]]):
    """Index batches of one process: a seeded permutation per epoch, cut into global batches of
    batch_size * world samples, of which this rank takes slice [rank*batch_size, (rank+1)*batch_size).

    One process with batch_size·world therefore sees exactly the union of what `world` processes see.
    Incomplete last global batches are dropped.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int) -> None:
        super().__init__()
        if n < batch_size * world:
            raise ValueError(f"the training set has {n} samples, fewer than one global batch "
                             f"(batch_size {batch_size} x {world} processes)")
        self.n, self.batch_size, self.rank, self.world, self.seed, self.epoch = n, batch_size, rank, world, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch, 0, 1))
        perm = torch.randperm(self.n, generator=gen)
        per_global = self.batch_size * self.world
        for k in range(len(self)):
            start = k * per_global + self.rank * self.batch_size
            yield perm[start : start + self.batch_size].tolist()


def _map_dataset(data: Dataset | DataLoader, what: str) -> Dataset:
    ds = data.dataset if isinstance(data, DataLoader) else data
    if not (isinstance(ds, Dataset) and hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise ValueError(f"{what} must be a map-style Dataset of (image, label) or a DataLoader over one, "
                         f"got {type(data).__name__}")
    return ds


# --------------------------------------------------------------------------------------- trainer
class PIADTrainer:
    """Train an ElasticViT super-network so every subnetwork along its Dropout List is good (or a baseline).

    model: a timm ViT/DeiT/Swin (wrapped here) or an `skd.ElasticViT`, ideally after `skd.wpac`.
    train_data / val_data: a map-style Dataset of (image (C, H, W) float, label int64) or a DataLoader
    of such batches. A Dataset is batched here (`batch_size` per process, a seeded shuffle shared by
    all processes, each taking its slice of every global batch). A DataLoader is used as given (under
    torchrun give each process its own shard); its dataset also supplies the proxy set.
    target_macs: the smallest subnet's MACs as a fraction of the full model, in (0, 1).
    epochs, progressive_epochs (P_e, 1..epochs): training length and how many first epochs grow the list.
    mhsa_groups, mlp_groups: droppable groups per attention (over each head's dims) and per MLP.
    method: one of METHODS (see the module docstring). proxy_samples: images (from train_data, fixed by
    seed) used to estimate importance.
    Recipe (DeiT's defaults): optimizer "adamw", lr = 5e-4 · global batch / 512 when None,
    weight_decay 0.05, cosine schedule per step with warmup_epochs 5 from warmup_lr 1e-6 to min_lr 1e-5,
    label_smoothing 0.1, mixup 0.8 / cutmix 1.0 (timm's Mixup; 0 disables; batch size must be even),
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
        progressive_epochs: int,
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
        self.progressive_epochs = check_int("progressive_epochs", progressive_epochs, 1)
        if progressive_epochs > epochs:
            raise ValueError(f"progressive_epochs={progressive_epochs} must be <= epochs={epochs}")
        if method not in METHODS:
            raise ValueError(f"method={method!r} must be one of {METHODS}")
        self.method = method
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.proxy_samples = check_int("proxy_samples", proxy_samples, 1)
        if (mixup > 0 or cutmix > 0) and batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even batch_size, got {batch_size}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        self.seed, self.progress, self.clip_grad = seed, progress, clip_grad

        self._init_distributed()
        self.rank, self.world = rank_world()
        self.elastic = model if isinstance(model, ElasticViT) else ElasticViT(model)
        self.device = next(self.elastic.parameters()).device
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)
        self.dropout_list = DropoutList([], self.elastic.head_dims, self.elastic.hiddens,
                                        attn_groups=check_int("mhsa_groups", mhsa_groups, 1),
                                        mlp_groups=check_int("mlp_groups", mlp_groups, 1))
        self._per_dim = macs_per_dim(self.elastic)
        floor = self.elastic.macs(Subnet(attn=[0] * len(self.elastic.head_dims), mlp=[0] * len(self.elastic.hiddens)))
        if floor >= self.target_macs * self.elastic.full_macs:
            raise ValueError(f"target_macs={target_macs} is unreachable: the layers outside attention and MLP "
                             f"alone cost {floor / self.elastic.full_macs:.3f} of the MACs")

        self.train_dataset = _map_dataset(train_data, "train_data")
        self.val_data = val_data
        if isinstance(train_data, DataLoader):
            self.loader = train_data
        else:
            self.loader = DataLoader(train_data, batch_sampler=GlobalBatchSampler(
                len(train_data), batch_size, self.rank, self.world, seed))
        self.steps_per_epoch = len(self.loader)
        self._proxy = self._proxy_loader()

        num_classes = self.elastic.model.num_classes
        self.mixup = (Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                            num_classes=num_classes) if mixup > 0 or cutmix > 0 else None)
        if self.mixup is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        per_process = self.loader.batch_size or self.batch_size
        lr = 5e-4 * per_process * self.world / 512 if lr is None else lr
        self.optimizer = create_optimizer_v2(self.elastic, optimizer, lr=lr, weight_decay=weight_decay)
        total = self.epochs * self.steps_per_epoch
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=total, lr_min=min_lr, warmup_t=int(warmup_epochs * self.steps_per_epoch),
            warmup_lr_init=warmup_lr, t_in_epochs=False)
        self._weights: dict[tuple[int, str], torch.Tensor] = {}  # weighted channel dropout: w_i per module
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.checkpoint_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
        if self.rank == 0 and self.checkpoint_path is not None:
            self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.checkpoint_path.exists():
            self._load_checkpoint(self.checkpoint_path)
        elif self.world > 1:
            for p in self.elastic.state_dict().values():
                dist.broadcast(p, 0)  # every rank starts from rank 0's weights

    # ----------------------------------------------------------------------------------- setup
    @staticmethod
    def _init_distributed() -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo")

    def _proxy_loader(self) -> DataLoader:
        """This process's shard of `proxy_samples` training images chosen by seed (no shuffling)."""
        n = min(self.proxy_samples, len(self.train_dataset))
        gen = torch.Generator().manual_seed(_derive_seed(self.seed, 0, 0, 2))
        idx = torch.randperm(len(self.train_dataset), generator=gen)[:n]
        self._proxy_size = n
        return DataLoader(Subset(self.train_dataset, idx[self.rank :: self.world].tolist()),
                          batch_size=PROXY_BATCH_SIZE)

    def _reseed(self, epoch: int) -> torch.Generator:
        """Seed every generator from (seed, epoch, rank); return the subnet sampler shared by all ranks."""
        torch.manual_seed(_derive_seed(self.seed, epoch, self.rank, 3))
        np.random.seed(_derive_seed(self.seed, epoch, self.rank, 4) % 2**32)
        random.seed(_derive_seed(self.seed, epoch, self.rank, 5))
        sampler = getattr(self.loader, "batch_sampler", None) or getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        return torch.Generator().manual_seed(_derive_seed(self.seed, epoch, 0, 6))

    # ---------------------------------------------------------------------------- importance
    def _refresh_importance(self, epoch: int) -> None:
        """Grow the dropout list (piad) or refresh dropout weights (weighted_channel_dropout) for `epoch`."""
        if self.method == "piad":
            imp = estimate_importance(self.elastic, self._proxy, self._proxy_size,
                                      self.dropout_list.subnet(len(self.dropout_list)))
            goal = (epoch + 1) / self.progressive_epochs * (1 - self.target_macs) * self.elastic.full_macs
            extend_dropout_list(self.dropout_list, imp, self._per_dim, goal)
            self.elastic.dropout_list = self.dropout_list
        elif self.method == "weighted_channel_dropout":
            self._weights = self._rank_weights(estimate_importance(self.elastic, self._proxy, self._proxy_size))

    @staticmethod
    def _rank_weights(imp: Importance) -> dict[tuple[int, str], torch.Tensor]:
        """w_i = 2·(ascending importance rank)/(n-1) per module: mean 1, 0 for the least droppable dim."""
        out = {}
        for mod in imp.alpha:
            n = len(imp.alpha[mod])
            rank = torch.empty(n, dtype=torch.float32)
            rank[torch.argsort(imp.dims(mod), descending=True)] = torch.arange(n, dtype=torch.float32)
            out[mod] = 2 * rank / max(n - 1, 1)
        return out

    def list_macs_fraction(self) -> float:
        """MACs of the dropout list's smallest subnet as a fraction of the full model."""
        return self.elastic.macs(self.dropout_list.subnet(len(self.dropout_list))) / self.elastic.full_macs

    # ------------------------------------------------------------------------------- sampling
    @staticmethod
    def _strength(gen: torch.Generator) -> float:
        """t = 0 w.p. 1/4, 1 w.p. 1/4, else U[0, 1) (see the module docstring)."""
        u, v = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        return 0.0 if u < 0.25 else 1.0 if u < 0.5 else v

    def _sample(self, gen: torch.Generator) -> tuple[Subnet, dict[tuple[int, str], torch.Tensor], str]:
        """The step's subnet, channel masks (float (width,) per module; empty unless dropout by masking)
        and a description for error messages."""
        t, el = self._strength(gen), self.elastic
        p = t * (1 - self.target_macs)
        if self.method == "piad":
            s = min(len(self.dropout_list), int(t * (len(self.dropout_list) + 1)))
            return self.dropout_list.subnet(s), {}, f"dropout-list index {s}"
        if self.method == "random":
            dl = self.dropout_list  # used only for its group bounds: its units stay empty
            widths: dict[str, list[int]] = {"attn": [], "mlp": []}
            for m, sizes, groups in (("attn", el.head_dims, dl.attn_groups), ("mlp", el.hiddens, dl.mlp_groups)):
                lo = math.ceil(groups * self.target_macs)
                for n in sizes:
                    keep = groups if t == 0 else lo if t == 1 else int(torch.randint(lo, groups + 1, (1,),
                                                                                     generator=gen))
                    widths[m].append(group_bound(keep, n, groups))
            return Subnet(**widths), {}, "random truncation"
        if self.method == "layerdrop":
            keep = (torch.rand(len(el.head_dims), generator=gen) >= p).tolist()
            return Subnet(attn=[n * k for n, k in zip(el.head_dims, keep, strict=True)],
                          mlp=[n * k for n, k in zip(el.hiddens, keep, strict=True)]), {}, f"layerdrop p={p:.3f}"
        masks = {}
        for b in range(len(el.head_dims)):
            for m, n in (("attn", el.head_dims[b]), ("mlp", el.hiddens[b])):
                weight = self._weights[b, m] if self.method == "weighted_channel_dropout" else torch.ones(n)
                prob = (p * weight).clamp(max=1)
                masks[b, m] = (torch.rand(n, generator=gen) >= prob).to(self.device, torch.float32)
        return Subnet(attn=el.head_dims, mlp=el.hiddens), masks, f"{self.method} p={p:.3f}"

    # -------------------------------------------------------------------------------- training
    def fit(self, max_epochs: int | None = None) -> ElasticViT:
        """Train the remaining epochs (at most `max_epochs` of them, e.g. to fit a time slot; resume later).

        Returns the ElasticViT (eval mode, full width) carrying its dropout_list (None for the baselines).
        """
        stop = self.epochs if max_epochs is None else min(self.epochs, self.start_epoch + max_epochs)
        for epoch in range(self.start_epoch, stop):
            gen = self._reseed(epoch)
            if epoch < self.progressive_epochs and self.method in ("piad", "weighted_channel_dropout"):
                self._refresh_importance(epoch)
            loss = self._train_epoch(epoch, gen)
            record = {"epoch": epoch, "loss": loss}
            if self.method == "piad":
                record |= {"list_units": len(self.dropout_list), "list_macs": self.list_macs_fraction()}
            self.history.append(record)
            self.start_epoch = epoch + 1
            if self.checkpoint_path is not None:
                if self.rank == 0:
                    self._save_checkpoint(self.checkpoint_path, epoch + 1)
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
        subnet, masks, what = self._sample(gen)
        self.elastic.set_subnet(subnet)
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        with ExitStack() as stack:
            if self.amp:
                stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
            if masks:
                stack.enter_context(branch_taps(
                    self.elastic,
                    lambda b, q, k, v: (q * masks[b, "attn"], k * masks[b, "attn"], v * masks[b, "attn"]),
                    lambda b, h: h * masks[b, "mlp"]))
            loss = self.criterion(self.elastic(images).float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = self._average_gradients(loss.detach())
        if not math.isfinite(value):
            where = f"last good checkpoint kept at {self.checkpoint_path}" if self.checkpoint_path else "no checkpoint"
            raise FloatingPointError(f"non-finite loss {value} at step {step} (epoch {step // self.steps_per_epoch}) "
                                     f"with {what}, subnet {subnet}; {where}")
        if self.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.elastic.parameters(), self.clip_grad)
        self.optimizer.step()
        self.scheduler.step_update(step + 1)
        return value

    def _average_gradients(self, loss: torch.Tensor) -> float:
        """Average gradients and the loss over processes with one flat all-reduce; returns the mean loss.

        Every rank trains the same subnet, so the same parameters have gradients (skipped branches have
        none) and the flat layouts agree. The result equals one process on the global batch.
        """
        if self.world == 1:
            return float(loss)
        grads = [p.grad for p in self.elastic.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.float().reshape(1)])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return float(flat[-1])

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
            ds = _map_dataset(data, "data")
            loader = DataLoader(Subset(ds, range(self.rank, len(ds), self.world)), batch_size=EVAL_BATCH_SIZE)
        out = {}
        with eval_mode(self.elastic) as el:
            for f in budgets:
                el.set_subnet(macs=f)
                counts = torch.tensor(correct_count(el, loader, self.device), dtype=torch.float64)
                if self.world > 1 and not isinstance(data, DataLoader):
                    dist.all_reduce(counts)
                out[f] = {"accuracy": float(counts[0] / counts[1]), "macs": el.macs(),
                          "macs_fraction": el.macs() / el.full_macs}
        return out

    # ----------------------------------------------------------------------------- checkpoints
    def _config(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed by this trainer."""
        return {"method": self.method, "target_macs": self.target_macs, "epochs": self.epochs,
                "progressive_epochs": self.progressive_epochs, "attn_groups": self.dropout_list.attn_groups,
                "mlp_groups": self.dropout_list.mlp_groups, "seed": self.seed, "steps_per_epoch": self.steps_per_epoch}

    def _model_signature(self) -> dict[str, Any]:
        return {"layout": LAYOUT_VERSION, "params": {k: list(v.shape) for k, v in self.elastic.state_dict().items()}}

    def _save_checkpoint(self, path: Path, epoch: int) -> None:
        tensors = {f"model.{k}": v for k, v in self.elastic.state_dict().items()}
        opt = self.optimizer.state_dict()
        other_state: dict[str, dict[str, Any]] = {}
        for idx, st in opt["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim.{idx}.{k}"] = v
                else:
                    other_state.setdefault(str(idx), {})[k] = v
        save_tensors(path, tensors, {
            "format": CHECKPOINT_FORMAT, "kind": "piad_checkpoint", "epoch": epoch,
            "config": self._config(), "model": self._model_signature(),
            "optimizer": {"param_groups": opt["param_groups"], "state": other_state},
            "scheduler": self.scheduler.state_dict(), "dropout_list": self.dropout_list.to_json(),
            "weights": {f"{b},{m}": w.tolist() for (b, m), w in self._weights.items()},
            "history": self.history,
        })

    def _load_checkpoint(self, path: Path) -> None:
        tensors, meta = load_tensors(path)
        if meta.get("kind") != "piad_checkpoint" or meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a PIAD checkpoint (format {CHECKPOINT_FORMAT})")
        sig = self._model_signature()
        if meta["model"] != sig:
            theirs, ours = meta["model"]["params"], sig["params"]
            diff = sorted(set(theirs) ^ set(ours)) or [k for k in ours if theirs[k] != ours[k]]
            raise ValueError(f"{path} was written for another model (layout {meta['model']['layout']}, "
                             f"{len(theirs)} tensors; first differences: {diff[:3]}), not this one")
        config = self._config()
        bad = {k: (meta["config"].get(k), v) for k, v in config.items() if meta["config"].get(k) != v}
        if bad:
            raise ValueError(f"{path} was written with other settings (checkpoint, now): {bad}")
        self.elastic.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        for idx, st in meta["optimizer"]["state"].items():
            state.setdefault(int(idx), {}).update(st)
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
        self.scheduler.load_state_dict(meta["scheduler"])
        self.dropout_list = DropoutList.from_json(meta["dropout_list"])
        self.elastic.dropout_list = self.dropout_list if self.method == "piad" else None
        self._weights = {(int(k.split(",")[0]), k.split(",")[1]): torch.tensor(w) for k, w in meta["weights"].items()}
        self.history = meta["history"]
        self.start_epoch = meta["epoch"]
        if self.start_epoch >= self.epochs:
            warnings.warn(f"{path} is already at epoch {self.start_epoch} of {self.epochs}: nothing left to train",
                          stacklevel=3)
