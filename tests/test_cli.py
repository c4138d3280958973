"""The `skd` command end to end through subprocess, on tiny settings, and its errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def skd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skd.cli", "--no-progress", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A tiny ImageFolder: 10 class folders of 8-bit PNG digits (6 each)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits_folder")
    digits = load_digits()
    for label in range(10):
        (root / f"class_{label}").mkdir()
        for j, idx in enumerate([i for i, t in enumerate(digits.target) if t == label][:6]):
            pixels = (digits.images[idx] * 255 / 16).astype("uint8")
            Image.fromarray(pixels).convert("RGB").resize((32, 32)).save(root / f"class_{label}" / f"{j}.png")
    return root


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    r = skd("demo", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for name in ("results.json", "accuracy_vs_macs.png", "latency_vs_macs.png", "supernet.safetensors", "report.md"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"PIAD (WPAC + PIAD)", "WPAC only", "Taylor order"}
    full = next(row for row in results["WPAC only"] if row["budget"] == 1.0)
    assert full["accuracy"] > 0.9  # WPAC keeps the trained digits model's function
    assert "| method | budget |" in r.stdout


def test_pipeline_on_image_folder(tmp_path, image_folder):
    strat, trained, small = tmp_path / "s.safetensors", tmp_path / "t.safetensors", tmp_path / "x.safetensors"
    r = skd("wpac", "vit_digits", "--data", str(image_folder), "--samples", "32", "--batch-size", "16",
            "--out", str(strat))
    assert r.returncode == 0, r.stderr
    r = skd("train", str(strat), "--data", str(image_folder), "--epochs", "1", "--batch-size", "16",
            "--out", str(trained))
    assert r.returncode == 0, r.stderr
    r = skd("eval", str(trained), "--data", str(image_folder), "--budgets", "0.5,1", "--plot", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("| t.safetensors |") == 2 and (tmp_path / "a.png").is_file()
    r = skd("extract", str(trained), "--macs", "0.5", "--out", str(small))
    assert r.returncode == 0, r.stderr
    assert small.is_file() and small.stat().st_size < trained.stat().st_size
    r = skd("info", str(trained))
    assert r.returncode == 0, r.stderr
    assert "vit_digits" in r.stdout and "dropout list:" in r.stdout


def test_train_under_torchrun_two_processes(tmp_path):
    """`skd train` under torchrun: 2 gloo processes train one super-network and only rank 0 writes it."""
    strat, trained = tmp_path / "s.safetensors", tmp_path / "t.safetensors"
    assert skd("wpac", "vit_digits", "--pretrained", "--samples", "64", "--out", str(strat)).returncode == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", "-m", "skd.cli", "--no-progress", "train", str(strat),
                        "--epochs", "1", "--batch-size", "32", "--out", str(trained)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote") == 1
    from skd.io import load

    assert len(load(trained).dropout_list) > 0
    assert oct(trained.stat().st_mode & 0o777) != oct(0o600)  # an ordinary file mode, not mkstemp's


def test_bench_quick_prints_both_tables():
    r = skd("bench", "--quick")
    assert r.returncode == 0, r.stderr
    assert "taylor_scores" in r.stdout and "prefix_linear" in r.stdout  # the kernel table
    assert "vit_tiny" in r.stdout  # the elastic latency table


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("eval", "missing.safetensors"), "no such file"),
        (("extract", "README.md", "--macs", "0.5", "--out", "x.safetensors"), "README.md"),
        (("extract", "README.md", "--macs", "1.5", "--out", "x.safetensors"), "outside (0, 1]"),
        (("eval", "README.md", "--budgets", "0,1"), "outside (0, 1]"),
        (("wpac", "no_such_model_xyz", "--out", "x.safetensors"), "unknown model"),
        (("wpac", "vit_tiny_patch16_224", "--pretrained", "--out", "x.safetensors"), "cannot load pretrained"),
        (("wpac", "vit_digits", "--data", "no/such/dir", "--out", "x.safetensors"), "no such folder"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, needle, tmp_path):
    root = Path(__file__).resolve().parent.parent
    r = skd(*args, cwd=root)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not (root / "x.safetensors").exists()
