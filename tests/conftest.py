"""Test-wide settings.

Without a GPU, Triton kernels run under TRITON_INTERPRET=1, which must be set before skd_kernels'
Triton modules are imported (Triton picks interpreter vs compiler at @jit time).
"""

import os
import time
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# after TRITON_INTERPRET: it imports skd_kernels
from benchmarks.sdpa_routes import ROUTES, forced_route

# Set by benchmarks/gpu_check.py (seconds since the epoch): tests not started by then are skipped, so a device
# check's test run ends inside its time limit with pytest's summary and junit file instead of being killed.
_DEADLINE = float(os.environ.get("SKD_TEST_DEADLINE", "inf"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if time.time() > _DEADLINE:
        pytest.skip("the device check's time budget for tests is spent (SKD_TEST_DEADLINE)")


# pytest-timeout's limit for a device_long test (the device check gives other tests 90 s): forcing Triton on a model
# autotunes every kernel of its blocks, while 16 xdist workers compile side by side.
DEVICE_LONG_TIMEOUT = 180


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SKD_DEVICE_ONLY"):  # set by benchmarks/gpu_check.py: the device="cpu" cases run in CI
        on_cpu = [item for item in items if getattr(item, "callspec", None) and
                  item.callspec.params.get("device") == "cpu"]
        if on_cpu:
            config.hook.pytest_deselected(items=on_cpu)
            items[:] = [item for item in items if item not in on_cpu]
    # The device_long tests first: xdist hands tests out in this order, so they do not end the run alone.
    items.sort(key=lambda item: item.get_closest_marker("device_long") is None)
    for item in items:
        if item.get_closest_marker("device_long") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(DEVICE_LONG_TIMEOUT))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """SKD_TEST_LOG (set by benchmarks/gpu_check.py): a file that gets a line per finished test and each failure's
    traceback as it happens; pytest prints durations and tracebacks only at its end, which a killed run never
    reaches."""
    path = os.environ.get("SKD_TEST_LOG")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):  # xdist's controller gets every worker's reports
        return
    if report.when != "call" and report.passed:  # one line a test: its call, or the setup that skipped it
        return
    with open(path, "a") as log:
        log.write(f"{report.outcome.upper()} {report.nodeid} ({report.when}) {report.duration:.1f} s\n")
        if report.failed:
            log.write(report.longreprtext + "\n\n")


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



@pytest.fixture
def routes_taken(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SDPA routes ElasticViT takes while the test runs, one name a block's attention
    ("_sdpa_copying_activations" or "_sdpa_reordering_weights"), in order; the test may clear it."""
    from skd import ElasticViT

    taken = []

    def spying(route: str):
        original = getattr(ElasticViT, route)

        def spy(self, *args):
            taken.append(route)
            return original(self, *args)
        return spy

    for route in ROUTES:
        monkeypatch.setattr(ElasticViT, f"_sdpa_{route}", spying(f"_sdpa_{route}"))
    return taken


@pytest.fixture(params=ROUTES)
def sdpa_route(request: pytest.FixtureRequest) -> Iterator[str]:
    """ElasticViT's SDPA attention takes this route at every size (it picks by size otherwise: head-major copies
    of the activations, or of the kept attention weights)."""
    with forced_route(request.param):
        yield request.param
