"""System paths the applier reads, in one object so tests can point them at files.

Nothing else in the applier opens ``/proc`` or ``/sys`` directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ESP_CANDIDATES", "LOADER_GUID", "Context", "read_efivar_string"]

LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"


ESP_CANDIDATES = (Path("/efi"), Path("/boot/efi"), Path("/boot"))  # bootctl --print-esp-path's order


@dataclass(frozen=True)
class Context:
    cmdline: Path = Path("/proc/cmdline")
    efivars: Path = Path("/sys/firmware/efi/efivars")
    dmi: Path = Path("/sys/class/dmi/id")
    partlabels: Path = Path("/dev/disk/by-partlabel")
    esp_candidates: tuple[Path, ...] = ESP_CANDIDATES
    root: Path = Path("/")  # the mounted root filesystem: boot-check confirms it is the slot the entry named
    sys_block: Path = Path("/sys/dev/block")

    def root_device(self) -> int | None:
        """The device number (st_dev) the root filesystem is mounted from; None if unreadable."""
        try:
            return os.stat(self.root).st_dev
        except OSError:
            return None

    def lower_devices(self, dev: int) -> list[int]:
        """The devices ``dev`` is stacked on (a device-mapper device's ``slaves``: a verity root's data and hash
        device); [] when it is stacked on none, or that cannot be read."""
        d = self.sys_block / f"{os.major(dev)}:{os.minor(dev)}" / "slaves"
        try:
            names = sorted(os.listdir(d))
        except OSError:
            return []
        out = []
        for name in names:
            try:
                major, minor = (d / name / "dev").read_text().strip().split(":")
                out.append(os.makedev(int(major), int(minor)))
            except (OSError, ValueError):
                return []
        return out

    def dmi_field(self, name: str) -> str | None:
        """A DMI string (``product_name``, ``board_name``, ``sys_vendor`` …), stripped; None if unreadable/empty."""
        try:
            value = (self.dmi / name).read_text(errors="replace").strip()
        except OSError:
            return None
        return value or None

    def find_esp(self) -> Path | None:
        """The first candidate that holds an ``EFI`` directory (any case), as ``bootctl --print-esp-path`` looks."""
        for root in self.esp_candidates:
            try:
                names = os.listdir(root)
            except OSError:
                continue
            if any(n.lower() == "efi" and (root / n).is_dir() for n in names):
                return root
        return None

    def read_cmdline(self) -> str | None:
        try:
            return self.cmdline.read_text()
        except OSError:
            return None

    def loader_var(self, name: str) -> str | None:
        """A systemd-boot loader variable (UTF-16LE after efivarfs' 4-byte attribute header)."""
        return read_efivar_string(self.efivars / f"{name}-{LOADER_GUID}")


def read_efivar_string(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if len(raw) < 4 or len(raw) > 4 + 4096:
        return None
    try:
        return raw[4:].decode("utf-16-le").rstrip("\x00") or None
    except UnicodeDecodeError:
        return None
