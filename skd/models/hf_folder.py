"""A HuggingFace model folder (config.json, weights, tokenizer files) as the command line opens it, offline.

The transformers class is the one the folder's config names (`architectures[0]`; a config without it
opens as the bare encoder, AutoModel); it must be one an skd adapter serves, which is checked before any
weight is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding a HuggingFace config.json."""
    return (Path(path) / "config.json").is_file()


def load_folder(folder: str | os.PathLike, progress: bool = True) -> tuple[nn.Module, Any | None]:
    """(model in eval mode, its tokenizer or None when the folder has no tokenizer files) from `folder`;
    progress=False hides transformers' weight-loading bar.

    Raises ValueError for a folder without config.json or one transformers cannot read, and
    UnsupportedModelError naming the class for a model no skd adapter serves.
    """
    import transformers

    from . import hf_bert, hf_vit  # noqa: F401  (registers the HF adapters and their supported names)
    from .hf_common import _ALL_SUPPORTED

    folder = Path(folder)
    if not is_hf_folder(folder):
        raise ValueError(f"{folder}: no config.json, so not a HuggingFace model folder")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for unreadable or unknown configs
        raise ValueError(f"{folder}/config.json: transformers cannot read it ({type(e).__name__}: {e})") from e
    name = (getattr(config, "architectures", None) or [None])[0]
    model_cls = transformers.AutoModel if name is None else getattr(transformers, name, None)
    if name is not None and name not in _ALL_SUPPORTED:
        raise UnsupportedModelError(f"{folder}: transformers {name} is not supported: skd handles "
                                    f"{', '.join(sorted(_ALL_SUPPORTED))}")
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        model = model_cls.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # missing/corrupt weights surface as OSError, ValueError or safetensors errors
        raise ValueError(f"{folder}: cannot load the {name or 'model'} weights ({type(e).__name__}: {e})") from e
    tokenizer = load_tokenizer(folder) if any((folder / f).is_file() for f in TOKENIZER_FILES) else None
    return model.eval(), tokenizer


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """The HuggingFace tokenizer saved in `folder`; ValueError naming the folder if transformers cannot
    read it."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/TypeError for missing or broken files
        raise ValueError(f"{folder}: cannot read its tokenizer ({type(e).__name__}: {e})") from e


def image_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """timm data-config overrides that reproduce the image processor saved in `folder`
    (preprocessor_config.json): {"mean", "std" (its image_mean / image_std), "crop_pct": 1.0 (it resizes
    straight to the model's size), "interpolation": "bilinear" (its default resample)}; None when the
    folder has no processor with a mean/std. ValueError naming the file when it is malformed."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        mean, std = config.get("image_mean"), config.get("image_std")
        if mean is None or std is None:
            return None
        return {"mean": [float(m) for m in mean], "std": [float(s) for s in std], "crop_pct": 1.0,
                "interpolation": "bilinear"}
    except (ValueError, TypeError, AttributeError) as e:  # JSON, non-numbers, a non-object document
        raise ValueError(f"{path}: malformed image processor config ({type(e).__name__}: {e})") from e
