"""The boot loader, behind one small interface.

Everything abflip knows about how a device chooses what to boot lives in this package:
which entry booted, the entries with their boot counters, making a slot the next boot with a
number of tries, blessing it, marking it bad, the boot files a slot's entry needs, and which
files no entry needs any more. The verbs and the lifecycle speak only these words
(:class:`Bootloader`); a second backend (GRUB with grubenv, U-Boot with its environment) is a
second module beside :mod:`.systemd_boot`, chosen in :func:`open_bootloader`.

The words, as RAUC's bootchooser has them (primary, state, current bootname), in abflip's terms:

- :meth:`Bootloader.booted` — the booted slot and the entry it booted (what the loader says,
  else the kernel command line);
- :meth:`Bootloader.entries` — abflip's entries: slot, version, tries left and done;
- :meth:`Bootloader.install_files` / :meth:`Bootloader.add_trial` — a slot's boot files, then
  an entry that boots it next with ``tries`` attempts (the loader counts them down and falls
  back by itself when they are used up);
- :meth:`Bootloader.add_default` — a blessed entry (a device's first day);
- :meth:`Bootloader.bless` — the commit point: the entry loses its counter;
- :meth:`Bootloader.mark_bad` — the entry's tries are used up: the other slot boots next, this
  one stays a last resort;
- :meth:`Bootloader.remove_slot`, :meth:`Bootloader.prune`, :meth:`Bootloader.sweep` — hygiene.

Every write is durable when the call returns (synced); a failing write raises
:class:`metadata.errors.DeviceError` saying what it was doing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from metadata.verity import Verity

    from ..config import Config
    from ..context import Context
    from .esp import Esp

__all__ = ["BootFacts", "BootSpec", "Bootloader", "Entry", "open_bootloader"]


@dataclass(frozen=True)
class Entry:
    """One of abflip's boot entries, as the loader holds it."""

    name: str  # the loader's name for it (systemd-boot: the file name in loader/entries, counter included)
    version: str
    slot: str
    tries_left: int | None  # None: no counter (blessed, or never counted)
    tries_done: int

    @property
    def counting(self) -> bool:
        return self.tries_left is not None

    @property
    def exhausted(self) -> bool:
        return self.tries_left == 0

    def to_json(self) -> dict:
        return {"file": self.name, "version": self.version, "slot": self.slot, "tries_left": self.tries_left,
                "tries_done": self.tries_done}


@dataclass(frozen=True)
class BootFacts:
    """What the boot loader says right now (the input of :func:`applier.lifecycle.reconcile`)."""

    slot: str  # the booted slot
    entry: Entry | None  # the entry it booted (under its current name); None: the loader did not say
    entries: tuple[Entry, ...]  # abflip's entries


@dataclass(frozen=True)
class BootSpec:
    """What an entry boots: taken from the verified release manifest and the device's config."""

    product: str
    version: str
    slot: str
    partlabel: str  # the slot's partition label (the root= the entry names)
    options: str  # the release's kernel options (validated: never root=, abflip.*, ...)
    files: tuple[str, ...]  # the boot file names: ("vmlinuz", "initrd.img") or ("uki.efi",)
    verity: Verity | None = None  # the image's dm-verity tree: the entry opens the root through it


class Bootloader(Protocol):
    esp: Esp

    def booted(self) -> tuple[str, Entry | None]: ...
    def entries(self) -> list[Entry]: ...
    def facts(self) -> BootFacts: ...
    def free_bytes(self) -> int: ...
    def check_spec(self, spec: BootSpec) -> None: ...
    def install_files(self, version: str, slot: str, files: dict[str, Path]) -> str: ...
    def add_trial(self, spec: BootSpec, tries: int) -> Entry: ...
    def add_default(self, spec: BootSpec) -> Entry: ...
    def bless(self, entry: Entry) -> Entry: ...
    def mark_bad(self, entry: Entry) -> Entry: ...
    def restore(self, saved: dict[str, bytes]) -> None: ...
    def unmark(self, marked: Entry, original: Entry) -> None: ...
    def booted_slot(self) -> str: ...
    def booted_entry(self, slot: str) -> Entry | None: ...
    def has_entries_dir(self) -> bool: ...
    def prune_files(self) -> list[str]: ...
    def saved_slot(self, slot: str) -> dict[str, bytes]: ...
    def remove_slot(self, slot: str, *, keep: str | None = None, counting_only: bool = False) -> list[str]: ...
    def prune(self, keep: dict[str, str | None]) -> None: ...
    def sweep(self) -> list[str]: ...


def open_bootloader(config: Config, ctx: Context, esp: Esp | None = None) -> Bootloader:
    """The device's boot loader: systemd-boot (the one backend today) on the configured ESP
    (``paths.esp``, or discovered as ``bootctl --print-esp-path`` does)."""
    from .systemd_boot import SystemdBoot

    return SystemdBoot.open(config, ctx, esp)
