"""Device commands: status, check, download, apply, run, install, boot-check, mark-good, rollback,
history, reset-state, provision.

All but history and reset-state are typer's wrappers over the plain functions of :mod:`._device`
(which the CLI's fast path calls without typer)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from . import _device as plain
from ._common import CONFIG_OPT, JSON_OPT, app, run
from ._output import stream_events
from ._device import open_device, render_status

DOWNGRADE_OPT = typer.Option(False, "--allow-downgrade", help="allow a version not newer than the running one")
RETRY_OPT = typer.Option(False, "--retry-failed", help="retry a version that failed to boot before")


def _exit(code: int) -> None:
    if code:
        raise typer.Exit(code)


def _streaming(call: tuple[Callable[[Any], Any], Callable[[Any], str], Callable[[str], Any] | None],
               as_json: bool) -> None:
    """:func:`._output.stream_events` (JSON lines with ``--json``, else the result alone), with a
    rich progress bar on stderr when that is a terminal."""
    fn, render, where = call
    if as_json or not sys.stderr.isatty():
        return _exit(stream_events(fn, as_json, render, where))
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    def bar_call() -> Any:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                      transient=True, console=Console(stderr=True), redirect_stdout=False,
                      redirect_stderr=False) as bar:
            tasks: dict[str, Any] = {}

            def show(ev: dict) -> None:
                phase = ev.get("phase")
                if "total_bytes" not in ev:
                    return
                if phase not in tasks:
                    tasks[phase] = bar.add_task(f"{phase} {ev.get('version') or ev.get('slot') or ''}".strip(),
                                                total=ev["total_bytes"])
                bar.update(tasks[phase], completed=ev["bytes"])

            return fn(show)

    return run(bar_call, False, render, where)  # the result is printed after the bar is gone


@app.command("status")
def status(config: Path = CONFIG_OPT, as_json: bool = JSON_OPT) -> None:
    """Show slots, versions, the booted slot, the pending entry, the next window and the last error."""
    _exit(plain.status(config, as_json))


@app.command("check")
def check(config: Path = CONFIG_OPT, allow_downgrade: bool = DOWNGRADE_OPT, retry_failed: bool = RETRY_OPT,
          as_json: bool = JSON_OPT) -> None:
    """Is there a newer release for this device? Changes nothing; exits 0 either way."""
    _exit(plain.check(config, allow_downgrade, retry_failed, as_json))


@app.command("download")
def download(config: Path = CONFIG_OPT, allow_downgrade: bool = DOWNGRADE_OPT, retry_failed: bool = RETRY_OPT,
             as_json: bool = JSON_OPT) -> None:
    """Stage the channel's release: stream and verify it into the inactive slot (no boot entry yet)."""
    _streaming(plain.download_call(config, allow_downgrade, retry_failed), as_json)


@app.command("apply")
def apply(config: Path = CONFIG_OPT, now: bool = typer.Option(False, "--now", help="apply outside a maintenance window"),
          as_json: bool = JSON_OPT) -> None:
    """Re-verify the staged slot, write its boot files and an entry with tries (in a maintenance window)."""
    _streaming(plain.apply_call(config, now), as_json)


@app.command("run")
def run_once(config: Path = CONFIG_OPT, allow_downgrade: bool = DOWNGRADE_OPT, retry_failed: bool = RETRY_OPT,
             no_reboot: bool = typer.Option(False, "--no-reboot", help="do not run the reboot command"),
             as_json: bool = JSON_OPT) -> None:
    """One pass (the systemd timer's): check -> download -> apply in a window -> reboot."""
    _streaming(plain.run_call(config, allow_downgrade, retry_failed, no_reboot), as_json)


@app.command("install")
def install(config: Path = CONFIG_OPT, allow_downgrade: bool = DOWNGRADE_OPT, retry_failed: bool = RETRY_OPT,
            as_json: bool = JSON_OPT) -> None:
    """download + apply --now: stream the release into the inactive slot and add its boot entry."""
    _streaming(plain.install_call(config, allow_downgrade, retry_failed), as_json)


@app.command("boot-check")
def boot_check(config: Path = CONFIG_OPT,
               no_bless: bool = typer.Option(False, "--no-bless", help="judge only: a trial that passes its health "
                                             "checks stays a trial (abflip-bless.service blesses it after "
                                             "boot-complete.target); one that fails is still rolled back"),
               as_json: bool = JSON_OPT) -> None:
    """On boot (abflip-health.service): record what booted; on a trial boot run health hooks, then bless or roll back."""
    _exit(plain.boot_check(config, no_bless, as_json))


@app.command("mark-good")
def mark_good(config: Path = CONFIG_OPT,
              no_health: bool = typer.Option(False, "--no-health", help="bless without running the health-check "
                                             "hooks (abflip-bless.service: they ran before boot-complete.target)"),
              as_json: bool = JSON_OPT) -> None:
    """Run the health-check hooks, bless the booted entry (drop its tries counter) and commit a trial update."""
    _exit(plain.mark_good(config, no_health, as_json))


@app.command("rollback")
def rollback(config: Path = CONFIG_OPT, as_json: bool = JSON_OPT) -> None:
    """Boot the other (verified) slot next, or withdraw a pending update."""
    _exit(plain.rollback(config, as_json))


def _render_history(events: list[dict]) -> str:
    if not events:
        return "no history yet (abflip records what its commands change from now on)"
    return "\n".join(f"{e.get('time', '?'):25}  {e.get('verb', '?'):11} {e['what']}" for e in events)


@app.command("history")
def history(config: Path = CONFIG_OPT,
            last: int = typer.Option(0, "--last", "-n", help="only the newest N events (0: all that are kept)"),
            as_json: bool = JSON_OPT) -> None:
    """The device's past: downloads, updates applied, booted, committed, rolled back, and failures, oldest first."""
    from applier.config import Config
    from applier.history import read

    from ._device import require_access

    def go() -> list[dict]:
        if last < 0:
            from metadata.errors import UserError

            raise UserError(f"--last {last}: a number of events, 0 or more", hint="e.g. --last 20")
        cfg = Config.load(config)
        require_access(cfg, "read")
        return read(cfg.state_dir, last or None)

    run(go, as_json, _render_history)


@app.command("reset-state")
def reset_state(config: Path = CONFIG_OPT, as_json: bool = JSON_OPT) -> None:
    """Rebuild the state file from the boot entries (an invalid file is kept as state.json.invalid)."""
    run(lambda: open_device(config).reset_state(), as_json, render_status)  # its ``message`` says what it did


@app.command("provision")
def provision(release: Path = typer.Argument(..., help="the release of the image in the slot: the directory 'abflip "
                                                      "release create' wrote, or its release.json"),
              slot: str = typer.Option(None, "--slot", help="the slot holding the image (default: the booted slot; "
                                                            "needed when the loader does not say)"),
              force: bool = typer.Option(False, "--force", help="record it even if the device already has a good "
                                                                "booted slot (a re-flashed device)"),
              config: Path = CONFIG_OPT, as_json: bool = JSON_OPT) -> None:
    """A device's first day: verify the factory image in the booted slot against its release, write its
    boot files and a blessed entry, and record it (slot good, version floor) in the state."""
    _streaming(plain.provision_call(config, release, slot, force), as_json)
