r"""A simulated device: files as slots, a directory as the ESP, a file as /proc/cmdline,
a directory as efivarfs, and a model of systemd-boot's entry selection.

The model follows systemd-boot 252 (src/boot/efi/boot.c ``boot_entry_compare`` and its
boot counting), as seen on real OVMF firmware (DESIGN.md):
- Type #1 entries are ``loader/entries/*.conf``; a name ``x+L-D.conf`` counts tries
  (L left, D done); the entry id is the name without the counter.
- Order: entries with no tries left go last; entries with a sort-key go before those without;
  between two with sort-keys: sort-key ascending, then version descending; then id descending.
- The default is the first entry (no ``default`` in loader.conf, no EFI override). With
  tries left it is renamed ``x+(L-1)-(D+1).conf`` before the kernel starts.
- It tells the OS through ``LoaderEntrySelected`` (the file name *before* the rename,
  lowercased, as seen on OVMF) and ``LoaderBootCountPath`` (``\loader\entries\<name after
  the rename>``, only for counted entries).

It deliberately parses entries itself rather than use :mod:`applier.bootloader.systemd_boot`, so a test that
boots the model checks the applier's output against an independent reading.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from applier.config import Config
from applier.context import LOADER_GUID, Context

__all__ = ["BootOutcome", "SimDevice", "select_entry", "strverscmp_improved"]

_COUNTER = re.compile(r"^(?P<id>.+?)\+(?P<left>\d+)(?:-(?P<done>\d+))?\.conf$")


def strverscmp_improved(a: str | None, b: str | None) -> int:
    """systemd's version comparison (src/fundamental/string-util-fundamental.c), simplified:
    '~' sorts before anything, '-' and '^' separate, digit runs compare numerically."""
    a, b = a or "", b or ""
    while True:
        a = re.sub(r"^[^0-9A-Za-z~^.-]+", "", a)
        b = re.sub(r"^[^0-9A-Za-z~^.-]+", "", b)
        for ch in ("~", "-", "^", "."):
            if a.startswith(ch) or b.startswith(ch):
                if not a.startswith(ch):
                    return 1 if ch == "~" else -1
                if not b.startswith(ch):
                    return -1 if ch == "~" else 1
                a, b = a[1:], b[1:]
                break
        else:
            if not a or not b:
                return (len(a) > 0) - (len(b) > 0)
            if a[0].isdigit() or b[0].isdigit():
                if not a[0].isdigit():
                    return -1
                if not b[0].isdigit():
                    return 1
                na = re.match(r"\d+", a).group()  # type: ignore[union-attr]
                nb = re.match(r"\d+", b).group()  # type: ignore[union-attr]
                ia, ib = int(na), int(nb)
                if ia != ib:
                    return -1 if ia < ib else 1
                a, b = a[len(na):], b[len(nb):]
            else:
                sa = re.match(r"[A-Za-z]+", a).group()  # type: ignore[union-attr]
                sb = re.match(r"[A-Za-z]+", b).group()  # type: ignore[union-attr]
                if sa != sb:
                    return -1 if sa < sb else 1
                a, b = a[len(sa):], b[len(sb):]


@dataclass(frozen=True)
class LoaderEntry:
    file: str
    id: str
    tries_left: int | None
    tries_done: int
    sort_key: str | None
    version: str | None
    options: str


def parse_loader_entry(file: str, text: str) -> LoaderEntry:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition(" ")
            fields[k] = v.strip()
    m = _COUNTER.match(file)
    if m:
        ident, left, done = m.group("id") + ".conf", int(m.group("left")), int(m.group("done") or 0)
    else:
        ident, left, done = file, None, 0
    return LoaderEntry(file, ident, left, done, fields.get("sort-key"), fields.get("version"), fields.get("options", ""))


def _compare(a: LoaderEntry, b: LoaderEntry) -> int:
    r = (a.tries_left == 0) - (b.tries_left == 0)
    if r:
        return r
    r = (a.sort_key is None) - (b.sort_key is None)
    if r:
        return r
    if a.sort_key and b.sort_key:
        if a.sort_key != b.sort_key:
            return -1 if a.sort_key < b.sort_key else 1
        r = -strverscmp_improved(a.version, b.version)
        if r:
            return r
    r = -strverscmp_improved(a.id, b.id)
    if r:
        return r
    if a.tries_left is None or b.tries_left is None:
        return 0
    r = -((a.tries_left > b.tries_left) - (a.tries_left < b.tries_left))
    return r or (a.tries_done > b.tries_done) - (a.tries_done < b.tries_done)


def select_entry(entries: list[LoaderEntry]) -> LoaderEntry | None:
    ordered = sorted(entries, key=functools.cmp_to_key(_compare))
    return ordered[0] if ordered else None


def _efivar(value: str) -> bytes:
    return (7).to_bytes(4, "little") + (value + "\x00").encode("utf-16-le")


@dataclass(frozen=True)
class BootOutcome:
    entry: str  # file name after the loader's rename
    slot: str | None
    options: str


class SimDevice:
    """A device in a directory. ``boot()`` plays systemd-boot once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.esp = self.root / "esp"
        self.cmdline = self.root / "cmdline"
        self.efivars = self.root / "efivars"
        self.state_dir = self.root / "state"
        self.config_path = self.root / "abflip.toml"

    @classmethod
    def create(cls, root: Path, *, repository_url: str, trusted_root: bytes, product: str, hardware_id: str,
               slot_size: int, channel: str = "stable", tries: int = 3, retries: int = 3,
               timeout: float = 10.0, windows: list[str] | None = None, hook_timeout: float = 10.0,
               extra: str = "") -> SimDevice:
        """``windows``: maintenance windows (none: apply any time); ``extra``: TOML appended to the config."""
        dev = cls(root)
        dev.root.mkdir(parents=True, exist_ok=True)
        for p in (dev.esp / "loader" / "entries", dev.efivars, dev.state_dir):
            p.mkdir(parents=True, exist_ok=True)
        (dev.esp / "loader" / "loader.conf").write_text("timeout 0\n")
        for s in "ab":
            with open(dev.root / f"slot-{s}.img", "wb") as f:
                f.truncate(slot_size)
        (dev.root / "root.json").write_bytes(trusted_root)
        dev.config_path.write_text(f"""\
[repository]
url = "{repository_url}"
trusted_root = "root.json"

[device]
product = "{product}"
channel = "{channel}"
hardware_id = "{hardware_id}"

[slots]
a = {{ device = "slot-a.img", partlabel = "root-a" }}
b = {{ device = "slot-b.img", partlabel = "root-b" }}

[paths]
esp = "esp"
state_dir = "state"
cmdline = "cmdline"
efivars = "efivars"

[boot]
tries = {tries}

[network]
timeout = {timeout}
retries = {retries}

[maintenance]
windows = {json.dumps(windows or [])}
reboot_command = []

[hooks]
dir = "hooks"
timeout = {hook_timeout}
{extra}""")
        dev.cmdline.write_text("root=PARTLABEL=root-a abflip.slot=a ro\n")
        return dev

    @property
    def config(self) -> Config:
        return Config.load(self.config_path)

    @property
    def context(self) -> Context:
        return Context(cmdline=self.cmdline, efivars=self.efivars)

    @property
    def hooks(self) -> Path:
        return self.root / "hooks"

    def add_hook(self, kind: str, name: str, script: str) -> Path:
        """An executable hook ``hooks/<kind>.d/<name>`` running ``script`` with /bin/sh."""
        d = self.hooks / f"{kind}.d"
        d.mkdir(parents=True, exist_ok=True)
        p = d / name
        p.write_text("#!/bin/sh\n" + script + "\n")
        p.chmod(0o755)
        return p

    def slot_path(self, slot: str) -> Path:
        return self.root / f"slot-{slot}.img"

    def entries(self) -> list[str]:
        return sorted(os.listdir(self.esp / "loader" / "entries"))

    def boot(self) -> BootOutcome:
        """One power-on: select, count down, 'start the kernel' (write cmdline and EFI vars)."""
        edir = self.esp / "loader" / "entries"
        entries = [parse_loader_entry(f, (edir / f).read_text()) for f in sorted(os.listdir(edir))
                   if f.endswith(".conf") and not f.startswith(".")]
        chosen = select_entry(entries)
        if chosen is None:
            raise RuntimeError("no boot entry: the device would not boot")
        name = chosen.file
        if chosen.tries_left is not None and chosen.tries_left > 0:
            name = f"{chosen.id[:-len('.conf')]}+{chosen.tries_left - 1}-{chosen.tries_done + 1}.conf"
            os.rename(edir / chosen.file, edir / name)
        self.cmdline.write_text(chosen.options + "\n")
        for var, value in (("LoaderEntrySelected", chosen.file.lower()),
                           ("LoaderBootCountPath", f"\\loader\\entries\\{name}")):
            (self.efivars / f"{var}-{LOADER_GUID}").write_bytes(_efivar(value))
        if chosen.tries_left is None:
            (self.efivars / f"LoaderBootCountPath-{LOADER_GUID}").unlink(missing_ok=True)
        slot = next((a.split("=", 1)[1] for a in chosen.options.split() if a.startswith("abflip.slot=")), None)
        return BootOutcome(name, slot, chosen.options)

    def provision(self, image: Path, *, slot: str, version: str, product: str, kernel: bytes = b"kernel",
                  initrd: bytes | None = b"initrd", options: str = "ro") -> None:
        """Factory install: write ``image`` into ``slot`` and a blessed entry for it, boot it."""
        import shutil

        with open(image, "rb") as src, open(self.slot_path(slot), "r+b") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        bdir = self.esp / "abflip" / version
        bdir.mkdir(parents=True, exist_ok=True)
        (bdir / "vmlinuz").write_bytes(kernel)
        lines = [f"title {product} {version} (slot {slot})", f"version {version}", "sort-key abflip",
                 f"linux /abflip/{version}/vmlinuz"]
        if initrd is not None:
            (bdir / "initrd.img").write_bytes(initrd)
            lines.append(f"initrd /abflip/{version}/initrd.img")
        lines.append(f"options root=PARTLABEL=root-{slot} abflip.slot={slot} {options}")
        (self.esp / "loader" / "entries" / f"abflip-{version}-{slot}.conf").write_text("\n".join(lines) + "\n")
        self.boot()
