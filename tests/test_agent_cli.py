"""The device commands as an orchestrator sees them: exit codes, JSON, JSON-lines progress."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from test_agent_lifecycle import agent

from applier.fetch import HttpFetcher

REPO = Path(__file__).resolve().parents[1]


def abflip(*args, config):
    return subprocess.run([sys.executable, "-m", "abflip.cli", *args, "--config", str(config)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_cli_check_download_apply_rollback(world):
    world.publish("1.0.0")
    sim, _dev = agent(world, windows=["Sat 01:00-05:00 Europe/Berlin"])
    cfg = sim.config_path
    r = abflip("check", "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["available"] is False
    world.publish("2.0.0")
    r = abflip("check", config=cfg)
    assert r.returncode == 0 and "2.0.0 is available (running 1.0.0)" in r.stdout

    r = abflip("download", "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert all(len(line) and line.startswith("{") for line in r.stdout.splitlines())  # one object a line
    progress = [e for e in events if e["event"] == "progress" and e["phase"] == "download"]
    assert [e["chunk"] for e in progress] == list(range(1, progress[0]["chunks"] + 1))
    assert progress[-1]["bytes"] == progress[-1]["total_bytes"]
    assert events[-1]["event"] == "result" and events[-1]["result"]["version"] == "2.0.0"

    status = json.loads(abflip("status", "--json", config=cfg).stdout)
    assert status["schema"] == 1 and status["state"] == "staged"
    assert status["windows"] == ["Sat 01:00-05:00 Europe/Berlin"] and set(status["next_window"]) == {"start", "end", "open"}
    assert "window:" in abflip("status", config=cfg).stdout

    # the real clock is almost never inside this window; --now overrides
    r = abflip("apply", "--json", config=cfg)
    if r.returncode:
        assert r.returncode == 6
        assert json.loads(r.stdout.splitlines()[-1])["error"]["blame"] == "policy"
        assert "outside the maintenance windows" in r.stderr and "--now" in r.stderr
        r = abflip("apply", "--now", config=cfg)
    assert r.returncode == 0 and "abflip-2.0.0-b+3.conf" in r.stdout

    r = abflip("rollback", "--json", config=cfg)
    assert r.returncode == 0 and json.loads(r.stdout)["action"] == "cancelled-pending"
    assert [e for e in sim.entries() if "-b" in e] == []

    r = abflip("apply", "--now", config=cfg)
    assert r.returncode == 2 and "nothing is staged" in r.stderr


def test_cli_errors_map_to_exit_codes(world, tmp_path):
    r = abflip("status", config=tmp_path / "missing.toml")
    assert r.returncode == 2 and "no configuration file" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[repository]\nurl = "http://x"\ntrusted_root = "r"\n[device]\nproduct = "p"\n'
                   '[maintenance]\nwindows = ["Sun 25:00-01:00"]\n')
    r = abflip("run", config=bad)
    assert r.returncode == 2 and "maintenance.windows[0]" in r.stderr and str(bad) in r.stderr


def test_bandwidth_limit_holds_over_http(world):
    world.publish("1.0.0")
    rel_obj = min((world.repo / "targets").rglob("*.rootfs.img.zst"))
    size = rel_obj.stat().st_size
    url = world.url + "/" + str(rel_obj.relative_to(world.repo))
    rate = 256 << 10
    fetcher = HttpFetcher(timeout=5, rate_limit=rate)
    t0 = time.monotonic()
    got = sum(len(p) for p in fetcher.open_range(url, 0, size))
    elapsed = time.monotonic() - t0
    assert got == size
    burst = max(rate, 64 << 10)
    assert elapsed >= (size - burst) / rate * 0.9, (size, elapsed)


def test_progress_bar_on_a_terminal(capsys, monkeypatch):
    from abflip.commands.device import _streaming

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)

    def work(progress):
        for i in range(1, 4):
            progress({"event": "progress", "phase": "download", "version": "2.0.0", "chunk": i, "chunks": 3,
                      "bytes": i * 100, "total_bytes": 300})
        progress({"event": "progress", "phase": "refresh"})  # no byte counts: no bar
        return {"version": "2.0.0"}

    _streaming((work, lambda r: f"done {r['version']}", None), False)
    out = capsys.readouterr()
    assert out.out == "done 2.0.0\n"


def test_cli_reboots_after_it_has_reported(world, tmp_path):
    """The reboot a command asks for runs once the command has printed its result or its error, not from inside
    it: under systemd the reboot stops the command's unit at once (seen on the reference device: the journal of a
    failed trial did not say why it was rolled back). Here the reboot command copies what the command had written
    to stderr by then."""
    world.publish("1.0.0")
    sim, dev = agent(world)
    sim.add_hook("health-check", "10-app", "echo app down; exit 1")
    world.publish("2.0.0")
    dev.install()
    assert sim.boot().slot == "b"
    err, seen = tmp_path / "stderr", tmp_path / "seen"
    cfg = sim.config_path
    text = cfg.read_text()
    assert "reboot_command = []" in text
    cfg.write_text(text.replace("reboot_command = []", f'reboot_command = ["sh", "-c", "cp {err} {seen}"]'))
    with open(err, "w") as stderr:
        r = subprocess.run([sys.executable, "-m", "abflip.cli", "boot-check", "--no-bless", "--config", str(cfg)],
                           stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 5
    assert "health-check hook" in seen.read_text() and "10-app failed" in seen.read_text()  # said before the reboot
    assert sim.boot().slot == "a"
