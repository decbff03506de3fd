"""One command's hold on the device: the lock, the sweep of what killed runs left, and the
state loaded reconciled with the boot loader and saved atomically.

Every command that changes anything runs under :meth:`Session.locked` (``flock`` on
``<state_dir>/lock``: one agent at a time), which first removes what only a killed run leaves
behind, by prefix (``.state-*``, ``tuf/tmp*``, ``staged/.abflip-tmp-*`` and ``.*.part``, the
ESP's ``.abflip-tmp`` names). :meth:`Session.load` folds what the boot loader did into the state
file (:func:`applier.lifecycle.reconcile`: the loader outranks the file); a missing file is
rebuilt from the loader (a device's first run), an invalid one too, but a mutating command
refuses it until ``abflip reset-state``. An error of a verb is recorded as ``last_error`` in
the state *as it is on disk*, never a half-changed copy from memory (:meth:`Session.record_error`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from metadata.errors import DeviceError, Error
from metadata.manifest import HWID_RE, Limits

from . import history
from .bootloader import BootFacts, Bootloader
from .config import Config
from .context import Context
from .lifecycle import rebuild, reconcile
from .state import State, load_state, save_state
from .windows import next_window

__all__ = ["LOCK_FILE", "OFFER_CACHE", "Loaded", "ProgressFn", "Session", "normalize_hardware_id"]

#: A progress event (a JSON object; see docs/device.md "Progress events").
ProgressFn = Callable[[dict], None]
LOCK_FILE = "lock"
OFFER_CACHE = "offer"
#: Names that only a killed run leaves behind, per directory (see :meth:`Session.sweep`).
_STATE_TEMPS = re.compile(r"^\.state-")
_TUF_TEMPS = re.compile(r"^tmp[a-z0-9_]{6,}$")
_STAGED_TEMPS = re.compile(r"^(\.abflip-tmp-|\..+\.part$)")  # also the offer cache's
T = TypeVar("T")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def normalize_hardware_id(value: str) -> str:
    """A DMI string as a hardware id: lowercased, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9._:/+-]+", "-", value.strip().lower()).strip("-")


@dataclass(frozen=True)
class Loaded:
    """The state reconciled with the boot loader, and the booted slot."""

    state: State
    booted: str
    facts: BootFacts


@dataclass
class Session:
    config: Config
    ctx: Context
    boot: Bootloader
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], datetime] = _utcnow  # the only clock the agent reads (maintenance windows)
    progress: ProgressFn | None = None
    reboot: Callable[[], None] | None = None  # None: never reboot (maintenance.reboot_command = [])

    _locked: int = field(default=0, init=False, repr=False)

    def emit(self, **event) -> None:
        if self.progress is not None:
            self.progress({"event": "progress", **event})

    # -- who am I --------------------------------------------------------------------------
    @property
    def hardware_id(self) -> str:
        fieldname = self.config.hardware_id_from_dmi
        if fieldname is None:
            return self.config.hardware_id
        raw = self.ctx.dmi_field(fieldname)
        value = normalize_hardware_id(raw) if raw else ""
        if not value or not HWID_RE.match(value):
            raise DeviceError(f"cannot read the hardware id from DMI ({self.ctx.dmi / fieldname}: "
                              f"{'unreadable or empty' if raw is None else repr(raw) + ' is not a valid id'})",
                              hint=f"set device.hardware_id in {self.config.path}")
        return value

    def window_info(self) -> dict | None:
        """The maintenance window now open or next to open; None: no windows (apply any time)."""
        now = self.clock()
        nxt = next_window(self.config.windows, now)
        if nxt is None:
            return None
        start, end = nxt
        return {"start": start.isoformat(), "end": end.isoformat(), "open": start <= now.astimezone(UTC) < end}

    # -- the state, reconciled -------------------------------------------------------------
    def load(self, *, mutating: bool = True) -> Loaded:
        """The state reconciled with the boot loader. A missing file is rebuilt from the boot
        loader (a device's first run); an invalid one too, but a mutating command refuses it."""
        facts = self.boot.facts()
        raw = load_state(self.config.state_dir)
        if raw is None or raw.invalid:
            state = rebuild(facts, raw.invalid if raw else None, salvage=raw)
            if mutating and state.invalid:
                raise DeviceError(f"the state file is invalid: {state.invalid}",
                                  hint="`abflip reset-state` rebuilds it from the boot entries (the bad file is kept as "
                                       "state.json.invalid); boot-check does so by itself at the next boot")
            return Loaded(state, facts.slot, facts)
        return Loaded(reconcile(raw, facts), facts.slot, facts)

    def save(self, state: State) -> None:
        save_state(self.config.state_dir, state)

    def booted_version(self, state: State, booted: str) -> str | None:
        entry = self.boot.booted_entry(booted)
        return entry.version if entry else state.slots[booted].version

    def record_error(self, e: Error) -> None:
        """Best effort: ``last_error`` into the state *as it is on disk* (reconciled with the boot
        loader, which only records what already happened), never a half-changed copy from memory:
        an error path must not write what the failed step meant to."""
        if not e.recorded:
            return
        try:
            raw = load_state(self.config.state_dir)
            if raw is None or raw.invalid:
                return
            state = reconcile(raw, self.boot.facts())  # derived from the ESP: safe
            state.last_error = e.to_json()
            save_state(self.config.state_dir, state)
        except (Error, OSError):
            pass  # the error itself is what the caller reports

    # -- one agent at a time ---------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One mutating command at a time (``flock`` on ``<state_dir>/lock``); then sweep."""
        if self._locked:
            self._locked += 1
            try:
                yield
            finally:
                self._locked -= 1
            return
        d = self.config.state_dir
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except PermissionError:
            raise DeviceError(f"cannot use the state directory {d}: permission denied",
                              hint="run abflip as root (the state directory belongs to the device agent)") from None
        except OSError as e:
            raise DeviceError(f"cannot use the state directory {d}: {e.strerror or e}",
                              hint=f"check paths.state_dir in {self.config.path}: it must be a writable directory") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise DeviceError("another abflip command is running on this device (it holds "
                                      f"{d / LOCK_FILE})", hint="wait for it to finish, then retry") from None
                raise DeviceError(f"cannot lock {d / LOCK_FILE}: {e}") from None
            self._locked = 1
            self.sweep()
            yield
        finally:
            self._locked = 0
            os.close(fd)

    def guarded(self, fn: Callable[[], T], verb: str) -> T:
        """Run a mutating verb under the lock; an abflip error is recorded as ``last_error``, and
        what the verb changed (or its error) in the history (:mod:`applier.history`)."""
        with self.locked(), history.recording(self.config.state_dir, verb):
            try:
                return fn()
            except Error as e:
                self.record_error(e)
                raise

    def sweep(self) -> list[str]:
        """Remove what killed runs left behind, by the prefixes only abflip's writers use:
        ``state/.state-*``, ``state/tuf/tmp*`` (python-tuf), ``state/staged/.abflip-tmp-*`` and
        ``.*.part``, and the boot loader's temp names. Runs under the lock, so no other abflip
        command is writing them. Best effort."""
        removed: list[str] = []
        sd = self.config.state_dir
        for d, pattern in ((sd, _STATE_TEMPS), (sd / "tuf", _TUF_TEMPS), (sd / "staged", _STAGED_TEMPS),
                           (sd / OFFER_CACHE, _STAGED_TEMPS)):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for n in names:
                if pattern.search(n) and (d / n).is_file() and not (d / n).is_symlink():
                    with contextlib.suppress(OSError):
                        (d / n).unlink()
                        removed.append(str(d / n))
        return removed + self.boot.sweep()

    # -- ESP hygiene -----------------------------------------------------------------------
    def prune(self, state: State, booted: str) -> None:
        """Only entries of the two slots' current versions remain, and only boot files an
        entry references. Hygiene never fails an otherwise good operation."""
        from .lifecycle import Phase, phase_of, other

        keep: dict[str, str | None] = {booted: self.booted_version(state, booted)}
        o = other(booted)
        s = state.slots[o]
        t = state.target
        if s.status == "good" and s.version:
            keep[o] = s.version
        elif phase_of(state) in (Phase.PENDING, Phase.TRIAL) and t is not None and t.slot == o:
            keep[o] = t.version
        elif s.status == "unknown" and state.rollback is None:
            keep[o] = None  # never judged: leave it alone
        # bad, writing, staged (no entry yet): no entry may point at it
        try:
            self.boot.prune(keep)
        except (Error, OSError):
            pass
