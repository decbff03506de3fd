"""The device commands a device runs on every boot and timer tick (status, boot-check, mark-good,
check, and run, download, apply, install without a terminal's progress bar), the first boot's
provision, and the operator's rollback, without typer: :mod:`abflip.cli` calls them directly when
their arguments are plain, and :mod:`.device` registers the same functions with typer. Each
returns its exit code.

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
    from metadata.errors import Interrupted

__all__ = ["DEFAULT_CONFIG", "STREAMING", "apply_call", "boot_check", "check", "download_call", "install_call",
           "mark_good", "open_device", "provision_call", "render_check", "render_status", "rollback", "run_call",
           "status", "window_line"]

DEFAULT_CONFIG = Path("/etc/abflip/abflip.toml")


def open_device(config: Path, progress: ProgressFn | None = None, *, need: str = "write") -> Device:
    """The device of ``config``, once this user can do what the command needs (``need``: "read"
    for status, "check" to refresh the TUF cache, "write" for every command that changes things)."""
    from applier.agent import Device
    from applier.config import Config

    cfg = Config.load(config)
    require_access(cfg, need)
    return Device(cfg, progress=progress, reboot=reboot_at_exit(cfg.reboot_command) if cfg.reboot_command else None)


def require_access(cfg, need: str) -> None:
    """A user who is not root and cannot read or write what the command uses is told to run it
    as root, before the command fails on the first of those files with a misleading cause (an
    unreadable state file taken for an invalid one, a TUF cache "without free space")."""
    import os

    if os.geteuid() == 0:
        return
    sd = cfg.state_dir
    rw, rx, wx = os.R_OK | os.W_OK, os.R_OK | os.X_OK, os.W_OK | os.X_OK
    wanted = [(sd, rx), (sd / "state.json", os.R_OK), (sd / "history.jsonl", os.R_OK)]
    if need in ("check", "write"):
        wanted += [(sd, wx), (sd / "state.json", rw), (sd / "lock", rw), (sd / "tuf", wx), (sd / "offer", wx),
                   (sd / "release-control.json", rw)]
    if need == "write":
        wanted += [(sd / "staged", wx), *(() if cfg.esp_auto else ((cfg.esp, wx),)),
                   *((s.device, os.R_OK) for s in cfg.slots.values())]
    for path, mode in wanted:
        if os.path.lexists(path) and not os.access(path, mode):
            from metadata.errors import UserError

            how = "written" if mode & os.W_OK else "read"
            raise UserError(f"{path} cannot be {how} by this user (uid {os.geteuid()}): abflip's device commands "
                            "run as root", hint="run it as root (sudo abflip ...); nothing was changed")


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


def _line(label: str, value: str) -> str:
    return f"{label + ':':<8} {value}"


def _short(sha: str | None) -> str:
    return f"sha256 {sha[:12]}..." if sha else "not verified"


def render_status(s: dict) -> str:
    """Everything ``status --json`` says, for a person: one line per subject, in the order one
    asks (where am I, what is on the slots, what is coming, what went wrong)."""
    booted = (f"slot {s['booted_slot']} ({s['booted_version'] or 'unknown version'}, "
              f"entry {s['booted_entry'] or 'unknown'})" if s["booted_slot"] else "unknown slot (every write is refused)")
    lines = [s["message"]] if s.get("message") else []  # what a verb just did (boot-check, mark-good, rollback)
    lines += [_line("state", s["state"] + (" (rebuilt from the boot entries)" if s.get("state_recovered") else "")
                    + (" (rollback requested)" if s.get("phase") == "rollback-requested" else "")),
              _line("booted", booted), _line("floor", s["floor"] or "none")]
    if s.get("next"):
        lines.append(_line("next", s["next"]))
    if s["booted_slot"] and not s["booted_version"]:
        lines.append("         (not provisioned: `abflip provision RELEASE` records the image in the booted slot)")
    if "hardware_id" in s:
        lines.append(_line("hwid", s["hardware_id"] or "unknown (device.hardware_id: DMI unreadable)"))
    for name, slot in sorted(s["slots"].items()):
        lines.append(f"slot {name}:  {slot['status']:8} {slot['version'] or '-':12} {slot['device']}"
                     + ("  (booted)" if slot["booted"] else "") + (f"  {_short(slot.get('sha256'))}"
                                                                   if slot.get("sha256") else ""))
    t = s.get("target")
    if t:
        lines.append(_line("target", f"{t['version']} into slot {t['slot']}: {t['chunks_done']} of {t['chunks_total']} "
                                     f"chunks verified ({t['bytes_downloaded']} bytes downloaded)"))
    if d := s.get("download"):
        how = (f"delta from {d['delta_from']}" if d.get("kind") == "delta" else d.get("kind", "full"))
        saved = f", {d['bytes_saved']} saved" if d.get("bytes_saved") else ""
        lines.append(_line("fetched", f"{d.get('version')} as {how}: {d.get('bytes_downloaded')} bytes{saved}"
                                      + (f" ({d['delta_note']})" if d.get("delta_note") else "")))
    if s["pending_entry"]:
        lines.append(_line("pending", s["pending_entry"]))
    if s.get("entries"):
        lines.append(_line("entries", ", ".join(
            e["file"] + ("" if e.get("tries_left") is None else f" ({e['tries_left']} tries left)")
            for e in s["entries"])))
    if rb := s.get("rollback"):
        lines.append(_line("rollback", f"to slot {rb['to_slot']} ({rb.get('to_version') or '?'}) from slot "
                                       f"{rb.get('from_slot')} ({rb.get('from_version') or '?'}) at the next boot"))
    if s["failed_versions"]:
        lines.append(_line("failed", ", ".join(s["failed_versions"]) + " (not retried without --retry-failed)"))
    if rc := s.get("release_control"):
        ro = rc["rollout"]
        chan = f"{rc['channel']} offered {rc['version']} at the last check; rollout: "
        chan += ("in" if ro["in"] else "not in") + (f" ({ro['percent']} %" if ro.get("percent") is not None else " (")
        chan += (", paused" if ro.get("paused") else "") + f": {ro['reason']})"
        lines.append(_line("channel", chan))
        if rc["withdrawn"]:
            lines.append(_line("withdrawn", ", ".join(rc["withdrawn"])
                               + ("; the booted version is one of them" if rc.get("booted_withdrawn") else "")))
    if "next_window" in s:
        lines.append(window_line(s["next_window"]) + (f" ({'; '.join(s['windows'])})" if s.get("windows") else ""))
    if s.get("esp"):
        lines.append(_line("esp", s["esp"]))
    if s.get("state_invalid"):
        lines.append(f"state file invalid: {s['state_invalid']} (shown: rebuilt from the boot entries; "
                     "`abflip reset-state` keeps it so)")
    if s["last_error"]:
        lines.append(f"last error ({s['last_error']['blame']}): {s['last_error']['message']}")
    return "\n".join(lines)


def render_check(r: dict) -> str:
    nxt = f"\nnext:    {r['next']}" if r.get("next") else ""
    if r["available"]:
        return (f"{r['version']} is available (running {r['current'] or 'an unknown version'})"
                + ("; it is staged" if r["staged"] else "") + nxt + "\n" + window_line(r["next_window"]))
    return f"no update: {r['reason']}" + nxt


def status(config: Path = DEFAULT_CONFIG, as_json: bool = False) -> int:
    return report(lambda: open_device(config, need="read").status(), as_json, render_status)


def check(config: Path = DEFAULT_CONFIG, allow_downgrade: bool = False, retry_failed: bool = False,
          as_json: bool = False) -> int:
    return report(lambda: open_device(config, need="check").check(allow_downgrade=allow_downgrade,
                                                                  retry_failed=retry_failed),
                  as_json, render_check)


def boot_check(config: Path = DEFAULT_CONFIG, no_bless: bool = False, as_json: bool = False) -> int:
    return report(lambda: open_device(config).boot_check(bless=not no_bless), as_json, render_status)


def mark_good(config: Path = DEFAULT_CONFIG, no_health: bool = False, as_json: bool = False) -> int:
    return report(lambda: open_device(config).mark_good(health=not no_health), as_json, render_status)


def rollback(config: Path = DEFAULT_CONFIG, as_json: bool = False) -> int:
    return report(lambda: open_device(config).rollback(), as_json, render_status)  # its ``message`` says what it did


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


def where_stopped(config: Path) -> Callable[[str], Interrupted]:
    """For a streaming command stopped by a signal: the error saying where the device stands,
    read from the state file its run left (what the next run starts from)."""
    def where(signame: str) -> Interrupted:
        import signal

        from applier.config import Config
        from applier.state import load_state
        from metadata.errors import Interrupted

        signum = signal.Signals[signame].value
        state = load_state(Config.load(config).state_dir)
        t = state.target if state is not None and not state.invalid else None
        if t is None:
            return Interrupted(f"interrupted ({signame})", signum=signum)
        if state.state == "downloading":
            return Interrupted(f"interrupted ({signame}); the next run resumes at chunk {t.chunks_done} of "
                               f"{t.chunks_total} ({t.version} into slot {t.slot})", signum=signum,
                               hint="run it again (or let the timer's `abflip run` do it): the verified chunks are kept")
        if state.state == "staged":
            return Interrupted(f"interrupted ({signame}); {t.version} is staged in slot {t.slot}: `abflip apply` "
                               "(or the timer's `abflip run` in a maintenance window) applies it", signum=signum)
        if state.state == "pending":
            return Interrupted(f"interrupted ({signame}) after {t.version} was applied: the next boot tries it "
                               f"in slot {t.slot}", signum=signum, hint="reboot to try it, or `abflip rollback` "
                                                                        "to withdraw it")
        return Interrupted(f"interrupted ({signame}); the device is {state.state}", signum=signum,
                           hint="`abflip status` shows where it stands; run the command again")
    return where


# Each: (fn(progress) -> result, render, where), for _output.stream_events or typer's progress bar.
def download_call(config: Path, allow_downgrade: bool = False, retry_failed: bool = False):
    return (lambda p: open_device(config, p).download(allow_downgrade=allow_downgrade,
                                                      retry_failed=retry_failed).to_json()), render_download, \
        where_stopped(config)


def apply_call(config: Path, now: bool = False):
    return (lambda p: open_device(config, p).apply(now=now).to_json()), render_apply, where_stopped(config)


def run_call(config: Path, allow_downgrade: bool = False, retry_failed: bool = False, no_reboot: bool = False):
    return (lambda p: open_device(config, p).run(allow_downgrade=allow_downgrade, retry_failed=retry_failed,
                                                 reboot=not no_reboot)), render_run, where_stopped(config)


def install_call(config: Path, allow_downgrade: bool = False, retry_failed: bool = False):
    return (lambda p: open_device(config, p).install(allow_downgrade=allow_downgrade,
                                                     retry_failed=retry_failed).to_json()), render_install, \
        where_stopped(config)


def render_provision(r: dict) -> str:
    text = (f"provisioned {r['product']} {r['version']} in slot {r['slot']}: image verified ({r['image_size']} bytes, "
            f"sha256 {r['sha256'][:16]}...), boot files in {r['boot_dir']}/, entry {r['entry']} (blessed), "
            f"floor {r['floor']}")
    if r["removed_entries"]:
        text += f"\nremoved the slot's stale entries: {', '.join(r['removed_entries'])}"
    return text


def provision_call(config: Path, release: Path, slot: str | None = None, force: bool = False):
    return (lambda p: open_device(config, p).provision(Path(release), slot=slot, force=force)), render_provision, None


STREAMING = {"download": download_call, "apply": apply_call, "run": run_call, "install": install_call,
             "provision": provision_call}
