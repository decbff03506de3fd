"""Repository upkeep commands: repo verify (audit as a device reads it) and repo gc."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import JSON_OPT, repo_app, run
from ._output import say
from .producer import ENDPOINT_OPT, PROFILE_OPT, REGION_OPT, progress_bar, storage_for


@repo_app.command("verify")
def repo_verify(
    location: str = typer.Argument(..., help="repository: a directory, s3://bucket/prefix or http(s):// URL"),
    deep: bool = typer.Option(False, "--deep", help="download every chunk, verify, decompress, check the image sha256"),
    root: Optional[Path] = typer.Option(None, "--root", help="trusted root.json (default: the repository's 1.root.json)"),
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Read the repository as a device would and check every channel's release; report role expiries."""
    from ..audit import AuditFailed, audit, render

    def go() -> dict:
        trusted = None
        if root is not None:
            try:
                trusted = root.read_bytes()
            except OSError as e:
                from metadata.errors import UserError

                raise UserError(f"cannot read --root {root}: {e.strerror or e}",
                                hint="pass the root.json devices are shipped with (the repository's "
                                     "metadata/1.root.json)") from None
        with progress_bar("verifying", deep and not as_json) as progress:
            report = audit(location, deep=deep, trusted_root=trusted, endpoint_url=endpoint_url, region=region,
                           profile=profile, progress=progress)
        if not report["ok"]:
            if not as_json:
                say(render(report))
            raise AuditFailed(report)
        return report

    run(go, as_json, render)


@repo_app.command("gc")
def repo_gc(
    repo: str = typer.Option(..., "--repo", help="repository: a directory or s3://bucket/prefix"),
    keys: Optional[Path] = typer.Option(None, help="keys directory (keys.json); with --dry-run: checked as the real "
                                                   "run would, or left out"),
    keep: int = typer.Option(..., "--keep", help="newest releases to keep per product (channel targets always stay)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be removed; change nothing"),
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Remove old releases (targets entries, re-signed) and then their objects and stale metadata."""
    from builder.gc import collect_garbage
    from metadata.keys import KeyConfig

    def go() -> dict:
        cfg = KeyConfig.load(keys) if keys is not None else None
        return collect_garbage(storage_for(repo, endpoint_url, region, profile), cfg, keep=keep, dry_run=dry_run).__dict__

    def render(r: dict) -> str:
        verb = "would remove" if r["dry_run"] else "removed"
        lines = [f"{product}: keep {', '.join(v) or '-'}" + (f"; {verb} {', '.join(r['removed_versions'][product])}"
                                                            if r["removed_versions"].get(product) else "")
                 for product, v in sorted(r["kept"].items())]
        lines.append(f"{verb} {len(r['removed_targets'])} target(s) and {len(r['deleted_objects'])} object(s)")
        lines += [f"  {k}" for k in r["deleted_objects"]] if r["dry_run"] else []
        if r.get("abandoned"):
            lines.append(f"{verb} {len(r['abandoned'])} abandoned upload(s) of interrupted publishes")
            lines += [f"  {k}" for k in r["abandoned"]] if r["dry_run"] else []
        lines += [f"skipped {s['path']}: {s['reason']}" for s in r.get("skipped", [])]
        if r["dry_run"]:
            lines.append("the keys can sign what the real run re-signs" if r["keys_checked"]
                         else "keys not checked (pass --keys to check them as the real run would)")
        return "\n".join(lines)

    run(go, as_json, render)
