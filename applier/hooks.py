"""Hooks: executables in ``<hooks dir>/<kind>.d/``, run in name order with a timeout.

Kinds: ``pre-install`` (before the boot files and entry of a staged slot are written: a
failure leaves the device exactly as it was), ``post-install`` (after the entry is written: a
failure removes the entry again, back to ``staged``), ``health-check`` (on the trial boot of a
new slot, before it is blessed: a failure rolls back).

Each hook gets the environment of the agent plus ``ABFLIP_HOOK`` (the kind),
``ABFLIP_VERSION``, ``ABFLIP_SLOT``, ``ABFLIP_SLOT_DEVICE``, ``ABFLIP_BOOTED_SLOT`` and
``ABFLIP_STATE``. Files whose names start with ``.`` or end with ``~``, and files that are not
executable, are skipped. A hook fails when it exits non-zero, cannot be started, or outlives
its timeout (its whole process group is killed). The first failure stops the run and raises
:class:`HookError`, whose message names the hook and carries the tail of its output.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from metadata.errors import DeviceError

__all__ = ["HOOK_KINDS", "HookError", "HookResult", "list_hooks", "run_hooks"]

HOOK_KINDS = ("pre-install", "post-install", "health-check")
OUTPUT_TAIL = 2000


class HookError(DeviceError):
    """A hook failed, hung, or could not be run."""

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


def run_hooks(hooks_dir: Path | None, kind: str, *, env: dict[str, str], timeout: float) -> list[HookResult]:
    import time

    results = []
    for hook in list_hooks(hooks_dir, kind):
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen([str(hook)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env={**os.environ, **env, "ABFLIP_HOOK": kind},
                                    start_new_session=True, cwd="/")
        except OSError as e:
            raise HookError(f"{kind} hook {hook} could not be started: {e}") from None
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            raise HookError(f"{kind} hook {hook} did not finish within {timeout:g} s and was killed"
                            + _tail(out)) from None
        if proc.returncode != 0:
            raise HookError(f"{kind} hook {hook} failed (exit status {proc.returncode})" + _tail(out))
        results.append(HookResult(str(hook), proc.returncode, round(time.monotonic() - t0, 3)))
    return results


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(out: bytes | None) -> str:
    text = (out or b"")[-OUTPUT_TAIL:].decode("utf-8", "replace").strip()
    return f"; its output ends: {text}" if text else ""
