"""Device configuration (issue 5): new keys, discovery through the Context, validation naming
the key and the file; the bandwidth limiter; the systemd units."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from applier.agent import Device
from applier.config import Config, parse_rate
from applier.context import Context
from applier.fetch import RateLimiter
from metadata.errors import DeviceError, UserError

REPO = Path(__file__).resolve().parents[1]

BASE = """\
[repository]
url = "http://127.0.0.1:1/repo"
trusted_root = "root.json"

[device]
product = "demo-os"
"""


def load(tmp_path, text: str) -> Config:
    p = tmp_path / "abflip.toml"
    p.write_text(BASE + text)
    return Config.load(p)


def test_defaults_discover_what_is_not_given(tmp_path):
    cfg = load(tmp_path, "")
    assert cfg.hardware_id == "dmi" and cfg.hardware_id_from_dmi == "product_name"
    assert cfg.slots["a"].device == Path("/dev/disk/by-partlabel/root-a") and cfg.slots["a"].discovered
    assert cfg.slots["b"].partlabel == "root-b"
    assert cfg.esp_auto and cfg.windows == () and cfg.bandwidth_limit == 0
    assert cfg.reboot_command == ("systemctl", "reboot") and cfg.hooks_dir == Path("/etc/abflip/hooks")


def test_agent_keys(tmp_path):
    cfg = load(tmp_path, """
hardware_id = "dmi:board_name"
[slots]
a = { partlabel = "sys-a" }
b = { partlabel = "sys-b" }
[paths]
partlabels = "by-label"
esp = "esp"
[maintenance]
windows = ["Sat 01:00-05:00 Europe/Berlin", "Mon-Fri 23:00-01:00"]
reboot_command = "/sbin/reboot --force"
[network]
bandwidth_limit = "512K"
[hooks]
dir = "hooks"
timeout = 5
""")
    assert cfg.hardware_id_from_dmi == "board_name"
    assert cfg.slots["a"].device == tmp_path / "by-label" / "sys-a"
    assert not cfg.esp_auto and cfg.esp == tmp_path / "esp"
    assert [w.text for w in cfg.windows] == ["Sat 01:00-05:00 Europe/Berlin", "Mon-Fri 23:00-01:00"]
    assert cfg.reboot_command == ("/sbin/reboot", "--force")
    assert cfg.bandwidth_limit == 512 << 10
    assert cfg.hooks_dir == tmp_path / "hooks" and cfg.hook_timeout == 5.0
    dev = Device(cfg)
    assert dev.fetcher.limiter is not None and dev.fetcher.limiter.rate == 512 << 10  # the download seam is limited


@pytest.mark.parametrize("text, key", [
    ('[maintenance]\nwindows = ["Sat 01:00-05:00 Nowhere/Town"]\n', "maintenance.windows[0]"),
    ('[maintenance]\nwindows = "Sat 01:00-05:00"\n', "maintenance.windows"),
    ("[maintenance]\nreboot_command = 3\n", "maintenance.reboot_command"),
    ('[network]\nbandwidth_limit = "fast"\n', "network.bandwidth_limit"),
    ("[network]\nbandwidth_limit = 100\n", "network.bandwidth_limit"),
    ("[hooks]\ntimeout = -1\n", "hooks.timeout"),
    ('[slots]\na = { partlabel = "x" }\nb = { partlabel = "x" }\n', "[slots]"),
    ('[slots]\na = "sda2"\n', "slots.a"),
    ('hardware_id = "dmi:../../etc/passwd"\n', "device.hardware_id"),
])
def test_invalid_keys_are_named_with_the_file(tmp_path, text, key):
    with pytest.raises(UserError) as e:
        load(tmp_path, text)
    assert str(tmp_path / "abflip.toml") in e.value.message and key in e.value.message


def test_missing_and_unparsable_config(tmp_path):
    with pytest.raises(UserError, match="no configuration file"):
        Config.load(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[device\n")
    with pytest.raises(UserError, match="bad.toml"):
        Config.load(tmp_path / "bad.toml")


def test_hardware_id_from_dmi(tmp_path):
    cfg = load(tmp_path, '[paths]\nesp = "esp"\n')
    dmi = tmp_path / "dmi"
    dmi.mkdir()
    (dmi / "product_name").write_text("ACME Box V2\n")
    dev = Device(cfg, ctx=Context(dmi=dmi))
    assert dev.hardware_id == "acme-box-v2"
    (dmi / "product_name").write_text("\n")
    with pytest.raises(DeviceError, match="hardware id from DMI"):
        _ = dev.hardware_id


def test_esp_is_discovered_like_bootctl(tmp_path):
    cfg = load(tmp_path, "")
    efi, boot_efi, boot = tmp_path / "efi", tmp_path / "boot/efi", tmp_path / "boot"
    (boot_efi / "EFI").mkdir(parents=True)
    efi.mkdir()  # exists but holds no EFI/: not the ESP
    dev = Device(cfg, ctx=Context(esp_candidates=(efi, boot_efi, boot)))
    assert dev.esp.root == boot_efi
    with pytest.raises(DeviceError, match="no EFI System Partition found"):
        Device(cfg, ctx=Context(esp_candidates=(efi,)))


def test_parse_rate():
    assert parse_rate(0) == 0 and parse_rate(4096) == 4096
    assert parse_rate("2M") == 2 << 20 and parse_rate("1.5KiB/s") == 1536 and parse_rate("10MB") == 10 << 20
    for bad in ("-1", "x", True, -5, 1.5):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_rate_limiter_sleeps_to_keep_the_rate():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    lim = RateLimiter(100_000, burst=100_000, clock=lambda: now[0], sleep=sleep)
    for _ in range(30):
        lim.consume(10_000)  # 300 kB: the first 100 kB is the burst, the rest at 100 kB/s
    assert now[0] == pytest.approx(2.0, rel=0.01)
    now[0] += 100  # idle for long: the bucket refills only to its burst
    t0 = now[0]
    for _ in range(20):
        lim.consume(10_000)
    assert now[0] - t0 == pytest.approx(1.0, rel=0.01)


UNITS = ("abflip.service", "abflip.timer", "abflip-health.service", "abflip-bless.service")


def test_systemd_units_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is missing (Debian package systemd; .ci/run installs it)")
    exe = str(Path(sys.executable).with_name("abflip"))  # the venv's, whether or not it is on PATH
    assert Path(exe).is_file(), exe
    for name in UNITS:
        text = (REPO / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/abflip", exe))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    health = (REPO / "systemd" / "abflip-health.service").read_text()
    assert "Before=boot-complete.target" in health and "RequiredBy=boot-complete.target" in health
    assert "ExecStart=/usr/local/bin/abflip boot-check --no-bless" in health
    assert "\nRemainAfterExit" not in health  # a health hook's escaped child dies with the run (tests/e2e)
    # the bless waits for the whole boot, and goes before systemd-bless-boot (which then finds it done)
    bless = (REPO / "systemd" / "abflip-bless.service").read_text()
    for line in ("Requires=boot-complete.target", "After=boot-complete.target abflip-health.service",
                 "Before=systemd-bless-boot.service shutdown.target",
                 "ExecStart=/usr/local/bin/abflip mark-good --no-health"):
        assert line in bless, line
    assert "ExecStart=/usr/local/bin/abflip run" in (REPO / "systemd" / "abflip.service").read_text()
    # Persistent= made a boot slower than OnBootSec= skip every pass (tests/e2e/test_device_os.py, scenario 2)
    assert "\nPersistent=" not in (REPO / "systemd" / "abflip.timer").read_text()
    # and the check has teeth: a unit with a missing binary fails
    (tmp_path / "broken.service").write_text("[Service]\nExecStart=/nonexistent/abflip run\n")
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "broken.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 or r.stderr.strip()
