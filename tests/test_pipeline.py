"""The overlapped image stream (issue 14): verification pieces in the manifest, and what the
three stages of :func:`applier.stream.write_image` do with bad pieces, dropped connections
and a failing slot. Real HTTP on 127.0.0.1, a real release, a file as the slot."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zstandard

from abflip.httpserver import RepoHandler, Server
from applier.fetch import HttpFetcher
from applier.slots import SlotDevice
from applier.stream import ChunkError, decompress_chunk, read_ahead, verify_chunk, write_image
from builder.release import create_release
from metadata import zstdlib
from metadata.errors import DeviceError, RepositoryError, TransportError, UserError
from metadata.manifest import Chunk, Compression, Image, ManifestError, Release

CHUNK, PIECE = 256 << 10, 64 << 10
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, params=["libzstd", "bundled", "python"])
def decoder(request, monkeypatch) -> str:
    """Every stream test runs with each decoder: the system's libzstd (metadata.zstdlib), the one
    backports.zstd bundles through the same binding (a device without the system's), and the
    python-zstandard fallback a device without either uses."""
    if request.param == "python":
        monkeypatch.setattr(zstdlib, "LIB", None)
    elif request.param == "bundled":
        monkeypatch.setattr(zstdlib, "LIB", zstdlib.load("bundled"))
        assert zstdlib.LIB is not None and zstdlib.LIB.ZSTD_versionNumber() >= 10507
    elif zstdlib.LIB is None:
        pytest.fail("no libzstd on this machine (Debian's libzstd1)")
    return request.param


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Release]:
    """Six 256 KiB chunks of half-random bytes (each chunk spans two or three 64 KiB pieces)."""
    d = tmp_path_factory.mktemp("pipeline")
    raw = d / "image.raw"
    rnd = os.urandom(3 * CHUNK)
    raw.write_bytes(b"".join(rnd[i:i + 4096] + bytes(4096) for i in range(0, len(rnd), 4096)))
    kernel = d / "vmlinuz"
    kernel.write_bytes(b"k" * 4096)
    create_release(raw, d / "release", product="demo-os", version="9.0.0", compatible=["demo-hw"], kernel=kernel,
                   chunk_size=CHUNK, window=CHUNK, piece_size=PIECE, created=1700000000)
    rel = Release.from_bytes((d / "release" / "release.json").read_bytes())
    assert len(rel.image.chunks) == 6 and all(len(c.pieces) >= 2 for c in rel.image.chunks)
    return d / "release", rel


def _slot(tmp_path: Path, size: int) -> Path:
    slot = tmp_path / "slot"
    with open(slot, "wb") as f:
        f.truncate(size)
    return slot


def _write(url: str, rel: Release, slot: Path, **kw) -> tuple[int, list[tuple[int, int]]]:
    seen: list[tuple[int, int]] = []
    fetcher = HttpFetcher(timeout=5)
    with SlotDevice("b", slot, write=True) as dev:
        n = write_image(rel.image, dev, lambda s, e: fetcher.open_range(url, s, e),
                        on_chunk=lambda i, got: seen.append((i, got)), backoff=0.01, **kw)
    return n, seen


# -- the manifest ---------------------------------------------------------------------------
def test_pieces_are_in_the_manifest_and_round_trip(release):
    _, rel = release
    data = json.loads(rel.to_bytes())
    assert data["image"]["compression"]["piece_size"] == PIECE
    for c, raw in zip(rel.image.chunks, data["image"]["chunks"]):
        assert raw["pieces"] == list(c.pieces) and len(c.pieces) == -(-c.length // PIECE)
    assert Release.from_bytes(rel.to_bytes()) == rel


def test_a_manifest_without_pieces_keeps_its_bytes(release):
    """Releases made before pieces parse as before and serialise byte for byte as before."""
    _, rel = release
    old = json.loads(rel.to_bytes())
    del old["image"]["compression"]["piece_size"]
    for c in old["image"]["chunks"]:
        del c["pieces"]
    text = (json.dumps(old, indent=1, sort_keys=True) + "\n").encode()
    parsed = Release.from_bytes(text)
    assert parsed.image.compression.piece_size == 0 and all(not c.pieces for c in parsed.image.chunks)
    assert parsed.to_bytes() == text
    assert read_ahead(parsed.image) == 0


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["image"]["chunks"][1]["pieces"].pop(), "must list"),
    (lambda d: d["image"]["chunks"][1]["pieces"].append("0" * 64), "must list"),
    (lambda d: d["image"]["chunks"][0]["pieces"].__setitem__(0, "X" * 64), "not 64 lowercase hex"),
    (lambda d: d["image"]["chunks"][0].__setitem__("pieces", "abc"), "must list"),
    (lambda d: d["image"]["compression"].__setitem__("piece_size", 1024), "piece_size must be"),
    (lambda d: d["image"]["compression"].__setitem__("piece_size", True), "piece_size must be"),
    (lambda d: d["image"]["compression"].__setitem__("piece_size", 0), "piece_size must be"),
    (lambda d: d["image"]["compression"].pop("piece_size"), "lists pieces but"),
])
def test_hostile_piece_tables_are_refused(release, mutate, message):
    _, rel = release
    d = json.loads(rel.to_bytes())
    mutate(d)
    with pytest.raises(ManifestError, match=message):
        Release.from_bytes(json.dumps(d).encode())


def test_piece_size_is_checked_before_any_work(tmp_path):
    raw = tmp_path / "image.raw"
    raw.write_bytes(bytes(8192))
    with pytest.raises(UserError, match="--piece-size"):
        create_release(raw, tmp_path / "out", product="demo-os", version="1.0.0", compatible=["demo-hw"],
                       kernel=raw, chunk_size=4096, piece_size=100)
    assert not (tmp_path / "out").exists()


def test_verify_deep_checks_pieces_against_the_chunk(release):
    d, rel = release
    ch = rel.image.chunks[2]
    data = (d / "rootfs.img.zst").read_bytes()[ch.offset:ch.offset + ch.length]
    verify_chunk(2, ch, data, PIECE)
    bad = dataclasses.replace(ch, pieces=(ch.pieces[0], "0" * 64, *ch.pieces[2:]))
    verify_chunk(2, bad, data)  # without the piece size: the whole chunk only
    with pytest.raises(ChunkError, match="chunk 2 piece 1"):
        verify_chunk(2, bad, data, PIECE)


# -- the stream -----------------------------------------------------------------------------
def test_the_stream_writes_the_image(release, tmp_path):
    d, rel = release
    slot = _slot(tmp_path, rel.image.size)
    with Server(d) as srv:
        n, seen = _write(f"{srv.url}/rootfs.img.zst", rel, slot)
    assert n == rel.image.compressed_size
    assert [i for i, _ in seen] == list(range(6))
    assert hashlib.sha256(slot.read_bytes()).hexdigest() == rel.image.sha256


class _Counting:
    """hashlib for applier.stream, counting the bytes that go through sha256."""

    def __init__(self) -> None:
        self.hashed = 0

    def sha256(self, data=b"", h=None):
        outer, h = self, h or hashlib.sha256()

        class Counted:
            def update(self, b) -> None:
                outer.hashed += memoryview(b).nbytes
                h.update(b)

            def hexdigest(self) -> str:
                return h.hexdigest()

            def copy(self):
                return outer.sha256(h=h.copy())

        c = Counted()
        c.update(data)
        return c


@pytest.mark.parametrize("chunks_done", [0, 2])
def test_each_byte_is_hashed_once(release, tmp_path, monkeypatch, chunks_done):
    """The verification the stream adds to a plain download: one sha256 pass over the compressed
    bytes (its pieces) and one over the decompressed bytes (the whole image's), no more (issue 25).
    A resume re-hashes the chunks it counts as done from the slot once more (each against the
    chunk table), and adds them to the image's hash."""
    import applier.stream as stream

    d, rel = release
    slot = _slot(tmp_path, rel.image.size)
    with Server(d) as srv:
        if chunks_done:
            _write(f"{srv.url}/rootfs.img.zst", rel, slot)
        counting = _Counting()
        monkeypatch.setattr(stream, "hashlib", counting)
        _write(f"{srv.url}/rootfs.img.zst", rel, slot, chunks_done=chunks_done)
    done = rel.image.chunks[chunks_done].out_offset
    fetched = rel.image.compressed_size - rel.image.chunks[chunks_done].offset
    assert counting.hashed == fetched + rel.image.size + done
    assert hashlib.sha256(slot.read_bytes()).hexdigest() == rel.image.sha256


def test_a_chunk_that_decodes_to_other_bytes_is_named_at_the_end(tmp_path):
    """A signed frame without a checksum that decodes to bytes other than the chunk table's (a
    producer's mistake): nothing is hashed per chunk while streaming, so the image's sha256 fails at
    the end, and the chunk is named from the slot; the slot is never recorded good."""
    out = os.urandom(CHUNK // 4) * 4
    other = bytearray(out)
    other[1000] ^= 1
    image, data = _frames(zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(other)), out)
    with pytest.raises(ChunkError, match="chunk 1 decompresses to other bytes than the manifest says"):
        _stream(tmp_path, image, data)
    _no_stage_left()


class _Tamper(RepoHandler):
    """Flips one byte of the image at ``at`` (an offset in the compressed stream)."""

    at = 0

    def send_bytes(self, data, start, end):
        body = bytearray(memoryview(data)[start:end])
        if start <= self.at < end:
            body[self.at - start] ^= 1
        self.wfile.write(body)


def test_a_tampered_piece_stops_before_it_is_decompressed(release, tmp_path):
    """A byte flipped in chunk 3's second piece: the chunks before it are written, chunk 3 is
    not (its first piece was already being decompressed, but nothing of it is committed), and
    the error names the piece."""
    d, rel = release
    ch = rel.image.chunks[3]
    _Tamper.at = ch.offset + PIECE + 17
    slot = _slot(tmp_path, rel.image.size)
    seen: list[tuple[int, int]] = []
    fetcher = HttpFetcher(timeout=5)
    with Server(d, handler=_Tamper) as srv, SlotDevice("b", slot, write=True) as dev:
        with pytest.raises(ChunkError, match=r"chunk 3 piece 1 \(bytes .*\) failed verification"):
            write_image(rel.image, dev, lambda s, e: fetcher.open_range(f"{srv.url}/rootfs.img.zst", s, e),
                        on_chunk=lambda i, got: seen.append((i, got)))
    assert [i for i, _ in seen] == [0, 1, 2]
    _no_stage_left()


class _DropOnce(RepoHandler):
    """Cuts the first connection after ``cut`` bytes; records every Range asked for."""

    cut = 0
    ranges: list[str] = []
    dropped = False

    def send_bytes(self, data, start, end):
        _DropOnce.ranges.append(self.headers.get("Range", ""))
        view = memoryview(data)[start:end]
        if not _DropOnce.dropped:
            _DropOnce.dropped = True
            self.wfile.write(view[:self.cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(view)


def test_a_dropped_connection_resumes_at_the_piece_it_was_in(release, tmp_path):
    d, rel = release
    ch = rel.image.chunks[2]
    piece_start = ch.offset + PIECE
    _DropOnce.cut, _DropOnce.ranges, _DropOnce.dropped = piece_start + 1000, [], False
    slot = _slot(tmp_path, rel.image.size)
    with Server(d, handler=_DropOnce) as srv:
        n, seen = _write(f"{srv.url}/rootfs.img.zst", rel, slot)
    assert _DropOnce.ranges[1] == f"bytes={piece_start}-{rel.image.compressed_size - 1}", _DropOnce.ranges
    assert n == rel.image.compressed_size + 1000  # the 1000 bytes of the cut piece came twice
    assert hashlib.sha256(slot.read_bytes()).hexdigest() == rel.image.sha256


def test_a_server_that_keeps_failing_is_a_transport_error(release, tmp_path):
    d, rel = release
    slot = _slot(tmp_path, rel.image.size)
    with Server(d) as srv:
        url = f"{srv.url}/rootfs.img.zst"
    with pytest.raises(TransportError, match="failed at chunk 0 after 2 retries"):  # the server is gone
        _write(url, rel, slot, retries=2)
    _no_stage_left()


class _Slow(RepoHandler):
    def send_bytes(self, data, start, end):
        view = memoryview(data)[start:end]
        for i in range(0, len(view), 16384):
            self.wfile.write(view[i:i + 16384])
            time.sleep(0.002)


class _FailingSlot(SlotDevice):
    writes = 0

    def pwrite(self, offset, data):
        _FailingSlot.writes += 1
        if offset >= 2 * CHUNK:
            raise DeviceError(f"writing slot {self.name} at byte {offset} failed: [Errno 5] Input/output error")
        super().pwrite(offset, data)


def test_a_failing_slot_stops_every_stage(release, tmp_path):
    """An I/O error in the write stage ends the stream with that error; the fetch and
    decompress stages stop too (none is left running, downloading or waiting)."""
    d, rel = release
    slot = _slot(tmp_path, rel.image.size)
    fetcher = HttpFetcher(timeout=5)
    seen: list[int] = []
    with Server(d, handler=_Slow) as srv, _FailingSlot("b", slot, write=True) as dev:
        with pytest.raises(DeviceError, match="Input/output error"):
            write_image(rel.image, dev, lambda s, e: fetcher.open_range(f"{srv.url}/rootfs.img.zst", s, e),
                        on_chunk=lambda i, got: seen.append(i))
    assert seen == [0, 1]
    _no_stage_left()


_WRITER = r"""
import sys
from applier.fetch import HttpFetcher
from applier.slots import SlotDevice
from applier.stream import write_image
from metadata.errors import Error
from metadata.manifest import Release

rel = Release.from_bytes(open(sys.argv[1], "rb").read())
fetcher = HttpFetcher(timeout=5)
seen = []
with SlotDevice("b", sys.argv[3], write=True) as dev:
    try:
        write_image(rel.image, dev, lambda s, e: fetcher.open_range(sys.argv[2], s, e), on_chunk=lambda i, g: seen.append(i))
    except Error as e:
        print(seen, e.message)
        sys.exit(1)
print(seen)
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt-get install strace)")
def test_an_error_starting_the_writeback_is_a_write_error(release, tmp_path, decoder):
    """After each chunk the kernel is asked to start writing it back (sync_file_range); that call
    failing (EIO injected by strace into the second one) ends the stream as a failed write of
    that chunk, which is not counted done."""
    d, rel = release
    slot = _slot(tmp_path, rel.image.size)
    with Server(d) as srv:
        r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=sync_file_range",
                            "-e", "inject=sync_file_range:error=EIO:when=2", sys.executable, "-c", _WRITER,
                            str(d / "release.json"), f"{srv.url}/rootfs.img.zst", str(slot)],
                           capture_output=True, text=True, timeout=60, cwd=REPO,
                           env={**os.environ, **({"ABFLIP_ZSTD": "python"} if decoder == "python" else {})})
    assert r.returncode == 1, r.stderr
    assert r.stdout.strip() == f"[0] writing slot b at byte {CHUNK} failed: Input/output error"


@pytest.mark.parametrize("at", [2, 5], ids=["mid-image", "last-chunk"])
def test_a_failing_progress_save_ends_the_stream_with_its_error(release, tmp_path, at):
    """``on_chunk`` (the caller's state save) runs in its own thread; when it fails (EIO/ENOSPC
    on the state file), the stream ends at once with that error: it neither hangs waiting for
    progress that will not come (found by the fault campaign) nor reports success."""
    d, rel = release
    slot = _slot(tmp_path, rel.image.size)
    fetcher = HttpFetcher(timeout=5)
    saved: list[int] = []

    def on_chunk(i, got):
        if i == at:
            raise DeviceError("saving the state failed: [Errno 28] No space left on device")
        saved.append(i)

    t0 = time.monotonic()
    with Server(d) as srv, SlotDevice("b", slot, write=True) as dev:
        with pytest.raises(DeviceError, match="No space left"):
            write_image(rel.image, dev, lambda s, e: fetcher.open_range(f"{srv.url}/rootfs.img.zst", s, e),
                        on_chunk=on_chunk)
    assert time.monotonic() - t0 < 30
    assert saved == list(range(at))
    _no_stage_left()


def _no_stage_left() -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        alive = [t.name for t in threading.enumerate() if t.name.startswith("abflip-")]
        if not alive:
            return
        time.sleep(0.05)
    pytest.fail(f"pipeline stages still running: {alive}")


# -- frames a hostile signer could sign -------------------------------------------------------
def _frames(second: bytes, out: bytes) -> tuple[Image, bytes]:
    """A two-chunk image: chunk 0 a good frame of ``CHUNK`` bytes, chunk 1 the given compressed
    bytes said to decompress to ``out``; every hash signed as a signer would."""
    first = os.urandom(CHUNK // 2) * 2
    a = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(first)
    chunks = (Chunk(0, len(a), hashlib.sha256(a).hexdigest(), 0, len(first), hashlib.sha256(first).hexdigest()),
              Chunk(len(a), len(second), hashlib.sha256(second).hexdigest(), len(first), len(out),
                    hashlib.sha256(out).hexdigest()))
    image = Image("rootfs.img.zst", "erofs", len(first) + len(out), hashlib.sha256(first + out).hexdigest(),
                  Compression("zstd", 3, CHUNK, 0), chunks)
    return image, a + second


def _stream(tmp_path: Path, image: Image, data: bytes) -> list[int]:
    seen: list[int] = []
    with SlotDevice("b", _slot(tmp_path, image.size), write=True) as dev:
        write_image(image, dev, lambda s, e: [data[s:e]], on_chunk=lambda i, got: seen.append(i))
    return seen


def test_a_frame_reaching_before_its_window_is_refused(tmp_path):
    """Chunk 1 compressed against all 256 KiB before it while the manifest says the window is
    64 KiB: the device hands the decoder only the window, so the matches that reach farther
    fail (or decode to other bytes): chunk 1 is never committed."""
    rnd = os.urandom(CHUNK)
    out = rnd[:CHUNK // 2] * 2
    a = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(rnd)
    b = zstandard.ZstdCompressor(level=3, write_content_size=True, dict_data=zstandard.ZstdCompressionDict(
        rnd, dict_type=zstandard.DICT_TYPE_RAWCONTENT)).compress(out)
    assert len(b) < CHUNK // 4  # it does match into the first chunk, far back
    chunks = (Chunk(0, len(a), hashlib.sha256(a).hexdigest(), 0, CHUNK, hashlib.sha256(rnd).hexdigest()),
              Chunk(len(a), len(b), hashlib.sha256(b).hexdigest(), CHUNK, len(out), hashlib.sha256(out).hexdigest()))
    image = Image("rootfs.img.zst", "erofs", 2 * CHUNK, hashlib.sha256(rnd + out).hexdigest(),
                  Compression("zstd", 3, CHUNK, 64 << 10), chunks)
    with pytest.raises(ChunkError, match="chunk 1 (does not decompress|decompresses to other bytes)"):
        assert _stream(tmp_path, image, a + b) == [0]
    _no_stage_left()


@pytest.mark.parametrize("case", ["truncated", "short", "corrupt"])
def test_a_bad_frame_is_refused_before_it_is_committed(tmp_path, case):
    """Signed but bad: the frame cut short, a frame whose content is shorter than the manifest
    says (and its header agreeing with the manifest is checked first), a checksummed frame whose
    checksum fails. Chunk 1 is never committed, whichever decoder."""
    out = os.urandom(CHUNK // 4) * 4
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=True).compress(out)
    if case == "truncated":
        second = frame[:-40]
    elif case == "short":
        second, out = zstandard.ZstdCompressor(level=3).compress(out[:-1]), out
    else:
        second = frame[:-1] + bytes([frame[-1] ^ 0xFF])
    image, data = _frames(second, out)
    with pytest.raises(ChunkError, match="chunk 1 "):
        _stream(tmp_path, image, data)
    _no_stage_left()


AFTER = {
    "zeros": b"\0" * 100,
    "frame": zstandard.ZstdCompressor().compress(b"more"),
    "empty frame": zstandard.ZstdCompressor(write_content_size=True).compress(b""),  # decodes to nothing
    "skippable frame": (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"junk",  # RFC 8878 3.1.2
}


@pytest.mark.parametrize("after", AFTER)
def test_bytes_after_the_frame_are_refused(tmp_path, after):
    """Signed bytes after a chunk's frame, garbage or another frame (one that decodes to nothing
    included, which python-zstandard's reader would stop before without a word): refused by both
    decoders, the same way, in the pipeline and in decompress_chunk (the delta path, verify --deep)."""
    out = os.urandom(CHUNK // 4) * 4
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(out)
    image, data = _frames(frame + AFTER[after], out)
    message = f"chunk 1 has {len(AFTER[after])} bytes after the end of its zstd frame"
    with pytest.raises(ChunkError, match=message):
        _stream(tmp_path, image, data)
    _no_stage_left()
    chunk = image.chunks[1]
    with pytest.raises(ChunkError, match=message):
        decompress_chunk(1, chunk, data[chunk.offset:chunk.offset + chunk.length], None)


def test_an_image_sha256_that_its_chunks_do_not_make_is_refused(tmp_path):
    """Every chunk matches the chunk table, but the signed image sha256 is another: the manifest is
    inconsistent (a repository error) whether the image is written whole or resumed after its last
    chunk, so no slot is ever recorded good under a hash it does not have."""
    import dataclasses

    out = os.urandom(CHUNK // 4) * 4
    good, data = _frames(zstandard.ZstdCompressor(level=3, write_content_size=True).compress(out), out)
    image = dataclasses.replace(good, sha256="0" * 64)
    for chunks_done in (0, 1, 2):
        with SlotDevice("b", _slot(tmp_path, image.size), write=True) as dev:
            with pytest.raises(RepositoryError, match="the written image's sha256 does not match the manifest"):
                write_image(image, dev, lambda s, e: [data[s:e]], chunks_done=chunks_done)
    with SlotDevice("b", _slot(tmp_path, good.size), write=True) as dev:
        write_image(good, dev, lambda s, e: [data[s:e]], chunks_done=1)  # the same bytes under their own hash
