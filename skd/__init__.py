"""skd: turn a pretrained transformer (timm ViT/DeiT/Swin, or any family with a `skd.models` adapter)
into a stratified knowledge-density super-network.

WPAC (`skd.wpac`) reorders/rotates its weights so knowledge sits in the leading dims, PIAD
(`skd.PIADTrainer`) trains every prefix subnetwork at once, and `skd.ElasticViT` (alias `skd.Elastic`)
runs any size of it in O(1). Built only on skd_kernels' public ops.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> defining module; imported on first use so `import skd` stays light.
_EXPORTS = {
    "UnsupportedModelError": "skd.errors",
    "ElasticViT": "skd.elastic",
    "Elastic": "skd.elastic",
    "Subnet": "skd.subnet",
    "DropoutList": "skd.subnet",
    "PIADTrainer": "skd.piad",
    "save": "skd.io",
    "load": "skd.io",
}
__all__ = [*sorted(_EXPORTS), "__version__", "wpac"]

# Eager, unlike the rest: the function shares its submodule's name, and importing `skd.wpac` (from
# anywhere, at any time) binds the package attribute to the module, which a lazy lookup never undoes.
from .wpac import wpac  # noqa: E402


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'skd' has no attribute {name!r}")

# Registers the built-in default `vit_digits` with timm, so saved digits models load by name.
from . import digits as _digits  # noqa: E402, F401
