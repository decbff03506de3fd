"""The repository's online signer: the only holder of the snapshot and timestamp keys.

Product CIs sign and upload only their delegated role's metadata and their targets
(``abflip publish`` with a keys directory holding one product key). This job, run by the
repository (scheduled, and triggered after a product publishes; keys in KMS in production),
makes their work visible:

1. load the repository: root chain, timestamp, the newest snapshot and targets, and for every
   delegated role its newest metadata *that passes its delegation's checks* — signed to the
   threshold by the delegation's keys, version = file name, every target under the
   delegation's paths, no further delegation but, for a product with hash bins, exactly its
   bins; each bin signed by the product's keys and listing only paths that hash to it
   (``metadata.repository``: a candidate that fails is skipped and reported, never included,
   never fatal);
2. sign ``N.snapshot.json`` (create-only, above any file already there) naming those versions;
   never a version lower than the snapshot named before (no rollback);
3. compare-and-swap ``timestamp.json`` to name it, then settle it (a concurrent signer's older
   timestamp never wins).

So a compromised product key can publish bad releases *of its own product* only: it cannot
freeze, roll back or hide another product's releases, and cannot push timestamp or snapshot
versions (docs/release-control.md, tests/test_online_signer.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from metadata.keys import KeyConfig
from metadata.errors import UserError

from .errors import AlreadyExists, StorageError
from .publish import RETRIES, load_tagged, settle_timestamp, write_signed
from .storage import Storage

__all__ = ["sign_online", "SignerResult"]


@dataclass(frozen=True)
class SignerResult:
    signed: tuple[str, ...]  # files written ("7.snapshot.json", "timestamp.json"); empty: nothing due
    included: dict[str, int]  # role -> version the snapshot names (delegated roles and targets)
    newly_included: dict[str, int] = field(default_factory=dict)  # roles whose version moved with this run
    skipped: tuple[str, ...] = ()  # candidate metadata refused, and why
    timestamp_version: int = 0
    kept: dict[str, str] = field(default_factory=dict)  # product -> why it stays at the version the snapshot names


def sign_online(storage: Storage, keys: KeyConfig, *, now: datetime | None = None,
                force: bool = False) -> SignerResult:
    """Snapshot every role's newest checked metadata and sign a timestamp for it when anything
    is new, when the snapshot or timestamp is within half its period of expiry, or ``force``."""
    for attempt in range(RETRIES):
        repo, tag = load_tagged(storage, now=now)
        for r in ("snapshot", "timestamp"):
            if (problem := repo.signing_problem(r, keys)) is not None:
                raise UserError(problem, hint=f"the online signer's keys directory ({keys.dir}) must hold the "
                                              "snapshot and timestamp keys (docs/keys.md); nothing was signed")
        before = {name[:-5]: m.version for name, m in repo.snapshot.signed.meta.items()}
        files = repo.refresh_files(keys, now=now, force=force)
        included = {name[:-5]: m.version for name, m in repo.snapshot.signed.meta.items()}
        moved = {r: v for r, v in included.items() if before.get(r) != v}
        if not files:
            return SignerResult((), included, {}, tuple(repo.skipped), repo.timestamp.signed.version,
                                repo.unavailable_products())
        try:
            write_signed(storage, [f for f in files if f.name != "timestamp.json"])
        except AlreadyExists:
            time.sleep(min(0.05 * (attempt + 1), 1.0))  # another signer won; re-read
            continue
        try:
            write_signed(storage, [f for f in files if f.name == "timestamp.json"], timestamp_tag=tag)
        except AlreadyExists:
            pass
        settle_timestamp(storage, keys, now)
        return SignerResult(tuple(f.name for f in files), included, moved, tuple(repo.skipped),
                            repo.timestamp.signed.version, repo.unavailable_products())
    raise StorageError(f"gave up signing a snapshot after {RETRIES} conflicting concurrent signers",
                       hint="retry; the repository is consistent")
