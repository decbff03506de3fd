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
"""

from __future__ import annotations

import copy
import os
import stat
import time

from metadata.errors import DeviceError, Error

from . import boot
from .hooks import HookError, hook_env, run_hooks
from .lifecycle import commit, rebuild
from .policy import same_version
from .slots import booted_slot, other_slot, slot_hash_ok
from .state import load_state, quarantine_state

__all__ = ["boot_check", "mark_good", "rollback"]

BLESS_TRIES = 3
BLESS_PAUSE = 0.5


class RootMismatch(HookError):
    """The root filesystem is not on the slot the boot entry named (a health failure)."""


def _confirm_root(dev, slot: str) -> None:
    """The root we run from is the slot the entry named. Only where both are real devices: a
    slot that is a regular file (the simulated device) cannot be compared with a mount."""
    root_dev = dev.ctx.root_device()
    try:
        st = os.stat(dev.config.slots[slot].device)
    except OSError:
        return
    if root_dev is None or not stat.S_ISBLK(st.st_mode):
        return
    if st.st_rdev != root_dev:
        raise RootMismatch(f"the root filesystem ({dev.ctx.root}, device {os.major(root_dev)}:{os.minor(root_dev)}) "
                           f"is not slot {slot} ({dev.config.slots[slot].device}, device "
                           f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}) that the boot entry named",
                           hint="the kernel command line chose another root; the trial is not blessed")


def _bless(dev, entry: boot.Entry) -> boot.Entry:
    """Bless with retries: an I/O error is reported, never taken for a failed health check."""
    for attempt in range(BLESS_TRIES):
        try:
            return boot.bless(dev.esp, entry)
        except DeviceError as e:
            if attempt + 1 == BLESS_TRIES:
                raise DeviceError(f"{e.message} (tried {BLESS_TRIES} times)",
                                  hint="the update stays on trial (it is healthy; it is not rolled back): boot-check "
                                       "blesses it at the next boot, or run `abflip mark-good` once the ESP is "
                                       "writable") from None
            time.sleep(BLESS_PAUSE * (attempt + 1))
            found = [e2 for e2 in boot.list_entries(dev.esp) if e2.slot == entry.slot and e2.version == entry.version]
            if found and not found[0].counting:
                return found[0]  # the rename did happen (reported late)
            entry = found[0] if found else entry
    raise AssertionError("unreachable")


def _judge(dev, state, slot: str) -> None:
    """The trial's health: the root is the slot the entry named, and the health-check hooks pass
    (a failure raises a :class:`HookError`)."""
    _confirm_root(dev, slot)
    run_hooks(dev.config.hooks_dir, "health-check", env=hook_env(dev, state, slot, state.target),
              timeout=dev.config.hook_timeout)


def mark_good(dev, *, health: bool = True) -> dict:
    """Run the health-check hooks (on a trial boot), then bless the booted entry; commit a
    trial update. Idempotent."""
    state, slot = dev._load()
    t = state.target
    trial = state.state == "trial" and t is not None and t.slot == slot
    if trial and health:
        _judge(dev, state, slot)
    entry = dev.booted_entry(slot)
    if entry is not None and entry.counting and not (state.rollback and state.rollback.get("from_slot") == slot):
        entry = _bless(dev, entry)  # the commit point
    if trial:
        commit(state)
    elif state.slots[slot].status in ("unknown", "staged"):
        state.slots[slot].status = "good"
        if entry is not None:
            state.slots[slot].version = entry.version
    try:
        dev._save(state)
    except DeviceError as e:
        if trial:
            raise DeviceError(f"{t.version} in slot {slot} is blessed (committed on the ESP), but the state file "
                              f"could not be saved: {e.message}",
                              hint="nothing else is needed: the next abflip command records the commit from the "
                                   "blessed entry") from None
        raise
    if trial:
        dev.prune(state, slot)
    return dev.status()


def boot_check(dev, *, bless: bool = True) -> dict:
    """What the health unit runs on every boot (before boot-complete.target).

    Never fails on the state file: an invalid one is kept as ``state.json.invalid`` and the
    state is rebuilt from the boot loader. Then: on the trial boot of a new slot, run the
    ``health-check`` hooks and bless it (-> committed), or, if they fail, request the rollback
    (state first), mark its entry bad (tries used up), run the reboot command and raise.

    ``bless=False`` only judges: a trial that passes stays a trial, to be blessed once the whole
    boot is complete (``abflip-bless.service`` runs ``mark-good --no-health`` after
    ``boot-complete.target``, so a unit of the new system that fails or hangs keeps it unblessed);
    a trial that fails is rolled back as above.
    """
    sd = dev.config.state_dir
    raw = load_state(sd)
    if raw is not None and raw.invalid:
        state = rebuild(dev.facts(booted_slot(dev.config, dev.ctx)), raw.invalid)
        quarantine_state(sd)
        dev._save(state)
    state, slot = dev._load()
    dev._save(state)
    if state.state == "trial" and state.target is not None and state.target.slot == slot:
        try:
            if not bless:
                _judge(dev, state, slot)
                return dev.status()
            return mark_good(dev)
        except HookError as e:
            _health_failed(dev, slot, e)
            raise
    if state.state in ("committed", "rolled-back", "idle"):
        dev.prune(state, slot)
    return dev.status()


def _undo_cancel(dev, saved: dict[str, bytes], before) -> str:
    """Put back what a failed cancel removed (the entry, then the state); say what stays."""
    esp = dev.esp
    try:
        for path, data in saved.items():
            if not esp.exists(path):
                esp.write_atomic(path, data)
        esp.sync()
    except OSError:
        return ("the pending entry may be gone (the ESP failed while removing it): the state records the update as "
                "withdrawn")
    try:
        dev._save(before)
    except Error:
        return ("the entry is back in place but the state says rolled-back: the next command sees the pending entry "
                "and removes it (prune)")
    return "nothing was changed: the update is still pending"


def _entries_or_empty(dev) -> list[boot.Entry]:
    try:
        return boot.list_entries(dev.esp)
    except OSError:
        return []


def _health_failed(dev, slot: str, e: Error) -> None:
    state, slot = dev._load()
    t = state.target
    state.rollback = {"from_slot": slot, "from_version": t.version if t else None,
                      "to_slot": other_slot(slot), "to_version": state.slots[other_slot(slot)].version}
    state.last_error = e.to_json()
    try:
        dev._save(state)  # write-ahead: the request before the entry changes
        entry = dev.booted_entry(slot)
        if entry is not None and entry.counting:
            boot.mark_bad(dev.esp, entry)
    except DeviceError as io:
        e.message += (f"; marking the trial's entry bad failed ({io.message}): it is not blessed, so systemd-boot "
                      "falls back by itself once its tries are used up")
        e.args = (e.message,)
    if dev.reboot is not None:
        dev.reboot()


def rollback(dev) -> dict:
    """Make the other slot the next boot (or cancel a pending update). See docs/device.md."""
    state, slot = dev._load()
    esp = dev.esp
    other = other_slot(slot)
    t = state.target
    if state.rollback is not None and state.rollback.get("from_slot") == slot:
        return {**dev.status(), "action": "already-requested"}
    if state.state == "pending" and t is not None and t.slot == other:
        # Not booted yet: withdraw the update. The version is recorded as failed (not retried by itself).
        before = copy.deepcopy(state)
        try:  # what the removal may need undone
            saved = {e.path: esp.read(e.path) for e in boot.list_entries(esp) if e.slot == other}
        except OSError as e:
            raise DeviceError(f"cannot read the pending entry on the ESP: {e}", hint="nothing was changed") from None
        state.state = "rolled-back"
        if t.version not in state.failed_versions:
            state.failed_versions.append(t.version)
        state.slots[other].status = "bad"
        dev._save(state)  # write-ahead: a crash before the removal leaves entries that prune removes
        try:
            boot.remove_slot_entries(esp, other)
        except DeviceError as e:
            raise DeviceError(f"withdrawing the pending update failed: {e.message}; {_undo_cancel(dev, saved, before)}",
                              hint=e.hint) from None
        dev.prune(state, slot)
        return {**dev.status(), "action": "cancelled-pending"}
    s = state.slots[other]
    other_entries = [e for e in boot.list_entries(esp) if e.slot == other and not e.exhausted]
    if s.status != "good" or not other_entries:
        raise DeviceError(f"slot {other} holds no verified, bootable system to roll back to (status {s.status}, "
                          f"{len(other_entries)} usable boot entries)", hint="nothing was changed")
    if s.sha256 and s.size and not slot_hash_ok(dev, other, s.sha256, s.size):
        raise DeviceError(f"slot {other} no longer matches the sha256 it was verified with",
                          hint="nothing was changed; it cannot be rolled back to")
    entry = dev.booted_entry(slot)
    if entry is None:
        raise DeviceError(f"cannot find the boot entry of the booted slot {slot}", hint="nothing was changed")
    state.rollback = {"from_slot": slot, "from_version": entry.version, "to_slot": other, "to_version": s.version}
    dev._save(state)  # write-ahead: void until the entry below is marked
    try:
        boot.mark_bad(esp, entry)  # sorts last: systemd-boot now picks the other slot, this one stays a last resort
    except DeviceError as e:
        marked = next((x for x in _entries_or_empty(dev) if x.slot == slot and same_version(x.version, entry.version)
                       and x.exhausted), None)
        if marked is not None:  # the rename happened, the flush after it failed: undo it
            try:
                esp.rename(marked.path, entry.path)
                esp.sync()
                marked = None
            except OSError:
                pass
        if marked is not None:  # the undo failed too: the request stands
            raise DeviceError(f"the rollback is requested (entry {entry.name} is marked bad: slot {other} boots next), "
                              f"but flushing the ESP failed: {e.message}; if the power fails before the ESP writes "
                              f"back, slot {slot} may boot again", hint=e.hint) from None
        state.rollback = None
        try:
            dev._save(state)
        except Error:
            pass  # a request whose entry is not marked is void anyway
        raise DeviceError(f"requesting the rollback failed: {e.message}; nothing was changed (slot {slot} still "
                          "boots next)", hint=e.hint) from None
    return {**dev.status(), "action": "rollback-on-reboot"}
