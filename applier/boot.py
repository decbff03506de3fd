"""systemd-boot Type #1 entries with boot counting (Boot Loader Specification).

Entry file: ``/loader/entries/abflip-<name>-<slot>[+<left>[-<done>]].conf``, boot files
under ``/abflip/<name>-<slot>/``, where ``<name>`` is the version with ``+`` (semver build
metadata) written as ``_``: systemd-boot reads the *last* ``+`` of a file name as the start of
its boot counter, so a ``+`` in the version must not reach the ESP (``_`` is not a semver
character, so the mapping is reversible). Boot files live per slot *and* version: the ESP is
FAT, where ``2.0.0-RC`` and ``2.0.0-rc`` name one directory, and a slot holds one version at a
time, so one slot's install can never write over the other slot's kernel. Cleanup removes only
files no remaining entry references (read from the entries themselves, case-insensitively). Every abflip entry carries ``sort-key abflip`` and ``version``:
systemd-boot (252) orders by version only when every entry has a sort-key, so the newest
version is the default, and an entry whose tries are used up (``+0-N``) sorts last, so the
other slot boots by itself. Blessing renames the entry without its counter, exactly as
``systemd-bless-boot`` does.

Writes are atomic (temp, fsync, rename, fsync dir) and followed by an ESP sync.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from metadata.errors import DeviceError, RepositoryError
from metadata.manifest import boot_options_problem

from .esp import Esp
from .policy import same_version

__all__ = [
    "ENTRIES_DIR",
    "Entry",
    "bless",
    "boot_dir",
    "esp_name",
    "referenced_paths",
    "entry_text",
    "list_entries",
    "mark_bad",
    "prune_boot_files",
    "prune_entries",
    "remove_slot_entries",
    "write_entry",
]

ENTRIES_DIR = "loader/entries"
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_PATH_KEYS = ("linux", "initrd", "efi", "devicetree")
_NAME = re.compile(r"^abflip-(?P<version>[0-9A-Za-z._-]+)-(?P<slot>[ab])(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.conf$")


def esp_name(version: str) -> str:
    """The version as it appears in ESP names (``+`` -> ``_``; see the module docstring)."""
    return version.replace("+", "_")


def _from_esp_name(name: str) -> str:
    return name.replace("_", "+")


@dataclass(frozen=True)
class Entry:
    name: str  # file name in loader/entries
    version: str
    slot: str
    tries_left: int | None  # None: no counter (blessed, or never counted)
    tries_done: int

    @property
    def path(self) -> str:
        return f"{ENTRIES_DIR}/{self.name}"

    @property
    def blessed_name(self) -> str:
        return f"abflip-{esp_name(self.version)}-{self.slot}.conf"

    @property
    def counting(self) -> bool:
        return self.tries_left is not None

    @property
    def exhausted(self) -> bool:
        return self.tries_left == 0

    @classmethod
    def parse(cls, name: str) -> Entry | None:
        m = _NAME.match(name)
        if not m:
            return None
        left = m.group("left")
        return cls(name, _from_esp_name(m.group("version")), m.group("slot"), None if left is None else int(left),
                   int(m.group("done") or 0))

    @classmethod
    def new(cls, version: str, slot: str, tries: int) -> Entry:
        return cls(f"abflip-{esp_name(version)}-{slot}+{tries}.conf", version, slot, tries, 0)

    def to_json(self) -> dict:
        return {"file": self.name, "version": self.version, "slot": self.slot, "tries_left": self.tries_left,
                "tries_done": self.tries_done}


def boot_dir(version: str, slot: str) -> str:
    return f"abflip/{esp_name(version)}-{slot}"


def loader_version(version: str) -> str:
    """The entry's ``version`` line. systemd-boot ranks ``1.0.0-rc.1`` above ``1.0.0`` ('-' is a
    separator to it); semver ranks it below. '~' sorts before everything in systemd's
    comparison, so ``1.0.0~rc.1`` < ``1.0.0`` as semver wants."""
    core, sep, pre = version.partition("-")
    return f"{core}~{pre}" if sep else version


def entry_text(*, product: str, version: str, slot: str, partlabel: str, options: str, has_initrd: bool,
               uki: bool = False) -> str:
    """The entry's text. Every field is checked again here (defence in depth: the manifest
    parser refuses the same): one control character would end a line for systemd-boot
    (``\r`` too) and let a signer add ``efi``/``options`` lines of their own."""
    problem = boot_options_problem(options)
    if problem is None:
        problem = next((f"{what} {v!r} is not printable ASCII" for what, v in
                        (("product", product), ("version", version), ("partition label", partlabel))
                        if not _PRINTABLE.fullmatch(v)), None)
    if problem is not None:
        raise RepositoryError(f"refusing to write a boot entry: {problem}",
                              hint="the release's boot fields would change what the device boots; nothing was changed")
    bdir = boot_dir(version, slot)
    lines = [
        f"title {product} {version} (slot {slot})",
        f"version {loader_version(version)}",
        "sort-key abflip",
    ]
    if uki:  # (issue 3) a unified kernel image: Type #1 "efi" line, the UKI carries kernel + initrd
        lines.append(f"efi /{bdir}/uki.efi")
    else:
        lines.append(f"linux /{bdir}/vmlinuz")
    if has_initrd and not uki:
        lines.append(f"initrd /{bdir}/initrd.img")
    lines.append(f"options root=PARTLABEL={partlabel} abflip.slot={slot} {options}".rstrip())
    return "\n".join(lines) + "\n"


def list_entries(esp: Esp) -> list[Entry]:
    return [e for n in esp.listdir(ENTRIES_DIR) if (e := Entry.parse(n))]


@contextlib.contextmanager
def _guard(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise DeviceError(f"{what} on the ESP failed: {e}",
                          hint="check that the ESP is mounted, writable and not full") from None


def remove_slot_entries(esp: Esp, slot: str) -> list[str]:
    """Invariant 2: before a slot is written, no entry may point at it. Synced before return."""
    removed = []
    with _guard("removing boot entries"):
        for e in list_entries(esp):
            if e.slot == slot:
                esp.remove(e.path)
                removed.append(e.name)
        esp.sync()
    return removed


def referenced_paths(esp: Esp) -> set[str]:
    """Every ESP path (casefolded, without the leading '/') that an entry in
    ``loader/entries`` names on a ``linux``/``initrd``/``efi``/``devicetree`` line, abflip's or not.
    Lines end at ``\n`` or ``\r``, as systemd-boot reads them."""
    refs = set()
    for name in esp.listdir(ENTRIES_DIR):
        if not name.lower().endswith(".conf"):
            continue
        try:
            text = esp.read(f"{ENTRIES_DIR}/{name}").decode("utf-8", "replace")
        except OSError:
            raise DeviceError(f"cannot read the boot entry {ENTRIES_DIR}/{name}: ESP cleanup skipped",
                              hint="check the ESP") from None
        for line in re.split(r"[\r\n]", text):
            key, _, value = line.strip().partition(" ")
            if key in _PATH_KEYS and value.strip():
                refs.add(value.strip().replace("\\", "/").lstrip("/").casefold())
    return refs


def prune_boot_files(esp: Esp) -> list[str]:
    """Remove ``/abflip/<dir>/`` directories none of whose files any entry references (never
    other OSes' files, never a file that any remaining entry names)."""
    refs = referenced_paths(esp)
    removed = []
    with _guard("removing stale boot files"):
        for d in esp.listdir("abflip"):
            prefix = f"abflip/{d}".casefold()
            if any(r == prefix or r.startswith(prefix + "/") for r in refs):
                continue
            esp.remove_tree(f"abflip/{d}")
            removed.append(d)
        if removed:
            esp.sync()
    return removed


def write_entry(esp: Esp, entry: Entry, text: str) -> None:
    with _guard("writing the boot entry"):
        esp.makedirs(ENTRIES_DIR)
        esp.write_atomic(entry.path, text.encode())
        esp.sync()


def bless(esp: Esp, entry: Entry) -> Entry:
    """Drop the counter: ``x+1-2.conf`` -> ``x.conf`` (what systemd-bless-boot does)."""
    if not entry.counting:
        return entry
    blessed = Entry(entry.blessed_name, entry.version, entry.slot, None, 0)
    with _guard("blessing the boot entry"):
        esp.rename(entry.path, blessed.path)
        esp.sync()
    return blessed


def mark_bad(esp: Esp, entry: Entry) -> Entry:
    """Rename ``entry`` to ``+0-<done>``: its tries are used up, so systemd-boot sorts it last and
    boots the other slot's entry, yet keeps it as the last resort if nothing else boots.
    This is how a rollback is requested (and what systemd-boot itself leaves after a failed trial)."""
    if entry.exhausted:
        return entry
    bad = Entry(f"abflip-{esp_name(entry.version)}-{entry.slot}+0-{max(1, entry.tries_done)}.conf", entry.version, entry.slot, 0,
                max(1, entry.tries_done))
    with _guard("marking the boot entry bad"):
        esp.rename(entry.path, bad.path)
        esp.sync()
    return bad


def prune_entries(esp: Esp, keep: dict[str, str | None]) -> list[str]:
    """ESP hygiene: remove abflip entries for versions the slots no longer hold.

    ``keep`` maps each slot to the version its entries may name: a version keeps that
    slot's entries of that version only; ``None`` keeps all of that slot's entries (the slot's
    content is not known, so nothing is judged); a slot absent from ``keep`` loses all its
    entries. Entries that are not abflip's (other operating systems) are never touched.
    """
    removed = []
    with _guard("removing stale boot entries"):
        for e in list_entries(esp):
            if e.slot in keep and (keep[e.slot] is None or same_version(keep[e.slot], e.version)):
                continue
            esp.remove(e.path)
            removed.append(e.name)
        if removed:
            esp.sync()
    return removed
