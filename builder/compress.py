"""Compress an image into the chunked zstd stream of the release manifest.

Each chunk is one zstd frame over ``chunk_size`` image bytes, with its content size and its
content checksum (XXH64) in the frame: the device's decoder checks it as it decodes (the bytes it
covers are the signed compressed bytes themselves; docs/transport.md). Chunk ``i > 0`` matches
back into the ``window`` image bytes before it, given to zstd as a raw *prefix*, so matches reach
back across chunk boundaries as in one long stream.

The default (issue 25) is a stream as small as the zstd CLI's in less time: a 128 MiB window,
searched as ``zstd --long=27`` searches it, by long-distance matching (LDM) over the prefix, so
repeats up to 128 MiB apart cost almost nothing, at level 5. Measured on the apply benchmark's
1 GiB image (docs/producer.md): 0.99x the size of ``zstd -T0 -9 --long=27`` in 0.6-0.8x its CPU
(level 9: 0.92x in 1.14x), where the 16 MiB window of before was 1.29x. A
window no wider than the chunk is clamped to what zstd indexes at the level
(:func:`indexable_window`: 4 MiB at level 5, 16 MiB at level 9), which changes no output byte and saves the device
loading the rest.

Frames compress in parallel threads, one frame per worker (each is independent: its prefix is
image bytes known up front, referenced where they lie in the mapped image; zstd releases the
GIL); each worker also hashes its chunk and its frame. The main thread writes the frames in
order and keeps the image's sha256. Memory per worker: zstd's context (its tables at the level, with
long-distance matching) and the frame being made (a chunk's compress bound at first); at most
``2 * threads`` frames are held; the image is mapped, not read (docs/producer.md has the figures).
Compression is :func:`metadata.zstdlib.compress`, with the libzstd ``backports.zstd`` bundles
(>= 1.5.7: how fast a wide window is depends on its prefix loading).
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

# Level 5 over the 128 MiB window: 0.99x the bytes of `zstd -T0 -9 --long=27` in 0.6-0.8x its CPU time (0.77x idle)
# (level 9: 0.92x the bytes in 1.14x the CPU; docs/producer.md, "Compression level").
DEFAULT_LEVEL = 5  # abflip/commands/producer.py repeats it (tests/test_producer.py)
DEFAULT_CHUNK = 64 << 20  # abflip/commands/producer.py repeats the defaults (tests/test_producer.py)
DEFAULT_WINDOW = 128 << 20  # the most a device accepts (limits.max_window), as zstd --long=27
DEFAULT_THREADS = 0  # one per CPU
DEFAULT_LDM = False
DEFAULT_PIECE = 4 << 20  # compressed bytes per verification unit (the device's read-ahead is two)
# Long-distance matching hashes one position in 2**LDM_RATE_LOG, of the chunk and of the whole window
# before it (again for every chunk: the frames are independent). zstd's default with a 2**27 window
# is 7; 8 halves that work for 1.5 % more bytes on the apply benchmark's image (docs/producer.md).
LDM_RATE_LOG = 8


@dataclass(frozen=True)
class CompressResult:
    compression: Compression
    chunks: tuple[Chunk, ...]
    size: int
    sha256: str
    compressed_size: int


def _params(level: int, chunk_size: int, window: int, ldm: bool = False) -> zstandard.ZstdCompressionParameters:
    """zstd's parameters at ``level`` (python-zstandard's table of them), the window log raised
    to reach across the window (at most 2**27, what a device decodes)."""
    window_log = max(10, (chunk_size + window - 1).bit_length())
    base = zstandard.ZstdCompressionParameters.from_level(level)
    return zstandard.ZstdCompressionParameters.from_level(level, window_log=max(base.window_log, min(window_log, 27)),
                                                         **({"enable_ldm": True} if ldm else {}))


def indexable_window(params: zstandard.ZstdCompressionParameters, chunk_size: int = 0, window: int = 0) -> int:
    """The most prefix bytes zstd (1.5.x) uses at these parameters: its regular match finder loads
    only the last ``1 << max(hashLog + 3, chainLog + 1)`` bytes (``ZSTD_loadDictionaryContent``);
    long-distance matching (a window wider than the chunk, or ``ldm``) hashes all of it. A larger
    window costs copy time here and on the device and changes no output byte: measured at level 9
    (16 MiB), 32 and 16 MiB windows give byte-identical streams, the 16 MiB one 30 % faster."""
    if params.enable_ldm or long_range(chunk_size, window):
        return 1 << 31
    return 1 << min(max(params.hash_log + 3, params.chain_log + 1), 31)


def long_range(chunk_size: int, window: int) -> bool:
    """A window wider than the chunk is searched with long-distance matching over the prefix, as
    ``zstd --long`` searches its window: LDM hashes the whole window, the regular match finder
    what it indexes."""
    return window > chunk_size


@dataclass(frozen=True)
class _Frame:
    """A compressed chunk and its hashes (made by a worker)."""

    data: bytes
    sha256: str
    out_sha256: str
    pieces: tuple[str, ...]


def compress_chunk(image: bytes | memoryview, offset: int, chunk_size: int, window: int,
                   params: zstandard.ZstdCompressionParameters, level: int = DEFAULT_LEVEL) -> bytes:
    """Compress one frame; its prefix is the ``window`` bytes before ``offset``."""
    return zstdlib.compress(image[offset:offset + chunk_size], image[max(0, offset - window):offset] if window else None,
                            level=level, window_log=params.window_log,
                            ldm=params.enable_ldm or long_range(chunk_size, window), ldm_rate_log=LDM_RATE_LOG,
                            checksum=True)


def _frame(image: memoryview, offset: int, chunk_size: int, window: int, params: zstandard.ZstdCompressionParameters,
           level: int, piece_size: int) -> _Frame:
    frame = compress_chunk(image, offset, chunk_size, window, params, level)
    fv = memoryview(frame)
    pieces = tuple(hashlib.sha256(fv[k:k + piece_size]).hexdigest()
                   for k in range(0, len(frame), piece_size)) if piece_size else ()
    return _Frame(frame, hashlib.sha256(frame).hexdigest(),
                  hashlib.sha256(image[offset:offset + chunk_size]).hexdigest(), pieces)


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
                   tail_ready: Callable[[], object] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> CompressResult:
    """Write the chunked stream to ``out_path``; return its chunk table and the image digest.
    Each chunk also lists the sha256 of every ``piece_size`` slice of its frame: the unit the
    device verifies before decompressing, so it can decompress a chunk while the rest arrives.
    ``tail``: a file whose bytes follow the image's in the stream (a verity tree, builder/verity.py);
    ``tail_ready``: called (it blocks, or raises) before the first chunk whose bytes reach into the
    tail is compressed, so the tail may be written while the image's chunks compress."""
    threads = threads or os.cpu_count() or 1
    params = _params(level, chunk_size, window, ldm)
    window = min(window, indexable_window(params, chunk_size, window))  # the manifest records the window used
    size = image_size = os.path.getsize(image_path)
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

        waiting = [tail_ready] if tail is not None and tail_ready is not None else []

        def submit() -> bool:
            start = next(starts, None)
            if start is None:
                return False
            if waiting and start + chunk_size > image_size:
                waiting.pop()()  # the tail is written: this chunk (and its successors' windows) read it
            pending.append((start, pool.submit(_frame, view, start, chunk_size, window, params, level, piece_size)))
            return True

        try:
            for _ in range(2 * threads):
                submit()
            while pending:
                start, fut = pending.popleft()
                fr = fut.result()
                n = min(chunk_size, size - start)
                whole.update(view[start:start + n])  # in order, while the workers compress what follows
                chunks.append(Chunk(offset, len(fr.data), fr.sha256, start, n, fr.out_sha256, fr.pieces))
                out.write(fr.data)
                offset += len(fr.data)
                fr = None
                if progress:
                    progress(start + n, size)
                submit()
        finally:
            # Also when interrupted (Ctrl-C, SIGTERM, an error): no worker may still read the
            # mapping and no slice of it may outlive it, or closing it raises BufferError over the
            # real exception (tests/test_daily_use.py).
            pool.shutdown(wait=True, cancel_futures=True)
            pending.clear()
            view.release()
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, out_path)
    return CompressResult(Compression("zstd", level, chunk_size, window, piece_size), tuple(chunks), size, whole.hexdigest(), offset)
