"""A device's first day (issue 11 item 4): `abflip provision` records the factory image in the
booted slot from its release, on a simulated device over the real CLI; then the device updates
over real HTTP like any other."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from abflip.demo import HARDWARE, PRODUCT
from abflip.sim import SimDevice
from applier.agent import Device
from builder.release import create_release

REPO = Path(__file__).resolve().parents[1]


def abflip(sim: SimDevice, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "abflip.cli", *args, "--config", str(sim.config_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def fresh(world, name: str = "dev", *, hardware_id: str = HARDWARE, flash: str | None = "1.0.0") -> SimDevice:
    """A device as it leaves the flashing station: the image in slot a, nothing on the ESP but
    the loader, no state; booted from slot a (the kernel command line says so)."""
    sim = SimDevice.create(world.tmp / name, repository_url=world.url,
                           trusted_root=(world.repo / "metadata" / "1.root.json").read_bytes(),
                           product=PRODUCT, hardware_id=hardware_id, slot_size=8 << 20, retries=1, timeout=5.0)
    if flash:
        with open(world.built[f"{flash}.img"], "rb") as src, open(sim.slot_path("a"), "r+b") as dst:
            shutil.copyfileobj(src, dst)
    return sim


def snapshot(sim: SimDevice) -> dict[str, bytes]:
    """Every file of the device's ESP and state directory (what 'nothing changed' compares; the
    history is a log of attempts, like the journal, not the device's state)."""
    out = {}
    for base in (sim.esp, sim.state_dir):
        for p in sorted(base.rglob("*")):
            if p.is_file() and p.name not in ("lock", "history.jsonl"):
                out[str(p.relative_to(sim.root))] = p.read_bytes()
    return out


def test_provision_then_boot_then_update(world):
    sim = fresh(world)
    before = Device(sim.config).status()
    assert before["slots"]["a"]["status"] == "unknown" and before["booted_version"] is None

    r = abflip(sim, "provision", str(world.built["1.0.0"]))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("provisioned demo-os 1.0.0 in slot a: image verified"), r.stdout
    assert "entry abflip-1.0.0-a.conf (blessed), floor 1.0.0" in r.stdout
    assert sim.entries() == ["abflip-1.0.0-a.conf"]
    assert sorted(p.name for p in (sim.esp / "abflip" / "1.0.0-a").iterdir()) == ["initrd.img", "vmlinuz"]
    state = json.loads((sim.state_dir / "state.json").read_text())
    release = json.loads((world.built["1.0.0"] / "release.json").read_text())
    assert state["slots"]["a"] == {"version": "1.0.0", "sha256": release["image"]["sha256"], "status": "good",
                                   "size": release["image"]["size"]}
    assert (state["state"], state["floor"], state["slots"]["b"]["status"]) == ("idle", "1.0.0", "unknown")

    booted = sim.boot()  # the systemd-boot model picks the entry abflip wrote
    assert (booted.entry, booted.slot) == ("abflip-1.0.0-a.conf", "a")
    assert "root=PARTLABEL=root-a abflip.slot=a ro" in booted.options
    dev = Device(sim.config)
    st = dev.status()
    assert (st["booted_version"], st["booted_entry"], st["floor"]) == ("1.0.0", "abflip-1.0.0-a.conf", "1.0.0")

    world.publish("2.0.0")
    result = dev.install()
    assert (result.version, result.slot, result.entry) == ("2.0.0", "b", "abflip-2.0.0-b+3.conf")
    assert sim.boot().slot == "b"
    status = dev.mark_good()
    assert (status["state"], status["floor"], status["booted_entry"]) == ("committed", "2.0.0", "abflip-2.0.0-b.conf")
    assert sim.entries() == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b.conf"]


def test_provision_json_and_release_json_path(world):
    sim = fresh(world)
    r = abflip(sim, "provision", str(world.built["1.0.0"] / "release.json"), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["event"] == "result"
    assert {k: result["result"][k] for k in ("version", "slot", "entry", "floor")} == {
        "version": "1.0.0", "slot": "a", "entry": "abflip-1.0.0-a.conf", "floor": "1.0.0"}


def test_slot_not_holding_the_release_is_refused_and_nothing_changes(world):
    sim = fresh(world, flash="1.0.0")
    before = snapshot(sim)
    r = abflip(sim, "provision", str(world.built["2.0.0"]))
    assert r.returncode == 5, r.stderr
    assert "error (device): slot a (" in r.stderr and "does not hold demo-os 2.0.0" in r.stderr
    assert "nothing was changed" in r.stderr
    assert snapshot(sim) == before
    assert not (sim.state_dir / "state.json").exists() and sim.entries() == []


def test_unflashed_slot_is_refused(world):
    sim = fresh(world, flash=None)
    r = abflip(sim, "provision", str(world.built["1.0.0"]))
    assert r.returncode == 5 and "does not hold demo-os 1.0.0" in r.stderr, r.stderr
    assert sim.entries() == []


def test_another_products_release_is_refused(world, tmp_path):
    out = create_release(world.built["1.0.0.img"], tmp_path / "other", product="other-os", version="1.0.0",
                         compatible=[HARDWARE], kernel=world.built["1.0.0"] / "vmlinuz", options="ro",
                         chunk_size=256 << 10, window=256 << 10, created=1700000000)
    sim = fresh(world)
    before = snapshot(sim)
    r = abflip(sim, "provision", str(out.dir))
    assert r.returncode == 2, r.stderr
    assert "error (user): the release is other-os 1.0.0; this device runs demo-os" in r.stderr
    assert snapshot(sim) == before


def test_another_hardwares_release_is_refused(world):
    sim = fresh(world, hardware_id="other-board")
    r = abflip(sim, "provision", str(world.built["1.0.0"]))
    assert r.returncode == 2, r.stderr
    assert "error (user): demo-os 1.0.0 is for demo-board, not this device's hardware other-board" in r.stderr
    assert sim.entries() == [] and not (sim.state_dir / "state.json").exists()


def test_second_provision_is_refused_unless_forced(world):
    sim = fresh(world)
    assert abflip(sim, "provision", str(world.built["1.0.0"])).returncode == 0
    sim.boot()
    before = snapshot(sim)
    r = abflip(sim, "provision", str(world.built["1.0.0"]))
    assert r.returncode == 6, r.stderr
    assert "error (policy): this device is provisioned already: slot a holds 1.0.0 (good, floor 1.0.0)" in r.stderr
    assert "--force" in r.stderr
    assert snapshot(sim) == before
    # Re-flashed with 2.0.0 at the factory: --force records it; the old entry goes.
    with open(world.built["2.0.0.img"], "rb") as src, open(sim.slot_path("a"), "r+b") as dst:
        shutil.copyfileobj(src, dst)
    r = abflip(sim, "provision", str(world.built["2.0.0"]), "--force")
    assert r.returncode == 0, r.stderr
    assert "removed the slot's stale entries: abflip-1.0.0-a.conf" in r.stdout
    assert sim.entries() == ["abflip-2.0.0-a.conf"]
    assert sorted(p.name for p in (sim.esp / "abflip").iterdir()) == ["2.0.0-a"]
    assert sim.boot().entry == "abflip-2.0.0-a.conf"


def test_tampered_boot_file_is_refused(world, tmp_path):
    rel = tmp_path / "release"
    shutil.copytree(world.built["1.0.0"], rel)
    (rel / "vmlinuz").write_bytes(b"not the kernel the manifest names")
    sim = fresh(world)
    r = abflip(sim, "provision", str(rel))
    assert r.returncode == 2, r.stderr
    assert "vmlinuz does not match the release manifest" in r.stderr
    assert sim.entries() == [] and not (sim.esp / "abflip").exists()


def test_slot_other_than_the_booted_one_is_refused(world):
    sim = fresh(world)
    r = abflip(sim, "provision", str(world.built["1.0.0"]), "--slot", "b")
    assert r.returncode == 2, r.stderr
    assert "error (user): --slot b is not the booted slot (a)" in r.stderr


def test_unknown_booted_slot_needs_slot_option(world):
    sim = fresh(world)
    sim.cmdline.write_text("ro quiet\n")  # a factory image booted without abflip.slot= or root=PARTLABEL=
    r = abflip(sim, "provision", str(world.built["1.0.0"]))
    assert r.returncode == 5, r.stderr
    assert "cannot tell which slot holds the factory image" in r.stderr and "--slot a" in r.stderr
    r = abflip(sim, "provision", str(world.built["1.0.0"]), "--slot", "a")
    assert r.returncode == 0, r.stderr
    assert sim.boot().slot == "a"


@pytest.mark.parametrize("what", ["missing", "not-json"])
def test_bad_release_argument(world, tmp_path, what):
    sim = fresh(world)
    path = tmp_path / "release.json"
    if what == "not-json":
        path.write_text("<html>")
    r = abflip(sim, "provision", str(path))
    assert r.returncode == 2, r.stderr
    assert ("does not exist" if what == "missing" else "is not a valid release manifest") in r.stderr
    assert "Traceback" not in r.stderr
