"""Channel pointers: promote a published release, phase its rollout, withdraw a release.

A channel is one small target, ``<product>/channels/<channel>.json``, naming a version and the
target path of its ``release.json``, and since issue 13 optionally a phased ``rollout``
(percentage, pause, seed) and the versions ``withdrawn`` from the channel
(:class:`metadata.manifest.Channel`; docs/release-control.md). Every change writes a new
pointer (hash-prefixed, so a new object) and re-signs the product's role; the image and boot
files are not touched. Same publish order and race handling as :mod:`builder.publish`: with the
product's key only, devices see the change once the online signer ran (``abflip repo snapshot``).

The rollout and the withdrawn list are signed into the pointer, so a mirror can neither widen,
narrow nor undo them; every value is checked here with the device's own validators first.

For a product with hash bins (docs/formats.md), every change of a pointer also re-computes what
the product's role lists besides its bins: the targets of the releases its channels point at now
(:func:`current_releases`, :meth:`metadata.repository.Repository.set_current`), so devices
following a channel find everything in that one small role.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from tuf.api.metadata import TargetFile

from metadata.bounded import FileRefused
from metadata.errors import RepositoryError, UserError
from metadata.manifest import (
    MAX_WITHDRAWN,
    Channel,
    Limits,
    ManifestError,
    Release,
    Rollout,
    channel_target_path,
    check_name,
    release_target_dir,
    rollout_problem,
)
from metadata.keys import KeyConfig
from metadata.repository import Repository
from metadata.version import Version

from .errors import StorageError
from .publish import RETRIES, commit, holds_online_keys, load_tagged, put_new, target_key
from .storage import Storage

__all__ = ["promote", "set_rollout", "withdraw", "next_pointer", "current_pointer", "current_releases", "ChannelResult",
           "make_rollout", "published_versions", "channel_states"]


@dataclass(frozen=True)
class ChannelResult:
    product: str
    channel: str
    version: str
    previous: str | None
    changed: bool
    timestamp_version: int
    visible: bool = True  # False: devices see it once 'abflip repo snapshot' ran
    rollout: dict | None = None
    withdrawn: tuple[str, ...] = ()


def make_rollout(percent: int | None, *, paused: bool = False, seed: str | None = None) -> Rollout | None:
    """A rollout from a release engineer's arguments, checked with the device's validator."""
    if percent is None:
        return None
    raw = {"percent": percent, "paused": paused, **({"seed": seed} if seed is not None else {})}
    if (problem := rollout_problem(raw)) is not None:
        raise UserError(problem, hint="--rollout takes a whole percentage 0..100; --seed letters, digits, '.', '_', "
                                      "'+' or '-'; nothing was changed")
    return Rollout(percent, paused, seed)


def current_pointer(storage: Storage, repo: Repository, product: str, channel: str) -> Channel | None:
    """The channel's pointer as the product's role lists it now (None: no such channel)."""
    t = repo.target_files.get(channel_target_path(product, channel))
    if t is None:
        return None
    try:
        data = storage.get(target_key(t), Limits().channel_max_bytes)
    except FileRefused as e:
        raise RepositoryError(f"channel {channel} of {product}: its object {target_key(t)} {e.strerror}") from None
    if data is None:
        raise StorageError(f"channel {channel} of {product} is listed but its object is missing")
    try:
        return Channel.from_bytes(data)
    except ManifestError as e:
        raise UserError(f"channel {channel} of {product} holds a pointer this version of abflip cannot read: "
                        f"{e.message}", hint="upgrade abflip on this machine") from None


def current_releases(storage: Storage, repo: Repository, product: str) -> set[str]:
    """The release directories (``"<product>/releases/<version>/"``) the product's channel
    pointers, as ``repo`` lists them now, point at. A pointer that cannot be read pins nothing
    gc or this can know of, so then every release the product's role lists now stays current."""
    prefix = f"{product}/channels/"
    dirs: set[str] = set()
    for path, t in repo.target_files.items():
        if not (path.startswith(prefix) and path.endswith(".json")):
            continue
        try:
            data = storage.get(target_key(t), Limits().channel_max_bytes)
            ptr = Channel.from_bytes(data) if data is not None else None
        except (ManifestError, FileRefused):
            ptr = None
        if ptr is None:
            return dirs | {p.rsplit("/", 1)[0] + "/" for p in repo.role(product).signed.targets
                           if p.startswith(f"{product}/releases/")}
        dirs.add(ptr.release.rsplit("/", 1)[0] + "/")
    return dirs


def next_pointer(storage: Storage, repo: Repository, product: str, channel: str, version: Version,
                 release_path: str, *, rollout: Rollout | None = None) -> Channel:
    """The pointer a publish writes. The channel's rollout carries over (a publish never widens a
    phased or paused channel: the new release goes to the same percentage, paused if it was, its
    cohort drawn anew unless the channel has a fixed seed), unless ``rollout`` says otherwise; the
    withdrawn versions carry over, and a withdrawn version is not put back by a publish (promote it
    explicitly to do that)."""
    old = current_pointer(storage, repo, product, channel)
    withdrawn = old.withdrawn if old is not None else ()
    if old is not None and old.is_withdrawn(version):
        raise UserError(f"{product} {version} was withdrawn from channel {channel}",
                        hint=f"publish a new version, or put it back explicitly with 'abflip channel promote {product} "
                             f"{version} --to {channel}'; nothing was uploaded")
    if rollout is None and old is not None:
        rollout = old.rollout
    return Channel(product, channel, version, release_path, rollout=rollout, withdrawn=withdrawn)


def published_versions(repo: Repository, product: str) -> set[Version]:
    """The versions of ``product`` whose release manifest the repository lists."""
    prefix = f"{product}/releases/"
    out = set()
    for path in repo.target_files:
        if path.startswith(prefix) and path.endswith("/release.json") and path.count("/") == 3:
            try:
                out.add(Version.parse(path[len(prefix):-len("/release.json")]))
            except UserError:
                continue  # not a release abflip made (gc reports those)
    return out


def _update(storage: Storage, keys: KeyConfig, product: str, channel: str,
            make: Callable[[Repository, Channel | None], Channel], now: datetime | None) -> ChannelResult:
    """Re-read, ``make`` the new pointer from the current one, write it, sign; retry on races."""
    check_name("product", product)
    check_name("channel", channel)
    for attempt in range(RETRIES):
        repo, tag = load_tagged(storage, now=now)
        repo.require(product)
        old = current_pointer(storage, repo, product, channel)
        new = make(repo, old)
        pointer = new.to_bytes()
        target = TargetFile.from_data(channel_target_path(product, channel), pointer, ["sha256"])
        online = holds_online_keys(repo, keys)
        previous = str(old.version) if old is not None else None
        listed = repo.target_files.get(target.path)

        def result(changed: bool, visible: bool) -> ChannelResult:
            return ChannelResult(product, channel, str(new.version), previous, changed, repo.timestamp.signed.version,
                                 visible, new.rollout.to_json() if new.rollout else None, new.withdrawn)

        if listed is not None and listed.hashes == target.hashes and (repo.is_current or not online):
            return result(False, repo.is_current)
        role = repo.role_for_path(target.path)
        for r in [role, *(("snapshot", "timestamp") if online else ())]:
            if (problem := repo.signing_problem(r, keys)) is not None:
                raise UserError(problem, hint=f"check --keys ({keys.dir}): it must hold this repository's key for {r}; "
                                              "nothing was changed")
        put_new(storage, target_key(target), pointer)
        repo.add_target(target)
        if repo.has_bins(product):
            repo.set_current(product, current_releases(storage, repo, product))
        if commit(storage, keys, repo, tag, now=now, online=online):
            return result(True, online)
        time.sleep(min(0.05 * (attempt + 1), 1.0))
    raise StorageError(f"gave up changing channel {channel} after {RETRIES} conflicting concurrent publishes",
                       hint="retry; the repository is consistent")


def _published(storage: Storage, repo: Repository, product: str, ver: Version) -> str:
    release_path = f"{release_target_dir(product, str(ver))}/release.json"
    rel = repo.target_files.get(release_path)
    if rel is None:
        raise UserError(f"{product} {ver} is not published in {storage.describe()}",
                        hint="publish it first ('abflip publish'), or check the product and version")
    try:
        data = storage.get(target_key(rel), Limits().manifest_max_bytes)
    except FileRefused as e:
        raise RepositoryError(f"the release manifest of {product} {ver}: its object {target_key(rel)} {e.strerror}") \
            from None
    if data is None:
        raise StorageError(f"the release manifest of {product} {ver} is listed but its object is missing")
    Release.from_bytes(data)  # a pointer must never name a manifest that does not parse
    return release_path


def promote(storage: Storage, keys: KeyConfig, *, product: str, version: str, channel: str,
            rollout: Rollout | None = None, now: datetime | None = None) -> ChannelResult:
    """Point ``channel`` at a published version, to every device or to a phased ``rollout``.
    Promoting a withdrawn version puts it back (it leaves the withdrawn list)."""
    ver = Version.parse(version)

    def make(repo: Repository, old: Channel | None) -> Channel:
        path = _published(storage, repo, product, ver)
        withdrawn = tuple(w for w in (old.withdrawn if old else ()) if Version.parse(w) != ver)
        return Channel(product, channel, ver, path, rollout=rollout, withdrawn=withdrawn)

    return _update(storage, keys, product, channel, make, now)


def set_rollout(storage: Storage, keys: KeyConfig, *, product: str, channel: str, percent: int | None = None,
                paused: bool | None = None, now: datetime | None = None) -> ChannelResult:
    """Widen (or narrow), pause or resume the channel's current rollout; the version stays.
    A channel without a rollout is at 100 %."""
    def make(repo: Repository, old: Channel | None) -> Channel:
        if old is None:
            raise UserError(f"{product} has no channel {channel!r}", hint="promote a release to it first")
        cur = old.rollout or Rollout(100)
        new = make_rollout(cur.percent if percent is None else percent,
                           paused=cur.paused if paused is None else paused, seed=cur.seed)
        return replace(old, rollout=new)

    return _update(storage, keys, product, channel, make, now)


def withdraw(storage: Storage, keys: KeyConfig, *, product: str, version: str, channel: str,
             back_to: str | None = None, now: datetime | None = None) -> ChannelResult:
    """Pull ``version`` from ``channel``: devices never start it, a device that staged it discards
    the stage, a device running it keeps it and says so. ``back_to``: point the channel at that
    published version (to every device); without it a withdrawn current version stays named
    but is offered to nobody."""
    ver = Version.parse(version)
    back = Version.parse(back_to) if back_to is not None else None
    if back is not None and back == ver:
        raise UserError(f"--back-to {back_to} is the version being withdrawn", hint="name an earlier good release")

    def make(repo: Repository, old: Channel | None) -> Channel:
        if old is None:
            raise UserError(f"{product} has no channel {channel!r}", hint="check the product and channel")
        if not old.is_withdrawn(ver) and ver not in published_versions(repo, product):
            raise UserError(f"{product} {ver} was never published in {storage.describe()} (or gc removed it): there "
                            "is nothing to withdraw", hint="check the version ('abflip channel show'); nothing was "
                                                           "changed")
        withdrawn = old.withdrawn if old.is_withdrawn(ver) else (*old.withdrawn, str(ver))
        if len(withdrawn) > MAX_WITHDRAWN:
            raise UserError(f"channel {channel} already lists {MAX_WITHDRAWN} withdrawn versions",
                            hint="that is the limit devices accept; nothing was changed")
        if back is not None:
            if old.is_withdrawn(back):
                raise UserError(f"--back-to {back} was withdrawn from {channel} too",
                                hint="name a release that is not withdrawn")
            return Channel(product, channel, back, _published(storage, repo, product, back), withdrawn=withdrawn)
        return replace(old, withdrawn=withdrawn)

    return _update(storage, keys, product, channel, make, now)


def channel_states(storage: Storage, product: str | None = None) -> list[dict]:
    """Every channel (of ``product``, or of every product) as its newest signed pointer says:
    version, rollout (``None``: every device), withdrawn versions, and whether devices see it
    yet (``visible``: the snapshot names the product role that lists it). What ``abflip channel
    show/list`` print; read-only, no keys."""
    repo, _ = load_tagged(storage)
    held = repo.unavailable_products()
    products = sorted({p.split("/", 1)[0] for p in repo.target_files if "/channels/" in p} | set(held)
                      | {n for n in repo.delegated if n not in repo.bins})
    if product is not None:
        check_name("product", product)
        products = [p for p in products if p == product]
        if not products:
            raise UserError(f"the repository has no product {product!r}",
                            hint="'abflip channel list --repo …' lists every product's channels")
    meta = repo.snapshot.signed.meta
    rows: list[dict] = []
    for p in products:
        if p in held:
            rows.append({"product": p, "channel": None, "problem": f"its metadata cannot be loaded: {held[p]}"})
            continue
        role = repo.delegated.get(p)
        visible = role is None or meta.get(f"{p}.json") is not None and meta[f"{p}.json"].version == role.signed.version
        for path in sorted(t for t in repo.target_files if t.startswith(f"{p}/channels/") and t.endswith(".json")):
            name = path[len(f"{p}/channels/"):-len(".json")]
            row: dict = {"product": p, "channel": name, "visible": visible}
            try:
                ptr = current_pointer(storage, repo, p, name)
            except (UserError, RepositoryError, StorageError) as e:
                rows.append({**row, "problem": e.message})
                continue
            assert ptr is not None
            rollout = ptr.rollout or Rollout(100)
            rows.append({**row, "version": str(ptr.version), "release": ptr.release, "phased": ptr.rollout is not None,
                         "percent": rollout.percent, "paused": rollout.paused, "seed": rollout.seed,
                         "withdrawn": list(ptr.withdrawn)})
    return rows
