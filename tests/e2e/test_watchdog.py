"""The harness's watchdog (tests/e2e/device.py `Guest._watchdog`), against a stand-in for QEMU: a script that prints
what a guest prints on its serial port. No firmware, no guest: it runs everywhere, in a few seconds."""

from __future__ import annotations

import sys
import types
from datetime import UTC, datetime
from pathlib import Path

import pytest

from . import device as d

# The stand-in: each launch is counted in launches.txt; the first prints the kernel's reset line and then nothing (a
# firmware hung on its warm reset), the second boots and reports; the -rtc argument is kept to check the clock.
FAKE_QEMU = """\
import sys, time
from pathlib import Path
work = Path(sys.argv[1])
n = len(work.joinpath("launches.txt").read_text().splitlines()) if work.joinpath("launches.txt").exists() else 0
rtc = sys.argv[sys.argv.index("-rtc") + 1]
with open(work / "launches.txt", "a") as f:
    f.write(rtc + "\\n")
if n == 0:
    print("[  118.342592] reboot: Restarting system", flush=True)
else:
    print("BdsDxe: starting Boot0001", flush=True)
    print('ABFLIP-STATUS {"state": "committed"}', flush=True)
time.sleep(600)
"""


@pytest.fixture
def guest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    script = tmp_path / "qemu.py"
    script.write_text(FAKE_QEMU)
    launcher = tmp_path / "qemu"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} {script} {tmp_path} \"$@\"\n")
    launcher.chmod(0o755)
    monkeypatch.setattr(d.vm, "QEMU", str(launcher))
    monkeypatch.setattr(d, "RESET_SILENCE_S", 2)
    firmware = types.SimpleNamespace(qemu_args=(), code=tmp_path / "code.fd")
    server = types.SimpleNamespace(httpd=types.SimpleNamespace(server_address=("127.0.0.1", 1)))
    device = types.SimpleNamespace(work=tmp_path, firmware=firmware, vars=tmp_path / "vars.fd", server=server,
                                   layout=types.SimpleNamespace(path=tmp_path / "disk.img"))
    g = d.Guest(device, clock=datetime(2026, 1, 3, 1, 0, tzinfo=UTC), name="1")  # type: ignore[arg-type]
    yield g, tmp_path
    g.close()


def test_a_silent_reset_is_power_cycled_and_the_boot_goes_on(guest) -> None:
    g, work = guest
    _, status = g.wait_status(timeout=60)
    assert status == {"state": "committed"}
    assert g.power_cycles == 1
    launches = (work / "launches.txt").read_text().splitlines()
    assert len(launches) == 2
    assert launches[0].startswith("base=2026-01-03T01:00:00,")
    assert launches[1] > launches[0]  # the clock carried on across the power cycle
    transcript = (work / "serial-1.log").read_text()
    assert transcript.index("Restarting system") < transcript.index("[e2e watchdog]") < transcript.index("BdsDxe")


def test_a_power_cut_stops_the_watchdog(guest) -> None:
    g, work = guest
    g.wait_line(d.RESETTING, timeout=30)
    g.power_cut()
    assert not g._dog.is_alive()
    assert len((work / "launches.txt").read_text().splitlines()) == 1  # nothing started after the cut
    assert g.power_cycles == 0
