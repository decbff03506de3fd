"""What OVMF's Secure Boot (2022.11) and systemd-boot 252 do with signed and unsigned UKIs (issue 22), on the
stand-in OS: our own PK, KEK and db enrolled (tests/e2e/secureboot.py), systemd-boot and the UKIs signed by the db
key with `sbsign`, UKIs built by abflip's own builder (builder/uki.py).

The facts the design relies on (docs/device.md "Secure Boot"):
1. The chain starts at the firmware: a systemd-boot not signed by db is refused.
2. A UKI signed by db boots, and under Secure Boot the kernel gets the UKI's own command line: the entry's
   `options` are ignored (without Secure Boot they replace it: why the device writes the verity words there too).
3. A UKI unsigned, or signed by a key db does not hold, is refused by the firmware ("Access Denied"); systemd-boot
   has counted the try down before, returns to the firmware, which runs it once more (its platform recovery),
   then waits at its menu. After a power cycle the tries are used up and systemd-boot boots the other entry.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from builder.uki import SbsignSigner, build_uki, osrel_text

from . import secureboot as sb
from . import vm
from .conftest import OsImages

BOOT_S = 150
MENU = r"Press any key to enter the Boot Manager Menu"  # OVMF: nothing left to boot
SECURE_BOOT_VAR = "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
REPORT = (
    'echo "ABFLIP-CMDLINE $(cat /proc/cmdline)"\n'
    f'echo "ABFLIP-SB $(dd if=/sys/firmware/efi/efivars/{SECURE_BOOT_VAR} bs=1 skip=4 2>/dev/null | od -An -tu1 '
    '| tr -d \' \')"\n'
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sb_assets(os_images: OsImages, kernel: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    if missing := sb.missing_prerequisites():
        pytest.skip("Secure Boot facts need: " + ", ".join(missing))
    out = tmp_path_factory.mktemp("secure-boot")
    keys = sb.make_keys(out / "keys")
    vmlinuz, modules = kernel
    assets: dict = {"keys": keys, "sdboot": sb.sign(vm.SYSTEMD_BOOT_EFI, out / "systemd-bootx64.efi", keys)}
    for version, slot in (("1.0.0", "a"), ("2.0.0", "b")):
        initrd = vm.build_initramfs(out / f"initrd-{version}.img", version=version, good=True, modules_dir=modules,
                                    mount_root=False, extra_init=REPORT)
        cmdline = f"console=ttyS0 panic=1 loglevel=4 abflip.slot={slot} uki-cmdline={version}"
        plain = out / f"uki-{version}.efi"
        build_uki(plain, kernel=vmlinuz, initrd=initrd, cmdline=cmdline, osrel=osrel_text("sb-test", version))
        signed = out / f"uki-{version}-signed.efi"
        build_uki(signed, kernel=vmlinuz, initrd=initrd, cmdline=cmdline, osrel=osrel_text("sb-test", version),
                  signer=SbsignSigner(keys.key("db"), keys.cert("db")))
        assets[version] = {"unsigned": plain, "signed": signed, "other": sb.sign(plain, out / f"uki-{version}-other.efi",
                                                                                  keys, "other")}
    return assets


def _disk(tmp_path: Path, assets: dict, v2: str, *, sdboot: Path | None = None) -> vm.DiskLayout:
    """v1's signed UKI (blessed) in slot a, v2's (`v2`: signed, unsigned, other) counting 2 tries in slot b."""
    layout = vm.build_disk(tmp_path / "disk.img", systemd_boot=sdboot or assets["sdboot"])
    esp = vm.esp(layout)
    for version, slot, kind, name in (("1.0.0", "a", "signed", "abflip-1.0.0-a.conf"),
                                      ("2.0.0", "b", v2, "abflip-2.0.0-b+2.conf")):
        esp.write_atomic(f"abflip/{version}-{slot}/uki.efi", assets[version][kind].read_bytes())
        esp.write_atomic(f"loader/entries/{name}", (
            f"title sb-test {version}\nversion {version}\nsort-key abflip\nefi /abflip/{version}-{slot}/uki.efi\n"
            f"options console=ttyS0 panic=1 loglevel=4 abflip.slot={slot} entry-options={version}\n").encode())
    esp.sync()
    return layout


def _secure_boot(tmp_path: Path, layout: vm.DiskLayout, assets: dict, name: str, **kw) -> vm.BootResult:
    vars_path = tmp_path / "OVMF_VARS.secboot.fd"
    if not vars_path.exists():  # one machine: its store keeps systemd-boot's variables across power cycles
        sb.enrolled_vars(vars_path, assets["keys"])
    return vm.boot(layout, vars_path, code=sb.CODE, extra_args=sb.QEMU_ARGS, log_path=tmp_path / f"{name}.log",
                   timeout_s=BOOT_S, **kw)


def _line(result: vm.BootResult, prefix: str) -> str:
    return next(line.split(prefix, 1)[1].strip() for line in result.serial().splitlines() if prefix in line)


def test_a_systemd_boot_not_signed_by_db_is_refused(tmp_path: Path, sb_assets: dict) -> None:
    layout = _disk(tmp_path, sb_assets, "signed", sdboot=vm.SYSTEMD_BOOT_EFI)
    result = _secure_boot(tmp_path, layout, sb_assets, "unsigned-loader", until=MENU)
    assert result.boots == [], result.serial()[-3000:]
    assert re.search(r'failed to load Boot0001 "UEFI Misc Device".*: Access Denied', result.serial()), \
        result.serial()[-3000:]
    assert vm.list_entries(layout) == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b+2.conf"]  # nothing counted


def test_a_signed_uki_boots_with_its_own_command_line_under_secure_boot_only(tmp_path: Path, sb_assets: dict) -> None:
    layout = _disk(tmp_path, sb_assets, "signed")
    result = _secure_boot(tmp_path, layout, sb_assets, "signed")
    assert result.powered_off and [b.version for b in result.boots] == ["2.0.0"], result.serial()[-3000:]
    assert result.boots[0].countpath == "\\loader\\entries\\abflip-2.0.0-b+1-1.conf"
    assert _line(result, "ABFLIP-SB") == "1"  # Secure Boot is on
    cmdline = _line(result, "ABFLIP-CMDLINE")
    assert "uki-cmdline=2.0.0" in cmdline and "entry-options" not in cmdline, cmdline
    # the same disk on the firmware without Secure Boot: the entry's options replace the UKI's line
    plain = vm.boot(layout, vm.fresh_vars(tmp_path / "OVMF_VARS.fd"), log_path=tmp_path / "plain.log",
                    timeout_s=BOOT_S)
    assert plain.powered_off and [b.version for b in plain.boots] == ["2.0.0"], plain.serial()[-3000:]
    cmdline = _line(plain, "ABFLIP-CMDLINE")
    assert "entry-options=2.0.0" in cmdline and "uki-cmdline" not in cmdline, cmdline
    assert _line(plain, "ABFLIP-SB") in ("", "0")


@pytest.mark.parametrize("kind", ["unsigned", "other"])
def test_a_uki_not_signed_by_db_is_refused_and_a_power_cycle_boots_the_other_slot(tmp_path: Path, sb_assets: dict,
                                                                                   kind: str) -> None:
    layout = _disk(tmp_path, sb_assets, kind)
    first = _secure_boot(tmp_path, layout, sb_assets, f"{kind}-1", until=MENU)
    serial = first.serial()
    assert first.boots == [], serial[-3000:]
    assert serial.count("Error loading \\abflip\\2.0.0-b\\uki.efi: Access Denied") == 2, serial[-3000:]
    assert re.search(MENU, serial)
    assert vm.list_entries(layout) == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b+0-2.conf"]  # both tries counted
    second = _secure_boot(tmp_path, layout, sb_assets, f"{kind}-2")  # the power cycle
    assert second.powered_off and [b.version for b in second.boots] == ["1.0.0"], second.serial()[-3000:]
    assert second.boots[0].selected == "abflip-1.0.0-a.conf"
    assert "uki-cmdline=1.0.0" in _line(second, "ABFLIP-CMDLINE")
