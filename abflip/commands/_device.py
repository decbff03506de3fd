"""The device commands a device runs on every boot and timer tick (status, boot-check, check, and
run, download, apply, install without a terminal's progress bar), without typer: :mod:`abflip.cli`
calls them directly when their arguments are plain, and :mod:`.device` registers the same
functions with typer. Each returns its exit code.

Start-up (issue 14): nothing here, or in what these commands import, may pull in typer, the
TUF client and the HTTP stack (check alone needs those, and imports them when it refreshes),
the image streaming and delta code, or the producer side. tests/test_startup.py asserts it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ._output import report

if TYPE_CHECKING:
    from collections.abc import Callable

    from applier.agent import Device, ProgressFn

__all__ = ["DEFAULT_CONFIG", "STREAMING", "apply_call", "boot_check", "check", "download_call", "install_call",
           "open_device", "render_check", "render_status", "run_call", "status", "window_line"]

DEFAULT_CONFIG = Path("/etc/abflip/abflip.toml")


def open_device(config: Path, progress: ProgressFn | None = None) -> Device:
    from applier.agent import Device
    from applier.config import Config

    cfg = Config.load(config)
    return Device(cfg, progress=progress, reboot=reboot_at_exit(cfg.reboot_command) if cfg.reboot_command else None)


def reboot_at_exit(argv: tuple[str, ...]) -> Callable[[], None]:
    """The reboot a command asks for (``run`` once it applied, ``boot-check`` once a trial failed), run when the
    command has printed its result or error and is exiting, not from inside it: under systemd the reboot stops the
    command's own unit at once, which killed it before it reported (the journal of a failed trial did not say why
    it was rolled back, and abflip.service failed on every update it installed). A reboot command that fails is
    reported then, with exit status 5 (the update stays pending and applies at the next reboot)."""
    import atexit

    def now() -> None:
        from applier.agent import _run_command
        from metadata.errors import Error

        sys.stdout.flush()
        sys.stderr.flush()
        try:
            _run_command(argv)
        except Error as e:
            print(e.diagnostics(), file=sys.stderr, flush=True)
            os._exit(e.exit_code)

    def request() -> None:
        atexit.unregister(now)  # once, however often it is asked
        atexit.register(now)

    return request


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


def boot_check(config: Path = DEFAULT_CONFIG, no_bless: bool = False, as_json: bool = False) -> int:
    return report(lambda: open_device(config).boot_check(bless=not no_bless), as_json, render_status)


# -- the commands that stream an image (printed by _output.stream_events)
def render_download(r: dict) -> str:
    if r["already"]:
        return f"{r['version']} is already staged in slot {r['slot']}"
    return (f"staged {r['version']} in slot {r['slot']} ({r['bytes_downloaded']} bytes downloaded"
            + (f", resumed at chunk {r['resumed_at_chunk']})" if r["resumed_at_chunk"] else ")"))


def render_apply(r: dict) -> str:
    return (f"{r['version']} is already applied ({r['entry']}); reboot to try it" if r["already"]
            else f"applied {r['version']} to slot {r['slot']}; next boot tries {r['entry']}")


def render_install(r: dict) -> str:
    return (f"{r['version']} is already installed in slot {r['slot']} ({r['entry']}); reboot to try it" if r["already"]
            else f"installed {r['version']} into slot {r['slot']}; next boot tries {r['entry']}")


def render_run(r: dict) -> str:
    if r.get("skipped"):
        return f"skipped: {r['skipped']}"
    lines = [render_check(r["check"])] if r["check"] else []
    if r["download"]:
        lines.append(render_download(r["download"]))
    if r["apply"]:
        lines.append(f"applied {r['apply']['version']}: next boot tries {r['apply']['entry']}")
    elif r.get("state") == "staged":
        lines.append("staged; applied in the next maintenance window")
    if r["rebooted"]:
        lines.append("rebooting")
    lines.append(window_line(r.get("next_window")))
    return "\n".join(lines)


# Each: (fn(progress) -> result, render), for _output.stream_events or typer's progress bar.
def download_call(config: Path, allow_downgrade: bool = False, retry_failed: bool = False):
    return (lambda p: open_device(config, p).download(allow_downgrade=allow_downgrade,
                                                      retry_failed=retry_failed).to_json()), render_download


def apply_call(config: Path, now: bool = False):
    return (lambda p: open_device(config, p).apply(now=now).to_json()), render_apply


def run_call(config: Path, allow_downgrade: bool = False, retry_failed: bool = False, no_reboot: bool = False):
    return (lambda p: open_device(config, p).run(allow_downgrade=allow_downgrade, retry_failed=retry_failed,
                                                 reboot=not no_reboot)), render_run


def install_call(config: Path, allow_downgrade: bool = False, retry_failed: bool = False):
    return (lambda p: open_device(config, p).install(allow_downgrade=allow_downgrade,
                                                     retry_failed=retry_failed).to_json()), render_install


STREAMING = {"download": download_call, "apply": apply_call, "run": run_call, "install": install_call}
