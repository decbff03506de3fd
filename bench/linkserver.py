#!/usr/bin/env python3
"""``abflip serve`` behind a link of limited throughput, for ``bench/apply.py``.

    python3 bench/linkserver.py ROOT [--port PORT] [--link-mbps MBPS]

Serves ``ROOT`` with :class:`abflip.httpserver.RepoHandler` (same headers, Range and path
rules as ``abflip serve``) and prints ``serving URL`` once listening. With ``--link-mbps``
every response body leaves through one token bucket shared by all connections of the
process: ``MBPS * 10**6 / 8`` bytes per second, bursts of at most :data:`BURST` bytes, sent in
pieces of :data:`PIECE` bytes. So both variants of the benchmark (curl, abflip) see the same
link, and a client that stops reading (to decompress, say) does not earn a faster catch-up
later than the burst allows. Without ``--link-mbps`` (or 0) nothing is limited.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from abflip.httpserver import RepoHandler, Server  # noqa: E402

PIECE = 64 << 10
BURST = 256 << 10


class TokenBucket:
    """``rate`` bytes per second on average, at most ``burst`` bytes ahead of it."""

    def __init__(self, rate: float, burst: int = BURST) -> None:
        self.rate = rate
        self.burst = burst
        self.lock = threading.Lock()
        self.clear = time.monotonic()  # when everything handed out so far has drained

    def take(self, n: int) -> None:
        """Block until ``n`` more bytes may go."""
        with self.lock:
            now = time.monotonic()
            self.clear = max(self.clear, now - self.burst / self.rate) + n / self.rate
            wait = self.clear - self.burst / self.rate - now
        if wait > 0:
            time.sleep(wait)


class LinkHandler(RepoHandler):
    bucket: TokenBucket | None = None

    def send_bytes(self, data, start: int, end: int) -> None:  # type: ignore[no-untyped-def]
        if self.bucket is None:
            super().send_bytes(data, start, end)
            return
        view = memoryview(data)[start:end]
        for i in range(0, len(view), PIECE):
            piece = view[i:i + PIECE]
            self.bucket.take(len(piece))
            self.wfile.write(piece)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--link-mbps", type=float, default=0.0, help="link throughput, 10**6 bit/s (0: unlimited)")
    args = ap.parse_args(argv)
    if args.link_mbps > 0:
        LinkHandler.bucket = TokenBucket(args.link_mbps * 1e6 / 8)
    srv = Server(args.root, handler=LinkHandler, port=args.port)
    link = f"{args.link_mbps:g} Mbit/s" if args.link_mbps > 0 else "unlimited"
    print(f"serving {srv.url} (link {link})", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
