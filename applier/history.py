"""The device's history: what each verb changed, one JSON line per change, oldest first, in
``<state_dir>/history.jsonl`` (what ``abflip history`` shows).

The state file says where the device stands; it keeps no past (``last_error`` is only the last
failure, ``failed_versions`` no dates). So every verb runs inside :func:`recording`, which reads
the state before and after it and appends one event when something changed or the verb failed:
a download staged or stopped, an update applied, booted, committed, rolled back (by a health
hook, by systemd-boot itself after its tries, or asked for), a provisioning, a rebuilt state, an
error. A verb that changed nothing and did not fail (the boot-check of every ordinary boot, an
idle run), or was only refused (a user's or a policy's error: nothing is staged, not newer,
outside the window), writes nothing, so the log holds events, not heartbeats or typos.

Rules it keeps:
- Best effort and never in the way: a history that cannot be read or written is skipped; the
  verb's own result or error is what the caller gets.
- Append-only and bounded: a line is appended (``O_APPEND``) and fsynced; once the file passes
  :data:`MAX_BYTES` it is rewritten with its newest :data:`KEEP` lines (a temporary file named
  like the state's, ``.state-history-*``, which the device's sweep removes if a run dies, then
  ``rename``). A line cut short by a power cut is skipped when read.
- Runs under the device lock (the verbs hold it), so two writers never interleave.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["FILE", "KEEP", "MAX_BYTES", "describe", "read", "recording", "snapshot"]

FILE = "history.jsonl"
MAX_BYTES = 256 << 10  # then the newest KEEP events are kept
KEEP = 500
LINE_MAX = 4096  # an event is a few hundred bytes; a longer line is not one abflip wrote


def snapshot(state_dir: Path) -> dict | None:
    """What the history compares: the state file's summary (None: no valid state file)."""
    from .state import load_state

    st = load_state(state_dir)
    if st is None or st.invalid:
        return None
    t = st.target
    return {"state": st.state, "floor": st.floor, "failed": list(st.failed_versions),
            "target": None if t is None else {"version": t.version, "slot": t.slot, "chunks_done": t.chunks_done,
                                              "chunks_total": t.chunks_total},
            "slots": {k: {"status": v.status, "version": v.version} for k, v in st.slots.items()},
            "rollback": st.rollback.__dict__ if st.rollback else None}


@contextlib.contextmanager
def recording(state_dir: Path, verb: str) -> Iterator[None]:
    """Run a verb; append what it changed (or why it failed, or that it was interrupted)."""
    from metadata.errors import Error

    before = _safe(lambda: snapshot(state_dir))
    try:
        yield
    except Error as e:
        _note(state_dir, verb, before, {"blame": e.blame, "message": e.message})
        raise
    except KeyboardInterrupt:  # SIGINT, SIGTERM (abflip.commands._output): where it stopped is news
        _note(state_dir, verb, before, {"blame": "interrupted", "message": "interrupted"})
        raise
    _note(state_dir, verb, before, None)


def _safe(fn):
    try:
        return fn()
    except Exception:  # the history is never why a verb fails
        return None


#: Refusals, not failures: with nothing changed, a user's or policy's error is no event of the
#: device (a typo, "not newer", outside the window); everything else that failed is.
QUIET_BLAMES = ("user", "policy")


def _note(state_dir: Path, verb: str, before: dict | None, error: dict | None) -> None:
    after = _safe(lambda: snapshot(state_dir))
    if after is None or (after == before and (error is None or error["blame"] in QUIET_BLAMES)):
        return
    event = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "verb": verb,
             "from": before["state"] if before else None, "to": after["state"] if after else None,
             "version": _version(before, after), "floor": after["floor"] if after else None, "error": error}
    event["what"] = describe(verb, before, after, error)
    _safe(lambda: _append(Path(state_dir), json.dumps(event, sort_keys=True)))


def _version(before: dict | None, after: dict | None) -> str | None:
    for s in (after, before):
        if s and s["target"]:
            return s["target"]["version"]
    return None


def describe(verb: str, before: dict | None, after: dict | None, error: dict | None) -> str:
    """One sentence for an event: what happened to which version."""
    b, a = before or {}, after or {}
    was, now = b.get("state"), a.get("state")
    t = a.get("target") or b.get("target") or {}
    v, slot = t.get("version", "?"), t.get("slot", "?")
    newly_failed = [x for x in a.get("failed", []) if x not in b.get("failed", [])]
    rb = a.get("rollback")
    if error is not None:
        where = ""
        if now == "downloading" and t:
            where = f" at chunk {t.get('chunks_done')} of {t.get('chunks_total')} of {v}"
        head = "interrupted" if error["blame"] == "interrupted" else f"failed ({error['blame']})"
        text = f"{verb} {head}{where}"
        if rb and rb != b.get("rollback"):
            text += f"; rollback requested: slot {rb.get('to_slot')} ({rb.get('to_version') or '?'}) boots next"
        return text + ("" if error["blame"] == "interrupted" else f": {error['message']}")
    if verb == "provision":
        booted = next((k for k, s in a.get("slots", {}).items() if s["status"] == "good" and s["version"]), "?")
        return f"provisioned {a.get('slots', {}).get(booted, {}).get('version')} in slot {booted}; floor {a.get('floor')}"
    if verb == "reset-state":
        return f"state rebuilt from the boot entries ({now})"
    if newly_failed and now == "rolled-back":
        how = "withdrawn before its boot" if was == "pending" and verb == "rollback" else "failed"
        return f"rolled back: {', '.join(newly_failed)} {how}; the other slot boots"
    if rb and rb != b.get("rollback"):
        return f"rollback requested: slot {rb.get('to_slot')} ({rb.get('to_version') or '?'}) boots next"
    if now == "committed" and (was != "committed" or a.get("floor") != b.get("floor")):
        return f"committed {v} in slot {slot}; floor {a.get('floor')}"
    if now == "staged" and was != "staged":
        return f"staged {v} in slot {slot}"
    if now == "downloading":
        return f"downloading {v} into slot {slot}: chunk {t.get('chunks_done')} of {t.get('chunks_total')}"
    if now == "pending" and was != "pending":
        return f"applied {v}: the next boot tries slot {slot}"
    if now == "trial" and was != "trial":
        return f"booted {v} in slot {slot} on trial"
    return f"{was or 'no state'} -> {now or 'no state'}"


def _append(state_dir: Path, line: str) -> None:
    path = state_dir / FILE
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > MAX_BYTES:
        _trim(state_dir, path)


def _trim(state_dir: Path, path: Path) -> None:
    import tempfile  # rarely: not on every boot-check's start-up path

    keep = _lines(path)[-KEEP:]
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".state-history-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _lines(path: Path) -> list[dict]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES * 2)
    except OSError:
        return []
    out = []
    for raw in data.splitlines():
        if len(raw) > LINE_MAX:
            continue
        try:
            e = json.loads(raw)
        except ValueError:
            continue  # a line a power cut cut short
        if isinstance(e, dict) and isinstance(e.get("what"), str):
            out.append(e)
    return out


def read(state_dir: Path, last: int | None = None) -> list[dict]:
    """The recorded events, oldest first (the ``last`` newest ones)."""
    events = _lines(Path(state_dir) / FILE)
    return events[-last:] if last else events
