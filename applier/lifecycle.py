"""The device's life cycle, explicit: its phases, the events that move it, one table of
``(phase, event) -> next phase`` with each move's precondition, its writes in order and what the
ESP and the slots hold afterwards, and the one function every state change goes through.
Pure: no I/O, no clock.

Every verb asks :func:`require` whether its event may happen in the device's phase (a refusal
is a :class:`~metadata.errors.PolicyError` or :class:`~metadata.errors.UserError` whose words
come from the table) and changes the phase only with :func:`move`, which refuses — as an
internal error, a bug — any move the table does not hold. ``docs/architecture.md`` shows the
table generated from here (``python -m applier.lifecycle``; ``tests/test_lifecycle_model.py``
checks the docs against it and walks every phase with every event).

What the boot loader says outranks the state file: after a crash between two writes they may
disagree, and :func:`reconcile` derives the phase from the loader (the ``boot-*`` events): a
counting entry that was booted is a trial, a booted blessed entry of the target a commit.

On disk (``state.json``, schema 1) a phase is the ``state`` string, except
:attr:`Phase.ROLLBACK_REQUESTED`: that is the ``rollback`` record beside the state the request
was made in. The abflip of *either* slot reads the file (after a rollback the older abflip
reads what the newer one wrote), so the schema only ever gains what older readers accept.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from metadata.errors import InternalError, PolicyError, UserError
from metadata.version import Version

from .bootloader import BootFacts
from .policy import same_version
from .state import RollbackRequest, SlotState, State, Target

__all__ = ["BootFacts", "Event", "Phase", "RULES", "Rule", "commit", "markdown", "move", "next_step", "other",
           "phase_of", "rebuild", "reconcile", "require", "settled"]


class Phase(enum.StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    STAGED = "staged"
    PENDING = "pending"
    TRIAL = "trial"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled-back"
    ROLLBACK_REQUESTED = "rollback-requested"


class Event(enum.StrEnum):
    # verbs (and the steps of a verb that change the phase)
    DOWNLOAD = "download"
    DOWNLOADED = "downloaded"
    APPLY = "apply"
    APPLY_UNDONE = "apply-undone"
    SLOT_MODIFIED = "slot-modified"
    DISCARD = "discard"
    BLESS = "bless"
    MARK_GOOD = "mark-good"
    HEALTH_FAILED = "health-failed"
    ROLLBACK = "rollback"
    PROVISION = "provision"
    RESET = "reset-state"
    # what the boot loader did (reconcile)
    BOOT_TRIAL = "boot-trial"
    BOOT_COMMITTED = "boot-committed"
    BOOT_FELL_BACK = "boot-fell-back"
    BOOT_ROLLED_BACK = "boot-rolled-back"
    ENTRY_LOST = "entry-lost"
    REQUEST_VOID = "request-void"
    # what the repository did (seen at a check; no move by itself: what the next verb does)
    NEW_RELEASE = "new-release"
    WITHDRAWN = "withdrawn"
    ROLLOUT = "rollout-change"
    # a power cut at any write of any verb: reconcile on the next command
    POWER_CUT = "power-cut"


P = Phase
E = Event
ALL = frozenset(Phase)
SETTLED = frozenset({P.IDLE, P.COMMITTED, P.ROLLED_BACK})
IN_FLIGHT = frozenset({P.DOWNLOADING, P.STAGED, P.PENDING})


@dataclass(frozen=True)
class Rule:
    """One row of the table: ``event`` moves a phase in ``sources`` to one of ``targets``."""

    event: Event
    sources: frozenset[Phase]
    targets: frozenset[Phase]
    pre: str  # precondition (besides the phase), checked by the verb before its first write
    writes: str  # the writes, in order (a crash between two of them -> reconcile)
    after: str  # what the ESP and the slots hold afterwards


def _r(event: Event, sources, targets, pre: str, writes: str, after: str) -> Rule:
    return Rule(event, frozenset(sources), frozenset(targets), pre, writes, after)


#: The table. A verb's event not listed for a phase is refused there (see :data:`REFUSALS`).
RULES: tuple[Rule, ...] = (
    _r(E.DOWNLOAD, SETTLED | IN_FLIGHT, {P.DOWNLOADING},
       "the channel offers a release this device takes (product, hardware, floor, failed, rollout, not withdrawn, "
       "memory, slot size)",
       "remove the target slot's entries + sync; state `downloading` (slot `writing`); chunks, progress saved after "
       "each", "no entry names the target slot; the booted slot and its entry untouched"),
    _r(E.DOWNLOADED, {P.DOWNLOADING}, {P.STAGED}, "every chunk verified and written, the slot flushed",
       "staged manifest + boot files (atomic); state `staged` (slot `staged`, sha256, size)",
       "the target slot holds the verified image; still no entry names it"),
    _r(E.SLOT_MODIFIED, {P.STAGED}, {P.DOWNLOADING}, "apply re-hashed the slot or a boot file and it differs",
       "state `downloading`", "no entry names the target slot; the next download repairs it"),
    _r(E.APPLY, {P.STAGED, P.PENDING}, {P.PENDING},
       "a maintenance window (or --now); still offered (not withdrawn nor replaced); slot and boot files re-verified; "
       "pre-install hooks pass; room on the ESP (pending already: nothing to do)",
       "boot files (temp+rename) + sync; state `pending` (write-ahead); entry `+tries` + sync; post-install hooks",
       "a counting entry boots the target slot next; the booted slot's entry is the fallback"),
    _r(E.APPLY_UNDONE, {P.PENDING}, {P.STAGED}, "the entry write or a post-install hook failed",
       "remove the target's entries + sync; state `staged`", "no entry names the target slot"),
    _r(E.DISCARD, IN_FLIGHT, {P.IDLE, P.ROLLED_BACK},
       "the stage (or the pending update) is withdrawn or, staged, no longer offered",
       "remove the target's entries + sync; state settled, no target, slot `unknown`; staged files removed",
       "no entry names the target slot; `rolled-back` when the booted version is below the floor, else `idle`"),
    _r(E.BOOT_TRIAL, ALL, {P.TRIAL}, "the loader booted a counting entry",
       "(systemd-boot counted the try down)", "the other slot is the fallback and is not written"),
    _r(E.BLESS, {P.TRIAL}, {P.COMMITTED},
       "judged healthy: the root is the named slot, the trial's version is not withdrawn, health-check hooks pass "
       "(in this call, or by `boot-check --no-bless` before boot-complete.target: `mark-good --no-health`)",
       "bless the entry (rename, sync): the commit point; state `committed`, floor raised",
       "the booted entry is blessed; entries of other versions pruned"),
    _r(E.MARK_GOOD, {P.TRIAL}, {P.COMMITTED}, "on trial: it is the `bless` (health-check hooks first)",
       "as `bless`", "as `bless`"),
    _r(E.MARK_GOOD, SETTLED | IN_FLIGHT, SETTLED | IN_FLIGHT, "not on trial",
       "bless the booted entry if it counts; state: the booted slot `good` with its entry's version",
       "the booted slot is recorded good"),
    _r(E.HEALTH_FAILED, {P.TRIAL}, {P.ROLLBACK_REQUESTED},
       "a health-check hook failed, the root is not the named slot, or the version was withdrawn before the boot",
       "state: rollback request (write-ahead); booted entry `+0-N` + sync; reboot command",
       "the old slot's entry boots next; the tried entry stays a last resort"),
    _r(E.ROLLBACK, SETTLED | {P.TRIAL}, {P.ROLLBACK_REQUESTED},
       "the other slot is `good`, has a usable entry and still matches its sha256",
       "state: rollback request (write-ahead); booted entry `+0-N` + sync",
       "the other slot's entry boots next; the floor is not lowered"),
    _r(E.ROLLBACK, {P.PENDING}, {P.ROLLED_BACK}, "not booted yet: the pending update is cancelled",
       "state `rolled-back`, version failed, slot `bad` (write-ahead); remove the target's entries + sync",
       "no entry names the target slot; the version is not retried by itself"),
    _r(E.ROLLBACK, {P.ROLLBACK_REQUESTED}, {P.ROLLBACK_REQUESTED}, "requested already", "(none)",
       "the other slot still boots next"),
    _r(E.BOOT_ROLLED_BACK, {P.ROLLBACK_REQUESTED}, {P.ROLLED_BACK}, "booted the slot the request named",
       "state `rolled-back`, the version failed", "the marked entry and its files are pruned"),
    _r(E.REQUEST_VOID, {P.ROLLBACK_REQUESTED}, SETTLED | {P.TRIAL},
       "the request's entry was never marked (a crash or error before the rename)", "state without the request",
       "nothing changed on the ESP"),
    _r(E.BOOT_COMMITTED, {P.PENDING, P.TRIAL}, {P.COMMITTED},
       "booted the target through its blessed entry (systemd-bless-boot blessed it)",
       "state `committed`, floor raised", "the booted entry is blessed"),
    _r(E.BOOT_FELL_BACK, {P.PENDING, P.TRIAL}, {P.ROLLED_BACK},
       "booted the other slot: the target's entry used up its tries (or its trial was never blessed)",
       "state `rolled-back`, the version failed", "the exhausted entry and its files are pruned"),
    _r(E.ENTRY_LOST, {P.PENDING}, {P.STAGED}, "pending, but no entry for the target (crash after the write-ahead)",
       "state `staged`", "no entry names the target slot"),
    _r(E.PROVISION, SETTLED | IN_FLIGHT, {P.IDLE},
       "the booted slot holds the release's image; its boot files match; not provisioned yet (or --force, which "
       "discards an update in flight)",
       "boot files + sync; blessed entry + sync; the slot's other entries and the other slot's counting entries "
       "removed + sync; state `idle`, slot good, floor = the version (--force may lower it)",
       "the booted slot's blessed entry; the other slot unknown, nothing counts"),
    _r(E.RESET, ALL, ALL - {P.ROLLBACK_REQUESTED},
       "the state file is missing or invalid (a valid one is never reset)",
       "the invalid file kept as state.json.invalid; the state rebuilt from the boot loader",
       "nothing on the ESP or in the slots changes"),
    _r(E.NEW_RELEASE, ALL, ALL, "a check saw a newer release on the channel", "(release-control record)",
       "the next download stages it; a stage of an older one is discarded by the next apply"),
    _r(E.WITHDRAWN, ALL, ALL, "a check saw the staged, pending or booted version withdrawn", "(release-control record)",
       "the next apply discards a stage, the next run cancels a pending update, boot-check rolls a trial back; "
       "a committed release is kept and reported"),
    _r(E.ROLLOUT, ALL, ALL, "a check saw the rollout widened, narrowed, paused or resumed", "(release-control record)",
       "a device outside the rollout (or paused before it started) does not start the release; one that started "
       "finishes"),
    _r(E.POWER_CUT, ALL, ALL, "any write of any verb", "(none)",
       "the next command reconciles the file with the boot loader: the device boots a verified slot"),
)

#: The events a command asks for (the others happen inside a verb, at a boot, or in the repository).
VERBS = (E.DOWNLOAD, E.APPLY, E.MARK_GOOD, E.ROLLBACK, E.PROVISION, E.RESET)

#: Why a verb's event is refused in a phase: (error class, sentence). ``{slot}``, ``{other}``
#: are filled in by :func:`require`.
REFUSALS: dict[tuple[Phase, Event], tuple[type, str, str]] = {
    **{(p, E.DOWNLOAD): (PolicyError, "slot {slot} is on trial (booted, not yet blessed); slot {other} is its fallback "
                         "and must not be overwritten", "run `abflip boot-check` or `abflip mark-good` first")
       for p in (P.TRIAL,)},
    (P.ROLLBACK_REQUESTED, E.DOWNLOAD): (PolicyError, "a rollback to slot {other} waits for a reboot; slot {other} "
                                         "must not be overwritten", "reboot first"),
    **{(p, E.APPLY): (UserError, "nothing is staged (state {state})", "run `abflip download` first")
       for p in ALL - {P.STAGED, P.PENDING}},
    (P.ROLLBACK_REQUESTED, E.MARK_GOOD): (PolicyError, "a rollback to slot {other} waits for a reboot; slot {slot} "
                                          "is marked bad", "reboot: slot {other} boots next"),
    **{(p, E.ROLLBACK): (UserError, "slot {other} is being written (state {state}): it holds no verified, bootable "
                         "system to roll back to", "nothing was changed") for p in (P.DOWNLOADING, P.STAGED)},
    (P.TRIAL, E.PROVISION): (PolicyError, "slot {slot} is on trial (booted, not yet blessed): provisioning would "
                             "bless an image nobody judged", "run `abflip boot-check` (health hooks) or `abflip "
                             "rollback` first; nothing was changed"),
    (P.ROLLBACK_REQUESTED, E.PROVISION): (PolicyError, "a rollback to slot {other} waits for a reboot",
                                          "reboot first; nothing was changed"),
}


def phase_of(state: State) -> Phase:
    return P.ROLLBACK_REQUESTED if state.rollback is not None else Phase(state.state)


def rule(phase: Phase, event: Event) -> Rule | None:
    return next((r for r in RULES if r.event == event and phase in r.sources), None)


def require(state: State, event: Event, booted: str | None = None) -> Phase:
    """The device's phase, if ``event`` may happen in it; else the table's refusal."""
    phase = phase_of(state)
    refusal = REFUSALS.get((phase, event))
    if refusal is None and rule(phase, event) is not None:
        return phase
    cls, what, hint = refusal or (InternalError, f"{event} is not a move of phase {phase}", "")
    words = {"state": state.state, "slot": booted or "?", "other": other(booted) if booted else "?"}
    e = cls(what.format(**words), hint=hint.format(**words) or None)
    e.recorded = cls is InternalError  # a verb asked in the wrong phase is the caller's mistake, not the device's
    raise e


def move(state: State, event: Event, to: Phase | None = None, *, request: RollbackRequest | None = None) -> None:
    """The one way the phase changes: ``event`` from the state's phase to ``to`` (the rule's
    only target when None); entering :attr:`Phase.ROLLBACK_REQUESTED` takes its ``request``. A
    move the table does not hold is a bug (InternalError)."""
    phase = phase_of(state)
    r = rule(phase, event)
    if r is None or (to is None and len(r.targets) != 1) or (to is not None and to not in r.targets):
        raise InternalError(f"lifecycle: {event} does not move {phase} to {to or sorted(r.targets) if r else to}")
    to = to or next(iter(r.targets))
    if (to == P.ROLLBACK_REQUESTED) != (request is not None):
        raise InternalError(f"lifecycle: {event} to {to} {'needs' if request is None else 'takes no'} rollback request")
    if to == P.ROLLBACK_REQUESTED:
        state.rollback = request  # the state string stays what it was (older readers know it): the record is the phase
        return
    state.rollback = None
    state.state = to.value


def other(slot: str) -> str:
    return {"a": "b", "b": "a"}[slot]


def settled(state: State, booted: str, booted_version: str | None) -> Phase:
    """The phase after an update in flight is dropped: ``rolled-back`` when the booted version
    is below the floor (the device was rolled back and stays so), else ``idle``."""
    if state.floor and booted_version:
        try:
            if Version.parse(booted_version) < Version.parse(state.floor):
                return P.ROLLED_BACK
        except UserError:
            pass
    return P.IDLE


def _fail(state: State, slot: str, version: str | None) -> None:
    state.slots[slot].status = "bad"
    if version and not any(same_version(version, v) for v in state.failed_versions):
        state.failed_versions.append(version)


def commit(s: State) -> None:
    """The target is committed: its slot good, the floor raised to it (never lowered)."""
    t = s.target
    assert t is not None
    floors = [v for v in (s.floor, t.version) if v]
    s.floor = max(floors, key=Version.parse) if floors else None
    s.slots[t.slot].status = "good"
    s.slots[t.slot].version = t.version
    s.last_error = None


def _copy(state: State) -> State:
    return replace(state, slots={k: replace(v) for k, v in state.slots.items()},
                   target=replace(state.target) if state.target else None,
                   failed_versions=list(state.failed_versions),
                   rollback=replace(state.rollback) if state.rollback else None)


def reconcile(state: State, facts: BootFacts) -> State:
    """Fold what the boot loader did since the last run into ``state`` (a copy is returned)."""
    s = _copy(state)
    booted, entry = facts.slot, facts.entry
    rb = s.rollback
    if rb is not None:
        if booted == rb.to_slot:
            _fail(s, rb.from_slot, rb.from_version)
            move(s, E.BOOT_ROLLED_BACK)
            return s
        marked = [e for e in facts.entries if e.slot == rb.from_slot and e.exhausted]
        live = [e for e in facts.entries if e.slot == rb.from_slot and not e.exhausted]
        if not (live and not marked):
            return s
        # the request never reached the ESP (crash or error before the rename): void
        move(s, E.REQUEST_VOID, to=Phase(s.state))
    t = s.target
    if entry is not None and entry.counting:
        # Booted through a counting entry: this boot is a trial, whatever the file says.
        if not (t is not None and t.slot == booted and same_version(t.version, entry.version)):
            s.target = Target(entry.version, booted, t.manifest_sha256 if t and t.slot == booted else "", 0, 0, 0)
            s.slots[booted] = SlotState(entry.version, None, "staged", None)
        if phase_of(s) != P.TRIAL:
            move(s, E.BOOT_TRIAL)
        return s
    if t is None:
        return s
    if t.slot == booted:
        if s.state in (P.PENDING, P.TRIAL):
            if entry is not None and same_version(entry.version, t.version):
                # Booted the target through its blessed entry: the bless (the commit point) happened.
                commit(s)
                move(s, E.BOOT_COMMITTED)
            elif entry is None and s.state == P.PENDING:
                move(s, E.BOOT_TRIAL)  # the loader does not say (no loader variables): as before, a trial
        return s
    # Booted the other slot (the old one).
    target_entries = [e for e in facts.entries if e.slot == t.slot and same_version(e.version, t.version)]
    if s.state == P.TRIAL:
        _fail(s, t.slot, t.version)  # the trial boot failed and systemd-boot fell back
        move(s, E.BOOT_FELL_BACK)
    elif s.state == P.PENDING:
        if not target_entries:
            move(s, E.ENTRY_LOST)  # the entry was never written (crash after the write-ahead) or was removed
        elif all(e.exhausted for e in target_entries):
            _fail(s, t.slot, t.version)
            move(s, E.BOOT_FELL_BACK)
    return s


def rebuild(facts: BootFacts, why: str | None, salvage: State | None = None) -> State:
    """A state from the boot loader alone (no file, or an invalid one): the booted slot holds
    the booted entry's version; a counting booted entry is a trial (the other slot is its
    fallback and must not be written); the other slot is unknown (nothing verified it).
    ``salvage``: what still validated in an invalid file (the floor, the failed versions) is kept."""
    s = State(recovered=True, invalid=why)
    if salvage is not None:
        s.floor, s.failed_versions = salvage.floor, list(salvage.failed_versions)
    entry = facts.entry
    if entry is None:
        own = [e for e in facts.entries if e.slot == facts.slot and not e.exhausted]
        entry = own[0] if len(own) == 1 else None
    if entry is not None:
        s.slots[facts.slot] = SlotState(entry.version, None, "good" if not entry.counting else "staged", None)
    return reconcile(s, facts)


# -- what happens next (the words of check and status) ---------------------------------------
def next_step(state: State, facts: BootFacts, *, tries: int | None = None, withdrawn: tuple[str, ...] = (),
              offered: str | None = None, available: bool = False, dropped: str | None = None) -> str:
    """One sentence: what the device does next, from its phase. ``withdrawn``: the versions the
    last verified channel pointer withdrew; ``offered``/``available``: the channel's version and
    whether this device takes it (a check knows, an offline status does not); ``dropped``: why
    the stage or the pending update is no longer wanted (withdrawn, or a stage replaced)."""
    phase, t = phase_of(state), state.target
    if t is not None and dropped is None and any(same_version(t.version, w) for w in withdrawn):
        dropped = f"{t.version} was withdrawn"
    if phase == P.ROLLBACK_REQUESTED:
        rb = state.rollback
        return (f"the next boot starts slot {rb.to_slot} ({rb.to_version or 'its version'}): a rollback of "
                f"{rb.from_version or 'slot ' + rb.from_slot} was requested")
    if phase == P.TRIAL:
        if dropped:
            return f"boot-check rolls {t.version} back ({dropped})"
        left = facts.entry.tries_left if facts.entry is not None and facts.entry.counting else None
        return (f"boot-check judges {t.version} (on trial" + (f", {left} more tries" if left is not None else "")
                + "): health hooks, then bless or roll back")
    if phase == P.PENDING:
        if dropped:
            return f"the next run cancels the pending {t.version} ({dropped}) instead of rebooting"
        entry = next((e for e in facts.entries if e.slot == t.slot and e.counting and not e.exhausted), None)
        n = entry.tries_left if entry is not None else tries
        return f"a reboot tries {t.version} in slot {t.slot}" + (f" with {n} tries" if n is not None else "")
    if phase == P.STAGED:
        if dropped:
            return f"the next apply discards the staged {t.version} ({dropped})"
        return f"{t.version} is staged in slot {t.slot}: applied in the next maintenance window"
    if phase == P.DOWNLOADING:
        if dropped:
            return f"the partial download of {t.version} stays unused ({dropped}): the next release starts over"
        return (f"the next download resumes {t.version} at chunk {t.chunks_done + 1} of {t.chunks_total}"
                if t.chunks_total and t.chunks_done < t.chunks_total else
                f"the next download writes {t.version} into slot {t.slot}")
    if offered is not None and available:
        return f"the next run downloads {offered}"
    return "nothing to do until the channel offers a release this device takes"


# -- the table as documentation ------------------------------------------------------------------
def markdown() -> str:
    """The table for docs/architecture.md (checked against the docs by the tests)."""
    def names(ps: frozenset[Phase]) -> str:
        return "any" if ps == ALL else ", ".join(p.value for p in Phase if p in ps)

    lines = ["| event | from | to | precondition | writes, in order | afterwards |", "|---|---|---|---|---|---|"]
    for r in RULES:
        to = "same" if r.targets == r.sources else names(r.targets)
        lines.append(f"| `{r.event}` | {names(r.sources)} | {to} | {r.pre} | {r.writes} | {r.after} |")
    lines += ["", "Refused (the verb's error, nothing changed):", "", "| event | in | says |", "|---|---|---|"]
    by_event: dict[tuple[Event, str], list[Phase]] = {}
    for (p, e), (cls, what, _hint) in REFUSALS.items():
        if cls is InternalError:
            continue
        by_event.setdefault((e, what), []).append(p)
    for (e, what), ps in by_event.items():
        lines.append(f"| `{e}` | {names(frozenset(ps))} | {what.replace('{', '<').replace('}', '>')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
