"""A small static HTTP server for a repository directory, with Range and cache headers.

For the demo, the tests and local trials (``abflip serve DIR``). Production repositories
are served by S3, a CDN or any web server; this one exists so devices can fetch over real
HTTP on loopback. Headers follow DESIGN.md, and are what a cache in front needs (docs/producer.md):
``timestamp.json`` and 404s kept :data:`~builder.publish.MAX_AGE` seconds at most, everything else
immutable; an ``ETag`` and ``Last-Modified`` to revalidate with (``If-None-Match`` gets a 304);
no Content-Encoding.

``abflip serve`` logs every request on stderr in the Common Log Format (client, time, request
line, status, body bytes; ``--quiet`` turns it off): the line is written once the response is
out, so its size is what was sent. The demo and the tests serve without a log.

What it keeps, whoever connects (also in ``abflip serve --help``):

- Only regular files under the served root: the decoded path may not hold ``.``/``..``
  segments, NUL bytes or any segment starting with ``.`` (the storage's ``.lock`` and
  ``.tmp-*`` files), and its real path (symlinks resolved) must lie inside the root's real
  path. Anything else is a plain 404.
- At most ``max_connections`` connections are served at once; a connection that finds no free
  slot within :data:`BUSY_WAIT` seconds is answered ``503`` (``Retry-After``) and closed.
  Every socket operation has a ``timeout``, so an idle or stalled client frees its slot.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from builder.publish import MAX_AGE, fresh_for, headers_for
from metadata.errors import UserError

__all__ = ["RepoHandler", "serve", "Server"]

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
MAX_CONNECTIONS = 64  # served at once
TIMEOUT = 60.0  # seconds any one socket read or write may take
BUSY_WAIT = 1.0  # seconds a connection waits for a free slot before it is answered 503


class RepoHandler(BaseHTTPRequestHandler):
    root: Path = Path(".")
    protocol_version = "HTTP/1.1"
    honour_range = True
    #: seconds a cache may keep timestamp.json and a 404 (a bench compressing time lowers it)
    max_age = MAX_AGE
    # Headers and body go out in separate writes: with Nagle's algorithm the body waits for
    # the client's delayed ACK of the headers, ~40 ms per request on a kept-alive connection
    # (six TUF metadata requests of an update: 0.2 s, issue 14). CDNs and S3 send at once too.
    disable_nagle_algorithm = True
    #: where each request's log line goes (``abflip serve``); None: no log
    access_log: Callable[[str], None] | None = None
    _status: int | str | None = None
    _sent = 0

    def log_message(self, format: str, *args: object) -> None:  # no stderr chatter of its own
        pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self._status = int(code) if isinstance(code, HTTPStatus) else code  # logged when the response is out

    def handle_one_request(self) -> None:
        self._status, self._sent = None, 0
        try:
            super().handle_one_request()
        finally:
            if self._status is not None and self.access_log is not None:
                self.access_log(clf_line(self.client_address[0], self.requestline, self._status, self._sent))

    def resolve(self) -> Path | None:
        """The regular file the request names, inside the root; None for anything else."""
        rel = unquote(self.path.split("?", 1)[0].split("#", 1)[0], errors="strict")
        parts = [p for p in rel.split("/") if p]
        if any(p.startswith(".") or "\0" in p for p in parts):  # ., .., dotfiles (.lock, .tmp-*)
            return None
        root = os.path.realpath(self.root)
        p = os.path.realpath(os.path.join(root, *parts))
        if os.path.commonpath([root, p]) != root or not os.path.isfile(p):
            return None
        return self.root.joinpath(*parts)

    def body(self, path: Path) -> bytes | mmap.mmap:
        """The object's bytes (mapped, so a large image costs no heap). Tests override this."""
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def send_bytes(self, data: bytes | mmap.mmap, start: int, end: int) -> None:
        view = memoryview(data)[start:end]
        for i in range(0, len(view), 1 << 20):
            self.wfile.write(view[i:i + (1 << 20)])

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def do_GET(self, head: bool = False) -> None:
        try:
            path = self.resolve()
        except (UnicodeDecodeError, ValueError):
            path = None
        if path is None:
            self.send_response(HTTPStatus.NOT_FOUND)
            self.send_header("Cache-Control", fresh_for(self.max_age))  # devices probe N+1.root.json each check
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        ctype, cache = headers_for(path.name, max_age=self.max_age)
        st = os.stat(path)
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'  # changes whenever the file is replaced
        if _matches(self.headers.get("If-None-Match"), etag):  # a cache revalidating what it holds
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.send_header("ETag", etag)
            self.send_header("Cache-Control", cache)
            self.end_headers()
            return
        data = self.body(path)
        size = len(data)
        start, end, status = 0, size, HTTPStatus.OK
        rng = self.headers.get("Range")
        if rng and self.honour_range and (m := _RANGE.match(rng.strip())):
            a, b = m.groups()
            if a:
                start = int(a)
                end = min(size, int(b) + 1) if b else size
            elif b:
                start, end = max(0, size - int(b)), size
            if start >= size or start >= end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Cache-Control", cache)
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
        self.send_header("Accept-Ranges", "bytes" if self.honour_range else "none")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if not head:
            try:
                self.send_bytes(data, start, end)
                self._sent = end - start
            except (BrokenPipeError, ConnectionResetError):
                pass


def clf_line(client: str, request: str, status: int | str, sent: int) -> str:
    """A Common Log Format line: ``127.0.0.1 - - [07/Dec/2025:01:46:00 +0000] "GET /x HTTP/1.1" 200 1234``."""
    when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
    request = request.encode("ascii", "backslashreplace").decode().replace('"', '\\"')  # a client's bytes
    return f'{client} - - [{when}] "{request}" {status} {sent or "-"}'


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 13.1.2: ``*`` or a list of tags, compared weakly."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


class _Httpd(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[RepoHandler], *, max_connections: int) -> None:
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        """A thread for the connection, which gives its slot back when it ends. Only when the thread
        never started is the slot given back here: a signal that interrupts this after the thread
        started (``serve``'s SIGTERM) must not give it back twice, which raised ValueError in place
        of the signal's exception and left the server running (seen in a test run)."""
        if not self.slots.acquire(timeout=BUSY_WAIT):
            self._busy(request)
            return
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                             daemon=self.daemon_threads)
        try:
            t.start()
        except BaseException:
            if t.ident is None:  # it never ran: its slot is ours to give back (the caller closes the socket)
                self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _busy(self, request: socket.socket) -> None:
        """503 without a thread: read what the client already sent (so closing does not reset
        the connection under the answer), answer, close."""
        try:
            request.setblocking(False)
            try:
                request.recv(65536)
            except (BlockingIOError, InterruptedError):
                pass
            request.send(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
                         b"Cache-Control: no-store\r\nConnection: close\r\n\r\n")
            log = self.RequestHandlerClass.access_log
            if log is not None:
                log(clf_line(request.getpeername()[0], "-", 503, 0))
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if isinstance(sys.exc_info()[1], OSError):  # a client that went away or stalled past the timeout
            return
        super().handle_error(request, client_address)


class Server:
    """A running server on 127.0.0.1 (ephemeral port by default), in a thread."""

    def __init__(self, root: Path, handler: type[RepoHandler] = RepoHandler, host: str = "127.0.0.1",
                 port: int = 0, *, max_connections: int = MAX_CONNECTIONS, timeout: float = TIMEOUT,
                 log: Callable[[str], None] | None = None) -> None:
        attrs: dict[str, object] = {"root": Path(root)}
        if handler.timeout is None:
            attrs["timeout"] = timeout
        if log is not None:
            attrs["access_log"] = staticmethod(log)
        cls = type("BoundHandler", (handler,), attrs)
        self.httpd = _Httpd((host, port), cls, max_connections=max_connections)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(root: Path, host: str = "127.0.0.1", port: int = 8080, *, max_connections: int = MAX_CONNECTIONS,
          timeout: float = TIMEOUT, ready: Callable[[str], None] | None = None,
          handler: type[RepoHandler] = RepoHandler, log: Callable[[str], None] | None = None) -> None:
    """Serve ``root`` until interrupted (foreground); ``ready(url)`` once listening; ``log(line)``
    for each request (Common Log Format).

    Raises :class:`UserError` for a root that is not a directory, bad limits, or an address it
    cannot listen on."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: " + ("not a directory" if root.exists() else "no such directory"),
                        hint="give the repository's directory (the one holding metadata/ and targets/)")
    if max_connections < 1 or not timeout > 0:
        raise UserError("--max-connections must be at least 1 and --timeout more than 0 seconds",
                        hint="e.g. --max-connections 64 --timeout 60")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port (0 to 65535; 0: any free port)", hint="e.g. --port 8080")
    try:
        srv = Server(root, handler, host=host, port=port, max_connections=max_connections, timeout=timeout, log=log)
    except (OverflowError, UnicodeError) as e:  # what socket.bind raises for what getaddrinfo cannot take
        raise UserError(f"cannot listen on {host}:{port}: {e}", hint="check --host and --port") from None
    except OSError as e:
        what = {errno.EADDRINUSE: "address already in use"}.get(e.errno, e.strerror or str(e))
        hint = {errno.EADDRINUSE: f"another process listens on port {port}; choose another with --port",
                errno.EACCES: "ports below 1024 need root; choose another with --port"}.get(
                    e.errno, "check --host and --port")
        raise UserError(f"cannot listen on {host}:{port}: {what.lower()}", hint=hint) from None
    try:
        if ready is not None:
            ready(srv.url)
        srv.httpd.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM (abflip.commands._output.catch_signals): how a server stops
        pass
    finally:
        srv.httpd.server_close()
