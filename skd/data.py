"""Datasets for the command line and the demo: the built-in digits, or an ImageFolder (one sub-folder of
images per class) read with the evaluation transforms of the model's own input size and normalisation.

Labels must mean what the model's head means: an ImageFolder's classes are matched by NAME against the
class names recorded with the model (`class_names`), or, when none were recorded, their number must equal
the head's outputs. A file that is not a readable image is an error naming it, or is skipped and counted
(`skip_bad_images`), never silently replaced by its neighbour.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

MIN_CLASSES = 2


class BadImageError(ValueError):
    """A file in an ImageFolder that PIL cannot decode; the message names it."""


def model_input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) of the images `model` takes: its ACTUAL size (a timm ViT built with img_size=32 takes 32×32
    even though its default pretrained config says 224), from timm's patch embedding, else a HF config's
    image_size, else the pretrained config's input_size."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)  # timm ViT / DeiT / Swin
    if size is None:
        size = getattr(getattr(model, "config", None), "image_size", None)  # transformers ViT / DeiT
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:]
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _eval_transform(model: nn.Module, image_config: dict[str, Any] | None) -> Callable:
    """timm's evaluation transform for `model`'s mean/std/interpolation/crop_pct at its actual input size;
    `image_config` (timm data-config keys, e.g. a HF image processor's mean/std) overrides them."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"input_size": (3, *model_input_size(model)), **(image_config or {})},
                                 model=model)
    return create_transform(**config, is_training=False)


def _readable(path: str) -> str | None:
    """None if PIL decodes the image at `path`, else why not."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return f"{type(e).__name__}: {e}"
    return None


class ImageFolder(Dataset):
    """(image (3, H, W) fp32, label int) samples of an ImageFolder; `class_names[label]` names each label.

    samples: [(path, label)]. A sample whose file cannot be decoded raises BadImageError naming the file.
    """

    def __init__(self, samples: list[tuple[str, int]], class_names: list[str], transform: Callable) -> None:
        self.samples, self.class_names, self.transform = samples, class_names, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
            raise BadImageError(f"{path}: not a readable image ({type(e).__name__}: {e}); "
                                "remove it or pass --skip-bad-images") from e
        return self.transform(image), label


def _labels(root: Path, found: Sequence[str], head: int | None, class_names: Sequence[str] | None) -> list[str]:
    """The class names the model's labels mean, after checking the folder's classes `found` against them."""
    if len(found) < MIN_CLASSES:
        raise ValueError(f"--data {root}: {len(found)} class folder(s) ({', '.join(found) or 'none'}); "
                         f"classification needs at least {MIN_CLASSES}")
    if class_names is not None:
        unknown = [c for c in found if c not in class_names]
        if unknown:
            raise ValueError(f"--data {root}: class folder(s) {unknown[:5]} are not among the {len(class_names)} "
                             f"classes the model was trained on ({list(class_names)[:10]}...)")
        return list(class_names)
    if head is not None and len(found) != head:
        raise ValueError(f"--data {root}: {len(found)} class folders but the model's head has {head} outputs "
                         "(and no class names were recorded to match them by name); a missing or extra class "
                         "would shift every label. Give a folder with exactly those classes, or make a new head "
                         "with `skd wpac MODEL --num-classes N`")
    return list(found)


def image_folder(root: str | os.PathLike, model: nn.Module, *, num_classes: int | None = None,
                 class_names: Sequence[str] | None = None, skip_bad_images: bool = False,
                 image_config: dict[str, Any] | None = None) -> ImageFolder:
    """The ImageFolder at `root` for `model`: resized to the model's actual input size and normalised as its
    timm data config says (`image_config` overrides its keys: mean, std, crop_pct, interpolation). Labels
    follow `class_names` (the names the model was trained with; the folder may hold a subset) or, when None,
    the folder's sorted class names, which must number `num_classes` (the head's outputs; None: a model
    without a head, unchecked).
    skip_bad_images: decode every image first and drop the unreadable ones, reporting the count on stderr.

    Raises ValueError (one line) for a missing/empty folder, fewer than two classes, classes the model does
    not know, a class count that disagrees with the head, or (with skip_bad_images) no readable image.
    """
    from timm.data.readers.reader_image_folder import find_images_and_targets

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--data {root}: not a folder")
    samples, class_to_idx = find_images_and_targets(str(root))
    if not samples:
        raise ValueError(f"--data {root}: holds no images (expected one sub-folder of images per class)")
    found = sorted(class_to_idx, key=class_to_idx.get)
    names = _labels(root, found, num_classes, class_names)
    index = {name: i for i, name in enumerate(names)}
    samples = [(path, index[found[label]]) for path, label in samples]
    if skip_bad_images:
        bad = [path for path, _ in samples if _readable(path) is not None]
        if bad:
            print(f"skipped {len(bad)} unreadable image(s) of {len(samples)} in {root} (first: {bad[0]})",
                  file=sys.stderr)
            unreadable = set(bad)
            samples = [s for s in samples if s[0] not in unreadable]
        if not samples:
            raise ValueError(f"--data {root}: none of its images is readable")
    return ImageFolder(samples, names, _eval_transform(model, image_config))


def dataset_for(root: str | os.PathLike | None, model: nn.Module, split: str, **folder_options: Any) -> Dataset:
    """The ImageFolder at `root` (see `image_folder` for `folder_options`), or the built-in digits `split`
    ("train" or "test") when root is None."""
    if root is not None:
        return image_folder(root, model, **folder_options)
    from .digits import load_digits_split

    train, test = load_digits_split()
    return train if split == "train" else test
