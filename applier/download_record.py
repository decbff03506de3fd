"""How the staged (or last) release was downloaded: ``<state_dir>/staged/download.json``.

:meth:`applier.delta.Via.record` makes it (kind ``full``/``delta``, bytes downloaded and saved),
:mod:`applier.install` writes it with the stage, and ``status`` reads it back here, bounded
(64 KiB) and leniently: anything odd reads as "nothing recorded". Kept apart from
:mod:`applier.delta` so that ``status`` does not import the streaming code (issue 14).
"""

from __future__ import annotations

from pathlib import Path

from metadata.bounded import loads_json, read_file

__all__ = ["RECORD", "RECORD_MAX", "last_record"]

RECORD = "download.json"  # in <state_dir>/staged/
RECORD_MAX = 64 << 10


def last_record(state_dir: Path) -> dict | None:
    """The record of the last download (for status), or None."""
    try:
        obj = loads_json(read_file(Path(state_dir) / "staged" / RECORD, RECORD_MAX))
    except (OSError, ValueError):  # also FileRefused, TooDeep, UnicodeDecodeError
        return None
    return obj if isinstance(obj, dict) else None
