"""Misbehaving servers (issue 10): each story is a mirror on 127.0.0.1 that misbehaves one
way while the device installs. Every one ends within the fetcher's configured bounds, in a
clear error that names the URL it is about and the cause, with nothing flipped; then the
mirror behaves and the same device installs the update. Servers that misbehave in ways
HTTP allows (redirects to a good mirror, Range ignored) must simply work.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import socket
import struct
import time
import tracemalloc

import pytest
from helpers import assert_untouched, release_of

from abflip.httpserver import RepoHandler, Server
from applier.agent import Device
from applier.fetch import HttpFetcher
from metadata.errors import RepositoryError, TransportError

BOUND = 20.0  # generous: proves "it ended", not how fast
TIMEOUT = 1.0  # the test's network.timeout: a stall is noticed after this long
FLOOR = (1024, 1.0)  # network.low_speed_limit (bytes/s), low_speed_time (s)


def _is_image(handler) -> bool:
    return handler.path.split("?", 1)[0].endswith(".zst")


def _is_timestamp(handler) -> bool:
    return handler.path.split("?", 1)[0].endswith("timestamp.json")


def _headers(handler, status: int, headers: dict[str, str]) -> None:
    handler.send_response(status)
    for k, v in headers.items():
        handler.send_header(k, v)
    handler.end_headers()


# -- the misbehaving servers ---------------------------------------------------------------
class Truncate(RepoHandler):
    """Promises the whole range, sends half of it, closes."""

    def send_bytes(self, data, start, end):
        if not _is_image(self):
            return RepoHandler.send_bytes(self, data, start, end)
        self.wfile.write(bytes(memoryview(data)[start:start + (end - start) // 2]))
        self.close_connection = True


class Reset(RepoHandler):
    """Sends a little of the image, then resets the connection (RST, not FIN)."""

    def send_bytes(self, data, start, end):
        if not _is_image(self):
            return RepoHandler.send_bytes(self, data, start, end)
        self.wfile.write(bytes(memoryview(data)[start:start + min(4096, (end - start) // 2)]))
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True


class Stall(RepoHandler):
    """Answers the image's headers, then sends nothing (a hung mirror)."""

    def send_bytes(self, data, start, end):
        if not _is_image(self):
            return RepoHandler.send_bytes(self, data, start, end)
        time.sleep(4 * TIMEOUT)
        self.close_connection = True


class StallMetadata(RepoHandler):
    def send_bytes(self, data, start, end):
        if not _is_timestamp(self):
            return RepoHandler.send_bytes(self, data, start, end)
        time.sleep(4 * TIMEOUT)
        self.close_connection = True


class Drip(RepoHandler):
    """The image at a few bytes a second: never a gap long enough for the read timeout."""

    def send_bytes(self, data, start, end):
        if not _is_image(self):
            return RepoHandler.send_bytes(self, data, start, end)
        stop = time.monotonic() + 8  # on a fetcher without a speed floor, this would go on for days
        for i in range(start, end):
            if time.monotonic() > stop:
                break
            self.wfile.write(bytes(memoryview(data)[i:i + 1]))
            time.sleep(0.2 * TIMEOUT)
        self.close_connection = True


def _status(code: int, which):
    class Status(RepoHandler):
        def do_GET(self, head=False):
            if not which(self):
                return RepoHandler.do_GET(self, head)
            _headers(self, code, {"Content-Length": "0", "Retry-After": "1"})

    Status.__name__ = f"HTTP{code}"
    return Status


class WrongContentRange(RepoHandler):
    """206 with a Content-Range for other bytes than were asked for."""

    def do_GET(self, head=False):
        if not _is_image(self):
            return RepoHandler.do_GET(self, head)
        path = self.resolve()
        data = path.read_bytes()
        body = data[1:]
        _headers(self, 206, {"Content-Range": f"bytes 1-{len(data) - 1}/{len(data)}",
                             "Content-Length": str(len(body))})
        self.wfile.write(body)


class ContentLengthLie(RepoHandler):
    """206 claiming the whole range, with a Content-Length 1000 bytes short of it."""

    def do_GET(self, head=False):
        if not _is_image(self):
            return RepoHandler.do_GET(self, head)
        data = self.resolve().read_bytes()
        start = int(self.headers["Range"].split("=")[1].split("-")[0])
        _headers(self, 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}",
                             "Content-Length": str(max(0, len(data) - start - 1000))})
        self.wfile.write(data[start:])  # the whole range: 1000 bytes more than it said
        self.close_connection = True


class HtmlTimestamp(RepoHandler):
    """A captive portal or a CDN error page, with status 200, where timestamp.json should be."""

    def do_GET(self, head=False):
        if not _is_timestamp(self):
            return RepoHandler.do_GET(self, head)
        body = b"<!DOCTYPE html><html><body>Please log in to the hotel wifi</body></html>"
        _headers(self, 200, {"Content-Type": "text/html", "Content-Length": str(len(body))})
        self.wfile.write(body)


_BOMB = gzip.compress(bytes(64 << 20), compresslevel=9)  # ~64 KiB that expands to 64 MiB


def _gzip_bomb(which):
    class GzipBomb(RepoHandler):
        """Content-Encoding: gzip although the device asked for identity; the body expands 1000x."""

        def do_GET(self, head=False):
            if not which(self):
                return RepoHandler.do_GET(self, head)
            _headers(self, 200, {"Content-Encoding": "gzip", "Content-Length": str(len(_BOMB))})
            self.wfile.write(_BOMB)

    return GzipBomb


def _redirect(location):
    """Redirects every request (or those ``location(handler)`` answers for) elsewhere."""

    class Redirect(RepoHandler):
        def do_GET(self, head=False):
            where = location(self)
            if where is None:
                return RepoHandler.do_GET(self, head)
            _headers(self, 302, {"Location": where, "Content-Length": "0"})

    return Redirect


def _loop(h):
    """timestamp.json -> timestamp.json?bounce -> timestamp.json -> ..."""
    if not _is_timestamp(h):
        return None
    return h.path.split("?", 1)[0] + ("" if "?" in h.path else "?bounce")


def _endless(h):
    """A new URL every hop: /x?1 -> /x?2 -> ..."""
    if not _is_timestamp(h):
        return None
    base, _, n = h.path.partition("?")
    return f"{base}?{int(n or 0) + 1}"


def _elsewhere(h):
    return "file:///etc/passwd" if _is_image(h) else None


# story id -> (server, error class, what the message must say besides the URL)
FAILING = {
    "image truncated": (Truncate, TransportError, "ended after|connection"),
    "image connection reset": (Reset, TransportError, "reset"),
    "image stalls": (Stall, TransportError, "no data arrived for 1 s"),
    "metadata stalls": (StallMetadata, TransportError, "no data arrived for 1 s|deadline"),
    "image drips": (Drip, TransportError, "fewer than 1024 bytes/s"),
    "image 503": (_status(503, _is_image), TransportError, "HTTP 503"),
    "metadata 500": (_status(500, _is_timestamp), TransportError, "HTTP 500"),
    "image 429": (_status(429, _is_image), TransportError, "HTTP 429"),
    "image 404": (_status(404, _is_image), TransportError, "HTTP 404"),
    "wrong Content-Range": (WrongContentRange, TransportError, "answered range 'bytes 1-"),
    "Content-Length lie": (ContentLengthLie, TransportError, "ended after"),
    "HTML as timestamp.json": (HtmlTimestamp, RepositoryError, r"timestamp\.json from .*<!DOCTYPE html>"),
    "gzip bomb as metadata": (_gzip_bomb(_is_timestamp), TransportError, "Content-Encoding: gzip"),
    "gzip bomb as image": (_gzip_bomb(_is_image), TransportError, "Content-Encoding: gzip"),
    "redirect loop": (_redirect(_loop), TransportError, "redirect loop"),
    "endless redirects": (_redirect(_endless), TransportError, "more than 5 redirects"),
    "redirect to file://": (_redirect(_elsewhere), TransportError, "'file:///etc/passwd', which is not an http"),
}


def _bounded(sim) -> Device:
    """The device with the test's small network bounds (what [network] would configure)."""
    return Device(sim.config, fetcher=HttpFetcher(timeout=TIMEOUT, deadline=3.0, low_speed_limit=FLOOR[0],
                                                  low_speed_time=FLOOR[1]))


def _installs(world, sim, dev) -> None:
    world.handler = RepoHandler
    result = dev.install()
    rel = release_of(world, "2.0.0")
    assert (result.version, result.slot) == ("2.0.0", "b")
    assert hashlib.sha256(sim.slot_path("b").read_bytes()[: rel.image.size]).hexdigest() == rel.image.sha256
    assert sim.boot().slot == "b"


@pytest.mark.parametrize("story", list(FAILING))
def test_misbehaving_server_fails_cleanly_then_a_good_one_installs(world, story):
    handler, error, says = FAILING[story]
    world.publish("1.0.0")
    sim, _ = world.device(retries=1)
    world.publish("2.0.0")
    dev = _bounded(sim)
    world.handler = handler
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(error) as e:
            dev.install()
        elapsed = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < BOUND
    assert peak < 32 << 20  # a 64 MiB bomb never expanded; the images here are 1 MiB
    message = e.value.message
    assert world.url + "/" in message, message
    assert e.value.diagnostics().count("\n") <= 1  # one message, one hint; no traceback
    assert re.search(says, message), message
    if "404" in story:
        assert "check the network" not in e.value.hint and "no such file" in e.value.hint
    assert_untouched(sim, dev)
    _installs(world, sim, dev)


def test_redirect_to_a_good_mirror_installs(world):
    """An S3/CDN-style origin that answers every request with a 302 to a mirror: metadata,
    channel, manifest, boot files and the image's ranges all follow it (Range kept)."""
    world.publish("1.0.0")
    sim, _ = world.device(retries=0)
    world.publish("2.0.0")
    ranges = []

    class Mirror(RepoHandler):
        def do_GET(self, head=False):
            ranges.append((self.path, self.headers.get("Range")))
            return RepoHandler.do_GET(self, head)

    with Server(world.repo, handler=Mirror) as mirror:
        world.handler = _redirect(lambda h: mirror.url + h.path)
        dev = _bounded(sim)
        result = dev.install()
        assert result.version == "2.0.0" and sim.boot().slot == "b"
    assert any(p.endswith("timestamp.json") for p, _ in ranges)
    assert any(p.endswith(".zst") and r and r.startswith("bytes=0-") for p, r in ranges)


def test_range_ignored_after_a_reset_still_installs(world):
    """The first image request is cut; the retry's Range is ignored (200, the whole object):
    the device drops what it already has and goes on."""
    world.publish("1.0.0")
    sim, _ = world.device(retries=2)
    world.publish("2.0.0")
    rel = release_of(world, "2.0.0")
    cut = []

    class ResetThenIgnoreRange(RepoHandler):
        honour_range = True

        def send_bytes(self, data, start, end):
            if _is_image(self) and not cut:
                cut.append(1)
                ResetThenIgnoreRange.honour_range = False
                return Reset.send_bytes(self, data, start, end)
            return RepoHandler.send_bytes(self, data, start, end)

    world.handler = ResetThenIgnoreRange
    result = _bounded(sim).install()
    assert cut and result.version == "2.0.0"
    assert hashlib.sha256(sim.slot_path("b").read_bytes()[: rel.image.size]).hexdigest() == rel.image.sha256


def test_connection_refused_is_named_as_such(world):
    """A mirror that is down is not 'too slow': the error says the connection was refused."""
    world.publish("1.0.0")
    sim, dev = world.device(retries=0)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    text = sim.config_path.read_text().replace(world.url, f"http://127.0.0.1:{port}")
    sim.config_path.write_text(text)
    dev = _bounded(sim)
    with pytest.raises(TransportError) as e:
        dev.check()
    assert f"http://127.0.0.1:{port}/" in e.value.message
    assert "connection refused" in e.value.message.lower()
    assert "too slow" not in e.value.message
