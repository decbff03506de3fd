"""Hooks (applier/hooks.py): executables in <dir>/<kind>.d/, in name order, with a timeout."""

from __future__ import annotations

import time

import pytest

from applier.hooks import HookError, list_hooks, run_hooks


def hook(d, kind, name, script, mode=0o755):
    p = d / f"{kind}.d" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("#!/bin/sh\n" + script + "\n")
    p.chmod(mode)
    return p


def test_hooks_run_in_name_order_with_the_environment(tmp_path):
    log = tmp_path / "log"
    hook(tmp_path, "health-check", "20-second", f'echo "2 $ABFLIP_HOOK $ABFLIP_VERSION" >> {log}')
    hook(tmp_path, "health-check", "10-first", f'echo "1 $ABFLIP_HOOK $ABFLIP_VERSION" >> {log}')
    hook(tmp_path, "health-check", "30-not-executable", "exit 1", mode=0o644)
    hook(tmp_path, "health-check", ".hidden", "exit 1")
    hook(tmp_path, "health-check", "backup~", "exit 1")
    results = run_hooks(tmp_path, "health-check", env={"ABFLIP_VERSION": "2.0.0"}, timeout=10)
    assert [r.path.rsplit("/", 1)[-1] for r in results] == ["10-first", "20-second"]
    assert log.read_text() == "1 health-check 2.0.0\n2 health-check 2.0.0\n"


def test_no_directory_means_no_hooks(tmp_path):
    assert list_hooks(tmp_path / "missing", "pre-install") == []
    assert list_hooks(None, "pre-install") == []
    assert run_hooks(tmp_path / "missing", "pre-install", env={}, timeout=1) == []


def test_a_failing_hook_stops_the_run_and_names_itself(tmp_path):
    log = tmp_path / "log"
    hook(tmp_path, "pre-install", "10-fails", "echo disk too hot; exit 3")
    hook(tmp_path, "pre-install", "20-never", f"echo ran >> {log}")
    with pytest.raises(HookError, match=r"pre-install hook .*10-fails failed \(exit status 3\).*disk too hot"):
        run_hooks(tmp_path, "pre-install", env={}, timeout=10)
    assert not log.exists()


def test_a_hanging_hook_is_killed_at_its_timeout(tmp_path):
    pidfile = tmp_path / "pid"
    hook(tmp_path, "health-check", "hangs", f"sleep 60 & echo $! > {pidfile}; wait")
    t0 = time.monotonic()
    with pytest.raises(HookError, match="did not finish within 0.5 s"):
        run_hooks(tmp_path, "health-check", env={}, timeout=0.5)
    assert time.monotonic() - t0 < 10
    # its children went with it (the whole process group)
    import os
    pid = int(pidfile.read_text())
    time.sleep(0.2)
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            alive = f.read().split()[2] != "Z"
    except ProcessLookupError:
        alive = False
    assert not alive
