"""``abflip history`` (issue 23): the device's past updates, rollbacks and failures, written by
the verbs (applier/history.py) on simulated devices over real HTTP; bounded, torn lines skipped,
refusals and quiet boots left out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_agent_lifecycle import agent

from applier import history
from applier.hooks import HookError
from metadata.errors import PolicyError, TransportError, UserError

REPO = Path(__file__).resolve().parents[1]


def whats(sim) -> list[tuple[str, str]]:
    return [(e["verb"], e["what"]) for e in history.read(sim.state_dir)]


def test_an_update_a_health_failure_a_fallback_and_a_failed_download(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    start = len(whats(sim))  # what provisioning the simulated device left
    world.publish("2.0.0")
    dev.install()
    sim.boot()
    dev.boot_check()
    dev.boot_check()  # an ordinary boot: nothing new, no event
    with pytest.raises(UserError):
        dev.apply(now=True)  # nothing staged: a mistake, not history
    with pytest.raises(PolicyError):
        dev.download()  # not newer: a refusal, not history
    assert whats(sim)[start:] == [
        ("download", "staged 2.0.0 in slot b"),
        ("apply", "applied 2.0.0: the next boot tries slot b"),
        ("boot-check", "committed 2.0.0 in slot b; floor 2.0.0")]

    # 3.0.0 fails its health check: the request, then the rollback it asked for
    sim.add_hook("health-check", "10-app", "echo app down; exit 1")
    world.publish("3.0.0")
    dev.install()
    sim.boot()
    with pytest.raises(HookError):
        dev.boot_check()
    sim.boot()
    dev.boot_check()
    got = whats(sim)[start + 3:]
    assert got[:2] == [("download", "staged 3.0.0 in slot a"), ("apply", "applied 3.0.0: the next boot tries slot a")]
    assert got[2][0] == "boot-check" and got[2][1].startswith(
        "boot-check failed (device); rollback requested: slot b (2.0.0) boots next: health-check hook ")
    assert "app down" in got[2][1]
    assert got[3] == ("boot-check", "rolled back: 3.0.0 failed; the other slot boots")
    assert len(got) == 4

    # the network gone: a failure, with its blame
    world.server.httpd.shutdown()
    world.server.httpd.server_close()
    with pytest.raises(TransportError):
        dev.download(retry_failed=True)
    last = history.read(sim.state_dir)[-1]
    assert last["verb"] == "download" and last["error"]["blame"] == "transport"
    assert last["what"].startswith("download failed (transport): ")


def test_systemd_boot_falling_back_by_itself_is_recorded(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.install()
    for _ in range(3):  # the new image never reaches boot-check: systemd-boot counts its tries down
        assert sim.boot().slot == "b"
    assert sim.boot().slot == "a"
    dev.boot_check()
    assert whats(sim)[-1] == ("boot-check", "rolled back: 2.0.0 failed; the other slot boots")


def test_cli_history_text_json_and_last(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.install()
    dev.rollback()  # withdraw it before its boot
    cli = [sys.executable, "-m", "abflip.cli", "history", "--config", str(sim.config_path)]
    r = subprocess.run(cli, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1].endswith("rollback    rolled back: 2.0.0 withdrawn before its boot; the other slot boots")
    assert lines[-2].endswith("apply       applied 2.0.0: the next boot tries slot b")
    r = subprocess.run([*cli, "--json", "-n", "2"], capture_output=True, text=True, cwd=REPO, timeout=60)
    events = json.loads(r.stdout)
    assert [e["verb"] for e in events] == ["apply", "rollback"]
    assert events[1]["from"] == "pending" and events[1]["to"] == "rolled-back" and events[1]["version"] == "2.0.0"
    r = subprocess.run([*cli, "-n", "-1"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error (user): --last -1")


def test_the_log_is_bounded_and_a_torn_line_is_skipped(tmp_path, monkeypatch):
    from applier.state import State, save_state

    monkeypatch.setattr(history, "MAX_BYTES", 4096)
    monkeypatch.setattr(history, "KEEP", 10)
    save_state(tmp_path, State())
    for n in range(100):
        with history.recording(tmp_path, "download"):
            save_state(tmp_path, State(state="idle" if n % 2 else "staged"))
    path = tmp_path / history.FILE
    assert path.stat().st_size <= 4096 + 400
    events = history.read(tmp_path)
    assert 10 <= len(events) <= 30 and events[-1]["to"] == "idle"
    assert not list(tmp_path.glob(".state-history-*"))
    with open(path, "ab") as f:
        f.write(b'{"time": "2026-01-01T00:00:00+00:00", "verb": "downl')  # the power failed mid-append
    assert history.read(tmp_path) == events
    assert history.read(tmp_path, 3) == events[-3:]


def test_a_history_that_cannot_be_written_never_fails_a_verb(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    (sim.state_dir / history.FILE).unlink(missing_ok=True)
    (sim.state_dir / history.FILE).mkdir()  # unwritable as a file
    world.publish("2.0.0")
    assert dev.install().version == "2.0.0"
    assert history.read(sim.state_dir) == []
