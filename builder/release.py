"""Assemble a release directory: the compressed image, the boot files and ``release.json``.

Layout of the output directory (what ``abflip publish`` uploads)::

    release.json  rootfs.img.zst  vmlinuz  [initrd.img]     (kernel + initrd), or
    release.json  rootfs.img.zst  uki.efi                   (a unified kernel image)
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from metadata.manifest import FSTYPES, Boot, BootFile, Image, Release, check_name, release_target_dir
from metadata.version import Version

from .compress import DEFAULT_CHUNK, DEFAULT_LEVEL, DEFAULT_WINDOW, compress_image
from .errors import BuildError

__all__ = ["create_release", "ReleaseFiles", "IMAGE_NAME"]

IMAGE_NAME = "rootfs.img.zst"


@dataclass(frozen=True)
class ReleaseFiles:
    dir: Path
    release: Release


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
            n += len(b)
    return h.hexdigest(), n


def create_release(image: Path, out_dir: Path, *, product: str, version: str, compatible: list[str],
                   kernel: Path | None = None, initrd: Path | None = None, uki: Path | None = None,
                   options: str = "", fstype: str = "erofs",
                   level: int = DEFAULT_LEVEL, chunk_size: int = DEFAULT_CHUNK, window: int = DEFAULT_WINDOW,
                   threads: int = 0, created: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> ReleaseFiles:
    check_name("product", product)
    ver = Version.parse(version)
    if not compatible:
        raise BuildError("a release needs at least one compatible hardware id (--compatible)")
    if (kernel is None) == (uki is None):
        raise BuildError("a release boots either a kernel (--kernel, optional --initrd) or a unified kernel image (--uki)",
                         hint="pass exactly one of --kernel and --uki")
    if uki is not None and initrd is not None:
        raise BuildError("--initrd cannot be combined with --uki (the UKI carries its initrd)")
    if fstype not in FSTYPES:
        raise BuildError(f"unknown filesystem type {fstype!r}", hint=f"use one of {', '.join(FSTYPES)}")
    for p in (image, *(x for x in (kernel, initrd, uki) if x is not None)):
        if not Path(p).is_file():
            raise BuildError(f"{p} does not exist or is not a file")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tdir = release_target_dir(product, str(ver))
    result = compress_image(Path(image), out_dir / IMAGE_NAME, level=level, chunk_size=chunk_size, window=window,
                            threads=threads, progress=progress)
    boot_files = {}
    for name, src in (("vmlinuz", kernel), ("initrd.img", initrd), ("uki.efi", uki)):
        if src is None:
            continue
        dst = out_dir / name
        if Path(src).resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        sha, length = _sha256(dst)
        boot_files[name] = BootFile(f"{tdir}/{name}", sha, length)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) if created is None else created
    release = Release(
        product=product, version=ver, compatible=tuple(compatible), created=epoch,
        image=Image(f"{tdir}/{IMAGE_NAME}", fstype, result.size, result.sha256, result.compression, result.chunks),
        boot=Boot(boot_files.get("vmlinuz"), boot_files.get("initrd.img"), options, boot_files.get("uki.efi")),
    )
    tmp = out_dir / "release.json.tmp"
    tmp.write_bytes(release.to_bytes())
    os.replace(tmp, out_dir / "release.json")
    return ReleaseFiles(out_dir, release)
