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
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from metadata.errors import DeviceError, RepositoryError
from metadata.manifest import boot_options_problem
from metadata.verity import Verity, kernel_args, verity_problem

from ..policy import same_version
from . import BootFacts, BootSpec, Entry
from .esp import DirectoryEsp, Esp

if TYPE_CHECKING:
    from ..config import Config
    from ..context import Context

__all__ = [
    "ENTRIES_DIR",
    "SystemdBoot",
    "blessed_name",
    "boot_dir",
    "entry_path",
    "entry_text",
    "esp_name",
    "list_entries",
    "loader_version",
    "new_entry",
    "parse_entry",
    "referenced_paths",
    "slot_from_entry_name",
]

ENTRIES_DIR = "loader/entries"
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_PATH_KEYS = ("linux", "initrd", "efi", "devicetree")
_ENTRY_SLOT = re.compile(r"abflip-.+-([ab])(?:\+\d+(?:-\d+)?)?\.conf$")
_NAME = re.compile(r"^abflip-(?P<version>[0-9A-Za-z._-]+)-(?P<slot>[ab])(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.conf$")


def esp_name(version: str) -> str:
    """The version as it appears in ESP names (``+`` -> ``_``; see the module docstring)."""
    return version.replace("+", "_")


def _from_esp_name(name: str) -> str:
    return name.replace("_", "+")


def parse_entry(name: str) -> Entry | None:
    """The entry a file name in ``loader/entries`` is, or None (not abflip's)."""
    m = _NAME.match(name)
    if not m:
        return None
    left = m.group("left")
    return Entry(name, _from_esp_name(m.group("version")), m.group("slot"), None if left is None else int(left),
                 int(m.group("done") or 0))


def new_entry(version: str, slot: str, tries: int) -> Entry:
    """A new entry that counts ``tries`` boots."""
    return Entry(f"abflip-{esp_name(version)}-{slot}+{tries}.conf", version, slot, tries, 0)


def blessed_name(e: Entry) -> str:
    return f"abflip-{esp_name(e.version)}-{e.slot}.conf"


def entry_path(e: Entry) -> str:
    return f"{ENTRIES_DIR}/{e.name}"


def slot_from_entry_name(name: str) -> str | None:
    """The slot an entry names, from a loader variable's value (a path, backslashes allowed)."""
    m = _ENTRY_SLOT.search(name.replace("\\", "/").rsplit("/", 1)[-1])
    return m.group(1) if m else None


def boot_dir(version: str, slot: str) -> str:
    return f"abflip/{esp_name(version)}-{slot}"


def loader_version(version: str) -> str:
    """The entry's ``version`` line. systemd-boot ranks ``1.0.0-rc.1`` above ``1.0.0`` ('-' is a
    separator to it); semver ranks it below. '~' sorts before everything in systemd's
    comparison, so ``1.0.0~rc.1`` < ``1.0.0`` as semver wants."""
    core, sep, pre = version.partition("-")
    return f"{core}~{pre}" if sep else version


def entry_text(*, product: str, version: str, slot: str, partlabel: str, options: str, has_initrd: bool,
               uki: bool = False, verity: Verity | None = None) -> str:
    """The entry's text. Every field is checked again here (defence in depth: the manifest
    parser refuses the same): one control character would end a line for systemd-boot
    (``\r`` too) and let a signer add ``efi``/``options`` lines of their own.

    The options start with what the device owns: ``root=PARTLABEL=<label>``, or for an image with a verity tree
    ``root=/dev/mapper/abflip-root`` and the tree's parameters with the slot as its data device (the verified
    manifest's, :func:`metadata.verity.kernel_args`); then ``abflip.slot=``; then the release's options. A signed
    UKI under Secure Boot ignores them and uses the command line it carries (docs/formats.md "dm-verity")."""
    problem = boot_options_problem(options)
    if problem is None and verity is not None:
        problem = verity_problem(verity.to_json(), verity.image_size, verity.image_size)
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
    root = f"root=PARTLABEL={partlabel}" if verity is None else kernel_args(verity, f"PARTLABEL={partlabel}")
    lines.append(f"options {root} abflip.slot={slot} {options}".rstrip())
    return "\n".join(lines) + "\n"


def list_entries(esp: Esp) -> list[Entry]:
    return [e for n in esp.listdir(ENTRIES_DIR) if (e := parse_entry(n))]


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
                esp.remove(entry_path(e))
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
        esp.write_atomic(entry_path(entry), text.encode())
        esp.sync()


def bless(esp: Esp, entry: Entry) -> Entry:
    """Drop the counter: ``x+1-2.conf`` -> ``x.conf`` (what systemd-bless-boot does)."""
    if not entry.counting:
        return entry
    blessed = Entry(blessed_name(entry), entry.version, entry.slot, None, 0)
    with _guard("blessing the boot entry"):
        esp.rename(entry_path(entry), entry_path(blessed))
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
        esp.rename(entry_path(entry), entry_path(bad))
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
            esp.remove(entry_path(e))
            removed.append(e.name)
        if removed:
            esp.sync()
    return removed


# ESP names that only a killed writer leaves behind (see :meth:`SystemdBoot.sweep`).
_ESP_TEMPS = re.compile(r"(^\.abflip-tmp-|\.abflip-tmp(-case)?$|\.~a[bc]$)", re.IGNORECASE)


class SystemdBoot:
    """systemd-boot on an ESP: the :class:`~applier.bootloader.Bootloader` of a device.

    Which entry booted comes from the loader's variables (``LoaderBootCountPath``: the file's
    name after systemd-boot counted it down, set only for a counting entry; else
    ``LoaderEntrySelected``: the name before, lowercased), then from the kernel command line
    (``abflip.slot=``, or ``root=PARTLABEL=`` of a configured slot), then from the root
    filesystem's device (the slot itself, or the one device a verity mapping on it is stacked on:
    a signed UKI's own command line names no slot, nor does a factory's entry)."""

    def __init__(self, esp: Esp, ctx: Context, partlabels: dict[str, str],
                 devices: dict[str, Path] | None = None) -> None:
        self.esp = esp
        self.ctx = ctx
        self.partlabels = partlabels  # slot -> its partition label
        self.devices = devices or {}  # slot -> its device

    @classmethod
    def open(cls, config: Config, ctx: Context, esp: Esp | None = None) -> SystemdBoot:
        if esp is None:
            root = config.esp
            if config.esp_auto:
                found = ctx.find_esp()
                if found is None:
                    raise DeviceError(f"no EFI System Partition found (looked for an EFI directory in "
                                      f"{', '.join(str(p) for p in ctx.esp_candidates)})",
                                      hint=f"mount the ESP, or set paths.esp in {config.path}")
                root = found
            esp = DirectoryEsp(root)
        return cls(esp, ctx, {name: s.partlabel for name, s in config.slots.items()},
                   {name: s.device for name, s in config.slots.items()})

    def __repr__(self) -> str:
        return f"SystemdBoot({self.esp!r})"

    # -- what booted -----------------------------------------------------------------------
    def booted(self) -> tuple[str, Entry | None]:
        """The booted slot and the entry it booted (under its current name), or DeviceError when
        neither the loader nor the kernel command line says which slot booted."""
        slot = self._loader_slot() or self._cmdline_slot() or self._root_slot()
        if slot is None:
            raise DeviceError("cannot tell which slot is booted (no abflip loader entry, no abflip.slot= or "
                              "root=PARTLABEL=<slot label> on the kernel command line, no slot under the root)",
                              hint="boot through an abflip entry, or add abflip.slot=a to the kernel command line")
        return slot, self.booted_entry(slot)

    def booted_slot(self) -> str:
        return self.booted()[0]

    def _loader_slot(self) -> str | None:
        for var in ("LoaderBootCountPath", "LoaderEntrySelected"):
            value = self.ctx.loader_var(var)
            if value and (slot := slot_from_entry_name(value)):
                return slot
        return None

    def _cmdline_slot(self) -> str | None:
        cmdline = self.ctx.read_cmdline()
        if not cmdline:
            return None
        args = cmdline.split()
        for arg in args:
            if arg.startswith("abflip.slot=") and arg.split("=", 1)[1] in self.partlabels:
                return arg.split("=", 1)[1]
        for arg in args:
            if arg.startswith("root=PARTLABEL="):
                label = arg.split("=", 2)[2]
                for name, partlabel in self.partlabels.items():
                    if partlabel == label:
                        return name
        return None

    def _root_slot(self) -> str | None:
        root = self.ctx.root_device()
        if root is None:
            return None
        below = self.ctx.lower_devices(root)
        for name, device in self.devices.items():
            try:
                st = os.stat(device)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode) and (st.st_rdev == root or below == [st.st_rdev]):
                return name
        return None

    def booted_entry(self, slot: str, entries: list[Entry] | None = None) -> Entry | None:
        entries = self.entries() if entries is None else entries
        for var in ("LoaderBootCountPath", "LoaderEntrySelected"):
            value = self.ctx.loader_var(var)
            if value:
                name = value.replace("\\", "/").rsplit("/", 1)[-1]
                e = parse_entry(name) or parse_entry(name.lower())
                if e:
                    # systemd-boot may have renamed it since (counting): find the current file
                    for cur in entries:  # LoaderEntrySelected comes lowercased
                        if cur.version.lower() == e.version.lower() and cur.slot == e.slot:
                            return cur
                    return e
        candidates = [e for e in entries if e.slot == slot]
        return candidates[0] if len(candidates) == 1 else None

    def entries(self) -> list[Entry]:
        try:
            return list_entries(self.esp)
        except OSError as e:
            raise DeviceError(f"cannot list the boot entries on the ESP {self.esp!r}: {e}",
                              hint="check that the ESP is mounted and readable") from None

    def facts(self) -> BootFacts:
        entries = self.entries()
        slot = self.booted_slot()
        return BootFacts(slot, self.booted_entry(slot, entries), tuple(entries))

    def has_entries_dir(self) -> bool:
        return self.esp.exists(ENTRIES_DIR)

    # -- making a slot bootable --------------------------------------------------------------
    def free_bytes(self) -> int:
        try:
            return self.esp.free_bytes()
        except OSError as e:
            raise DeviceError(f"cannot read the ESP's free space: {e}", hint="check that the ESP is mounted") from None

    def install_files(self, version: str, slot: str, files: dict[str, Path]) -> str:
        """The slot's boot files to ``/abflip/<version>-<slot>/`` (streamed, atomic each, synced;
        the directory is returned). Nothing references them yet: a failure removes what was
        written and changes nothing that boots."""
        bdir = boot_dir(version, slot)
        try:
            for name, path in files.items():
                self.esp.copy_in(f"{bdir}/{name}", path)
            self.esp.sync()
        except OSError as e:
            with contextlib.suppress(OSError):
                self.esp.remove_tree(bdir)
            raise DeviceError(f"writing boot files to the ESP failed: {e}",
                              hint="check the ESP is mounted and has room; nothing boots the new slot") from None
        return bdir

    def check_spec(self, spec: BootSpec) -> None:
        """Refuse (RepositoryError) a spec whose fields cannot go into an entry, before any write."""
        self.entry_text(spec)

    @staticmethod
    def entry_text(spec: BootSpec) -> str:
        return entry_text(product=spec.product, version=spec.version, slot=spec.slot, partlabel=spec.partlabel,
                          options=spec.options, has_initrd="initrd.img" in spec.files, uki="uki.efi" in spec.files,
                          verity=spec.verity)

    def add_trial(self, spec: BootSpec, tries: int) -> Entry:
        """The entry that boots ``spec`` next, ``tries`` times before systemd-boot falls back."""
        entry = new_entry(spec.version, spec.slot, tries)
        write_entry(self.esp, entry, self.entry_text(spec))
        return entry

    def add_default(self, spec: BootSpec) -> Entry:
        """A blessed entry for ``spec`` (no counter)."""
        counted = new_entry(spec.version, spec.slot, 1)
        entry = Entry(blessed_name(counted), spec.version, spec.slot, None, 0)
        write_entry(self.esp, entry, self.entry_text(spec))
        return entry

    def bless(self, entry: Entry) -> Entry:
        return bless(self.esp, entry)

    def mark_bad(self, entry: Entry) -> Entry:
        return mark_bad(self.esp, entry)

    def unmark(self, marked: Entry, original: Entry) -> None:
        """Undo :meth:`mark_bad` (the rename back), synced."""
        self.esp.rename(entry_path(marked), entry_path(original))
        self.esp.sync()

    def remove_slot(self, slot: str, *, keep: str | None = None, counting_only: bool = False) -> list[str]:
        """Remove every entry of ``slot`` (but ``keep``, a name; only those that count tries with
        ``counting_only``), synced (invariant 2: before a slot is written nothing may boot it)."""
        removed = []
        with _guard("removing boot entries"):
            for e in list_entries(self.esp):
                if e.slot == slot and e.name != keep and (e.counting or not counting_only):
                    self.esp.remove(entry_path(e))
                    removed.append(e.name)
            if removed or (keep is None and not counting_only):
                self.esp.sync()
        return removed

    def saved_slot(self, slot: str) -> dict[str, bytes]:
        """The bytes of ``slot``'s entries, to :meth:`restore` after a failed change."""
        try:
            return {entry_path(e): self.esp.read(entry_path(e)) for e in list_entries(self.esp) if e.slot == slot}
        except OSError as e:
            raise DeviceError(f"cannot read slot {slot}'s entries on the ESP: {e}", hint="nothing was changed") from None

    def restore(self, saved: dict[str, bytes]) -> None:
        for path, data in saved.items():
            if not self.esp.exists(path):
                self.esp.write_atomic(path, data)
        self.esp.sync()

    # -- hygiene -----------------------------------------------------------------------------
    def prune(self, keep: dict[str, str | None]) -> None:
        """Only entries of the versions in ``keep`` (see :func:`prune_entries`) and boot files an
        entry references remain."""
        prune_entries(self.esp, keep)
        prune_boot_files(self.esp)

    def prune_files(self) -> list[str]:
        return prune_boot_files(self.esp)

    def sweep(self) -> list[str]:
        """Remove the ESP's ``.abflip-tmp`` names a killed write left in ``loader/entries`` and
        ``abflip/*``. Best effort."""
        removed: list[str] = []
        try:
            for d in [ENTRIES_DIR] + [f"abflip/{n}" for n in self.esp.listdir("abflip")]:
                for n in self.esp.listdir(d):
                    if _ESP_TEMPS.search(n):
                        self.esp.remove(f"{d}/{n}")
                        removed.append(f"esp:{d}/{n}")
        except (OSError, ValueError):
            pass
        return removed
