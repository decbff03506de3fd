"""Producer commands: image build, release create, publish, serve."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import JSON_OPT, app, image_app, release_app, run


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

    run(lambda: build_image(rootfs, output, fstype=fstype, source_date_epoch=source_date_epoch, max_size=max_size).__dict__,
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

    run(go, as_json, lambda r: f"{r['dir']}: {r['product']} {r['version']}, {r['image_size']} -> {r['compressed_size']} "
                                f"bytes in {r['chunks']} chunk(s)")


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

    run(lambda: publish_release(release_dir, open_storage(to), KeyConfig.load(keys), channel=channel).__dict__, as_json,
         lambda r: (f"published {r['product']} {r['version']} to channel {r['channel']} (timestamp v{r['timestamp_version']})"
                    if r["changed"] else f"{r['product']} {r['version']} is already published on {r['channel']}: nothing to do"))


@app.command("serve")
def serve_cmd(directory: Path = typer.Argument(...), host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve a repository directory over HTTP (with Range) for local trials."""
    from ..httpserver import serve

    serve(directory, host, port)
