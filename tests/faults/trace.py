"""Run a device command under strace: record its file operations, or inject one fault.

strace keeps a separate counter per system call and per thread (checked: ``when=2`` on
``fsync,fdatasync`` hits the second *fsync* of the injecting thread), so a fault site is
named ``(syscall, n)``: the n-th call of that syscall by the command's main thread.
Only calls that touch the device's directory are fault sites; the others (imports,
stdout) still count towards ``n``, which is why the count run and the fault run must make
the same calls (``-B``: no bytecode writes).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .world import ROOT

#: Calls that can change a file or a directory (fault sites), plus two for accounting.
MUTATING = ("write", "pwrite64", "pwritev", "fsync", "fdatasync", "rename", "renameat", "renameat2", "unlink",
            "unlinkat", "mkdir", "mkdirat", "rmdir", "openat", "ftruncate", "truncate", "sync", "syncfs",
            "sync_file_range")
ACCOUNTING = ("recvfrom", "sendto")
KINDS = ("kill", "EIO", "ENOSPC")

COMMANDS: dict[str, tuple[str, ...]] = {
    "install": ("install",),
    "download": ("download",),
    "apply": ("apply", "--now"),
    "run": ("run",),
    "boot-check": ("boot-check",),
    "mark-good": ("mark-good",),
    "rollback": ("rollback",),
}

_LINE = re.compile(r"^(\d+) +(\w+)\((.*)\) += (-?\d+|\?)(.*)$")
_FDPATH = re.compile(r"^-?\d+<(.*)>$")
_ESC = re.compile(rb"\\(x[0-9a-fA-F]{2}|[0-7]{1,3}|.)")
_SIMPLE = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b"v": b"\v", b"f": b"\f", b"a": b"\a", b"b": b"\b"}


def unescape(s: str) -> bytes:
    """A C string literal as strace prints it (``-x``) -> bytes."""
    def one(m: re.Match) -> bytes:
        e = m.group(1)
        if e[:1] == b"x":
            return bytes([int(e[1:], 16)])
        if e[:1].isdigit():
            return bytes([int(e, 8) & 0xFF])
        return _SIMPLE.get(e, e)

    return _ESC.sub(one, s.encode("latin-1", "surrogateescape"))


def split_args(s: str) -> list[str]:
    """Top-level comma-separated arguments (strings, <paths>, {structs} kept whole)."""
    out, cur, depth, quote, i = [], [], 0, False, 0
    while i < len(s):
        c = s[i]
        if quote:
            cur.append(c)
            if c == "\\" and i + 1 < len(s):
                cur.append(s[i + 1])
                i += 1
            elif c == '"':
                quote = False
        elif c == '"':
            quote = True
            cur.append(c)
        elif c in "<{[":
            depth += 1
            cur.append(c)
        elif c in ">}]":
            depth -= 1
            cur.append(c)
        elif c == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    if cur:
        out.append("".join(cur).strip())
    return out


@dataclass
class Call:
    pid: int
    name: str
    args: list[str]
    ret: int | None
    nth: int  # 1-based: this call's number among the same syscall in the same thread
    tail: str = ""
    paths: list[str] = field(default_factory=list)  # absolute paths it touches
    fd_path: str | None = None  # for fd calls, the file's path (strace -y)

    @property
    def injected(self) -> bool:
        return "(INJECTED)" in self.tail

    def string(self, i: int) -> bytes | None:
        a = self.args[i]
        if not a.startswith('"'):
            return None
        end = a.rfind('"')
        return unescape(a[1:end])

    def truncated(self, i: int) -> bool:
        return self.args[i].endswith('"...')


def _path_arg(a: str, cwd: str, dirfd: str | None = None) -> str | None:
    if not a.startswith('"'):
        return None
    p = unescape(a[1:a.rfind('"')]).decode("utf-8", "surrogateescape")
    if not p.startswith("/"):
        base = cwd
        if dirfd is not None and (m := _FDPATH.match(dirfd)):
            base = m.group(1)
        elif dirfd is not None and dirfd.startswith("AT_FDCWD<"):
            base = dirfd[len("AT_FDCWD<"):-1]
        p = os.path.normpath(os.path.join(base, p))
    return p


def parse(log: str, cwd: str) -> list[Call]:
    """strace -f -y -x output -> calls in order (unfinished/resumed pairs joined)."""
    pending: dict[int, str] = {}
    counters: dict[tuple[int, str], int] = {}
    calls: list[Call] = []
    for raw in log.splitlines():
        m0 = re.match(r"^(\d+) +(.*)$", raw)
        if not m0:
            continue
        pid, rest = int(m0.group(1)), m0.group(2)
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            continue
        if rest.startswith("<... "):
            rest = pending.pop(pid, "") + rest.split("resumed>", 1)[1]
        m = _LINE.match(f"{pid} {rest}")
        if not m:
            if rest.endswith("= ?"):  # killed inside the call
                m = re.match(r"^(\w+)\((.*)\) += \?$", rest)
                if m is None:
                    continue
                name, argstr, ret, tail = m.group(1), m.group(2), None, ""
            else:
                continue
        else:
            name, argstr, ret_s, tail = m.group(2), m.group(3), m.group(4), m.group(5)
            ret = None if ret_s == "?" else int(ret_s)
        counters[(pid, name)] = counters.get((pid, name), 0) + 1
        args = split_args(argstr)
        c = Call(pid, name, args, ret, counters[(pid, name)], tail)
        if args and (fm := _FDPATH.match(args[0])):
            c.fd_path = fm.group(1)
        if name in ("openat", "mkdirat", "unlinkat"):
            p = _path_arg(args[1], cwd, args[0]) if len(args) > 1 else None
            c.paths = [p] if p else []
        elif name in ("renameat", "renameat2"):
            c.paths = [x for x in (_path_arg(args[1], cwd, args[0]), _path_arg(args[3], cwd, args[2])) if x]
        elif name in ("rename",):
            c.paths = [x for x in (_path_arg(args[0], cwd), _path_arg(args[1], cwd)) if x]
        elif name in ("unlink", "mkdir", "rmdir", "truncate"):
            p = _path_arg(args[0], cwd)
            c.paths = [p] if p else []
        elif c.fd_path:
            c.paths = [c.fd_path]
        calls.append(c)
    return calls


def is_site(c: Call, root: str) -> bool:
    """A fault site: a mutating call of the main thread on a file under the device root."""
    if c.name not in MUTATING:
        return False
    if c.name == "openat" and (len(c.args) < 3 or "O_CREAT" not in c.args[2]):
        return False
    if c.name in ("sync", "syncfs"):
        return True
    return any(p == root or p.startswith(root + "/") for p in c.paths)


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    calls: list[Call]
    main_pid: int | None


def python_argv(command: str, config: Path) -> list[str]:
    return [sys.executable, "-B", "-m", "abflip.cli", *COMMANDS[command], "--config", str(config)]


def run(command: str, root: Path, log: Path, *, fault: tuple[str, int, str] | None = None, strsize: int = 4096,
        timeout: float = 120) -> Run:
    """Run ``command`` on the device in ``root`` under strace; ``fault``: (syscall, nth, kind)."""
    # no --seccomp-bpf: strace 6.1 then ignores -e inject
    argv = ["strace", "-f", "-qq", "-e", "signal=none", "-y", "-x", "-s", str(strsize),
            "-e", "trace=" + ",".join(MUTATING + ACCOUNTING), "-o", str(log)]
    if fault is not None:
        sc, nth, kind = fault
        what = "signal=SIGKILL" if kind == "kill" else f"error={kind}"
        argv += ["-e", f"inject={sc}:{what}:when={nth}"]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED="0")
    env.pop("COLUMNS", None)
    p = subprocess.run(argv + ["--", *python_argv(command, root / "abflip.toml")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    text = log.read_text(errors="surrogateescape") if log.exists() else ""
    calls = parse(text, str(ROOT))
    main = calls[0].pid if calls else None
    return Run(p.returncode, p.stdout, p.stderr, calls, main)


def sites(r: Run, root: Path) -> list[Call]:
    rs = str(root)
    return [c for c in r.calls if c.pid == r.main_pid and is_site(c, rs)]
