"""A small static HTTP server for a repository directory, with Range and cache headers.

For the demo, the tests and local trials (``abflip serve DIR``). Production repositories
are served by S3, a CDN or any web server; this one exists so devices can fetch over real
HTTP on loopback. Headers follow DESIGN.md: ``timestamp.json`` no-store, everything else
immutable; 404s not cacheable; no Content-Encoding.
"""

from __future__ import annotations

import mmap
import os
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from builder.publish import headers_for

__all__ = ["RepoHandler", "serve", "Server"]

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RepoHandler(BaseHTTPRequestHandler):
    root: Path = Path(".")
    protocol_version = "HTTP/1.1"
    honour_range = True

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def resolve(self) -> Path | None:
        rel = self.path.split("?", 1)[0].lstrip("/")
        parts = [p for p in rel.split("/") if p]
        if any(p in (".", "..") for p in parts):
            return None
        p = self.root.joinpath(*parts)
        return p if p.is_file() else None

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
        path = self.resolve()
        if path is None:
            self.send_response(HTTPStatus.NOT_FOUND)
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", "0")
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
        ctype, cache = headers_for(path.name)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Cache-Control", cache)
        self.send_header("Accept-Ranges", "bytes" if self.honour_range else "none")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if not head:
            try:
                self.send_bytes(data, start, end)
            except (BrokenPipeError, ConnectionResetError):
                pass


class Server:
    """A running server on 127.0.0.1 (ephemeral port by default), in a thread."""

    def __init__(self, root: Path, handler: type[RepoHandler] = RepoHandler, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        cls = type("BoundHandler", (handler,), {"root": Path(root)})
        self.httpd = ThreadingHTTPServer((host, port), cls)
        self.httpd.daemon_threads = True
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


def serve(root: Path, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until interrupted (foreground)."""
    srv = Server(root, host=host, port=port)
    print(f"serving {os.path.abspath(root)} at {srv.url}", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.httpd.server_close()
