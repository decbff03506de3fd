"""Judging a boot: boot-check (every boot), mark-good, rollback.

The commit point of an update is the bless: the rename of the booted entry without its
counter (what ``systemd-bless-boot`` does). The state file follows it, and if it cannot, the
next run derives ``committed`` from the blessed entry (:func:`applier.lifecycle.reconcile`).

Only a *health* failure rolls a trial back: a ``health-check`` hook that fails, or a root
filesystem that is not the slot the entry named. A local I/O error while blessing is not a
health failure: it is retried, reported, and the trial stays (the next boot-check tries
again; systemd-boot's counter is the backstop).

A rollback request is written ahead (state first, then the entry is marked ``+0-N``); a request
whose entry was never marked is void, so a failure between the two changes nothing.

A trial whose version the last verified channel pointer withdrew (``release-control.json``,
written by the check before the reboot) is not blessed: it is rolled back as a failed one.

Each verb takes the :class:`~applier.session.Session`; the phase moves only through
:func:`applier.lifecycle.move`. Their results are ``status`` with an ``action`` (what was done)
and a ``message`` (the sentence that says it).
"""

from __future__ import annotations

import copy
import os
import stat
import time

from metadata.errors import DeviceError, Error

from .bootloader import Entry
from .hooks import HookError, hook_env, run_hooks
from .lifecycle import Event, Phase, commit, move, other, phase_of, rebuild, require
from .policy import same_version
from .release_control import load_record
from .session import Session
from .slots import slot_hash_ok
from .state import RollbackRequest, load_state, quarantine_state
from .status import status

__all__ = ["boot_check", "mark_good", "rollback"]

BLESS_TRIES = 3
BLESS_PAUSE = 0.5


class RootMismatch(HookError):
    """The root filesystem is not on the slot the boot entry named (a health failure)."""


class TrialWithdrawn(HookError):
    """The trial's version was withdrawn before this boot (a health failure: it is not blessed)."""


def _confirm_root(session: Session, slot: str) -> None:
    """The root we run from is the slot the entry named, or a device-mapper device on that slot alone (a verity
    root: /dev/mapper/abflip-root over the slot's data and tree). Only where both are real devices: a slot that is a
    regular file (the simulated device) cannot be compared with a mount."""
    root_dev = session.ctx.root_device()
    try:
        st = os.stat(session.config.slots[slot].device)
    except OSError:
        return
    if root_dev is None or not stat.S_ISBLK(st.st_mode):
        return
    if st.st_rdev != root_dev and session.ctx.lower_devices(root_dev) != [st.st_rdev]:
        raise RootMismatch(f"the root filesystem ({session.ctx.root}, device {os.major(root_dev)}:"
                           f"{os.minor(root_dev)}) is not slot {slot} ({session.config.slots[slot].device}, device "
                           f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}) that the boot entry named, nor a mapping "
                           "on it alone", hint="the kernel command line chose another root; the trial is not blessed")


def _confirm_not_withdrawn(session: Session, version: str) -> None:
    rec = load_record(session.config.state_dir)
    if rec is not None and rec.is_withdrawn(version):
        raise TrialWithdrawn(f"{version} was withdrawn from channel {rec.channel} before this boot (the last check "
                             "saw it): it is not blessed", hint="the device goes back to the slot it ran before")


def _bless(session: Session, entry: Entry) -> Entry:
    """Bless with retries: an I/O error is reported, never taken for a failed health check."""
    boot = session.boot
    for attempt in range(BLESS_TRIES):
        try:
            return boot.bless(entry)
        except DeviceError as e:
            if attempt + 1 == BLESS_TRIES:
                raise DeviceError(f"{e.message} (tried {BLESS_TRIES} times)",
                                  hint="the update stays on trial (it is healthy; it is not rolled back): boot-check "
                                       "blesses it at the next boot, or run `abflip mark-good` once the ESP is "
                                       "writable") from None
            time.sleep(BLESS_PAUSE * (attempt + 1))
            found = [e2 for e2 in boot.entries() if e2.slot == entry.slot and e2.version == entry.version]
            if found and not found[0].counting:
                return found[0]  # the rename did happen (reported late)
            entry = found[0] if found else entry
    raise AssertionError("unreachable")


def _judge(session: Session, state, slot: str) -> None:
    """The trial's health: the root is the slot the entry named, its version was not withdrawn
    before this boot, and the health-check hooks pass (a failure raises a :class:`HookError`)."""
    t = state.target
    _confirm_root(session, slot)
    _confirm_not_withdrawn(session, t.version)
    run_hooks(session.config.hooks_dir, "health-check", env=hook_env(session.config, state, slot, t),
              timeout=session.config.hook_timeout)


def mark_good(session: Session, *, health: bool = True) -> dict:
    """Run the health-check hooks (on a trial boot), then bless the booted entry; commit a
    trial update. Idempotent."""
    loaded = session.load()
    state, slot = loaded.state, loaded.booted
    t = state.target
    phase = require(state, Event.MARK_GOOD, slot)
    trial = phase == Phase.TRIAL and t is not None and t.slot == slot
    if trial and health:
        _judge(session, state, slot)
    entry = session.boot.booted_entry(slot)
    blessed = entry is not None and entry.counting
    if blessed:
        entry = _bless(session, entry)  # the commit point
    if trial:
        commit(state)
        move(state, Event.BLESS)
        action, message = "committed", f"blessed {t.version} in slot {slot}: committed (floor {state.floor})"
    elif state.slots[slot].status in ("unknown", "staged"):
        state.slots[slot].status = "good"
        if entry is not None:
            state.slots[slot].version = entry.version
        action = "recorded-good"
        message = f"slot {slot} ({state.slots[slot].version or 'unknown version'}) recorded good" + \
            (f"; blessed {entry.name}" if blessed else "")
    else:
        action = "blessed" if blessed else "none"
        message = (f"blessed {entry.name}" if blessed else
                   f"slot {slot} ({state.slots[slot].version or 'unknown version'}) is good already: nothing to do")
    try:
        session.save(state)
    except DeviceError as e:
        if trial:
            raise DeviceError(f"{t.version} in slot {slot} is blessed (committed on the ESP), but the state file "
                              f"could not be saved: {e.message}",
                              hint="nothing else is needed: the next abflip command records the commit from the "
                                   "blessed entry") from None
        raise
    if trial:
        session.prune(state, slot)
    return {**status(session), "action": action, "message": message}


def boot_check(session: Session, *, bless: bool = True) -> dict:
    """What the health unit runs on every boot (before boot-complete.target).

    Never fails on the state file: an invalid one is kept as ``state.json.invalid`` and the
    state is rebuilt from the boot loader. Then: on the trial boot of a new slot, run the
    ``health-check`` hooks and bless it (-> committed), or, if they fail (or the version was
    withdrawn before this boot), request the rollback (state first), mark its entry bad (tries
    used up), run the reboot command and raise.

    ``bless=False`` only judges: a trial that passes stays a trial, to be blessed once the whole
    boot is complete (``abflip-bless.service`` runs ``mark-good --no-health`` after
    ``boot-complete.target``, so a unit of the new system that fails or hangs keeps it unblessed);
    a trial that fails is rolled back as above.
    """
    sd = session.config.state_dir
    raw = load_state(sd)
    if raw is not None and raw.invalid:
        state = rebuild(session.boot.facts(), raw.invalid, salvage=raw)
        quarantine_state(sd)
        session.save(state)
    loaded = session.load()
    state, slot = loaded.state, loaded.booted
    session.save(state)
    if phase_of(state) == Phase.TRIAL and state.target is not None and state.target.slot == slot:
        try:
            if not bless:
                _judge(session, state, slot)
                return {**status(session), "action": "judged",
                        "message": f"{state.target.version} in slot {slot} passed its health checks: it is blessed "
                                   "once the boot is complete (abflip-bless.service)"}
            return mark_good(session)
        except HookError as e:
            _health_failed(session, slot, e)
            raise
    if phase_of(state) in (Phase.COMMITTED, Phase.ROLLED_BACK, Phase.IDLE):
        session.prune(state, slot)
    return {**status(session), "action": "none", "message": f"nothing to judge (state {state.state})"}


def _health_failed(session: Session, slot: str, e: Error) -> None:
    loaded = session.load()
    state, slot = loaded.state, loaded.booted
    t = state.target
    o = other(slot)
    move(state, Event.HEALTH_FAILED,
         request=RollbackRequest(slot, t.version if t else None, o, state.slots[o].version))
    state.last_error = e.to_json()
    try:
        session.save(state)  # write-ahead: the request before the entry changes
        entry = session.boot.booted_entry(slot)
        if entry is not None and entry.counting:
            session.boot.mark_bad(entry)
        e.message += (f"; {t.version if t else 'the trial'} in slot {slot} is marked bad: slot {o} "
                      f"({state.slots[o].version or 'its version'}) boots next"
                      + (", rebooting now" if session.reboot is not None else " (reboot to go back)"))
    except DeviceError as io:
        e.message += (f"; marking the trial's entry bad failed ({io.message}): it is not blessed, so systemd-boot "
                      "falls back by itself once its tries are used up")
    e.args = (e.message,)
    if session.reboot is not None:
        session.reboot()


def _undo_cancel(session: Session, saved: dict[str, bytes], before) -> str:
    """Put back what a failed cancel removed (the entry, then the state); say what stays."""
    try:
        session.boot.restore(saved)
    except OSError:
        return ("the pending entry may be gone (the ESP failed while removing it): the state records the update as "
                "withdrawn")
    try:
        session.save(before)
    except Error:
        return ("the entry is back in place but the state says rolled-back: the next command sees the pending entry "
                "and removes it (prune)")
    return "nothing was changed: the update is still pending"


def _entries_or_empty(session: Session) -> list[Entry]:
    try:
        return session.boot.entries()
    except Error:
        return []


def rollback(session: Session) -> dict:
    """Make the other slot the next boot (or cancel a pending update). See docs/device.md."""
    loaded = session.load()
    state, slot = loaded.state, loaded.booted
    boot = session.boot
    o = other(slot)
    t = state.target
    phase = require(state, Event.ROLLBACK, slot)
    if phase == Phase.ROLLBACK_REQUESTED:
        return {**status(session), "action": "already-requested",
                "message": f"a rollback to slot {o} is already requested: it boots at the next reboot"}
    if phase == Phase.PENDING and t is not None and t.slot == o:
        # Not booted yet: withdraw the update. The version is recorded as failed (not retried by itself).
        before = copy.deepcopy(state)
        saved = boot.saved_slot(o)  # what the removal may need undone
        if not any(same_version(t.version, v) for v in state.failed_versions):
            state.failed_versions.append(t.version)
        state.slots[o].status = "bad"
        move(state, Event.ROLLBACK)
        session.save(state)  # write-ahead: a crash before the removal leaves entries that prune removes
        try:
            boot.remove_slot(o)
        except DeviceError as e:
            raise DeviceError(f"withdrawing the pending update failed: {e.message}; "
                              f"{_undo_cancel(session, saved, before)}", hint=e.hint) from None
        session.prune(state, slot)
        return {**status(session), "action": "cancelled-pending",
                "message": f"cancelled the pending {t.version}: slot {slot} keeps booting"}
    s = state.slots[o]
    other_entries = [e for e in boot.entries() if e.slot == o and not e.exhausted]
    if s.status != "good" or not other_entries:
        raise DeviceError(f"slot {o} holds no verified, bootable system to roll back to (status {s.status}, "
                          f"{len(other_entries)} usable boot entries)", hint="nothing was changed")
    if s.sha256 and s.size and not slot_hash_ok(session, o, s.sha256, s.size):
        raise DeviceError(f"slot {o} no longer matches the sha256 it was verified with",
                          hint="nothing was changed; it cannot be rolled back to")
    entry = boot.booted_entry(slot)
    if entry is None:
        raise DeviceError(f"cannot find the boot entry of the booted slot {slot}", hint="nothing was changed")
    move(state, Event.ROLLBACK, request=RollbackRequest(slot, entry.version, o, s.version))
    session.save(state)  # write-ahead: void until the entry below is marked
    try:
        boot.mark_bad(entry)  # sorts last: the loader now picks the other slot, this one stays a last resort
    except DeviceError as e:
        marked = next((x for x in _entries_or_empty(session) if x.slot == slot
                       and same_version(x.version, entry.version) and x.exhausted), None)
        if marked is not None:  # the rename happened, the flush after it failed: undo it
            try:
                boot.unmark(marked, entry)
                marked = None
            except OSError:
                pass
        if marked is not None:  # the undo failed too: the request stands
            raise DeviceError(f"the rollback is requested (entry {entry.name} is marked bad: slot {o} boots next), "
                              f"but flushing the ESP failed: {e.message}; if the power fails before the ESP writes "
                              f"back, slot {slot} may boot again", hint=e.hint) from None
        move(state, Event.REQUEST_VOID, to=Phase(state.state))
        try:
            session.save(state)
        except Error:
            pass  # a request whose entry is not marked is void anyway
        raise DeviceError(f"requesting the rollback failed: {e.message}; nothing was changed (slot {slot} still "
                          "boots next)", hint=e.hint) from None
    return {**status(session), "action": "rollback-on-reboot",
            "message": f"slot {o} ({s.version or 'its version'}) boots at the next reboot; {entry.version} in slot "
                       f"{slot} is marked bad"}
