"""The applier as a device agent (issue 5), on simulated devices over real HTTP on 127.0.0.1:
download any time, apply in a maintenance window, reboot, health-check, bless or roll back by
itself; rollback on request; ESP hygiene. The clock is injected."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from abflip.demo import HARDWARE, PRODUCT
from abflip.sim import SimDevice
from applier.agent import Device
from applier.hooks import HookError
from metadata.errors import DeviceError, PolicyError
from helpers import assert_untouched, release_of  # noqa: F401  (re-exported for other tests)

FRIDAY = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
SATURDAY_2AM = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
WINDOWS = ["Sat 01:00-05:00 UTC"]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def agent(world, name="dev", *, windows=WINDOWS, clock=None, hook_timeout=10.0, booted="1.0.0", **kw):
    """A simulated device with slot a on ``booted`` (blessed, marked good) and an agent on it."""
    sim = SimDevice.create(world.tmp / name, repository_url=world.url,
                           trusted_root=(world.repo / "metadata" / "1.root.json").read_bytes(), product=PRODUCT,
                           hardware_id=HARDWARE, slot_size=8 << 20, retries=1, timeout=5.0, windows=windows,
                           hook_timeout=hook_timeout)
    sim.provision(world.built[f"{booted}.img"], slot="a", version=booted, product=PRODUCT)
    reboots = []
    dev = Device(sim.config, clock=clock or Clock(FRIDAY), reboot=lambda: reboots.append(1), **kw)
    dev.mark_good()
    dev.reboots = reboots  # type: ignore[attr-defined]
    return sim, dev


def test_download_any_time_apply_only_in_the_window(world):
    world.publish("1.0.0")
    clock = Clock(FRIDAY)
    sim, dev = agent(world, clock=clock)
    world.publish("2.0.0")
    d = dev.download()
    assert (d.version, d.slot, d.already) == ("2.0.0", "b", False)
    st = dev.status()
    assert st["state"] == "staged" and st["slots"]["b"]["status"] == "staged"
    assert st["next_window"] == {"start": "2026-11-28T01:00:00+00:00", "end": "2026-11-28T05:00:00+00:00",
                                 "open": False}
    assert st["windows"] == WINDOWS
    with pytest.raises(PolicyError, match="outside the maintenance windows.*2026-11-28T01:00"):
        dev.apply()
    assert_untouched(sim, dev)  # staged: written and verified, yet nothing boots it
    assert dev.download().already  # idempotent
    clock.now = SATURDAY_2AM
    assert dev.status()["next_window"]["open"] is True
    a = dev.apply()
    assert (a.version, a.entry) == ("2.0.0", "abflip-2.0.0-b+3.conf")
    assert dev.apply().already
    assert dev.status()["state"] == "pending"
    assert sim.boot().slot == "b"


def test_apply_now_overrides_the_window(world):
    world.publish("1.0.0")
    _sim, dev = agent(world)
    world.publish("2.0.0")
    dev.download()
    assert dev.apply(now=True).entry == "abflip-2.0.0-b+3.conf"


def test_run_is_the_whole_cycle_and_boot_check_commits(world):
    world.publish("1.0.0")
    clock = Clock(FRIDAY)
    sim, dev = agent(world, clock=clock)
    r = dev.run()
    assert r["check"]["available"] is False and "not newer" in r["check"]["reason"] and r["download"] is None
    world.publish("2.0.0")
    r = dev.run()  # outside the window: download only
    assert r["check"]["available"] and r["download"]["version"] == "2.0.0" and r["apply"] is None
    assert r["state"] == "staged" and not r["rebooted"] and dev.reboots == []
    clock.now = SATURDAY_2AM
    r = dev.run()  # in the window: nothing to download again, apply, reboot
    assert r["download"] is None and r["apply"]["entry"] == "abflip-2.0.0-b+3.conf" and r["rebooted"]
    assert dev.reboots == [1]
    assert sim.boot().slot == "b"
    assert dev.run()["skipped"]  # on trial: the timer waits for the health unit
    st = dev.boot_check()
    assert st["state"] == "committed" and st["floor"] == "2.0.0" and st["booted_entry"] == "abflip-2.0.0-b.conf"
    assert sim.boot().slot == "b"
    assert dev.run()["check"]["available"] is False


def test_health_check_failure_rolls_back_by_itself(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    log = sim.root / "health.log"
    sim.add_hook("health-check", "10-app", f'echo "$ABFLIP_VERSION $ABFLIP_SLOT" >> {log}; echo app down; exit 1')
    world.publish("2.0.0")
    dev.install()
    assert sim.boot().slot == "b"
    with pytest.raises(HookError, match="10-app failed.*app down"):
        dev.boot_check()
    assert log.read_text() == "2.0.0 b\n"
    assert dev.reboots == [1]  # it reboots into the old slot by itself
    assert "abflip-2.0.0-b+0-1.conf" in sim.entries()  # tries used up: sorts last
    assert dev.status()["last_error"]["type"] == "HookError"
    assert sim.boot().slot == "a"
    st = dev.boot_check()
    assert st["state"] == "rolled-back" and st["failed_versions"] == ["2.0.0"] and st["floor"] is None
    assert sim.entries() == ["abflip-1.0.0-a.conf"]  # the exhausted entry and its files are gone
    assert not (sim.esp / "abflip" / "2.0.0-b").exists()
    assert dev.check()["available"] is False  # not retried by itself
    r = dev.run()
    assert r["download"] is None and "rolled back on this device before" in r["check"]["reason"]


def test_units_judge_before_boot_complete_and_bless_after(world):
    """What the units run on a trial boot (systemd/): abflip-health.service `boot-check --no-bless`
    before boot-complete.target only judges, so a trial that passes is not blessed until the boot is
    complete; abflip-bless.service `mark-good --no-health` after it blesses and commits without running
    the hooks again. A trial that fails its health check is rolled back by the judging unit itself."""
    world.publish("1.0.0")
    sim, dev = agent(world)
    log = sim.root / "health.log"
    sim.add_hook("health-check", "10-app", f'echo "$ABFLIP_VERSION" >> {log}')
    world.publish("2.0.0")
    dev.install()
    assert sim.boot().slot == "b"
    st = dev.boot_check(bless=False)
    assert st["state"] == "trial" and st["booted_entry"] == "abflip-2.0.0-b+2-1.conf", st  # judged, not blessed
    assert log.read_text() == "2.0.0\n" and dev.reboots == []
    assert dev.run()["skipped"]  # still a trial: the timer does not touch the fallback slot
    st = dev.mark_good(health=False)  # boot-complete.target reached
    assert st["state"] == "committed" and st["floor"] == "2.0.0" and st["booted_entry"] == "abflip-2.0.0-b.conf"
    assert log.read_text() == "2.0.0\n"  # the hooks ran once
    assert dev.boot_check(bless=False)["state"] == "committed"  # later boots: nothing to judge

    world.publish("3.0.0")
    sim.add_hook("health-check", "20-fail", "echo broken; exit 1")
    dev.install()
    assert sim.boot().slot == "a"
    with pytest.raises(HookError, match="20-fail failed.*broken"):
        dev.boot_check(bless=False)
    assert dev.reboots == [1] and "abflip-3.0.0-a+0-1.conf" in sim.entries()
    assert sim.boot().slot == "b"
    st = dev.boot_check(bless=False)
    assert st["state"] == "rolled-back" and st["failed_versions"] == ["3.0.0"] and st["floor"] == "2.0.0"


def test_hanging_health_check_is_a_failure(world):
    world.publish("1.0.0")
    sim, dev = agent(world, hook_timeout=0.5)
    sim.add_hook("health-check", "hang", "sleep 30")
    world.publish("2.0.0")
    dev.install()
    sim.boot()
    with pytest.raises(HookError, match="did not finish within 0.5 s"):
        dev.boot_check()
    assert sim.boot().slot == "a"
    assert dev.status()["state"] == "rolled-back"


def test_mark_good_runs_health_hooks_first(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    hook = sim.add_hook("health-check", "ok", "exit 1")
    world.publish("2.0.0")
    dev.install()
    sim.boot()
    with pytest.raises(HookError):
        dev.mark_good()
    assert dev.status()["state"] == "trial"  # not blessed: systemd-boot still counts
    assert any("+2-1" in e for e in sim.entries())
    hook.write_text("#!/bin/sh\nexit 0\n")
    assert dev.mark_good()["state"] == "committed"


def test_pre_install_hook_failure_changes_nothing(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    sim.add_hook("pre-install", "battery", "echo battery low; exit 1")
    world.publish("2.0.0")
    dev.download()
    with pytest.raises(HookError, match="pre-install hook .*battery"):
        dev.apply(now=True)
    assert_untouched(sim, dev)
    assert dev.status()["state"] == "staged"
    assert not (sim.esp / "abflip" / "2.0.0-b").exists()


def test_post_install_hook_failure_withdraws_the_entry(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    env = sim.root / "env"
    sim.add_hook("post-install", "notify", f"env | grep ^ABFLIP_ | sort > {env}; exit 2")
    world.publish("2.0.0")
    dev.download()
    with pytest.raises(HookError, match="exit status 2"):
        dev.apply(now=True)
    assert_untouched(sim, dev)
    assert dev.status()["state"] == "staged"
    text = env.read_text()
    assert "ABFLIP_HOOK=post-install" in text and "ABFLIP_VERSION=2.0.0" in text and "ABFLIP_SLOT=b" in text


def test_rollback_of_a_committed_update_boots_the_other_slot(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    debian = sim.esp / "loader/entries/debian.conf"
    debian.write_text("title Debian\nlinux /debian/vmlinuz\noptions root=/dev/sda5\n")
    (sim.esp / "debian").mkdir()
    (sim.esp / "debian/vmlinuz").write_bytes(b"debian kernel")
    world.publish("2.0.0")
    dev.install()
    assert sim.boot().slot == "b"
    dev.boot_check()
    assert dev.status()["state"] == "committed"
    st = dev.rollback()
    assert st["action"] == "rollback-on-reboot" and st["rollback"]["to_slot"] == "a"
    assert "abflip-2.0.0-b+0-1.conf" in sim.entries()
    with pytest.raises(PolicyError, match="waits for a reboot"):
        dev.download(allow_downgrade=True)  # slot a is the rollback target: never overwritten now
    assert dev.rollback()["action"] == "already-requested"
    assert sim.boot().slot == "a"
    st = dev.boot_check()
    assert st["state"] == "rolled-back" and st["failed_versions"] == ["2.0.0"] and st["rollback"] is None
    assert st["floor"] == "2.0.0"  # the floor stays: a rollback is not a licence to install old releases
    assert sorted(sim.entries()) == ["abflip-1.0.0-a.conf", "debian.conf"]
    assert debian.read_text().startswith("title Debian") and (sim.esp / "debian/vmlinuz").exists()
    assert sim.boot().slot == "a"


def test_rollback_of_a_pending_update_withdraws_it(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.install()
    st = dev.rollback()
    assert st["action"] == "cancelled-pending" and st["state"] == "rolled-back"
    assert_untouched(sim, dev)
    assert not (sim.esp / "abflip" / "2.0.0-b").exists()


def test_rollback_refused_without_a_verified_other_slot(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    with pytest.raises(DeviceError, match="no verified, bootable system"):
        dev.rollback()
    assert_untouched(sim, dev)


def test_rollback_refused_when_the_other_slot_changed(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.install()
    sim.boot()
    dev.boot_check()
    world.publish("3.0.0")
    dev.install()  # 3.0.0 into slot a, verified
    sim.boot()
    dev.boot_check()
    assert dev.status()["booted_slot"] == "a" and dev.status()["slots"]["b"]["sha256"]
    with open(sim.slot_path("b"), "r+b") as f:
        f.write(b"garbage")
    with pytest.raises(DeviceError, match="no longer matches"):
        dev.rollback()
    assert sim.boot().slot == "a"


def test_esp_hygiene_removes_stale_abflip_entries_only(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    edir = sim.esp / "loader/entries"
    (edir / "abflip-0.5.0-a.conf").write_text("title old\nsort-key abflip\nversion 0.5.0\nlinux /abflip/0.5.0/vmlinuz\n")
    (sim.esp / "abflip/0.5.0").mkdir(parents=True)
    (sim.esp / "abflip/0.5.0/vmlinuz").write_bytes(b"old")
    (edir / "debian.conf").write_text("title Debian\nlinux /vmlinuz\n")
    (edir / "notes.txt").write_text("not an entry\n")
    world.publish("2.0.0")
    dev.install()
    assert sorted(sim.entries()) == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b+3.conf", "debian.conf", "notes.txt"]
    assert sorted(p.name for p in (sim.esp / "abflip").iterdir()) == ["1.0.0", "2.0.0-b"]


# -- faults: each leaves the device booting what it booted ---------------------------------------

def test_apply_with_nothing_staged(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    from metadata.errors import UserError
    with pytest.raises(UserError, match="nothing is staged"):
        dev.apply(now=True)
    assert_untouched(sim, dev)


def test_staged_slot_modified_behind_the_agents_back(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    rel = release_of(world, "2.0.0")
    dev.download()
    ch = rel.image.chunks[1]
    with open(sim.slot_path("b"), "r+b") as f:
        f.seek(ch.out_offset + 100)
        f.write(b"tampered")
    with pytest.raises(DeviceError, match="slot b was modified after 2.0.0 was staged"):
        dev.apply(now=True)
    assert_untouched(sim, dev)
    assert dev.status()["state"] == "downloading"
    d = dev.download()  # repairs: only the damaged chunk onwards is fetched again
    assert d.resumed_at_chunk == 1 and d.bytes_downloaded == rel.image.compressed_size - ch.offset
    dev.apply(now=True)
    assert hashlib.sha256(sim.slot_path("b").read_bytes()[: rel.image.size]).hexdigest() == rel.image.sha256
    assert sim.boot().slot == "b"


def test_esp_missing(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.download()
    sim.esp.rename(sim.root / "esp-away")
    with pytest.raises(DeviceError, match="ESP .* does not exist"):
        dev.apply(now=True)
    assert not sim.esp.exists()  # not created by accident
    (sim.root / "esp-away").rename(sim.esp)
    assert_untouched(sim, dev)


class _TinyEsp:
    """An ESP that reports little room, or runs out of it on the first write of a boot file."""

    def __init__(self, inner, *, free: int | None = None, enospc: bool = False) -> None:
        self.inner, self.free, self.enospc = inner, free, enospc

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def free_bytes(self) -> int:
        return self.free if self.free is not None else self.inner.free_bytes()

    def write_atomic(self, path: str, data: bytes) -> None:
        if self.enospc and path.startswith("abflip/"):
            import errno
            import os
            self.inner.write_atomic(path, data[: len(data) // 2])  # a partial file, as a full disk leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        self.inner.write_atomic(path, data)

    def copy_in(self, path: str, src) -> None:
        from pathlib import Path
        self.write_atomic(path, Path(src).read_bytes())


@pytest.mark.parametrize("kind", ["reported-full", "enospc-mid-write"])
def test_esp_full(world, kind):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.download()
    dev.esp = _TinyEsp(dev.esp, free=4096) if kind == "reported-full" else _TinyEsp(dev.esp, enospc=True)
    with pytest.raises(DeviceError, match="ESP has 4096 bytes free" if kind == "reported-full" else "No space left"):
        dev.apply(now=True)
    assert_untouched(sim, dev)
    assert not (sim.esp / "abflip" / "2.0.0-b").exists()  # no half-written boot files left behind
    assert dev.status()["state"] == "staged"


def test_esp_full_on_a_real_tiny_filesystem(world, tmp_path):
    import shutil
    import subprocess
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.download()
    saved = tmp_path / "esp-saved"
    shutil.copytree(sim.esp, saved)
    shutil.rmtree(sim.esp)
    sim.esp.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(sim.esp)]).returncode:
        shutil.rmtree(sim.esp)
        shutil.copytree(saved, sim.esp)
        pytest.skip("cannot mount a tmpfs here (needs root); test_esp_full covers the seam")
    try:
        shutil.copytree(saved, sim.esp, dirs_exist_ok=True)
        with pytest.raises(DeviceError, match="bytes free"):
            dev.apply(now=True)
        assert_untouched(sim, dev)
    finally:
        subprocess.run(["umount", str(sim.esp)], check=True)


def test_slot_device_missing(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    sim.slot_path("b").unlink()
    with pytest.raises(DeviceError, match="slot b device .* does not exist"):
        dev.download()
    assert_untouched(sim, dev)


def test_slot_device_read_only(world):
    import subprocess
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    if subprocess.run(["chattr", "+i", str(sim.slot_path("b"))], capture_output=True).returncode:
        pytest.skip("chattr +i is not supported here")
    try:
        with pytest.raises(DeviceError, match="slot b device .* cannot be opened for writing"):
            dev.download()
    finally:
        subprocess.run(["chattr", "-i", str(sim.slot_path("b"))], check=True)
    assert_untouched(sim, dev)


def test_booted_slot_unknown_refuses_every_write(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.download()
    sim.cmdline.write_text("ro quiet\n")
    for p in sim.efivars.iterdir():
        p.unlink()
    for op in (dev.download, lambda: dev.apply(now=True), dev.run, dev.rollback, dev.boot_check):
        with pytest.raises(DeviceError, match="cannot tell which slot is booted"):
            op()
    assert dev.status()["booted_slot"] is None
    assert [e for e in sim.entries() if "-b" in e] == []


@pytest.mark.parametrize("when", ["staged", "pending"])
def test_corrupt_state_file_is_refused_then_rebuilt_from_the_boot_loader(world, when):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    rel = release_of(world, "2.0.0")
    dev.download()
    if when == "pending":
        dev.apply(now=True)
    (sim.state_dir / "state.json").write_text("{not json")
    st = dev.status()  # status still answers, from the boot loader
    assert st["state_recovered"] and "not valid JSON" in st["state_invalid"]
    assert st["booted_version"] == "1.0.0" and st["slots"]["b"]["status"] == "unknown"
    with pytest.raises(DeviceError, match="state file is invalid") as e:
        dev.apply(now=True)
    assert "reset-state" in e.value.hint
    assert (sim.state_dir / "state.json").read_text() == "{not json"  # the evidence is not overwritten
    dev.reset_state()
    assert (sim.state_dir / "state.json.invalid").read_text() == "{not json"
    d = dev.download()  # the inactive slot is unknown: staged again from scratch, its entry removed first
    assert d.resumed_at_chunk == 0 and d.bytes_downloaded == rel.image.compressed_size
    assert [e for e in sim.entries() if "-b" in e] == []
    assert sim.boot().slot == "a"
    dev.apply(now=True)
    assert sim.boot().slot == "b"


def test_install_during_trial_is_refused(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.install()
    sim.boot()
    world.publish("3.0.0")
    with pytest.raises(PolicyError, match="on trial"):
        dev.download()
    assert dev.status()["slots"]["a"]["status"] == "good"


def test_slots_discovered_by_partition_label(world):
    import dataclasses

    from applier.config import SlotConfig
    world.publish("1.0.0")
    sim, _dev = agent(world)
    labels = sim.root / "by-partlabel"
    labels.mkdir()
    for s in "ab":
        (labels / f"root-{s}").symlink_to(sim.slot_path(s))
    cfg = dataclasses.replace(sim.config, partlabels=labels,
                              slots={s: SlotConfig(s, labels / f"root-{s}", f"root-{s}", discovered=True) for s in "ab"})
    world.publish("2.0.0")
    dev2 = Device(cfg, clock=Clock(FRIDAY))
    assert dev2.status()["slots"]["b"]["device"] == str(labels / "root-b")
    dev2.install()
    assert sim.boot().slot == "b"


def test_run_applies_what_is_staged_when_the_network_is_down(world):
    from abflip.httpserver import RepoHandler
    from metadata.errors import TransportError

    class Down(RepoHandler):
        def do_GET(self, head=False):
            self.connection.close()

    world.publish("1.0.0")
    clock = Clock(FRIDAY)
    sim, dev = agent(world, clock=clock)
    world.publish("2.0.0")
    assert dev.run()["state"] == "staged"
    world.handler = Down
    with pytest.raises(TransportError):
        dev.run()  # outside the window: nothing to do but report the failure
    clock.now = SATURDAY_2AM
    r = dev.run()
    assert r["apply"]["version"] == "2.0.0" and r["rebooted"] and r["error"]["blame"] == "transport"
    assert sim.boot().slot == "b"
