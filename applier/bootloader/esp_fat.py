"""The ESP as a FAT filesystem image or block device, reached through mtools.

`FatImageEsp` implements the applier's `Esp` interface (see `applier/esp.py`) without mounting anything: every
operation is one or a few mtools subprocesses (`mdir`, `mcopy`, `mmove`, `mmd`, `mdel`, `mdeltree`). It serves
where the kernel cannot mount vfat (containers, CI) and in the end-to-end tests, where the ESP is partition 1 of a
QEMU disk image: `FatImageEsp("disk.img", offset=1 << 20)` addresses the filesystem at that byte offset
(mtools' `image@@offset` syntax).

Paths are relative to the ESP root with `/` separators (`"loader/entries"`); a leading `/` is ignored. FAT is
case-insensitive but case-preserving: `exists("LOADER/ENTRIES")` is true when `loader/entries` exists, and
`listdir` returns names as stored. Long (VFAT) names carry characters such as `+` unchanged
(`abflip-2.0.0-b+3.conf`); mtools derives a mangled 8.3 alias by itself.

Atomicity: one mtools process reads the FAT, changes it in memory and writes it back when it exits, so each call
is all-or-nothing against other callers, but FAT itself has no journal. `rename` rewrites one directory entry
(plus the deletion of an overwritten target) inside a single directory cluster, the same guarantee systemd-boot
relies on when it renames an entry to count a boot. `write_atomic` writes `<name>.abflip-tmp` (or, for a bare 8.3
name, `<base>.~ab`; see `_temp_name`) and renames it over the target; a killed run leaves at most that temp file,
which the next write of the same path overwrites. `sync` fsyncs the image file or device.

Errors: a missing path raises `FileNotFoundError`; a wrong kind of path `IsADirectoryError`/`NotADirectoryError`;
every other mtools failure `EspError` (an `OSError`) carrying the command and mtools' message.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence

__all__ = ["EspError", "FatImageEsp"]

# mtools expands these as wildcards in its file arguments; a path containing one would address other files.
_WILDCARDS = frozenset("*?[]")
_FREE_RE = re.compile(r"([\d ,.]+) bytes free")
_TMP_SUFFIX = ".abflip-tmp"
# Characters a FAT short (8.3) name may hold besides letters and digits.
_SHORT_EXTRA = frozenset("!#$%&'()-@^_`{}~")


class EspError(OSError):
    """An mtools command on the ESP failed for a reason other than a missing path."""


def _mtools_env() -> dict[str, str]:
    env = dict(os.environ)
    # Partitions made by mkfs.fat --offset, or images not matching the drive geometry in mtools.conf, are refused
    # without this.
    env["MTOOLS_SKIP_CHECK"] = "1"
    # Never let mtools read a user's ~/.mtoolsrc with other drive letters or name-mangling settings.
    env["MTOOLSRC"] = "/dev/null"
    return env


def _normalize(path: str) -> str:
    """Return `path` relative to the ESP root, `/`-separated, without empty or `.` components ("" is the root)."""
    if "\\" in path:
        path = path.replace("\\", "/")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise ValueError(f"ESP path must not contain '..': {path!r}")
        if _WILDCARDS.intersection(part):
            raise ValueError(f"ESP path must not contain mtools wildcard characters {sorted(_WILDCARDS)}: {path!r}")
        if "\0" in part or "\n" in part:
            raise ValueError(f"ESP path contains a control character: {path!r}")
    return "/".join(parts)


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name


def _short_only(name: str) -> tuple[str, str] | None:
    """(base, ext) if FAT stores `name` as a bare 8.3 entry (no long name), keeping its case only through the
    entry's lowercase flags; None when it needs a VFAT long name (too long, '+', mixed case in a part, ...)."""
    base, dot, ext = name.partition(".")
    if not base or len(base) > 8 or len(ext) > 3 or "." in ext or (dot and not ext):
        return None
    for part in (base, ext):
        if not all(c.isascii() and (c.isalnum() or c in _SHORT_EXTRA) for c in part):
            return None
        letters = [c for c in part if c.isalpha()]
        if letters and not (all(c.islower() for c in letters) or all(c.isupper() for c in letters)):
            return None
    return base, ext


def _temp_name(name: str) -> str:
    """The temporary name `write_atomic` renames from.

    mtools 4.0.32 renames carry the source entry's lowercase flags over to a destination stored as a bare 8.3 name
    (renaming `vmlinuz.abflip-tmp` to `vmlinuz` shows `VMLINUZ`), so for such a destination the temp name is itself
    a bare 8.3 name with the same base and the same case in its extension: `vmlinuz.~ab` -> `vmlinuz`,
    `BOOTX64.~AB` -> `BOOTX64.EFI`. Any other destination has a long name, which keeps its case by itself.
    """
    short = _short_only(name)
    if short is None:
        return name + _TMP_SUFFIX
    base, ext = short
    tmp_ext = "~ab" if ext.casefold() != "~ab" else "~ac"
    if ext.isupper():
        tmp_ext = tmp_ext.upper()
    return f"{base}.{tmp_ext}"


class FatImageEsp:
    """An ESP held in a FAT image file, in a partition of a disk image at `offset`, or on a block device."""

    def __init__(self, image_path: str | os.PathLike[str], offset: int = 0) -> None:
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self.image_path = os.fspath(image_path)
        self.offset = offset
        self._drive = f"{self.image_path}@@{offset}" if offset else self.image_path

    def __repr__(self) -> str:
        return f"FatImageEsp({self.image_path!r}, offset={self.offset})"

    # ----------------------------------------------------------------------------------------------- plumbing

    def _target(self, path: str) -> str:
        return "::/" + path

    def _run(self, tool: str, args: Sequence[str], *, path: str, binary: bool = False) -> subprocess.CompletedProcess:
        """Run one mtools command; map its failure to an OSError subclass naming `path`."""
        cmd = [tool, "-i", self._drive, *args]
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=_mtools_env(),
                check=False,
            )
        except FileNotFoundError as exc:
            raise EspError(
                errno.ENOENT, f"mtools is not installed ({tool} not found); install the mtools package"
            ) from exc
        if proc.returncode != 0:
            message = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(errors="replace").strip()
            if "not found" in message.lower():
                raise FileNotFoundError(errno.ENOENT, f"{path or '/'} not found on ESP {self!r}: {message}", path)
            raise EspError(
                errno.EIO,
                f"{tool} failed on ESP {self!r} for {path or '/'!r} "
                f"(exit {proc.returncode}): {message or 'no message'}",
            )
        if not binary:
            proc.stdout = proc.stdout.decode(errors="surrogateescape")
        return proc

    def _list(self, path: str) -> list[tuple[str, bool]] | None:
        """Entries of directory `path` as (name, is_dir); None if `path` is missing. Raises if it is a file."""
        target = self._target(path)
        try:
            out = self._run("mdir", ["-b", "-a", target], path=path).stdout
        except FileNotFoundError:
            return None
        prefix = target if target.endswith("/") else target + "/"
        entries: list[tuple[str, bool]] = []
        for line in out.splitlines():
            if not line:
                continue
            if not line.startswith(prefix):
                # mdir -b on a file prints the file's own path.
                raise NotADirectoryError(errno.ENOTDIR, f"not a directory on ESP {self!r}", path)
            rest = line[len(prefix) :]
            is_dir = rest.endswith("/")
            name = rest.rstrip("/")
            if name in ("", ".", ".."):
                continue
            entries.append((name, is_dir))
        return entries

    def _kind(self, path: str) -> str | None:
        """'dir', 'file' or None (missing) for `path` (normalized)."""
        if path == "":
            return "dir"
        parent, name = _split(path)
        try:
            entries = self._list(parent)
        except NotADirectoryError:
            return None
        if entries is None:
            return None
        folded = name.casefold()
        for entry, is_dir in entries:
            if entry.casefold() == folded:
                return "dir" if is_dir else "file"
        return None

    # ------------------------------------------------------------------------------------------------ the Esp API

    def listdir(self, path: str) -> list[str]:
        """Names in directory `path` (files and directories, as stored); [] if the directory is missing."""
        entries = self._list(_normalize(path))
        return sorted(name for name, _ in entries) if entries else []

    def read(self, path: str) -> bytes:
        """The whole content of file `path`."""
        path = _normalize(path)
        kind = self._kind(path)
        if kind is None:
            raise FileNotFoundError(errno.ENOENT, f"{path} not found on ESP {self!r}", path)
        if kind == "dir":
            raise IsADirectoryError(errno.EISDIR, f"is a directory on ESP {self!r}", path)
        return self._run("mcopy", ["-n", self._target(path), "-"], path=path, binary=True).stdout

    def exists(self, path: str) -> bool:
        """True if `path` names a file or directory (case-insensitively, as FAT does)."""
        return self._kind(_normalize(path)) is not None

    def makedirs(self, path: str) -> None:
        """Create directory `path` and any missing parents; existing directories are fine."""
        path = _normalize(path)
        if not path:
            return
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            kind = self._kind(sub)
            if kind == "dir":
                continue
            if kind == "file":
                raise NotADirectoryError(errno.ENOTDIR, f"a file is in the way on ESP {self!r}", sub)
            self._run("mmd", [self._target(sub)], path=sub)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write `data` to a temporary name in the same directory, then rename it over `path`."""
        path = _normalize(path)
        if not path:
            raise IsADirectoryError(errno.EISDIR, "cannot write the ESP root", path)
        parent, name = _split(path)
        self.makedirs(parent)
        if self._kind(path) == "dir":
            raise IsADirectoryError(errno.EISDIR, f"is a directory on ESP {self!r}", path)
        tmp = f"{parent}/{_temp_name(name)}" if parent else _temp_name(name)
        with tempfile.NamedTemporaryFile(prefix="abflip-esp-") as local:
            local.write(data)
            local.flush()
            # -D o: overwrite a stale temp file left by a killed run (never prompt).
            self._run("mcopy", ["-D", "o", local.name, self._target(tmp)], path=tmp)
        self._rename_over(tmp, path)

    def copy_in(self, path: str, src: os.PathLike[str] | str) -> None:
        """Copy the local file ``src`` to ``path`` (mcopy streams it), through a temp name."""
        path = _normalize(path)
        parent, name = _split(path)
        self.makedirs(parent)
        if self._kind(path) == "dir":
            raise IsADirectoryError(errno.EISDIR, f"is a directory on ESP {self!r}", path)
        tmp = f"{parent}/{_temp_name(name)}" if parent else _temp_name(name)
        self._run("mcopy", ["-D", "o", os.fspath(src), self._target(tmp)], path=tmp)
        self._rename_over(tmp, path)

    def rename(self, src: str, dst: str) -> None:
        """Rename `src` to `dst`, replacing a file at `dst`.

        Case caveat (mtools 4.0.32): when `dst` fits a bare 8.3 name, it takes the stored case of `src` (a long-named
        source gives upper case). Names with a long name (every boot entry: `abflip-1.0.0-a.conf`) keep their case.
        """
        src, dst = _normalize(src), _normalize(dst)
        if not src or not dst:
            raise ValueError("cannot rename the ESP root")
        if self._kind(src) is None:
            raise FileNotFoundError(errno.ENOENT, f"{src} not found on ESP {self!r}", src)
        if self._kind(dst) == "dir" and src.casefold() != dst.casefold():
            raise IsADirectoryError(errno.EISDIR, f"rename target is a directory on ESP {self!r}", dst)
        self._rename_over(src, dst)

    def _rename_over(self, src: str, dst: str) -> None:
        if src == dst:
            return
        if src.casefold() == dst.casefold():
            # A case-only rename: mtools would see a clash with the file itself; go through a third name.
            step = src + _TMP_SUFFIX + "-case"
            self._run("mmove", ["-D", "o", self._target(src), self._target(step)], path=src)
            src = step
        self._run("mmove", ["-D", "o", self._target(src), self._target(dst)], path=src)

    def remove(self, path: str) -> None:
        """Delete file `path`; a missing file is fine."""
        path = _normalize(path)
        kind = self._kind(path)
        if kind is None:
            return
        if kind == "dir":
            raise IsADirectoryError(errno.EISDIR, f"is a directory on ESP {self!r} (use remove_tree)", path)
        try:
            self._run("mdel", [self._target(path)], path=path)
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        """Delete `path` and everything under it (a file or a directory); missing is fine."""
        path = _normalize(path)
        if not path:
            raise ValueError("refusing to remove the ESP root")
        kind = self._kind(path)
        if kind is None:
            return
        tool = "mdeltree" if kind == "dir" else "mdel"
        try:
            self._run(tool, [self._target(path)], path=path)
        except FileNotFoundError:
            pass

    def sync(self) -> None:
        """Flush the image file or block device to stable storage."""
        fd = os.open(self.image_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def free_bytes(self) -> int:
        """Free space on the filesystem, in bytes."""
        out = self._run("mdir", [self._target("")], path="").stdout
        matches = _FREE_RE.findall(out)
        if not matches:
            raise EspError(errno.EIO, f"cannot parse free space from mdir output on ESP {self!r}: {out[-200:]!r}")
        return int(re.sub(r"\D", "", matches[-1]))
