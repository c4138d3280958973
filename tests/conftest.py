"""Test-wide settings.

Without a GPU, Triton kernels run under TRITON_INTERPRET=1, which must be set before skd_kernels'
Triton modules are imported (Triton picks interpreter vs compiler at @jit time).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
