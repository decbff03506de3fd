"""The device's persistent state (``<state_dir>/state.json``), written atomically.

States (DESIGN.md): idle -> downloading -> staged -> pending -> (reboot) -> trial ->
committed | rolled-back. A state file that cannot be read is not trusted: the device
starts from a fresh state, in which the inactive slot is unknown and will be re-staged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from metadata.errors import DeviceError

from .atomic import write_atomic

__all__ = ["STATES", "SlotState", "State", "Target", "load_state", "save_state"]

SCHEMA = 1
STATES = ("idle", "downloading", "staged", "pending", "trial", "committed", "rolled-back")


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
class State:
    state: str = "idle"
    floor: str | None = None
    slots: dict[str, SlotState] = field(default_factory=lambda: {"a": SlotState(), "b": SlotState()})
    target: Target | None = None
    failed_versions: list[str] = field(default_factory=list)
    last_error: dict | None = None
    updated: str | None = None
    recovered: bool = False  # the file was unreadable and this state was started afresh
    # A requested rollback waiting for its reboot: {"from_slot", "from_version", "to_slot", "to_version"}.
    rollback: dict | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["schema"] = SCHEMA
        d.pop("recovered")
        return d

    @classmethod
    def from_json(cls, d: dict) -> State:
        if d.get("schema") != SCHEMA or d.get("state") not in STATES:
            raise ValueError("unknown schema or state")
        slots = {k: SlotState(**v) for k, v in d["slots"].items()}
        if set(slots) != {"a", "b"}:
            raise ValueError("bad slots")
        target = Target(**d["target"]) if d.get("target") else None
        rollback = d.get("rollback")
        if rollback is not None and not isinstance(rollback, dict):
            raise ValueError("bad rollback")
        return cls(d["state"], d.get("floor"), slots, target, list(d.get("failed_versions", [])), d.get("last_error"),
                   d.get("updated"), rollback=rollback)


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / "state.json"


def load_state(state_dir: Path) -> State:
    path = state_path(state_dir)
    try:
        return State.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return State()
    except (OSError, ValueError, TypeError, KeyError):
        return State(recovered=True)


def save_state(state_dir: Path, state: State) -> None:
    state.updated = datetime.now(UTC).isoformat(timespec="seconds")
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        data = json.dumps(state.to_json(), indent=1, sort_keys=True) + "\n"
        write_atomic(state_path(state_dir), data.encode(), prefix=".state-")
    except OSError as e:
        raise DeviceError(f"cannot write the state file in {state_dir}: {e}") from None
