"""Atomic file replacement: temp file in the same directory, fsync, rename, fsync the directory.

Readers see the old bytes or the new ones, never a mix, even across a power cut
(DESIGN.md invariant 6). Used for the state file, the staged manifest and boot files, and
the boot entries on a mounted ESP.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["copy_atomic", "fsync_dir", "replace_with", "write_atomic"]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, prefix: str = ".abflip-tmp-") -> None:
    replace_with(path, lambda f: f.write(data), prefix=prefix)


def copy_atomic(path: Path, src: Path, *, prefix: str = ".abflip-tmp-") -> None:
    """Stream the file ``src`` to ``path`` atomically (never the whole file in memory)."""
    def fill(f: BinaryIO) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)

    replace_with(path, fill, prefix=prefix)


def replace_with(path: Path, fill: Callable[[BinaryIO], object], *, prefix: str = ".abflip-tmp-") -> None:
    """``fill`` a temp file beside ``path``, fsync it, rename it over ``path``, fsync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
