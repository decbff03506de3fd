"""Device commands: status, install, mark-good."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import CONFIG_OPT, JSON_OPT, app, run


def _device(config: Path):
    from applier.agent import Device
    from applier.config import Config

    return Device(Config.load(config))


def _render_status(s: dict) -> str:
    lines = [f"state:   {s['state']}", f"booted:  slot {s['booted_slot']} ({s['booted_version'] or 'unknown version'}, "
             f"entry {s['booted_entry']})", f"floor:   {s['floor']}"]
    for name, slot in sorted(s["slots"].items()):
        lines.append(f"slot {name}:  {slot['status']:8} {slot['version'] or '-':12} {slot['device']}"
                     + ("  (booted)" if slot["booted"] else ""))
    if s["pending_entry"]:
        lines.append(f"pending: {s['pending_entry']}")
    if s["failed_versions"]:
        lines.append(f"failed:  {', '.join(s['failed_versions'])}")
    if s["last_error"]:
        lines.append(f"last error ({s['last_error']['blame']}): {s['last_error']['message']}")
    return "\n".join(lines)


@app.command("status")
def status(config: Path = CONFIG_OPT, as_json: bool = JSON_OPT) -> None:
    """Show slots, versions, the booted slot, the pending entry and the last error."""
    run(lambda: _device(config).status(), as_json, _render_status)


@app.command("install")
def install(
    config: Path = CONFIG_OPT,
    allow_downgrade: bool = typer.Option(False, help="allow a version not newer than the running one"),
    retry_failed: bool = typer.Option(False, help="retry a version that failed to boot before"),
    as_json: bool = JSON_OPT,
) -> None:
    """Download, verify and write the channel's release into the inactive slot; add its boot entry."""
    run(lambda: _device(config).install(allow_downgrade=allow_downgrade, retry_failed=retry_failed).to_json(), as_json,
         lambda r: (f"{r['version']} is already installed in slot {r['slot']} ({r['entry']}); reboot to try it"
                    if r["already"] else f"installed {r['version']} into slot {r['slot']}; next boot tries {r['entry']}"))


@app.command("mark-good")
def mark_good(config: Path = CONFIG_OPT, as_json: bool = JSON_OPT) -> None:
    """Bless the booted entry (drop its tries counter) and commit a trial update."""
    run(lambda: _device(config).mark_good(), as_json, _render_status)
