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


@pytest.fixture(scope="session")
def digits_data():
    """(train, test) TensorDatasets of the scikit-learn digits at 32×32×3."""
    from skd.digits import load_digits_split

    return load_digits_split()


@pytest.fixture(scope="session")
def _digits_vit_trained():
    from skd.digits import pretrained_digits_vit

    return pretrained_digits_vit(progress=False)


@pytest.fixture
def digits_vit(_digits_vit_trained):
    """A fresh copy (tests change weights in place) of the vit_digits model trained on the digits (≈98%)."""
    import copy

    return copy.deepcopy(_digits_vit_trained)
