"""nginx as the CDN stand-in: Debian's nginx, run as this user's own process on 127.0.0.1 (never the
system service), with ``ci/nginx-cdn.conf`` (what docs/producer.md recommends) as its only site.

:class:`Nginx` writes a main configuration into a temporary directory (pid, logs, temp paths,
cache there; the access log records every request and subrequest with its cache status and
whether it went to the origin), starts ``nginx -g 'daemon off;'`` and kills it at the end.
:class:`Cutter` is a TCP relay in front of it that drops a connection once it has passed a given
number of response bytes: a device's link failing mid-download.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ports import free_port, wait_listening

SITE = Path(__file__).resolve().parents[1] / "ci" / "nginx-cdn.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

MAIN = """\
daemon off;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
    log_format abflip '$msec $status $body_bytes_sent $upstream_cache_status $upstream_addr $upstream_status '
                      '$upstream_bytes_received "$request_method $uri" $http_range';
    access_log {dir}/access.log abflip;
    log_subrequest on;
    default_type application/octet-stream;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    include {dir}/abflip.conf;
}}
"""


@dataclass(frozen=True)
class Logged:
    """One line of the access log: a request (or a slice subrequest) and what the cache did."""

    time: float
    status: int
    sent: int
    cache: str  # HIT, MISS, EXPIRED, REVALIDATED, ... or "-" (not cacheable / no cache lookup)
    upstream: str  # the origin's address, "-" when the origin was not asked
    upstream_status: str
    received: int  # bytes received from the origin
    uri: str
    range: str

    @property
    def origin(self) -> bool:
        return self.upstream != "-"


def parse_log(text: str) -> list[Logged]:
    out = []
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) < 10:
            continue
        received = sum(int(x) for x in parts[6].replace(":", ",").split(",") if x.strip().isdigit())
        out.append(Logged(float(parts[0]), int(parts[1]), int(parts[2]), parts[3], parts[4], parts[5], received,
                          parts[8].rstrip('"'), " ".join(parts[9:])))
    return out


class Nginx:
    """``ci/nginx-cdn.conf`` in front of ``origin`` (``http://host:port[/bucket/prefix]``)."""

    def __init__(self, workdir: Path, origin: str, *, workers: int = 1) -> None:
        if NGINX is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx; .ci/run does)")
        self.dir = Path(workdir)
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        (self.dir / "cache").mkdir(exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        site = SITE.read_text()
        for k, v in (("@ORIGIN@", origin.rstrip("/")), ("@CACHE@", str(self.dir / "cache")),
                     ("@LISTEN@", f"127.0.0.1:{self.port}")):
            site = site.replace(k, v)
        (self.dir / "abflip.conf").write_text(site)
        # nginx started as root runs its workers as "nobody", who could not write this directory
        user = "user root root;" if os.geteuid() == 0 else ""
        (self.dir / "nginx.conf").write_text(MAIN.format(dir=self.dir, workers=workers, user=user))
        self.log = self.dir / "access.log"
        self.proc = subprocess.Popen([NGINX, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                                      "-e", str(self.dir / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            wait_listening(self.port, self.proc, "nginx", timeout=30, details=self.errors)
        except RuntimeError:
            self.stop()
            raise


    def entries(self, settle: float = 0.3) -> list[Logged]:
        """The access log so far (nginx logs a request just after its last byte went out: ``settle``)."""
        time.sleep(settle)
        try:
            return parse_log(self.log.read_text())
        except FileNotFoundError:
            return []

    def errors(self) -> str:
        try:
            return (self.dir / "error.log").read_text()[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Cutter:
    """A TCP relay to ``target`` that cuts the first connection asking for a path containing
    ``cut_path`` once it has passed ``after`` bytes of the answer (the device's link dropping)."""

    def __init__(self, target_port: int, *, cut_path: str, after: int) -> None:
        self.target_port, self.cut_path, self.after = target_port, cut_path.encode(), after
        self.cuts = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        watch = [False]

        def up() -> None:  # requests, watched for the path
            try:
                while data := client.recv(65536):
                    if self.cut_path in data and self.cuts == 0:
                        watch[0] = True
                    upstream.sendall(data)
            except OSError:
                pass
            finally:
                _close(upstream)

        threading.Thread(target=up, daemon=True).start()
        passed = 0
        try:
            while data := upstream.recv(65536):
                if watch[0] and self.cuts == 0 and passed + len(data) > self.after:
                    client.sendall(data[:self.after - passed])
                    self.cuts += 1
                    client.shutdown(socket.SHUT_RD)  # wakes the request relay, which holds the socket too
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    break  # an abortive close: the device sees a reset mid-body
                passed += len(data) if watch[0] else 0
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)

    def close(self) -> None:
        self._stop = True
        _close(self.sock)


def _close(s: socket.socket) -> None:
    try:
        s.close()
    except OSError:
        pass
