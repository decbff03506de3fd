"""The TUF client's local cache failing under a real ``abflip check`` (issue 10 item 4): a
full disk while python-tuf persists metadata (injected with strace), and a file where the
cache directory belongs. Each is a device error naming the cache and the errno text,
exit code 5, never a traceback; once the disk is fine again, the same command works."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_agent_lifecycle import agent

REPO = Path(__file__).resolve().parents[1]


def _check(sim, *prefix: str) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "abflip.cli", "check", "--config", str(sim.config_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def _device_error(r: subprocess.CompletedProcess, *says: str) -> None:
    assert r.returncode == 5, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error (")]
    assert err and err[0].startswith("error (device): "), r.stderr
    for s in says:
        assert s in r.stderr, r.stderr


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt-get install strace)")
def test_full_disk_while_caching_metadata_is_a_device_error(world):
    world.publish("1.0.0")
    sim, _ = agent(world)
    world.publish("2.0.0")
    state = sim.config.state_dir
    tuf = state / "tuf"
    # a dry run under strace finds which rename persists timestamp.json; the state is then put
    # back, and the real run gets ENOSPC at exactly that rename (python-tuf's os.replace)
    saved = world.tmp / "state-before"
    shutil.copytree(state, saved, symlinks=True)
    log = world.tmp / "renames.txt"
    renames = ["-e", "trace=rename,renameat,renameat2"]
    assert _check(sim, "strace", "-f", "-qq", "-o", str(log), *renames).returncode == 0
    calls = [line for line in log.read_text().splitlines() if "rename" in line and "= 0" in line]
    nth = next(i for i, line in enumerate(calls, 1) if f'"{tuf}/timestamp.json"' in line)
    shutil.rmtree(state)
    shutil.copytree(saved, state, symlinks=True)
    r = _check(sim, "strace", "-f", "-qq", "-o", "/dev/null", *renames,
               "-e", f"inject=rename,renameat,renameat2:error=ENOSPC:when={nth}")
    _device_error(r, f"the TUF metadata cache {tuf} cannot be written", "No space left on device",
                  "timestamp.json")
    assert not list(tuf.glob("tmp*"))  # python-tuf removed its temporary file
    r = _check(sim)
    assert r.returncode == 0, r.stderr


def test_a_file_where_the_cache_directory_belongs_is_a_device_error(world):
    world.publish("1.0.0")
    sim, _ = agent(world)
    tuf = sim.config.state_dir / "tuf"
    shutil.rmtree(tuf, ignore_errors=True)
    tuf.write_text("not a directory")
    r = _check(sim)
    _device_error(r, f"the TUF metadata cache {tuf} cannot be written", "File exists")
    tuf.unlink()
    assert _check(sim).returncode == 0
