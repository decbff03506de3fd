"""The device's side of release control that touches files: its id, and what the channel said.

- :func:`read_device_id`: ``device.id_file`` (``/etc/machine-id``), read with
  :func:`metadata.bounded.read_file` (at most 4 KiB, a regular file, never a FIFO that blocks),
  validated by :func:`applier.rollout.device_id_problem`.
  A missing or bad id is not an error: the device is then only in a rollout at 100 %, and
  ``check``/``status`` say why.
- :func:`save_record` / :func:`load_record`: ``<state_dir>/release-control.json``, the last
  verified channel pointer's rollout and withdrawn versions and this device's decision, written
  atomically after each check that changed it, so the offline ``status`` can say that the running
  release was withdrawn. Loaded strictly and bounded (64 KiB); anything odd reads as "nothing recorded".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from metadata.bounded import FileRefused, loads_json, read_file
from metadata.manifest import NAME_RE, withdrawn_problem
from metadata.version import Version

from .atomic import write_atomic
from .rollout import device_id_problem

__all__ = ["ControlRecord", "read_device_id", "save_record", "load_record", "RECORD", "ID_MAX_BYTES"]

RECORD = "release-control.json"
ID_MAX_BYTES = 4096
RECORD_MAX_BYTES = 64 << 10


@dataclass(frozen=True)
class ControlRecord:
    """What the last verified channel pointer said: its channel and version, the versions it
    withdrew, and this device's rollout decision (:meth:`applier.rollout.Decision.to_json`)."""

    channel: str
    version: str
    withdrawn: tuple[str, ...]
    rollout: dict | None

    def to_json(self) -> dict:
        return {"channel": self.channel, "version": self.version, "withdrawn": list(self.withdrawn),
                "rollout": self.rollout}

    def is_withdrawn(self, version: str) -> bool:
        from .policy import same_version

        return any(same_version(version, w) for w in self.withdrawn)


def read_device_id(path: Path) -> tuple[str | None, str | None]:
    """``(id, None)`` or ``(None, why not)``: whatever the file is (missing, a FIFO, a directory,
    huge, junk), it only keeps the device out of partial rollouts."""
    try:
        data = read_file(path, ID_MAX_BYTES)
    except FileRefused as e:
        return None, f"{path} {e.strerror}"
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror or e}"
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        return None, f"{path} is not ASCII text"
    if problem := device_id_problem(text):
        return None, f"{path}: {problem}"
    return text, None


def save_record(state_dir: Path, record: ControlRecord) -> None:
    """Best effort: a check that cannot write it still answers. A record that is already there
    is not written again (an idle check, every timer tick, then syncs nothing)."""
    data = (json.dumps(record.to_json(), sort_keys=True) + "\n").encode()
    try:
        if read_file(state_dir / RECORD, len(data)) == data:
            return
    except OSError:
        pass
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        # '.state-' temps are what the sweep removes after a kill
        write_atomic(state_dir / RECORD, data, prefix=".state-rc-")
    except OSError:
        pass


def load_record(state_dir: Path) -> ControlRecord | None:
    try:
        d = loads_json(read_file(state_dir / RECORD, RECORD_MAX_BYTES))
    except (OSError, ValueError):  # also FileRefused, TooDeep, UnicodeDecodeError
        return None
    if not isinstance(d, dict) or not isinstance(d.get("channel"), str) or not NAME_RE.match(d["channel"]):
        return None
    if withdrawn_problem(d.get("withdrawn")) is not None or not isinstance(d.get("version"), str):
        return None
    try:
        Version.parse(d["version"])
    except Exception:  # noqa: BLE001 (a hand-edited record reads as none)
        return None
    if d.get("rollout") is not None and not isinstance(d.get("rollout"), dict):
        return None
    return ControlRecord(d["channel"], d["version"], tuple(d["withdrawn"]), d.get("rollout"))
