"""Assemble a release directory: the compressed image, the boot files and ``release.json``.

Layout of the output directory (what ``abflip publish`` uploads)::

    release.json  rootfs.img.zst  vmlinuz  [initrd.img]     (kernel + initrd), or
    release.json  rootfs.img.zst  uki.efi                   (a unified kernel image)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from metadata.manifest import (
    FSTYPES,
    MIN_PIECE,
    ZSTD_LEVELS,
    Boot,
    BootFile,
    Image,
    Limits,
    ManifestError,
    Release,
    boot_file_problem,
    boot_options_problem,
    check_name,
    compatible_problem,
    image_size_problem,
    release_target_dir,
)
from metadata.version import Version

from .delta import DEFAULT_DELTA_LEVEL, DEFAULT_DICTIONARY, make_deltas, read_delta_sources
from .compress import DEFAULT_CHUNK, DEFAULT_LEVEL, DEFAULT_PIECE, DEFAULT_WINDOW, compress_image
from .errors import BuildError

__all__ = ["create_release", "check_arguments", "ReleaseFiles", "IMAGE_NAME"]

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


MAX_THREADS = 256


def _problem(what: str, problem: str | None, hint: str | None = None) -> None:
    if problem is not None:
        raise BuildError(f"{what}: {problem}", hint=hint)


def check_arguments(*, product: str, version: str, compatible: list[str], options: str, fstype: str, level: int,
                    chunk_size: int, window: int, threads: int, piece_size: int = DEFAULT_PIECE,
                    limits: Limits = Limits()) -> Version:
    """Refuse, before any work, every argument the device would refuse in the manifest
    (the validators of :mod:`metadata.manifest`), as the user's error."""
    check_name("product", product)
    ver = Version.parse(version)
    if not compatible:
        raise BuildError("a release needs at least one compatible hardware id (--compatible)")
    _problem("--compatible", compatible_problem(list(compatible)),
             "use the device's hardware id, e.g. acme-box-v2 or dmi:<product name>")
    _problem("--options", boot_options_problem(options),
             "pass only the release's own kernel options (e.g. \"ro quiet\"); root= and abflip.slot= are added on "
             "the device")
    if fstype not in FSTYPES:
        raise BuildError(f"unknown filesystem type {fstype!r}", hint=f"use one of {', '.join(FSTYPES)}")
    for flag, value, lo, hi in (("--level", level, *ZSTD_LEVELS), ("--chunk-size", chunk_size, 4096, limits.max_chunk_out),
                                ("--window", window, 0, limits.max_window), ("--threads", threads, 0, MAX_THREADS)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise BuildError(f"{flag} {value!r} is out of range [{lo}, {hi}]",
                             hint="0 threads means one per CPU" if flag == "--threads" else None)
    if isinstance(piece_size, bool) or not isinstance(piece_size, int) or \
            not (piece_size == 0 or MIN_PIECE <= piece_size <= limits.max_chunk_length):
        raise BuildError(f"--piece-size {piece_size!r} is neither 0 nor in [{MIN_PIECE}, {limits.max_chunk_length}]",
                         hint="0 makes the whole chunk the unit a device verifies (as releases before pieces)")
    return ver


def create_release(image: Path, out_dir: Path, *, product: str, version: str, compatible: list[str],
                   kernel: Path | None = None, initrd: Path | None = None, uki: Path | None = None,
                   options: str = "", fstype: str = "erofs",
                   level: int = DEFAULT_LEVEL, chunk_size: int = DEFAULT_CHUNK, window: int = DEFAULT_WINDOW,
                   threads: int = 0, created: int | None = None, piece_size: int = DEFAULT_PIECE,
                   progress: Callable[[int, int], None] | None = None, limits: Limits = Limits(),
                   delta_from: list[Path] = (), delta_level: int = DEFAULT_DELTA_LEVEL,
                   delta_dictionary: int = DEFAULT_DICTIONARY, force: bool = False) -> ReleaseFiles:
    """Write the release into ``out_dir``. Every argument is checked first with the device's
    rules; the files are made in a private directory beside ``out_dir`` and the manifest is
    parsed back as the device will parse it before anything is moved into ``out_dir``, so a
    refused release leaves nothing behind (and an existing ``out_dir`` as it was). An
    ``out_dir`` that holds a release already is replaced only with ``force``."""
    ver = check_arguments(product=product, version=version, compatible=compatible, options=options, fstype=fstype,
                          level=level, chunk_size=chunk_size, window=window, threads=threads, piece_size=piece_size,
                          limits=limits)
    if (kernel is None) == (uki is None):
        raise BuildError("a release boots either a kernel (--kernel, optional --initrd) or a unified kernel image (--uki)",
                         hint="pass exactly one of --kernel and --uki")
    if uki is not None and initrd is not None:
        raise BuildError("--initrd cannot be combined with --uki (the UKI carries its initrd)")
    delta_sources = read_delta_sources(list(delta_from), product=product, version=ver, limits=limits)
    # ``created``: $SOURCE_DATE_EPOCH when set (a reproducible build: same inputs, same
    # release.json), else the current time; the image and its chunks never depend on it.
    try:
        if created is not None:
            epoch = created
        elif "SOURCE_DATE_EPOCH" in os.environ:
            epoch = int(os.environ["SOURCE_DATE_EPOCH"])
        else:
            epoch = int(time.time())
    except ValueError:
        raise BuildError(f"SOURCE_DATE_EPOCH={os.environ['SOURCE_DATE_EPOCH']!r} is not an integer") from None
    if isinstance(epoch, bool) or not 0 <= epoch <= 1 << 40:
        raise BuildError(f"creation time {epoch} is out of range [0, {1 << 40}]", hint="check $SOURCE_DATE_EPOCH")
    sources = {"image": Path(image), "vmlinuz": kernel, "initrd.img": initrd, "uki.efi": uki}
    for name, p in sources.items():
        if p is not None and not Path(p).is_file():
            raise BuildError(f"{p} does not exist or is not a file")
    _problem(f"--image {image}", image_size_problem(os.path.getsize(image), chunk_size, limits),
             "build the image with 'abflip image build'" if os.path.getsize(image) == 0 else "raise --chunk-size")
    for name in ("vmlinuz", "initrd.img", "uki.efi"):
        if (src := sources[name]) is not None:
            _problem(str(src), boot_file_problem(name, os.path.getsize(src), limits))
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"{out_dir} exists and is not a directory", hint="pass a directory for --output")
    if not force and any((out_dir / n).exists() for n in ("release.json", IMAGE_NAME)):
        raise BuildError(f"{out_dir} already holds a release ({'release.json' if (out_dir / 'release.json').exists() else IMAGE_NAME})",
                         hint="pass --force to replace it, or another -o; nothing was written")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.abflip-", dir=out_dir.parent))
    try:
        tdir = release_target_dir(product, str(ver))
        result = compress_image(Path(image), stage / IMAGE_NAME, level=level, chunk_size=chunk_size, window=window,
                                threads=threads, piece_size=piece_size, progress=progress)
        boot_files = {}
        for name in ("vmlinuz", "initrd.img", "uki.efi"):
            if (src := sources[name]) is None:
                continue
            shutil.copyfile(src, stage / name)
            sha, length = _sha256(stage / name)
            boot_files[name] = BootFile(f"{tdir}/{name}", sha, length)
        release = Release(
            product=product, version=ver, compatible=tuple(compatible), created=epoch,
            image=Image(f"{tdir}/{IMAGE_NAME}", fstype, result.size, result.sha256, result.compression, result.chunks),
            boot=Boot(boot_files.get("vmlinuz"), boot_files.get("initrd.img"), options, boot_files.get("uki.efi")),
        )
        deltas = make_deltas(delta_sources, Path(image), release, stage, target_dir=tdir, level=delta_level,
                             dictionary_max=delta_dictionary, threads=threads)  # docs/delta.md
        release = dataclasses.replace(release, deltas=tuple(d.ref for d in deltas))
        data = release.to_bytes()
        try:  # the device's own parser is the last word on what a manifest may say
            if Release.from_bytes(data, limits) != release:
                raise BuildError("release.json does not read back as written (internal error)")
        except ManifestError as e:
            raise BuildError(f"the device would refuse this release: {e.message}") from None
        (stage / "release.json").write_bytes(data)
        _move_into(stage, out_dir, [IMAGE_NAME, *boot_files, *(p.name for d in deltas for p in (d.manifest, d.data)),
                                    "release.json"])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return ReleaseFiles(out_dir, release)


def _move_into(stage: Path, out_dir: Path, names: list[str]) -> None:
    """Move the finished files into ``out_dir`` (a rename of the whole directory when it is new;
    else file by file with ``release.json`` last, so a manifest never names missing files)."""
    os.chmod(stage, 0o755)  # mkdtemp made it private while it was being filled
    try:
        os.rename(stage, out_dir)
        return
    except OSError:
        pass  # out_dir exists (a re-run into the same directory)
    for name in names:
        os.replace(stage / name, out_dir / name)
