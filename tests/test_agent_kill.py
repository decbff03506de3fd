"""Resume across kills (issue 5): ``abflip download`` runs as a real process against a slowed
server and is SIGKILLed at several points; the re-run fetches at most one chunk again and the
slot ends up with the right image. Meanwhile the device keeps booting slot a."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import assert_untouched
from test_agent_lifecycle import agent

from abflip.httpserver import RepoHandler
from metadata.manifest import Release

REPO = Path(__file__).resolve().parents[1]


class _Slow(RepoHandler):
    """Sends the image in small pieces with pauses, counts what it sent; holds boot files back."""

    sent = 0
    hold_boot_files = threading.Event()

    def send_bytes(self, data, start, end):
        view = memoryview(data)[start:end]
        if self.path.endswith(".zst"):
            for i in range(0, len(view), 8192):
                self.wfile.write(view[i:i + 8192])
                self.wfile.flush()
                _Slow.sent += len(view[i:i + 8192])
                time.sleep(0.01)
            return
        if self.path.endswith(("vmlinuz", "initrd.img")):
            _Slow.hold_boot_files.wait(30)
        RepoHandler.send_bytes(self, data, start, end)


def _events(proc):
    for line in proc.stdout:
        line = line.strip()
        if line:
            yield json.loads(line)


@pytest.mark.parametrize("point", ["after-chunk-1", "mid-chunk", "after-last-chunk"])
def test_sigkilled_download_resumes_within_one_chunk(world, point):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    rel = Release.from_bytes((world.built["2.0.0"] / "release.json").read_bytes())
    chunks = rel.image.chunks
    assert len(chunks) >= 3
    _Slow.sent = 0
    _Slow.hold_boot_files.clear()
    world.handler = _Slow
    proc = subprocess.Popen([sys.executable, "-m", "abflip.cli", "download", "--config", str(sim.config_path), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    watchdog = threading.Timer(90, proc.kill)
    watchdog.start()
    try:
        for ev in _events(proc):
            assert ev["event"] == "progress", ev
            if point == "after-chunk-1" and ev.get("chunk") == 1:
                break
            if point == "mid-chunk" and ev.get("chunk") == 1:
                while _Slow.sent < chunks[1].offset + chunks[1].length // 2:
                    time.sleep(0.002)
                break
            if point == "after-last-chunk" and ev.get("phase") == "boot-files":
                time.sleep(0.2)  # it is now waiting for the (held) kernel
                break
        else:
            pytest.fail(f"download ended before it could be killed: {proc.wait()} {proc.stderr.read()}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
        _Slow.hold_boot_files.set()
    assert proc.returncode == -signal.SIGKILL
    sent_before = _Slow.sent
    assert_untouched(sim, dev)  # killed anywhere: the device still boots what it booted
    st = dev.status()
    assert st["state"] == "downloading"
    done = st["target"]["chunks_done"]
    assert done == {"after-chunk-1": 1, "mid-chunk": 1, "after-last-chunk": len(chunks)}[point] or \
        (point == "after-chunk-1" and done == 2)  # the kill may land just after the next chunk

    # the re-run (a process again) completes the download
    r = subprocess.run([sys.executable, "-m", "abflip.cli", "download", "--config", str(sim.config_path), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    result = lines[-1]
    assert result["event"] == "result" and result["result"]["resumed_at_chunk"] == done
    # everything the server sent of the image over both runs, minus the image once: what was
    # fetched twice. At most the chunk the kill interrupted (metadata is not counted here).
    fetched_twice = _Slow.sent - rel.image.compressed_size
    assert 0 <= fetched_twice <= max(c.length for c in chunks)
    if point == "after-last-chunk":
        assert _Slow.sent == sent_before  # nothing of the image again
    assert dev.status()["state"] == "staged"
    assert hashlib.sha256(sim.slot_path("b").read_bytes()[: rel.image.size]).hexdigest() == rel.image.sha256
    dev.apply(now=True)
    assert sim.boot().slot == "b"
