"""What users of RAUC, sysupdate, Mender and the aws CLI look for (issue 23): a human ``status``
that says what ``--json`` says, shell completion and a man page generated from the command
tree, ``--verbose``. The real CLI as a process; the completion through a real bash."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from abflip.cli import _app
from abflip.commands.meta import walk
from abflip.demo import PRODUCT
from builder.channels import promote, withdraw
from metadata.manifest import Rollout

REPO = Path(__file__).resolve().parents[1]
ABFLIP = [sys.executable, "-m", "abflip.cli"]


def cli(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*ABFLIP, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, **(env or {})})


# -- status: the human form says what the JSON says --------------------------------------------
def test_human_status_shows_rollout_withdrawal_and_the_rest_of_the_json(world):
    world.publish("1.0.0")
    world.publish("2.0.0", channel="beta")
    sim, dev = world.device()
    (sim.root / "machine-id").write_text("0" * 32 + "\n")
    sim.config_path.write_text(sim.config_path.read_text().replace("[device]\n", '[device]\nid_file = "machine-id"\n'))
    promote(world.storage, world.keys, product=PRODUCT, version="2.0.0", channel="stable", rollout=Rollout(0))
    withdraw(world.storage, world.keys, product=PRODUCT, version="1.0.0", channel="stable")
    assert cli("check", "--config", sim.config_path).returncode == 0  # records what the channel said
    st = json.loads(cli("status", "--json", "--config", sim.config_path).stdout)
    text = cli("status", "--config", sim.config_path).stdout
    rc = st["release_control"]
    assert rc["withdrawn"] == ["1.0.0"] and not rc["rollout"]["in"] and rc["booted_withdrawn"]
    assert (f"channel: stable offered 2.0.0 at the last check; rollout: not in (0 %: {rc['rollout']['reason']})"
            in text), text
    assert "withdrawn: 1.0.0; the booted version is one of them" in text
    assert f"hwid:    {st['hardware_id']}" in text and f"esp:     {st['esp']}" in text
    assert "entries: abflip-1.0.0-a.conf" in text
    for name, slot in st["slots"].items():
        assert f"slot {name}:  {slot['status']:8} {slot['version'] or '-':12} {slot['device']}" in text
        if slot["sha256"]:
            assert f"sha256 {slot['sha256'][:12]}..." in text
    assert "None" not in text


def test_human_status_shows_a_download_in_flight_and_a_pending_entry(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0")
    dev.install()
    text = cli("status", "--config", sim.config_path).stdout
    st = dev.status()
    t = st["target"]
    assert (f"target:  2.0.0 into slot b: {t['chunks_done']} of {t['chunks_total']} chunks verified "
            f"({t['bytes_downloaded']} bytes downloaded)") in text
    assert f"fetched: 2.0.0 as full: {st['download']['bytes_downloaded']} bytes" in text
    assert "pending: abflip-2.0.0-b+3.conf" in text and "abflip-2.0.0-b+3.conf (3 tries left)" in text


# -- the man page: every command and option, valid roff ---------------------------------------
def test_man_page_covers_every_command_and_option():
    r = cli("man")
    assert r.returncode == 0, r.stderr
    page = r.stdout
    assert page.startswith('.TH ABFLIP 1 ') and ".SH EXIT STATUS" in page and ".SH FILES" in page
    commands = walk(typer.main.get_command(_app()))
    assert len(commands) >= 30
    for path, cmd in commands:
        assert f'.SS "abflip {" ".join(path)}' in page, path
        for p in cmd.params:
            for opt in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]:
                if opt.startswith("-") and not getattr(p, "hidden", False):
                    assert "\\fB" + opt.replace("-", "\\-") + "\\fR" in page, (path, opt)
    for code in ("0", "1", "2", "3", "4", "5", "6", "130, 143"):
        assert f"\\fB{code}\\fR" in page
    for line in page.splitlines():  # roff: text never starts with a control character by accident
        assert not line.startswith("'") and (not line.startswith(".") or line.split()[0] in
                                             (".TH", ".SH", ".SS", ".TP", ".PP", ".B")), line


def test_man_page_renders_without_warnings(tmp_path):
    if not shutil.which("groff"):
        pytest.fail("groff is missing: install groff-base (.ci/run does)")
    page = tmp_path / "abflip.1"
    page.write_text(cli("man").stdout)
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    text = subprocess.run(["groff", "-man", "-Tascii", str(page)], capture_output=True, text=True, timeout=60).stdout
    text = re.sub(".\x08", "", text)  # bold and underline are overstrikes on a terminal
    assert "abflip repo rotate ROLE" in text and "--endpoint-url" in text.replace("\u2010", "-")


# -- shell completion ---------------------------------------------------------------------------
def test_completion_script_completes_commands_and_options_in_bash(tmp_path):
    r = cli("completion", "bash")
    assert r.returncode == 0 and "_ABFLIP_COMPLETE=complete_bash" in r.stdout, r.stdout + r.stderr
    script = tmp_path / "abflip.bash"
    script.write_text(r.stdout)
    shim = tmp_path / "bin" / "abflip"  # what the shell runs to ask for completions: this checkout's abflip
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m abflip.cli \"$@\"\n")
    shim.chmod(0o755)

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        bash = (f"source {script}; COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; "
                "_abflip_completion abflip; printf '%s\\n' \"${COMPREPLY[@]}\"")
        out = subprocess.run(["bash", "-c", bash], capture_output=True, text=True, timeout=60, cwd=REPO,
                             env={**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}"})
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert "repo" in complete("abflip re") and "release" in complete("abflip re")
    assert complete("abflip repo ro") == ["rotate"]
    assert "--endpoint-url" in complete("abflip publish --end")
    for shell in ("zsh", "fish"):
        r = cli("completion", shell)
        assert r.returncode == 0 and "_ABFLIP_COMPLETE" in r.stdout
    r = cli("completion", "tcsh")
    assert r.returncode == 2 and r.stderr.startswith("error (user): no completion for shell 'tcsh'")


# -- --verbose ------------------------------------------------------------------------------------
def test_verbose_logs_requests_and_storage_and_works_before_or_after_the_command(world, tmp_path):
    world.publish("1.0.0")
    sim, _ = world.device()
    world.publish("2.0.0")
    r = cli("check", "--config", sim.config_path, "--verbose")  # the fast path
    assert r.returncode == 0, r.stderr
    assert f"abflip: applier.fetch: GET {world.url}/metadata/timestamp.json" in r.stderr
    assert "abflip: applier.fetch: " in r.stderr and ": HTTP 200, " in r.stderr
    r = cli("--verbose", "publish", world.built["3.0.0"], "--to", world.repo, "--keys", world.keys.dir)
    assert r.returncode == 0, r.stderr
    assert "abflip: builder.storage.local: writing " in r.stderr and "timestamp.json" in r.stderr
    quiet = cli("check", "--config", sim.config_path)
    assert quiet.stderr == ""


def test_verbose_prints_the_traceback_of_an_internal_error(capsys, monkeypatch):
    from abflip.commands import _output

    def bug():
        return {}["missing"]

    assert _output.report(bug, False, str) == 1
    err = capsys.readouterr().err
    assert err.startswith("error (internal): KeyError: 'missing'\n  hint: this is a bug in abflip") and "Traceback" not in err
    monkeypatch.setattr(_output, "VERBOSE", True)
    assert _output.report(bug, True, str) == 1
    out = capsys.readouterr()
    assert "Traceback" in out.err and "in bug" in out.err
    assert json.loads(out.out)["error"]["blame"] == "internal"
