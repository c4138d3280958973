"""The built-in default: scikit-learn's handwritten digits as images, and a small timm ViT trained on them.

The digits ship with scikit-learn (1,797 8×8 grey images), so tests and the demo need no download.
`vit_digits` is registered with timm, so `timm.create_model("vit_digits")` builds it like any other
timm model; `pretrained_digits_vit()` trains it once and caches the weights on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ._atomic import atomic_path

IMAGE_SIZE = 32
NUM_CLASSES = 10
VIT_DIGITS_KWARGS = dict(
    img_size=IMAGE_SIZE, patch_size=4, in_chans=3, num_classes=NUM_CLASSES,
    embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0,
)
TRAIN_RECIPE = dict(epochs=30, batch_size=64, lr=2e-3, weight_decay=0.05, seed=0)


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The digits as (train, test) TensorDatasets of (images (N, 3, 32, 32) fp32, labels (N,) int64).

    Images are scaled to [0, 1], normalised with mean 0.5 / std 0.5, upsampled bilinearly to 32×32 and
    repeated over 3 channels so the pipeline matches RGB ImageFolder data. The split is stratified.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return TensorDataset(images[idx_train], labels[idx_train]), TensorDataset(images[idx_test], labels[idx_test])


def cache_dir() -> Path:
    """Where trained digits weights are cached: $SKD_CACHE, else ~/.cache/skd."""
    return Path(os.environ.get("SKD_CACHE", Path.home() / ".cache" / "skd"))


def cached_weights_path() -> Path:
    """The cache file; its name hashes the architecture and recipe so a change retrains."""
    key = json.dumps([VIT_DIGITS_KWARGS, TRAIN_RECIPE, torch.__version__.split("+")[0]], sort_keys=True)
    return cache_dir() / f"vit_digits-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"


# timm's pretrained loader reads this local file (no hub id, no url: nothing is ever downloaded).
default_cfgs = generate_default_cfgs({
    "vit_digits": dict(
        file=str(cached_weights_path()), num_classes=NUM_CLASSES, input_size=(3, IMAGE_SIZE, IMAGE_SIZE),
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv="patch_embed.proj", classifier="head",
        crop_pct=1.0,  # the digits fill the frame: timm's default 0.875 (resize 32->36, crop) loses 1.6 pts
    )
})


@register_model
def vit_digits(pretrained: bool = False, **kwargs: object) -> VisionTransformer:
    """A 4-block, 3-head (head_dim 32, MLP 384) ViT for 32×32 digits. `pretrained=True` loads the weights
    `pretrained_digits_vit()` cached (no download: it fails at once if the cache is empty)."""
    weights = (kwargs.get("pretrained_cfg_overlay") or {}).get("file", cached_weights_path())
    if pretrained and not Path(weights).exists():
        raise FileNotFoundError(f"no trained vit_digits weights at {weights}: "
                                "run skd.digits.pretrained_digits_vit() once to train and cache them")
    return build_model_with_cfg(VisionTransformer, "vit_digits", pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **{**VIT_DIGITS_KWARGS, **kwargs})


def shift_augment(images: torch.Tensor, max_shift: int = 3) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels per image (border filled with the background)."""
    pad = F.pad(images, [max_shift] * 4, value=-1.0)
    n, _, h, w = images.shape
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n))
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TensorDataset, batch_size: int = 256) -> float:
    """Top-1 accuracy (in [0, 1]) of `model` on a TensorDataset of (images, labels)."""
    model.eval()
    correct = 0
    for images, labels in DataLoader(data, batch_size=batch_size):
        correct += int((model(images).argmax(-1) == labels).sum())
    return correct / len(data)


def train_digits_vit(train: TensorDataset | None = None, progress: bool = True) -> VisionTransformer:
    """Trains `vit_digits` from scratch with TRAIN_RECIPE (AdamW, cosine with warm-up, label smoothing,
    random shifts) and returns it in eval mode."""
    if train is None:
        train = load_digits_split()[0]
    r = TRAIN_RECIPE
    gen = torch.Generator().manual_seed(r["seed"])
    torch.manual_seed(r["seed"])
    model = vit_digits()
    opt = create_optimizer_v2(model, "adamw", lr=r["lr"], weight_decay=r["weight_decay"])
    loader = DataLoader(train, batch_size=r["batch_size"], shuffle=True, generator=gen, drop_last=True)
    sched = CosineLRScheduler(opt, t_initial=r["epochs"] * len(loader), warmup_t=len(loader), t_in_epochs=False)
    model.train()
    step = 0
    for _ in tqdm(range(r["epochs"]), desc="train vit_digits", disable=not progress):
        for images, labels in loader:
            loss = F.cross_entropy(model(shift_augment(images)), labels, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
    return model.eval()


def pretrained_digits_vit(progress: bool = True, **create_kwargs: object) -> VisionTransformer:
    """The trained digits ViT: loaded through timm (`pretrained=True`) from the cache, trained and cached
    first if the cache is empty. The cache file is written atomically. `create_kwargs` go to
    timm.create_model as for any pretrained timm model: num_classes=N gives a new head, img_size=S resamples
    the position embeddings."""
    path = cached_weights_path()
    if not path.exists():
        from safetensors.torch import save_file

        model = train_digits_vit(progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(model.state_dict(), str(tmp))
    import timm

    return timm.create_model("vit_digits", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **create_kwargs).eval()
