"""Assemble a release directory: the compressed image, the boot files and ``release.json``.

Layout of the output directory (what ``abflip publish`` uploads)::

    release.json  rootfs.img.zst  vmlinuz  [initrd.img]     (kernel + initrd), or
    release.json  rootfs.img.zst  uki.efi                   (a unified kernel image)

With ``verity`` the image carries its dm-verity hash tree (docs/formats.md "dm-verity"): the stream is the image,
zeros to the next 4 KiB and the tree, and ``rootfs.verity`` (not published) holds what follows the image, for a
factory that flashes ``cat IMAGE rootfs.verity`` into a slot. ``build_uki`` joins the kernel and initrd into
``uki.efi`` whose command line carries the root hash, signed by ``signer`` for Secure Boot (:mod:`builder.uki`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import threading
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

from metadata.verity import BLOCK, kernel_args, tree_bytes

from . import uki as ukis
from .delta import DEFAULT_DELTA_LEVEL, DEFAULT_DICTIONARY, make_deltas, read_delta_sources
from .compress import DEFAULT_CHUNK, DEFAULT_LEVEL, DEFAULT_PIECE, DEFAULT_WINDOW, compress_image
from .errors import BuildError
from .verity import TAIL_NAME, default_salt, make_tree, tail_size

__all__ = ["create_release", "compress_with_tree", "check_arguments", "ReleaseFiles", "IMAGE_NAME"]

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


def compress_with_tree(image: Path, out: Path, tail: Path, salt: str, **options):
    """The image's dm-verity tree computed in a thread of its own while the image's chunks compress (the tree
    reads only the image; the chunks that reach into the tree wait for it: ``compress_image``'s ``tail_ready``):
    the producer's time with verity is the compression's plus what the tree's CPU takes from it, not the sum of
    both (README "Performance"). Either failing stops the other; both are done when this returns."""
    with open(tail, "xb") as f:
        f.truncate(tail_size(os.path.getsize(image)))
    stop = threading.Event()
    box: dict = {}

    def tree() -> None:
        try:
            box["tree"] = make_tree(image, tail, salt, threads=1, made=True, stop=stop)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    worker = threading.Thread(target=tree, name="abflip-verity", daemon=True)
    worker.start()

    def ready() -> None:
        worker.join()
        if "error" in box:
            raise box["error"]

    try:
        result = compress_image(image, out, tail=tail, tail_ready=ready, **options)
        ready()  # an image of one chunk reads no tail before its end: the tree is still the stream's
    finally:
        stop.set()
        worker.join()
    return box["tree"], result


def create_release(image: Path, out_dir: Path, *, product: str, version: str, compatible: list[str],
                   kernel: Path | None = None, initrd: Path | None = None, uki: Path | None = None,
                   options: str = "", fstype: str = "erofs",
                   level: int = DEFAULT_LEVEL, chunk_size: int = DEFAULT_CHUNK, window: int = DEFAULT_WINDOW,
                   threads: int = 0, created: int | None = None, piece_size: int = DEFAULT_PIECE,
                   progress: Callable[[int, int], None] | None = None, limits: Limits = Limits(),
                   delta_from: list[Path] = (), delta_level: int = DEFAULT_DELTA_LEVEL,
                   delta_dictionary: int = DEFAULT_DICTIONARY, force: bool = False, verity: bool = False,
                   build_uki: bool = False, signer: ukis.EfiSigner | None = None) -> ReleaseFiles:
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
    if build_uki:
        if kernel is None:
            raise BuildError("--build-uki joins --kernel and --initrd into a UKI; --uki is one already",
                             hint="pass --kernel (and --initrd) with --build-uki, or --uki alone")
        if not verity:
            raise BuildError("--build-uki needs --verity: a UKI's command line cannot name the slot it boots from, "
                             "so its root is found and checked by the root hash the line carries",
                             hint="add --verity (docs/formats.md \"dm-verity\")")
        ukis.check_tools()
    if signer is not None:
        if not build_uki and uki is None:
            raise BuildError("--secure-boot-key signs a unified kernel image: there is none in this release",
                             hint="add --build-uki (or pass a UKI with --uki)")
        check = getattr(signer, "check", None)
        if check is not None:
            check()
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
    if verity:
        blocks = -(-os.path.getsize(image) // BLOCK)
        _problem(f"--image {image} with its verity tree",
                 image_size_problem(blocks * BLOCK + tree_bytes(blocks), chunk_size, limits), "raise --chunk-size")
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
        tree = None
        if verity:  # the stream is the image and then its tree (builder/verity.py), computed beside the image's chunks
            tree, result = compress_with_tree(Path(image), stage / IMAGE_NAME, stage / TAIL_NAME, default_salt(product),
                                              level=level, chunk_size=chunk_size, window=window, threads=threads,
                                              piece_size=piece_size, progress=progress)
        else:
            result = compress_image(Path(image), stage / IMAGE_NAME, level=level, chunk_size=chunk_size, window=window,
                                    threads=threads, piece_size=piece_size, progress=progress)
        boot_files = {}
        if build_uki:
            assert tree is not None and kernel is not None
            ukis.build_uki(stage / "uki.efi", kernel=Path(kernel), initrd=None if initrd is None else Path(initrd),
                           cmdline=f"{kernel_args(tree)} {options}".rstrip(), osrel=ukis.osrel_text(product, str(ver)),
                           signer=signer)
            sources = {"uki.efi": stage / "uki.efi"}
        elif signer is not None and uki is not None:
            signer.sign(Path(uki), stage / "uki.efi")
            sources = {"uki.efi": stage / "uki.efi"}
        for name in ("vmlinuz", "initrd.img", "uki.efi"):
            if (src := sources.get(name)) is None:
                continue
            if Path(src) != stage / name:
                shutil.copyfile(src, stage / name)
            sha, length = _sha256(stage / name)
            _problem(name, boot_file_problem(name, length, limits))
            boot_files[name] = BootFile(f"{tdir}/{name}", sha, length)
        release = Release(
            product=product, version=ver, compatible=tuple(compatible), created=epoch,
            image=Image(f"{tdir}/{IMAGE_NAME}", fstype, result.size, result.sha256, result.compression, result.chunks,
                        tree),
            boot=Boot(boot_files.get("vmlinuz"), boot_files.get("initrd.img"), options, boot_files.get("uki.efi")),
        )
        target_image = Path(image)
        if tree is not None and delta_sources:  # a delta is made to what the slot holds: the image and its tree
            target_image = stage / ".slot-image"
            with open(target_image, "wb") as out:
                for part in (Path(image), stage / TAIL_NAME):
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 8 << 20)
        deltas = make_deltas(delta_sources, target_image, release, stage, target_dir=tdir, level=delta_level,
                             dictionary_max=delta_dictionary, threads=threads)  # docs/delta.md
        release = dataclasses.replace(release, deltas=tuple(d.ref for d in deltas))
        data = release.to_bytes()
        try:  # the device's own parser is the last word on what a manifest may say
            if Release.from_bytes(data, limits) != release:
                raise BuildError("release.json does not read back as written (internal error)")
        except ManifestError as e:
            raise BuildError(f"the device would refuse this release: {e.message}") from None
        (stage / "release.json").write_bytes(data)
        if target_image != Path(image):
            target_image.unlink()
        _move_into(stage, out_dir, [IMAGE_NAME, *([TAIL_NAME] if tree else []), *boot_files,
                                    *(p.name for d in deltas for p in (d.manifest, d.data)), "release.json"],
                   stale=[] if tree else [TAIL_NAME])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return ReleaseFiles(out_dir, release)


def _move_into(stage: Path, out_dir: Path, names: list[str], stale: list[str] = ()) -> None:
    """Move the finished files into ``out_dir`` (a rename of the whole directory when it is new;
    else file by file with ``release.json`` last, so a manifest never names missing files, and
    ``stale`` files of the release replaced removed before it: a verity tail that no longer
    belongs to the image)."""
    os.chmod(stage, 0o755)  # mkdtemp made it private while it was being filled
    try:
        os.rename(stage, out_dir)
        return
    except OSError:
        pass  # out_dir exists (a re-run into the same directory)
    for name in names:
        if name == "release.json":
            for old in stale:
                (out_dir / old).unlink(missing_ok=True)
        os.replace(stage / name, out_dir / name)
