"""What a device command loads at start-up (issue 14): the commands a device runs on every boot
and timer tick import only what they need. No timing here (that is bench/device.py); the test
asserts WHICH modules the real CLI process imported, read from ``sys.modules`` at exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Never on a device path: cloud signer SDKs (securesystemslib imports them if present), typer's
# pydantic adapters, rich (progress bars of download/install only), the producer side.
HEAVY = ("boto3", "botocore", "s3transfer", "azure", "pydantic", "pydantic_core", "typer._adapters", "rich",
         "builder", "abflip.commands.producer", "abflip.commands.repo", "abflip.demo")

_PROBE = """
import atexit, json, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(n for n, m in sys.modules.items() if m is not None))))
sys.argv[0] = "abflip"
runpy.run_module("abflip.cli", run_name="__main__")
"""


def _loaded(tmp_path, *args: str) -> tuple[int, str, set[str]]:
    out = tmp_path / "modules.json"
    p = subprocess.run([sys.executable, "-c", _PROBE, str(out), *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, set(json.loads(out.read_text()))


def _heavy(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("command", [["status", "--json"], ["boot-check", "--json"], ["check", "--json"],
                                     ["check"], ["status"], ["run", "--no-reboot"]])
def test_device_commands_load_no_signer_sdk_pydantic_or_producer_code(world, tmp_path, command):
    world.publish("1.0.0")
    sim, dev = world.device()
    dev.check()  # the next check is idle (TUF timestamp only)
    rc, stdout, mods = _loaded(tmp_path, *command, "--config", str(sim.config.path))
    assert rc == 0, stdout
    assert _heavy(mods) == []
    assert "applier.agent" in mods  # it really ran the device code
    if "--json" in command:
        assert json.loads(stdout)  # the same JSON as through typer (compared below)


def test_install_streams_an_image_without_typer(world, tmp_path):
    """``install --json`` (and without a terminal, plain ``install``) runs on the fast path too:
    a whole update streamed, no typer, rich, pydantic or producer code loaded."""
    world.publish("1.0.0")
    sim, _ = world.device()
    world.publish("2.0.0")
    rc, stdout, mods = _loaded(tmp_path, "install", "--json", "--config", str(sim.config.path))
    assert rc == 0, stdout
    assert json.loads(stdout.splitlines()[-1])["result"]["version"] == "2.0.0"
    assert _heavy(mods) == [] and _any_of(mods, ("typer",)) == []
    assert {"applier.stream", "applier.install"} <= mods


# Beyond HEAVY, by command (issue 14). status and boot-check never touch the network: no TUF
# client, HTTP stack or the crypto behind them. An idle check (TUF says nothing changed) needs
# those, but never the code that writes a slot: streaming, deltas (zstandard), the installer.
# None of the three needs typer (the CLI parses their plain arguments itself).
NETWORK = ("tuf", "urllib3", "cryptography", "securesystemslib", "applier.client", "applier.fetch")
WRITING = ("zstandard", "applier.stream", "applier.delta", "applier.install")
NOT_LOADED = {"status": ("typer", *NETWORK, *WRITING, "applier.mark", "applier.hooks"),
              "boot-check": ("typer", *NETWORK, *WRITING),
              "check": ("typer", *WRITING, "applier.mark", "applier.hooks")}


def _any_of(mods: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in mods if any(m == n or m.startswith(n + ".") for n in names))


@pytest.mark.parametrize("command", ["status", "boot-check", "check"])
def test_each_device_command_loads_only_what_it_needs(world, tmp_path, command):
    world.publish("1.0.0")
    sim, dev = world.device()
    dev.check()  # the next check is idle (TUF timestamp only)
    rc, stdout, mods = _loaded(tmp_path, command, "--json", "--config", str(sim.config.path))
    assert rc == 0, stdout
    assert _any_of(mods, NOT_LOADED[command]) == []
    if command == "check":
        assert json.loads(stdout)["available"] is False  # it really asked the repository: nothing new
        assert {"tuf.ngclient", "applier.client"} <= mods
    else:
        assert json.loads(stdout)["booted_slot"] == "a"


def test_plain_arguments_and_typer_give_the_same_output(world):
    """The fast path (``--config PATH``) and typer's (``--config=PATH``, which it alone parses)
    print the same bytes and exit the same way, including for errors."""
    world.publish("1.0.0")
    sim, _ = world.device()
    cfg = str(sim.config.path)
    cli = [sys.executable, "-m", "abflip.cli"]
    for cmd in (["status", "--json"], ["status"], ["boot-check", "--json"], ["check", "--json"], ["check"]):
        fast = subprocess.run([*cli, *cmd, "--config", cfg], capture_output=True, text=True, timeout=120)
        slow = subprocess.run([*cli, *cmd, f"--config={cfg}"], capture_output=True, text=True, timeout=120)
        assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr), cmd
    # the streaming commands too (no terminal here, so no progress bar): nothing to download,
    # nothing staged to apply, an idle pass
    for cmd in (["download", "--json"], ["download"], ["apply", "--json"], ["apply", "--now"], ["install", "--json"],
                ["install", "--retry-failed"], ["run", "--json", "--no-reboot"], ["run", "--no-reboot"]):
        fast = subprocess.run([*cli, *cmd, "--config", cfg], capture_output=True, text=True, timeout=120)
        slow = subprocess.run([*cli, *cmd, f"--config={cfg}"], capture_output=True, text=True, timeout=120)
        assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr), cmd
        assert fast.stdout or fast.stderr, cmd
    missing = str(sim.config.path) + ".missing"
    fast = subprocess.run([*cli, "status", "-c", missing], capture_output=True, text=True, timeout=120)
    slow = subprocess.run([*cli, "status", f"--config={missing}"], capture_output=True, text=True, timeout=120)
    assert fast.returncode == slow.returncode == 2
    assert fast.stderr == slow.stderr and fast.stderr.startswith("error (user): no configuration file")
    # anything the fast path does not know goes to typer: usage error, exit 2, no traceback
    bad = subprocess.run([*cli, "status", "--config", cfg, "--bogus"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error (user): abflip status: no such option: --bogus\n  hint: ")


def test_boot_first_day_and_operator_verbs_run_without_typer(world, tmp_path):
    """``mark-good`` (abflip-bless.service runs it on every boot), ``provision`` (a device's first
    boot) and ``rollback`` (the operator) run on the fast path too: typer and its pydantic adapters
    took 14 of mark-good's 22 s on the reference device under QEMU (tests/e2e/test_device_os.py).
    And they print the same as through typer, refusals included."""
    world.publish("1.0.0")
    sim, _ = world.device()
    cfg = str(sim.config.path)
    release = str(world.built["1.0.0"])
    for cmd in (["mark-good", "--no-health"], ["mark-good", "--json"], ["rollback", "--json"],
                ["provision", release, "--json"], ["provision", release, "--slot", "a", "--force"]):
        rc, stdout, mods = _loaded(tmp_path, *cmd, "--config", cfg)
        assert _heavy(mods) == [] and _any_of(mods, ("typer",)) == [], cmd
        assert "applier.agent" in mods, cmd
    cli = [sys.executable, "-m", "abflip.cli"]
    for cmd in (["mark-good", "--no-health"], ["mark-good", "--json"], ["rollback"], ["rollback", "--json"],
                ["provision", release], ["provision", release, "--json"], ["provision", release, "--slot", "b"]):
        fast = subprocess.run([*cli, *cmd, "--config", cfg], capture_output=True, text=True, timeout=120)
        slow = subprocess.run([*cli, *cmd, f"--config={cfg}"], capture_output=True, text=True, timeout=120)
        assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr), cmd
        assert fast.stdout or fast.stderr, cmd
    refused = subprocess.run([*cli, "provision", release, "--config", cfg], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 6, refused  # provisioned already: the policy's refusal, from the fast path
    forced = subprocess.run([*cli, "provision", release, "--slot", "a", "--force", "--config", cfg],
                            capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0 and forced.stdout.startswith("provisioned demo-os 1.0.0 in slot a"), forced
    # what the fast path does not parse goes to typer: a missing RELEASE is typer's usage error
    bad = subprocess.run([*cli, "provision", "--config", cfg], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error (user): abflip provision: missing argument RELEASE")
