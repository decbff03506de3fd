"""Repository commands: repo init (and, later, status, sign, refresh, verify, gc)."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import JSON_OPT, repo_app, run


@repo_app.command("init")
def repo_init(
    keys: Path = typer.Option(..., help="directory for the new keys (private keys are written 0600)"),
    to: str = typer.Option(..., "--to", help="repository: a directory or s3://bucket/prefix"),
    as_json: bool = JSON_OPT,
) -> None:
    """Create signing keys and the first signed metadata of a repository."""
    from builder.publish import write_signed
    from builder.storage import open_storage
    from metadata.repository import init_repository

    def go() -> dict:
        files = init_repository(keys)
        write_signed(open_storage(to), files)
        return {"keys": str(keys), "repository": to, "files": [f.name for f in files]}

    run(go, as_json, lambda r: f"initialised {r['repository']} ({', '.join(r['files'])}); keys in {r['keys']} "
                                "(root.json to ship on devices: metadata/1.root.json)")
