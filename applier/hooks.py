"""Hooks: executables in ``<hooks dir>/<kind>.d/``, run in name order with a timeout.

Kinds: ``pre-install`` (before the boot files and entry of a staged slot are written: a
failure leaves the device exactly as it was), ``post-install`` (after the entry is written: a
failure removes the entry again, back to ``staged``), ``health-check`` (on the trial boot of a
new slot, before it is blessed: a failure rolls back).

Rules this module keeps (docs/device.md, "Hooks"):

- Files whose names start with ``.`` or end with ``~``, and files that are not executable, are
  skipped.
- Hooks run as the agent (root), so they must be as trusted as the agent: before any hook of a
  kind runs, the hook file (the target of a symlink as well) and every directory from
  ``<kind>.d`` up to ``/`` (of the path as written and of its real path) must be owned by root
  or the agent's user and not writable by group or others -- sshd's ``StrictModes`` walk. One
  exception, for ancestors above the hooks directory only: a sticky directory (``/tmp``) may be
  writable by others, since they cannot rename or remove what they do not own. An unsafe file
  refuses the whole kind (:class:`HookError`), before any of its hooks runs.
- Each hook gets a fixed environment, not the agent's (``sudo``'s ``env_reset``): ``PATH``,
  ``HOME``, ``LANG``, ``LANGUAGE``, ``LC_*``, ``TZ`` from the agent, plus ``ABFLIP_HOOK`` (the kind) and
  the ``ABFLIP_*`` values the agent passes (``ABFLIP_VERSION``, ``ABFLIP_SLOT``,
  ``ABFLIP_SLOT_DEVICE``, ``ABFLIP_BOOTED_SLOT``, ``ABFLIP_STATE``, ``ABFLIP_CONFIG``). stdin is
  ``/dev/null``, cwd ``/``, stdout and stderr one pipe.
- Each hook runs in its own session (process group). Its output is read here, without blocking,
  against a deadline; only the last :data:`OUTPUT_KEEP` bytes are kept. Reading stops when the
  hook itself has exited (plus :data:`EXIT_GRACE` for what is still in the pipe) or at the
  deadline -- never waiting for end-of-file, which a child that escaped the group may hold off
  forever. Then the group is killed: a hook that outlived its timeout with everything it
  started, a finished hook's leftovers too.
- A hook fails when it exits non-zero, cannot be started, or outlives its timeout. The first
  failure stops the run and raises :class:`HookError`, whose message names the hook and carries
  the tail of its output (control characters and invalid UTF-8 escaped).
"""

from __future__ import annotations

import os
import pwd
import selectors
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from metadata.errors import DeviceError

if TYPE_CHECKING:
    from .config import Config
    from .state import State, Target

__all__ = ["HOOK_KINDS", "HookError", "HookResult", "check_hooks", "hook_env", "list_hooks", "run_hooks"]

HOOK_KINDS = ("pre-install", "post-install", "health-check")
OUTPUT_KEEP = 64 << 10  # bytes of a hook's output kept (the tail); the rest is discarded as it streams
OUTPUT_TAIL = 2000  # characters of that tail (escaped) quoted in an error message
EXIT_GRACE = 0.5  # seconds to drain the pipe after the hook itself exited
PASS_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ")  # and LC_*
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class HookError(DeviceError):
    """A hook failed, hung, could not be run, or is not safe to run."""

    default_hint = "fix the hook or the condition it checks; see its output above"


@dataclass(frozen=True)
class HookResult:
    path: str
    returncode: int
    seconds: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


def list_hooks(hooks_dir: Path | None, kind: str) -> list[Path]:
    if kind not in HOOK_KINDS:
        raise ValueError(f"unknown hook kind {kind!r}")
    if hooks_dir is None:
        return []
    d = Path(hooks_dir) / f"{kind}.d"
    try:
        names = sorted(os.listdir(d))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for n in names:
        p = d / n
        if n.startswith(".") or n.endswith("~") or not p.is_file() or not os.access(p, os.X_OK):
            continue
        out.append(p)
    return out


# -- ownership and modes ---------------------------------------------------------------------
def check_hooks(hooks_dir: Path | None, kind: str) -> list[Path]:
    """The hooks of ``kind``, after checking that they and their directories are safe to run as
    this user; raises :class:`HookError` naming the first unsafe file."""
    hooks = list_hooks(hooks_dir, kind)
    if hooks_dir is None:
        return hooks
    d = Path(hooks_dir) / f"{kind}.d"
    if not d.exists():
        return hooks
    strict = {os.path.abspath(hooks_dir), os.path.realpath(hooks_dir), os.path.abspath(d), os.path.realpath(d)}
    for path in _chain(d):
        _check_one(kind, d, path, strict)
    for hook in hooks:
        real = os.path.realpath(hook)
        strict_h = strict | {os.path.dirname(real)}
        for path in [os.path.abspath(hook), *_chain(Path(real))]:
            _check_one(kind, hook, path, strict_h)
    return hooks


def _chain(p: Path) -> list[str]:
    """``p`` and every directory above it, for the path as written and for its real path."""
    out: list[str] = []
    for q in (os.path.abspath(p), os.path.realpath(p)):
        while True:
            if q not in out:
                out.append(q)
            parent = os.path.dirname(q)
            if parent == q:
                break
            q = parent
    return out


def _check_one(kind: str, what: Path, path: str, strict: set[str]) -> None:
    try:
        st = os.lstat(path)
    except OSError as e:
        raise HookError(f"{kind} hook {what}: cannot check {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        return  # a link's own mode means nothing; its target is on the real path, checked too
    problems = []
    if st.st_uid not in (0, os.geteuid()):
        problems.append(f"is owned by {_user(st.st_uid)}")
    writable = st.st_mode & 0o022
    sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and path not in strict
    if writable and not sticky_dir:
        problems.append("is writable by " + " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002))
                                                          if st.st_mode & bit))
    if not problems:
        return
    mode = stat.filemode(st.st_mode)
    owner = "root" if os.geteuid() == 0 else f"root or {_user(os.geteuid())}"
    raise HookError(
        f"{kind} hook {what} is not safe to run: {path} {' and '.join(problems)} "
        f"(owner {_user(st.st_uid)}, mode {mode} {stat.S_IMODE(st.st_mode):04o}); hooks run as the agent, so the "
        f"file and every directory above it must be owned by {owner} and not writable by group or others; "
        f"no {kind} hook was run",
        hint=f"chown root:root {path}; chmod go-w {path}  (if you trust it)")


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


# -- running ---------------------------------------------------------------------------------
def hook_env(config: Config, state: State, booted: str, t: Target | None) -> dict[str, str]:
    """The ``ABFLIP_*`` values the agent passes to its hooks."""
    env = {"ABFLIP_BOOTED_SLOT": booted, "ABFLIP_STATE": state.state, "ABFLIP_CONFIG": str(config.path)}
    if t is not None:
        env.update(ABFLIP_VERSION=t.version, ABFLIP_SLOT=t.slot,
                   ABFLIP_SLOT_DEVICE=str(config.slots[t.slot].device))
    return env


def hook_environment(env: dict[str, str], kind: str) -> dict[str, str]:
    """What a hook sees: a few locale/path variables of the agent, then abflip's own."""
    base = {k: v for k, v in os.environ.items() if k in PASS_ENV or k.startswith("LC_")}
    base.setdefault("PATH", DEFAULT_PATH)
    return {**base, **env, "ABFLIP_HOOK": kind}


def _debug(msg: str, *args: object) -> None:
    """``abflip --verbose`` logs the hooks; logging is not imported for boot-check otherwise."""
    if "logging" in sys.modules:
        sys.modules["logging"].getLogger(__name__).debug(msg, *args)


def run_hooks(hooks_dir: Path | None, kind: str, *, env: dict[str, str], timeout: float) -> list[HookResult]:
    results = []
    for hook in check_hooks(hooks_dir, kind):
        t0 = time.monotonic()
        _debug("running %s hook %s (timeout %g s)", kind, hook, timeout)
        rc, out = _run(hook, kind, hook_environment(env, kind), timeout)
        _debug("%s hook %s: %s after %.2f s", kind, hook, "timed out" if rc is None else f"exit status {rc}",
               time.monotonic() - t0)
        if rc is None:
            raise HookError(f"{kind} hook {hook} did not finish within {timeout:g} s and was killed" + _tail(out))
        if rc != 0:
            raise HookError(f"{kind} hook {hook} failed (exit status {rc})" + _tail(out))
        results.append(HookResult(str(hook), rc, round(time.monotonic() - t0, 3)))
    return results


def _run(hook: Path, kind: str, env: dict[str, str], timeout: float) -> tuple[int | None, bytes]:
    """Run one hook; (its exit status or None if it outlived ``timeout``, the tail of its output)."""
    try:
        proc = subprocess.Popen([str(hook)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd="/")
    except OSError as e:
        raise HookError(f"{kind} hook {hook} could not be started: {e.strerror or e}") from None
    assert proc.stdout is not None
    buf = bytearray()
    try:
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        deadline = time.monotonic() + timeout
        exited_at: float | None = None
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            eof = False
            while True:
                now = time.monotonic()
                if exited_at is None and _exited(proc):
                    exited_at = now
                limit = deadline if exited_at is None else min(deadline, exited_at + EXIT_GRACE)
                if (eof and exited_at is not None) or now >= limit:
                    break
                step = min(limit - now, 0.05)  # poll the process itself this often
                if eof:
                    time.sleep(step)
                    continue
                if sel.select(step):
                    eof = _drain(fd, buf)
    finally:
        timed_out = not _exited(proc)
        _kill_group(proc)  # the hook if it hung, and whatever it left running either way
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # stuck in the kernel; it is killed, do not wait on it
            pass
        proc.stdout.close()
    return (None if timed_out else proc.returncode), bytes(buf)


def _drain(fd: int, buf: bytearray) -> bool:
    """Read what the pipe holds (at most 1 MiB, so an endless writer cannot keep us from the
    clock) into ``buf``, keeping its last OUTPUT_KEEP bytes; True at EOF."""
    for _ in range(16):
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return False
        if not data:
            return True
        buf += data
        if len(buf) > 2 * OUTPUT_KEEP:
            del buf[:-OUTPUT_KEEP]
    return False


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the hook has exited, without reaping it: while it is a zombie its pid, and so its
    process group id, cannot be reused, and killing the group cannot hit a stranger."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(out: bytes) -> str:
    text = out[-OUTPUT_TAIL:].decode("utf-8", "backslashreplace").strip()
    # a hook's bytes go to a terminal or the journal: no escape sequences, no carriage returns
    text = "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)[-OUTPUT_TAIL:]
    return f"; its output ends: {text}" if text else ""
