"""Compress an image into the chunked zstd stream of the release manifest.

Each chunk is one zstd frame over ``chunk_size`` image bytes. Chunk ``i > 0`` uses the
``window`` image bytes before it as a raw-content dictionary (zstd's "prefix" idea), so
matches reach back across chunk boundaries as they would in one long stream. Measured on
a 540 MB erofs image at level 9: one stream 159.6 MB, zstd CLI (-T0 --long=27) 161.3 MB,
32 MiB chunks without a dictionary 167.0 MB (+3.5 %), 32 MiB chunks with a 32 MiB
dictionary 161.2 MB (0.999x the CLI). Frames compress in parallel threads (zstandard
releases the GIL), and at most ``2 * threads`` compressed frames are held in memory.
The window is clamped to what zstd indexes at the level (:func:`indexable_window`: 16 MiB at
level 9), which changes no output byte and saves loading the rest.

Long-range mode (issue 14): a window larger than the chunk (``--window 128M``, 32 MiB chunks)
is searched as by ``zstd --long=27``: with libzstd (:func:`long_range`) by long-distance matching
over the window referenced as a prefix, else (python-zstandard) by raising zstd's hash table until
the whole window is indexed. Measured on a 160 MiB image whose halves repeat 96 MiB apart, level 9,
32 MiB chunks: 16 MiB (clamped) window 87.08 MB, 128 MiB window 52.28 MB (hash table),
``zstd -T0 -9 --long=27`` 52.25 MB (1.0005x); on the apply benchmark's 1 GiB image: libzstd 29.9 s
and 0.923x the CLI's size, the hash table 52.5 s and 0.890x (docs/producer.md). The device reads
the window in place from its slot (``applier.stream.memory_needed``): a device whose
``limits.memory`` is too small refuses such a release before downloading it.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import mmap
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard

from metadata import zstdlib
from metadata.manifest import Chunk, Compression

__all__ = ["compress_image", "CompressResult", "Joined", "DEFAULT_LEVEL", "DEFAULT_CHUNK", "DEFAULT_WINDOW", "DEFAULT_THREADS",
           "DEFAULT_LDM", "DEFAULT_PIECE"]

DEFAULT_LEVEL = 9
DEFAULT_CHUNK = 32 << 20
DEFAULT_WINDOW = 32 << 20
DEFAULT_THREADS = 0  # one per CPU
DEFAULT_LDM = False
DEFAULT_PIECE = 4 << 20  # compressed bytes per verification unit (the device's read-ahead is two)


@dataclass(frozen=True)
class CompressResult:
    compression: Compression
    chunks: tuple[Chunk, ...]
    size: int
    sha256: str
    compressed_size: int


def _params(level: int, chunk_size: int, window: int, ldm: bool = False) -> zstandard.ZstdCompressionParameters:
    window_log = max(10, (chunk_size + window - 1).bit_length())
    base = zstandard.ZstdCompressionParameters.from_level(level)
    extra: dict = {"enable_ldm": True} if ldm else {}
    if window > chunk_size and not ldm and not long_range(chunk_size, window):
        # Long-range mode (issue 14): a window larger than the chunk is meant to be searched
        # whole. zstd indexes only ``1 << max(hashLog + 3, chainLog + 1)`` dictionary bytes and
        # LDM never sees a dictionary (the CDict is built without it), so the hash table grows
        # until the whole window is indexed (2**26 entries at most: 512 MiB).
        extra["hash_log"] = max(base.hash_log, min(26, (window - 1).bit_length() - 3))
    return zstandard.ZstdCompressionParameters.from_level(level, window_log=max(base.window_log, min(window_log, 27)),
                                                         **extra)


def indexable_window(params: zstandard.ZstdCompressionParameters, chunk_size: int = 0, window: int = 0) -> int:
    """The most dictionary bytes zstd (1.5.x) indexes at these parameters: it loads only the last
    ``1 << max(hashLog + 3, chainLog + 1)`` bytes of a raw-content dictionary (without LDM)
    (``ZSTD_loadDictionaryContent``). A larger window costs copy time here and on the device
    and changes no output byte: measured at level 9 (16 MiB), 32 and 16 MiB windows give
    byte-identical streams, the 16 MiB one 30 % faster."""
    if params.enable_ldm or long_range(chunk_size, window):
        return 1 << 31
    return 1 << min(max(params.hash_log + 3, params.chain_log + 1), 31)


def long_range(chunk_size: int, window: int) -> bool:
    """A window wider than the chunk is searched with libzstd's long-distance matching over a
    referenced prefix (:mod:`metadata.zstdlib`) where libzstd is there: LDM hashes the whole
    window, the regular match finder what it indexes, and nothing is copied. Measured on 128 MiB
    of the apply benchmark's image, 32 MiB chunks, 128 MiB window, level 9, one core: 6.1 s and
    31.2 MB, against 12.1 s and 30.3 MB with the hash table raised (python-zstandard, below)."""
    return window > chunk_size and zstdlib.LIB is not None


def compress_chunk(image: bytes | memoryview, offset: int, chunk_size: int, window: int,
                   params: zstandard.ZstdCompressionParameters, level: int = DEFAULT_LEVEL) -> bytes | bytearray:
    """Compress one frame; the dictionary is the ``window`` bytes before ``offset``."""
    if long_range(chunk_size, window):
        return zstdlib.compress(image[offset:offset + chunk_size], image[max(0, offset - window):offset],
                                level=level, window_log=params.window_log, ldm=True)
    kwargs = {}
    if window and offset:
        kwargs["dict_data"] = zstandard.ZstdCompressionDict(
            bytes(image[max(0, offset - window):offset]), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(compression_params=params, **kwargs).compress(image[offset:offset + chunk_size])


class Joined:
    """Files read as one run of bytes, each memory-mapped (the image, then its verity tree: builder/verity.py).
    A slice within one file is a view of its mapping; one across a seam is a copy (the chunk or dictionary that
    spans it, no more)."""

    def __init__(self, stack: contextlib.ExitStack, paths: list[Path]) -> None:
        self.parts: list[memoryview] = []
        for p in paths:
            if os.path.getsize(p):
                f = stack.enter_context(open(p, "rb"))
                self.parts.append(memoryview(stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))))
        stack.callback(self.release)  # before the mappings close (callbacks run last in, first out)
        self.starts = [0]
        for v in self.parts:
            self.starts.append(self.starts[-1] + len(v))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, s: slice) -> memoryview | bytes:
        lo, hi, _ = s.indices(len(self))
        i = bisect.bisect_right(self.starts, lo) - 1
        if i < len(self.parts) and hi <= self.starts[i + 1]:
            return self.parts[i][lo - self.starts[i]:hi - self.starts[i]]
        out = bytearray()
        while lo < hi:
            out += self.parts[i][lo - self.starts[i]:min(hi, self.starts[i + 1]) - self.starts[i]]
            lo = self.starts[i + 1]
            i += 1
        return bytes(out)

    def release(self) -> None:
        for v in self.parts:
            v.release()


def compress_image(image_path: Path, out_path: Path, *, level: int = DEFAULT_LEVEL, chunk_size: int = DEFAULT_CHUNK,
                   window: int = DEFAULT_WINDOW, threads: int = DEFAULT_THREADS, ldm: bool = DEFAULT_LDM,
                   piece_size: int = DEFAULT_PIECE, tail: Path | None = None,
                   progress: Callable[[int, int], None] | None = None) -> CompressResult:
    """Write the chunked stream to ``out_path``; return its chunk table and the image digest.
    Each chunk also lists the sha256 of every ``piece_size`` slice of its frame: the unit the
    device verifies before decompressing, so it can decompress a chunk while the rest arrives.
    ``tail``: a file whose bytes follow the image's in the stream (a verity tree, builder/verity.py)."""
    threads = threads or os.cpu_count() or 1
    params = _params(level, chunk_size, window, ldm)
    window = min(window, indexable_window(params, chunk_size, window))  # the manifest records the window used
    size = os.path.getsize(image_path)
    if size == 0:
        raise ValueError("empty image")
    whole = hashlib.sha256()
    chunks: list[Chunk] = []
    offset = 0
    tmp = out_path.with_name(out_path.name + ".tmp")
    with contextlib.ExitStack() as stack, open(tmp, "wb") as out:
        view = Joined(stack, [image_path] if tail is None else [image_path, tail])
        size = len(view)
        pool = ThreadPoolExecutor(threads)
        pending: deque = deque()
        starts = iter(range(0, size, chunk_size))
        raw = fv = None

        def submit() -> bool:
            start = next(starts, None)
            if start is None:
                return False
            pending.append((start, pool.submit(compress_chunk, view, start, chunk_size, window, params, level)))
            return True

        try:
            for _ in range(2 * threads):
                submit()
            while pending:
                start, fut = pending.popleft()
                frame = fut.result()
                raw = view[start:start + chunk_size]
                whole.update(raw)
                fv = memoryview(frame)
                pieces = tuple(hashlib.sha256(fv[k:k + piece_size]).hexdigest()
                               for k in range(0, len(frame), piece_size)) if piece_size else ()
                chunks.append(Chunk(offset, len(frame), hashlib.sha256(frame).hexdigest(), start, len(raw),
                                    hashlib.sha256(raw).hexdigest(), pieces))
                raw = fv = None
                out.write(frame)
                offset += len(frame)
                if progress:
                    progress(start + chunk_size if start + chunk_size < size else size, size)
                submit()
        finally:
            # Also when interrupted (Ctrl-C, SIGTERM, an error): no worker may still read the
            # mapping and no slice of it may outlive it, or closing it raises BufferError over the
            # real exception (tests/test_daily_use.py).
            pool.shutdown(wait=True, cancel_futures=True)
            pending.clear()
            raw = fv = None
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, out_path)
    return CompressResult(Compression("zstd", level, chunk_size, window, piece_size), tuple(chunks), size, whole.hexdigest(), offset)
