"""What a download may cost (issue 10 item 6, issue 9 item 15, issue 14): the image stream runs
at most two pieces past the chunk being written, so a kill re-downloads at most that chunk and
the read-ahead; and the memory a
signed chunk table can make the device spend is what :func:`applier.stream.memory_needed`
says, measured as the resident set of a real process writing a real image."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import assert_untouched, release_of
from test_agent_lifecycle import agent

from abflip.httpserver import RepoHandler, Server
from applier.fetch import HttpFetcher
from applier.slots import SlotDevice
from applier.stream import read_ahead, write_image
from builder.release import create_release
from metadata import zstdlib
from metadata.manifest import Release

REPO = Path(__file__).resolve().parents[1]


def _image_url(world, rel) -> str:
    return f"{world.url}/{world.object(rel.image.target).relative_to(world.repo).as_posix()}"


@pytest.mark.parametrize("piece", [64 << 10, 0], ids=["pieces", "whole-chunks"])
def test_reads_never_run_past_the_chunk_being_written(tmp_path, piece):
    """Over a fast server, at every chunk written the device has taken off the wire at least
    the bytes up to that chunk's end and at most ``read_ahead`` beyond (two pieces; none when
    the manifest has no pieces, whose chunks are read one at a time): what a kill throws away."""
    size, chunk = 6 * (256 << 10), 256 << 10
    raw = tmp_path / "image.raw"
    raw.write_bytes(os.urandom(size))  # incompressible: a chunk spans four pieces
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k" * 4096)
    out = tmp_path / "release"
    create_release(raw, out, product="demo-os", version="9.0.0", compatible=["demo-hw"], kernel=kernel,
                   chunk_size=chunk, window=chunk, piece_size=piece, created=1700000000)
    rel = Release.from_bytes((out / "release.json").read_bytes())
    chunks = rel.image.chunks
    ahead = read_ahead(rel.image)
    assert ahead == 2 * piece and (not piece or all(len(c.pieces) >= 4 for c in chunks))
    slot = tmp_path / "slot"
    slot.write_bytes(bytes(size))
    fetcher = HttpFetcher(timeout=5)
    with Server(out) as srv:
        for start in (0, 2):  # fresh, and resumed after two chunks
            seen = []
            with SlotDevice("b", slot, write=True) as dev:
                got = write_image(rel.image, dev, lambda s, e: fetcher.open_range(f"{srv.url}/rootfs.img.zst", s, e),
                                  chunks_done=start, on_chunk=lambda i, n: seen.append((i, n)))
            base = chunks[start].offset
            assert [i for i, _ in seen] == list(range(start, len(chunks)))
            for i, n in seen:
                end = chunks[i].offset + chunks[i].length - base
                assert end <= n <= min(end + ahead, rel.image.compressed_size - base), (i, n, end)
            assert got == rel.image.compressed_size - base
    assert hashlib.sha256(slot.read_bytes()).hexdigest() == rel.image.sha256


class _Paced(RepoHandler):
    """Sends the image in small paced pieces and counts them; the test kills the device mid-way."""

    sent = 0

    def send_bytes(self, data, start, end):
        view = memoryview(data)[start:end]
        if not self.path.endswith(".zst"):
            return RepoHandler.send_bytes(self, data, start, end)
        for i in range(0, len(view), 8192):
            self.wfile.write(view[i:i + 8192])
            _Paced.sent += len(view[i:i + 8192])
            time.sleep(0.01)


def test_killed_download_lost_nothing_but_the_chunk_it_was_in(world):
    """``abflip download`` is SIGKILLed just after chunk 1: what it had taken off the wire
    (persisted with the progress) ends within the read-ahead (two pieces) past its last
    verified chunk, and the re-run fetches the image from the chunk after it; over both
    runs, nothing beyond the interrupted chunk and the read-ahead is fetched twice."""
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    rel = release_of(world, "2.0.0")
    chunks = rel.image.chunks
    _Paced.sent = 0
    world.handler = _Paced
    cmd = [sys.executable, "-m", "abflip.cli", "download", "--config", str(sim.config_path), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    watchdog = threading.Timer(90, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.strip() and json.loads(line).get("chunk") == 2:  # chunk 1 (0-based) is written
                break
        else:
            pytest.fail(f"download ended before it could be killed: {proc.wait()} {proc.stderr.read()}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
    assert_untouched(sim, dev)
    target = json.loads((sim.config.state_dir / "state.json").read_text())["target"]
    done = target["chunks_done"]
    assert 2 <= done < len(chunks)
    end = chunks[done - 1].offset + chunks[done - 1].length
    assert end <= target["bytes_downloaded"] <= end + read_ahead(rel.image)

    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])["result"]
    assert result["resumed_at_chunk"] == done
    assert result["bytes_downloaded"] == rel.image.compressed_size - chunks[done].offset
    # server side, what sat in socket buffers at the kill included (the device was busy with
    # a chunk, e.g. in fsync, while the server went on sending): not exact, but within a chunk
    fetched_twice = _Paced.sent - rel.image.compressed_size
    assert 0 <= fetched_twice <= max(c.length for c in chunks) + read_ahead(rel.image)


_RSS_PROBE = r"""
import json, re, sys, threading, time
from metadata.manifest import Release
from applier.fetch import HttpFetcher
from applier.slots import SlotDevice
from applier.stream import memory_needed, page_cache_needed, write_image

def rss(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read())[1]) << 10

peak_anon, done = [0], threading.Event()

def sample():  # the kernel keeps no peak of RssAnon: sampled (the buffers live as long as the stream)
    while not done.wait(0.002):
        peak_anon[0] = max(peak_anon[0], rss("RssAnon"))

rel = Release.from_bytes(open(sys.argv[1], "rb").read())
url, slot, first = sys.argv[2], sys.argv[3], int(sys.argv[4])
fetcher = HttpFetcher(timeout=30)
with SlotDevice("b", slot, write=True) as dev:
    before, anon = rss("VmRSS"), rss("RssAnon")
    sampler = threading.Thread(target=sample)
    sampler.start()
    write_image(rel.image, dev, lambda s, e: fetcher.open_range(url, s, e), chunks_done=first)
    done.set()
    sampler.join()
    peak = rss("VmHWM")
print(json.dumps({"grew": peak - before, "anon": peak_anon[0] - anon, "need": memory_needed(rel.image),
                  "file": page_cache_needed(rel.image)}))
"""


@pytest.mark.parametrize("decoder", ["libzstd", "python"])
@pytest.mark.parametrize("chunks_done", [0, 1], ids=["fresh", "resumed"])
@pytest.mark.parametrize("window", ["chunk", "wide"])
def test_memory_needed_bounds_the_anonymous_memory(tmp_path, chunks_done, decoder, window):
    """A real 48 MiB image, incompressible (so the compressed chunk is as big as it gets), written
    by a separate process over HTTP, in 16 MiB chunks with a 16 MiB window, or in 8 MiB chunks
    with a 32 MiB window (read in place from the slot's page cache): its peak anonymous memory
    (RssAnon, what the kernel cannot reclaim) grows by no more than memory_needed() and by at
    least half of it, and its whole resident set by no more than that and page_cache_needed(),
    with either decoder (metadata.zstdlib, or python-zstandard where libzstd is missing)."""
    if decoder == "libzstd" and zstdlib.LIB is None:
        pytest.fail("no libzstd on this machine (Debian's libzstd1)")
    size = 48 << 20
    chunk, win = (16 << 20, 16 << 20) if window == "chunk" else (8 << 20, 32 << 20)
    raw = tmp_path / "image.raw"
    raw.write_bytes(os.urandom(size))
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k" * 4096)
    out = tmp_path / "release"
    create_release(raw, out, product="demo-os", version="9.0.0", compatible=["demo-hw"], kernel=kernel,
                   chunk_size=chunk, window=win, created=1700000000)
    rel = Release.from_bytes((out / "release.json").read_bytes())
    assert len(rel.image.chunks) == size // chunk
    first = chunks_done * (size // chunk // 2)  # resumed: half the image is already written
    slot = tmp_path / "slot"
    with open(slot, "wb") as f:
        f.truncate(size)
    if first:
        with open(raw, "rb") as src, open(slot, "r+b") as dst:
            dst.write(src.read(rel.image.chunks[first].out_offset))
    with Server(out) as srv:
        r = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(out / "release.json"),
                            f"{srv.url}/rootfs.img.zst", str(slot),
                            str(first)], capture_output=True, text=True, cwd=REPO, timeout=120,
                           env={**os.environ, "ABFLIP_ZSTD": decoder})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    need = got["need"]
    # libzstd: two output buffers (one with the wide window, read in place), three pieces;
    # python-zstandard: the output ring, the dictionary, the decoder's window, three pieces
    bufs = (2 if win <= chunk else 1) * chunk
    assert need >= (bufs if decoder == "libzstd" else chunk + win + min(chunk, 16 << 20)) + 3 * (4 << 20)
    assert got["file"] == (win if win > chunk else 0)
    assert need // 2 <= got["anon"] <= need + (4 << 20), got
    assert got["grew"] <= need + got["file"] + (4 << 20), got
