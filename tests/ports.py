"""Free ports on 127.0.0.1, and waiting for a server the tests started to listen."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

__all__ = ["free_port", "free_ports", "wait_listening"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (each held until all are chosen, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_listening(port: int, proc: subprocess.Popen | None, what: str, *, timeout: float = 60,
                   details: Callable[[], str] = lambda: "") -> None:
    """Until something accepts on ``port``; RuntimeError naming ``what`` (and ``details()``) if
    ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if proc is None or proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start listening on 127.0.0.1:{port}: {details()}") from None
            time.sleep(0.05)
