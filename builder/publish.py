"""Publish a release directory into a repository (local directory or S3).

The order is the one DESIGN.md fixes, and it is what makes an interrupted publish harmless:

1. target objects (image, boot files, release.json, channel pointer), hash-prefixed and
   immutable: new names nobody references yet;
2. ``N.targets.json`` (create-only);
3. ``N.snapshot.json`` (create-only);
4. ``timestamp.json`` last: the one write that makes the release visible to devices.

A create-only write that loses a race re-reads the repository and tries again.
Re-publishing the same release to the same channel is a no-op.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tuf.api.metadata import TargetFile

from metadata.keys import KeyConfig
from metadata.manifest import Channel, Release, channel_target_path, check_name
from metadata.repository import Repository, SignedFile

from .errors import AlreadyExists, BuildError, StorageError
from .storage import Storage

__all__ = ["publish_release", "write_signed", "headers_for", "PublishResult", "target_key"]

IMMUTABLE = "public, max-age=31536000, immutable"
RETRIES = 20


def headers_for(key: str) -> tuple[str, str]:
    """(Content-Type, Cache-Control) of an object, by its class (DESIGN.md "what is served")."""
    if key.endswith("timestamp.json"):
        return "application/json", "no-store"
    if key.endswith(".json"):
        return "application/json", IMMUTABLE
    if key.endswith(".zst"):
        return "application/zstd", IMMUTABLE  # never Content-Encoding: the bytes are what is hashed
    return "application/octet-stream", IMMUTABLE


def target_key(target: TargetFile) -> str:
    """Storage key of a target under consistent snapshots: ``targets/<dir>/<sha256>.<name>``."""
    return f"targets/{target.get_prefixed_paths()[0]}"


@dataclass(frozen=True)
class PublishResult:
    product: str
    version: str
    channel: str
    changed: bool
    timestamp_version: int
    uploaded: tuple[str, ...]


def write_signed(storage: Storage, files: list[SignedFile]) -> None:
    """Write signed metadata in order; versioned files create-only."""
    for f in files:
        ctype, cache = headers_for(f.name)
        storage.put(f"metadata/{f.name}", f.data, content_type=ctype, cache_control=cache, create_only=f.create_only)


def _reader(storage: Storage) -> Callable[[str], bytes | None]:
    return lambda name: storage.get(f"metadata/{name}")


def publish_release(release_dir: Path, storage: Storage, keys: KeyConfig, *, channel: str,
                    now: datetime | None = None) -> PublishResult:
    check_name("channel", channel)
    release_dir = Path(release_dir)
    try:
        release = Release.from_bytes((release_dir / "release.json").read_bytes())
    except FileNotFoundError:
        raise BuildError(f"{release_dir} holds no release.json", hint="create it with 'abflip release create'") from None
    files = {release.target_path: release_dir / "release.json", release.image.target: release_dir / "rootfs.img.zst"}
    for name, bf in release.boot.files().items():
        files[bf.target] = release_dir / name
    targets = {}
    for path, local in files.items():
        if not local.is_file():
            raise BuildError(f"{local} is missing from the release directory")
        targets[path] = TargetFile.from_file(path, str(local), ["sha256"])
    for name, bf in release.boot.files().items():
        if targets[bf.target].hashes["sha256"] != bf.sha256:
            raise BuildError(f"{name} does not match release.json (was it changed after 'release create'?)")
    pointer = Channel(release.product, channel, release.version, release.target_path).to_bytes()
    pointer_target = TargetFile.from_data(channel_target_path(release.product, channel), pointer, ["sha256"])

    uploaded: list[str] = []
    for attempt in range(RETRIES):
        repo = Repository.load(_reader(storage))
        current = repo.target_files
        for path, t in targets.items():
            old = current.get(path)
            if old is not None and old.hashes != t.hashes:
                raise BuildError(f"{release.product} {release.version} is already published with different content ({path})",
                                 hint="releases are immutable: publish a new version")
        old_ptr = current.get(pointer_target.path)
        if (repo.is_current and all(p in current for p in targets) and old_ptr is not None
                and old_ptr.hashes == pointer_target.hashes):
            return PublishResult(release.product, str(release.version), channel, False,
                                 repo.timestamp.signed.version, tuple(uploaded))
        # 1. targets: immutable, hash-prefixed; skip what is there already (a resumed publish)
        for path, t in targets.items():
            key = target_key(t)
            if not storage.exists(key):
                ctype, cache = headers_for(key)
                storage.put_file(key, files[path], content_type=ctype, cache_control=cache)
                uploaded.append(key)
            repo.add_target(t)
        key = target_key(pointer_target)
        if not storage.exists(key):
            storage.put(key, pointer, content_type="application/json", cache_control=IMMUTABLE)
            uploaded.append(key)
        repo.add_target(pointer_target)
        # 2.-4. metadata in publish order
        signed = repo.signed_files(keys, now=now)
        try:
            write_signed(storage, signed)
        except AlreadyExists:
            time.sleep(min(0.05 * (attempt + 1), 1.0))  # another publisher won; re-read and retry
            continue
        _settle_timestamp(storage, keys, now)
        return PublishResult(release.product, str(release.version), channel, True,
                             repo.timestamp.signed.version, tuple(uploaded))
    raise StorageError(f"gave up publishing after {RETRIES} conflicting concurrent publishes",
                       hint="retry; the repository is consistent")


def _settle_timestamp(storage: Storage, keys: KeyConfig, now: datetime | None) -> None:
    """Concurrent publishers overwrite ``timestamp.json`` in any order; if a slower one put back
    a timestamp naming an older snapshot, sign one naming the newest (versions only go up)."""
    for _ in range(RETRIES):
        repo = Repository.load(_reader(storage))
        if repo.timestamp.signed.snapshot_meta.version == repo.snapshot.signed.version:
            return
        write_signed(storage, [repo.signed_timestamp(keys, now=now)])
