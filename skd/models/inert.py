"""Module calls that would return their input (eval-mode dropout, identities), skipped.

Calling a module costs Python time: 0.7 µs for nn.Identity, 2.6 µs for nn.Dropout in eval mode. A timm
block's branches make about seven such calls per forward. That is host time, which bounds a GPU forward at
small sizes (benchmarks/RESULTS.md, "H200, session 10"), and 5 % of the digits ViT's forward at batch 1 on CPU.
Family-agnostic (the elastic forward uses it): a library's own dropout kinds are added by its adapters
(`register_dropout`).
"""

from __future__ import annotations

import torch
from torch import nn

# dropout classes -> the attribute holding their probability: identities when not training or at probability 0
_DROPOUTS: dict[type, str] = {nn.Dropout: "p"}


def register_dropout(kind: type, probability: str) -> None:
    """Declare `kind` (exact type) an identity when not training or when its attribute `probability` is 0."""
    _DROPOUTS[kind] = probability


def through(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), without the call where it would return x: nn.Identity, and a registered dropout kind with
    nothing to drop (not training, or probability 0). Exact types only: a subclass may do more. A module with
    hooks (its own or global ones, see `hooked`) is always called, so that they fire."""
    kind = type(module)
    if kind is not nn.Identity:
        probability = _DROPOUTS.get(kind)
        if probability is None or (module.training and module.__dict__[probability] != 0):
            return module(x)
    return module(x) if hooked(module) else x


def hooked(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks: its own forward or backward ones, or global ones. Callers that
    replace a call by its effect (through; the fused add + LayerNorm) call the module instead then."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or any(_GLOBAL_HOOKS))


# nn.Module's global hooks (torch.nn.modules.module.register_module_forward_hook, ...): the dicts themselves,
# which registration fills in place. With the module's own, the hooks nn.Module.__call__ checks before its
# fast path.
_GLOBAL_HOOKS = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks,
                 nn.modules.module._global_backward_hooks, nn.modules.module._global_backward_pre_hooks)
