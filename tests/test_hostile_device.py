"""Hostile and broken inputs on the device side (issue 9 items 1-4, 7, 8; issue 10 items 1-3, 5),
told as attack and power-cut stories on the simulated device over real HTTP.

Each story ends with the device booting what it booted before (or the verified update it was
asked for), and every error is an abflip error with its blame, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_untouched, release_of
from test_agent_lifecycle import agent

import metadata.manifest as manifest_mod
from abflip.demo import HARDWARE, PRODUCT
from applier.bootloader import systemd_boot as boot
from applier.state import load_state
from builder.release import create_release
from metadata.errors import DeviceError, PolicyError, RepositoryError

REPO = Path(__file__).resolve().parents[1]


def cli(sim, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "abflip.cli", *args, "--config", str(sim.root / "abflip.toml")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def _lenient(mp) -> None:
    """The hostile signer's own tool: no option checks (the device must not rely on the producer's)."""
    import builder.release as release_mod

    for mod in (manifest_mod, release_mod):
        if hasattr(mod, "boot_options_problem"):
            mp.setattr(mod, "boot_options_problem", lambda o: None)


def release_as(world, version: str, *, base: str = "2.0.0", options: str = "ro") -> Path:
    """A release of ``base``'s image under another version (and options), built as a signer
    would: with release create's checks bypassed when the options are hostile."""
    out = world.tmp / f"release-{version}"
    if not out.exists():
        with pytest.MonkeyPatch.context() as mp:
            _lenient(mp)
            create_release(world.built[f"{base}.img"], out, product=PRODUCT, version=version, compatible=[HARDWARE],
                           kernel=world.built[base] / "vmlinuz", initrd=world.built[base] / "initrd.img",
                           options=options, chunk_size=256 << 10, window=256 << 10, created=1700000000)
    return out


def on_trial(world, *, committed: bool = False):
    """Slot a on 1.0.0; 2.0.0 installed into b and booted (a trial, or committed)."""
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.install()
    assert sim.boot().slot == "b"
    if committed:
        dev.boot_check()
    return sim, dev


def publish_as(world, version: str, **kw) -> None:
    from builder.publish import publish_release

    d = release_as(world, version, **kw)
    with pytest.MonkeyPatch.context() as mp:
        _lenient(mp)
        publish_release(d, world.storage, world.keys, channel="stable")


# -- boot entries: a signer must not rewrite what the device boots ------------------------------
@pytest.mark.parametrize("options", [
    "quiet\refi /EFI/tools/shellx64.efi\roptions init=/bin/sh",  # \r ends a line for systemd-boot
    "quiet\x0binit=/bin/sh",
    "ro root=PARTLABEL=root-a",  # the last root= wins: b's entry would mount a's root
    "ro abflip.slot=a",
    "ro rd.systemd.verity=0 roothash=00",
    "ro abflip.verity=00 abflip.verity.data=PARTLABEL=root-a",  # another root hash, or another slot's data
    "ro dm-mod.create=abflip-root,,,ro,0",  # the kernel's own mapping of that name, unverified
    'ro "unbalanced',
])
def test_signed_release_with_hostile_boot_options_is_refused(world, options):
    world.publish("1.0.0")
    sim, dev = agent(world)
    publish_as(world, "2.0.0", options=options)
    with pytest.raises(RepositoryError, match="boot.options"):
        dev.install()
    assert_untouched(sim, dev)


def test_entry_writer_refuses_control_characters_even_past_the_parser():
    with pytest.raises(RepositoryError, match="control"):
        boot.entry_text(product="p", version="1.0.0", slot="b", partlabel="root-b", options="a\rb", has_initrd=False)
    with pytest.raises(RepositoryError, match="printable"):
        boot.entry_text(product="p", version="1.0.0", slot="b", partlabel="root\r-b", options="ro", has_initrd=False)
    text = boot.entry_text(product="p", version="1.0.0", slot="b", partlabel="root-b", options="ro quiet",
                           has_initrd=True)
    assert "\r" not in text and text.count("\n") == 6


def test_versions_differing_only_in_case_never_share_esp_files(world):
    """On FAT, 2.0.0-RC and 2.0.0-rc are one name: boot files live per slot, and cleanup keeps
    whatever an entry references."""
    publish_as(world, "2.0.0-RC")
    sim, dev = agent(world, booted="1.0.0")
    # slot a runs 2.0.0-RC (installed, committed)
    dev.install()
    sim.boot()
    dev.boot_check()
    booted_kernel = {p for p in boot.referenced_paths(dev.esp) if "-b/" in p}  # 2.0.0-RC in slot b
    publish_as(world, "2.0.0-rc")  # newer in semver ('rc' > 'RC')
    dev.install()
    refs = sorted(boot.referenced_paths(dev.esp))
    dirs = [r.rsplit("/", 1)[0] for r in refs if r.startswith("abflip/")]
    per_slot = {}
    for d in dirs:
        per_slot.setdefault(d[-1], set()).add(d)
    assert all(len(v) == 1 for v in per_slot.values()) and len({next(iter(v)) for v in per_slot.values()}) == 2
    assert booted_kernel <= set(refs)  # the booted slot's files are still referenced and there
    on_esp = lambda: {p.relative_to(sim.esp).as_posix().casefold() for p in sim.esp.rglob("*") if p.is_file()}
    assert set(refs) <= on_esp()
    assert sim.boot().slot == "a" and dev.boot_check()["state"] == "committed"
    assert boot.referenced_paths(dev.esp) <= on_esp()  # cleanup removed nothing an entry names


def test_cleanup_never_removes_a_file_another_entry_references(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    keep = sim.esp / "abflip" / "rescue"
    keep.mkdir(parents=True)
    (keep / "vmlinuz").write_bytes(b"rescue kernel")
    (sim.esp / "loader/entries/rescue.conf").write_text("title Rescue\r\nlinux /abflip/rescue/vmlinuz\r\n")
    (sim.esp / "abflip" / "junk").mkdir()
    world.publish("2.0.0")
    dev.install()
    sim.boot()
    dev.boot_check()
    assert (keep / "vmlinuz").read_bytes() == b"rescue kernel"
    assert not (sim.esp / "abflip" / "junk").exists()


def test_build_metadata_never_reaches_the_esp_as_a_plus(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    publish_as(world, "2.0.0+build.7")
    r = dev.install()
    assert r.entry == "abflip-2.0.0_build.7-b+3.conf"
    assert sim.boot().slot == "b"
    st = dev.boot_check()
    assert st["state"] == "committed" and st["booted_entry"] == "abflip-2.0.0_build.7-b.conf"
    assert st["booted_version"] == "2.0.0+build.7"


def test_a_rebuild_of_a_failed_version_is_the_same_version(world):
    """2.0.0 failed to boot; 2.0.0+rebuild is not another version (semver 10)."""
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.install()
    for _ in range(4):  # never blessed: its tries run out
        sim.boot()
    assert sim.boot().slot == "a"
    assert "2.0.0" in dev.boot_check()["failed_versions"]
    publish_as(world, "2.0.0+rebuild")
    assert dev.check()["available"] is False
    with pytest.raises(PolicyError, match="was rolled back on this device before"):
        dev.download()
    assert_untouched(sim, dev)


# -- the state file: validated, and outranked by the boot loader --------------------------------
BAD_STATES = {
    "slot c": lambda d: d["slots"].update(c=d["slots"].pop("b")),
    "chunks_done x": lambda d: d.__setitem__("target", {"version": "2.0.0", "slot": "b", "manifest_sha256": "0" * 64,
                                                        "chunks_done": "x", "chunks_total": 3, "bytes_downloaded": 0}),
    "target slot c": lambda d: d.__setitem__("target", {"version": "2.0.0", "slot": "c", "manifest_sha256": "0" * 64}),
    "status weird": lambda d: d["slots"]["a"].__setitem__("status", "weird"),
    "floor not a version": lambda d: d.__setitem__("floor", "latest"),
    "failed not a list": lambda d: d.__setitem__("failed_versions", "2.0.0"),
    "unknown key": lambda d: d.__setitem__("stat", "idle"),
    "rollback to c": lambda d: d.__setitem__("rollback", {"from_slot": "a", "to_slot": "c"}),
}
RAW_STATES = {"null": "null", "list": "[1, 2]", "torn": '{"schema": 1, "state": "idl', "binary": "\udcff"}


@pytest.mark.parametrize("case", [*BAD_STATES, *RAW_STATES])
def test_invalid_state_file_is_a_clear_error_and_never_stops_boot_check(world, case):
    world.publish("1.0.0")
    sim, dev = agent(world)
    path = sim.state_dir / "state.json"
    if case in BAD_STATES:
        d = json.loads(path.read_text())
        BAD_STATES[case](d)
        path.write_text(json.dumps(d))
    else:
        path.write_bytes(RAW_STATES[case].encode("utf-8", "surrogateescape"))
    world.publish("2.0.0")
    if case != "torn":  # the API for each kind of damage; the real CLI for one
        for op in (dev.install, dev.download, lambda: dev.run(reboot=False), dev.rollback):
            with pytest.raises(DeviceError, match="state file is invalid"):
                op()
        assert dev.status()["state_invalid"]
        assert_untouched(sim, dev)
        assert dev.boot_check()["booted_version"] == "1.0.0"
        assert (sim.state_dir / "state.json.invalid").exists()
        dev.install()
        assert sim.boot().slot == "b"
        return
    for cmd in ("install", "download", "run", "rollback"):
        p = cli(sim, cmd, "--no-reboot") if cmd == "run" else cli(sim, cmd)
        assert p.returncode == 5, (cmd, p.stdout, p.stderr)
        assert "error (device): the state file is invalid" in p.stderr and "Traceback" not in p.stderr
        assert "reset-state" in p.stderr
    st = cli(sim, "status", "--json")
    assert st.returncode == 0 and json.loads(st.stdout)["state_invalid"]
    assert_untouched(sim, dev)
    p = cli(sim, "boot-check", "--json")  # the health unit: never fails on the state file
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["booted_version"] == "1.0.0"
    assert (sim.state_dir / "state.json.invalid").exists()
    assert cli(sim, "install").returncode == 0  # back to normal
    assert sim.boot().slot == "b"


def test_torn_state_during_a_trial_never_overwrites_the_fallback(world):
    """Issue 9 item 8: a trial entry still counting and a torn state file: the boot loader says
    trial, so the known-good slot a is not written, and boot-check commits the trial."""
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.install()
    assert sim.boot().slot == "b"  # trial: b's entry counts
    a_before = sim.slot_path("a").read_bytes()
    world.publish("3.0.0")
    (sim.state_dir / "state.json").write_text("")
    with pytest.raises(DeviceError, match="state file is invalid"):
        dev.run(reboot=False)
    dev.reset_state()
    assert dev.status()["state"] == "trial"
    with pytest.raises(PolicyError, match="on trial"):
        dev.download()
    assert dev.run(reboot=False).get("skipped")
    assert sim.slot_path("a").read_bytes() == a_before
    assert any(e.startswith("abflip-1.0.0-a") for e in sim.entries())
    st = dev.boot_check()
    assert st["state"] == "committed" and st["booted_version"] == "2.0.0"


@pytest.mark.parametrize("stale", ["idle", "staged", "missing"])
def test_a_booted_counting_entry_is_a_trial_whatever_the_state_says(world, stale):
    """Issue 10 item 1: the entry reached the ESP but the state did not say pending (a crash
    between the two, or a restored backup): the counting entry that booted is a trial."""
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.download()
    saved = (sim.state_dir / "state.json").read_text()
    dev.apply(now=True)
    if stale == "missing":
        (sim.state_dir / "state.json").unlink()
    elif stale == "staged":
        (sim.state_dir / "state.json").write_text(saved)
    else:
        d = json.loads(saved)
        d.update(state="idle", target=None)
        (sim.state_dir / "state.json").write_text(json.dumps(d))
    assert sim.boot().slot == "b"
    assert dev.status()["state"] == "trial"
    with pytest.raises(PolicyError):
        dev.download()  # slot a is the fallback
    st = dev.boot_check()
    assert st["state"] == "committed" and st["slots"]["b"]["status"] == "good"
    assert sim.entries()[-1] == "abflip-2.0.0-b.conf"


def test_pending_state_without_its_entry_is_staged_again(world):
    """A power cut after the write-ahead state, before the entry: nothing boots the slot, and
    apply completes it."""
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.download()
    path = sim.state_dir / "state.json"
    d = json.loads(path.read_text())
    d["state"] = "pending"
    path.write_text(json.dumps(d))
    assert dev.status()["state"] == "staged"
    assert sim.boot().slot == "a"
    r = dev.apply(now=True)
    assert not r.already and sim.boot().slot == "b"


class _FailingEsp:
    """An ESP whose chosen operation fails with EIO (``times`` times, then works)."""

    def __init__(self, inner, op: str, times: int = 1_000_000, match: str = "") -> None:
        self.inner, self.op, self.times, self.match = inner, op, times, match

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name != self.op:
            return attr

        def failing(*args, **kw):
            if self.times > 0 and self.match in str(args[0]):
                self.times -= 1
                raise OSError(5, "Input/output error", str(args[0]))
            return attr(*args, **kw)
        return failing


def test_entry_write_failure_means_nothing_boots_the_new_slot(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.download()
    dev.esp = _FailingEsp(dev.esp, "write_atomic", match="loader/entries")
    with pytest.raises(DeviceError, match="nothing boots the new slot"):
        dev.apply(now=True)
    assert dev.status()["state"] == "staged"
    assert_untouched(sim, dev)
    dev.esp = dev.esp.inner
    dev.apply(now=True)
    assert sim.boot().slot == "b"


def test_one_eio_while_blessing_is_retried_not_a_failed_health_check(world):
    """Issue 10 item 3: local I/O failure is not health failure."""
    sim, dev = on_trial(world)
    dev.esp = _FailingEsp(dev.esp, "rename", times=1)
    st = dev.boot_check()
    assert st["state"] == "committed" and "2.0.0" not in st["failed_versions"]
    assert dev.reboots == []


def test_a_bless_that_keeps_failing_keeps_the_trial(world):
    sim, dev = on_trial(world)
    dev.esp = _FailingEsp(dev.esp, "rename")
    with pytest.raises(DeviceError, match="tried 3 times") as e:
        dev.boot_check()
    assert "stays on trial" in e.value.hint
    dev.esp = dev.esp.inner
    st = dev.status()
    assert st["state"] == "trial" and not st["rollback"] and "2.0.0" not in st["failed_versions"]
    assert dev.reboots == []
    assert dev.boot_check()["state"] == "committed"  # the next boot-check blesses it


def test_state_save_failing_after_the_bless_says_what_happened(world, monkeypatch):
    sim, dev = on_trial(world)
    import applier.session as agent_mod

    real = agent_mod.save_state
    calls = []

    def save(d, s):
        calls.append(s.state)
        if s.state == "committed" and len([c for c in calls if c == "committed"]) == 1:
            raise DeviceError("cannot write the state file: [Errno 5] Input/output error")
        return real(d, s)
    monkeypatch.setattr(agent_mod, "save_state", save)
    with pytest.raises(DeviceError, match="is blessed .committed on the ESP."):
        dev.boot_check()
    monkeypatch.setattr(agent_mod, "save_state", real)
    assert dev.status()["state"] == "committed"  # derived from the blessed entry
    assert dev.reboots == []


def test_rollback_whose_entry_cannot_be_marked_changes_nothing(world):
    sim, dev = on_trial(world, committed=True)
    dev.esp = _FailingEsp(dev.esp, "rename")
    with pytest.raises(DeviceError, match="nothing was changed"):
        dev.rollback()
    dev.esp = dev.esp.inner
    st = dev.status()
    assert st["rollback"] is None and st["state"] == "committed"
    assert sim.boot().slot == "b"


def test_a_rollback_request_that_never_reached_the_esp_is_void(world):
    sim, dev = on_trial(world, committed=True)
    path = sim.state_dir / "state.json"
    d = json.loads(path.read_text())
    d["rollback"] = {"from_slot": "b", "from_version": "2.0.0", "to_slot": "a", "to_version": "1.0.0"}
    path.write_text(json.dumps(d))  # written ahead, then the power went before the rename
    st = dev.status()
    assert st["rollback"] is None
    world.publish("3.0.0")
    dev.download()  # not refused as "a rollback waits"


# -- leftovers and concurrency ------------------------------------------------------------------
def test_every_command_sweeps_what_killed_runs_left_behind(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    litter = [sim.state_dir / ".state-abc123", sim.state_dir / "tuf" / "tmpk2j4h5g6",
              sim.esp / "loader/entries/.abflip-tmp-x1", sim.esp / "abflip/1.0.0/.abflip-tmp-kern"]
    keep = [sim.state_dir / "notes.txt", sim.esp / "loader/entries/other.conf", sim.esp / "abflip/1.0.0/vmlinuz"]
    for p in litter + keep[:2]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 100)
    world.publish("2.0.0")
    dev.download()
    assert [p for p in litter if p.exists()] == []
    assert all(p.exists() for p in keep)


def test_two_agents_at_once_the_second_is_refused(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    with dev.session().locked():
        p = cli(sim, "download")
    assert p.returncode == 5 and "another abflip command is running" in p.stderr
    assert_untouched(sim, dev)


def test_release_needing_more_memory_than_the_budget_is_refused_up_front(world):
    import dataclasses

    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.config = dataclasses.replace(dev.config, memory_budget=16 << 10)
    with pytest.raises(PolicyError, match="memory"):
        dev.download()
    assert_untouched(sim, dev)
    assert dev.status()["slots"]["b"]["status"] != "writing"


def test_boot_files_are_streamed_not_held(world):
    """The staged boot files go to the ESP through copy_in (streamed), never read whole."""
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.download()
    seen = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def write_atomic(self, path, data):
            seen.append((path, len(data)))
            return self.inner.write_atomic(path, data)

    dev.esp = Spy(dev.esp)
    dev.apply(now=True)
    assert [p for p, _ in seen if p.startswith("abflip/")] == []  # only the entry went as bytes
    rel = release_of(world, "2.0.0")
    assert (sim.esp / "abflip/2.0.0-b/vmlinuz").stat().st_size == rel.boot.kernel.length


# -- the root the device runs from is the slot its entry named -----------------------------------
def _loop(path: Path) -> str | None:
    if not shutil.which("losetup"):
        return None
    p = subprocess.run(["losetup", "-f", "--show", str(path)], capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None


def test_a_root_that_is_not_the_entrys_slot_is_not_blessed(world, tmp_path):
    import dataclasses

    from applier.config import SlotConfig
    from applier.context import Context

    world.publish("1.0.0")
    sim, dev = agent(world)
    loop = _loop(sim.slot_path("b"))
    if loop is None:
        pytest.skip("no loop device")
    try:
        cfg = dev.config
        dev.config = dataclasses.replace(cfg, slots={**cfg.slots, "b": SlotConfig("b", Path(loop), "root-b")})
        dev.ctx = dataclasses.replace(dev.ctx, root=tmp_path)  # what / is mounted from: not slot b
        world.publish("2.0.0")
        dev.install()
        assert sim.boot().slot == "b"
        with pytest.raises(DeviceError, match="is not slot b"):
            dev.boot_check()
        st = dev.status()
        assert st["rollback"] and st["rollback"]["to_slot"] == "a" and dev.reboots == [1]
        assert sim.boot().slot == "a"
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
