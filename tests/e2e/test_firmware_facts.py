"""What OVMF + systemd-boot 252 really do with abflip's boot entries (the facts DESIGN.md relies on).

The e2e tests write Type #1 entries by hand, boot the disk under QEMU and read what the guest reports on the serial
console. `FatImageEsp` (the applier's mtools ESP) is tested on a plain FAT image, without QEMU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from applier.bootloader.esp_fat import EspError, FatImageEsp

from . import vm
from .conftest import OsImages
from .vm import OsVersion

ONE_BOOT_TIMEOUT_S = 150  # one boot takes ~13 s under TCG here
ROLLBACK_TIMEOUT_S = 420  # three failing boots and the good one: ~60 s here


def _explain(result: vm.BootResult) -> str:
    tail = "\n".join(result.serial().splitlines()[-40:])
    return f"{result!r}\n--- serial log tail ({result.log_path}) ---\n{tail}"


def _disk(tmp_path: Path, *versions: tuple[OsVersion, str]) -> vm.DiskLayout:
    layout = vm.build_disk(tmp_path / "disk.img")
    for os_version, slot in versions:
        vm.install_os_version(
            layout,
            version=os_version.version,
            slot=slot,
            vmlinuz=os_version.vmlinuz,
            initrd=os_version.initrd,
            rootfs=os_version.rootfs,
        )
    return layout


def _boot(tmp_path: Path, layout: vm.DiskLayout, timeout_s: float) -> vm.BootResult:
    return vm.boot(layout, vm.fresh_vars(tmp_path / "OVMF_VARS.fd"), timeout_s=timeout_s)


# ------------------------------------------------------------------------------------------------ firmware


@pytest.mark.e2e
def test_counted_entry_boots_first_renamed_before_kernel(tmp_path: Path, os_images: OsImages) -> None:
    """(a) The higher version with tries boots; systemd-boot renames +3 to +2-1 before starting the kernel, and the
    guest sees the renamed path in LoaderBootCountPath and the old file name in LoaderEntrySelected."""
    layout = _disk(tmp_path, (os_images.v1, "a"), (os_images.v2, "b"))
    vm.write_esp_file(layout, "loader/entries/abflip-1.0.0-a.conf", vm.entry_text("1.0.0", "a").encode())
    vm.write_esp_file(layout, "loader/entries/abflip-2.0.0-b+3.conf", vm.entry_text("2.0.0", "b").encode())

    result = _boot(tmp_path, layout, ONE_BOOT_TIMEOUT_S)

    assert result.powered_off, _explain(result)
    assert len(result.boots) == 1, _explain(result)
    booted = result.boots[0]
    assert (booted.version, booted.slot, booted.root_version) == ("2.0.0", "b", "2.0.0"), _explain(result)
    assert booted.root_device == "/dev/vda3"
    assert booted.countpath == "\\loader\\entries\\abflip-2.0.0-b+2-1.conf"
    assert booted.selected == "abflip-2.0.0-b+3.conf"  # the entry id: file name as it was when the menu was built
    assert vm.list_entries(layout) == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b+2-1.conf"]


@pytest.mark.e2e
def test_rollback_after_tries_exhausted(tmp_path: Path, os_images: OsImages) -> None:
    """(b) A bad v2 panics three times (each reset burns a try), then systemd-boot boots v1 by itself."""
    layout = _disk(tmp_path, (os_images.v1, "a"), (os_images.v2_bad, "b"))
    vm.write_esp_file(layout, "loader/entries/abflip-1.0.0-a.conf", vm.entry_text("1.0.0", "a").encode())
    vm.write_esp_file(layout, "loader/entries/abflip-2.0.0-b+3.conf", vm.entry_text("2.0.0", "b").encode())

    result = _boot(tmp_path, layout, ROLLBACK_TIMEOUT_S)

    assert result.powered_off, _explain(result)
    assert [(b.version, b.action) for b in result.boots] == [
        ("2.0.0", "panic"),
        ("2.0.0", "panic"),
        ("2.0.0", "panic"),
        ("1.0.0", "poweroff"),
    ], _explain(result)
    assert [b.entry_file for b in result.boots[:3]] == [
        "abflip-2.0.0-b+2-1.conf",
        "abflip-2.0.0-b+1-2.conf",
        "abflip-2.0.0-b+0-3.conf",
    ]
    assert [b.selected for b in result.boots[:3]] == [
        "abflip-2.0.0-b+3.conf",
        "abflip-2.0.0-b+2-1.conf",
        "abflip-2.0.0-b+1-2.conf",
    ]
    fallback = result.boots[3]
    assert (fallback.slot, fallback.root_version, fallback.root_device) == ("a", "1.0.0", "/dev/vda2")
    assert fallback.countpath is None  # an entry without a counter sets no LoaderBootCountPath
    assert fallback.selected == "abflip-1.0.0-a.conf"
    assert vm.list_entries(layout) == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b+0-3.conf"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("sort_key_on_v2", "sort_key_on_v1", "expected"),
    [
        pytest.param(True, True, "2.0.0", id="both-sort-key:version-orders"),
        pytest.param(False, False, "1.0.0", id="no-sort-key:file-name-orders"),
        pytest.param(True, False, "2.0.0", id="mixed:sort-key-entry-first"),
    ],
)
def test_version_orders_only_with_sort_key(
    tmp_path: Path, os_images: OsImages, sort_key_on_v2: bool, sort_key_on_v1: bool, expected: str
) -> None:
    """File names that sort opposite to the versions: `Aaa.conf` holds 2.0.0, `zzz.conf` holds 1.0.0.

    With a sort-key on both, `version` decides (2.0.0); with none, the file name does, descending (zzz = 1.0.0);
    with a sort-key on only one, that entry comes first. LoaderEntrySelected is the file name lowercased.
    """
    layout = _disk(tmp_path, (os_images.v1, "a"), (os_images.v2, "b"))
    v2_entry = vm.entry_text("2.0.0", "b", sort_key="abflip" if sort_key_on_v2 else None)
    v1_entry = vm.entry_text("1.0.0", "a", sort_key="abflip" if sort_key_on_v1 else None)
    vm.write_esp_file(layout, "loader/entries/Aaa.conf", v2_entry.encode())
    vm.write_esp_file(layout, "loader/entries/zzz.conf", v1_entry.encode())

    result = _boot(tmp_path, layout, ONE_BOOT_TIMEOUT_S)

    assert result.powered_off, _explain(result)
    assert result.versions == [expected], _explain(result)
    assert result.boots[0].selected == ("aaa.conf" if expected == "2.0.0" else "zzz.conf")
    assert result.boots[0].countpath is None


# --------------------------------------------------------------------------------------------- FatImageEsp

needs_mtools = pytest.mark.skipif(
    shutil.which("mcopy") is None or shutil.which("mkfs.fat") is None,
    reason="needs mtools and dosfstools (apt-get install mtools dosfstools)",
)


@pytest.fixture(params=["image", "partition"])
def fat(request: pytest.FixtureRequest, tmp_path: Path) -> FatImageEsp:
    """A 40 MiB FAT32 filesystem: a whole image file, or at 1 MiB inside a larger file (like a disk's ESP)."""
    img = tmp_path / "esp.img"
    size_kib = 40 * 1024
    if request.param == "image":
        subprocess.run(["mkfs.fat", "-C", "-F", "32", "-s", "1", img, str(size_kib)], check=True, capture_output=True)
        return FatImageEsp(img)
    with open(img, "wb") as f:
        f.write(b"\xa5" * (1 << 20))  # a canary where the partition table would be
        f.truncate((1 << 20) + size_kib * 1024 + (1 << 20))
    subprocess.run(
        ["mkfs.fat", "-F", "32", "-s", "1", "--offset", "2048", img, str(size_kib)], check=True, capture_output=True
    )
    return FatImageEsp(str(img), offset=1 << 20)


def _fsck(esp: FatImageEsp) -> None:
    if esp.offset:
        return  # fsck.fat takes no offset
    proc = subprocess.run(["fsck.fat", "-n", esp.image_path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_mtools
def test_fat_esp_every_method(fat: FatImageEsp) -> None:
    assert fat.listdir("") == []
    assert fat.listdir("loader/entries") == []
    assert not fat.exists("loader")

    fat.makedirs("loader/entries")
    fat.makedirs("loader/entries")  # idempotent
    assert fat.exists("loader/entries") and fat.exists("/LOADER/Entries/")  # FAT is case-insensitive
    assert fat.listdir("/") == ["loader"]

    # Long names with '+' and names whose 8.3 aliases collide (ABFLIP~1.CON, ABFLIP~2.CON, ...).
    names = ["abflip-1.0.0-a.conf", "abflip-2.0.0-b+3.conf", "abflip-2.0.0-b+2-1x.conf"]
    for i, name in enumerate(names):
        fat.write_atomic(f"loader/entries/{name}", f"entry {i}\n".encode())
    assert fat.listdir("loader/entries") == sorted(names)  # no temp files left behind
    assert fat.read("loader/entries/abflip-2.0.0-b+3.conf") == b"entry 1\n"

    # Binary content, parents created, overwrite.
    blob = os.urandom(300_000) + b"\0\r\n\x1a"
    free_before = fat.free_bytes()
    fat.write_atomic("abflip/2.0.0/vmlinuz", b"old")
    fat.write_atomic("abflip/2.0.0/vmlinuz", blob)
    assert fat.read("abflip/2.0.0/vmlinuz") == blob
    assert fat.listdir("abflip/2.0.0") == ["vmlinuz"]
    # Bare 8.3 names keep their case through the temp-file rename too.
    fat.write_atomic("abflip/2.0.0/initrd.img", b"i")
    fat.write_atomic("EFI/BOOT/BOOTX64.EFI", b"e")
    fat.write_atomic("EFI/BOOT/abc.TXT", b"t")
    assert fat.listdir("abflip/2.0.0") == ["initrd.img", "vmlinuz"]
    assert fat.listdir("efi/boot") == ["BOOTX64.EFI", "abc.TXT"]
    fat.remove_tree("EFI")
    assert free_before - fat.free_bytes() >= len(blob)

    # rename: count a try down, bless, replace an existing file, case-only rename.
    fat.rename("loader/entries/abflip-2.0.0-b+3.conf", "loader/entries/abflip-2.0.0-b+2-1.conf")
    fat.rename("loader/entries/abflip-2.0.0-b+2-1.conf", "loader/entries/abflip-2.0.0-b.conf")
    assert fat.read("loader/entries/abflip-2.0.0-b.conf") == b"entry 1\n"
    fat.rename("loader/entries/abflip-2.0.0-b+2-1x.conf", "loader/entries/abflip-1.0.0-a.conf")
    assert fat.read("loader/entries/abflip-1.0.0-a.conf") == b"entry 2\n"
    fat.rename("loader/entries/abflip-1.0.0-a.conf", "loader/entries/ABFLIP-1.0.0-A.conf")
    assert fat.listdir("loader/entries") == ["ABFLIP-1.0.0-A.conf", "abflip-2.0.0-b.conf"]
    with pytest.raises(FileNotFoundError):
        fat.rename("loader/entries/nope.conf", "loader/entries/other.conf")

    # read/listdir errors.
    with pytest.raises(FileNotFoundError):
        fat.read("loader/entries/nope.conf")
    with pytest.raises(FileNotFoundError):
        fat.read("nope/deeper/file")
    with pytest.raises(IsADirectoryError):
        fat.read("loader")
    with pytest.raises(NotADirectoryError):
        fat.listdir("abflip/2.0.0/vmlinuz")
    with pytest.raises(NotADirectoryError):
        fat.makedirs("abflip/2.0.0/vmlinuz/sub")
    with pytest.raises(ValueError):
        fat.read("loader/*.conf")  # mtools would expand the wildcard
    with pytest.raises(ValueError):
        fat.read("../etc/passwd")

    # remove / remove_tree.
    fat.remove("loader/entries/abflip-2.0.0-b.conf")
    fat.remove("loader/entries/abflip-2.0.0-b.conf")  # missing is fine
    assert fat.listdir("loader/entries") == ["ABFLIP-1.0.0-A.conf"]
    with pytest.raises(IsADirectoryError):
        fat.remove("abflip")
    fat.remove_tree("abflip")
    fat.remove_tree("abflip")  # missing is fine
    assert not fat.exists("abflip/2.0.0/vmlinuz")
    assert fat.listdir("") == ["loader"]
    assert fat.free_bytes() >= free_before - 64 * 1024

    fat.sync()
    _fsck(fat)


@needs_mtools
def test_fat_esp_partition_offset_leaves_bytes_before_it_alone(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.write(b"\xa5" * (1 << 20))
        f.truncate(36 << 20)
    subprocess.run(
        ["mkfs.fat", "-F", "32", "-s", "1", "--offset", "2048", img, str(34 * 1024)], check=True, capture_output=True
    )
    esp = FatImageEsp(img, offset=1 << 20)
    esp.write_atomic("EFI/BOOT/BOOTX64.EFI", b"x" * 100_000)
    esp.sync()
    assert img.read_bytes()[: 1 << 20] == b"\xa5" * (1 << 20)
    assert FatImageEsp(img, offset=1 << 20).read("efi/boot/bootx64.efi") == b"x" * 100_000


@needs_mtools
def test_fat_esp_errors_are_oserrors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * (1 << 20))
    esp = FatImageEsp(junk)
    with pytest.raises(EspError) as info:
        esp.write_atomic("a.conf", b"x")
    assert isinstance(info.value, OSError)
    assert "junk.img" in str(info.value)
    with pytest.raises(EspError):
        esp.free_bytes()


# ------------------------------------------------------------------------------------------- disk helpers


@needs_mtools
@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="needs sfdisk (apt-get install fdisk)")
def test_build_disk_layout(tmp_path: Path) -> None:
    if not vm.SYSTEMD_BOOT_EFI.is_file():
        pytest.skip("needs systemd-boot-efi")
    layout = vm.build_disk(tmp_path / "disk.img", esp_mib=40, root_mib=8)
    parts = layout.partitions
    assert [(p.number, p.name) for p in parts.values()] == [(1, "esp"), (2, "root-a"), (3, "root-b")]
    assert parts["esp"].offset == 1 << 20 and parts["esp"].size == 40 << 20
    assert parts["root-a"].offset == parts["esp"].offset + parts["esp"].size
    assert parts["root-b"].size == 8 << 20
    fat = vm.esp(layout)
    assert fat.read("EFI/BOOT/BOOTX64.EFI") == vm.SYSTEMD_BOOT_EFI.read_bytes()
    assert b"timeout 0" in vm.read_esp_file(layout, "loader/loader.conf")
    assert b"default" not in vm.read_esp_file(layout, "loader/loader.conf")
    assert vm.list_entries(layout) == []

    img = tmp_path / "root.img"
    img.write_bytes(b"ROOT" * 1024)
    vm.write_partition(layout, "root-b", img)
    with open(layout.path, "rb") as f:
        f.seek(parts["root-b"].offset)
        assert f.read(4096) == b"ROOT" * 1024
    if os.geteuid() == 0 and shutil.which("losetup"):
        try:
            dev = vm.attach_loop(layout.path, parts["root-b"].offset, parts["root-b"].size)
        except RuntimeError as exc:
            pytest.skip(f"loop devices unavailable: {exc}")
        try:
            with open(dev, "rb") as f:
                assert f.read(4096) == b"ROOT" * 1024
        finally:
            vm.detach_loop(dev)


def test_parse_serial_tolerates_firmware_noise() -> None:
    lines = [
        (1.0, "\x1b[2J\x1b[01;01HBdsDxe: loading Boot0001"),
        (2.0, "ABFLIP-BOOT version=2.0.0 slot=b selected=abflip-2.0.0-b+3.conf "
              "countpath=\\loader\\entries\\abflip-2.0.0-b+2-1.conf "
              "entry=\\loader\\entries\\abflip-2.0.0-b+2-1.conf uptime=3.1"),
        (2.1, "ABFLIP-ROOT label=root-b dev=/dev/vda3 version=2.0.0"),
        (2.2, "[    3.3] random kernel line ABFLIP-END action=panic uptime=3.3"),
        (9.0, "ABFLIP-BOOT version=1.0.0 slot=a selected=abflip-1.0.0-a.conf countpath=- "
              "entry=abflip-1.0.0-a.conf uptime=3.0"),
        (9.1, "ABFLIP-ROOT label=root-a error=no-partition"),
    ]  # fmt: skip
    boots = vm.parse_serial(lines)
    assert [(b.version, b.slot, b.entry_file, b.action) for b in boots] == [
        ("2.0.0", "b", "abflip-2.0.0-b+2-1.conf", "panic"),
        ("1.0.0", "a", "abflip-1.0.0-a.conf", None),
    ]
    assert boots[1].countpath is None and boots[1].root_error == "no-partition" and boots[1].host_time == 9.0
