"""Move a channel pointer to a release that is already published.

A channel is one small target, ``<product>/channels/<channel>.json``, naming a version and the
target path of its ``release.json``. Promoting writes a new pointer (hash-prefixed, so a new
object) and re-signs targets, snapshot and timestamp; the image and boot files are not
touched. Same publish order and race handling as :mod:`builder.publish`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from tuf.api.metadata import TargetFile

from metadata.errors import UserError
from metadata.keys import KeyConfig
from metadata.manifest import Channel, Release, channel_target_path, check_name, release_target_dir
from metadata.version import Version

from .errors import StorageError
from .publish import IMMUTABLE, RETRIES, commit, load_tagged, target_key
from .storage import Storage

__all__ = ["promote", "PromoteResult"]


@dataclass(frozen=True)
class PromoteResult:
    product: str
    version: str
    channel: str
    previous: str | None
    changed: bool
    timestamp_version: int


def promote(storage: Storage, keys: KeyConfig, *, product: str, version: str, channel: str,
            now: datetime | None = None) -> PromoteResult:
    check_name("product", product)
    check_name("channel", channel)
    ver = Version.parse(version)
    release_path = f"{release_target_dir(product, str(ver))}/release.json"
    pointer = Channel(product, channel, ver, release_path).to_bytes()
    target = TargetFile.from_data(channel_target_path(product, channel), pointer, ["sha256"])
    for attempt in range(RETRIES):
        repo, tag = load_tagged(storage)
        rel = repo.target_files.get(release_path)
        if rel is None:
            raise UserError(f"{product} {ver} is not published in {storage.describe()}",
                            hint="publish it first ('abflip publish'), or check the product and version")
        data = storage.get(target_key(rel))
        if data is None:
            raise StorageError(f"the release manifest of {product} {ver} is listed but its object is missing")
        Release.from_bytes(data)  # a pointer must never name a manifest that does not parse
        old = repo.target_files.get(target.path)
        previous = None
        if old is not None:
            prev_data = storage.get(target_key(old))
            previous = str(Channel.from_bytes(prev_data).version) if prev_data else None
            if old.hashes == target.hashes and repo.is_current:
                return PromoteResult(product, str(ver), channel, previous, False, repo.timestamp.signed.version)
        key = target_key(target)
        if not storage.exists(key):
            storage.put(key, pointer, content_type="application/json", cache_control=IMMUTABLE)
        repo.add_target(target)
        if commit(storage, keys, repo, tag, now=now):
            return PromoteResult(product, str(ver), channel, previous, True, repo.timestamp.signed.version)
        time.sleep(min(0.05 * (attempt + 1), 1.0))
    raise StorageError(f"gave up promoting after {RETRIES} conflicting concurrent publishes",
                       hint="retry; the repository is consistent")
