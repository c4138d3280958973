"""`python -m benchmarks.gpu_check --dry`: the device check runs to completion on CPU and writes its report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_writes_every_section(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry", "--out", str(report)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    text = report.read_text()
    print(text)
    assert p.returncode == 0, p.stdout + p.stderr
    for section in gpu_check.SECTIONS:
        assert f"\n## {section}\n" in text, f"no {section} section"
    # The summary table: one row per step, each ok, or skipped with its reason in the step's section.
    steps = re.findall(r"^\| (\w+) \| (.+?) \| (.+?) \| [\d.]+ \|$", text, flags=re.M)
    assert {sec for sec, _, _ in steps} == set(gpu_check.SECTIONS)
    for sec, name, status in steps:
        assert status in ("ok", "skipped"), f"{sec} / {name}: {status}"
    skipped = [name for _, name, status in steps if status == "skipped"]
    assert set(skipped) == {"build", "tests/test_triton_kernels.py", "memcheck", "racecheck"}
    for name in skipped:
        reason = text.split(f"### {name}: skipped", 1)[1].split("###", 1)[0]
        assert "CUDA" in reason or "dry run" in reason, f"{name} is skipped without a reason: {reason!r}"
    assert "driver ok" in text  # the sanitizer's driver ran every op on the tail shapes
    assert "taylor_scores" in text.split("## Benchmarks", 1)[1]  # the benchmark table has rows
    assert "CUDA kernel times skipped" in text
