"""Publish a release directory into a repository (local directory or S3).

The order is the one DESIGN.md fixes, and it is what makes an interrupted publish harmless:

1. target objects (image, boot files, release.json, channel pointer), hash-prefixed and
   immutable: new names nobody references yet;
2. ``N.targets.json`` (create-only);
3. ``N.snapshot.json`` (create-only);
4. ``timestamp.json`` last: the one write that makes the release visible to devices. It is a
   compare-and-swap against the timestamp this publish was built on (``If-Match`` on S3, a
   locked compare locally), so a slower publisher never puts back an older snapshot.

A create-only write that loses a race re-reads the repository and tries again; a lost
timestamp swap re-reads and, if the winner's snapshot does not include this publish yet,
signs a newer timestamp naming the newest snapshot.
Re-publishing the same release to the same channel is a no-op.

Split signing (issue 13, docs/release-control.md): a product CI's keys directory holds only its
delegated role's key. Such a publish stops after step 1 and ``N.<product>.json`` (and the
``N.<product>-bin-<hex>.json`` hash bins it touched; create-only):
the release becomes visible when the repository's online signer (``abflip repo snapshot``,
:mod:`builder.signer`) has checked that metadata against its delegation and signed a snapshot
and timestamp. Keys that can sign snapshot and timestamp (one operator, a local repository)
still publish all the way, through the same checked loading.

A product with hash bins (docs/formats.md): the release's targets go into the bins their paths
hash to, and the product's role lists the channel pointers and the targets of the releases they
point at now, so the metadata a device downloads per update does not grow with the releases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tuf.api.metadata import TargetFile

from metadata.errors import RepositoryError, UserError
from metadata.keys import KeyConfig
from metadata.bounded import FileRefused, read_file
from metadata.manifest import Limits, ManifestError, Release, Rollout, channel_target_path, check_name
from metadata.repository import MAX_METADATA_BYTES, Repository, SignedFile

from .errors import AlreadyExists, BuildError, StorageError
from .storage import Storage

__all__ = ["publish_release", "write_signed", "headers_for", "fresh_for", "PublishResult", "target_key", "load_tagged",
           "commit", "settle_timestamp", "MetadataOf", "MAX_AGE", "IMMUTABLE"]

#: Targets (hash-prefixed) and versioned metadata never change under their names: cached for a year.
IMMUTABLE = "public, max-age=31536000, immutable"
#: Seconds a cache (CDN, proxy) may keep what changes under its name: ``timestamp.json``, and a "not
#: found" (devices probe ``N+1.root.json`` at every check). A device sees a timestamp at most this
#: old, on top of its own check interval; the origin sees about one request per object per this many
#: seconds per cache, whatever the fleet's size (docs/producer.md, "A cache in front").
MAX_AGE = 300
RETRIES = 20


def fresh_for(seconds: int = MAX_AGE) -> str:
    """Cache-Control of an answer that may change: kept ``seconds``, never served stale after."""
    return f"public, max-age={seconds}, must-revalidate"


def headers_for(key: str, *, max_age: int = MAX_AGE) -> tuple[str, str]:
    """(Content-Type, Cache-Control) of an object, by its class (DESIGN.md "what is served");
    ``max_age``: seconds a cache may keep ``timestamp.json``."""
    if key.endswith("timestamp.json"):
        return "application/json", fresh_for(max_age)
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
    visible: bool = True  # False: signed into the product's role; devices see it once 'abflip repo snapshot' ran
    rollout: dict | None = None  # the channel's rollout the pointer carries (kept from the channel, or --rollout)


def write_signed(storage: Storage, files: list[SignedFile], *, timestamp_tag: str | None = None,
                 new: bool = False) -> None:
    """Write signed metadata in order; versioned files create-only; ``timestamp.json``
    compare-and-swapped against ``timestamp_tag`` when given (raises AlreadyExists if it moved),
    created only if there is none when ``new`` (a new repository). What abflip's commands write is
    conditional every time, so a bucket policy can refuse any other write (docs/keys.md)."""
    for f in files:
        ctype, cache = headers_for(f.name)
        swap = f.name == "timestamp.json" and timestamp_tag is not None
        storage.put(f"metadata/{f.name}", f.data, content_type=ctype, cache_control=cache,
                    create_only=f.create_only or new, **({"if_match": timestamp_tag} if swap else {}))


class MetadataOf:
    """A storage backend's ``metadata/`` as :meth:`Repository.load` reads it: listed (versions are
    found by listing, never by probing), every file read bounded (``Storage.get(key, limit)``)."""

    def __init__(self, storage: Storage, **known: bytes | None) -> None:
        self.storage, self.known = storage, known  # known: file name -> bytes already read

    def read(self, name: str, limit: int) -> bytes | None:
        if name in self.known:
            return self.known[name]
        return self.storage.get(f"metadata/{name}", limit)

    def names(self) -> list[str]:
        return self.storage.names("metadata/")


def load_tagged(storage: Storage, *, now: datetime | None = None) -> tuple[Repository, str | None]:
    """Load the repository and the tag of the ``timestamp.json`` it was built from."""
    try:
        ts, tag = storage.get_tagged("metadata/timestamp.json", MAX_METADATA_BYTES["timestamp"])
    except FileRefused as e:
        raise RepositoryError(f"timestamp.json {e.strerror}",
                              hint="only the online signer writes timestamp.json (docs/keys.md): put back its last "
                                   "one (a backup, or a mirror's or device's copy)") from None
    return Repository.load(MetadataOf(storage, **{"timestamp.json": ts}), now=now), tag


def holds_online_keys(repo: Repository, keys: KeyConfig) -> bool:
    """Can ``keys`` sign snapshot and timestamp here? No for a product CI (docs/keys.md)."""
    return all(repo.signing_problem(r, keys) is None for r in ("snapshot", "timestamp"))


def commit(storage: Storage, keys: KeyConfig, repo: Repository, tag: str | None, *, now: datetime | None = None,
           online: bool = True) -> bool:
    """Sign ``repo``'s edited targets and write targets, snapshot, timestamp (in that order);
    ``online=False``: only the edited roles (the online signer does the rest).

    Returns False when another publisher created the same metadata version first (the
    caller re-reads and redoes its edit). A lost timestamp swap is settled here.
    """
    signed = repo.signed_files(keys, now=now, online=online)
    if not online:
        try:
            write_signed(storage, signed)
        except AlreadyExists:
            return False
        return True
    versioned = [f for f in signed if f.name != "timestamp.json"]
    timestamp = [f for f in signed if f.name == "timestamp.json"]
    try:
        write_signed(storage, versioned)
    except AlreadyExists:
        return False
    try:
        write_signed(storage, timestamp, timestamp_tag=tag)
    except AlreadyExists:
        pass  # another publisher's timestamp went in since we read it; make sure ours is covered
    settle_timestamp(storage, keys, now)
    return True


def publish_release(release_dir: Path, storage: Storage, keys: KeyConfig, *, channel: str,
                    now: datetime | None = None, rollout: Rollout | None = None) -> PublishResult:
    """Upload a release and point ``channel`` at it. The channel's phased rollout and pause carry
    over to the new release (``rollout``: set another; docs/release-control.md)."""
    check_name("channel", channel)
    release_dir = Path(release_dir)
    limits = Limits()
    try:
        release = Release.from_bytes(read_file(release_dir / "release.json", limits.manifest_max_bytes), limits)
    except (FileNotFoundError, NotADirectoryError):
        raise BuildError(f"{release_dir} holds no release.json" + ("" if release_dir.is_dir() or not release_dir.exists()
                                                                    else " (it is a file, not a release directory)"),
                         hint="pass the directory 'abflip release create' wrote (-o)") from None
    except OSError as e:
        raise BuildError(f"cannot read {release_dir / 'release.json'}: {e.strerror or e}") from None
    except ManifestError as e:  # the user's local file, refused by the device's own parser before any upload
        raise BuildError(f"{release_dir / 'release.json'}: {e.message}",
                         hint="re-create the release with 'abflip release create'; nothing was published") from None
    files = {release.target_path: release_dir / "release.json", release.image.target: release_dir / "rootfs.img.zst"}
    for name, bf in release.boot.files().items():
        files[bf.target] = release_dir / name
    checked = {bf.target: (name, bf.sha256) for name, bf in release.boot.files().items()}
    for ref in release.deltas:  # deltas travel with their release (docs/delta.md)
        for df in (ref.manifest, ref.data):
            files[df.target] = release_dir / df.target.rsplit("/", 1)[-1]
            checked[df.target] = (files[df.target].name, df.sha256)
    targets = {}
    for path, local in files.items():
        if not local.is_file():
            raise BuildError(f"{local} is missing from the release directory",
                             hint="re-create the release with 'abflip release create'; nothing was published")
        targets[path] = TargetFile.from_file(path, str(local), ["sha256"])
    for path, (name, sha) in checked.items():
        if targets[path].hashes["sha256"] != sha:
            raise BuildError(f"{name} does not match release.json (was it changed after 'release create'?)",
                             hint="re-create the release with 'abflip release create'; nothing was published")
    uploaded: list[str] = []
    for attempt in range(RETRIES):
        repo, tag = load_tagged(storage, now=now)
        repo.require(release.product)  # its roles loaded whole: a publish never builds on a role kept as it was
        current = repo.target_files
        from .channels import current_releases, next_pointer  # withdrawn versions carry over (docs/release-control.md)

        ptr = next_pointer(storage, repo, release.product, channel, release.version, release.target_path,
                           rollout=rollout)
        pointer = ptr.to_bytes()
        pointer_target = TargetFile.from_data(channel_target_path(release.product, channel), pointer, ["sha256"])
        online = holds_online_keys(repo, keys)
        for path, t in targets.items():
            old = current.get(path)
            if old is not None and old.hashes != t.hashes:
                raise BuildError(f"{release.product} {release.version} is already published with different content ({path})",
                                 hint="releases are immutable: publish a new version")
        old_ptr = current.get(pointer_target.path)
        if ((repo.is_current or not online) and all(p in current for p in targets) and old_ptr is not None
                and old_ptr.hashes == pointer_target.hashes):
            return PublishResult(release.product, str(release.version), channel, False,
                                 repo.timestamp.signed.version, tuple(uploaded), visible=repo.is_current,
                                 rollout=ptr.rollout.to_json() if ptr.rollout else None)
        # Before the first byte is uploaded: these keys can sign every role this publish re-signs.
        roles = {repo.role_for_path(p) for p in (*targets, pointer_target.path)}
        for role in [*sorted(roles), *(("snapshot", "timestamp") if online else ())]:
            if (problem := repo.signing_problem(role, keys)) is not None:
                raise UserError(problem, hint=f"check --keys ({keys.dir}): it must hold this repository's keys for "
                                              f"{role}; nothing was uploaded")
        # 1. targets: immutable, hash-prefixed; skip what is there already (a resumed publish)
        for path, t in targets.items():
            key = target_key(t)
            if not storage.exists(key):
                ctype, cache = headers_for(key)
                storage.put_file(key, files[path], content_type=ctype, cache_control=cache)
                uploaded.append(key)
            repo.add_target(t)
        key = target_key(pointer_target)
        if put_new(storage, key, pointer):
            uploaded.append(key)
        repo.add_target(pointer_target)
        if repo.has_bins(release.product):
            repo.set_current(release.product, current_releases(storage, repo, release.product))
        # 2.-4. metadata in publish order
        if not commit(storage, keys, repo, tag, now=now, online=online):
            time.sleep(min(0.05 * (attempt + 1), 1.0))  # another publisher won; re-read and retry
            continue
        return PublishResult(release.product, str(release.version), channel, True,
                             repo.timestamp.signed.version, tuple(uploaded), visible=online,
                             rollout=ptr.rollout.to_json() if ptr.rollout else None)
    raise StorageError(f"gave up publishing after {RETRIES} conflicting concurrent publishes",
                       hint="retry; the repository is consistent")


def put_new(storage: Storage, key: str, data: bytes) -> bool:
    """Upload a small hash-prefixed target (a channel pointer) create-only; False if it is there."""
    if storage.exists(key):
        return False
    try:
        storage.put(key, data, content_type="application/json", cache_control=IMMUTABLE, create_only=True)
    except AlreadyExists:
        return False  # another publisher's: the same bytes (the name is their hash)
    return True


def settle_timestamp(storage: Storage, keys: KeyConfig, now: datetime | None) -> None:
    """Make ``timestamp.json`` name the newest snapshot (a concurrent publisher's timestamp may
    name an older one than ours); compare-and-swap, so versions only go up."""
    for _ in range(RETRIES):
        repo, tag = load_tagged(storage, now=now)
        if repo.timestamp.signed.snapshot_meta.version == repo.snapshot.signed.version:
            return
        try:
            write_signed(storage, [repo.signed_timestamp(keys, now=now)], timestamp_tag=tag)
        except AlreadyExists:
            continue
    raise StorageError("gave up settling timestamp.json after concurrent publishes", hint="retry the publish")
