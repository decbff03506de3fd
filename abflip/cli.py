"""The ``abflip`` command: thin wrappers that parse, call one function, render.

Producer: ``image build``, ``release create``, ``repo init``, ``publish``, ``serve``.
Device:   ``status``, ``install``, ``mark-good``.  And ``demo``.

Exit codes: 0 ok; 1 unexpected internal error; 2 user/config error; 3 the repository served
bad data; 4 transport failure; 5 device (or local storage) problem; 6 refused by policy.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from metadata.errors import Error

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Atomic A/B OS image updates with TUF and systemd-boot.")
image_app = typer.Typer(no_args_is_help=True, help="Producer: build root filesystem images.")
release_app = typer.Typer(no_args_is_help=True, help="Producer: assemble releases.")
repo_app = typer.Typer(no_args_is_help=True, help="Producer: the TUF repository.")
app.add_typer(image_app, name="image")
app.add_typer(release_app, name="release")
app.add_typer(repo_app, name="repo")

CONFIG_OPT = typer.Option(Path("/etc/abflip/abflip.toml"), "--config", "-c", help="device configuration file")
JSON_OPT = typer.Option(False, "--json", help="machine-readable output")


def _run(fn: Callable[[], Any], as_json: bool, render: Callable[[Any], str]) -> None:
    try:
        result = fn()
    except Error as e:
        if as_json:
            print(json.dumps({"error": e.to_json()}, indent=1))
        print(e.diagnostics(), file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    if as_json:
        print(json.dumps(result, indent=1, sort_keys=True, default=str))
    elif text := render(result):
        print(text)


# -- producer ---------------------------------------------------------------------------------
@image_app.command("build")
def image_build(
    rootfs: Path = typer.Argument(..., help="root filesystem directory"),
    output: Path = typer.Option(..., "-o", "--output", help="image file to write"),
    fstype: str = typer.Option("erofs", help="filesystem type"),
    source_date_epoch: Optional[int] = typer.Option(None, help="timestamp for every file (default: $SOURCE_DATE_EPOCH or 0)"),
    max_size: Optional[int] = typer.Option(None, help="refuse an image larger than this (the slot size, bytes)"),
    as_json: bool = JSON_OPT,
) -> None:
    """Build a reproducible read-only image from a directory."""
    from builder.image import build_image

    _run(lambda: build_image(rootfs, output, fstype=fstype, source_date_epoch=source_date_epoch, max_size=max_size).__dict__,
         as_json, lambda r: f"{r['path']}: {r['fstype']}, {r['size']} bytes, sha256 {r['sha256']}")


@release_app.command("create")
def release_create(
    image: Path = typer.Option(..., help="image built by 'abflip image build'"),
    product: str = typer.Option(...),
    version: str = typer.Option(..., help="semantic version, e.g. 1.2.0"),
    compatible: list[str] = typer.Option(..., help="hardware id this release runs on (repeat for more)"),
    kernel: Path = typer.Option(..., help="kernel for the Type #1 boot entry"),
    initrd: Optional[Path] = typer.Option(None),
    options: str = typer.Option("ro", help="kernel options (root= and abflip.slot= are added on the device)"),
    fstype: str = typer.Option("erofs"),
    level: int = typer.Option(9, help="zstd level"),
    chunk_size: int = typer.Option(32 << 20, help="image bytes per chunk (zstd frame)"),
    window: int = typer.Option(32 << 20, help="bytes before a chunk used as its dictionary"),
    output: Path = typer.Option(..., "-o", "--output", help="release directory to write"),
    as_json: bool = JSON_OPT,
) -> None:
    """Compress an image and write release.json with its signed-to-be chunk table."""
    from builder.release import create_release

    def go() -> dict:
        r = create_release(image, output, product=product, version=version, compatible=compatible, kernel=kernel,
                           initrd=initrd, options=options, fstype=fstype, level=level, chunk_size=chunk_size,
                           window=window).release
        return {"dir": str(output), "product": r.product, "version": str(r.version), "image_size": r.image.size,
                "compressed_size": r.image.compressed_size, "chunks": len(r.image.chunks), "sha256": r.image.sha256}

    _run(go, as_json, lambda r: f"{r['dir']}: {r['product']} {r['version']}, {r['image_size']} -> {r['compressed_size']} "
                                f"bytes in {r['chunks']} chunk(s)")


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

    _run(go, as_json, lambda r: f"initialised {r['repository']} ({', '.join(r['files'])}); keys in {r['keys']} "
                                "(root.json to ship on devices: metadata/1.root.json)")


@app.command("publish")
def publish(
    release_dir: Path = typer.Argument(..., help="directory written by 'abflip release create'"),
    to: str = typer.Option(..., "--to", help="repository: a directory or s3://bucket/prefix"),
    keys: Path = typer.Option(..., help="keys directory (keys.json)"),
    channel: str = typer.Option("stable", help="channel to point at this release"),
    as_json: bool = JSON_OPT,
) -> None:
    """Upload a release and sign it into the repository (targets, snapshot, timestamp last)."""
    from builder.publish import publish_release
    from builder.storage import open_storage
    from metadata.keys import KeyConfig

    _run(lambda: publish_release(release_dir, open_storage(to), KeyConfig.load(keys), channel=channel).__dict__, as_json,
         lambda r: (f"published {r['product']} {r['version']} to channel {r['channel']} (timestamp v{r['timestamp_version']})"
                    if r["changed"] else f"{r['product']} {r['version']} is already published on {r['channel']}: nothing to do"))


@app.command("serve")
def serve_cmd(directory: Path = typer.Argument(...), host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve a repository directory over HTTP (with Range) for local trials."""
    from .httpserver import serve

    serve(directory, host, port)


# -- device -----------------------------------------------------------------------------------
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
    _run(lambda: _device(config).status(), as_json, _render_status)


@app.command("install")
def install(
    config: Path = CONFIG_OPT,
    allow_downgrade: bool = typer.Option(False, help="allow a version not newer than the running one"),
    retry_failed: bool = typer.Option(False, help="retry a version that failed to boot before"),
    as_json: bool = JSON_OPT,
) -> None:
    """Download, verify and write the channel's release into the inactive slot; add its boot entry."""
    _run(lambda: _device(config).install(allow_downgrade=allow_downgrade, retry_failed=retry_failed).to_json(), as_json,
         lambda r: (f"{r['version']} is already installed in slot {r['slot']} ({r['entry']}); reboot to try it"
                    if r["already"] else f"installed {r['version']} into slot {r['slot']}; next boot tries {r['entry']}"))


@app.command("mark-good")
def mark_good(config: Path = CONFIG_OPT, as_json: bool = JSON_OPT) -> None:
    """Bless the booted entry (drop its tries counter) and commit a trial update."""
    _run(lambda: _device(config).mark_good(), as_json, _render_status)


@app.command("demo")
def demo(workdir: Optional[Path] = typer.Option(None, help="keep everything in this directory")) -> None:
    """Build, publish and install v1 -> v2 on a simulated device over HTTP on 127.0.0.1."""
    from .demo import run_demo

    def go() -> dict:
        run_demo(workdir, out=lambda line: print(line, flush=True))
        return {}

    _run(go, False, lambda r: "")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
