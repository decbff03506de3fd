"""`abflip serve` as a client on the network would probe it (issue 9 item 17, issue 11 item 6):
paths out of the served directory, dotfiles, idle and excess connections; and as a user meets it
on the command line: a busy port, a directory that is not there. Real HTTP on 127.0.0.1; the CLI
as a subprocess where the item is about the CLI."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from abflip.demo import HARDWARE, PRODUCT
from abflip.httpserver import Server
from abflip.sim import SimDevice
from applier.agent import Device

REPO = Path(__file__).resolve().parents[1]


def raw_get(url: str, path: str) -> tuple[int | None, bytes]:
    """(status, body) of ``GET <path>`` sent byte for byte (no client-side normalisation);
    status None when the server closed the connection without an answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if not data:
        return None, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture
def served(tmp_path):
    """A served directory with a file, a dotfile, links in and out, and a secret beside it."""
    root = tmp_path / "repo"
    (root / "metadata").mkdir(parents=True)
    (root / "metadata" / "timestamp.json").write_text("{}")
    (root / ".lock").write_text("")
    (root / ".tmp-123").write_text("half-written")
    (root / "metadata" / ".hidden.json").write_text("{}")
    (tmp_path / "secret").write_text("SECRET")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("SECRET")
    (root / "leak").symlink_to(tmp_path / "secret")
    (root / "metadata" / "up").symlink_to("../..")
    (root / "outlink").symlink_to(tmp_path / "outside")
    (root / "inlink.json").symlink_to("metadata/timestamp.json")
    (root / "etc-passwd").symlink_to("/etc/passwd")
    return root


# -- paths --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [
    "/leak", "/outlink/secret", "/metadata/up/secret", "/etc-passwd",  # symlinks out of the root
    "/../secret", "/metadata/../../secret", "/%2e%2e/secret", "/%2E%2E%2Fsecret", "/metadata/%2e%2e/%2e%2e/secret",
    "/..%2f..%2fsecret", "//etc/passwd", "/%2Fetc%2Fpasswd", "http://x/../secret",
    "/metadata%00/timestamp.json", "/metadata/timestamp.json%00.png", "/%ff%fe",
])
def test_nothing_outside_the_served_directory_is_served(served, path):
    with Server(served) as srv:
        status, body = raw_get(srv.url, path)
        assert status == 404, (status, body)
        assert b"SECRET" not in body and b"root:" not in body
        assert raw_get(srv.url, "/metadata/timestamp.json") == (200, b"{}")  # and it still serves


def test_links_inside_the_directory_are_followed(served):
    with Server(served) as srv:
        assert raw_get(srv.url, "/inlink.json") == (200, b"{}")
        # what counts is where the bytes are: out through a link and back in is still inside
        assert raw_get(srv.url, "/metadata/up/repo/metadata/timestamp.json") == (200, b"{}")
        assert raw_get(srv.url, "/metadata/up/secret")[0] == 404


@pytest.mark.parametrize("path", ["/.lock", "/.tmp-123", "/metadata/.hidden.json", "/%2elock",
                                  "/./metadata/timestamp.json"])
def test_dotfiles_are_never_served(served, path):
    with Server(served) as srv:
        assert raw_get(srv.url, path)[0] == 404


# -- what a cache in front needs (issue 24) --------------------------------------------------------
def test_cache_headers_are_what_a_cdn_needs(served):
    """timestamp.json and 404s (the N+1.root.json probe) kept MAX_AGE seconds and never served stale;
    the rest immutable; a validator to revalidate with, answered 304 while the file is the same and
    200 once it was replaced."""
    import urllib.error
    import urllib.request

    from builder.publish import IMMUTABLE, MAX_AGE

    (served / "targets").mkdir()
    (served / "targets" / "ab12.rootfs.img.zst").write_bytes(b"z" * 100)
    with Server(served) as srv:
        def get(path: str, **headers: str):
            try:
                with urllib.request.urlopen(urllib.request.Request(srv.url + path, headers=headers)) as r:
                    return r.status, r.headers, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.headers, b""

        status, h, body = get("/metadata/timestamp.json")
        assert status == 200 and body == b"{}"
        assert h["Cache-Control"] == f"public, max-age={MAX_AGE}, must-revalidate"
        assert h["ETag"] and h["Last-Modified"]
        status, h404, _ = get("/metadata/2.root.json")
        assert status == 404 and h404["Cache-Control"] == f"public, max-age={MAX_AGE}, must-revalidate"
        status, hz, _ = get("/targets/ab12.rootfs.img.zst")
        assert (hz["Cache-Control"], hz["Content-Type"], hz["Content-Encoding"]) == (IMMUTABLE, "application/zstd", None)
        assert get("/metadata/timestamp.json", **{"If-None-Match": h["ETag"]})[0] == 304
        assert get("/metadata/timestamp.json", **{"If-None-Match": f'"other", W/{h["ETag"]}'})[0] == 304
        assert get("/metadata/timestamp.json", **{"If-None-Match": '"other"'})[0] == 200
        time.sleep(0.01)
        (served / "metadata" / "new").write_text('{"v": 2}')
        (served / "metadata" / "new").replace(served / "metadata" / "timestamp.json")
        status, h2, body = get("/metadata/timestamp.json", **{"If-None-Match": h["ETag"]})
        assert (status, body) == (200, b'{"v": 2}') and h2["ETag"] != h["ETag"]


# -- connections --------------------------------------------------------------------------------
def test_connections_beyond_the_bound_get_503_and_the_server_recovers(served):
    with Server(served, max_connections=2, timeout=30) as srv:
        host, port = srv.httpd.server_address[:2]
        idle = [socket.create_connection((host, port), timeout=30) for _ in range(2)]  # say nothing, hold a slot
        try:
            status, _ = raw_get(srv.url, "/metadata/timestamp.json")
            assert status == 503
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 30
        while raw_get(srv.url, "/metadata/timestamp.json")[0] != 200:
            assert time.monotonic() < deadline, "slots were not freed"
            time.sleep(0.1)


@pytest.mark.parametrize("sent", [b"", b"GET /metadata/timestamp.json HTTP/1.1\r\nHost: x\r\n"],
                         ids=["silent", "half-a-request"])
def test_an_idle_client_is_dropped_at_the_timeout_and_frees_its_slot(served, sent):
    with Server(served, max_connections=1, timeout=1) as srv:
        host, port = srv.httpd.server_address[:2]
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(sent)
            try:
                assert s.recv(65536) == b""  # closed by the server, long before our 30 s
            except TimeoutError:
                pytest.fail("the server kept an idle connection open")
        assert raw_get(srv.url, "/metadata/timestamp.json") == (200, b"{}")


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("started", [True, False], ids=["after-the-thread-ran", "before"])
def test_a_signal_while_a_connection_is_handed_to_its_thread_stops_the_server(served, monkeypatch, started):
    """`abflip serve` stops on SIGTERM by an exception in its main thread, which may arrive while a
    connection is being handed to its thread. The slot is given back once, by the thread if it
    started, else there, and the signal's exception leaves (it was replaced by 'Semaphore released
    too many times' and the server kept running: a test run's test_cli_logs_each_request_in_common_log_format)."""
    import threading

    import abflip.httpserver as httpserver

    class Interrupted(threading.Thread):
        def start(self):
            if started:  # the signal arrives once the thread has served its (closed) connection
                super().start()
                self.join(10)
            raise KeyboardInterrupt

    with Server(served, max_connections=2, timeout=30) as srv:
        a, b = socket.socketpair()
        b.close()  # the client is gone: the connection's thread ends at once
        try:
            monkeypatch.setattr(httpserver.threading, "Thread", Interrupted)
            with pytest.raises(KeyboardInterrupt):
                srv.httpd.process_request(a, ("127.0.0.1", 1))
            monkeypatch.undo()
        finally:
            a.close()
        assert srv.httpd.slots._value == 2  # noqa: SLF001 (the semaphore's count: the slot is back)
        with pytest.raises(ValueError):
            srv.httpd.slots.release()  # ... exactly once: one more is too many
        assert raw_get(srv.url, "/metadata/timestamp.json") == (200, b"{}")


# -- the command line ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def abflip(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "abflip.cli", *args], capture_output=True, text=True, cwd=REPO,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"abflip {' '.join(args)} did not end (it served instead of refusing?)")


class Serving:
    """`abflip serve DIR --port N` in the background, until the test ends."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "abflip.cli", "serve", str(directory),
                                      "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        line = self.proc.stdout.readline()  # printed once it listens
        assert line.startswith(f"serving {directory.resolve()} at http://127.0.0.1:{self.port}"), (
            line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        return err


def test_cli_serves_a_repository_to_a_device_but_never_its_lock_file(world, tmp_path):
    world.publish("1.0.0")
    world.publish("2.0.0")
    (world.repo / ".lock").write_text("")  # LocalStorage's lock for conditional writes
    (world.repo / "metadata" / "evil").symlink_to(tmp_path / "keys")  # the keys are beside the repo
    srv = Serving(world.repo)
    try:
        assert raw_get(srv.url, "/.lock")[0] == 404
        assert raw_get(srv.url, "/metadata/evil/root.pem")[0] == 404
        assert raw_get(srv.url, "/metadata/evil")[0] == 404
        sim = SimDevice.create(tmp_path / "dev", repository_url=srv.url,
                               trusted_root=(world.repo / "metadata" / "1.root.json").read_bytes(), product=PRODUCT,
                               hardware_id=HARDWARE, slot_size=8 << 20, retries=1, timeout=5.0)
        sim.provision(world.built["1.0.0.img"], slot="a", version="1.0.0", product=PRODUCT)
        dev = Device(sim.config)
        dev.mark_good()
        assert dev.download().version == "2.0.0"  # metadata, manifest, boot files and ranges of the image
    finally:
        err = srv.close()
    assert "Traceback" not in err


def test_cli_port_in_use_is_a_user_error(tmp_path):
    (tmp_path / "repo").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = abflip("serve", str(tmp_path / "repo"), "--port", str(port))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error (user): cannot listen on 127.0.0.1:{port}: address already in use\n  hint: ")
    assert "--port" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_cli_refuses_a_directory_that_is_not_one_before_listening(tmp_path, kind):
    target = tmp_path / "repo"
    if kind == "a file":
        target.write_text("")
    port = free_port()
    r = abflip("serve", str(target), "--port", str(port), timeout=30)
    assert r.returncode == 2, r.stderr
    reason = "no such directory" if kind == "missing" else "not a directory"
    assert r.stderr.startswith(f"error (user): {target}: {reason}\n  hint: ") and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_cli_bad_limits_are_user_errors(tmp_path):
    (tmp_path / "repo").mkdir()
    r = abflip("serve", str(tmp_path / "repo"), "--port", str(free_port()), "--max-connections", "0", timeout=30)
    assert r.returncode == 2 and "error (user): --max-connections must be at least 1" in r.stderr


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_cli_a_port_out_of_range_is_a_user_error(tmp_path, port):
    (tmp_path / "repo").mkdir()
    r = abflip("serve", str(tmp_path / "repo"), "--port", port, timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error (user): --port {port} is not a TCP port (0 to 65535; 0: any free port)\n"
                               "  hint: ") and "Traceback" not in r.stderr


def test_cli_logs_each_request_in_common_log_format(tmp_path):
    """What `abflip serve` prints on stderr per request, once the response is out: client, time,
    request line, status and the bytes sent (a range's, none for a 404 or a HEAD); --quiet: none."""
    import re
    import urllib.error
    import urllib.request

    repo = tmp_path / "repo"
    (repo / "metadata").mkdir(parents=True)
    (repo / "metadata" / "timestamp.json").write_bytes(b"x" * 1000)
    srv = Serving(repo)
    try:
        with urllib.request.urlopen(f"{srv.url}/metadata/timestamp.json") as r:
            assert len(r.read()) == 1000
        req = urllib.request.Request(f"{srv.url}/metadata/timestamp.json", headers={"Range": "bytes=100-199"})
        with urllib.request.urlopen(req) as r:
            assert r.status == 206 and len(r.read()) == 100
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{srv.url}/metadata/nope.json")
        with urllib.request.urlopen(urllib.request.Request(f"{srv.url}/metadata/timestamp.json", method="HEAD")):
            pass
        assert raw_get(srv.url, "/.lock")[0] == 404
    finally:
        err = srv.close()
    lines = err.splitlines()
    clf = re.compile(r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "(?P<req>[^"]*)" '
                     r'(?P<status>\d{3}) (?P<size>\d+|-)$')
    got = [(m["req"], m["status"], m["size"]) for m in map(clf.match, lines) if m]
    assert len(got) == len(lines), lines
    assert got == [("GET /metadata/timestamp.json HTTP/1.1", "200", "1000"),
                   ("GET /metadata/timestamp.json HTTP/1.1", "206", "100"),
                   ("GET /metadata/nope.json HTTP/1.1", "404", "-"),
                   ("HEAD /metadata/timestamp.json HTTP/1.1", "200", "-"),
                   ("GET /.lock HTTP/1.1", "404", "-")], got
    quiet = Serving(repo, "--quiet")
    try:
        with urllib.request.urlopen(f"{quiet.url}/metadata/timestamp.json") as r:
            r.read()
    finally:
        assert quiet.close() == ""
