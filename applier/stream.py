"""Stream a compressed image into a slot: fetch + verify -> decompress -> write + hash.

The order is the invariant (docs/invariants.md 4): compressed bytes are hashed and compared with
the signed manifest *before* the decompressor sees them, a piece (``compression.piece_size``) at
a time, or a whole chunk in manifests without pieces. Chunk ``i > 0`` needs the ``window`` image
bytes before it as its dictionary; they are taken from the chunk just decompressed, or read back
from the slot, where they were written before.

Each decompressed byte is hashed once (issue 25): into the whole image's sha256, beside the write,
compared with the signed ``image.sha256`` before anything is staged (invariant 3; :func:`check_image`
says which chunk is wrong when it fails). On the way, each chunk must decode as exactly one frame
of exactly its ``out_length`` bytes, and zstd checks the frame's content checksum (XXH64, which
releases carry since issue 25) as it decodes: a chunk that decodes wrongly fails there, before it
counts as written. The chunk table's ``out_sha256`` judges a chunk alone where one must: a resume
re-hashes the chunks it counts as done (:func:`verified_prefix`), the delta path checks each chunk
it assembles, ``verify --deep`` checks them all.

:func:`write_image` overlaps the stages in threads (issue 14). It decodes with the system's libzstd
(:mod:`metadata.zstdlib`: straight into its output buffer, the dictionary referenced where it
lies), else with python-zstandard (which copies the dictionary and keeps a window buffer of its
own); the bytes written are the same either way. Memory is bounded
by the chunk table, whatever the image size (invariant 5): :func:`memory_needed` says how
much, so a device can refuse a release beyond its budget before downloading anything. The
download runs at most :func:`read_ahead` bytes past the chunk being saved, so a kill
re-downloads at most that chunk and the read-ahead (invariant 11).

:func:`verify_chunk` and :func:`decompress_chunk` are pure (the delta path and ``verify
--deep`` use them whole-chunk); :func:`write_image` owns the I/O.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import zstandard
from tuf.api import exceptions as tuf_exc

from metadata import zstdlib
from metadata.errors import DeviceError, RepositoryError, TransportError
from metadata.manifest import Chunk, Image

from .fetch import READ_SIZE, transport_hint
from .slots import SlotDevice, libc

__all__ = ["verify_chunk", "decompress_chunk", "write_image", "check_image", "memory_needed", "page_cache_needed",
           "ChunkError", "Opener", "FrameBounds"]

# Opener(start, end) -> an iterable of byte pieces of the compressed image from ``start``.
Opener = Callable[[int, int], Iterable[bytes]]
MAX_WINDOW_LOG = 27
DECODER_OVERHEAD = 1 << 20  # zstd's decompression context and input block, generously
POOL = 3  # compressed pieces in flight: one downloading, one queued, one decompressing
READ_AHEAD_PIECES = 2  # how far the download may run past the chunk being written
SLICE = 2 << 20  # decompressed bytes handed from the decompress stage to the write stage at a time
READ_IN = 1 << 20  # compressed bytes zstd asks its source for at a time
STEP = 256 << 10  # bytes written and then hashed at a time: still in the core's cache for the hash


class ChunkError(RepositoryError):
    """A chunk does not match the signed chunk table."""


def verify_chunk(index: int, chunk: Chunk, data: bytes | memoryview, piece_size: int = 0) -> None:
    """A whole compressed chunk against its sha256 (and, given the image's ``piece_size``,
    against each of its piece hashes: ``verify --deep`` checks both agree)."""
    if len(data) != chunk.length:
        raise ChunkError(f"chunk {index} is {len(data)} bytes, the manifest says {chunk.length}")
    view = memoryview(data)
    _check_unit(f"chunk {index}", chunk.offset, view, chunk.sha256)
    for k, (a, b, digest) in enumerate(chunk.piece_spans(piece_size) if piece_size and chunk.pieces else ()):
        _check_unit(f"chunk {index} piece {k}", chunk.offset + a, view[a:b], digest)


def _check_unit(what: str, offset: int, data: memoryview, sha256: str) -> None:
    """Compressed bytes from ``offset`` of the image stream against their signed sha256."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ChunkError(f"{what} (bytes {offset}-{offset + len(data) - 1}) failed verification: sha256 mismatch",
                         hint="the image on the server is corrupt or tampered with; nothing was flipped")


def _check_header(index: int, chunk: Chunk, head: bytes | memoryview) -> None:
    """The frame header (at the start of ``head``) declares the chunk's decompressed size."""
    try:
        size = zstandard.frame_content_size(head)
    except zstandard.ZstdError as e:
        raise ChunkError(f"chunk {index} is not a zstd frame: {e}") from None
    if size != chunk.out_length:
        raise ChunkError(f"chunk {index} declares {size} decompressed bytes, the manifest says {chunk.out_length}")


ZSTD_MAGIC = 0xFD2FB528


class FrameBounds:
    """Where the one zstd frame a chunk must be ends, from its headers alone (RFC 8878 3.1.1:
    frame header, then blocks of ``3 + size`` bytes, the last flagged, then the optional
    4-byte checksum). Fed a chunk's bytes in order, it refuses any byte after the frame (a
    skippable frame, an empty frame, junk), and :meth:`finish` a chunk that ends inside it.
    libzstd refuses such bytes by itself, python-zstandard's reader stops before them without a
    word: both decoders go through this, so both accept exactly the same chunks."""

    _DICT_ID = (0, 1, 2, 4)

    def __init__(self, index: int) -> None:
        self.index = index
        self.pos = 0  # bytes fed
        self.at = 0  # where the header being read starts
        self.need = 5  # magic and frame header descriptor first, then 3 per block header
        self.head = bytearray()
        self.checksum = False
        self.end: int | None = None

    def feed(self, data: bytes | memoryview) -> None:
        data = memoryview(data)
        base, self.pos = self.pos, self.pos + len(data)
        while self.end is None:
            i = self.at + len(self.head) - base
            if i >= len(data):
                return
            self.head += data[i:i + self.need - len(self.head)]
            if len(self.head) < self.need:
                return
            self._header(bytes(self.head))
            self.head.clear()
        if self.pos > self.end:
            raise ChunkError(f"chunk {self.index} has {self.pos - self.end} bytes after the end of its zstd frame")

    def _header(self, head: bytes) -> None:
        if self.need == 5:
            if int.from_bytes(head[:4], "little") != ZSTD_MAGIC:
                raise ChunkError(f"chunk {self.index} is not a zstd frame")
            fhd = head[4]
            single, fcs = (fhd >> 5) & 1, fhd >> 6
            self.checksum = bool(fhd & 4)
            self.at = 5 + (not single) + self._DICT_ID[fhd & 3] + ((1 if single else 0), 2, 4, 8)[fcs]
            self.need = 3
            return
        h = int.from_bytes(head, "little")
        kind, size = (h >> 1) & 3, h >> 3
        if kind == 3:
            raise ChunkError(f"chunk {self.index} has a zstd block of the reserved type")
        self.at += 3 + (1 if kind == 1 else size)  # an RLE block holds one byte
        if h & 1:  # the last block
            self.end = self.at + 4 * self.checksum

    def finish(self) -> None:
        if self.end is None or self.pos < self.end:
            raise ChunkError(f"chunk {self.index} ends inside its zstd frame")


def decompress_chunk(index: int, chunk: Chunk, data: bytes | memoryview, dictionary: bytes | memoryview | None,
                     into: bytearray | None = None, *, check: bool = True) -> memoryview:
    """Decompress one verified chunk (into ``into`` if given, to spare a fresh allocation);
    its output must be exactly what the manifest says: its length always, its sha256 unless
    ``check`` is false (a delta's frame, whose output the image's sha256 checks). With libzstd
    the dictionary is referenced, not copied (the delta path's ``memory_needed`` still counts
    the copy)."""
    _check_header(index, chunk, data)
    bounds = FrameBounds(index)  # one frame, nothing after it: whichever decoder runs
    bounds.feed(data)
    bounds.finish()
    buf = into if into is not None and len(into) >= chunk.out_length else bytearray(chunk.out_length)
    out = memoryview(buf)[:chunk.out_length]
    dictionary = dictionary if dictionary is not None and len(dictionary) else None
    if zstdlib.LIB is not None:
        decoder = zstdlib.Decoder(MAX_WINDOW_LOG)
        try:
            decoder.start(out, dictionary)
            done, complete = decoder.feed(data), decoder.done()
        except zstdlib.ZstdLibError as e:
            raise ChunkError(f"chunk {index} does not decompress: {e}") from None
        finally:
            decoder.close()
        if done != chunk.out_length or not complete or check and hashlib.sha256(out).hexdigest() != chunk.out_sha256:
            raise ChunkError(f"chunk {index} decompresses to other bytes than the manifest says")
        return out
    kwargs = {}
    if dictionary is not None:
        kwargs["dict_data"] = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
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
    if done != chunk.out_length or extra or check and hashlib.sha256(out).hexdigest() != chunk.out_sha256:
        raise ChunkError(f"chunk {index} decompresses to other bytes than the manifest says")
    return out


class _Reader:
    """Cut a byte source into exact lengths, into a reused buffer (no joined copies).

    A source with ``read(n)`` (:class:`applier.fetch.RangeStream`) is asked for exactly
    what the unit in hand (a piece, or a chunk) still needs, so nothing past it ever leaves
    the socket. Any other iterable of pieces is cut as it comes (its pieces may run ahead)."""

    def __init__(self, source: Iterable[bytes], buf: bytearray) -> None:
        self._source = source
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

    def take(self, n: int, into: memoryview | None = None) -> memoryview | None:
        out = memoryview(self._buf)[:n] if into is None else into
        got = 0
        while got < n:
            piece = self._piece(n - got)
            if not piece:
                return None
            out[got:got + len(piece)] = piece
            got += len(piece)
        return out

    def close(self) -> None:
        """Drop the connection (best effort: the stage reading it is being abandoned)."""
        close = getattr(self._source, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001
                pass


def verified_prefix(image: Image, slot: SlotDevice, chunks_done: int) -> tuple[int, hashlib._Hash]:
    """Re-read what an earlier run wrote; return how many chunks are still intact, and the
    running image hash over them. A chunk changed behind our back is written again.

    Each byte read goes through two hashes, its chunk's (against the chunk table) and the
    image's, computed side by side on two threads (hashlib releases the GIL), a ``SLICE`` at a
    time from one reused buffer (measured on the apply benchmark's 1 GiB image, warm: 2.6 s of
    CPU one after the other; docs/transport.md)."""
    h = hashlib.sha256()
    done = min(chunks_done, len(image.chunks))
    if not done:
        return 0, h
    buf = memoryview(bytearray(min(SLICE, max(c.out_length for c in image.chunks[:done]))))
    with ThreadPoolExecutor(1, thread_name_prefix="abflip-resume-hash") as beside:
        for i in range(done):
            ch, chunk, before = image.chunks[i], hashlib.sha256(), h.copy()
            for at in range(ch.out_offset, ch.out_offset + ch.out_length, len(buf)):
                view = buf[:min(len(buf), ch.out_offset + ch.out_length - at)]
                slot.pread_into(at, view)
                both = beside.submit(chunk.update, view)
                h.update(view)
                both.result()
            if chunk.hexdigest() != ch.out_sha256:
                return i, before
    return done, h


def memory_needed(image: Image) -> int:
    """The peak memory :func:`write_image` holds for ``image`` that the kernel cannot reclaim
    (anonymous memory; pure: the agent compares it with ``limits.memory`` before it downloads
    anything). Apart from the interpreter itself:

    - the output buffers of the largest decompressed chunk: two with libzstd
      (:mod:`metadata.zstdlib`: chunk ``i`` decodes into one, straight from zstd, while the
      write stage writes chunk ``i-1`` from the other, whose tail is chunk ``i``'s dictionary,
      referenced in place), one when the window is wider than a chunk (:func:`_out_buffers`);
      one, used as a ring, with python-zstandard;
    - the compressed pieces in flight: ``POOL`` buffers of the largest verification unit (one
      being downloaded, one queued, one being decompressed; two without pieces);
    - python-zstandard only: its copy of the dictionary, and the decoder's own window (at most
      the chunk, at most ``2**MAX_WINDOW_LOG``);
    - the decoder's context and input block (``DECODER_OVERHEAD``) and one network read (``READ_SIZE``).

    Not counted: a window wider than the output buffer, read in place from the slot's page cache
    (:func:`page_cache_needed`: file-backed pages the kernel can drop and read again).
    """
    chunks = image.chunks
    if not chunks:
        return 0
    out = max(c.out_length for c in chunks)
    piece, pool = _units(image)
    if zstdlib.LIB is not None:
        return _out_buffers(image) * out + pool * piece + DECODER_OVERHEAD + READ_SIZE
    decoder = min(out, 1 << MAX_WINDOW_LOG) + DECODER_OVERHEAD
    return out + pool * piece + _window(image) + decoder + READ_SIZE


def page_cache_needed(image: Image) -> int:
    """The most of the slot's page cache :func:`write_image` maps at once: a window wider than
    the output buffer, mapped while a chunk decodes (libzstd references it in place,
    python-zstandard copies it). File-backed and clean (written back chunk by chunk): the
    kernel reclaims these pages under pressure and faults them in again from the slot, so they
    are resident set (RssFile), not a budget to refuse a release for; the decoder touches only
    the pages its matches reach (docs/device.md has the figures)."""
    if not image.chunks:
        return 0
    window = _window(image)
    return window if window > max(c.out_length for c in image.chunks) else 0


def _out_buffers(image: Image) -> int:
    """Output buffers of the largest chunk: with libzstd two (chunk ``i`` decodes into one while
    chunk ``i-1`` is written from the other, its tail chunk ``i``'s dictionary), or one when the
    window is wider than a chunk: every chunk's dictionary then reaches into chunks already
    written, read in place from the slot, so chunk ``i`` starts once chunk ``i-1`` is written
    whatever the buffers (the second one would only cost memory). python-zstandard: one, a ring."""
    if zstdlib.LIB is None or page_cache_needed(image):
        return 1
    return 2


def _window(image: Image) -> int:
    """The widest dictionary any chunk of ``image`` has: the window, or the image before its last chunk."""
    return min(image.compression.window, max(c.out_offset for c in image.chunks))


def _units(image: Image) -> tuple[int, int]:
    """The largest verification unit of ``image`` and how many of them are in flight."""
    longest = max(c.length for c in image.chunks)
    if image.compression.piece_size:
        return min(image.compression.piece_size, longest), POOL
    return longest, 2


def read_ahead(image: Image) -> int:
    """Compressed bytes the download may run past the end of the first chunk whose progress is
    not saved: what a kill can cost beyond that chunk (``READ_AHEAD_PIECES`` pieces; none
    without pieces)."""
    return READ_AHEAD_PIECES * image.compression.piece_size


def write_image(image: Image, slot: SlotDevice, opener: Opener, *, chunks_done: int = 0, retries: int = 5,
                on_chunk: Callable[[int, int], None] | None = None, backoff: float = 0.5) -> int:
    """Write ``image`` into ``slot`` starting after ``chunks_done`` verified chunks.

    The stages overlap (issue 14), each in its own thread, joined by queues whose buffers
    are reused, so memory stays :func:`memory_needed` whatever the image size:

    1. *fetch*: read each verification unit (a piece of ``compression.piece_size`` compressed
       bytes, or a whole chunk in manifests without pieces) exactly, and compare its sha256
       with the signed manifest; only verified bytes go on;
    2. *decompress*: feed a chunk's verified pieces to zstd as they arrive, with the
       ``window`` image bytes before the chunk as its dictionary, into an output buffer (zstd
       checks the frame's content checksum and the chunk must decode to exactly its length);
    3. *write* (this thread): write each decompressed slice to the slot and add it to the whole
       image's sha256, a ``STEP`` at a time (hashed while ``pwrite`` has left it in the cache),
       compared with the manifest's at the end (before anything is staged: :func:`check_image`);
       only then may its buffer region be reused;
    4. *progress*: ``on_chunk(i, downloaded_bytes)`` for each chunk written, in order (the
       caller persists progress there, with an fsync that no longer holds up the writing).

    Each decompressed byte is hashed once, into the whole image's sha256 (the signed
    ``image.sha256``); the chunk table (signed, tiling the image exactly) re-checks a resumed
    prefix, and says which chunk is wrong if the image's hash fails.
    The download never runs more than :func:`read_ahead` bytes past the end of the first
    chunk whose progress is not saved yet: a kill costs at most that chunk and the read-ahead.
    The slot is flushed once at the end; a resume re-verifies the chunks it counts as done. A
    connection that fails is reopened at the piece it was in. Returns the compressed bytes downloaded.
    Raises :class:`ChunkError` / :class:`RepositoryError` for bad data (never retried) and
    :class:`TransportError` once ``retries`` reconnects in a row have failed.
    """
    if image.size > slot.capacity:
        raise DeviceError(f"the image decompresses to {image.size} bytes; slot {slot.name} holds only {slot.capacity}",
                          hint="this release does not fit this device's slots")
    first, whole = verified_prefix(image, slot, chunks_done)
    downloaded = 0
    if first < len(image.chunks):
        try:
            downloaded = _Pipeline(image, slot, opener, first, retries, backoff, on_chunk, whole).run()
        finally:
            _give_back()  # the pipeline's buffers are gone: return the heap they were on
    slot.sync()
    check_image(image, slot, whole, first)
    return downloaded


def check_image(image: Image, slot: SlotDevice, whole: hashlib._Hash, first: int) -> None:
    """The written image's sha256 (``whole``) against the manifest's: the check every decompressed
    byte of a stream goes through, once (issue 25; docs/transport.md). When it fails, say why: the
    first chunk from ``first`` (the chunks before it were checked one by one by
    :func:`verified_prefix`) whose bytes in the slot do not match the chunk table is a
    :class:`ChunkError`; if every chunk matches, the table does not add up to the image it names (a
    manifest that is inconsistent, issue 21). Either way it is the repository's fault, and nothing
    may be recorded good under a hash the slot does not have."""
    if whole.hexdigest() == image.sha256:
        return
    buf = bytearray(min(SLICE, max(c.out_length for c in image.chunks)))
    for i in range(first, len(image.chunks)):
        ch, h = image.chunks[i], hashlib.sha256()
        for at in range(ch.out_offset, ch.out_offset + ch.out_length, len(buf)):
            view = memoryview(buf)[:min(len(buf), ch.out_offset + ch.out_length - at)]
            slot.pread_into(at, view)
            h.update(view)
        if h.hexdigest() != ch.out_sha256:
            raise ChunkError(f"chunk {i} decompresses to other bytes than the manifest says",
                             hint="its compressed bytes matched the signed manifest; the release is broken or "
                                  "was made with another window. Nothing was flipped and the slot is not recorded "
                                  "good; the next run starts again at this chunk")
    raise RepositoryError("the written image's sha256 does not match the manifest (the manifest is inconsistent)",
                          hint="its chunks are verified but do not make the image it names; nothing was flipped "
                               "and the slot is not recorded good. Tell the publisher")


def _heap_for_large_blocks() -> None:
    """Have glibc serve large blocks from the heap and keep them for reuse (``mallopt``), for
    python-zstandard's decoder only (libzstd's decodes into our buffers and allocates no window).

    python-zstandard's zstd allocates its window (up to the chunk size) for every chunk's
    decompressor; above glibc's mmap threshold (at most 32 MiB) each one is a fresh mapping
    whose pages fault in again, chunk after chunk: measured on a 1 GiB image, 32 MiB chunks,
    1.7 s of decompression CPU, 1.15 s with this. The process is short-lived, and
    :func:`_give_back` trims the heap after the stream. Elsewhere than glibc this does nothing."""
    lib = libc()
    if hasattr(lib, "mallopt"):
        lib.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        lib.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def _give_back() -> None:
    lib = libc()
    if hasattr(lib, "malloc_trim"):
        lib.malloc_trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


class _Stop(Exception):
    """The pipeline is shutting down because another stage failed (never leaves write_image)."""


class _Pipeline:
    """The stages of :func:`write_image` and what they share."""

    def __init__(self, image: Image, slot: SlotDevice, opener: Opener, first: int, retries: int, backoff: float,
                 on_chunk: Callable[[int, int], None] | None, whole: hashlib._Hash) -> None:
        self.image, self.slot, self.opener, self.first = image, slot, opener, first
        self.retries, self.backoff, self.on_chunk = retries, backoff, on_chunk
        self.whole = whole  # the image's sha256 so far: the verified prefix, then every byte written
        self.chunks = image.chunks
        self.read_ahead = read_ahead(image)
        piece, pool = _units(image)
        self.free: queue.SimpleQueue = queue.SimpleQueue()  # piece buffers, fetch <- decompress
        for _ in range(pool):
            self.free.put(bytearray(piece))
        self.pieces: queue.SimpleQueue = queue.SimpleQueue()  # fetch -> decompress: (chunk, view, buffer)
        self.slices: queue.SimpleQueue = queue.SimpleQueue()  # decompress -> write: (chunk, start, end)
        # libzstd: two output buffers, chunk i decoding into bufs[i % 2] while the write stage
        # writes chunk i-1 from the other; one with a window wider than a chunk (_out_buffers).
        # python-zstandard: one, used as a ring: every chunk decompresses from its start, and a
        # region is overwritten only once it is written.
        out = max(c.out_length for c in self.chunks)
        self.bufs = [bytearray(out) for _ in range(_out_buffers(image))]
        self.in_place = zstdlib.LIB is not None and len(self.bufs) == 1  # every dictionary mapped from the slot
        # image bytes written to the slot *and* hashed into ``whole``: until then their buffer is not reused
        self.written = self.chunks[first].out_offset
        self.cond = threading.Condition()
        self.committed = first  # chunks [0, committed) are in the slot and verified
        self.persisted = first  # ... and ``on_chunk`` has returned for them (the caller saved its progress)
        self.progress: queue.SimpleQueue = queue.SimpleQueue()  # write -> progress: (chunk, bytes received)
        self.stopping = False
        self.failure: BaseException | None = None  # the first stage to fail says why
        self.wire = 0  # bytes off the wire by closed connections
        self.reader: _Reader | None = None

    @property
    def received(self) -> int:
        with self.cond:
            reader = self.reader
            return self.wire + (reader.received if reader is not None else 0)

    # -- coordination ------------------------------------------------------------------------
    def _wait(self, ready: Callable[[], bool], timeout: float | None = None) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.stopping or ready(), timeout)
        if self.stopping:
            raise _Stop

    def _get(self, q: queue.SimpleQueue):
        while True:
            try:
                return q.get(timeout=0.2)
            except queue.Empty:
                if self.stopping:
                    raise _Stop from None

    def _fail(self, e: BaseException, to: queue.SimpleQueue) -> None:
        if not isinstance(e, _Stop):
            with self.cond:
                if self.failure is None:
                    self.failure = e
                self.cond.notify_all()  # the write stage may be waiting for the progress stage
        to.put(e)

    def run(self) -> int:
        """Run the stages to the last chunk; the compressed bytes downloaded."""
        if zstdlib.LIB is None:
            _heap_for_large_blocks()
        stages = [threading.Thread(target=self._fetch_stage, name="abflip-fetch", daemon=True),
                  threading.Thread(target=self._decompress_stage, name="abflip-decompress", daemon=True)]
        progress = threading.Thread(target=self._progress_stage, name="abflip-progress", daemon=True)
        for t in (*stages, progress):
            t.start()
        try:
            self._write_stage()
            end = self.image.size
            self._wait(lambda: (self.persisted == len(self.chunks) and self.written == end) or self.failure is not None)
            if self.failure is not None:
                raise self.failure
        except BaseException:
            with self.cond:
                self.stopping = True
                self.cond.notify_all()
            reader = self.reader
            if reader is not None:
                reader.close()  # a fetch blocked in a read returns at once
            progress.join()  # the caller's progress is saved, or not, before the error leaves
            for t in stages:  # neither writes anything that lasts: one still blocked is left behind
                t.join(timeout=2)
            raise
        for t in (*stages, progress):
            t.join()
        return self.received

    # -- 4. progress --------------------------------------------------------------------------
    def _progress_stage(self) -> None:
        """``on_chunk`` for each chunk written, in order, off the write stage's path (the caller
        saves its progress there: an fsync, slow on some flash)."""
        try:
            while self.persisted < len(self.chunks):
                i, received = self._get(self.progress)
                if self.on_chunk:
                    self.on_chunk(i, received)
                with self.cond:
                    self.persisted = i + 1
                    self.cond.notify_all()
        except BaseException as e:
            self._fail(e, self.slices)

    # -- 1. fetch and verify ---------------------------------------------------------------------
    def _fetch_stage(self) -> None:
        try:
            self._fetch()
        except BaseException as e:  # handed on: the write stage raises it
            self._fail(e, self.pieces)

    def _limit(self) -> int:
        """The last compressed byte (exclusive) the download may reach now: the read-ahead past
        the first chunk whose progress is not saved yet."""
        c = self.persisted
        if c >= len(self.chunks):
            return self.image.compressed_size
        return self.chunks[c].offset + self.chunks[c].length + self.read_ahead

    def _fetch(self) -> None:
        total, piece_size = self.image.compressed_size, self.image.compression.piece_size
        failures = 0
        i, k = self.first, 0
        while i < len(self.chunks):
            ch = self.chunks[i]
            spans = ch.piece_spans(piece_size)
            a, b, digest = spans[k]
            self._wait(lambda: ch.offset + b <= self._limit())
            buf = self._get(self.free)
            view = memoryview(buf)[:b - a]
            try:
                if self.reader is None:
                    self.reader = _Reader(self.opener(ch.offset + a, total), buf)
                data = self.reader.take(b - a, view)
            except tuf_exc.DownloadError as e:
                self.free.put(buf)
                self._drop_reader()
                failures += 1
                if failures > self.retries:
                    raise TransportError(f"downloading the image failed at chunk {i} after {self.retries} retries: "
                                         f"{e}", hint=transport_hint(e)) from None
                self._sleep(self.backoff * failures)
                continue
            if data is None:
                where = f" {self.reader.url}" if self.reader.url else ""
                raise RepositoryError(f"the image{where} ended before chunk {i}: the server has fewer than its "
                                      f"signed {total} bytes")
            _check_unit(f"chunk {i}" if len(spans) == 1 else f"chunk {i} piece {k}", ch.offset + a, view, digest)
            self.pieces.put((i, view, buf))
            failures = 0
            k += 1
            if k == len(spans):
                i, k = i + 1, 0

    def _drop_reader(self) -> None:
        with self.cond:
            if self.reader is not None:
                self.wire += self.reader.received
                self.reader = None

    def _sleep(self, seconds: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.stopping, seconds)
        if self.stopping:
            raise _Stop

    # -- 2. decompress ------------------------------------------------------------------------
    def _decompress_stage(self) -> None:
        try:
            self._decompress()
        except BaseException as e:
            self._fail(e, self.slices)

    def _dictionary(self, i: int, prev: memoryview | None) -> zstandard.ZstdCompressionDict | None:
        """python-zstandard: chunk ``i``'s dictionary, a copy of the ``window`` image bytes
        before it (:meth:`_prefix`), so the buffer it came from may be overwritten after."""
        with self._prefix(i, prev) as prefix:
            if prefix is None:
                return None
            return zstandard.ZstdCompressionDict(prefix, dict_type=zstandard.DICT_TYPE_RAWCONTENT)

    @contextlib.contextmanager
    def _prefix(self, i: int, prev: memoryview | None) -> Iterator[memoryview | None]:
        """Chunk ``i``'s dictionary, the ``window`` image bytes before it, in place while the
        context lasts: the tail of the chunk just decompressed (``prev``), else (resuming, or
        a window wider than a chunk) read back from the slot, where it was written and verified
        before: into the output buffer chunk ``i`` does not use (or will overwrite only after
        python-zstandard has copied it), or, wider than a buffer, mapped from the page cache."""
        ch, window = self.chunks[i], self.image.compression.window
        if not window or not ch.out_offset:
            yield None
            return
        lo = max(0, ch.out_offset - window)
        need = ch.out_offset - lo
        if prev is not None and len(prev) >= need and not self.in_place:
            yield prev[len(prev) - need:]
            return
        # every byte before chunk i is in the slot, and hashed: the buffer read into below is free
        self._wait(lambda: self.committed >= i and self.written >= ch.out_offset)
        if need <= len(self.bufs[0]) and not self.in_place:
            into = memoryview(self.bufs[(i + 1) % len(self.bufs)])[:need]
            self.slot.pread_into(lo, into)
            yield into
            return
        with self.slot.mapped(lo, need) as view:  # wider than a buffer: straight from the page cache
            yield view

    def _decompress(self) -> None:
        if zstdlib.LIB is not None:
            return self._decode()
        prev: memoryview | None = None
        out = memoryview(self.bufs[0])
        for i in range(self.first, len(self.chunks)):
            ch = self.chunks[i]
            kwargs = {}
            if (dictionary := self._dictionary(i, prev)) is not None:
                kwargs["dict_data"] = dictionary
            prev = None
            source = _Pieces(self, i)
            _check_header(i, ch, source.peek())
            done = 0
            try:
                reader = zstandard.ZstdDecompressor(max_window_size=1 << MAX_WINDOW_LOG, **kwargs).stream_reader(
                    source, read_size=READ_IN, closefd=False)
                while done < ch.out_length:
                    end = min(done + SLICE, ch.out_length)
                    # the region still holds the chunk before, until the write stage has written it
                    free = ch.out_offset if i == self.first else self.chunks[i - 1].out_offset + min(
                        end, self.chunks[i - 1].out_length)
                    self._wait(lambda: self.written >= free)
                    n = reader.readinto(out[done:end])
                    if not n:
                        break
                    self.slices.put((i, done, done + n))
                    done += n
                extra = reader.read(1)
            except zstandard.ZstdError as e:
                raise ChunkError(f"chunk {i} does not decompress: {e}") from None
            del reader, dictionary, kwargs
            if done != ch.out_length or extra:
                raise ChunkError(f"chunk {i} decompresses to other bytes than the manifest says")
            source.drain()
            self.slices.put((i, None, None))
            prev = out[:ch.out_length]

    def _decode(self) -> None:
        """The decompress stage with libzstd: each chunk decodes straight into its own output
        buffer, its dictionary referenced where it lies (:meth:`_prefix`); what is final is
        handed to the write stage after every ``READ_IN`` compressed bytes."""
        decoder = zstdlib.Decoder(MAX_WINDOW_LOG)
        prev: memoryview | None = None
        try:
            for i in range(self.first, len(self.chunks)):
                ch = self.chunks[i]
                n = len(self.bufs)
                if i >= self.first + n:  # bufs[i % n] held chunk i-n: written (and hashed) yet?
                    self._wait(lambda: self.written >= self.chunks[i - n + 1].out_offset)
                out = memoryview(self.bufs[i % n])[:ch.out_length]
                source = _Pieces(self, i)
                _check_header(i, ch, source.peek())
                with self._prefix(i, prev) as prefix:
                    decoder.start(out, prefix)
                    done = 0
                    try:
                        while data := source.read(READ_IN):
                            if (n := decoder.feed(data)) > done:
                                self.slices.put((i, done, n))
                                done = n
                    except zstdlib.ZstdLibError as e:  # a frame's checksum that fails is one of these
                        raise ChunkError(f"chunk {i} does not decompress: {e}") from None
                    finally:
                        decoder.end()
                if done != ch.out_length or not decoder.done():
                    raise ChunkError(f"chunk {i} decompresses to other bytes than the manifest says")
                source.drain()
                self.slices.put((i, None, None))
                prev = out
        finally:
            decoder.close()

    # -- 3. write and hash --------------------------------------------------------------------
    def _write_stage(self) -> None:
        """Write each slice and add it to the whole image's sha256, in ``STEP``s: each step is
        hashed right after ``pwrite`` read it, while it is in this core's cache (issue 25: one pass
        over memory instead of two, measured ~20 % less CPU for the two than a write and a hash of
        the whole slice). A chunk's end commits it."""
        bufs = [memoryview(b) for b in self.bufs]
        while self.committed < len(self.chunks):
            item = self._get(self.slices)
            if isinstance(item, BaseException):
                raise self.failure or item
            i, a, b = item
            ch = self.chunks[i]
            if a is None:
                self.slot.start_writeback(ch.out_offset, ch.out_length)  # the final flush finds little left
                self.progress.put((i, self.received))
                with self.cond:
                    self.committed = i + 1
                    self.cond.notify_all()
                continue
            buf = bufs[i % len(bufs)]
            for at in range(a, b, STEP):
                step = buf[at:min(at + STEP, b)]
                self.slot.pwrite(ch.out_offset + at, step)  # flushed once at the end
                self.whole.update(step)
            with self.cond:  # written and hashed: the decompress stage may reuse the region
                self.written = ch.out_offset + b
                self.cond.notify_all()


class _Pieces:
    """Chunk ``i``'s verified pieces as a file zstd reads from (``read(n)``), in order; a piece's
    buffer goes back to the fetch stage once zstd asks for more (it has consumed it)."""

    def __init__(self, pipe: _Pipeline, i: int) -> None:
        self.pipe, self.i = pipe, i
        self.left = self.pipe.chunks[i].length
        self.view = memoryview(b"")
        self.buf: bytearray | None = None
        self.bounds = FrameBounds(i)  # one frame, nothing after it: whichever decoder runs

    def _next(self) -> None:
        if self.buf is not None:
            self.pipe.free.put(self.buf)
            self.buf = None
        item = self.pipe._get(self.pipe.pieces)
        if isinstance(item, BaseException):
            raise item
        i, self.view, self.buf = item
        assert i == self.i, (i, self.i)
        self.left -= len(self.view)
        self.bounds.feed(self.view)

    def peek(self) -> memoryview:
        if not self.view and self.left:
            self._next()
        return self.view

    def read(self, n: int = -1) -> memoryview | bytes:
        if not self.view:
            if not self.left:
                return b""
            self._next()
        n = len(self.view) if n is None or n < 0 else n
        out, self.view = self.view[:n], self.view[n:]
        return out

    def drain(self) -> None:
        """Take the chunk's remaining pieces (bytes after the frame): the next chunk starts clean."""
        self.view = memoryview(b"")
        while self.left:
            self._next()
            self.view = memoryview(b"")
        if self.buf is not None:
            self.pipe.free.put(self.buf)
            self.buf = None
        self.bounds.finish()
