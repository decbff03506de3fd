"""Producer commands: image build, release create, publish, channel promote/rollout/pause/resume/withdraw, serve."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from ._common import JSON_OPT, app, channel_app, image_app, release_app, run
from ._output import say

# S3 options shared by every command that takes a repository (--to / --repo). Without them
# boto3's standard chain applies (AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL_S3, roles...).
ENDPOINT_OPT = typer.Option(None, "--endpoint-url", envvar="ABFLIP_ENDPOINT_URL",
                            help="S3-compatible endpoint (MinIO, R2, a local server)")
REGION_OPT = typer.Option(None, "--region", envvar="ABFLIP_REGION", help="S3 region")
PROFILE_OPT = typer.Option(None, "--profile", envvar="ABFLIP_PROFILE", help="AWS profile (shared config)")


def storage_for(url: str, endpoint_url: Optional[str], region: Optional[str], profile: Optional[str], *,
                new: bool = False):
    """The repository to write: ``s3://bucket/prefix`` or a directory that holds a repository
    (``new``: one that may not exist yet, for 'repo init'). An http(s) URL is what devices
    read; it cannot be written, and must not become a local directory named 'http:'."""
    from pathlib import Path

    from builder.storage import open_storage
    from metadata.errors import UserError

    if url.startswith("s3://"):
        storage = open_storage(url, endpoint_url=endpoint_url, region=region, profile=profile)
        if not new and not storage.exists("metadata/1.root.json"):
            raise UserError(f"{url} holds no abflip repository (no metadata/1.root.json)",
                            hint="check the bucket and prefix (the place holding metadata/ and targets/); "
                                 "'abflip repo init' creates a repository")
        return storage
    if url.lower().startswith(("http://", "https://")):
        raise UserError(f"{url} is an HTTP URL: abflip reads repositories over HTTP but writes them only to a directory "
                        "or s3://bucket/prefix", hint="pass the directory or bucket the web server serves; nothing "
                        "was written")
    path = Path(url)
    if not new:
        if not path.is_dir():
            raise UserError(f"{url} is not a repository: {'it does not exist' if not path.exists() else 'not a directory'}",
                            hint="check the repository path; 'abflip repo init' creates a repository")
        if not (path / "metadata" / "1.root.json").is_file():
            raise UserError(f"{url} holds no abflip repository (no metadata/1.root.json)",
                            hint="check the repository path (the directory holding metadata/ and targets/); "
                                 "'abflip repo init' creates a repository")
    return open_storage(url)


@image_app.command("build")
def image_build(
    rootfs: Path = typer.Argument(..., help="root filesystem: a directory or a tarball (.tar, .tar.gz, .tar.zst, .tar.xz)"),
    output: Path = typer.Option(..., "-o", "--output", help="image file to write"),
    fstype: str = typer.Option("erofs", help="filesystem type: erofs, squashfs or ext4"),
    source_date_epoch: Optional[int] = typer.Option(None, help="timestamp for every file (default: $SOURCE_DATE_EPOCH or 0)"),
    max_size: Optional[int] = typer.Option(None, help="refuse an image larger than this (the slot size, bytes)"),
    xattrs: bool = typer.Option(True, help="keep extended attributes (file capabilities, SELinux labels)"),
    force: bool = typer.Option(False, "--force", help="replace an existing output file"),
    as_json: bool = JSON_OPT,
) -> None:
    """Build a reproducible image from a directory or a tarball (an existing -o is refused without --force)."""
    from builder.image import build_image

    run(lambda: build_image(rootfs, output, fstype=fstype, source_date_epoch=source_date_epoch, max_size=max_size,
                            xattrs=xattrs, force=force).__dict__,
        as_json, lambda r: f"{r['path']}: {r['fstype']}, {r['size']} bytes, sha256 {r['sha256']}")


@contextmanager
def progress_bar(description: str, enabled: bool, total: int | None = None):
    """A rich progress bar on a terminal (stderr), nothing otherwise. Yields a callback
    ``(done, total, description=None)``; ``total`` is shown from the start when it is known."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, total: int, what: str | None = None) -> None:
            if what is not None:
                bar.update(task, description=what)
            bar.update(task, completed=done, total=total)

        yield update


@release_app.command("create")
def release_create(
    image: Path = typer.Option(..., help="image built by 'abflip image build'"),
    product: str = typer.Option(...),
    version: str = typer.Option(..., help="semantic version, e.g. 1.2.0"),
    compatible: list[str] = typer.Option(..., help="hardware id this release runs on (repeat for more)"),
    kernel: Optional[Path] = typer.Option(None, help="kernel for the Type #1 boot entry"),
    initrd: Optional[Path] = typer.Option(None),
    uki: Optional[Path] = typer.Option(None, help="unified kernel image (instead of --kernel/--initrd)"),
    options: str = typer.Option("ro", help="kernel options: printable ASCII, at most 1024 characters; root=, abflip.*, "
                                           "mount.usr*, roothash/usrhash, systemd.verity*, dm-mod.* and systemd.gpt_auto are the "
                                           "device's and refused (root= and abflip.slot= are added on the device)"),
    fstype: str = typer.Option("erofs"),
    level: int = typer.Option(5, help="zstd level (9: about 7 % smaller, about 1.8x the time)"),  # builder.compress.DEFAULT_LEVEL
    chunk_size: int = typer.Option(64 << 20, help="image bytes per chunk (zstd frame)"),  # builder.compress.DEFAULT_CHUNK
    window: int = typer.Option(128 << 20, help="bytes before a chunk its frame may match into (wider than a chunk: "
                                               "searched as zstd --long does)"),  # builder.compress.DEFAULT_WINDOW
    threads: int = typer.Option(0, help="compression threads (0: one per CPU, at most 256)"),
    piece_size: int = typer.Option(4 << 20, help="compressed bytes per unit a device verifies before decompressing "
                                                 "(0: the whole chunk); a device reads ahead at most two"),
    output: Path = typer.Option(..., "-o", "--output", help="release directory to write"),
    delta_from: list[Path] = typer.Option([], "--delta-from", help="an earlier release's directory (repeat for more): "
                                                                  "also write a delta from its image (docs/delta.md)"),
    delta_level: int = typer.Option(19, help="zstd level of the delta frames"),
    verity: bool = typer.Option(False, "--verity", help="append the image's dm-verity hash tree (streamed and verified "
                                                        "with it); devices open the root through it (docs/formats.md)"),
    build_uki: bool = typer.Option(False, "--build-uki", help="join --kernel and --initrd into uki.efi, its command "
                                                              "line the root hash and --options (needs --verity)"),
    secure_boot_key: Optional[Path] = typer.Option(None, help="sign the UKI with this Secure Boot db key (PEM; with "
                                                              "--secure-boot-cert; docs/keys.md)"),
    secure_boot_cert: Optional[Path] = typer.Option(None, help="the db certificate of --secure-boot-key (PEM)"),
    force: bool = typer.Option(False, "--force", help="replace the release an existing -o holds"),
    as_json: bool = JSON_OPT,
) -> None:
    """Compress an image and write release.json with its signed-to-be chunk table.

    The image must be a filesystem of --fstype (its superblock is checked); an -o that holds a
    release already is refused without --force. release.json's "created" is $SOURCE_DATE_EPOCH
    when set (set it for a bit-identical release.json), else the current time."""
    from builder.image import check_image_type
    from builder.release import check_arguments, create_release

    def go() -> dict:
        check_arguments(product=product, version=version, compatible=compatible, options=options, fstype=fstype,
                        level=level, chunk_size=chunk_size, window=window, threads=threads, piece_size=piece_size)
        signer = None
        if (secure_boot_key is None) != (secure_boot_cert is None):
            from metadata.errors import UserError

            raise UserError("--secure-boot-key and --secure-boot-cert go together", hint="pass both (docs/keys.md)")
        if secure_boot_key is not None:
            from builder.uki import SbsignSigner

            signer = SbsignSigner(secure_boot_key, secure_boot_cert)
        if image.is_file() and image.stat().st_size:  # else create_release says what is wrong with it
            check_image_type(image, fstype)
        try:
            size: int | None = image.stat().st_size
        except OSError:
            size = None  # create_release says what is wrong with it
        with progress_bar("compressing", not as_json, size) as progress:
            r = create_release(image, output, product=product, version=version, compatible=compatible, kernel=kernel,
                               initrd=initrd, uki=uki, options=options, fstype=fstype, level=level,
                               chunk_size=chunk_size, window=window, threads=threads, piece_size=piece_size,
                               progress=progress, delta_from=delta_from, delta_level=delta_level,
                               force=force, verity=verity, build_uki=build_uki, signer=signer).release
        return {"dir": str(output), "product": r.product, "version": str(r.version), "image_size": r.image.size,
                "compressed_size": r.image.compressed_size, "chunks": len(r.image.chunks), "sha256": r.image.sha256,
                "boot": sorted(r.boot.files()),
                "deltas": [{"from": d.source.version, "bytes": d.data.length + d.manifest.length} for d in r.deltas],
                "verity": r.image.verity.to_json() if r.image.verity else None, "signed": signer is not None}

    run(go, as_json, lambda r: f"{r['dir']}: {r['product']} {r['version']}, {r['image_size']} -> {r['compressed_size']} "
                                f"bytes in {r['chunks']} chunk(s)"
                                + (f"; verity root hash {r['verity']['root_hash']}" if r["verity"] else "")
                                + ("; uki.efi signed" if r["signed"] else "")
                                + "".join(f"; delta from {d['from']}: {d['bytes']} bytes" for d in r["deltas"]))


@app.command("publish")
def publish(
    release_dir: Path = typer.Argument(..., help="directory written by 'abflip release create'"),
    to: str = typer.Option(..., "--to", help="repository: a directory or s3://bucket/prefix"),
    keys: Path = typer.Option(..., help="keys directory (keys.json)"),
    channel: str = typer.Option("stable", help="channel to point at this release"),
    rollout: Optional[int] = typer.Option(None, "--rollout", help="offer it to this percentage (0..100) of the "
                                                                  "product's devices (default: the channel's rollout "
                                                                  "and pause carry over to the new release)"),
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Upload a release and sign it into the repository (targets, snapshot, timestamp last)."""
    from builder.channels import make_rollout
    from builder.publish import publish_release
    from metadata.keys import KeyConfig

    run(lambda: publish_release(release_dir, storage_for(to, endpoint_url, region, profile), KeyConfig.load(keys),
                                channel=channel, rollout=make_rollout(rollout)).__dict__, as_json,
        lambda r: (f"published {r['product']} {r['version']} to channel {r['channel']} (timestamp v{r['timestamp_version']})"
                   if r["changed"] else f"{r['product']} {r['version']} is already published on {r['channel']}: nothing to do")
        + (f"; rollout {_rollout_text(r['rollout'])}" if r.get("rollout") else "")
        + ("" if r.get("visible", True) else _NOT_YET))


_NOT_YET = ("\nsigned into the product's role only: devices see it after the repository's online signer ran "
            "('abflip repo snapshot', docs/release-control.md)")


def _rollout_text(ro: dict) -> str:
    """``10 % (paused; seed canary)``"""
    extra = [*(["paused"] if ro.get("paused") else []), *([f"seed {ro['seed']}"] if ro.get("seed") else [])]
    return f"{ro['percent']} %" + (f" ({'; '.join(extra)})" if extra else "")


def _channel_text(r: dict) -> str:
    ro = r.get("rollout")
    text = f"channel {r['channel']} of {r['product']} points at {r['version']}"
    if ro:
        text += f", rollout {_rollout_text(ro)}"
    if r.get("withdrawn"):
        text += f"; withdrawn: {', '.join(r['withdrawn'])}"
    text += "" if r["changed"] else " (unchanged)"
    return text + ("" if r.get("visible", True) else _NOT_YET)


def _channel_run(fn, as_json: bool, repo: str, keys: Path, endpoint_url, region, profile) -> None:
    from metadata.keys import KeyConfig

    run(lambda: fn(storage_for(repo, endpoint_url, region, profile), KeyConfig.load(keys)).__dict__, as_json,
        _channel_text)


@channel_app.command("promote")
def channel_promote(
    product: str = typer.Argument(...),
    version: str = typer.Argument(..., help="a version already published in the repository"),
    to_channel: str = typer.Option(..., "--to", help="channel to point at the version"),
    repo: str = typer.Option(..., "--repo", help="repository: a directory or s3://bucket/prefix"),
    keys: Path = typer.Option(..., help="keys directory (keys.json)"),
    rollout: Optional[int] = typer.Option(None, "--rollout", help="phased: offer it to this percentage (0..100) of "
                                                                  "the product's devices; widen with 'channel rollout'"),
    seed: Optional[str] = typer.Option(None, help="rollout seed (default: the version): the same seed keeps the same "
                                                  "devices first across releases"),
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Point a channel at a published release (no image is uploaded again), optionally phased."""
    from builder.channels import make_rollout, promote

    _channel_run(lambda st, k: promote(st, k, product=product, version=version, channel=to_channel,
                                       rollout=make_rollout(rollout, seed=seed) if rollout is not None or seed else None),
                 as_json, repo, keys, endpoint_url, region, profile)


@channel_app.command("rollout")
def channel_rollout(
    product: str = typer.Argument(...),
    channel: str = typer.Option(..., "--channel", help="the channel whose rollout changes"),
    percent: int = typer.Option(..., "--percent", help="offer the channel's release to this percentage (0..100)"),
    repo: str = typer.Option(..., "--repo", help="repository: a directory or s3://bucket/prefix"),
    keys: Path = typer.Option(..., help="keys directory (keys.json)"),
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Widen (or narrow) the phased rollout of a channel's release; nothing is uploaded again."""
    from builder.channels import set_rollout

    _channel_run(lambda st, k: set_rollout(st, k, product=product, channel=channel, percent=percent),
                 as_json, repo, keys, endpoint_url, region, profile)


def _pause_command(name: str, paused: bool, doc: str) -> None:
    @channel_app.command(name, help=doc)
    def cmd(
        product: str = typer.Argument(...),
        channel: str = typer.Option(..., "--channel", help="the channel whose rollout is paused or resumed"),
        repo: str = typer.Option(..., "--repo", help="repository: a directory or s3://bucket/prefix"),
        keys: Path = typer.Option(..., help="keys directory (keys.json)"),
        endpoint_url: Optional[str] = ENDPOINT_OPT,
        region: Optional[str] = REGION_OPT,
        profile: Optional[str] = PROFILE_OPT,
        as_json: bool = JSON_OPT,
    ) -> None:
        from builder.channels import set_rollout

        _channel_run(lambda st, k: set_rollout(st, k, product=product, channel=channel, paused=paused),
                     as_json, repo, keys, endpoint_url, region, profile)


_pause_command("pause", True, "Pause a channel's rollout: devices that have not started it do not start.")
_pause_command("resume", False, "Resume a paused rollout.")


@channel_app.command("withdraw")
def channel_withdraw(
    product: str = typer.Argument(...),
    version: str = typer.Argument(..., help="the release to pull"),
    channel: str = typer.Option(..., "--channel", help="the channel to pull it from"),
    back_to: Optional[str] = typer.Option(None, "--back-to", help="point the channel at this published version"),
    repo: str = typer.Option(..., "--repo", help="repository: a directory or s3://bucket/prefix"),
    keys: Path = typer.Option(..., help="keys directory (keys.json)"),
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Pull a release: no device starts it, a device that staged it discards the stage, a
    device running it keeps it (its status says it was withdrawn)."""
    from builder.channels import withdraw

    _channel_run(lambda st, k: withdraw(st, k, product=product, version=version, channel=channel, back_to=back_to),
                 as_json, repo, keys, endpoint_url, region, profile)


def _state_line(c: dict) -> str:
    """``demo-os/stable  2.0.0  rollout 10 % (paused)  withdrawn 1.9.0``: one channel of 'channel list'."""
    if c.get("channel") is None or "problem" in c:
        return f"{c['product']}/{c.get('channel') or '*'}  FAIL: {c['problem']}"
    text = f"{c['product']}/{c['channel']}  {c['version']}  "
    text += f"rollout {_rollout_text(c)}" if c["phased"] else "every device"
    text += f"  withdrawn {', '.join(c['withdrawn'])}" if c["withdrawn"] else ""
    return text + ("" if c["visible"] else "  (not visible yet: the online signer has not run)")


def _channel_states(repo: str, product: Optional[str], channel: Optional[str], endpoint_url, region,
                    profile) -> dict:
    from builder.channels import channel_states
    from metadata.errors import UserError

    rows = channel_states(storage_for(repo, endpoint_url, region, profile), product)
    if channel is not None:
        rows = [c for c in rows if c.get("channel") == channel]
        if not rows:
            raise UserError(f"{product} has no channel {channel!r}", hint=f"'abflip channel show {product}' lists them")
    return {"channels": rows}


@channel_app.command("list")
def channel_list(
    product: Optional[str] = typer.Argument(None, help="one product (default: every product)"),
    repo: str = typer.Option(..., "--repo", help="repository: a directory or s3://bucket/prefix"),
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Every channel, one line each: version, rollout, withdrawn versions (read-only, no keys)."""
    run(lambda: _channel_states(repo, product, None, endpoint_url, region, profile), as_json,
        lambda r: "\n".join(_state_line(c) for c in r["channels"]) or "no channels")


@channel_app.command("show")
def channel_show(
    product: str = typer.Argument(...),
    channel: Optional[str] = typer.Option(None, "--channel", help="one channel (default: every channel of the product)"),
    repo: str = typer.Option(..., "--repo", help="repository: a directory or s3://bucket/prefix"),
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """A product's channels in full: version, release, rollout percent, paused, seed, withdrawn versions."""
    def text(r: dict) -> str:
        out = []
        for c in r["channels"]:
            if c.get("channel") is None or "problem" in c:
                out.append(_state_line(c))
                continue
            out += [f"{c['product']}/{c['channel']}", f"  version    {c['version']} ({c['release']})",
                    f"  rollout    {_rollout_text(c) if c['phased'] else '100 % (no phased rollout)'}",
                    f"  seed       {c['seed'] or '(the release version: each release draws its own cohort)'}",
                    f"  withdrawn  {', '.join(c['withdrawn']) or '-'}",
                    f"  visible    {'yes' if c['visible'] else 'not yet: the online signer has not run'}"]
        return "\n".join(out) or f"{product} has no channels"

    run(lambda: _channel_states(repo, product, channel, endpoint_url, region, profile), as_json, text)


@app.command("serve")
def serve_cmd(
    directory: Path = typer.Argument(..., help="the repository directory (holding metadata/ and targets/)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8080, help="port to listen on"),
    max_connections: int = typer.Option(64, help="connections served at once; more wait a second, then get 503"),
    timeout: float = typer.Option(60.0, help="seconds a client may stay silent (or not read) before it is dropped"),
    quiet: bool = typer.Option(False, "--quiet", help="no request log on stderr"),
) -> None:
    """Serve a repository directory over HTTP (with Range, and the cache headers a cache in front
    needs) for local trials, logging each request on stderr (Common Log Format). Dotfiles and
    anything whose real path leaves the directory are never served."""
    from ..httpserver import serve

    def log(line: str) -> None:
        try:
            print(line, file=sys.stderr, flush=True)
        except OSError:
            pass  # a log reader that went away must not stop the server

    run(lambda: serve(directory, host, port, max_connections=max_connections, timeout=timeout,
                      ready=lambda url: say(f"serving {directory.resolve()} at {url}"),
                      log=None if quiet else log),
        False, lambda _: "")
