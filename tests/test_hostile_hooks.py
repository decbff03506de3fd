"""Hooks as an attacker (or a careless admin) would write them (issue 9 item 9): children that
escape the process group, endless output, files another user can change, binary output, an
environment full of secrets. The agent must stay bounded in time and memory, and must refuse to
run as root what it cannot trust. Runs as root (the tests chown to uid 65534)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from applier.hooks import HookError, run_hooks

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def hook(d: Path, kind: str, name: str, script: str, mode: int = 0o755) -> Path:
    p = d / f"{kind}.d" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("#!/bin/sh\n" + script + "\n")
    p.chmod(mode)
    return p


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def pids_in(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.fixture
def reap():
    """Pid files whose processes the test kills at the end, whatever happened (escapees)."""
    files: list[Path] = []
    yield files.append
    for f in files:
        for pid in pids_in(f):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_in_agent(hooks: Path, kind: str, timeout: float, *, limit: float = 60) -> dict:
    """run_hooks in a separate Python process (the agent), bounded from outside so a hang fails
    the test instead of hanging it; reports the outcome and the agent's peak RSS growth."""
    code = f"""
import json, resource, sys
from pathlib import Path
from applier.hooks import HookError, run_hooks
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    run_hooks(Path({str(hooks)!r}), {kind!r}, env={{}}, timeout={timeout!r})
    out = {{"ok": True}}
except HookError as e:
    out = {{"ok": False, "error": e.message}}
out["rss_growth_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps(out))
"""
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"run_hooks did not return within {limit} s")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# -- time: the timeout holds whatever the hook's children do ---------------------------------------
def test_a_child_that_escapes_the_session_cannot_hang_a_finished_hook(tmp_path, reap):
    """`setsid sleep &` keeps the output pipe open forever: the run ends when the hook does."""
    pidfile = tmp_path / "escapee"
    reap(pidfile)
    hook(tmp_path, "pre-install", "10-escape", f"setsid sh -c 'echo $$ >> {pidfile}; exec sleep 1000' &\n"
                                               "echo started; exit 0")
    out = run_in_agent(tmp_path, "pre-install", timeout=2, limit=30)
    assert out["ok"], out


def test_a_hanging_hook_with_an_escaped_child_is_killed_at_its_timeout(tmp_path, reap):
    pidfile = tmp_path / "escapee"
    reap(pidfile)
    mine = tmp_path / "mine"
    reap(mine)
    hook(tmp_path, "health-check", "10-escape", f"setsid sh -c 'echo $$ >> {pidfile}; exec sleep 1000' &\n"
                                                f"sleep 1000 & echo $! >> {mine}; echo waiting; wait")
    out = run_in_agent(tmp_path, "health-check", timeout=2, limit=30)
    assert not out["ok"] and "did not finish within 2 s and was killed" in out["error"], out
    assert "waiting" in out["error"]
    time.sleep(0.2)
    assert [alive(p) for p in pids_in(mine)] == [False]  # its own group went with it


@pytest.mark.parametrize("ending", ["exit 0", "sleep 1000"], ids=["hook-exits", "hook-hangs"])
def test_a_tree_of_children_is_killed_whether_the_hook_exits_or_hangs(tmp_path, reap, ending):
    """Leftovers of a hook do not outlive it (as systemd kills a unit's cgroup)."""
    pids = tmp_path / "pids"
    reap(pids)
    tree = (f"for i in 1 2 3; do ( for j in 1 2 3; do ( sleep 1000 & echo $! >> {pids}; wait ) & done; wait ) & done\n"
            f"while [ $(wc -l < {pids} 2>/dev/null || echo 0) -lt 9 ]; do sleep 0.05; done\n")
    # the leftovers' output goes elsewhere: only the process group, not the pipe, ties them to the hook
    hook(tmp_path, "post-install", "10-tree", "exec >/dev/null 2>&1\n" + tree + ending)
    if ending == "exit 0":
        run_hooks(tmp_path, "post-install", env={}, timeout=30)
    else:
        with pytest.raises(HookError, match="did not finish within 3 s"):
            run_hooks(tmp_path, "post-install", env={}, timeout=3)
    time.sleep(0.2)
    assert len(pids_in(pids)) == 9
    assert [p for p in pids_in(pids) if alive(p)] == []


def test_a_hook_that_closes_its_output_and_hangs_is_still_killed(tmp_path):
    hook(tmp_path, "pre-install", "10-quiet", "echo last words; exec >&- 2>&-; sleep 1000")
    with pytest.raises(HookError, match="did not finish within 1 s.*last words"):
        run_hooks(tmp_path, "pre-install", env={}, timeout=1)


# -- memory: the output is bounded -----------------------------------------------------------------
def test_600_mb_of_output_costs_the_agent_no_memory(tmp_path):
    hook(tmp_path, "pre-install", "10-chatty", "head -c 600000000 /dev/zero; echo; echo THE END; exit 7")
    out = run_in_agent(tmp_path, "pre-install", timeout=120, limit=180)
    assert not out["ok"] and "exit status 7" in out["error"] and out["error"].endswith("THE END")
    assert len(out["error"]) < 3000  # the tail, not the output
    assert out["rss_growth_kib"] < 100 << 10, out["rss_growth_kib"]  # was > 1.2 GiB


def test_endless_output_is_cut_off_at_the_timeout(tmp_path):
    """A writer faster than the agent reads: the clock is still checked, the memory still bounded."""
    hook(tmp_path, "health-check", "10-endless", "cat /dev/zero")
    out = run_in_agent(tmp_path, "health-check", timeout=3, limit=60)
    assert not out["ok"] and "did not finish within 3 s and was killed" in out["error"], out
    assert out["rss_growth_kib"] < 100 << 10, out["rss_growth_kib"]


def test_binary_output_and_terminal_escapes_are_shown_escaped(tmp_path):
    hook(tmp_path, "pre-install", "10-binary",
         r"printf 'bad\377\376 bytes\033[2J\033]0;owned\007\rfake line\n'; exit 1")
    with pytest.raises(HookError) as e:
        run_hooks(tmp_path, "pre-install", env={}, timeout=10)
    msg = e.value.message
    assert not any(c in msg for c in "\x1b\x07\r"), repr(msg)
    assert r"bad\xff\xfe bytes\x1b[2J\x1b]0;owned\x07\rfake line" in msg


# -- trust: only files root alone can change are run as root ---------------------------------------
@needs_root
def test_a_hook_owned_by_another_user_is_refused_and_none_runs(tmp_path):
    log = tmp_path / "log"
    hook(tmp_path, "pre-install", "10-fine", f"echo ran >> {log}")
    bad = hook(tmp_path, "pre-install", "20-theirs", f"echo pwned >> {log}")
    os.chown(bad, NOBODY, NOBODY)
    with pytest.raises(HookError) as e:
        run_hooks(tmp_path, "pre-install", env={}, timeout=10)
    msg = e.value.message
    assert f"{bad} is owned by nobody (uid {NOBODY})" in msg and "-rwxr-xr-x" in msg
    assert "no pre-install hook was run" in msg
    assert e.value.hint.startswith(f"chown root:root {bad}; chmod go-w {bad}")
    assert e.value.exit_code == 5 and e.value.blame == "device"
    assert not log.exists()


@needs_root
@pytest.mark.parametrize("where", ["group-writable hook", "world-writable kind.d", "world-writable hooks dir",
                                   "kind.d owned by nobody", "sticky world-writable kind.d"])
def test_a_hook_others_can_change_is_refused(tmp_path, where):
    hooks = tmp_path / "hooks"
    log = tmp_path / "log"
    h = hook(hooks, "health-check", "10-check", f"echo ran >> {log}")
    d = h.parent
    target, fix = {"group-writable hook": (h, lambda: h.chmod(0o775)),
                   "world-writable kind.d": (d, lambda: d.chmod(0o777)),
                   "world-writable hooks dir": (hooks, lambda: hooks.chmod(0o777)),
                   "kind.d owned by nobody": (d, lambda: os.chown(d, NOBODY, NOBODY)),
                   "sticky world-writable kind.d": (d, lambda: d.chmod(0o1777))}[where]
    fix()
    with pytest.raises(HookError, match=f"is not safe to run: {target} (is writable by|is owned by)"):
        run_hooks(hooks, "health-check", env={}, timeout=10)
    assert not log.exists()


@needs_root
def test_symlinks_are_followed_and_their_target_checked_too(tmp_path):
    """As sudo does: a link is as trustworthy as the file it points at, and where that file lives."""
    hooks = tmp_path / "hooks"
    log = tmp_path / "log"
    lib = tmp_path / "lib"
    lib.mkdir()
    real = lib / "check"
    real.write_text(f"#!/bin/sh\necho ran >> {log}\n")
    real.chmod(0o755)
    (hooks / "health-check.d").mkdir(parents=True)
    (hooks / "health-check.d" / "10-link").symlink_to(real)
    run_hooks(hooks, "health-check", env={}, timeout=10)
    assert log.read_text() == "ran\n"

    real.chmod(0o777)  # world-writable target
    with pytest.raises(HookError, match=f"{real} is writable by group and others"):
        run_hooks(hooks, "health-check", env={}, timeout=10)
    real.chmod(0o755)
    lib.chmod(0o1777)  # the target's directory lets anyone swap it (sticky or not: refused)
    with pytest.raises(HookError, match=f"{lib} is writable by group and others"):
        run_hooks(hooks, "health-check", env={}, timeout=10)
    assert log.read_text() == "ran\n"


@needs_root
def test_a_sticky_world_writable_ancestor_is_fine(tmp_path):
    """/tmp-like directories above the hooks directory: others cannot rename what root owns."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    log = tmp_path / "log"
    hook(shared / "hooks", "pre-install", "10-ok", f"echo ran >> {log}")
    run_hooks(shared / "hooks", "pre-install", env={}, timeout=10)
    assert log.read_text() == "ran\n"
    shared.chmod(0o777)  # without the sticky bit anyone could rename hooks/ away and put theirs
    with pytest.raises(HookError, match=f"{shared} is writable by group and others"):
        run_hooks(shared / "hooks", "pre-install", env={}, timeout=10)


# -- environment -----------------------------------------------------------------------------------
def test_a_hook_sees_only_the_documented_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-aws")
    monkeypatch.setenv("ABFLIP_KMS_TOKEN", "s3cr3t-kms")
    for name in [k for k in os.environ if k.startswith("LC_")]:  # whatever the caller's shell set (LC_CTYPE, ...)
        monkeypatch.delenv(name)
    monkeypatch.setenv("LC_TIME", "C")
    dump = tmp_path / "env"
    hook(tmp_path, "pre-install", "10-env", f"env > {dump}")
    run_hooks(tmp_path, "pre-install", env={"ABFLIP_VERSION": "2.0.0", "ABFLIP_SLOT": "b"}, timeout=10)
    text = dump.read_text()
    names = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line}
    documented = {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "ABFLIP_HOOK", "ABFLIP_VERSION", "ABFLIP_SLOT",
                  "ABFLIP_SLOT_DEVICE", "ABFLIP_BOOTED_SLOT", "ABFLIP_STATE", "ABFLIP_CONFIG"}
    shell = {"PWD", "SHLVL", "_", "OLDPWD"}  # what /bin/sh itself exports
    assert names - shell - documented == {"LC_TIME"}, text
    assert "s3cr3t" not in text
    assert "ABFLIP_HOOK=pre-install" in text and "ABFLIP_VERSION=2.0.0" in text and "PATH=" in text


# -- the agent: a refused hook is a device error, and nothing changed -----------------------------
@needs_root
def test_apply_with_an_untrusted_hook_changes_nothing(world):
    from test_agent_cli import abflip
    from test_agent_lifecycle import agent
    from helpers import assert_untouched

    world.publish("1.0.0")
    sim, dev = agent(world)
    ran = sim.root / "ran"
    h = sim.add_hook("pre-install", "10-theirs", f"echo x >> {ran}")
    os.chown(h, NOBODY, NOBODY)
    world.publish("2.0.0")
    dev.download()
    r = abflip("apply", "--now", config=sim.config_path)
    assert r.returncode == 5, r.stderr
    assert "error (device): pre-install hook" in r.stderr and "is owned by nobody" in r.stderr
    assert f"hint: chown root:root {h}" in r.stderr and "Traceback" not in r.stderr
    assert not ran.exists()
    assert_untouched(sim, dev)
    assert dev.status()["state"] == "staged"
