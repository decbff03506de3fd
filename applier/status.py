"""What the device says about itself (``abflip status``), and the rebuild of an invalid state
file (``abflip reset-state``).

``status`` changes nothing and never refuses the state file: an invalid one is shown rebuilt
from the boot loader with ``state_invalid`` saying why, a file this user may not read is an
error that says "run as root". ``next`` is one sentence from the lifecycle: what the device
does next (:func:`applier.lifecycle.next_step`).
"""

from __future__ import annotations

from metadata.errors import DeviceError, UserError

from . import history
from .download_record import last_record
from .lifecycle import Event, move, next_step, phase_of, rebuild
from .release_control import load_record
from .session import Session
from .state import State, load_state, quarantine_state

__all__ = ["reset_state", "status"]


def status(session: Session) -> dict:
    boot, cfg = session.boot, session.config
    try:
        facts = boot.facts()
    except DeviceError:
        facts = None  # the booted slot is unknown: every write is refused
    slot = facts.slot if facts else None
    if facts is not None:
        state = session.load(mutating=False).state
    else:
        state = load_state(cfg.state_dir) or State()
    entries = list(facts.entries) if facts else (boot.entries() if boot.has_entries_dir() else [])
    entry = facts.entry if facts else None
    booted_version = entry.version if entry else (state.slots[slot].version if slot else None)
    try:
        hwid: str | None = session.hardware_id
    except DeviceError:
        hwid = None
    rec = load_record(cfg.state_dir)
    return {
        "schema": 1,
        "state": state.state,
        "booted_slot": slot,
        "booted_entry": entry.name if entry else None,
        "booted_version": booted_version,
        "floor": state.floor,
        "slots": {k: {**v.__dict__, "device": str(cfg.slots[k].device), "booted": k == slot}
                  for k, v in state.slots.items()},
        "target": state.target.__dict__ if state.target else None,
        "pending_entry": next((e.name for e in entries if e.counting and not e.exhausted
                               and not (entry is not None and e.name == entry.name)), None),
        "entries": [e.to_json() for e in entries],
        "failed_versions": state.failed_versions,
        "last_error": state.last_error,
        "state_recovered": state.recovered,
        # additions to schema 1 (issue 5)
        "hardware_id": hwid,
        "esp": str(getattr(boot.esp, "root", boot.esp)),
        "windows": [w.text for w in cfg.windows],
        "next_window": session.window_info(),
        "rollback": state.rollback.__dict__ if state.rollback else None,
        # (issue 9) why the state file was not trusted, if it was not
        "state_invalid": state.invalid,
        # (issue 12) how the staged/last release was downloaded: kind full|delta, bytes saved
        "download": last_record(cfg.state_dir),
        # (issue 13) what the channel said at the last check: rollout decision, withdrawn versions
        "release_control": None if rec is None else {
            **rec.to_json(), "booted_withdrawn": booted_version is not None and rec.is_withdrawn(booted_version)},
        # (issue 20) the lifecycle's phase and what happens next
        "phase": phase_of(state).value,
        "next": next_step(state, facts, withdrawn=rec.withdrawn if rec else (), tries=cfg.tries)
        if facts is not None else "nothing: the booted slot is unknown, every write is refused",
    }


def reset_state(session: Session) -> dict:
    """Rebuild a missing or invalid state from the boot loader; the invalid file is kept as
    ``state.json.invalid``. A valid file is never reset: it holds what the boot loader cannot
    tell (the floor, failed versions, a staged slot's hash)."""
    with session.locked(), history.recording(session.config.state_dir, "reset-state"):
        facts = session.boot.facts()
        raw = load_state(session.config.state_dir)
        if raw is not None and not raw.invalid:
            raise UserError(f"the state file is valid (state {raw.state}, floor {raw.floor or 'none'}): there is "
                            "nothing to rebuild; nothing was changed",
                            hint="reset-state rebuilds a state file that `abflip status` shows as invalid")
        state = rebuild(facts, raw.invalid if raw else None, salvage=raw)
        move(state, Event.RESET, to=phase_of(state))  # the rebuilt phase is the boot loader's word
        if raw is not None:
            quarantine_state(session.config.state_dir)
        session.save(state)
    return {**status(session), "action": "rebuilt",
            "message": "rebuilt the state from the boot entries" + (" (the invalid file is kept as state.json.invalid)"
                                                                   if raw is not None else "")}

