"""Checks on output paths made BEFORE any compute, so a run never ends by failing to write its result.

Writability is probed by creating (and removing) a temporary file, not with os.access: the probe also
tells the truth for root, on read-only mounts and under ACLs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def _probe_writable(flag: str, folder: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".skd-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {folder}: cannot write in this folder ({e.strerror or e})") from None


def check_out_file(flag: str, path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """`path` as a Path if a file can be written there: its folder exists and is writable, it is not a
    folder, and it is none of `inputs` (the files the command reads). Else ValueError naming `flag`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: its folder {path.parent} does not exist")
    for source in inputs:
        if Path(source).resolve() == path.resolve():
            raise ValueError(f"{flag} {path}: is the input file itself; writing it would replace the input")
    _probe_writable(flag, folder)
    return path


def check_out_dir(flag: str, path: str | os.PathLike) -> Path:
    """`path` as a Path if a folder can be written there: an existing writable folder, or a new one whose
    nearest existing parent is a writable folder. Else ValueError naming `flag`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder")
    _probe_writable(flag, existing.resolve())
    return path
