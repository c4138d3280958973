"""Running the `skd` command in tests, three ways (each costs what it must and no more):

- `skd(...)`: in this process through `skd.cli.main` (the command's own logic; no interpreter start-up and
  no second torch/timm import, which cost ~4 s of CPU per call).
- `skd_cases(...)`: several argument lists in ONE fresh `python` process, each through `skd.cli.main` with
  its own captured stdout/stderr: bad-input cases keep their real process (exactly what the user sees on
  stderr, warnings included) and each case's exit status and message are still checked one by one.
- `skd_process(...)`: `python -m skd.cli` as its own process, for what only the process boundary shows
  (the exit status of the real entry point, torchrun).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Result:
    """What one `skd` command gave: its exit status and everything it wrote to stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str


def _main_captured(args: list[str]) -> Result:
    """`skd.cli.main(args)` in this process with its stdout and stderr captured."""
    import skd.cli

    out, err = io.StringIO(), io.StringIO()
    sigpipe = signal.getsignal(signal.SIGPIPE)  # main() resets SIGPIPE for the CLI; the caller keeps its own
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = skd.cli.main(args)
    except SystemExit as e:  # argparse: --version (0) and its own usage errors (2)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        signal.signal(signal.SIGPIPE, sigpipe)
    return Result(code, out.getvalue(), err.getvalue())


def digits_image_folder(root: Path) -> Path:
    """A tiny ImageFolder in `root`: 10 class folders of 8-bit PNG digits (6 each, 32 x 32 RGB)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        (root / f"class_{label}").mkdir(parents=True)
        for j, idx in enumerate([i for i, t in enumerate(digits.target) if t == label][:6]):
            pixels = (digits.images[idx] * 255 / 16).astype("uint8")
            Image.fromarray(pixels).convert("RGB").resize((32, 32)).save(root / f"class_{label}" / f"{j}.png")
    return root


def skd(*args: str, cwd: Path | None = None) -> Result:
    """`skd --no-progress ARGS` run in this process by `skd.cli.main` (inside `cwd` when given)."""
    before = os.getcwd()
    try:
        os.chdir(cwd or before)
        return _main_captured(["--no-progress", *args])
    finally:
        os.chdir(before)


def skd_cases(*cases: tuple[str, ...], cwd: Path | None = None) -> list[Result]:
    """Each `skd --no-progress CASE` in turn (a case may read an earlier one's output), all in one fresh
    Python process running this file (inside `cwd` when given)."""
    argv = json.dumps([["--no-progress", *case] for case in cases])
    r = subprocess.run([sys.executable, __file__, argv], capture_output=True, text=True, cwd=cwd, timeout=600)
    # The driver must not crash (every case returns a status), and nothing may escape the cases' capture
    # (e.g. a logging handler bound to the real stderr): what each case printed is all the user would see.
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [Result(**row) for row in json.loads(r.stdout)]


def skd_process(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m skd.cli --no-progress ARGS` as its own process."""
    return subprocess.run([sys.executable, "-m", "skd.cli", "--no-progress", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def fails(r: Result | subprocess.CompletedProcess, needle: str) -> None:
    """Exit 2 with exactly one line on stderr that contains `needle`."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


if __name__ == "__main__":  # skd_cases' process: argv[1] is a JSON list of argument lists; prints the results
    print(json.dumps([vars(_main_captured(args)) for args in json.loads(sys.argv[1])]))
