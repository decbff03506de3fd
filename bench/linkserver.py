#!/usr/bin/env python3
"""``abflip serve`` behind a link of limited throughput, for ``bench/apply.py`` and ``bench/delta.py``.

    python3 bench/linkserver.py ROOT [--port PORT] [--link-mbps MBPS]

Serves ``ROOT`` with :class:`abflip.httpserver.RepoHandler` (same headers, Range and path
rules as ``abflip serve``) and prints ``serving URL`` once listening. With ``--link-mbps``
every response body leaves through one token bucket shared by all connections of the
process: ``MBPS * 10**6 / 8`` bytes per second, bursts of at most :data:`BURST` bytes, sent in
pieces of :data:`PIECE` bytes. So both variants of the benchmark (curl, abflip) see the same
link, and a client that stops reading (to decompress, say) does not earn a faster catch-up
later than the burst allows. Without ``--link-mbps`` (or 0) nothing is limited.

The benchmarks start it with :class:`ServerProcess`: a separate process, so the server's CPU and
memory do not land on the device's side.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from abflip.httpserver import RepoHandler, serve  # noqa: E402
from applier.fetch import RateLimiter  # noqa: E402

PIECE = 64 << 10
BURST = 256 << 10
LINKSERVER = [sys.executable, str(Path(__file__).resolve())]


class LinkHandler(RepoHandler):
    """``RepoHandler`` whose bodies leave through one :class:`applier.fetch.RateLimiter` (the
    device's own token bucket) shared by every connection, one piece at a time."""

    limiter: RateLimiter | None = None
    lock = threading.Lock()

    def send_bytes(self, data, start: int, end: int) -> None:  # type: ignore[no-untyped-def]
        if self.limiter is None:
            super().send_bytes(data, start, end)
            return
        view = memoryview(data)[start:end]
        for i in range(0, len(view), PIECE):
            piece = view[i:i + PIECE]
            with self.lock:  # one link: the connections take turns at the bucket
                self.limiter.consume(len(piece))
            self.wfile.write(piece)


class ServerProcess:
    """``bench/linkserver.py`` (``abflip serve``'s handler, optionally behind a token bucket of
    ``link_mbps`` 10**6 bit/s) in its own process on a free loopback port."""

    def __init__(self, root: Path, link_mbps: float = 0.0) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*LINKSERVER, str(root), "--port", str(self.port), "--link-mbps", str(link_mbps)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "serving" not in line:
            self.close()
            raise RuntimeError(f"the server did not start: {line!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--link-mbps", type=float, default=0.0, help="link throughput, 10**6 bit/s (0: unlimited)")
    args = ap.parse_args(argv)
    if args.link_mbps > 0:
        LinkHandler.limiter = RateLimiter(int(args.link_mbps * 1e6 / 8), burst=BURST)
    link = f"{args.link_mbps:g} Mbit/s" if args.link_mbps > 0 else "unlimited"
    serve(args.root, port=args.port, handler=LinkHandler,
          ready=lambda url: print(f"serving {url} (link {link})", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
