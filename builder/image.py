"""Build a read-only root filesystem image from a directory, reproducibly.

The same tree and ``SOURCE_DATE_EPOCH`` give bit-identical bytes: every timestamp is
clamped to the epoch, the filesystem UUID is derived from it (or given), and the tools
sort directory entries themselves.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError, ToolMissing

__all__ = ["build_image", "ImageInfo"]

TOOLS = {"erofs": ("mkfs.erofs", "erofs-utils")}


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    fstype: str
    size: int
    sha256: str


def _tool(fstype: str) -> str:
    try:
        tool, package = TOOLS[fstype]
    except KeyError:
        raise BuildError(f"unknown filesystem type {fstype!r}", hint=f"use one of {', '.join(TOOLS)}") from None
    path = shutil.which(tool) or next((p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{tool}", os.X_OK)), None)
    if not path:
        raise ToolMissing(tool, package)
    return path


def _check_tree(src: Path) -> None:
    if not src.is_dir():
        raise BuildError(f"root filesystem directory {src} does not exist or is not a directory")
    for dirpath, dirs, files in os.walk(src):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p) and os.path.isfile(p) and not os.access(p, os.R_OK):
                raise BuildError(f"cannot read {p}", hint="fix its permissions or build as a user who can read it")
        for name in dirs:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p) and not os.access(p, os.R_OK | os.X_OK):
                raise BuildError(f"cannot read directory {p}")


def fs_uuid(source_date_epoch: int, label: str = "") -> str:
    return str(uuid.UUID(bytes=hashlib.sha256(f"abflip:{label}:{source_date_epoch}".encode()).digest()[:16]))


def build_image(src: Path, out: Path, *, fstype: str = "erofs", source_date_epoch: int | None = None,
                fs_id: str | None = None, max_size: int | None = None) -> ImageInfo:
    """Build ``out`` from the tree ``src``; refuse an image larger than ``max_size``."""
    tool = _tool(fstype)
    src = Path(src)
    _check_tree(src)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) if source_date_epoch is None else source_date_epoch
    fsid = fs_id or fs_uuid(epoch)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    cmd = [tool, "--quiet", f"-T{epoch}", f"-U{fsid}", "--ignore-mtime", str(tmp), str(src)]
    # mkfs.erofs 1.5 reads SOURCE_DATE_EPOCH as "clamp newer mtimes", which keeps older ones:
    # drop it and let -T with --ignore-mtime give every inode the same time.
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{os.path.basename(tool)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}")
    size = tmp.stat().st_size
    if max_size is not None and size > max_size:
        tmp.unlink()
        raise BuildError(f"the image is {size} bytes, larger than the slot size {max_size}",
                         hint="shrink the root filesystem or raise --max-size to the real slot size")
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    os.replace(tmp, out)
    return ImageInfo(out, fstype, size, h.hexdigest())
