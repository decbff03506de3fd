"""The two root slots: raw access to the inactive one, and what a slot's device is.

Which slot is booted is the boot loader's word (:meth:`applier.bootloader.Bootloader.booted`);
when neither the loader nor the kernel command line tells, nothing is written (invariant 1:
never write the booted slot).

Invariant 1 holds whatever the configuration says: :class:`SlotDevice` refuses to open a
slot for writing when its device overlaps the booted slot's device (:func:`overlaps`: the
same node, a symlink or hard link to it, another node of the same disk, a disk and one of its
partitions, two partitions whose sectors intersect, or a device stacked on the other (a loop
device over the image file, device-mapper over the partition, a file on its filesystem).
The check is made on the path and again on the opened descriptor (``fstat``), so swapping a
symlink between the two cannot redirect the write. A block device opened for writing is
opened ``O_EXCL``: Linux refuses it while it is mounted or claimed, as mkfs does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import math
import mmap
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from metadata.errors import DeviceError


WRITE_PIECE = 256 << 10
VERIFY_PIECE = 4 << 20

SYSFS = Path("/sys")

__all__ = ["SlotDevice", "device_identity", "other_slot", "overlaps", "slot_hash_ok"]

def other_slot(slot: str) -> str:
    return {"a": "b", "b": "a"}[slot]


# --- device identity -------------------------------------------------------------------------
# An identity is ("block", major, minor) for a block device and ("file", st_dev, st_ino) for
# anything else. An extent is (identity of a whole disk or file, first sector, end sector).

Identity = tuple
_Extent = tuple[Identity, float, float]
_MAX_DEPTH = 8  # device stacking depth we follow (loop over dm over a partition ...)


def device_identity(path: os.PathLike | str) -> Identity:
    """What ``path`` (symlinks resolved) names: its block device number, or its inode. Raises OSError."""
    return _identity(os.stat(path))


def _identity(st: os.stat_result) -> Identity:
    if stat.S_ISBLK(st.st_mode):
        return ("block", os.major(st.st_rdev), os.minor(st.st_rdev))
    return ("file", st.st_dev, st.st_ino)


def overlaps(p1: os.PathLike | str, p2: os.PathLike | str, *, sysfs: Path = SYSFS) -> bool:
    """Whether writing one of the two paths can change the bytes of the other. Raises OSError if
    either does not exist. Two different partitions of one disk do not overlap (unless their
    sectors do); two device-mapper volumes on one disk are taken to be apart, as LVM keeps them."""
    return _identities_overlap(device_identity(p1), device_identity(p2), sysfs)


def _identities_overlap(i1: Identity, i2: Identity, sysfs: Path) -> bool:
    if i1 == i2:
        return True
    own1, own2 = _own_extents(i1, sysfs), _own_extents(i2, sysfs)
    return (_intersect(own1, own2) or _intersect(own1, _below(i2, sysfs, 0))
            or _intersect(_below(i1, sysfs, 0), own2))


def _intersect(xs: set[_Extent], ys: set[_Extent]) -> bool:
    return any(kx == ky and sx < ey and sy < ex for kx, sx, ex in xs for ky, sy, ey in ys)


def _sys_dir(ident: Identity, sysfs: Path) -> Path | None:
    if ident[0] != "block":
        return None
    d = sysfs / "dev" / "block" / f"{ident[1]}:{ident[2]}"
    return d if d.is_dir() else None


def _read_dev(path: Path) -> Identity | None:
    try:
        major, minor = path.read_text().strip().split(":")
        return ("block", int(major), int(minor))
    except (OSError, ValueError):
        return None


def _partition_of(d: Path) -> tuple[Identity, int, int] | None:
    """(whole disk, start sector, size in sectors) when the sysfs directory ``d`` is a partition."""
    if not (d / "partition").exists():
        return None
    disk = _read_dev(d.resolve().parent / "dev")
    try:
        start, size = int((d / "start").read_text()), int((d / "size").read_text())
    except (OSError, ValueError):
        return None
    return (disk, start, start + size) if disk else None


def _own_extents(ident: Identity, sysfs: Path) -> set[_Extent]:
    """The sectors ``ident`` itself is: a partition is a range of its disk; anything else is whole."""
    d = _sys_dir(ident, sysfs)
    part = _partition_of(d) if d else None
    return {part} if part else {(ident, 0, math.inf)}


def _below(ident: Identity, sysfs: Path, depth: int) -> set[_Extent]:
    """The extents of every device ``ident`` is stored on: a file's filesystem device, a
    partition's disk's own lower devices, a loop device's backing file, dm/md slaves."""
    if depth > _MAX_DEPTH:
        return set()
    lower: list[Identity] = []
    if ident[0] == "file":
        lower.append(("block", os.major(ident[1]), os.minor(ident[1])))
    d = _sys_dir(ident, sysfs)
    if d is not None:
        part = _partition_of(d)
        if part:
            return _below(part[0], sysfs, depth + 1)
        try:
            backing = (d / "loop" / "backing_file").read_text().strip()
        except OSError:
            backing = ""
        if backing:
            try:
                lower.append(device_identity(backing.removesuffix(" (deleted)")))
            except OSError:
                pass
        try:
            slaves = list((d / "slaves").iterdir())
        except OSError:
            slaves = []
        lower.extend(i for s in slaves if (i := _read_dev(s / "dev")))
    out: set[_Extent] = set()
    for low in lower:
        if low[0] == "block" and _sys_dir(low, sysfs) is None:
            continue  # a filesystem without a block device (tmpfs, overlayfs): nothing below
        out |= _own_extents(low, sysfs) | _below(low, sysfs, depth + 1)
    return out


class SlotDevice:
    """A slot's block device (or a pre-sized file in tests), opened for positional I/O.

    With ``write`` and ``booted`` (the booted slot's device), refuses to open a device that
    overlaps the booted one (checked on the path, then on the opened descriptor)."""

    def __init__(self, name: str, path: os.PathLike, *, write: bool, booted: os.PathLike | None = None,
                 sysfs: Path = SYSFS) -> None:
        self.name = name
        self.path = path
        self.fd = -1
        booted_id = None
        if write and booted is not None:
            try:
                booted_id = device_identity(booted)
            except OSError:
                booted_id = None  # no booted device node to protect (a misconfigured booted slot fails elsewhere)
        if booted_id is not None:
            try:
                target_id = device_identity(path)
            except OSError:
                target_id = None  # the open below reports it
            if target_id is not None and _identities_overlap(target_id, booted_id, sysfs):
                raise self._refusal(booted)
        flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO must not hang
        try:
            pre = os.stat(path)
        except OSError:
            pre = None
        if write and pre is not None and stat.S_ISBLK(pre.st_mode):
            flags |= os.O_EXCL  # a block device: not while mounted or claimed (as mkfs opens it)
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise DeviceError(f"slot {name} device {path} does not exist") from None
        except IsADirectoryError:
            raise self._not_a_slot("is a directory") from None
        except PermissionError:
            raise DeviceError(f"slot {name} device {path} cannot be opened for {'writing' if write else 'reading'}",
                              hint="run as root, and check the device is not read-only") from None
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise DeviceError(f"slot {name} device {path} is in use (mounted, or held by another program); "
                                  "refusing to write it", hint="unmount it; nothing was written") from None
            raise DeviceError(f"cannot open slot {name} device {path}: {e.strerror}") from None
        try:
            st = os.fstat(self.fd)
            if stat.S_ISDIR(st.st_mode):
                raise self._not_a_slot("is a directory")
            if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
                raise self._not_a_slot("is neither")
            if booted_id is not None and _identities_overlap(_identity(st), booted_id, sysfs):
                raise self._refusal(booted)  # the path changed between the check and the open
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            self.capacity = os.lseek(self.fd, 0, os.SEEK_END)
        except BaseException:
            self.close()
            raise

    def _not_a_slot(self, what: str) -> DeviceError:
        return DeviceError(f"slot {self.name} device {self.path} {what}, not a block device or image file",
                           hint=f"check that the slot {self.name} device (slots.{self.name} in the configuration, "
                           "or its partition label) names the partition")

    def _refusal(self, booted: os.PathLike) -> DeviceError:
        other = other_slot(self.name) if self.name in ("a", "b") else "booted"
        return DeviceError(f"refusing to write slot {self.name}: its device {self.path} is the booted slot {other}'s "
                           f"device {booted} (the same node, a link to it, or a disk and its partition)",
                           hint="fix slots.a / slots.b (device or partlabel) so they name two different partitions; "
                           "nothing was written")

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
        self.pread_into(offset, memoryview(out))
        return out

    def pread_into(self, offset: int, into: memoryview) -> None:
        """Fill ``into`` from ``offset``; a short read or an I/O error is a DeviceError."""
        done = 0
        try:
            while done < len(into):
                n = os.preadv(self.fd, [into[done:]], offset + done)
                if not n:
                    raise DeviceError(f"slot {self.name} ends at {offset + done}, cannot read {len(into)} bytes at "
                                      f"{offset}")
                done += n
        except OSError as e:
            raise DeviceError(f"reading slot {self.name} at byte {offset + done} failed: {e}") from None

    @contextlib.contextmanager
    def mapped(self, offset: int, length: int) -> Iterator[memoryview]:
        """``length`` bytes from ``offset`` as a read-only view of the slot's page cache (mmap),
        unmapped on exit: for reading back more than a buffer should hold (a wide dictionary).
        Clean file pages, reclaimable, not the process's own memory. A sector that cannot be
        read ends the process with SIGBUS, as a power cut would: nothing is flipped, and a
        resume re-verifies what was written."""
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(self.fd, offset + length - base, offset=base, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise DeviceError(f"reading slot {self.name} at byte {offset} failed: {e}") from None
        view = memoryview(mm)
        try:
            with view[offset - base:] as v:
                yield v
        finally:
            view.release()
            mm.close()

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):  # in pieces: one huge pwrite is several times slower (bench/apply.py)
                done += os.pwrite(self.fd, view[done:done + WRITE_PIECE], offset + done)
        except OSError as e:
            raise DeviceError(f"writing slot {self.name} at byte {offset + done} failed: {e}") from None

    def start_writeback(self, offset: int, length: int) -> None:
        """Have the kernel start writing ``length`` bytes from ``offset`` to the device now
        (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait), instead of all of them
        at the final :meth:`sync`: that one flush then finds little left, and dirty memory stays
        about a chunk. Where the call does not exist this does nothing; an error is a write error."""
        call = _sync_file_range()
        if call is None:
            return
        if call(self.fd, offset, length, SYNC_FILE_RANGE_WRITE):
            import ctypes

            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE):
                raise DeviceError(f"writing slot {self.name} at byte {offset} failed: {os.strerror(err)}")

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise DeviceError(f"flushing slot {self.name} failed: {e}") from None


SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def libc():
    """The C library through ctypes, loaded on first use (status and boot-check import this
    module and never call into it), or None where it cannot be loaded."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


@functools.cache
def _sync_file_range():
    """libc's ``sync_file_range``, or None where there is none."""
    fn = getattr(libc(), "sync_file_range", None)
    if fn is not None:
        import ctypes

        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


def slot_hash_ok(session, slot: str, sha: str, size: int) -> bool:
    """The first ``size`` bytes of ``slot`` hash to ``sha`` (read-only; ``session``: an
    :class:`applier.session.Session`, which is told the progress)."""
    import hashlib  # here: status and boot-check import this module, only rollback and apply hash a slot

    h = hashlib.sha256()
    with SlotDevice(slot, session.config.slots[slot].device, write=False) as sd:
        if sd.capacity < size:
            return False
        for off in range(0, size, VERIFY_PIECE):
            h.update(sd.pread(off, min(VERIFY_PIECE, size - off)))
            session.emit(phase="verify", slot=slot, bytes=min(size, off + VERIFY_PIECE), total_bytes=size)
    return h.hexdigest() == sha
