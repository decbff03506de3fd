"""Verified boot on the reference device (issue 22): a dm-verity root whose hash the release signs, and a Secure Boot
chain to it, under QEMU on OVMF + systemd-boot, nothing run on the host but the test's repository and its hands.

1. **Verity** (`test_a_verified_root_and_what_a_changed_block_does`): every boot of v1 and v2 mounts
   /dev/mapper/abflip-root, which `veritysetup` opened on the slot with the root hash of the signed manifest
   (status `verified`). One byte of slot b changes after v2 was installed and before its boot (in a padding byte of
   systemd's ELF header, which the kernel's loader ignores): reading it fails, init cannot start, the initrd
   panics, each try reboots, systemd-boot's counter runs out and v1 boots and reports v2 failed. Then one byte of
   the *booted* slot (v1's, slot a) changes: the next read of that file is an I/O error, logged by the kernel, and
   `veritysetup status` says `corrupted`.
2. **Secure Boot** (`test_a_signed_uki_boots_and_a_foreign_one_is_refused`): OVMF's Secure Boot firmware with our
   own PK, KEK and db; systemd-boot and each release's UKI signed by db. The factory's v1 UKI boots (its command
   line, with the root hash, is the one the kernel gets: no slot in it, the initrd finds the slot by the root hash);
   v2's signed UKI installs and commits; v3's UKI, signed by a key db does not hold, is refused by the firmware,
   which stops at its menu; after a power cycle systemd-boot boots v2 by itself, which reports v3 failed.

Evidence, as in test_device_os.py: the serial console (`serial-N.log`) and `abflip status --json` in the guest.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from metadata.manifest import Release

from . import device as d
from . import secureboot as sb
from . import vm
from .test_device_os import (  # noqa: F401 (images: a fixture)
    BOOT_S, UPDATE_S, Scenarios, _first_boot, _wait_guest, _window, images)
from .verified import Verified, build_verified

FIRMWARE_MENU = r"Press any key to enter the Boot Manager Menu"
CORRUPTED = r"device-mapper: verity: \S+: data block \d+ is corrupted"


@pytest.fixture(scope="session")
def verified(images: d.Images) -> Verified:
    if missing := sb.missing_prerequisites():
        pytest.skip("verified boot needs: " + ", ".join(missing))
    v = build_verified(vm.default_cache_dir() / "device", images)
    print(f"\nverified-boot releases: {v.dir} ({v.seconds:.0f} s to build; 0: cached)")
    return v


def _manifest(device: d.Device, name: str) -> Release:
    return Release.from_bytes((device.releases[name].dir / "release.json").read_bytes())


def _file_offset(image: Path, path: str) -> int:
    """Where the first byte of `path` lies in an erofs image (`dump.erofs -e`: its first extent)."""
    out = subprocess.run(["dump.erofs", f"--path={path}", "-e", str(image)], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"^\s*0:\s*0\.\.\s*\d+\s*\|\s*\d+\s*:\s*(\d+)\.\.", out, re.M)
    assert m, out
    return int(m.group(1))


def _flip(g: d.Guest, slot: str, offset: int) -> None:
    """One byte of the slot's partition changed, written through to the disk (as a write to the partition would)."""
    g.sh(f"printf X | dd of=/dev/disk/by-partlabel/root-{slot} bs=1 seek={offset} conv=notrunc,fsync status=none")


def _assert_verified_root(g: d.Guest, release: Release, slot: str) -> str:
    """/ is the verity mapping on `slot`, opened with the release's root hash, and nothing has failed it yet."""
    assert g.sh("findmnt -n -o SOURCE /")[1].strip() == "/dev/mapper/abflip-root"
    status = g.sh("veritysetup status abflip-root")[1]
    v = release.image.verity
    assert re.search(r"status:\s+verified", status), status
    assert re.search(rf"root hash:\s+{v.root_hash}", status), status
    assert re.search(rf"data device:\s+/dev/vda{'23'['ab'.index(slot)]}", status), status
    assert g.sh("ls /sys/block/$(basename $(readlink -f /dev/mapper/abflip-root))/slaves")[1].split() == \
        [f"vda{'23'['ab'.index(slot)]}"]
    cmdline = g.sh("cat /proc/cmdline")[1]
    assert f"abflip.verity={v.root_hash}" in cmdline, cmdline
    return cmdline


def _verity(device: d.Device) -> None:
    v1, v2 = _manifest(device, "v1-verity"), _manifest(device, "v2-verity")
    device.publish("v2-verity")
    g = device.power_on(clock=_window(-7200))  # the window stays closed: the timer downloads, the test applies
    i, _ = _first_boot(g)
    g.wait_shell(timeout=BOOT_S)
    _assert_verified_root(g, v1, "a")
    _wait_guest(g, "v2 staged", lambda: g.status()["state"] == "staged", timeout=UPDATE_S)
    g.sh("while systemctl -q is-active abflip.service; do sleep 1; done; systemctl stop abflip.timer", timeout=300)
    rc, out = g.abflip("apply --now")
    assert rc == 0 and "next boot tries abflip-2.0.0-b+2.conf" in out, out
    entry = g.sh("cat /efi/loader/entries/abflip-2.0.0-b+2.conf")[1]
    assert (f"options root=/dev/mapper/abflip-root abflip.verity={v2.image.verity.root_hash} "
            f"abflip.verity.salt={v2.image.verity.salt}") in entry and "abflip.verity.data=PARTLABEL=root-b" in entry
    # after the install, before its boot: a byte the ELF loader ignores (e_ident padding) in systemd's binary
    _flip(g, "b", _file_offset(device.releases["v2-verity"].image, "/usr/lib/systemd/systemd") + 10)
    assert g.status()["state"] == "pending"  # abflip verified the slot when it wrote it; nothing re-reads it now
    g.send("systemctl reboot")
    i, st = g.wait_status(after=i + 1, timeout=3 * BOOT_S)
    assert (st["state"], st["booted_slot"], st["booted_version"], st["floor"], st["failed_versions"]) == (
        "rolled-back", "a", "1.0.0", "1.0.0", ["2.0.0"]), st  # fmt: skip
    assert g.boots() == 2  # v2 never reached systemd: both tries ended in the initrd
    assert len(g.grep(CORRUPTED)) >= 2, g.tail(200)  # a data block of slot b, on each try
    assert len(g.grep(r"Rebooting automatically due to panic=|Kernel panic")) >= 2, g.tail(200)
    g.wait_shell(timeout=BOOT_S)
    _assert_verified_root(g, v1, "a")
    history = g.abflip("history")[1]
    assert "rolled back: 2.0.0 failed" in history, history
    # a byte of the booted slot (v1, slot a) changes: the file that holds it cannot be read any more
    licence = "/usr/share/common-licenses/GPL-3"
    g.sh(f"cat {licence} > /dev/null")
    _flip(g, "a", _file_offset(device.releases["v1-verity"].image, licence) + 100)
    g.sh("echo 3 > /proc/sys/vm/drop_caches")
    rc, out = g.sh(f"cat {licence} > /dev/null", check=False)
    assert rc != 0 and "Input/output error" in out, out
    assert re.search(CORRUPTED, g.journal("-k", "-b", "0", "-o", "cat")), g.journal("-k", "-b", "0")[-3000:]
    assert re.search(r"status:\s+corrupted", g.sh("veritysetup status abflip-root")[1])
    g.send("systemctl poweroff")
    g.wait_exit(timeout=180)


def _apply_and_reboot(g: d.Guest, version: str, slot: str) -> None:
    """The operator's `abflip apply --now` of what the timer staged (the window stays closed), then a reboot."""
    _wait_guest(g, f"{version} staged", lambda: (lambda s: s["state"] == "staged" and s["target"]["version"] == version)(
        g.status()), timeout=UPDATE_S)
    g.sh("while systemctl -q is-active abflip.service; do sleep 1; done; systemctl stop abflip.timer", timeout=300)
    rc, out = g.abflip("apply --now")
    assert rc == 0 and f"next boot tries abflip-{version}-{slot}+2.conf" in out, out
    g.send("systemctl reboot")


def _secure_boot(device: d.Device) -> None:
    v1, v2 = _manifest(device, "v1-sb"), _manifest(device, "v2-sb")
    device.publish("v2-sb")
    g = device.power_on(clock=_window(-7200))
    i, _ = _first_boot(g)  # the factory's entry booted v1's signed UKI; its initrd found slot a by the root hash
    g.wait_shell(timeout=BOOT_S)
    sb_var = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
    assert g.sh(f"od -An -tu1 -j4 {sb_var}")[1].split() == ["1"]  # Secure Boot is on
    cmdline = _assert_verified_root(g, v1, "a")
    assert "abflip.slot" not in cmdline and "abflip.verity.data=" not in cmdline, cmdline  # the UKI's own line
    _apply_and_reboot(g, "2.0.0", "b")
    i, st = g.wait_status(after=i + 1, timeout=BOOT_S)
    assert (st["state"], st["booted_slot"], st["booted_version"]) == ("committed", "b", "2.0.0"), st
    g.wait_shell(timeout=BOOT_S)
    cmdline = _assert_verified_root(g, v2, "b")
    entry = g.sh("cat /efi/loader/entries/abflip-2.0.0-b.conf")[1]
    assert "abflip.verity.data=PARTLABEL=root-b" in entry and "abflip.verity.data=" not in cmdline  # ignored
    # v3's UKI is signed, but not by a key in db
    device.publish("v3-sb-foreign")
    _apply_and_reboot(g, "3.0.0", "a")
    refused = r"Error loading \\abflip\\3\.0\.0-a\\uki\.efi: Access Denied"
    j, _ = g.wait_line(refused, after=i, timeout=BOOT_S)
    g.wait_line(FIRMWARE_MENU, after=j, timeout=BOOT_S)
    assert len(g.grep(refused)) == 2, g.tail(40)  # each try, refused
    g.power_cut()  # the firmware waits at its menu: a power cycle (a watchdog, on a device in the field)
    g = device.power_on(clock=_window(-3600))
    _, st = g.wait_status(timeout=BOOT_S)
    assert (st["state"], st["booted_slot"], st["booted_version"], st["failed_versions"]) == (
        "rolled-back", "b", "2.0.0", ["3.0.0"]), st  # fmt: skip
    assert st["booted_entry"] == "abflip-2.0.0-b.conf" and st["floor"] == "2.0.0", st
    g.wait_shell(timeout=BOOT_S)
    _assert_verified_root(g, v2, "b")


SCENARIOS = {"test_a_verified_root_and_what_a_changed_block_does": (_verity, None),
             "test_a_signed_uki_boots_and_a_foreign_one_is_refused": (_secure_boot, "v1-sb")}


class Runs(Scenarios):
    """Both scenarios at once in background threads, as test_device_os.py runs its own (two TCG guests, one vCPU
    each: the machine's two cores), started when the first test asks; each test waits for its own and re-raises
    what it raised."""

    def __init__(self, images: d.Images, verified: Verified, tmp: pytest.TempPathFactory, wanted: list[str]) -> None:
        self.verified = verified
        super().__init__(images, tmp, wanted)

    def _device(self, name: str, images: d.Images, work: Path) -> tuple[Callable[[d.Device], None], d.Device]:
        fn, secure = SCENARIOS[name]
        kw = dict(factory=secure, firmware=self.verified.firmware) if secure else dict(factory="v1-verity")
        return fn, d.Device(work, images, releases=self.verified.releases, **kw)


@pytest.fixture(scope="session")
def runs(images: d.Images, verified: Verified, tmp_path_factory: pytest.TempPathFactory,
         request: pytest.FixtureRequest) -> Iterator[Runs]:
    wanted = [item.name for item in request.session.items if item.name in SCENARIOS]
    r = Runs(images, verified, tmp_path_factory, wanted)
    yield r
    r.pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.e2e
def test_a_verified_root_and_what_a_changed_block_does(runs: Runs) -> None:
    """Scenario 1 (`_verity`): v1 and v2 on a verity root; a byte changed before v2's boot falls back to v1; a byte
    changed under the running v1 reads as an I/O error."""
    runs.result("test_a_verified_root_and_what_a_changed_block_does")


@pytest.mark.e2e
def test_a_signed_uki_boots_and_a_foreign_one_is_refused(runs: Runs) -> None:
    """Scenario 2 (`_secure_boot`): Secure Boot with our keys; signed UKIs boot, a foreign one is refused."""
    runs.result("test_a_signed_uki_boots_and_a_foreign_one_is_refused")
