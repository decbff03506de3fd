"""The device as a real OS (issue 19): abflip inside a booted Debian 12, under its own units, on OVMF + systemd-boot.

Each scenario flashes a reference device (tests/e2e/device.py: GPT disk, v1 in slot a, the factory's release
directory on the data partition), serves a repository on 127.0.0.1 that the guest reaches over QEMU user
networking, and powers the guest on. Nothing runs abflip on the host: the first boot provisions itself
(`abflip-factory.service`), the timer runs `abflip run`, which reboots the guest itself, systemd-boot picks the next
boot, `abflip-health.service` judges it and `abflip-bless.service` blesses it after boot-complete.target. The test
reads the guest's serial console and, through a root shell on its second serial port, its own `abflip status
--json` and journal.

The guest's clock (QEMU `-rtc base=`) is set relative to the maintenance window of the test configuration
(`Sat 01:00-05:00 UTC`): before it where the scenario shows a download outside the window, inside it elsewhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from . import device as d
from . import vm
from .test_update_scenarios import ThrottledHandler

BOOT_S = 300  # one boot to the end of the report unit: ~60-90 s under TCG, more on a loaded machine
UPDATE_S = 900  # first boot + download of ~70 MB + apply + reboot + the trial boot


def _skip_reason() -> str | None:
    missing = d.missing_prerequisites()
    if missing:
        return "the reference device needs: " + ", ".join(missing)
    if os.geteuid() != 0:
        return "the reference device is built with debootstrap and chroot: needs root"
    return None


@pytest.fixture(scope="session")
def images() -> d.Images:
    if reason := _skip_reason():
        pytest.skip(reason)
    images = d.build_images(vm.default_cache_dir() / "device")
    print(f"\nreference device images: {images.dir} (base {images.base.seconds:.0f} s, "
          f"images {images.seconds:.0f} s to build; 0: cached) sizes {images.sizes}")
    return images


class Scenarios:
    """Runs the scenarios' devices in background threads, `ABFLIP_E2E_VMS` (default 2) at a time: each guest is one
    TCG vCPU, and the machine has two cores. Started when the first scenario test asks, for every scenario test
    selected in this session (longest first); each test then waits for its own and re-raises what it raised, with
    the scenario's own traceback."""

    def __init__(self, images: d.Images, tmp: pytest.TempPathFactory, wanted: list[str]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.timings: dict[str, float] = {}
        workers = max(1, int(os.environ.get("ABFLIP_E2E_VMS", "2")))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="device")
        # the directories are made here, in this thread: pytest's tmp_path_factory is not thread-safe (two threads
        # making its base directory at once: one removed the other's)
        self.futures = {name: self.pool.submit(self._run, name, images, tmp.mktemp(name)) for name in wanted}

    def _device(self, name: str, images: d.Images, work: Path) -> tuple[Callable[[d.Device], None], d.Device]:
        fn, throttled, _ = SCENARIOS[name]
        return fn, d.Device(work, images, handler=type("Throttled", (ThrottledHandler,), {}) if throttled else None)

    def _run(self, name: str, images: d.Images, work: Path) -> None:
        fn, dev = self._device(name, images, work)
        t0 = time.monotonic()
        try:
            fn(dev)
        finally:
            self.timings[name] = time.monotonic() - t0
            dev.close()

    def result(self, name: str) -> None:
        try:
            self.futures[name].result()
        finally:
            print(f"\n{name}: {self.timings.get(name, 0):.0f} s")


@pytest.fixture(scope="session")
def scenarios(images: d.Images, tmp_path_factory: pytest.TempPathFactory,
              request: pytest.FixtureRequest) -> Iterator[Scenarios]:
    wanted = [item.name for item in request.session.items if item.name in SCENARIOS]
    wanted.sort(key=lambda n: -SCENARIOS[n][2])
    runner = Scenarios(images, tmp_path_factory, wanted)
    yield runner
    runner.pool.shutdown(wait=True, cancel_futures=True)


def _window(offset_s: float):
    """The guest clock `offset_s` seconds after the window opens (negative: before it)."""
    return d.last_window_start() + timedelta(seconds=offset_s)


def _first_boot(g: d.Guest) -> tuple[int, dict]:
    """The factory's first boot: provisioned v1 from the data partition, the factory entry gone."""
    i, st = g.wait_status(timeout=BOOT_S)
    assert (st["state"], st["booted_slot"], st["booted_version"], st["floor"]) == ("idle", "a", "1.0.0", "1.0.0"), st
    assert [e["file"] for e in st["entries"]] == ["abflip-1.0.0-a.conf"], st
    assert st["slots"]["a"]["status"] == "good" and st["slots"]["a"]["sha256"], st
    assert st["hardware_id"] == d.HARDWARE, st
    return i, st


def _escapees(g: d.Guest) -> list[str]:
    """Pids of the health hook's escaped child (`sleep 3601`) still alive in the guest (no procps there)."""
    out = g.sh("for p in /proc/[0-9]*; do [ \"$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\" = 'sleep 3601 ' ] && "
               "echo ${p#/proc/}; done; true")[1]
    return out.split()


def _journal_lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def _unattended_update(device: d.Device) -> None:
    """Scenario 1: the timer fires; the download runs in the background (Nice=10, idle I/O class) outside the
    maintenance window and stops at `staged`; the window opens (the test moves the guest's clock to its start, as
    time would); the next pass applies and abflip reboots the guest; systemd-boot boots v2 on trial;
    abflip-health.service judges it, abflip-bless.service blesses it after boot-complete.target and
    systemd-bless-boot.service then finds nothing to do; a health hook's escaped child is gone; status says
    committed on v2."""
    device.publish("v2")
    t0 = time.monotonic()
    g = device.power_on(clock=_window(-3600))  # an hour before the window
    i, _ = _first_boot(g)
    boot1 = time.monotonic() - t0
    g.wait_shell(timeout=BOOT_S)
    staged = _wait_guest(g, "v2 staged", lambda: (lambda s: s if s["state"] == "staged" else None)(g.status()),
                         timeout=UPDATE_S)
    assert staged["next_window"]["open"] is False and staged["slots"]["b"]["status"] == "staged", staged
    downloaded = time.monotonic() - t0
    _wait_guest(g, "a pass that found v2 staged", lambda: any(
        p.startswith("staged; applied in the next maintenance window") for p in _passes(g)), timeout=120)
    props = g.sh("systemctl show abflip.service -p Nice -p IOSchedulingClass")[1]
    assert "Nice=10" in props and "IOSchedulingClass=3" in props, props  # 3: idle
    g.sh(f"date -u -s @{int(_window(2).timestamp())} >/dev/null")  # the window opens
    i, st = g.wait_status(after=i + 1, timeout=UPDATE_S)
    update = time.monotonic() - t0
    assert (st["state"], st["booted_slot"], st["booted_version"], st["floor"]) == ("committed", "b", "2.0.0", "2.0.0"), st
    assert st["booted_entry"] == "abflip-2.0.0-b.conf" and st["pending_entry"] is None, st
    assert g.boots() == 2
    # the health check ran on the trial boot only, and its escaped child did not outlive abflip-health.service
    assert [x.split("ABFLIP-HEALTH ", 1)[1] for x in g.grep(r"ABFLIP-HEALTH version=")] == ["version=2.0.0 slot=b"]
    g.wait_shell(timeout=BOOT_S)
    assert _escapees(g) == []
    g.sh("setsid -f sleep 3601 </dev/null >/dev/null 2>&1")  # the check sees one when there is one
    assert len(_escapees(g)) == 1
    g.sh("kill " + _escapees(g)[0])
    prev = g.journal("-b", "-1", "-o", "cat", "-u", "abflip.service")
    assert "applied 2.0.0: next boot tries abflip-2.0.0-b+2.conf\nrebooting" in prev, prev  # said, then rebooted
    now = g.journal("-b", "0", "-o", "short-monotonic", "-u", "abflip-health.service", "-u", "abflip-bless.service",
                    "-u", "systemd-bless-boot.service", "-u", "boot-complete.target")
    order = [n for n in ("Finished abflip-health.service", "Reached target boot-complete.target",
                         "Finished abflip-bless.service", "Finished systemd-bless-boot.service")
             if any(n in line for line in now.splitlines())]
    assert order == ["Finished abflip-health.service", "Reached target boot-complete.target",
                     "Finished abflip-bless.service", "Finished systemd-bless-boot.service"], now
    lines = now.splitlines()
    pos = {n: next(k for k, line in enumerate(lines) if n in line) for n in order}
    assert pos[order[0]] < pos[order[1]] < pos[order[2]] < pos[order[3]], now
    g.sh("while systemctl list-jobs --no-legend | grep -q .; do sleep 1; done", timeout=BOOT_S)  # bootup finished
    print("\nscenario 1, the v2 boot: " + g.sh("systemd-analyze", check=False)[1].strip().splitlines()[0])
    final = g.status()
    assert [e["file"] for e in final["entries"]] == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b.conf"], final
    assert final["state"] == "committed" and final["last_error"] is None, final
    g.send("systemctl poweroff")
    g.wait_exit(timeout=180)
    assert device.entries() == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b.conf"]
    print(f"\nscenario 1: first boot {boot1:.0f} s, v2 staged at {downloaded:.0f} s, committed at {update:.0f} s")


def _passes(g: d.Guest, boot: str = "0") -> list[str]:
    """What each `abflip run` of a boot printed (the timer's passes), from the guest's journal."""
    out = g.journal("-b", boot, "-o", "cat", "-u", "abflip.service")
    return [line for line in out.splitlines() if line and not line.startswith(("Starting ", "Finished ", "abflip.service"))]


def _wait_guest(g: d.Guest, what: str, predicate, *, timeout: float, every: float = 5.0):
    """Poll `predicate()` (through the guest's shell) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            _, units = g.sh("systemctl list-jobs --no-pager; systemctl status --no-pager -l abflip.timer abflip.service; "
                            "journalctl -b 0 --no-pager -o short-monotonic -u abflip.service | tail -40", check=False)
            raise AssertionError(f"the guest did not reach {what} within {timeout:.0f} s\n{units}\n{g.tail(30)}")
        time.sleep(every)


def _health_failure(device: d.Device) -> None:
    """Scenario 2: v2's own health hook fails: abflip-health.service marks its entry bad and reboots; v1 boots; v1's
    status reports v2 failed, the floor unchanged; systemd-bless-boot never blessed v2; the timer does not retry v2;
    v3, published later, installs and commits."""
    device.publish("v2-bad")
    g = device.power_on(clock=_window(30))  # in the window: applied as soon as it is staged
    i, _ = _first_boot(g)
    i, st = g.wait_status(after=i + 1, timeout=UPDATE_S + BOOT_S)
    assert g.boots() == 3, g.grep("Linux version")
    assert (st["state"], st["booted_slot"], st["booted_version"], st["floor"], st["failed_versions"]) == (
        "rolled-back", "a", "1.0.0", "1.0.0", ["2.0.0"]), st  # fmt: skip
    assert st["slots"]["b"]["status"] == "bad" and st["rollback"] is None, st
    assert [e["file"] for e in st["entries"]] == ["abflip-1.0.0-a.conf"], st  # the bad entry pruned
    assert [x.split("ABFLIP-", 1)[1] for x in g.grep(r"ABFLIP-HEALTH")] == [
        "HEALTH version=2.0.0 slot=b", "HEALTH-FAILS version=2.0.0"]
    g.wait_shell(timeout=BOOT_S)
    trial = g.journal("-b", "-1", "-o", "cat", "-u", "abflip-health.service", "-u", "abflip-bless.service",
                      "-u", "systemd-bless-boot.service", "-u", "boot-complete.target")
    # the reason is in the trial's journal: abflip reports, then reboots (the reboot stops the unit)
    assert "health-check hook /etc/abflip/hooks/health-check.d/50-e2e failed" in trial, trial
    assert "this image fails its health check" in trial, trial
    assert "Reached target boot-complete.target" not in trial, trial
    for unit in ("abflip-bless.service", "systemd-bless-boot.service"):
        assert f"Finished {unit}" not in trial and f"Starting {unit}" not in trial, trial  # nobody blessed it
    # the timer keeps running on v1 and does not take 2.0.0 again
    passes = _wait_guest(g, "two timer passes", lambda: [p for p in _passes(g) if p.startswith("no update:")][1:],
                         timeout=180)
    assert all("was rolled back on this device before" in p for p in passes), _passes(g)
    st = g.status()
    assert (st["state"], st["slots"]["b"]["status"], st["target"]["version"]) == ("rolled-back", "bad", "2.0.0"), st
    # a later release installs: v3 into slot b, trial, committed
    device.publish("v3")
    i, st = g.wait_status(after=i + 1, timeout=UPDATE_S)
    assert (st["state"], st["booted_slot"], st["booted_version"], st["floor"], st["failed_versions"]) == (
        "committed", "b", "3.0.0", "3.0.0", ["2.0.0"]), st  # fmt: skip
    assert g.boots() == 4


def _boot_never_completes(device: d.Device) -> None:
    """Scenario 3: a unit of v2 that boot-complete.target requires hangs. abflip's health hook passes, but the bless
    waits for boot-complete.target, which is never reached: the boot-complete timeout reboots, each boot burns a
    try, systemd-boot then boots v1 by itself, and abflip on v1 records v2 as failed."""
    device.publish("v2-hang")
    g = device.power_on(clock=_window(30))
    i, _ = _first_boot(g)
    i, st = g.wait_status(after=i + 1, timeout=UPDATE_S + 3 * BOOT_S)
    assert g.boots() == 4, g.grep("Linux version")  # v1, v2 (try 1), v2 (try 2), v1 (systemd-boot's fallback)
    assert [x.split("ABFLIP-", 1)[1] for x in g.grep(r"ABFLIP-(HANG|HEALTH)")] == [
        "HEALTH version=2.0.0 slot=b", "HANG version=2.0.0"] * 2 or sorted(
        x.split("ABFLIP-", 1)[1] for x in g.grep(r"ABFLIP-(HANG|HEALTH)")) == sorted(
        ["HEALTH version=2.0.0 slot=b", "HANG version=2.0.0"] * 2), g.grep("ABFLIP-")  # fmt: skip
    assert (st["state"], st["booted_slot"], st["booted_version"], st["floor"], st["failed_versions"]) == (
        "rolled-back", "a", "1.0.0", "1.0.0", ["2.0.0"]), st  # fmt: skip
    assert st["booted_entry"] == "abflip-1.0.0-a.conf", st
    g.wait_shell(timeout=BOOT_S)
    last_trial = g.journal("-b", "-1", "-o", "cat")
    assert "Job boot-complete.target/start timed out" in last_trial, last_trial[-3000:]
    assert "Finished abflip-bless.service" not in last_trial and "Finished systemd-bless-boot" not in last_trial
    assert "Finished abflip-health.service" in last_trial  # judged healthy, yet never blessed


def _power_cuts(device: d.Device) -> None:
    """Scenario 4: the QEMU process is killed while the guest downloads v2 (a slow link), and again after
    `abflip apply` wrote v2's entry but before any reboot. After the first power-on v1 boots and the download
    resumes at the chunk it reached; after the second, systemd-boot tries v2 and the update completes."""
    handler = device.server.httpd.RequestHandlerClass
    handler.delay = 0.08  # 64 KiB pieces: ~0.8 MB/s, the ~70 MB image takes ~90 s
    device.publish("v2")
    g = device.power_on(clock=_window(-7200))  # the window stays closed: nothing is applied by the timer
    _first_boot(g)
    g.wait_shell(timeout=BOOT_S)

    def downloading():
        st = g.status()
        return st if st["state"] == "downloading" and (st["target"] or {}).get("chunks_done", 0) >= 2 else None

    cut = _wait_guest(g, "a download two chunks in", downloading, timeout=UPDATE_S, every=2)
    g.power_cut()
    done_at_cut = cut["target"]["chunks_done"]
    total = cut["target"]["chunks_total"]
    assert done_at_cut < total, cut
    handler.delay = 0.0

    g = device.power_on(clock=_window(-6000))
    i, st = g.wait_status(timeout=BOOT_S)
    assert (st["booted_slot"], st["booted_version"]) == ("a", "1.0.0"), st
    assert st["state"] in ("downloading", "staged"), st
    g.wait_shell(timeout=BOOT_S)
    staged = _wait_guest(g, "v2 staged", lambda: (lambda s: s if s["state"] == "staged" else None)(g.status()),
                         timeout=UPDATE_S)
    assert staged["slots"]["b"]["status"] == "staged", staged
    line = next(p for p in _passes(g) if p.startswith("staged 2.0.0 in slot b"))
    resumed = int(line.rsplit("resumed at chunk ", 1)[1].rstrip(")"))
    assert done_at_cut <= resumed < total, line  # at most the chunk in flight (and the read-ahead) again

    g.sh("while systemctl -q is-active abflip.service; do sleep 1; done; systemctl stop abflip.timer", timeout=300)
    rc, out = g.abflip("apply --now")
    assert rc == 0 and "next boot tries abflip-2.0.0-b+2.conf" in out, out
    g.power_cut()  # before any reboot

    g = device.power_on(clock=_window(-5000))
    i, st = g.wait_status(timeout=BOOT_S)
    assert (st["state"], st["booted_slot"], st["booted_version"], st["floor"]) == ("committed", "b", "2.0.0", "2.0.0"), st
    assert [x.split("ABFLIP-", 1)[1] for x in g.grep(r"ABFLIP-HEALTH")] == ["HEALTH version=2.0.0 slot=b"]


def _cancel_boot_complete(g: d.Guest) -> None:
    """The operator stops the boot-complete timeout of a boot that will not complete (the hang unit)."""
    g.sh("for i in $(seq 30); do j=$(systemctl list-jobs --no-legend | awk '$2 == \"boot-complete.target\" "
         "{print $1}'); [ -n \"$j\" ] && systemctl cancel $j && exit 0; sleep 1; done; exit 1", timeout=60)


def _operator_verbs(device: d.Device) -> None:
    """Scenario 5: v2's boot does not complete by itself (a unit hangs), so nothing blesses it; the operator stops
    the boot-complete timeout and runs `abflip mark-good`: the health hooks run and the entry is blessed, and the
    next real boot is v2 from its blessed entry. Then `abflip rollback`: the next real boot is v1, systemd-boot's
    own choice, and abflip reports v2 rolled back."""
    device.publish("v2-hang")
    g = device.power_on(clock=_window(30))
    i, _ = _first_boot(g)
    boot = g.wait_shell(timeout=BOOT_S)
    i, _ = g.wait_line(r"ABFLIP-HANG version=2.0.0", after=i, timeout=UPDATE_S)
    boot = g.wait_shell(timeout=BOOT_S, not_boot=boot)
    _cancel_boot_complete(g)
    st = g.status()
    assert (st["state"], st["booted_entry"]) == ("trial", "abflip-2.0.0-b+1-1.conf"), st
    rc, out = g.abflip("mark-good --json")
    assert rc == 0, out
    st = g.status()
    assert (st["state"], st["floor"], st["booted_entry"]) == ("committed", "2.0.0", "abflip-2.0.0-b.conf"), st
    assert len(g.grep(r"ABFLIP-HEALTH version=2.0.0")) == 2  # abflip-health.service's judgement, then mark-good's
    g.send("systemctl reboot")
    i = g.wait_boot(after=i + 1, timeout=BOOT_S)
    i, _ = g.wait_line(r"ABFLIP-HANG version=2.0.0", after=i, timeout=BOOT_S)
    boot = g.wait_shell(timeout=BOOT_S, not_boot=boot)
    _cancel_boot_complete(g)
    st = g.status()
    assert (st["state"], st["booted_slot"], st["booted_entry"]) == ("committed", "b", "abflip-2.0.0-b.conf"), st
    assert g.sh("cat /sys/firmware/efi/efivars/LoaderBootCountPath-* 2>/dev/null | wc -c")[1].strip() == "0"
    rc, out = g.abflip("rollback --json")
    assert rc == 0 and '"action": "rollback-on-reboot"' in out, out
    g.send("systemctl reboot")
    i = g.wait_boot(after=len(g.lines), timeout=BOOT_S)
    i, st = g.wait_status(after=i, timeout=BOOT_S)
    assert (st["state"], st["booted_slot"], st["booted_version"], st["failed_versions"]) == (
        "rolled-back", "a", "1.0.0", ["2.0.0"]), st  # fmt: skip
    assert st["booted_entry"] == "abflip-1.0.0-a.conf" and st["floor"] == "2.0.0", st  # the floor is not lowered


#: test name -> (scenario, throttled repository, expected minutes: the longest start first)
SCENARIOS = {
    "test_unattended_update": (_unattended_update, False, 8),
    "test_health_failure_rolls_back_and_a_later_release_installs": (_health_failure, False, 12),
    "test_boot_that_never_completes_falls_back_by_itself": (_boot_never_completes, False, 15),
    "test_power_cuts_during_download_and_before_reboot": (_power_cuts, True, 9),
    "test_operator_mark_good_and_rollback": (_operator_verbs, False, 10),
}


@pytest.mark.e2e
def test_unattended_update(scenarios: Scenarios) -> None:
    """Scenario 1 (`_unattended_update`): timer, background download, window, abflip's reboot, trial, bless."""
    scenarios.result("test_unattended_update")


@pytest.mark.e2e
def test_health_failure_rolls_back_and_a_later_release_installs(scenarios: Scenarios) -> None:
    """Scenario 2 (`_health_failure`): v2's health hook fails, v1 boots, v2 not retried, v3 installs."""
    scenarios.result("test_health_failure_rolls_back_and_a_later_release_installs")


@pytest.mark.e2e
def test_boot_that_never_completes_falls_back_by_itself(scenarios: Scenarios) -> None:
    """Scenario 3 (`_boot_never_completes`): a unit of v2 hangs; the counter runs out; v1 boots by itself."""
    scenarios.result("test_boot_that_never_completes_falls_back_by_itself")


@pytest.mark.e2e
def test_power_cuts_during_download_and_before_reboot(scenarios: Scenarios) -> None:
    """Scenario 4 (`_power_cuts`): QEMU killed mid-download and after apply; resume; the update completes."""
    scenarios.result("test_power_cuts_during_download_and_before_reboot")


@pytest.mark.e2e
def test_operator_mark_good_and_rollback(scenarios: Scenarios) -> None:
    """Scenario 5 (`_operator_verbs`): `abflip mark-good` and `abflip rollback` in the guest, then real boots."""
    scenarios.result("test_operator_mark_good_and_rollback")
