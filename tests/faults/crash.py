"""Power-cut model (in the spirit of ALICE and CrashMonkey): what a kill does not show.

The file operations a command made (recorded with strace) are replayed onto its pre-state,
keeping only what was durable at each crash point:
- file data (write, pwrite, ftruncate) is durable once the file is fsynced (or ``sync``);
- a name operation (create, rename, unlink, mkdir, rmdir) is durable once its parent
  directory is fsynced (both parents for a rename) (or ``sync``).
At each crash point two states are produced: *durable only* (everything not yet durable
is lost) and *names kept, data lost* (every name operation happened, unsynced data did
not: the empty-file-after-rename case). Identical states are generated once.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .trace import Call

@dataclass(frozen=True)
class Op:
    kind: str  # create, data, trunc, fsync, dsync, rename, unlink, mkdir, rmdir, sync
    a: str = ""  # path or inode
    b: str = ""  # second path (rename) or inode
    off: int = 0
    data: bytes = b""

    @property
    def name_op(self) -> bool:
        return self.kind in ("create", "rename", "unlink", "mkdir", "rmdir")


class Names:
    """A namespace replayed over a pre-state directory: which inode each path names."""

    def __init__(self, pre: Path) -> None:
        self.pre = pre
        self.at: dict[str, str] = {}
        self.gone: set[str] = set()

    def ino_at(self, p: str) -> str | None:
        if p in self.at:
            return self.at[p]
        if p in self.gone:
            return None
        return "pre:" + p if (self.pre / p).exists() and not (self.pre / p).is_dir() else None

    def path_of(self, ino: str) -> str | None:
        for p, i in self.at.items():
            if i == ino:
                return p
        if ino.startswith("pre:") and ino[4:] not in self.at and ino[4:] not in self.gone:
            return ino[4:]
        return None

    def bind(self, p: str, ino: str) -> None:
        self.at[p] = ino
        self.gone.discard(p)

    def drop(self, p: str) -> None:
        self.at.pop(p, None)
        self.gone.add(p)


def ops_from_calls(calls: list[Call], root: Path, pre: Path, post: Path) -> list[Op]:
    """The recorded calls of a run on ``root`` (a copy of ``pre``) as operations, paths
    relative to the device. ``post`` is the device after the run: large writes strace cut
    short are read back from it."""
    rs = str(root)
    rel = lambda p: os.path.relpath(p, rs)  # noqa: E731
    under = lambda p: p.startswith(rs + "/")  # noqa: E731
    names = Names(pre)
    fds: dict[int, tuple[str, int]] = {}  # fd -> (inode or "dir:<path>", position)
    counter = 0
    ops: list[Op] = []
    for c in calls:
        if c.ret is not None and c.ret < 0:
            continue
        if c.name not in ("openat", "rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir", "mkdir",
                          "mkdirat", "sync", "syncfs"):
            # an fd call: strace -y names the file the fd is open on *now* (fd numbers are reused
            # by files elsewhere, e.g. python-tuf's temp files in /tmp)
            if c.fd_path is None or not under(c.fd_path):
                continue
        if c.name == "openat":
            if c.ret is not None and c.ret >= 0:
                fds.pop(c.ret, None)
            if not c.paths or not under(c.paths[0]) or c.ret is None:
                continue
            p = rel(c.paths[0])
            flags = c.args[2] if len(c.args) > 2 else ""
            if "O_DIRECTORY" in flags or ((root / p).is_dir() and "O_CREAT" not in flags):
                fds[c.ret] = ("dir:" + p, 0)
                continue
            ino = names.ino_at(p)
            if ino is None:
                if "O_CREAT" not in flags:
                    continue
                counter += 1
                ino = f"new{counter}"
                names.bind(p, ino)
                ops.append(Op("create", p, ino))
            elif "O_TRUNC" in flags:
                ops.append(Op("trunc", ino, off=0))
            fds[c.ret] = (ino, 0)
        elif c.name in ("write", "pwrite64"):
            fd = _fd(c)
            if fd not in fds or fds[fd][0].startswith("dir:"):
                continue
            ino, pos = fds[fd]
            off = pos if c.name == "write" else int(c.args[3])
            n = c.ret or 0
            data = c.string(1)
            if data is None or c.truncated(1) or len(data) < n:
                data = _read_post(post, names.path_of(ino), off, n)
            ops.append(Op("data", ino, off=off, data=data[:n]))
            if c.name == "write":
                fds[fd] = (ino, pos + n)
        elif c.name == "ftruncate":
            fd = _fd(c)
            if fd in fds and not fds[fd][0].startswith("dir:"):
                ops.append(Op("trunc", fds[fd][0], off=int(c.args[1])))
        elif c.name in ("fsync", "fdatasync"):
            fd = _fd(c)
            if fd in fds:
                ino = fds[fd][0]
                ops.append(Op("dsync", ino[4:]) if ino.startswith("dir:") else Op("fsync", ino))
        elif c.name in ("sync", "syncfs"):
            ops.append(Op("sync"))
        elif c.name in ("rename", "renameat", "renameat2") and len(c.paths) == 2 and all(map(under, c.paths)):
            s, d = rel(c.paths[0]), rel(c.paths[1])
            ino = names.ino_at(s)
            if ino is None:
                continue
            names.drop(s)
            names.bind(d, ino)
            ops.append(Op("rename", s, d))
        elif c.name in ("unlink", "unlinkat", "rmdir") and c.paths and under(c.paths[0]):
            p = rel(c.paths[0])
            isdir = c.name == "rmdir" or (len(c.args) > 2 and "AT_REMOVEDIR" in c.args[2])
            names.drop(p)
            ops.append(Op("rmdir" if isdir else "unlink", p))
        elif c.name in ("mkdir", "mkdirat") and c.paths and under(c.paths[0]):
            ops.append(Op("mkdir", rel(c.paths[0])))
    return ops


def _fd(c: Call) -> int:
    try:
        return int(c.args[0].split("<", 1)[0])
    except (ValueError, IndexError):
        return -1


def _read_post(post: Path, path: str | None, off: int, n: int) -> bytes:
    if path is None:
        return bytes(n)
    try:
        with open(post / path, "rb") as f:
            f.seek(off)
            data = f.read(n)
    except OSError:
        data = b""
    return data + bytes(n - len(data))


def durable_points(ops: list[Op]) -> list[int]:
    """For each op, the index of the op that makes it durable (len(ops)+1: never)."""
    never = len(ops) + 1
    out = []
    for i, op in enumerate(ops):
        at = never
        if op.kind in ("data", "trunc", "create") or op.name_op:
            need: list[str] = []
            if op.kind in ("data", "trunc"):
                need = ["ino:" + op.a]
            elif op.kind == "rename":
                need = ["dir:" + os.path.dirname(op.a), "dir:" + os.path.dirname(op.b)]
            else:
                need = ["dir:" + os.path.dirname(op.a)]
            done: set[str] = set()
            for j in range(i + 1, len(ops)):
                o = ops[j]
                if o.kind == "sync":
                    done.update(need)
                elif o.kind == "fsync":
                    done.add("ino:" + o.a)
                elif o.kind == "dsync":
                    done.add("dir:" + o.a)
                if all(x in done for x in need):
                    at = j
                    break
        out.append(at)
    return out


def crash_sets(ops: list[Op], *, limit: int = 0) -> list[tuple[int, str, tuple[int, ...]]]:
    """(crash point, model, indices of the ops that survive), without duplicates."""
    dur = durable_points(ops)
    seen: set[tuple[int, ...]] = set()
    out = []
    full = tuple(range(len(ops)))
    for k in range(len(ops) + 1):
        for model in ("durable-only", "names-kept"):
            if model == "durable-only":
                keep = tuple(i for i in range(k) if dur[i] < k and ops[i].kind not in ("fsync", "dsync", "sync"))
            else:
                keep = tuple(i for i in range(k) if (ops[i].name_op or dur[i] < k)
                             and ops[i].kind not in ("fsync", "dsync", "sync"))
            # what a kill at k leaves is every op before k: the kill campaign covers it
            if keep in seen or keep == tuple(i for i in range(k) if ops[i].kind not in ("fsync", "dsync", "sync")):
                continue
            if keep == full:
                continue
            seen.add(keep)
            out.append((k, model, keep))
    if limit and len(out) > limit:
        step = len(out) / limit
        out = [out[int(i * step)] for i in range(limit)]
    return out


def materialize(pre: Path, ops: list[Op], keep: tuple[int, ...], dst: Path) -> None:
    """``pre`` with the ops in ``keep`` applied, in order, at ``dst``."""
    shutil.copytree(pre, dst, symlinks=True)
    names = Names(dst)
    for i in keep:
        op = ops[i]
        if op.kind == "create":
            p = dst / op.a
            if p.parent.is_dir() and names.ino_at(op.a) is None:
                p.touch()
                names.bind(op.a, op.b)
        elif op.kind in ("data", "trunc"):
            rel = names.path_of(op.a)
            p = dst / rel if rel else None
            if p is None or not p.is_file():
                continue
            if op.kind == "trunc":
                os.truncate(p, op.off)
            else:
                with open(p, "r+b") as f:
                    f.seek(op.off)
                    f.write(op.data)
        elif op.kind == "rename":
            ino = names.ino_at(op.a)
            if ino is not None and (dst / op.a).exists() and (dst / op.b).parent.is_dir():
                os.replace(dst / op.a, dst / op.b)
                names.drop(op.a)
                names.bind(op.b, ino)
        elif op.kind == "unlink":
            p = dst / op.a
            if p.is_file() or p.is_symlink():
                p.unlink()
            names.drop(op.a)
        elif op.kind == "mkdir":
            p = dst / op.a
            if p.parent.is_dir() and not p.exists():
                p.mkdir()
        elif op.kind == "rmdir":
            p = dst / op.a
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
