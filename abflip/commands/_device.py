"""The device commands a device runs on every boot and timer tick (status, boot-check, check),
without typer: :mod:`abflip.cli` calls them directly when their arguments are plain, and
:mod:`.device` registers the same functions with typer. Each returns its exit code.

Start-up (issue 14): nothing here, or in what these commands import, may pull in typer, the
TUF client and the HTTP stack (check alone needs those, and imports them when it refreshes),
the image streaming and delta code, or the producer side. tests/test_startup.py asserts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ._output import report

if TYPE_CHECKING:
    from applier.agent import Device, ProgressFn

__all__ = ["DEFAULT_CONFIG", "boot_check", "check", "open_device", "render_check", "render_status", "status",
           "window_line"]

DEFAULT_CONFIG = Path("/etc/abflip/abflip.toml")


def open_device(config: Path, progress: ProgressFn | None = None) -> Device:
    from applier.agent import Device
    from applier.config import Config

    return Device(Config.load(config), progress=progress)


def window_line(w: dict | None) -> str:
    if w is None:
        return "window:  none configured (updates apply at any time)"
    return f"window:  {'open now, until ' + w['end'] if w['open'] else 'next ' + w['start'] + ' until ' + w['end']}"


def render_status(s: dict) -> str:
    booted = (f"slot {s['booted_slot']} ({s['booted_version'] or 'unknown version'}, "
              f"entry {s['booted_entry'] or 'unknown'})" if s["booted_slot"] else "unknown slot (every write is refused)")
    lines = [f"state:   {s['state']}", f"booted:  {booted}", f"floor:   {s['floor'] or 'none'}"]
    if s["booted_slot"] and not s["booted_version"]:
        lines.append("         (not provisioned: `abflip provision RELEASE` records the image in the booted slot)")
    for name, slot in sorted(s["slots"].items()):
        lines.append(f"slot {name}:  {slot['status']:8} {slot['version'] or '-':12} {slot['device']}"
                     + ("  (booted)" if slot["booted"] else ""))
    if s["pending_entry"]:
        lines.append(f"pending: {s['pending_entry']}")
    if s.get("rollback"):
        lines.append(f"rollback: to slot {s['rollback']['to_slot']} at the next boot")
    if s["failed_versions"]:
        lines.append(f"failed:  {', '.join(s['failed_versions'])}")
    if "next_window" in s:
        lines.append(window_line(s["next_window"]))
    if s.get("state_invalid"):
        lines.append(f"state file invalid: {s['state_invalid']} (shown: rebuilt from the boot entries; "
                     "`abflip reset-state` keeps it so)")
    if s["last_error"]:
        lines.append(f"last error ({s['last_error']['blame']}): {s['last_error']['message']}")
    return "\n".join(lines)


def render_check(r: dict) -> str:
    if r["available"]:
        return (f"{r['version']} is available (running {r['current'] or 'an unknown version'})"
                + ("; it is staged" if r["staged"] else "") + "\n" + window_line(r["next_window"]))
    return f"no update: {r['reason']}"


def status(config: Path = DEFAULT_CONFIG, as_json: bool = False) -> int:
    return report(lambda: open_device(config).status(), as_json, render_status)


def check(config: Path = DEFAULT_CONFIG, allow_downgrade: bool = False, retry_failed: bool = False,
          as_json: bool = False) -> int:
    return report(lambda: open_device(config).check(allow_downgrade=allow_downgrade, retry_failed=retry_failed),
                  as_json, render_check)


def boot_check(config: Path = DEFAULT_CONFIG, as_json: bool = False) -> int:
    return report(lambda: open_device(config).boot_check(), as_json, render_status)
