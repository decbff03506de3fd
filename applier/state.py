"""The device's persistent state (``<state_dir>/state.json``), written atomically.

States (docs/architecture.md): idle -> downloading -> staged -> pending -> (reboot) -> trial ->
committed | rolled-back; the transitions and their write order are in :mod:`applier.lifecycle`.

The file is validated on load against its schema, field by field (types, ranges, slot
names, versions, hashes). A file that is missing or fails validation is never trusted:
:func:`load_state` says why (``State.invalid``), and :mod:`applier.lifecycle` rebuilds the
state from what the boot loader says (the entries on the ESP and the loader variables),
which outranks the file. Mutating commands refuse to run on an invalid file until it is
rebuilt (``abflip reset-state``, or ``boot-check`` at the next boot, which never fails on it);
the bad file is kept as ``state.json.invalid``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from metadata.bounded import FileRefused, loads_json, read_file
from metadata.errors import DeviceError, UserError
from metadata.version import Version

from .atomic import write_atomic

__all__ = ["STATES", "RollbackRequest", "SlotState", "State", "StateInvalid", "Target", "load_state",
           "quarantine_state", "save_state"]

SCHEMA = 1
STATES = ("idle", "downloading", "staged", "pending", "trial", "committed", "rolled-back")
SLOT_STATUSES = ("unknown", "writing", "staged", "good", "bad")
STATE_FILE = "state.json"
INVALID_SUFFIX = ".invalid"
TEMP_PREFIX = ".state-"
MAX_STATE_BYTES = 1 << 20
MAX_FAILED = 256
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class SlotState:
    version: str | None = None
    sha256: str | None = None  # decompressed image sha256, once verified
    status: str = "unknown"  # unknown | writing | staged | good | bad
    size: int | None = None  # bytes of the image the sha256 covers (to re-verify it)


@dataclass
class Target:
    """The release being installed."""

    version: str
    slot: str
    manifest_sha256: str
    chunks_done: int = 0
    chunks_total: int = 0
    bytes_downloaded: int = 0


@dataclass
class RollbackRequest:
    """A requested rollback waiting for its reboot: the booted entry (of ``from_slot``) is marked
    bad, so ``to_slot`` boots next."""

    from_slot: str
    from_version: str | None
    to_slot: str
    to_version: str | None


@dataclass
class State:
    state: str = "idle"
    floor: str | None = None
    slots: dict[str, SlotState] = field(default_factory=lambda: {"a": SlotState(), "b": SlotState()})
    target: Target | None = None
    failed_versions: list[str] = field(default_factory=list)
    last_error: dict | None = None
    updated: str | None = None
    recovered: bool = False  # rebuilt from the boot loader (the file was missing or invalid)
    rollback: RollbackRequest | None = None  # a requested rollback waiting for its reboot
    invalid: str | None = None  # why the file on disk failed validation (None: it did not, or there was none)

    def to_json(self) -> dict:
        d = asdict(self)
        d["schema"] = SCHEMA
        d.pop("recovered")
        d.pop("invalid")
        return d

    @classmethod
    def from_json(cls, d: object) -> State:
        """Parse and validate; raise :class:`StateInvalid` saying which field is wrong."""
        d = _obj(d, "the file")
        _known(d, "the file", {"schema", "state", "floor", "slots", "target", "failed_versions", "last_error",
                               "updated", "rollback"})
        _need(d.get("schema") == SCHEMA, f"schema is {d.get('schema')!r}, not {SCHEMA}")
        _need(d.get("state") in STATES, f"state {d.get('state')!r} is not one of {', '.join(STATES)}")
        slots_raw = _obj(d.get("slots"), "slots")
        _need(set(slots_raw) == {"a", "b"}, f"slots must be exactly a and b, not {sorted(slots_raw)}")
        slots = {k: _slot(v, f"slots.{k}") for k, v in slots_raw.items()}
        target = None if d.get("target") is None else _target(d["target"])
        failed = d.get("failed_versions", [])
        _need(isinstance(failed, list) and len(failed) <= MAX_FAILED, "failed_versions is not a list (of at most "
              f"{MAX_FAILED})")
        for v in failed:
            _version(v, "failed_versions[]")
        rollback = d.get("rollback")
        if rollback is not None:
            rollback = _obj(rollback, "rollback")
            _known(rollback, "rollback", {"from_slot", "from_version", "to_slot", "to_version"})
            _need(rollback.get("from_slot") in ("a", "b") and rollback.get("to_slot") in ("a", "b")
                  and rollback["from_slot"] != rollback["to_slot"], "rollback slots are not a and b")
            for k in ("from_version", "to_version"):
                if rollback.get(k) is not None:
                    _version(rollback[k], f"rollback.{k}")
            rollback = RollbackRequest(rollback["from_slot"], rollback.get("from_version"), rollback["to_slot"],
                                       rollback.get("to_version"))
        last_error = d.get("last_error")
        _need(last_error is None or (isinstance(last_error, dict)
                                     and all(isinstance(v, str) for v in last_error.values())), "last_error is malformed")
        updated = d.get("updated")
        _need(updated is None or isinstance(updated, str), "updated is not a string")
        floor = d.get("floor")
        if floor is not None:
            _version(floor, "floor")
        return cls(d["state"], floor, slots, target, list(failed), last_error, updated, rollback=rollback)


class StateInvalid(ValueError):
    """The state file exists but does not match its schema (the message says where)."""


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise StateInvalid(what)


def _obj(v: object, what: str) -> dict:
    _need(isinstance(v, dict), f"{what} is not a JSON object")
    return v  # type: ignore[return-value]


def _known(d: dict, what: str, keys: set[str]) -> None:
    extra = sorted(set(d) - keys)
    _need(not extra, f"{what} has unknown keys {extra}")


def _version(v: object, what: str) -> str:
    try:
        Version.parse(v)  # type: ignore[arg-type]
    except UserError:
        raise StateInvalid(f"{what} {v!r} is not a version") from None
    return v  # type: ignore[return-value]


def _int(v: object, what: str, hi: int = 1 << 62) -> int:
    _need(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= hi, f"{what} {v!r} is not an integer >= 0")
    return v  # type: ignore[return-value]


def _slot(v: object, what: str) -> SlotState:
    d = _obj(v, what)
    _known(d, what, {"version", "sha256", "status", "size"})
    _need(d.get("status", "unknown") in SLOT_STATUSES, f"{what}.status {d.get('status')!r} is not one of "
          f"{', '.join(SLOT_STATUSES)}")
    if d.get("version") is not None:
        _version(d["version"], f"{what}.version")
    _need(d.get("sha256") is None or (isinstance(d["sha256"], str) and bool(_HEX64.fullmatch(d["sha256"]))),
          f"{what}.sha256 is not a sha256")
    if d.get("size") is not None:
        _int(d["size"], f"{what}.size")
    return SlotState(d.get("version"), d.get("sha256"), d.get("status", "unknown"), d.get("size"))


def _target(v: object) -> Target:
    d = _obj(v, "target")
    _known(d, "target", {"version", "slot", "manifest_sha256", "chunks_done", "chunks_total", "bytes_downloaded"})
    _version(d.get("version"), "target.version")
    _need(d.get("slot") in ("a", "b"), f"target.slot {d.get('slot')!r} is not a or b")
    sha = d.get("manifest_sha256")
    _need(isinstance(sha, str) and (sha == "" or bool(_HEX64.fullmatch(sha))), "target.manifest_sha256 is not a sha256")
    total = _int(d.get("chunks_total", 0), "target.chunks_total", 1 << 20)
    done = _int(d.get("chunks_done", 0), "target.chunks_done", 1 << 20)
    _need(done <= total, f"target.chunks_done {done} is more than target.chunks_total {total}")
    return Target(d["version"], d["slot"], sha, done, total, _int(d.get("bytes_downloaded", 0), "target.bytes_downloaded"))


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_FILE


def load_state(state_dir: Path) -> State | None:
    """The state on disk; None when there is no file (a device's first run). A file that cannot
    be read or does not validate gives a fresh ``State`` with ``invalid`` saying why: the caller
    rebuilds it from the boot loader (:func:`applier.lifecycle.rebuild`)."""
    path = state_path(state_dir)
    try:
        raw = read_file(path, MAX_STATE_BYTES)
    except FileNotFoundError:
        return None
    except FileRefused as e:
        return State(invalid=f"{path} {e.strerror}")
    except PermissionError:
        raise DeviceError(f"cannot read the state file {path}: permission denied",
                          hint="run abflip as root (the state directory belongs to the device agent)") from None
    except OSError as e:
        return State(invalid=f"cannot read {path}: {e.strerror or e}")
    try:
        d = loads_json(raw)
    except ValueError as e:  # also TooDeep, UnicodeDecodeError
        return State(invalid=f"{path} is not valid JSON ({e})")
    try:
        return State.from_json(d)
    except StateInvalid as e:
        return _salvage(d, State(invalid=f"{path}: {e}"))


def _salvage(d: object, state: State) -> State:
    """What an invalid file still says and validates on its own: the floor and the failed
    versions. A rebuild keeps them (they only ever hold the device back, never let it take more)."""
    if not isinstance(d, dict):
        return state
    try:
        if d.get("floor") is not None:
            state.floor = _version(d["floor"], "floor")
    except StateInvalid:
        pass
    failed = d.get("failed_versions")
    if isinstance(failed, list):
        for v in failed[:MAX_FAILED]:
            try:
                state.failed_versions.append(_version(v, "failed_versions[]"))
            except StateInvalid:
                pass
    return state


def save_state(state_dir: Path, state: State) -> None:
    state.updated = datetime.now(UTC).isoformat(timespec="seconds")
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        data = json.dumps(state.to_json(), indent=1, sort_keys=True) + "\n"
        write_atomic(state_path(state_dir), data.encode(), prefix=TEMP_PREFIX)
    except OSError as e:
        raise DeviceError(f"cannot write the state file in {state_dir}: {e}") from None
    state.invalid = None


def quarantine_state(state_dir: Path) -> Path | None:
    """Keep an invalid state file as ``state.json.invalid`` (evidence), out of the way."""
    path = state_path(state_dir)
    dest = path.with_name(STATE_FILE + INVALID_SUFFIX)
    try:
        if path.is_dir():
            import shutil

            if dest.exists():
                shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink()
            path.rename(dest)
        else:
            path.replace(dest)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DeviceError(f"cannot move the invalid state file {path} aside: {e}") from None
    return dest
