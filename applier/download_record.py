"""How the staged (or last) release was downloaded: ``<state_dir>/staged/download.json``.

:meth:`applier.delta.Via.record` makes it (kind ``full``/``delta``, bytes downloaded and saved),
:mod:`applier.install` writes it with the stage, and ``status`` reads it back here, bounded
(64 KiB) and leniently: anything odd reads as "nothing recorded". Kept apart from
:mod:`applier.delta` so that ``status`` does not import the streaming code (issue 14).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["RECORD", "RECORD_MAX", "last_record"]

RECORD = "download.json"  # in <state_dir>/staged/
RECORD_MAX = 64 << 10


def last_record(state_dir: Path) -> dict | None:
    """The record of the last download (for status), or None."""
    try:
        with open(Path(state_dir) / "staged" / RECORD, "rb") as f:
            data = f.read(RECORD_MAX + 1)
        obj = json.loads(data) if len(data) <= RECORD_MAX else None
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
