"""The two root slots: which one is booted, and raw access to the inactive one.

The booted slot comes from the boot loader's word (``LoaderBootCountPath`` /
``LoaderEntrySelected`` naming an abflip entry) or else the kernel command line
(``abflip.slot=`` or ``root=PARTLABEL=``). When neither tells, we refuse to write
anything (invariant 1: never write the booted slot).
"""

from __future__ import annotations

import os
import re

from metadata.errors import DeviceError

from .config import Config
from .context import Context

WRITE_PIECE = 256 << 10

__all__ = ["booted_slot", "other_slot", "SlotDevice", "slot_from_entry_name"]

_ENTRY_SLOT = re.compile(r"abflip-.+-([ab])(?:\+\d+(?:-\d+)?)?\.conf$")


def slot_from_entry_name(name: str) -> str | None:
    m = _ENTRY_SLOT.search(name.replace("\\", "/").rsplit("/", 1)[-1])
    return m.group(1) if m else None


def booted_slot(config: Config, ctx: Context) -> str:
    for var in ("LoaderBootCountPath", "LoaderEntrySelected"):
        value = ctx.loader_var(var)
        if value and (slot := slot_from_entry_name(value)):
            return slot
    cmdline = ctx.read_cmdline()
    if cmdline:
        args = cmdline.split()
        for arg in args:
            if arg.startswith("abflip.slot=") and arg.split("=", 1)[1] in config.slots:
                return arg.split("=", 1)[1]
        for arg in args:
            if arg.startswith("root=PARTLABEL="):
                label = arg.split("=", 2)[2]
                for name, s in config.slots.items():
                    if s.partlabel == label:
                        return name
    raise DeviceError("cannot tell which slot is booted (no abflip loader entry, no abflip.slot= or "
                      "root=PARTLABEL=<slot label> on the kernel command line)",
                      hint="boot through an abflip entry, or add abflip.slot=a to the kernel command line")


def other_slot(slot: str) -> str:
    return {"a": "b", "b": "a"}[slot]


class SlotDevice:
    """A slot's block device (or a pre-sized file in tests), opened for positional I/O."""

    def __init__(self, name: str, path: os.PathLike, *, write: bool) -> None:
        self.name = name
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
        except FileNotFoundError:
            raise DeviceError(f"slot {name} device {path} does not exist") from None
        except PermissionError:
            raise DeviceError(f"slot {name} device {path} cannot be opened for {'writing' if write else 'reading'}",
                              hint="run as root, and check the device is not read-only") from None
        except OSError as e:
            raise DeviceError(f"cannot open slot {name} device {path}: {e}") from None
        self.capacity = os.lseek(self.fd, 0, os.SEEK_END)

    def __enter__(self) -> SlotDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def pread(self, offset: int, length: int) -> bytearray:
        out = bytearray(length)
        view = memoryview(out)
        done = 0
        while done < length:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if not n:
                raise DeviceError(f"slot {self.name} ends at {offset + done}, cannot read {length} bytes at {offset}")
            done += n
        return out

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):  # in pieces: one huge pwrite is several times slower (bench/apply.py)
                done += os.pwrite(self.fd, view[done:done + WRITE_PIECE], offset + done)
        except OSError as e:
            raise DeviceError(f"writing slot {self.name} at byte {offset + done} failed: {e}") from None

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise DeviceError(f"flushing slot {self.name} failed: {e}") from None
