"""Stream a compressed image into a slot: fetch chunk -> verify -> decompress -> write.

The order is the invariant (DESIGN.md 4): a chunk's compressed bytes are hashed and
compared with the signed chunk table *before* the decompressor sees them. Chunk ``i > 0``
needs the ``window`` image bytes before it as its dictionary; they are read back from the
slot, where they were written (and verified) before, or taken from the chunk just written.
Memory is bounded by the chunk table, whatever the image size (invariant 5):
:func:`memory_needed` says how much, so a device can refuse a release beyond its budget
before downloading anything. The compressed stream is read exactly chunk by chunk, so a
kill re-downloads at most the chunk it interrupted.

:func:`verify_chunk` and :func:`decompress_chunk` are pure; :func:`write_image` owns the I/O.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator

import zstandard
from tuf.api import exceptions as tuf_exc

from metadata.errors import DeviceError, RepositoryError, TransportError
from metadata.manifest import Chunk, Image

from .fetch import READ_SIZE, transport_hint
from .slots import SlotDevice

__all__ = ["verify_chunk", "decompress_chunk", "write_image", "memory_needed", "ChunkError", "Opener"]

# Opener(start, end) -> an iterable of byte pieces of the compressed image from ``start``.
Opener = Callable[[int, int], Iterable[bytes]]
MAX_WINDOW_LOG = 27
DECODER_OVERHEAD = 1 << 20  # zstd's decompression context and input block, generously


class ChunkError(RepositoryError):
    """A chunk does not match the signed chunk table."""


def verify_chunk(index: int, chunk: Chunk, data: bytes | memoryview) -> None:
    if len(data) != chunk.length:
        raise ChunkError(f"chunk {index} is {len(data)} bytes, the manifest says {chunk.length}")
    if hashlib.sha256(data).hexdigest() != chunk.sha256:
        raise ChunkError(f"chunk {index} (bytes {chunk.offset}-{chunk.offset + chunk.length - 1}) failed verification: "
                         "sha256 mismatch", hint="the image on the server is corrupt or tampered with; nothing was flipped")


def decompress_chunk(index: int, chunk: Chunk, data: bytes | memoryview, dictionary: bytes | memoryview | None,
                     into: bytearray | None = None) -> memoryview:
    """Decompress one verified chunk (into ``into`` if given, to spare a fresh allocation);
    its output must be exactly what the manifest says."""
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise ChunkError(f"chunk {index} is not a zstd frame: {e}") from None
    if size != chunk.out_length:
        raise ChunkError(f"chunk {index} declares {size} decompressed bytes, the manifest says {chunk.out_length}")
    kwargs = {}
    if dictionary is not None and len(dictionary):
        kwargs["dict_data"] = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    buf = into if into is not None and len(into) >= chunk.out_length else bytearray(chunk.out_length)
    out = memoryview(buf)[:chunk.out_length]
    done = 0
    try:
        reader = zstandard.ZstdDecompressor(max_window_size=1 << MAX_WINDOW_LOG, **kwargs).stream_reader(data)
        while done < chunk.out_length:
            n = reader.readinto(out[done:])
            if not n:
                break
            done += n
        extra = reader.read(1)
    except zstandard.ZstdError as e:
        raise ChunkError(f"chunk {index} does not decompress: {e}") from None
    if done != chunk.out_length or extra or hashlib.sha256(out).hexdigest() != chunk.out_sha256:
        raise ChunkError(f"chunk {index} decompresses to other bytes than the manifest says")
    return out


class _Reader:
    """Cut a byte source into exact lengths, into one reused buffer (no joined copies).

    A source with ``read(n)`` (:class:`applier.fetch.RangeStream`) is asked for exactly
    what the chunk in hand still needs, so nothing past the chunk being processed ever
    leaves the socket: a process killed at any point re-downloads at most that chunk.
    Any other iterable of pieces is cut as it comes (its pieces may run ahead)."""

    def __init__(self, source: Iterable[bytes], buf: bytearray) -> None:
        self._read: Callable[[int], bytes] | None = getattr(source, "read", None)
        self._it: Iterator[bytes] | None = None if self._read is not None else iter(source)
        self._left = memoryview(b"")
        self._buf = buf
        self.url: str = getattr(source, "url", "")
        self.received = 0  # bytes that came off the wire, used or not

    def _piece(self, want: int) -> memoryview:
        if not self._left:
            if self._read is not None:
                data = self._read(want)
            else:
                data = next(self._it, b"")  # type: ignore[arg-type]
            self.received += len(data)
            self._left = memoryview(data)
        piece, self._left = self._left[:want], self._left[want:]
        return piece

    def take(self, n: int) -> memoryview | None:
        out = memoryview(self._buf)[:n]
        got = 0
        while got < n:
            piece = self._piece(n - got)
            if not piece:
                return None
            out[got:got + len(piece)] = piece
            got += len(piece)
        return out


def verified_prefix(image: Image, slot: SlotDevice, chunks_done: int) -> tuple[int, hashlib._Hash]:
    """Re-read what an earlier run wrote; return how many chunks are still intact, and the
    running image hash over them. A chunk changed behind our back is written again."""
    h = hashlib.sha256()
    for i in range(min(chunks_done, len(image.chunks))):
        ch = image.chunks[i]
        data = slot.pread(ch.out_offset, ch.out_length)
        if hashlib.sha256(data).hexdigest() != ch.out_sha256:
            return i, h
        h.update(data)
    return min(chunks_done, len(image.chunks)), h


def memory_needed(image: Image) -> int:
    """The peak bytes :func:`write_image` holds for ``image`` (pure; the agent compares it with
    ``limits.memory`` before it downloads anything). Apart from the interpreter itself:

    - two output buffers of the largest decompressed chunk (chunk ``i`` decompresses into one
      while the other holds chunk ``i-1``, its dictionary, and is being hashed);
    - one buffer of the largest compressed chunk (the bytes being verified);
    - the dictionary: python-zstandard copies the ``window`` bytes it is given, and when the
      window is larger than an output buffer they are read back from the slot into a buffer
      of their own (never more than once per chunk, and reused);
    - the decompressor: its window (at most the chunk, at most ``2**MAX_WINDOW_LOG``) plus
      ``DECODER_OVERHEAD`` for its context and input block;
    - one network read (``READ_SIZE``).
    """
    chunks = image.chunks
    if not chunks:
        return 0
    out = max(c.out_length for c in chunks)
    compressed = max(c.length for c in chunks)
    window = min(image.compression.window, max(c.out_offset for c in chunks))
    dict_buffer = window if window > out else 0
    decoder = min(out, 1 << MAX_WINDOW_LOG) + DECODER_OVERHEAD
    return 2 * out + compressed + window + dict_buffer + decoder + READ_SIZE


def write_image(image: Image, slot: SlotDevice, opener: Opener, *, chunks_done: int = 0, retries: int = 5,
                on_chunk: Callable[[int, int], None] | None = None, backoff: float = 0.5) -> int:
    """Write ``image`` into ``slot`` starting after ``chunks_done`` verified chunks.

    ``on_chunk(i, downloaded_bytes)`` runs after chunk ``i`` is written (the caller persists
    progress there; the slot is flushed once at the end, and a resume re-verifies the chunks
    it counts as done, so a power cut that lost written pages costs only their re-download).
    An opener returning a stream with ``read(n)`` is read exactly chunk by chunk: at
    ``on_chunk(i, …)`` nothing past chunk ``i`` has been downloaded, so a kill costs at
    most the one chunk it interrupted. Peak memory is :func:`memory_needed`.
    Returns the compressed bytes downloaded by this call.
    Raises :class:`ChunkError` / :class:`RepositoryError` for bad data (never retried) and
    :class:`TransportError` once ``retries`` reconnects in a row have failed.
    """
    if image.size > slot.capacity:
        raise DeviceError(f"the image decompresses to {image.size} bytes; slot {slot.name} holds only {slot.capacity}",
                          hint="this release does not fit this device's slots")
    i, h = verified_prefix(image, slot, chunks_done)
    # Two output buffers, alternating: chunk i decompresses into one while the other still
    # holds chunk i-1, its dictionary. Reusing them spares a fresh 32 MiB mapping per chunk.
    biggest = max(c.out_length for c in image.chunks)
    buffers = (bytearray(biggest), bytearray(biggest))
    inbuf = bytearray(max(c.length for c in image.chunks))  # the compressed chunk, reused
    # The whole-image hash runs in a second thread (hashlib lets go of the GIL) while the next
    # chunk downloads and decompresses; a buffer is reused only once its hash is done.
    hasher = ThreadPoolExecutor(1, thread_name_prefix="abflip-hash")
    hashing: list[Future | None] = [None, None]
    try:
        downloaded = _write_chunks(image, slot, opener, i, h, retries, on_chunk, backoff, buffers, inbuf, hasher,
                                   hashing)
        for f in hashing:
            if f is not None:
                f.result()
    finally:
        hasher.shutdown(wait=True)
    slot.sync()
    if h.hexdigest() != image.sha256:
        raise RepositoryError("the written image's sha256 does not match the manifest (the manifest is inconsistent)")
    return downloaded


def _write_chunks(image: Image, slot: SlotDevice, opener: Opener, i: int, h, retries: int,
                  on_chunk: Callable[[int, int], None] | None, backoff: float, buffers: tuple[bytearray, bytearray],
                  inbuf: bytearray, hasher: ThreadPoolExecutor, hashing: list) -> int:
    total = image.compressed_size
    window = image.compression.window
    downloaded = 0
    failures = 0
    prev: memoryview | None = None
    prev_end = -1
    dict_buf: bytearray | None = None  # only for a window larger than an output buffer
    while i < len(image.chunks):
        start = image.chunks[i].offset
        reader = _Reader((), inbuf)
        try:
            reader = _Reader(opener(start, total), inbuf)
            while i < len(image.chunks):
                ch = image.chunks[i]
                data = reader.take(ch.length)
                if data is None:
                    where = f" {reader.url}" if reader.url else ""
                    raise RepositoryError(f"the image{where} ended before chunk {i}: the server has fewer than its "
                                          f"signed {total} bytes")
                verify_chunk(i, ch, data)
                dictionary: bytes | memoryview | None = None
                if window and ch.out_offset:
                    lo = max(0, ch.out_offset - window)
                    need = ch.out_offset - lo
                    if prev is not None and prev_end == ch.out_offset and len(prev) >= need:
                        dictionary = prev[len(prev) - need:]  # the chunk just written
                    else:  # resuming, or a window wider than a chunk: read it back from the slot
                        if need <= len(buffers[(i + 1) % 2]):
                            if hashing[(i + 1) % 2] is not None:
                                hashing[(i + 1) % 2].result()
                            dictionary = memoryview(buffers[(i + 1) % 2])[:need]  # the idle buffer
                        else:
                            if dict_buf is None or len(dict_buf) < need:
                                dict_buf = bytearray(min(window, image.chunks[-1].out_offset))
                            dictionary = memoryview(dict_buf)[:need]
                        slot.pread_into(lo, dictionary)
                if hashing[i % 2] is not None:
                    hashing[i % 2].result()  # the buffer's previous chunk is hashed: reuse it
                out = decompress_chunk(i, ch, data, dictionary, buffers[i % 2])
                del data, dictionary
                slot.pwrite(ch.out_offset, out)  # flushed once at the end: the kernel writes back
                hashing[i % 2] = hasher.submit(h.update, out)  # meanwhile; a resume re-verifies
                prev, prev_end = out, ch.out_offset + ch.out_length
                failures = 0
                if on_chunk:
                    on_chunk(i, downloaded + reader.received)
                i += 1
        except tuf_exc.DownloadError as e:
            downloaded += reader.received
            reader.received = 0
            failures += 1
            if failures > retries:
                raise TransportError(f"downloading the image failed at chunk {i} after {retries} retries: {e}",
                                     hint=transport_hint(e)) from None
            time.sleep(backoff * failures)
        else:
            downloaded += reader.received
    return downloaded
