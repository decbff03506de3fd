"""Make a delta from an earlier release's image to a new one (the format: metadata/delta.py).

The delta reuses the new release's chunk table: one operation per chunk. How an operation is
found, by content (docs/delta.md):

1. Both images are cut into 4 KiB blocks (erofs, squashfs and ext4 lay file data out in 4 KiB
   blocks) and hashed. A target block whose hash is a source block's is *copied* from there,
   wherever it lies (a file that moved still matches); a run of consecutive blocks becomes one
   copy segment ``[rel, source_offset, length, sha256]``.
2. What no block matches (changed files, new files, filesystem metadata) becomes the *literal*
   bytes of the chunk. They are compressed as one zstd frame against a dictionary of source
   extents: for each unmatched run, the source bytes just after the source block that precedes
   it and just before the one that follows it: where the old version of a changed file lies.
3. If the chunk of the full image is smaller than the frame (plus its segments' share of the
   manifest), the operation is ``full``: the device takes that chunk of the full image.

Memory on the producer: the block hashes of both images and one frame per thread; the images
are memory-mapped, never read whole.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard

from metadata.bounded import read_file
from metadata.delta import Delta, DeltaFile, DeltaRef, Frame, Op, Source, chunks_digest
from metadata.manifest import Image, Release

from .errors import BuildError

__all__ = ["create_delta", "decompress_release_image", "DeltaFiles", "BLOCK", "DEFAULT_DICTIONARY",
           "DEFAULT_DELTA_LEVEL", "delta_names"]

BLOCK = 4096
DEFAULT_DICTIONARY = 16 << 20
DEFAULT_DELTA_LEVEL = 19
SEGMENT_COST = 100  # manifest bytes one segment costs, to compare an operation with the full chunk
SLACK = 64  # blocks of source around a gap taken into the dictionary (256 KiB)


def delta_names(source_version: str) -> tuple[str, str]:
    """File names of a delta (manifest, data) in a release directory."""
    return f"delta-{source_version}.json", f"delta-{source_version}.bin"


@dataclass(frozen=True)
class DeltaFiles:
    ref: DeltaRef
    delta: Delta
    manifest: Path
    data: Path


def _block_hashes(view: memoryview) -> list[bytes]:
    return [hashlib.blake2b(view[o:o + BLOCK], digest_size=16).digest() for o in range(0, len(view), BLOCK)]


def _match(src: list[bytes], tgt: list[bytes]) -> list[int]:
    """For each target block, a source block with the same bytes, or -1; continuing the source
    run of the block before when it can (so runs stay long where duplicates abound)."""
    index: dict[bytes, int] = {}
    for k, h in enumerate(src):
        index.setdefault(h, k)
    out = [-1] * len(tgt)
    prev = -2
    ns = len(src)
    for j, h in enumerate(tgt):
        k = prev + 1 if 0 <= prev + 1 < ns and prev >= 0 and src[prev + 1] == h else index.get(h, -1)
        out[j] = k
        prev = k
    return out


def _dictionary_regions(m: list[int], lo: int, hi: int, ns: int) -> list[tuple[int, int]]:
    """Source block ranges to use as the dictionary for the unmatched target blocks in
    ``[lo, hi)``: around the source positions of the matched blocks on either side."""
    regions: list[tuple[int, int]] = []
    j = lo
    while j < hi:
        if m[j] >= 0:
            j += 1
            continue
        u0 = j
        while j < len(m) and m[j] < 0:
            j += 1
        u1 = j
        run = u1 - u0
        span = run + SLACK
        kp = next((m[x] for x in range(u0 - 1, max(-1, u0 - 1 - SLACK), -1) if m[x] >= 0), None)
        kn = next((m[x] for x in range(u1, min(len(m), u1 + SLACK)) if m[x] >= 0), None)
        if kp is not None and kn is not None and kp < kn <= kp + 1 + 2 * span:
            regions.append((kp + 1, kn))
            continue
        if kp is not None:
            regions.append((kp + 1, min(ns, kp + 1 + span)))
        if kn is not None:
            regions.append((max(0, kn - span), kn))
    return [(a, b) for a, b in regions if b > a]


def _merge(regions: list[tuple[int, int]], cap_blocks: int) -> list[tuple[int, int]]:
    """Merge overlapping regions (in source order), keeping at most ``cap_blocks`` blocks,
    smallest regions first (the old version of a small change is the surest match)."""
    kept: list[tuple[int, int]] = []
    total = 0
    for a, b in sorted(regions, key=lambda r: r[1] - r[0]):
        if total + (b - a) > cap_blocks:
            b = a + (cap_blocks - total)
            if b <= a:
                break
        kept.append((a, b))
        total += b - a
    kept.sort()
    out: list[tuple[int, int]] = []
    for a, b in kept:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _params(level: int, size: int) -> zstandard.ZstdCompressionParameters:
    """``level``, with a window covering dictionary + frame (at most 2**27, what the device
    decodes) and tables large enough that zstd indexes the whole dictionary; with the frame's
    content checksum (XXH64, 4 bytes), which the device's decoder checks as it decodes: a
    dictionary byte on the device that is not the source's then fails at its frame, which falls
    back at once, instead of at the image's sha256 at the end (issue 25)."""
    base = zstandard.ZstdCompressionParameters.from_level(level)
    bits = max(10, size.bit_length())
    return zstandard.ZstdCompressionParameters.from_level(
        level, window_log=max(base.window_log, min(bits, 27)), hash_log=max(base.hash_log, min(bits - 3, 30)),
        chain_log=max(base.chain_log, min(bits - 1, 30)), write_checksum=1)


def _plan_chunk(i: int, src: memoryview, tgt: memoryview, m: list[int], out_offset: int, out_length: int,
                full_length: int, dictionary_max: int, level: int) -> tuple[Op, bytes]:
    """The operation for chunk ``i`` and its frame bytes (b"" without a frame)."""
    ssize = len(src)
    end = out_offset + out_length
    copy: list[tuple[int, int, int, str]] = []
    literal: list[tuple[int, int]] = []  # target byte ranges no copy covers
    b0, b1 = out_offset // BLOCK, -(-end // BLOCK)
    j = b0
    while j < b1:
        k = m[j]
        j0 = j
        if k < 0:
            while j < b1 and m[j] < 0:
                j += 1
            a, b = max(out_offset, j0 * BLOCK), min(end, j * BLOCK)
            literal.append((a, b))
            continue
        while j + 1 < b1 and m[j + 1] == m[j] + 1:
            j += 1
        j += 1
        a, b = max(out_offset, j0 * BLOCK), min(end, j * BLOCK)
        s = k * BLOCK + (a - j0 * BLOCK)
        if s + (b - a) > ssize:  # a partial last block: only what the source has
            b = a + max(0, ssize - s)
            if b <= a:
                literal.append((a, min(end, j * BLOCK)))
                continue
        copy.append((a - out_offset, s, b - a, hashlib.sha256(src[s:s + b - a]).hexdigest()))
        if b < min(end, j * BLOCK):
            literal.append((b, min(end, j * BLOCK)))
    lit_size = sum(b - a for a, b in literal)
    if not lit_size:
        return Op(out_offset, out_length, tuple(copy)), b""
    regions = _merge(_dictionary_regions(m, b0, b1, -(-ssize // BLOCK)), dictionary_max // BLOCK)
    extents = []
    for a, b in regions:
        s, n = a * BLOCK, min(b * BLOCK, ssize) - a * BLOCK
        if n > 0:
            extents.append((s, n, hashlib.sha256(src[s:s + n]).hexdigest()))
    dictionary = b"".join(src[s:s + n] for s, n, _ in extents)
    data = b"".join(tgt[a:b] for a, b in literal)
    kwargs = {}
    if dictionary:
        kwargs["dict_data"] = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    frame = zstandard.ZstdCompressor(compression_params=_params(level, len(dictionary) + len(data)),
                                     **kwargs).compress(data)
    cost = len(frame) + SEGMENT_COST * (len(copy) + len(extents))
    if cost >= full_length:
        return Op(out_offset, out_length, full=True), b""
    f = Frame(0, len(frame), hashlib.sha256(frame).hexdigest(), len(data), hashlib.sha256(data).hexdigest())
    return Op(out_offset, out_length, tuple(copy), tuple(extents), f), frame


def create_delta(source_image: Path, source: Release, target_image: Path, target: Release, out_dir: Path, *,
                 target_dir: str, dictionary_max: int = DEFAULT_DICTIONARY, level: int = DEFAULT_DELTA_LEVEL,
                 threads: int = 0, progress: Callable[[int, int], None] | None = None) -> DeltaFiles:
    """Write ``delta-<source version>.json`` and ``.bin`` into ``out_dir``; ``target_dir`` is
    the release's target directory (the names the references carry)."""
    threads = threads or os.cpu_count() or 1
    if os.path.getsize(source_image) != source.image.size:
        raise BuildError(f"{source_image} is not the image of {source.product} {source.version} (size)")
    image: Image = target.image
    mname, dname = delta_names(str(source.version))
    with open(source_image, "rb") as sf, open(target_image, "rb") as tf, \
            mmap.mmap(sf.fileno(), 0, access=mmap.ACCESS_READ) as smm, \
            mmap.mmap(tf.fileno(), 0, access=mmap.ACCESS_READ) as tmm:
        src, tgt = memoryview(smm), memoryview(tmm)
        try:
            m = _match(_block_hashes(src), _block_hashes(tgt))
            ops: list[Op] = []
            data_path = out_dir / dname
            offset = 0
            with open(data_path, "wb") as out, ThreadPoolExecutor(threads) as pool:
                futures = [pool.submit(_plan_chunk, i, src, tgt, m, c.out_offset, c.out_length, c.length,
                                       dictionary_max, level) for i, c in enumerate(image.chunks)]
                for i, fut in enumerate(futures):
                    op, frame = fut.result()
                    if op.frame is not None:
                        f = op.frame
                        op = Op(op.out_offset, op.out_length, op.copy, op.dictionary,
                                Frame(offset, f.length, f.sha256, f.size, f.out_sha256))
                        out.write(frame)
                        offset += len(frame)
                    ops.append(op)
                    if progress:
                        progress(i + 1, len(image.chunks))
                out.flush()
                os.fsync(out.fileno())
        finally:
            src.release()
            tgt.release()
    delta = Delta(target.product, Source(str(source.version), source.image.sha256, source.image.size),
                  str(target.version), image.sha256, chunks_digest(image.chunks), dictionary_max, offset, tuple(ops))
    manifest_bytes = delta.to_bytes()
    (out_dir / mname).write_bytes(manifest_bytes)
    ref = DeltaRef(delta.source,
                   DeltaFile(f"{target_dir}/{mname}", hashlib.sha256(manifest_bytes).hexdigest(), len(manifest_bytes)),
                   DeltaFile(f"{target_dir}/{dname}", _sha256_file(data_path), offset))
    return DeltaFiles(ref, delta, out_dir / mname, data_path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def decompress_release_image(release_dir: Path, release: Release, dest_dir: Path) -> Path:
    """The image of an earlier release, decompressed from its ``rootfs.img.zst`` into a private
    temp file in ``dest_dir`` and checked chunk by chunk and whole against its manifest."""
    src = Path(release_dir) / "rootfs.img.zst"
    if not src.is_file():
        raise BuildError(f"{src} is missing: --delta-from needs the earlier release's directory with its image")
    fd, name = tempfile.mkstemp(prefix=".delta-source-", dir=dest_dir)
    whole = hashlib.sha256()
    img = release.image
    try:
        with open(src, "rb") as f, os.fdopen(fd, "w+b") as out:
            for i, ch in enumerate(img.chunks):
                f.seek(ch.offset)
                data = f.read(ch.length)
                if len(data) != ch.length or hashlib.sha256(data).hexdigest() != ch.sha256:
                    raise BuildError(f"{src}: chunk {i} does not match its release.json",
                                     hint="pass an intact release directory to --delta-from")
                kwargs = {}
                w = img.compression.window
                if w and ch.out_offset:
                    lo = max(0, ch.out_offset - w)
                    out.seek(lo)
                    kwargs["dict_data"] = zstandard.ZstdCompressionDict(out.read(ch.out_offset - lo),
                                                                        dict_type=zstandard.DICT_TYPE_RAWCONTENT)
                raw = zstandard.ZstdDecompressor(max_window_size=1 << 31, **kwargs).decompress(
                    data, max_output_size=ch.out_length)
                if hashlib.sha256(raw).hexdigest() != ch.out_sha256:
                    raise BuildError(f"{src}: chunk {i} decompresses to other bytes than its release.json says")
                out.seek(ch.out_offset)
                out.write(raw)
                whole.update(raw)
        if whole.hexdigest() != img.sha256:
            raise BuildError(f"{src} does not decompress to the image its release.json names")
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def read_delta_sources(dirs: list[Path], *, product: str, version, limits=None) -> list[tuple[Path, Release]]:
    """Check every ``--delta-from`` directory before any work: a release of ``product``, older
    than ``version``, one per source image. Returns (directory, its release)."""
    from metadata.manifest import Limits, ManifestError

    limits = limits or Limits()
    out: list[tuple[Path, Release]] = []
    for d in dirs:
        d = Path(d)
        path = d / "release.json"
        try:
            rel = Release.from_bytes(read_file(path, limits.manifest_max_bytes), limits)
        except OSError as e:  # also FileRefused: a FIFO, a directory, a huge file
            raise BuildError(f"--delta-from {d}: cannot read {path}: {e.strerror or e}",
                             hint="pass the directory 'abflip release create' wrote for the earlier release") from None
        except ManifestError as e:
            raise BuildError(f"--delta-from {d}: {e.message}") from None
        if rel.product != product:
            raise BuildError(f"--delta-from {d} is a release of {rel.product}, not {product}")
        if not rel.version < version:
            raise BuildError(f"--delta-from {d} is {rel.version}, not older than {version}",
                             hint="a delta goes from an earlier release to this one")
        if not (d / "rootfs.img.zst").is_file():
            raise BuildError(f"--delta-from {d} holds no rootfs.img.zst")
        if any(r.image.sha256 == rel.image.sha256 for _, r in out):
            raise BuildError(f"--delta-from {d}: the same source image is given twice")
        out.append((d, rel))
    return out


def make_deltas(sources: list[tuple[Path, Release]], target_image: Path, target: Release, stage: Path, *,
                target_dir: str, dictionary_max: int = DEFAULT_DICTIONARY, level: int = DEFAULT_DELTA_LEVEL,
                threads: int = 0) -> list[DeltaFiles]:
    """One delta per source into ``stage``; a delta that is not smaller than the full image is
    the user's error (nothing is gained by serving it)."""
    made = []
    for d, rel in sources:
        if rel.image.sha256 == target.image.sha256:
            raise BuildError(f"--delta-from {d}: its image is this release's image")
        tmp = decompress_release_image(d, rel, stage)
        try:
            files = create_delta(tmp, rel, target_image, target, stage, target_dir=target_dir,
                                 dictionary_max=dictionary_max, level=level, threads=threads)
        finally:
            tmp.unlink(missing_ok=True)
        if files.ref.data.length >= target.image.compressed_size:
            raise BuildError(f"the delta from {rel.version} ({files.ref.data.length} bytes) is not smaller than the "
                             f"full image ({target.image.compressed_size} bytes)", hint=f"drop --delta-from {d}")
        made.append(files)
    return made
