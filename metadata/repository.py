"""The producer's side of TUF: create, load, edit and sign repository metadata.

Works on metadata *bytes* through a reader function; it never writes to the repository
itself. :meth:`Repository.signed_files` returns the files a publish must write, in the
publish order of DESIGN.md (delegated roles, targets, snapshot, then ``timestamp.json``
last), each marked create-only when it is versioned, so a storage backend can refuse to
overwrite it and two concurrent publishers cannot clobber each other. Only the roles that
changed are re-signed, so a CI job holding one product's delegated key and the online
snapshot/timestamp keys can publish that product and nothing else.

Loading verifies what it reads (root chain, then every top-level role against the newest
root, every delegated role against targets), so a publisher never signs over metadata
someone else slipped into the bucket. Above the version the snapshot (or timestamp) names,
each newer ``N.<role>.json`` is a *candidate*: it is taken only if it is signed to its
delegation's threshold by its delegation's keys, carries version N, and (a delegated role)
lists only targets under its delegation's paths and delegates nothing further (a product
with hash bins: nothing but its bins, and a bin lists only paths that hash to it). A candidate
that fails is skipped and reported (:attr:`Repository.skipped`), never fatal, and the next
version signed goes above every file present (:attr:`Repository.highest`), so nobody who can
write a junk ``N.other-os.json`` can freeze, roll back or hide another product's releases
(docs/release-control.md). This is what the repository's online signer
(:mod:`builder.signer`) relies on when it signs a snapshot of every product's newest metadata.

Each product is judged on its own (issue 21, :class:`_Loader`): versions are found by listing the
store (:class:`MetadataStore`), at most :data:`MAX_CANDIDATES` per role are examined, every file is
read bounded by what devices accept (:data:`MAX_METADATA_BYTES`) and only if it is a regular file,
new metadata that has expired is refused, a product whose current file is bad keeps that version
(:attr:`Repository.unavailable`; edits of it are refused, :meth:`Repository.require`), and an
overwritten current snapshot gives way to the newest snapshot that verifies. Only root, timestamp
and targets must be intact.

Split signing (issue 13): :meth:`Repository.signed_files` with ``online=False`` signs only the
roles that changed (a product CI: its delegated role) and no snapshot or timestamp.

Roles (DESIGN.md "Roles"): ``root`` and ``targets`` are offline and may need several
signatures (thresholds); a change to them is *staged* (:mod:`metadata.staging`) and signed
by each key holder before it is published. ``snapshot`` and ``timestamp`` are online.
Each product may have a delegated targets role named after it, trusted for ``<product>/*``.

Hash bins (issue 14, TAP 15 succinct delegations; docs/formats.md): a product delegation that
carries ``"x-abflip-bin-bits": N`` in targets (set offline, so a product key cannot choose how
many roles the snapshot lists) has 2^N bins ``<product>-bin-<hex>``, delegated by the product
role with exactly the product's keys and threshold. Every target of the product but its channel
pointers is listed in the bin its path hashes to; the product role lists the channel pointers and
every target of the releases they point at (:meth:`Repository.set_current`), so a device, whose
lookups ngclient answers from the product role before it descends into a bin, never loads a bin,
and its metadata per update stays flat in the number of releases. A product role may delegate
nothing but those bins, and a bin may list only paths of its product that hash to it.
"""

from __future__ import annotations

import copy
import errno
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Protocol

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError

from .bounded import FileRefused, json_depth_problem
from .errors import RepositoryError, UserError
from .keys import DEFAULT_EXPIRY_DAYS, TOP_ROLES, KeyConfig, RoleKeys, generate_file_key

__all__ = ["empty_role", "add_delegation", "Repository", "SignedFile", "init_repository", "Reader", "MetadataStore",
           "RoleSpec", "product_paths", "MAX_METADATA_BYTES", "product_name_problem", "name_collisions",
           "signature_report", "bin_bits", "check_bin_bits", "set_bin_bits", "bins_delegations", "DEFAULT_BIN_BITS", "MAX_BIN_BITS"]

Reader = Callable[[str], "bytes | None"]  # metadata file name ("3.root.json") -> bytes, None if absent
MAX_PROBE = 1000  # a plain reader cannot list: versions are probed upward, at most this many
MAX_CANDIDATES = 16  # newest files of a role examined, from the newest down, for its newest valid version
# What devices accept (python-tuf ngclient's UpdaterConfig defaults, which applier/client.py uses): the
# producer reads no file beyond them and never includes one its devices would refuse for its size.
MAX_METADATA_BYTES = {"root": 512000, "timestamp": 16384, "snapshot": 2000000, "targets": 5000000}
MAX_VERSION = 10**19 - 1  # the largest version a file name may carry (19 digits; int64 TUF clients hold it)
_VERSIONED_NAME = re.compile(r"([1-9][0-9]{0,18})\.(.+)\.json\Z")

MAX_TARGET_DEPTH = 6  # path segments below <product>/ a delegated role is trusted for
# Hash bins per product: 2^bits roles, each a line in every snapshot (~40 B) that every device of every
# product downloads with each update; fewer bins make each bin (and a producer's load) bigger.
DEFAULT_BIN_BITS = 4  # 16 bins: at 500 releases ~18 KB each, the snapshot ~0.6 KB more
MAX_BIN_BITS = 8  # 256 bins: the snapshot ~10 KB more for every device
BIN_BITS_FIELD = "x-abflip-bin-bits"  # in the product's DelegatedRole in targets (signed offline)


class MetadataStore(Protocol):
    """Where :meth:`Repository.load` reads metadata (builder.storage gives one per backend)."""

    def read(self, name: str, limit: int) -> bytes | None:
        """The bytes of ``metadata/<name>``, None if absent; :class:`~metadata.bounded.FileRefused`
        if it is larger than ``limit`` (known before reading) or cannot be had (a FIFO, a directory)."""

    def names(self) -> Iterable[str] | None:
        """Every name in ``metadata/`` (objects, directories, anything); None if the store cannot list."""


@dataclass(frozen=True)
class SignedFile:
    name: str  # file name under metadata/
    data: bytes
    create_only: bool  # versioned: never overwrite an existing object


@dataclass(frozen=True)
class RoleSpec:
    """How many keys a role gets at ``repo init`` and how many must sign."""

    keys: int = 1
    threshold: int = 1
    uris: tuple[str, ...] = ()  # existing keys (signer URIs or key files) instead of generated ones


def _expiry(now: datetime, days: float) -> datetime:
    return (now + timedelta(days=days)).replace(microsecond=0)


def signature_report(role: str, result, version: int) -> str:
    """'role targets v3 needs 1 more signature(s) (has 1 of 2); unsigned keyids: ab12…, cd34…'"""
    missing = max(0, result.threshold - len(result.signed)) if hasattr(result, "threshold") else None
    if missing is None:  # RootVerificationResult: both the old and the new root's thresholds
        parts = []
        for label, r in (("the previous root", result.first), ("itself", result.second)):
            if not r.verified:
                parts.append(f"{r.missing} more from {label} (threshold {r.threshold}; unsigned keyids: "
                             f"{', '.join(sorted(r.unsigned))})")
        return f"role root v{version} needs " + " and ".join(parts)
    return (f"role {role} v{version} needs {missing} more signature(s) (has {len(result.signed)} of "
            f"{result.threshold}); unsigned keyids: {', '.join(sorted(result.unsigned))}")


def _sign(md: Metadata, signers: list[Signer], threshold: int, role: str, missing: list[str] = (), *,
          trusted: list[str] = ()) -> None:
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    if len(signers) < threshold:
        gone = f"; cannot load signing key(s) {', '.join(missing)}: no such key file here" if missing else ""
        unsigned = sorted(set(trusted) - {s.public_key.keyid for s in signers})
        which = f" ({threshold - len(signers)} more from keyids {', '.join(k[:12] for k in unsigned)})" if unsigned else ""
        raise UserError(
            f"role {role} needs {threshold} signature(s), only {len(signers)} of its key(s) are available "
            f"here{which}{gone}",
            hint=f"configure {threshold - len(signers)} more key(s) for {role} in keys.json, or stage the change "
                 "and collect signatures with 'abflip repo sign'",
        )


def init_repository(keys_dir: Path, *, now: datetime | None = None,
                    expiry_days: dict[str, int] | None = None,
                    roles: dict[str, RoleSpec] | None = None) -> list[SignedFile]:
    """Create the keys of every top-level role in ``keys_dir`` and the first metadata.

    ``roles`` sets keys and threshold per role (default: one generated ed25519 key each).
    Generated private keys go to ``keys_dir/<role>[-n].pem`` (0600); ``keys_dir/keys.json``
    lists every key's signer URI. Returns the signed files of version 1 (consistent
    snapshots on). Every key of a role signs version 1, so all of them must be reachable.
    """
    from .keys import public_key_from

    now = now or datetime.now(timezone.utc)
    keys_dir.mkdir(parents=True, exist_ok=True)
    if (keys_dir / "keys.json").exists():
        raise UserError(f"{keys_dir} already holds a key configuration", hint="use another --keys directory")
    days = dict(DEFAULT_EXPIRY_DAYS, **(expiry_days or {}))
    specs = {r: (roles or {}).get(r, RoleSpec()) for r in TOP_ROLES}
    for r, spec in specs.items():
        n = max(spec.keys, len(spec.uris))
        if not 1 <= spec.threshold <= n:
            raise UserError(f"role {r}: threshold {spec.threshold} with {n} key(s)",
                            hint="a threshold must be between 1 and the number of keys")
    config = KeyConfig(keys_dir / "keys.json", expiry_days=days)
    root = Root(expires=_expiry(now, days["root"]), consistent_snapshot=True)
    for role, spec in specs.items():
        config.roles[role] = []
        for uri in spec.uris:
            key, uri = public_key_from(uri, keys_dir)
            root.add_key(key, role)
            config.roles[role].append(RoleKeys(key.keyid, uri))
        for i in range(max(spec.keys, len(spec.uris)) - len(spec.uris)):
            key, uri = generate_file_key(keys_dir, role if spec.keys == 1 else f"{role}-{len(spec.uris) + i + 1}")
            root.add_key(key, role)
            config.roles[role].append(RoleKeys(key.keyid, uri))
        root.roles[role].threshold = spec.threshold
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
    repo.mark_changed("targets")
    root_md = repo.root
    _sign(root_md, config.signers("root", root_md.signed.keys), root_md.signed.roles["root"].threshold, "root")
    return [SignedFile("1.root.json", root_md.to_bytes(), True), *repo.signed_files(config, now=now)]


class Repository:
    """One consistent view of the metadata (top-level and delegated), ready to edit and re-sign."""

    def __init__(self, root: Metadata[Root], targets: Metadata[Targets], snapshot: Metadata[Snapshot],
                 timestamp: Metadata[Timestamp], delegated: dict[str, Metadata[Targets]] | None = None,
                 bins: dict[str, str] | None = None) -> None:
        self.root = root
        self.targets = targets
        self.snapshot = snapshot
        self.timestamp = timestamp
        self.delegated: dict[str, Metadata[Targets]] = dict(delegated or {})  # product roles and their bins
        self.bins: dict[str, str] = dict(bins or {})  # bin role -> its product
        self.root_history: list[Metadata[Root]] = [root]
        self._changed: set[str] = set()
        self.skipped: list[str] = []  # candidate metadata refused while loading, and why
        self.highest: dict[str, int] = {}  # highest N of N.<role>.json present: the next signing goes above it
        self.unavailable: dict[str, str] = {}  # role -> why: kept at the version the snapshot names, not editable

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, source: MetadataStore | Reader, *, now: datetime | None = None) -> Repository:
        """Read the newest metadata from ``source`` (a store that lists, or a plain reader that
        cannot) and verify it (signatures; expiry only of what is new to the snapshot).

        Root, timestamp and targets must be intact (only the offline key holders and the signer
        write them); any other file is judged on its own: a bad one costs its role the new version
        (``skipped``), or, where it is the version the snapshot names, leaves the role at that
        version and unreadable here (``unavailable``), never the whole repository."""
        loader = _Loader(source if hasattr(source, "names") else _Probe(source), now or datetime.now(timezone.utc))
        root = loader.required("1.root.json", Root)
        _verify(root, root, "root")
        history = [root]
        for v in loader.versions("root", 2, "root"):
            if v != len(history) + 1:
                break  # the chain ends at the first gap
            new = loader.required(f"{v}.root.json", Root)
            _verify(root, new, "root")  # TUF 5.3.4: signed by the old root's threshold ...
            _verify(new, new, "root")  # ... and by its own
            if new.signed.version != v:
                raise RepositoryError(f"{v}.root.json carries version {new.signed.version}")
            root = new
            history.append(root)
        timestamp = loader.required("timestamp.json", Timestamp)
        _verify(root, timestamp, "timestamp")
        snapshot = loader.snapshot(root, timestamp.signed.snapshot_meta.version)
        targets, problem = loader.newest(root, "targets", snapshot.signed.meta["targets.json"].version, Targets)
        if targets is None:
            raise RepositoryError(problem, hint="only the targets key holders write N.targets.json: restore it from a "
                                                "backup (docs/keys.md)")
        delegated = {}
        bins: dict[str, str] = {}
        expires = targets.signed.expires
        for name, role in _delegated_roles(targets).items():
            want = bins_delegations(targets.signed, name)
            delegated[name] = loader.delegated(targets, name, snapshot.signed.meta.get(f"{name}.json"), expires,
                                               _within_delegation(role, want))
            if want is not None:  # checked against what targets delegates, whatever the product role says
                holder = Metadata(Targets(expires=expires, delegations=want))
                for b in want.succinct_roles.get_roles():
                    delegated[b] = loader.delegated(holder, b, snapshot.signed.meta.get(f"{b}.json"), expires,
                                                    _within_bin(role, want.succinct_roles, b))
                    bins[b] = name
        repo = cls(root, targets, snapshot, timestamp, delegated, bins)
        repo.root_history = history
        repo.skipped = loader.skipped
        repo.highest = loader.highest
        repo.unavailable = loader.unavailable
        return repo

    @property
    def is_current(self) -> bool:
        """True when timestamp names the newest snapshot, and it the newest targets (and
        delegated roles): devices see everything."""
        meta = self.snapshot.signed.meta
        return (self.timestamp.signed.snapshot_meta.version == self.snapshot.signed.version
                and meta["targets.json"].version == self.targets.signed.version
                and all(md.signed.version == 0 or (f"{n}.json" in meta and meta[f"{n}.json"].version == md.signed.version)
                        for n, md in self.delegated.items()))

    # -- roles -----------------------------------------------------------------------------
    def role(self, name: str) -> Metadata:
        if name in TOP_ROLES:
            return getattr(self, name)
        if name in self.delegated:
            return self.delegated[name]
        raise UserError(f"the repository has no role {name!r}",
                        hint=f"roles: {', '.join([*TOP_ROLES, *sorted(n for n in self.delegated if n not in self.bins)])}"
                             + (" and the products' hash bins" if self.bins else ""))

    def delegator(self, name: str) -> Metadata:
        """The metadata that holds ``name``'s keys and threshold: root, targets for a product role,
        and for a bin the delegation its product role must carry (derived from targets)."""
        if name in TOP_ROLES:
            return self.root
        if name in self.bins:
            return Metadata(Targets(expires=self.targets.signed.expires,
                                    delegations=bins_delegations(self.targets.signed, self.bins[name])))
        return self.targets

    def key_role(self, name: str) -> str:
        """The role whose keys sign ``name`` in keys.json: a bin is signed with its product's keys."""
        return self.bins.get(name, name)

    def role_keys(self, name: str) -> tuple[dict[str, Key], int]:
        """The public keys trusted for ``name`` and its threshold."""
        d = self.delegator(name).signed
        if name in TOP_ROLES:
            role, keys = d.roles[name], d.keys
        else:
            role, keys = d.get_delegated_role(name), d.delegations.keys
        return {kid: keys[kid] for kid in role.keyids}, role.threshold

    def signing_problem(self, name: str, config: KeyConfig) -> str | None:
        """Why ``config`` cannot sign ``name`` to its threshold here, or None: what a publish
        checks for every role it will re-sign before it uploads anything."""
        keys, threshold = self.role_keys(name)
        name = self.key_role(name)  # a bin: its product's keys
        configured = config.roles.get(name, [])
        usable = [k for k in configured if k.keyid in keys and config.reachable(k.uri)]
        if len(usable) >= threshold:
            return None
        missing = sorted(set(keys) - {k.keyid for k in usable})
        text = (f"role {name} needs {threshold} signature(s), only {len(usable)} of its key(s) are available here "
                f"({threshold - len(usable)} more from keyids {', '.join(k[:12] for k in missing)})")
        if configured and not any(k.keyid in keys for k in configured):
            text += (f"; none of the {len(configured)} {name} key(s) in {config.path} is trusted for {name} in this "
                     "repository: they belong to another repository")
        elif not configured:
            text += f"; {config.path} configures no {name} key"
        else:
            gone = [k.uri for k in configured if k.keyid in keys and not config.reachable(k.uri)]
            if gone:
                text += f"; cannot load signing key(s) {', '.join(gone)}: no such key file here"
        return text

    def verification(self, name: str, md: Metadata | None = None):
        """Signature verification result of ``md`` (default: the role's current metadata)."""
        md = md or self.role(name)
        payload = md.signed_bytes
        if name == "root":  # a root is checked against the previous root and itself (TUF 5.3.4)
            if md is self.root:
                prev = self.root_history[-2].signed if len(self.root_history) > 1 else None
            else:
                prev = self.root.signed
            return md.signed.get_root_verification_result(prev, payload, md.signatures)
        return self.delegator(name).signed.get_verification_result(name, payload, md.signatures)

    def mark_changed(self, name: str) -> None:
        self._changed.add(name)

    def unavailable_products(self) -> dict[str, str]:
        """Products one of whose roles (the product role or a bin) could not be loaded, and why."""
        out: dict[str, str] = {}
        for name, why in sorted(self.unavailable.items()):
            out.setdefault(self.bins.get(name, name), why)
        return out

    def require(self, product: str) -> None:
        """Raise unless ``product``'s metadata loaded whole: an edit must never build on a role
        that is kept at its last version because its file there is not valid."""
        why = self.unavailable_products().get(product)
        if why is not None:
            raise RepositoryError(f"{product}'s metadata cannot be loaded: {why}",
                                  hint=f"put back the file the snapshot names (a copy of the {product} CI's "
                                       f"last upload); until then the online signer keeps {product} at that version "
                                       "and every other product goes on (docs/release-control.md)")

    # -- editing ---------------------------------------------------------------------------
    def role_for_path(self, path: str) -> str:
        """The role a target path belongs to: its product's delegated role if there is one (for a
        product with bins: the bin the path hashes to, but for channel pointers), else targets."""
        for name, role in _delegated_roles(self.targets).items():
            if role.is_delegated_path(path):
                want = bins_delegations(self.targets.signed, name)
                if want is not None and not _is_pointer(name, path):
                    return want.succinct_roles.get_role_for_target(path)
                return name
        return "targets"

    @property
    def target_files(self) -> dict[str, TargetFile]:
        """Every target a device can find: top-level targets first (ngclient asks targets before
        its delegations), then each product role's, for the paths it is trusted for, then the
        product's bins (only once the product role delegates to them)."""
        out: dict[str, TargetFile] = {}
        roles = _delegated_roles(self.targets)
        for name, md in self.delegated.items():
            product = self.bins.get(name)
            if product is not None and not self._binned(product):
                continue  # not reachable yet: the product role does not delegate to its bins
            role = roles[product or name]
            out.update({p: t for p, t in md.signed.targets.items() if role.is_delegated_path(p)})
        for name in roles:  # a product role's own entries are what ngclient finds first
            out.update({p: t for p, t in self.delegated[name].signed.targets.items() if roles[name].is_delegated_path(p)})
        out.update(self.targets.signed.targets)
        return out

    def add_target(self, target: TargetFile) -> None:
        name = self.role_for_path(target.path)
        self.require(self.key_role(name))
        product = self.bins.get(name)
        if product is not None:
            self._bins_ready(product)
            listed = self.delegated[product].signed.targets
            if target.path in listed and listed[target.path] != target:  # a current release's copy
                listed[target.path] = target
                self._changed.add(product)
        elif name in self.delegated:
            self._bins_ready(name)
        self.role(name).signed.targets[target.path] = target
        self._changed.add(name)

    def remove_target(self, path: str) -> None:
        name = self.role_for_path(path)
        self.require(self.key_role(name))
        product = self.bins.get(name)
        if product is not None:
            self._bins_ready(product)
            if self.delegated[product].signed.targets.pop(path, None) is not None:
                self._changed.add(product)
        if self.role(name).signed.targets.pop(path, None) is not None:
            self._changed.add(name)

    def has_bins(self, product: str) -> bool:
        """Does targets give ``product``'s delegation hash bins?"""
        roles = _delegated_roles(self.targets)
        return product in roles and bin_bits(roles[product]) > 0

    def set_current(self, product: str, release_dirs: set[str]) -> None:
        """Make a product with bins list, in its own role, its channel pointers and every target
        under ``release_dirs`` (``"<product>/releases/<version>/"``: what its channels point at)
        and nothing else, so a device following a pointer never needs a bin."""
        if not self.has_bins(product):
            raise UserError(f"{product} has no hash bins")
        self.require(product)
        self._bins_ready(product)
        md = self.delegated[product]
        want = {p: t for p, t in md.signed.targets.items() if _is_pointer(product, p)}
        for b in self._bins_of(product):
            want.update({p: t for p, t in self.delegated[b].signed.targets.items()
                         if not _is_pointer(product, p) and any(p.startswith(d) for d in release_dirs)})
        want = dict(sorted(want.items()))
        if want != md.signed.targets:
            md.signed.targets = want
            self._changed.add(product)

    def adopt_bins(self, product: str) -> None:
        """After an offline change to targets: know the bins it now gives ``product`` (each empty,
        version 0, until the product's key first signs it)."""
        want = bins_delegations(self.targets.signed, product)
        for b in want.succinct_roles.get_roles() if want is not None else ():
            if b not in self.delegated:
                self.delegated[b] = empty_role(self.targets.signed.expires)
            self.bins[b] = product

    def _bins_of(self, product: str) -> list[str]:
        return [b for b, p in self.bins.items() if p == product]

    def _binned(self, product: str) -> bool:
        """Does the product role delegate to its bins as targets says it must?"""
        want = bins_delegations(self.targets.signed, product)
        return want is not None and _bins_problem(self.delegated[product].signed.delegations, want) is None

    def _bins_ready(self, product: str) -> None:
        """Before a product role with bins is signed: it delegates to its bins exactly as targets
        says (first publish, a product moving to bins, new keys). If it did not, it gets that
        delegation, every target it lists but the channel pointers is listed in its bin too (it
        stays in the product role until :meth:`set_current` runs), and every bin is signed anew."""
        want = bins_delegations(self.targets.signed, product)
        if want is None or self._binned(product):
            return
        md = self.delegated[product]
        md.signed.delegations = want
        for path, t in md.signed.targets.items():
            if not _is_pointer(product, path):
                self.delegated[want.succinct_roles.get_role_for_target(path)].signed.targets.setdefault(path, t)
        self._changed.update([product, *self._bins_of(product)])

    # -- signing ---------------------------------------------------------------------------
    def _sign_role(self, name: str, config: KeyConfig, now: datetime) -> SignedFile:
        if name in self.delegated:
            self.require(self.key_role(name))
        md = self.role(name)
        version = max(md.signed.version, self.highest.get(name, 0)) + 1  # above any file there, junk or not
        if version > MAX_VERSION:
            raise RepositoryError(f"{name} cannot be signed above version {MAX_VERSION}: a file there already "
                                  "carries it", hint=f"remove the {name} files above its real version (only who can "
                                                     "write them in the repository can have put them there)")
        md.signed.version = version
        by = self.key_role(name)
        md.signed.expires = _expiry(now, config.expiry(by))
        keys, threshold = self.role_keys(name)
        _sign(md, config.signers(by, keys), threshold, by, config.unreachable(by, keys), trusted=list(keys))
        data = md.to_bytes()
        limit = MAX_METADATA_BYTES[name if name in TOP_ROLES else "targets"]
        if len(data) > limit:  # devices would refuse it: never write it
            raise UserError(f"role {name} v{version} would be {len(data)} bytes, more than devices accept ({limit})",
                            hint="nothing was written" + ("; give the product hash bins ('abflip repo bins') or remove "
                                                          "old releases ('abflip repo gc')" if name not in TOP_ROLES else ""))
        if name == "timestamp":
            return SignedFile("timestamp.json", data, False)
        return SignedFile(f"{md.signed.version}.{name}.json", data, True)

    def _sign_snapshot(self, config: KeyConfig, now: datetime) -> SignedFile:
        meta = self.snapshot.signed.meta
        meta["targets.json"] = MetaFile(self.targets.signed.version)
        for name, md in self.delegated.items():
            if md.signed.version > 0:
                meta[f"{name}.json"] = MetaFile(md.signed.version)
        for name in [n[:-5] for n in meta if n != "targets.json"]:
            if name not in self.delegated:  # delegation removed: devices no longer look for it
                del meta[f"{name}.json"]
        return self._sign_role("snapshot", config, now)

    def signed_timestamp(self, config: KeyConfig, *, now: datetime | None = None) -> SignedFile:
        """Re-sign only the timestamp (naming the newest snapshot), one version up."""
        now = now or datetime.now(timezone.utc)
        self.timestamp.signed.snapshot_meta = MetaFile(self.snapshot.signed.version)
        return self._sign_role("timestamp", config, now)

    def _due(self, name: str, config: KeyConfig, now: datetime) -> bool:
        """Expires within half its period: a scheduled job re-signs it now."""
        return self.role(name).signed.expires - now <= timedelta(days=config.expiry(self.key_role(name))) / 2

    def _delegated_to_sign(self, config: KeyConfig, now: datetime) -> list[str]:
        """The changed delegated roles in write order: bins before product roles (a publish cut
        short leaves new bin versions no product role points at yet). A product role with bins
        is never signed without its bins delegation; its published bins that are due are
        re-signed with it (so bins stay fresh while the product publishes)."""
        for product in [n for n in self._changed if n in self.delegated and n not in self.bins]:
            self._bins_ready(product)
            self._changed.update(b for b in self._bins_of(product)
                                 if self.delegated[b].signed.version > 0 and self._due(b, config, now))
        return sorted(self._changed & set(self.delegated), key=lambda n: (n not in self.bins, n))

    def signed_files(self, config: KeyConfig, *, now: datetime | None = None, online: bool = True) -> list[SignedFile]:
        """Bump and sign what changed (delegated roles, targets), then snapshot and timestamp;
        return them in publish order. ``online=False`` (a product CI, which holds no snapshot
        or timestamp key): only the changed roles; the repository's online signer
        (:mod:`builder.signer`) makes them visible."""
        now = now or datetime.now(timezone.utc)
        out = [self._sign_role(n, config, now) for n in self._delegated_to_sign(config, now)]
        if "targets" in self._changed:
            out.append(self._sign_role("targets", config, now))
        if not online:
            self._changed.clear()
            return out
        out.append(self._sign_snapshot(config, now))
        out.append(self.signed_timestamp(config, now=now))
        self._changed.clear()
        return out

    def refresh_files(self, config: KeyConfig, *, now: datetime | None = None, force: bool = False) -> list[SignedFile]:
        """What a scheduled job re-signs before expiry: each online role (and each delegated role
        whose key is configured here) that expires within half its period; a new snapshot
        implies a new timestamp. ``force`` re-signs the timestamp regardless."""
        now = now or datetime.now(timezone.utc)

        def due(name: str) -> bool:
            return self._due(name, config, now)

        held = self.unavailable_products()  # kept at their last version: nothing of them is re-signed
        for name in self.delegated:
            if (self.delegated[name].signed.version > 0 and self.key_role(name) not in held and due(name)
                    and config.signers(self.key_role(name), self.role_keys(name)[0])):
                self._changed.add(name)
        out = [self._sign_role(n, config, now) for n in self._delegated_to_sign(config, now)]
        self._changed.clear()
        if out or due("snapshot") or not self.is_current:  # newer checked metadata: a new snapshot
            out.append(self._sign_snapshot(config, now))
        if out or force or due("timestamp"):
            out.append(self.signed_timestamp(config, now=now))
        return out

    # -- offline changes (staged, then signed by each key holder) ---------------------------
    def next_root(self, *, now: datetime | None = None, days: float | None = None) -> Metadata[Root]:
        """A copy of root one version up (unsigned), to edit keys and thresholds in."""
        now = now or datetime.now(timezone.utc)
        md = copy.deepcopy(self.root)
        md.signatures.clear()
        md.signed.version += 1
        md.signed.expires = _expiry(now, days or DEFAULT_EXPIRY_DAYS["root"])
        return md

    def next_targets(self, *, now: datetime | None = None, days: float | None = None) -> Metadata[Targets]:
        now = now or datetime.now(timezone.utc)
        md = copy.deepcopy(self.targets)
        md.signatures.clear()
        md.signed.version += 1
        md.signed.expires = _expiry(now, days or DEFAULT_EXPIRY_DAYS["targets"])
        return md


def empty_role(expires: datetime) -> Metadata[Targets]:
    """A delegated role not published yet: version 0, so its first signing makes version 1."""
    md = Metadata(Targets(expires=expires))
    md.signed.version = 0
    return md


def product_paths(product: str) -> list[str]:
    """Path patterns of everything under ``<product>/``. A TUF pattern's ``*`` does not cross
    ``/`` (spec: pattern and path must have as many segments), so one pattern per depth:
    ``p/*`` (p/x), ``p/*/*`` (p/channels/stable.json), ``p/*/*/*`` (p/releases/1.0/rootfs.img.zst) ..."""
    return ["/".join([product, *["*"] * depth]) for depth in range(1, MAX_TARGET_DEPTH + 1)]


def add_delegation(targets: Metadata[Targets], product: str, keys: list[Key], threshold: int, *,
                   bits: int = DEFAULT_BIN_BITS) -> DelegatedRole:
    """Delegate ``<product>/*`` to a role named ``product`` (terminating: no other role is asked),
    with 2^``bits`` hash bins (0: none, every target in the product role)."""
    t = targets.signed
    if t.delegations is None:
        t.delegations = Delegations(keys={}, roles={})
    if product in (t.delegations.roles or {}):
        raise UserError(f"{product} is already delegated", hint="use 'abflip repo rotate' to change its keys")
    for other in t.delegations.roles:
        want = bins_delegations(t, other)
        if want is not None and want.succinct_roles.is_delegated_role(product):
            raise UserError(f"{product!r} is the name of one of {other}'s hash bins",
                            hint="choose another product name")
    if (problem := product_name_problem(product, t.delegations.roles)) is not None:
        raise UserError(problem, hint="choose a product name no other product's wildcards reach (docs/keys.md "
                                      "'Product names')")
    role = DelegatedRole(name=product, keyids=[], threshold=threshold, terminating=True, paths=product_paths(product))
    t.delegations.roles[product] = role
    for k in keys:
        t.add_key(k, product)
    set_bin_bits(t, product, bits)
    return role


# The storage permissions docs/keys.md gives a product's CI, as wildcards (S3 resource ARNs: '*' matches
# any characters, '/' and '.' included), and the names of the files a product has: its role, its hash
# bins (any of the 1..8 bit names a 'repo bins' could give it later) and its targets.
_HEX = [f"{i:x}" for i in range(16)] + [f"{i:02x}" for i in range(256)]


def _product_wildcards(product: str) -> list[str]:
    return [f"metadata/*.{product}.json", f"metadata/*.{product}-bin-*.json", f"targets/{product}/*"]


def _product_files(product: str, bins: bool) -> list[str]:
    """``bins``: its hash bins' names too (only a name with '-bin-' in it, its own or the other's, can
    meet a bin name: ``*.P.json`` reaches ``Q-bin-h`` only if P ends in ``-bin-h``, and
    ``*.P-bin-*.json`` reaches it only where it reaches ``Q``'s role file already)."""
    return [f"metadata/1.{product}.json", *(f"metadata/1.{product}-bin-{h}.json" for h in (_HEX if bins else ())),
            f"targets/{product}/x"]


_TOP_FILES = [*(f"metadata/1.{r}.json" for r in TOP_ROLES if r != "timestamp"), "metadata/timestamp.json"]


def product_name_problem(product: str, others: Iterable[str]) -> str | None:
    """Why ``product`` cannot be delegated next to ``others``, or None: a file name of one of them
    (role, hash bins, targets) would match another's storage wildcards (docs/keys.md), so one
    product's CI could write the other's files (``edge.prod-a`` under ``*.prod-a.json``,
    ``prod-a-bin-zz`` under ``*.prod-a-bin-*.json``), or a top-level role's."""
    from fnmatch import fnmatchcase

    if product in TOP_ROLES:
        return f"{product!r} is the name of a top-level role"
    mine = _product_wildcards(product)
    if top := next((f for f in _TOP_FILES if any(fnmatchcase(f, w) for w in mine)), None):
        return f"product {product!r}: its CI's wildcards would reach the top-level file {top}"
    for other in sorted(o for o in others if o != product):
        theirs, bins = _product_wildcards(other), "-bin-" in product or "-bin-" in other
        if f := next((f for f in _product_files(other, bins) if any(fnmatchcase(f, w) for w in mine)), None):
            return f"product {product!r}: its CI's wildcards would reach {other}'s file {f}"
        if f := next((f for f in _product_files(product, bins) if any(fnmatchcase(f, w) for w in theirs)), None):
            return f"product {product!r}: {other}'s CI's wildcards would reach its file {f}"
    return None


def name_collisions(targets: Targets) -> list[str]:
    """Every pair of delegated products one of whose CI wildcards reach the other's files (a
    repository delegated before the rule existed): what 'repo verify' warns about."""
    roles = sorted(_delegated_roles(Metadata(targets)) if targets.delegations else [])
    return [p for i, name in enumerate(roles) if (p := product_name_problem(name, roles[:i])) is not None]


def set_bin_bits(targets: Targets, product: str, bits: int) -> None:
    """Give ``product``'s delegation 2^``bits`` hash bins (0: none). Its bins' names must not be
    another delegated role's (the snapshot and ngclient know roles by name only)."""
    check_bin_bits(bits)
    role = targets.delegations.roles[product]
    role.unrecognized_fields.pop(BIN_BITS_FIELD, None)
    if not bits:
        return
    succinct = SuccinctRoles([], 1, bits, _bin_prefix(product))
    taken = sorted(n for n in targets.delegations.roles if succinct.is_delegated_role(n))
    if taken:
        raise UserError(f"{product}'s hash bins would be named like the delegated role {taken[0]!r}",
                        hint="use fewer or more bin bits, or no bins (0)")
    role.unrecognized_fields[BIN_BITS_FIELD] = bits


def check_bin_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= MAX_BIN_BITS:
        raise UserError(f"{bits!r} bin bits: expected 0 (no bins) to {MAX_BIN_BITS} ({1 << MAX_BIN_BITS} bins)",
                        hint=f"the default is {DEFAULT_BIN_BITS} ({1 << DEFAULT_BIN_BITS} bins)")


def bin_bits(role: DelegatedRole) -> int:
    """How many bits of hash bins targets gives this product delegation (0: none)."""
    bits = role.unrecognized_fields.get(BIN_BITS_FIELD, 0)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= MAX_BIN_BITS:
        raise RepositoryError(f"targets gives {role.name} {BIN_BITS_FIELD} {bits!r}, not 0..{MAX_BIN_BITS}",
                              hint="the targets key holders must fix the product's delegation in targets")
    return bits


def bins_delegations(targets: Targets, product: str) -> Delegations | None:
    """What the role of a ``product`` with hash bins must delegate: its 2^bits bins
    ``<product>-bin-<hex>``, with exactly the product's keys and threshold (None: no bins)."""
    role = targets.delegations.roles[product]
    bits = bin_bits(role)
    if not bits:
        return None
    keyids = sorted(role.keyids)
    return Delegations(keys={k: targets.delegations.keys[k] for k in keyids}, roles=None,
                       succinct_roles=SuccinctRoles(keyids, role.threshold, bits, _bin_prefix(product)))


def _bin_prefix(product: str) -> str:
    return f"{product}-bin"


def _is_pointer(product: str, path: str) -> bool:
    """A channel pointer (``<product>/channels/<channel>.json``): listed in the product role itself."""
    return path.startswith(f"{product}/channels/")


def _bins_problem(d: Delegations | None, want: Delegations) -> str | None:
    """Why the delegations a product role carries are not its bins as targets defines them
    (None: they are). ``None`` delegations are a product role not (yet) moved to its bins."""
    if d is None:
        return "it does not delegate to its hash bins"
    s = d.succinct_roles
    if d.roles is not None or s is None:
        return "it delegates to roles other than its hash bins"
    w = want.succinct_roles
    if s.name_prefix != w.name_prefix or s.bit_length != w.bit_length:
        return (f"it delegates to {s.number_of_bins} bins named {s.name_prefix[:80]!r}-..., targets says "
                f"{w.number_of_bins} named {w.name_prefix!r}-...")
    if sorted(s.keyids) != w.keyids or s.threshold != w.threshold or d.keys != want.keys:
        return "its bins are trusted for other keys or another threshold than the product's"
    if s.unrecognized_fields or d.unrecognized_fields:
        return "its bins delegation carries fields abflip does not know"
    return None


def _delegated_roles(targets: Metadata[Targets]) -> dict[str, DelegatedRole]:
    d = targets.signed.delegations
    return dict(d.roles) if d is not None and d.roles else {}


def _parse(data: bytes | None, name: str, cls: type) -> Metadata:
    if data is None:
        raise RepositoryError(f"the repository has no {name}", hint="run 'abflip repo init' to create a repository")
    try:
        if (problem := json_depth_problem(data)) is not None:
            raise DeserializationError(problem)
        md = Metadata.from_bytes(data)
    except DeserializationError as e:
        raise RepositoryError(f"{name} is not valid TUF metadata: {e}") from None
    if not isinstance(md.signed, cls):
        raise RepositoryError(f"{name} is not {cls.type} metadata")
    return md


def _verify(delegator: Metadata, md: Metadata, role: str) -> None:
    try:
        delegator.verify_delegate(role, md)
    except UnsignedMetadataError as e:
        raise RepositoryError(f"{role} metadata version {md.signed.version} is not signed by its threshold: {e}") from None


def _within_delegation(role: DelegatedRole, bins: Delegations | None = None) -> Callable[[Metadata], None]:
    """The paths check of a delegated role's candidate metadata: every target under the
    delegation's paths; no delegations of its own, but for a product with ``bins``: exactly
    those (or none yet: a product role not moved to its bins)."""
    def check(md: Metadata) -> None:
        outside = sorted(p for p in md.signed.targets if not role.is_delegated_path(p))
        if outside:
            raise RepositoryError(f"it lists {len(outside)} target(s) outside {role.name}'s delegation, e.g. "
                                  f"{outside[0][:120]!r}")
        d = md.signed.delegations
        if d is None or not (d.roles or d.keys or d.succinct_roles):
            return
        if bins is None:
            raise RepositoryError(f"it delegates further; role {role.name} may not")
        if (problem := _bins_problem(d, bins)) is not None:
            raise RepositoryError(f"{problem}; role {role.name} may delegate only to its own hash bins")
    return check


def _within_bin(role: DelegatedRole, succinct: SuccinctRoles, name: str) -> Callable[[Metadata], None]:
    """The check of a bin's candidate metadata: every target under its product's paths and
    hashing to this bin (ngclient would never look for any other there), no delegations."""
    def check(md: Metadata) -> None:
        outside = sorted(p for p in md.signed.targets if not role.is_delegated_path(p))
        if outside:
            raise RepositoryError(f"it lists {len(outside)} target(s) outside {role.name}'s delegation, e.g. "
                                  f"{outside[0][:120]!r}")
        elsewhere = sorted(p for p in md.signed.targets if succinct.get_role_for_target(p) != name)
        if elsewhere:
            raise RepositoryError(f"it lists {len(elsewhere)} target(s) that hash to another bin than {name}, e.g. "
                                  f"{elsewhere[0][:120]!r}")
        if md.signed.delegations is not None:
            raise RepositoryError(f"it delegates further; bin {name} may not")
    return check


class _Probe:
    """A plain reader as a store (tests; a repository read over http(s)): it cannot list, so
    versions are found by probing upward from the one named, and sizes are checked after reading."""

    def __init__(self, read: Reader) -> None:
        self._read = read

    def read(self, name: str, limit: int) -> bytes | None:
        data = self._read(name)
        if data is not None and len(data) > limit:
            raise FileRefused(errno.EFBIG, f"is {len(data)} bytes, more than the limit {limit}", name)
        return data

    def names(self) -> None:
        return None


class _Loader:
    """One load of a repository: what is listed, what was refused (``skipped``), the highest
    version present per role (``highest``), the roles kept at their last good version
    (``unavailable``). Reads every file bounded (:data:`MAX_METADATA_BYTES`); a candidate that
    cannot be read, parsed or verified is that role's problem only."""

    def __init__(self, store: MetadataStore, now: datetime) -> None:
        self.store, self.now = store, now
        names = store.names()
        self.listed: dict[str, list[int]] | None = None
        if names is not None:
            self.listed = {}
            for n in names:
                if m := _VERSIONED_NAME.match(n):
                    self.listed.setdefault(m[2], []).append(int(m[1]))
            for versions in self.listed.values():
                versions.sort()
        self.skipped: list[str] = []
        self.highest: dict[str, int] = {}
        self.unavailable: dict[str, str] = {}
        self._probed: dict[str, bytes | None] = {}

    def read(self, name: str, kind: str) -> bytes | None:
        if name in self._probed:
            return self._probed.pop(name)
        try:
            return self.store.read(name, MAX_METADATA_BYTES[kind])
        except FileRefused as e:
            raise RepositoryError(f"{name} {e.strerror}") from None

    def required(self, name: str, cls: type) -> Metadata:
        """A file the repository cannot be without (root, timestamp): its problem is fatal."""
        return _parse(self.read(name, cls.type), name, cls)

    def versions(self, role: str, start: int, kind: str) -> list[int]:
        """The versions of ``role`` present at or above ``start``, oldest first (and ``highest``)."""
        if self.listed is not None:
            present = self.listed.get(role, [])
        else:  # no listing: probe upward to the first gap (what is read is kept for the check)
            present = []
            for v in range(start, start + MAX_PROBE):
                name = f"{v}.{role}.json"
                try:
                    self._probed[name] = data = self.read(name, kind)
                except RepositoryError:
                    self._probed[name] = data = b""  # present but refused: a candidate that fails below
                if data is None:
                    del self._probed[name]
                    break
                present.append(v)
        if present:
            self.highest[role] = max(self.highest.get(role, 0), present[-1])
        return [v for v in present if v >= start]

    def check(self, delegator: Metadata, role: str, v: int, cls: type,
              check: Callable[[Metadata], None] | None = None, *, fresh: bool = False) -> Metadata:
        """``v.role.json`` if it is valid: read within its size bound, parsed, signed to the
        threshold by ``delegator``'s keys for ``role``, carrying version ``v``, ``check``-ed, and
        (``fresh``) not expired; else the RepositoryError saying why, reported in ``skipped``."""
        name = f"{v}.{role}.json"
        try:
            md = _parse(self.read(name, "targets" if cls is Targets else cls.type), name, cls)
            _verify(delegator, md, role)
            if md.signed.version != v:
                raise RepositoryError(f"{name} carries version {md.signed.version}")
            if check is not None:
                check(md)
            if fresh and md.signed.is_expired(self.now):
                raise RepositoryError(f"it expired at {md.signed.expires:%Y-%m-%d %H:%M:%S} UTC: devices would "
                                      "refuse it")
        except RepositoryError as e:
            self.skipped.append(f"{name}: {e.message}")
            raise
        return md

    def newest(self, delegator: Metadata, role: str, start: int, cls: type,
               check: Callable[[Metadata], None] | None = None, *,
               fresh_from: float = math.inf) -> tuple[Metadata | None, str]:
        """The highest valid ``N.role.json`` at or above ``start`` (a concurrent publisher may have
        written a newer one than the snapshot names; building on it keeps its targets), examining at
        most :data:`MAX_CANDIDATES` from the newest down; a file from ``fresh_from`` on (new to the
        snapshot) must not have expired. Returns (metadata or None, what is wrong with ``start``'s)."""
        versions = self.versions(role, start, "targets" if cls is Targets else cls.type)
        problem = f"the repository has no {start}.{role}.json"
        for n, v in enumerate(reversed(versions)):
            if n == MAX_CANDIDATES:
                self.skipped.append(f"{role}: {len(versions) - n} older file(s) from v{start} on were not examined "
                                    f"(only the newest {MAX_CANDIDATES} are)")
                break
            try:
                return self.check(delegator, role, v, cls, check, fresh=v >= fresh_from), problem
            except RepositoryError as e:
                if v == start:
                    problem = f"{start}.{role}.json: {e.message}"
        return None, problem

    def snapshot(self, root: Metadata[Root], named: int) -> Metadata[Snapshot]:
        """The snapshot to build on: the newest valid one at or above what ``timestamp.json`` names
        (a concurrent signer's); if that one was overwritten or removed, the newest below it that
        still verifies as the snapshot key's own (signed, carrying the version its name says). The
        next snapshot goes above every file present either way, naming every role at or above what
        the snapshot built on names, so the repository moves on without the lost file."""
        md, problem = self.newest(root, "snapshot", named, Snapshot)
        if md is not None:
            return md
        below = [v for v in self.versions("snapshot", 1, "snapshot") if v < named]
        for v in reversed(below[-MAX_CANDIDATES:]):
            try:
                md = self.check(root, "snapshot", v, Snapshot)
            except RepositoryError:
                continue
            self.skipped.append(f"snapshot: {problem} (timestamp.json names it); built on {v}.snapshot.json, the "
                                "newest snapshot that verifies")
            return md
        raise RepositoryError(problem, hint="restore metadata/ from a backup: no snapshot here verifies")

    def delegated(self, delegator: Metadata, name: str, meta: MetaFile | None, expires: datetime,
                  check: Callable[[Metadata], None]) -> Metadata[Targets]:
        """A delegated role (product or bin): its newest valid metadata. Never in a snapshot yet: a
        first publish, or nothing (empty, version 0). In a snapshot but no file at or above that
        version is valid (junk, an older copy, a FIFO, a file over the devices' limit where the
        current one was): the role keeps that version, unreadable here (``unavailable``)."""
        start = meta.version if meta is not None else 1
        md, problem = self.newest(delegator, name, start, Targets, check, fresh_from=start + (meta is not None))
        if md is not None:
            return md
        held = empty_role(expires)
        if meta is not None:
            self.unavailable[name] = problem
            held.signed.version = meta.version
        return held
