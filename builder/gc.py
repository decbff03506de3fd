"""Garbage collection: drop old releases from the repository and delete objects nobody needs.

What stays, per product: the ``keep`` newest released versions, plus every version a channel
points at (whatever its age). Everything else:

1. its target entries are removed from the targets metadata (a product with hash bins: from
   its bins and from the product role), and what changed, snapshot and timestamp are re-signed
   and written in the publish order (:func:`builder.publish.commit`), so devices stop seeing it
   first;
2. only then are its objects deleted (image, boot files, manifest), with the superseded
   channel-pointer objects;
3. versioned metadata older than the previous version of each role is deleted
   (``N.targets.json``, ``N.snapshot.json``, delegated ``N.<role>.json`` and bins): a device that
   read the timestamp just before step 1 can still fetch what it names. Root versions are
   never deleted: devices walk the root chain from the root they ship with.
4. what interrupted writes left behind more than ``abandoned_after`` seconds ago (a day by
   default: never a write still running) is removed: S3 multipart uploads a failing publisher
   could not abort, ``.tmp-*`` staging files of a killed publish (:meth:`Storage.abandoned`).

Nothing the current snapshot or any channel references is deleted: the set of live objects
is recomputed from the metadata written in step 1. Objects under a release that is still
listed are kept even if unreferenced (they may belong to a publish in progress).

What gc cannot parse it skips and reports (``GcResult.skipped``), never stopping for the whole
repository: a release path whose version is not a semantic version is left alone (neither
kept nor removed), and a channel pointer that is missing or does not parse makes gc remove
nothing of that product (it cannot know which release the pointer pins).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime

from metadata.errors import UserError
from metadata.keys import KeyConfig
from metadata.bounded import FileRefused
from metadata.manifest import Channel, Limits, ManifestError
from metadata.repository import Repository
from metadata.version import Version

from .errors import StorageError
from .publish import RETRIES, commit, load_tagged, target_key
from .storage import Storage

__all__ = ["collect_garbage", "GcResult"]

_RELEASE = re.compile(r"^(?P<product>[^/]+)/releases/(?P<version>[^/]+)/[^/]+$")
_CHANNEL = re.compile(r"^(?P<product>[^/]+)/channels/(?P<channel>[^/]+)\.json$")
_VERSIONED = re.compile(r"^metadata/(?P<n>\d+)\.(?P<role>.+)\.json$")
_DELTA = re.compile(r"^(?P<product>[^/]+)/releases/[^/]+/delta-(?P<source>[^/]+)\.(json|bin)$")  # docs/delta.md
_STORED = re.compile(r"^targets/(?P<dir>.+/)?[0-9a-f]{64}\.(?P<name>[^/]+)$")


@dataclass
class GcResult:
    dry_run: bool
    kept: dict[str, list[str]] = field(default_factory=dict)  # product -> versions kept
    removed_versions: dict[str, list[str]] = field(default_factory=dict)
    removed_targets: list[str] = field(default_factory=list)
    deleted_objects: list[str] = field(default_factory=list)
    timestamp_version: int | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}: left alone
    keys_checked: bool = False  # a dry run: the keys given can sign what the real run would
    abandoned: list[str] = field(default_factory=list)  # incomplete uploads, staging files (step 4)


#: An interrupted write's leftovers are removed once this old (seconds): no publish runs a day.
ABANDONED_AFTER = 24 * 3600


def _plan(storage: Storage, repo: Repository, keep: int, skipped: list[dict[str, str]]
          ) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """What to keep and remove; appends what it cannot parse to ``skipped``."""
    releases: dict[str, set[str]] = {}
    pinned: dict[str, set[str]] = {}
    frozen: set[str] = set()  # products with a channel pointer gc cannot read: remove nothing
    for product, why in repo.unavailable_products().items():  # kept at their last version: left alone
        skipped.append({"path": f"{product}/", "reason": f"its metadata cannot be loaded ({why}); nothing of "
                                                         f"{product} is removed"})
    for path, t in sorted(repo.target_files.items()):
        if m := _RELEASE.match(path):
            try:
                Version.parse(m["version"])
            except UserError:
                skipped.append({"path": path, "reason": f"{m['version']!r} is not a semantic version; left alone"})
                continue
            releases.setdefault(m["product"], set()).add(m["version"])
        elif m := _CHANNEL.match(path):
            reason = None
            try:
                data = storage.get(target_key(t), Limits().channel_max_bytes)
            except FileRefused as e:
                data, reason = b"", f"its object {target_key(t)} {e.strerror}"
            if data is None:
                reason = f"its object {target_key(t)} is missing"
            elif reason is None:
                try:
                    pinned.setdefault(m["product"], set()).add(str(Channel.from_bytes(data).version))
                except ManifestError as e:
                    reason = e.message
            if reason is not None:
                frozen.add(m["product"])
                skipped.append({"path": path, "reason": f"channel pointer unreadable ({reason}); nothing of "
                                                        f"{m['product']} is removed"})
    kept: dict[str, list[str]] = {}
    removed: dict[str, list[str]] = {}
    for product, versions in releases.items():
        ordered = sorted(versions, key=Version.parse, reverse=True)
        keep_set = set(ordered) if product in frozen else set(ordered[:keep]) | pinned.get(product, set())
        kept[product] = [v for v in ordered if v in keep_set]
        removed[product] = [v for v in ordered if v not in keep_set]
    paths = [p for p in repo.target_files if (m := _RELEASE.match(p)) and m["version"] in removed.get(m["product"], [])]
    # A delta whose source release is gone (removed now or before) serves no device gc knows of.
    paths += [p for p in repo.target_files if p not in paths and (m := _DELTA.match(p))
              and m["product"] in kept and m["source"] not in kept[m["product"]]]
    return kept, removed, sorted(paths)


def _dead_objects(storage: Storage, repo: Repository, removed: dict[str, list[str]],
                  removed_paths: frozenset[str] = frozenset()) -> list[str]:
    """Objects no longer needed once ``removed_paths`` are gone from ``repo``'s targets (a dry
    run passes them; after the commit they are gone already)."""
    targets = {p: t for p, t in repo.target_files.items() if p not in removed_paths}
    live = {target_key(t) for t in targets.values()}
    held = {f"targets/{p}/" for p in repo.unavailable_products()}  # what they list is unknown here: all stays
    listed_releases = {(m["product"], m["version"]) for p in targets if (m := _RELEASE.match(p))}
    current_pointers = {p for p in targets if _CHANNEL.match(p)}
    dead = []
    for key in storage.list("targets/"):
        if key in live or not (m := _STORED.match(key)) or any(key.startswith(h) for h in held):
            continue
        path = (m["dir"] or "") + m["name"]
        if (r := _RELEASE.match(path)) and (r["product"], r["version"]) not in listed_releases \
                and r["version"] in removed.get(r["product"], []):
            dead.append(key)
        elif path in current_pointers:  # a superseded version of a pointer that is still current
            dead.append(key)
        elif (d := _DELTA.match(path)) and path not in targets and (d["product"], d["source"]) not in listed_releases:
            dead.append(key)  # a delta whose source is gone
    # versioned metadata: keep the current and the previous version of every role but root
    current: dict[str, int] = {"snapshot": repo.snapshot.signed.version}
    for name, meta in repo.snapshot.signed.meta.items():
        current[name[:-len(".json")]] = meta.version
    for key in storage.list("metadata/"):
        m = _VERSIONED.match(key)
        if m and m["role"] != "root" and m["role"] in current and int(m["n"]) < current[m["role"]] - 1:
            dead.append(key)
    return sorted(dead)


def _check_keys(repo: Repository, keys: KeyConfig, paths: list[str]) -> None:
    """What the real run checks before it writes: ``keys`` can sign every role it would re-sign
    (the roles the removed paths belong to, their products, snapshot and timestamp)."""
    roles = {repo.role_for_path(p) for p in paths}
    roles |= {repo.bins[r] for r in roles if r in repo.bins}
    for role in [*sorted(roles), "snapshot", "timestamp"]:
        if (problem := repo.signing_problem(role, keys)) is not None:
            raise UserError(problem, hint=f"check --keys ({keys.dir}): gc re-signs {role}; nothing was removed")


def collect_garbage(storage: Storage, keys: KeyConfig | None, *, keep: int, dry_run: bool = False,
                    now: datetime | None = None, abandoned_after: float = ABANDONED_AFTER) -> GcResult:
    """Remove old releases (see the module); ``dry_run``: say what would go, and with ``keys``
    check them as the real run would."""
    if keep < 1:
        raise UserError(f"--keep {keep}: every product keeps at least its newest release",
                        hint="pass --keep 1 or more (releases a channel points at always stay as well)")
    result = GcResult(dry_run)
    for attempt in range(RETRIES):
        repo, tag = load_tagged(storage)
        result.skipped = []
        kept, removed, paths = _plan(storage, repo, keep, result.skipped)
        result.kept, result.removed_versions, result.removed_targets = kept, {p: v for p, v in removed.items() if v}, paths
        if dry_run:
            if keys is not None and paths:
                _check_keys(repo, keys, paths)
            result.keys_checked = keys is not None
            result.deleted_objects = _dead_objects(storage, repo, removed, frozenset(paths))
            result.timestamp_version = repo.timestamp.signed.version
            result.abandoned = storage.abandoned(abandoned_after)
            return result
        if paths:
            if keys is None:
                raise UserError("removing releases needs the signing keys (--keys)",
                                hint="pass the keys directory that signs the products' roles, snapshot and timestamp")
            _check_keys(repo, keys, paths)
            for p in paths:
                repo.remove_target(p)
            if not commit(storage, keys, repo, tag, now=now):
                time.sleep(min(0.05 * (attempt + 1), 1.0))
                continue
        break
    else:
        raise StorageError(f"gave up after {RETRIES} conflicting concurrent publishes", hint="retry gc later")
    # Step 2-3 from what is current now (devices no longer see the removed releases).
    repo, _ = load_tagged(storage)
    result.timestamp_version = repo.timestamp.signed.version
    result.deleted_objects = _dead_objects(storage, repo, removed)
    for key in result.deleted_objects:
        storage.delete(key)
    result.abandoned = storage.abandoned(abandoned_after, remove=True)
    return result
