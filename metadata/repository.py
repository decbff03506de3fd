"""The producer's side of TUF: create, load, edit and sign repository metadata.

Works on metadata *bytes* through a reader function; it never writes anywhere itself.
:meth:`Repository.signed_files` returns the files a publish must write, in the publish
order of DESIGN.md (targets, snapshot, then ``timestamp.json`` last), each marked
create-only when it is versioned, so a storage backend can refuse to overwrite it and two
concurrent publishers cannot clobber each other.

Loading verifies what it reads (root chain, then every top-level role against the newest
root), so a publisher never signs over metadata someone else slipped into the bucket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError

from .errors import RepositoryError, UserError
from .keys import DEFAULT_EXPIRY_DAYS, TOP_ROLES, KeyConfig, RoleKeys, generate_file_key

__all__ = ["Repository", "SignedFile", "init_repository", "Reader"]

Reader = Callable[[str], "bytes | None"]  # metadata file name ("3.root.json") -> bytes, None if absent
MAX_PROBE = 1000


@dataclass(frozen=True)
class SignedFile:
    name: str  # file name under metadata/
    data: bytes
    create_only: bool  # versioned: never overwrite an existing object


def _expiry(now: datetime, days: int) -> datetime:
    return (now + timedelta(days=days)).replace(microsecond=0)


def _sign(md: Metadata, signers: list[Signer], threshold: int, role: str) -> None:
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    if len(signers) < threshold:
        raise UserError(
            f"role {role} needs {threshold} signature(s), only {len(signers)} key(s) are available here",
            hint=f"configure {threshold - len(signers)} more key(s) for {role} in keys.json",
        )


def init_repository(keys_dir: Path, *, now: datetime | None = None,
                    expiry_days: dict[str, int] | None = None) -> list[SignedFile]:
    """Generate one ed25519 key per top-level role in ``keys_dir`` and the first metadata.

    Writes ``keys_dir/<role>.pem`` (0600) and ``keys_dir/keys.json``; returns the signed
    files of version 1 (consistent snapshots on).
    """
    now = now or datetime.now(timezone.utc)
    keys_dir.mkdir(parents=True, exist_ok=True)
    if (keys_dir / "keys.json").exists():
        raise UserError(f"{keys_dir} already holds a key configuration", hint="use another --keys directory")
    days = dict(DEFAULT_EXPIRY_DAYS, **(expiry_days or {}))
    config = KeyConfig(keys_dir / "keys.json", expiry_days=days)
    root = Root(expires=_expiry(now, days["root"]), consistent_snapshot=True)
    for role in TOP_ROLES:
        key, uri = generate_file_key(keys_dir, role)
        root.add_key(key, role)
        config.roles[role] = [RoleKeys(key.keyid, uri)]
    config.save()
    repo = Repository(
        Metadata(root),
        Metadata(Targets(expires=_expiry(now, days["targets"]))),
        Metadata(Snapshot(expires=_expiry(now, days["snapshot"]))),
        Metadata(Timestamp(expires=_expiry(now, days["timestamp"]))),
    )
    repo.targets.signed.version = 0  # signed_files() bumps every role it signs to version 1
    repo.snapshot.signed.version = 0
    repo.timestamp.signed.version = 0
    return [SignedFile("1.root.json", _signed_root(repo.root, config), True), *repo.signed_files(config, now=now)]


def _signed_root(root: Metadata[Root], config: KeyConfig) -> bytes:
    keys = {kid: root.signed.get_key(kid) for kid in root.signed.roles["root"].keyids}
    _sign(root, config.signers("root", keys), root.signed.roles["root"].threshold, "root")
    return root.to_bytes()


class Repository:
    """One consistent view of the top-level metadata, ready to edit and re-sign."""

    def __init__(self, root: Metadata[Root], targets: Metadata[Targets], snapshot: Metadata[Snapshot],
                 timestamp: Metadata[Timestamp]) -> None:
        self.root = root
        self.targets = targets
        self.snapshot = snapshot
        self.timestamp = timestamp

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, read: Reader) -> Repository:
        """Read the newest metadata through ``read`` and verify it (signatures, not expiry)."""
        root = _parse(read("1.root.json"), "1.root.json", Root)
        _verify(root, root, "root")
        for v in range(2, MAX_PROBE):
            data = read(f"{v}.root.json")
            if data is None:
                break
            new = _parse(data, f"{v}.root.json", Root)
            _verify(root, new, "root")  # TUF 5.3.4: signed by the old root's threshold ...
            _verify(new, new, "root")  # ... and by its own
            if new.signed.version != v:
                raise RepositoryError(f"{v}.root.json carries version {new.signed.version}")
            root = new
        timestamp = _parse(read("timestamp.json"), "timestamp.json", Timestamp)
        _verify(root, timestamp, "timestamp")
        snapshot = _newest(read, root, "snapshot", timestamp.signed.snapshot_meta.version, Snapshot)
        targets = _newest(read, root, "targets", snapshot.signed.meta["targets.json"].version, Targets)
        repo = cls(root, targets, snapshot, timestamp)
        return repo

    @property
    def is_current(self) -> bool:
        """True when timestamp names the newest snapshot, and it the newest targets: devices see everything."""
        return (self.timestamp.signed.snapshot_meta.version == self.snapshot.signed.version
                and self.snapshot.signed.meta["targets.json"].version == self.targets.signed.version)

    def signed_timestamp(self, config: KeyConfig, *, now: datetime | None = None) -> SignedFile:
        """Re-sign only the timestamp (naming the newest snapshot), one version up."""
        now = now or datetime.now(timezone.utc)
        ts = self.timestamp.signed
        ts.version += 1
        ts.expires = _expiry(now, config.expiry_days["timestamp"])
        ts.snapshot_meta = MetaFile(self.snapshot.signed.version)
        keys = {kid: self.root.signed.get_key(kid) for kid in self.root.signed.roles["timestamp"].keyids}
        _sign(self.timestamp, config.signers("timestamp", keys), self.root.signed.roles["timestamp"].threshold, "timestamp")
        return SignedFile("timestamp.json", self.timestamp.to_bytes(), False)

    # -- editing ---------------------------------------------------------------------------
    @property
    def target_files(self) -> dict[str, TargetFile]:
        return self.targets.signed.targets

    def add_target(self, target: TargetFile) -> None:
        self.targets.signed.targets[target.path] = target

    def remove_target(self, path: str) -> None:
        self.targets.signed.targets.pop(path, None)

    # -- signing ---------------------------------------------------------------------------
    def signed_files(self, config: KeyConfig, *, now: datetime | None = None) -> list[SignedFile]:
        """Bump targets, snapshot and timestamp; sign them; return them in publish order."""
        now = now or datetime.now(timezone.utc)
        days = config.expiry_days
        root = self.root.signed
        out = []
        for md, role in ((self.targets, "targets"), (self.snapshot, "snapshot"), (self.timestamp, "timestamp")):
            signed = md.signed
            signed.version += 1
            signed.expires = _expiry(now, days[role])
            if role == "snapshot":
                signed.meta["targets.json"] = MetaFile(self.targets.signed.version)
            if role == "timestamp":
                signed.snapshot_meta = MetaFile(self.snapshot.signed.version)
            keys = {kid: root.get_key(kid) for kid in root.roles[role].keyids}
            _sign(md, config.signers(role, keys), root.roles[role].threshold, role)
            name = "timestamp.json" if role == "timestamp" else f"{signed.version}.{role}.json"
            out.append(SignedFile(name, md.to_bytes(), role != "timestamp"))
        return out


def _parse(data: bytes | None, name: str, cls: type) -> Metadata:
    if data is None:
        raise RepositoryError(f"the repository has no {name}", hint="run 'abflip repo init' to create a repository")
    try:
        md = Metadata.from_bytes(data)
    except DeserializationError as e:
        raise RepositoryError(f"{name} is not valid TUF metadata: {e}") from None
    if not isinstance(md.signed, cls):
        raise RepositoryError(f"{name} is not {cls.type} metadata")
    return md


def _verify(root: Metadata[Root], md: Metadata, role: str) -> None:
    try:
        root.verify_delegate(role, md)
    except UnsignedMetadataError as e:
        raise RepositoryError(f"{role} metadata version {md.signed.version} is not signed by its threshold: {e}") from None


def _newest(read: Reader, root: Metadata[Root], role: str, start: int, cls: type) -> Metadata:
    """The highest ``N.role.json`` at or above ``start``: a concurrent publisher may have
    written a newer one that the timestamp does not name yet; building on it keeps its targets."""
    md = _parse(read(f"{start}.{role}.json"), f"{start}.{role}.json", cls)
    for v in range(start + 1, start + MAX_PROBE):
        data = read(f"{v}.{role}.json")
        if data is None:
            break
        md = _parse(data, f"{v}.{role}.json", cls)
    _verify(root, md, role)
    return md
