"""The device's life cycle: which verb moves which state where, in which write order, and how
the state is reconciled with what the boot loader did. Pure: no I/O, no clock.

What the boot loader says outranks the state file. The ESP and the loader variables are what
actually decides the next boot, so after a crash between two writes the state is re-derived
from them: a counting entry that was booted is a trial, a blessed entry of the target slot is a
commit, whatever the file says.

Transitions (``state x verb -> next``) and the order of their writes. Every verb writes its
*intent* to the state file before it changes what boots (write-ahead), so a crash at any point
leaves either the old boot or a state that :func:`reconcile` completes from the ESP:

=============  =============  ===================  ==================================================
verb           from           to                   write order (a crash between two steps -> reconcile)
=============  =============  ===================  ==================================================
download       idle, staged,  downloading ->       remove the target slot's entries + sync; state
               committed,     staged               ``downloading``; chunks (progress saved after each);
               rolled-back,                        slot flush; staged files; state ``staged``.
               downloading                         Refused while a trial is undecided or a rollback
                                                   waits (the other slot is the fallback).
apply          staged         pending              boot files (temp+rename) + sync; state ``pending``
                                                   (write-ahead); entry ``+tries`` + sync. Crash after
                                                   the state, before the entry: no entry -> staged.
(reboot)       pending        trial                systemd-boot counts the entry down and boots it.
boot-check     trial          committed            health hooks; bless (rename, sync): the commit
                                                   point; state ``committed``. Crash after the bless:
                                                   booted blessed entry of the target -> committed.
boot-check     trial          rolled-back (after   health hook failed: state ``rollback`` request
               (hook failed)  the reboot)          (write-ahead); entry ``+0-N``; reboot.
rollback       pending        rolled-back          state ``rolled-back`` (write-ahead); remove the
                                                   entries. Crash between: prune removes them.
rollback       committed/     (request) ->         state ``rollback`` request (write-ahead); booted
               idle           rolled-back          entry ``+0-N``. A request whose entry was never
                                                   marked is void (dropped by reconcile).
=============  =============  ===================  ==================================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from metadata.version import Version

from .boot import Entry
from .policy import same_version
from .state import SlotState, State, Target

__all__ = ["BootFacts", "commit", "rebuild", "reconcile", "same_version"]


@dataclass(frozen=True)
class BootFacts:
    """What the boot loader and the ESP say right now."""

    slot: str  # the booted slot
    entry: Entry | None  # the entry it booted (its current file name); None: the loader did not say
    entries: tuple[Entry, ...]  # abflip's entries on the ESP


def other(slot: str) -> str:
    return {"a": "b", "b": "a"}[slot]


def _fail(state: State, slot: str, version: str | None) -> None:
    state.slots[slot].status = "bad"
    if version and not any(same_version(version, v) for v in state.failed_versions):
        state.failed_versions.append(version)


def reconcile(state: State, facts: BootFacts) -> State:
    """Fold what the boot loader did since the last run into ``state`` (a copy is returned)."""
    s = replace(state, slots={k: replace(v) for k, v in state.slots.items()},
                target=replace(state.target) if state.target else None,
                failed_versions=list(state.failed_versions), rollback=dict(state.rollback) if state.rollback else None)
    booted, entry = facts.slot, facts.entry
    rb = s.rollback
    if rb is not None:
        if booted == rb.get("to_slot"):
            s.rollback = None
            s.state = "rolled-back"
            _fail(s, rb["from_slot"], rb.get("from_version"))
            return s
        marked = [e for e in facts.entries if e.slot == rb.get("from_slot") and e.exhausted]
        live = [e for e in facts.entries if e.slot == rb.get("from_slot") and not e.exhausted]
        if live and not marked:
            s.rollback = None  # the request never reached the ESP (crash or error before the rename): void
        else:
            return s
    t = s.target
    if entry is not None and entry.counting:
        # Booted through a counting entry: this boot is a trial, whatever the file says.
        if not (t is not None and t.slot == booted and same_version(t.version, entry.version)):
            s.target = Target(entry.version, booted, t.manifest_sha256 if t and t.slot == booted else "", 0, 0, 0)
            s.slots[booted] = SlotState(entry.version, None, "staged", None)
        s.state = "trial"
        return s
    if t is None:
        return s
    if t.slot == booted:
        if s.state in ("pending", "trial"):
            if entry is not None and same_version(entry.version, t.version):
                # Booted the target through its blessed entry: the bless (the commit point) happened.
                commit(s)
            elif entry is None:
                s.state = "trial"  # the loader does not say (no loader variables): as before, a trial
        return s
    # Booted the other slot (the old one).
    target_entries = [e for e in facts.entries if e.slot == t.slot and same_version(e.version, t.version)]
    if s.state == "trial":
        _fail(s, t.slot, t.version)  # the trial boot failed and systemd-boot fell back
        s.state = "rolled-back"
    elif s.state == "pending":
        if not target_entries:
            s.state = "staged"  # the entry was never written (crash after the write-ahead) or was removed
        elif all(e.exhausted for e in target_entries):
            _fail(s, t.slot, t.version)
            s.state = "rolled-back"
    return s


def commit(s: State) -> None:
    """The target is committed: its slot good, the floor raised to it (never lowered)."""
    t = s.target
    assert t is not None
    s.state = "committed"
    floors = [v for v in (s.floor, t.version) if v]
    s.floor = max(floors, key=Version.parse) if floors else None
    s.slots[t.slot].status = "good"
    s.slots[t.slot].version = t.version
    s.last_error = None


def rebuild(facts: BootFacts, why: str | None) -> State:
    """A state from the boot loader alone (no file, or an invalid one): the booted slot holds
    the booted entry's version; a counting booted entry is a trial (the other slot is its
    fallback and must not be written); the other slot is unknown (nothing verified it)."""
    s = State(recovered=True, invalid=why)
    entry = facts.entry
    if entry is None:
        own = [e for e in facts.entries if e.slot == facts.slot and not e.exhausted]
        entry = own[0] if len(own) == 1 else None
    if entry is not None:
        s.slots[facts.slot] = SlotState(entry.version, None, "good" if not entry.counting else "staged", None)
        if facts.entry is not None and facts.entry.counting:
            s.state = "trial"
            s.target = Target(entry.version, facts.slot, "", 0, 0, 0)
    return reconcile(s, facts)
