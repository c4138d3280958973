"""Test-suite time before/after: pytest on test files at a base git revision and at this checkout, side by side.

The base revision is exported (`git archive`) into a temporary folder, with this checkout's compiled
skd_kernels._C copied in so both run the same kernels; then every round runs the files at base, then here, each as one
`python -m pytest -q` process with 1 thread, and records its wall time and the CPU time (user + sys) of it
and its child processes. CPU time moves less than wall time when other work shares the machine; both are
medians over the rounds. The folder is removed at the end.

    python -m benchmarks.suite_time [--base 916d210] [--rounds 1] [FILE ...]   (default: the whole tests/)
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_pytest(tree: Path, files: list[str]) -> tuple[float, float, bool]:
    """(wall s, CPU s of pytest and its children, passed) of one `pytest -q FILES` run inside `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    cpu0, t0 = _children_cpu(), time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=tree, env=env,
                       capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if r.returncode != 0:
        print(f"pytest failed in {tree}:\n{r.stdout[-2000:]}", file=sys.stderr)
    return wall, cpu, r.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", default=["tests"], help="test files or folders (default: tests)")
    parser.add_argument("--base", default="916d210", help="the revision to compare with (default: before the "
                                                          "suite was sped up)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="skd-suite-base-"))
    try:
        archive = subprocess.run(["git", "archive", args.base], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        for ext in (ROOT / "skd_kernels").glob("_C*.so"):
            shutil.copy2(ext, base / "skd_kernels" / ext.name)
        times: dict[str, list[tuple[float, float]]] = {"base": [], "here": []}
        for _ in range(args.rounds):
            for name, tree in (("base", base), ("here", ROOT)):
                wall, cpu, ok = run_pytest(tree, args.files)
                times[name].append((wall, cpu))
                print(f"{name}: wall {wall:.1f} s, CPU {cpu:.1f} s{'' if ok else ' (FAILED)'}", flush=True)
    finally:
        shutil.rmtree(base)
    med = {k: [statistics.median(col) for col in zip(*v, strict=True)] for k, v in times.items()}
    print(f"\n{' '.join(args.files)}: base {args.base} vs this checkout, {args.rounds} round(s), 1 thread")
    print("| | base | here | here / base |\n|---|---|---|---|")
    for i, what in enumerate(("wall (s)", "CPU (s)")):
        print(f"| {what} | {med['base'][i]:.1f} | {med['here'][i]:.1f} | {med['here'][i] / med['base'][i]:.2f} |")


if __name__ == "__main__":
    main()
