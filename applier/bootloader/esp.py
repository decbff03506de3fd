"""The EFI System Partition, behind a handful of verbs.

The applier touches the ESP only through :class:`Esp`. :class:`DirectoryEsp` is a mounted
ESP (or a directory in tests); ``applier.bootloader.esp_fat.FatImageEsp`` works on an unmounted FAT
image through mtools. Paths are relative to the ESP root, '/'-separated.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol

from ..atomic import copy_atomic, fsync_dir, write_atomic

__all__ = ["Esp", "DirectoryEsp"]


class Esp(Protocol):
    def listdir(self, path: str) -> list[str]: ...
    def read(self, path: str) -> bytes: ...
    def exists(self, path: str) -> bool: ...
    def write_atomic(self, path: str, data: bytes) -> None: ...
    def copy_in(self, path: str, src: Path) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def remove(self, path: str) -> None: ...
    def remove_tree(self, path: str) -> None: ...
    def makedirs(self, path: str) -> None: ...
    def sync(self) -> None: ...
    def free_bytes(self) -> int: ...


class DirectoryEsp:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"DirectoryEsp({str(self.root)!r})"

    def _p(self, path: str) -> Path:
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ValueError(f"bad ESP path {path!r}")
        return self.root.joinpath(*parts)

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self._p(path)))
        except FileNotFoundError:
            return []

    def read(self, path: str) -> bytes:
        return self._p(path).read_bytes()

    def exists(self, path: str) -> bool:
        return self._p(path).exists()

    def write_atomic(self, path: str, data: bytes) -> None:
        dst = self._p(path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dst, data)

    def copy_in(self, path: str, src: Path) -> None:
        """Stream the local file ``src`` to ``path`` atomically."""
        dst = self._p(path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        copy_atomic(dst, src)

    def rename(self, src: str, dst: str) -> None:
        os.replace(self._p(src), self._p(dst))
        fsync_dir(self._p(dst).parent)

    def remove(self, path: str) -> None:
        self._p(path).unlink(missing_ok=True)

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(self._p(path), ignore_errors=True)

    def makedirs(self, path: str) -> None:
        self._p(path).mkdir(parents=True, exist_ok=True)

    def sync(self) -> None:
        for d in (self.root, self.root / "loader" / "entries"):
            if d.is_dir():
                fsync_dir(d)
        os.sync()

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize
