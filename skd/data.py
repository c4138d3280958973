"""Datasets for the command line and the demo: the built-in digits, or an ImageFolder read with timm's
dataset class and the evaluation transforms of the model's own data config."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset


def image_folder(root: str | os.PathLike, model: nn.Module) -> Dataset:
    """An ImageFolder (one sub-folder of images per class) as (image (3, H, W) fp32, label) samples,
    resized and normalised as `model`'s timm data config says."""
    from timm.data import ImageDataset, create_transform, resolve_data_config

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--data {root}: not a folder")
    config = resolve_data_config({}, model=model)
    try:
        dataset = ImageDataset(str(root), transform=create_transform(**config, is_training=False))
    except Exception as e:  # timm raises a bare RuntimeError/AssertionError for an empty folder
        raise ValueError(f"--data {root}: not an ImageFolder of class sub-folders with images ({e})") from e
    if len(dataset) == 0:
        raise ValueError(f"--data {root}: holds no images")
    return dataset


def dataset_for(root: str | os.PathLike | None, model: nn.Module, split: str) -> Dataset:
    """The ImageFolder at `root`, or the built-in digits `split` ("train" or "test") when root is None."""
    if root is not None:
        return image_folder(root, model)
    from .digits import load_digits_split

    train, test = load_digits_split()
    return train if split == "train" else test
