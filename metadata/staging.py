"""Offline, multi-party changes: stage, sign by each key holder, commit.

A change to an offline role (root: keys, thresholds, rotations, revocations; targets:
delegations) is never published directly. It is written *staged* into the keys directory:

    <keys>/staged/<version>.<role>.json      e.g. staged/4.root.json, staged/7.targets.json

signed there by whatever keys of the role this machine holds, and then carried to the other
key holders, who each run ``abflip repo sign <file> --key <uri-or-keyfile>`` (a signature is
appended; nothing else changes). The staged file names every key that may sign it: each one
that has not signed yet holds an empty signature, so ``repo sign`` refuses a key that is none of
them (on a holder's machine, without the repository); ``repo commit`` publishes only the real
signatures. ``abflip repo commit`` refuses a staged file below its
threshold, naming the role, how many signatures are missing and from which keyids; once all
are met it publishes the staged roots, targets and delegated roles, then a new snapshot and
timestamp signed with the online keys.

A new root must be signed by the threshold of the *previous* root and by its own (TUF 5.3.4),
which is what lets a device that trusts an old root follow each rotation.

A product delegation's hash bins (:mod:`metadata.repository`) are part of the delegation: their
number is set in targets here (``stage_delegation``, ``stage_bins``), and they follow the product's
keys (a rotation of the product re-signs its role and every bin).
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

from securesystemslib.signer import Key, Signature, Signer
from tuf.api.metadata import Metadata, Root, Targets
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from .bounded import json_depth_problem, read_file
from .errors import UserError
from .keys import TOP_ROLES, KeyConfig, RoleKeys
from .repository import (
    DEFAULT_BIN_BITS,
    MAX_METADATA_BYTES,
    Repository,
    SignedFile,
    add_delegation,
    bin_bits,
    empty_role,
    set_bin_bits,
    signature_report,
)

__all__ = ["staged_files", "stage", "sign_staged", "check_rotatable", "stage_rotation", "stage_delegation", "stage_bins",
           "commit_staged", "STAGED_DIR"]

STAGED_DIR = "staged"
_NAME = re.compile(r"^(\d+)\.([A-Za-z0-9_.-]+)\.json$")


def staged_files(keys_dir: Path) -> list[Path]:
    """Staged metadata in publish order: roots by version, then targets, then delegated roles."""
    d = Path(keys_dir) / STAGED_DIR
    if not d.is_dir():
        return []
    found = [(p, _NAME.match(p.name)) for p in d.iterdir()]
    order = {"root": 0, "targets": 1}
    return [p for p, m in sorted(((p, m) for p, m in found if m),
                                 key=lambda pm: (order.get(pm[1][2], 2), pm[1][2], int(pm[1][1])))]


def _write(path: Path, md: Metadata) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(md.to_bytes(JSONSerializer(compact=False)))
    os.replace(tmp, path)


def stage(keys_dir: Path, md: Metadata, role: str) -> Path:
    path = Path(keys_dir) / STAGED_DIR / f"{md.signed.version}.{role}.json"
    _write(path, md)
    return path


def _load(path: Path) -> Metadata:
    """A staged file (carried between key holders: anyone's bytes), bounded as devices bound
    root and targets (:data:`metadata.repository.MAX_METADATA_BYTES`)."""
    try:
        data = read_file(path, MAX_METADATA_BYTES["targets"])
        if (problem := json_depth_problem(data)) is not None:
            raise DeserializationError(problem)
        return Metadata.from_bytes(data)
    except FileNotFoundError:
        raise UserError(f"no staged metadata at {path}",
                        hint="pass a file of <keys>/staged/ (repo rotate, delegate and bins stage them)") from None
    except OSError as e:  # also FileRefused
        raise UserError(f"cannot read staged metadata {path}: {e.strerror or e}",
                        hint="pass a file of <keys>/staged/ (repo rotate, delegate and bins stage them)") from None
    except DeserializationError as e:
        raise UserError(f"{path} is not TUF metadata: {e}",
                        hint="pass a file of <keys>/staged/ as it was staged (stage the change again if it was "
                             "damaged)") from None


def _signed(md: Metadata) -> list[str]:
    """Keyids of the real signatures (not the empty ones naming who may still sign)."""
    return sorted(k for k, sig in md.signatures.items() if sig.signature)


def _expect(md: Metadata, keyids) -> None:
    """Name every key that may sign ``md`` in it: an empty signature for each one not signed yet."""
    for kid in sorted(keyids):
        md.signatures.setdefault(kid, Signature(kid, ""))


def _may_sign(md: Metadata, role: str) -> set[str] | None:
    """The keys that may sign a staged file, as it names them; None: it does not say (a file
    staged before the names were written, other than a root)."""
    if any(not sig.signature for sig in md.signatures.values()):
        return set(md.signatures)
    if role == "root" and isinstance(md.signed, Root):
        return set(md.signatures) | set(md.signed.roles["root"].keyids)
    return None


def sign_staged(path: Path, signer: Signer) -> dict:
    """Add ``signer``'s signature to a staged file (the signed part is not touched). A key the
    file does not name as one of its signers is refused, and the file left as it was."""
    md = _load(path)
    m = _NAME.match(Path(path).name)
    role = m[2] if m else md.signed.type
    keyid = signer.public_key.keyid
    allowed = _may_sign(md, role)
    if allowed is not None and keyid not in allowed:
        raise UserError(f"key {keyid[:12]} is not a key that signs {Path(path).name} ({role} v{md.signed.version}); "
                        f"its signers: {', '.join(k[:12] for k in sorted(allowed))}",
                        hint="sign with one of those keys (docs/keys.md); the staged file is unchanged")
    md.sign(signer, append=True)
    _write(Path(path), md)
    return {"file": str(path), "role": role, "version": md.signed.version, "keyid": keyid,
            "signatures": _signed(md)}


def _sign_available(md: Metadata, config: KeyConfig, role: str, keys: dict[str, Key]) -> list[str]:
    """Append signatures of every key of ``keys`` that ``config`` can reach; return their keyids."""
    done = []
    for s in config.signers(role, keys):
        md.sign(s, append=True)
        done.append(s.public_key.keyid)
    return done


def _root_keys(root: Root) -> dict[str, Key]:
    return {kid: root.keys[kid] for kid in root.roles["root"].keyids}


def check_rotatable(repo: Repository, role: str) -> None:
    """A role whose keys can be rotated: a top-level or product role (not a hash bin)."""
    if role in repo.bins:
        raise UserError(f"{role} is a hash bin of {repo.bins[role]}: it is signed with its product's keys",
                        hint=f"rotate the keys of {repo.bins[role]}; its bins follow")
    repo.role(role)  # raises for an unknown role


def stage_rotation(repo: Repository, config: KeyConfig, role: str, *, add: list[tuple[Key, str]] = (),
                   revoke: list[str] = (), threshold: int | None = None,
                   now: datetime | None = None) -> list[Path]:
    """Stage new keys / revocations / a new threshold for ``role``.

    A top-level role changes root (staged ``N+1.root.json``, signed here by the old and the
    new root keys this machine holds); a delegated role changes targets (``N+1.targets.json``).
    New key URIs are added to keys.json now; revoked ones are dropped from it.
    """
    now = now or datetime.now(timezone.utc)
    check_rotatable(repo, role)
    if role in TOP_ROLES:
        md = repo.next_root(now=now, days=config.expiry("root"))
        holder, days_role = md.signed, "root"
    else:
        md = repo.next_targets(now=now, days=config.expiry("targets"))
        holder, days_role = md.signed, "targets"
    current, _ = repo.role_keys(role)
    revoked: set[str] = set()
    for kid in revoke:
        if kid not in current:
            match = [k for k in current if k.startswith(kid)]
            if len(match) != 1:
                raise UserError(f"{kid} is not a key of role {role}", hint=f"its keyids: {', '.join(sorted(current))}")
            kid = match[0]
        holder.revoke_key(kid, role)
        revoked.add(kid)
    for key, _uri in add:
        holder.add_key(key, role)
    r = holder.roles[role] if role in TOP_ROLES else holder.delegations.roles[role]
    if threshold is not None:
        r.threshold = threshold
    if not 1 <= r.threshold <= len(r.keyids):
        raise UserError(f"role {role} would have threshold {r.threshold} with {len(r.keyids)} key(s)",
                        hint="add keys or lower the threshold")
    # keys.json: learn the new URIs (before signing: a new root key signs the new root), drop
    # the revoked ones (they still sign the handover below, from the configuration as it was)
    entries = [k for k in config.roles.get(role, []) if k.keyid not in revoked]
    entries += [RoleKeys(key.keyid, uri) for key, uri in add if key.keyid not in {k.keyid for k in entries}]
    if days_role == "root":
        signing = {**_root_keys(repo.root.signed), **_root_keys(md.signed)}
        _sign_available(md, _with(config, role, entries) if role == "root" else config, "root", signing)
        _expect(md, signing)  # the previous root's keys and the new root's
    else:
        keys, _ = repo.role_keys("targets")
        _sign_available(md, config, "targets", keys)
        _expect(md, keys)
    path = stage(config.dir, md, days_role)
    config.roles[role] = entries
    config.save()
    return [path]


def _with(config: KeyConfig, role: str, entries: list[RoleKeys]) -> KeyConfig:
    c = KeyConfig(config.path, dict(config.roles), config.expiry_days)
    c.roles[role] = [*config.roles.get(role, []), *entries]
    return c


def stage_delegation(repo: Repository, config: KeyConfig, product: str, keys: list[tuple[Key, str]], *,
                     threshold: int = 1, bits: int = DEFAULT_BIN_BITS, now: datetime | None = None) -> list[Path]:
    """Stage targets N+1 delegating ``<product>/*`` to a role named ``product`` with ``keys``,
    with 2^``bits`` hash bins (0: none).

    The product's targets already in top-level targets move to the new role on commit."""
    now = now or datetime.now(timezone.utc)
    if product in TOP_ROLES:
        raise UserError(f"{product!r} is the name of a top-level role", hint="choose another product name")
    if not keys:
        raise UserError("a delegation needs at least one key", hint="pass --key URI (or --generate)")
    if not 1 <= threshold <= len(keys):
        raise UserError(f"threshold {threshold} with {len(keys)} key(s)", hint="a threshold from 1 to the number of keys")
    md = repo.next_targets(now=now, days=config.expiry("targets"))
    role = add_delegation(md, product, [k for k, _ in keys], threshold, bits=bits)
    for path in [p for p in md.signed.targets if role.is_delegated_path(p)]:
        del md.signed.targets[path]
    _sign_available(md, config, "targets", repo.role_keys("targets")[0])
    _expect(md, repo.role_keys("targets")[0])
    staged = stage(config.dir, md, "targets")
    config.roles[product] = [RoleKeys(k.keyid, uri) for k, uri in keys]
    config.save()
    return [staged]


def stage_bins(repo: Repository, config: KeyConfig, product: str, bits: int, *,
               now: datetime | None = None) -> list[Path]:
    """Stage targets N+1 giving an existing product without bins 2^``bits`` hash bins. Its role
    moves its releases into them the next time the product's key signs it (a publish or a
    channel change); until then it works as before."""
    now = now or datetime.now(timezone.utc)
    roles = repo.targets.signed.delegations.roles if repo.targets.signed.delegations else None
    if not roles or product not in roles:
        raise UserError(f"{product} is not a delegated product", hint="delegate it with 'abflip repo delegate'")
    if bin_bits(roles[product]):
        raise UserError(f"{product} already has {1 << bin_bits(roles[product])} hash bins",
                        hint="changing the number of bins of a product is not supported")
    if not bits:
        raise UserError(f"{product} has no hash bins already", hint="pass --bin-bits 1 or more")
    md = repo.next_targets(now=now, days=config.expiry("targets"))
    set_bin_bits(md.signed, product, bits)
    _sign_available(md, config, "targets", repo.role_keys("targets")[0])
    _expect(md, repo.role_keys("targets")[0])
    return [stage(config.dir, md, "targets")]


def commit_staged(repo: Repository, config: KeyConfig, *, now: datetime | None = None) -> list[SignedFile]:
    """Check every staged file against its threshold and return what to publish, in order:
    roots, targets, delegated roles (moved targets, re-signed after a key change), snapshot,
    timestamp. Raises :class:`UserError` naming the role, the missing count and keyids."""
    now = now or datetime.now(timezone.utc)
    files = staged_files(config.dir)
    if not files:
        raise UserError(f"nothing is staged in {config.dir / STAGED_DIR}: there is nothing to commit",
                        hint="stage a change first ('abflip repo rotate', 'delegate' or 'bins'), or pass the --keys "
                             "directory it was staged in")
    out: list[SignedFile] = []
    old_targets = repo.targets
    for path in files:
        md = _load(path)
        md.signatures = {k: sig for k, sig in md.signatures.items() if sig.signature}  # published: real ones only
        role = _NAME.match(path.name)[2]
        current = repo.role(role) if role in ("root", "targets") or role in repo.delegated else None
        if current is not None and md.signed.version != current.signed.version + 1:
            raise UserError(f"staged {path.name} is not the next version of {role} (the repository is at "
                            f"v{current.signed.version})", hint="the repository changed since: stage the change again")
        if role == "root":
            if not isinstance(md.signed, Root):
                raise UserError(f"{path.name} is not root metadata")
            result = md.signed.get_root_verification_result(repo.root.signed, md.signed_bytes, md.signatures)
            if not result.verified:
                raise UserError(signature_report("root", result, md.signed.version),
                                hint=f"each key holder runs 'abflip repo sign {path} --key ...'")
            repo.root = md
            repo.root_history.append(md)
            out.append(SignedFile(f"{md.signed.version}.root.json", md.to_bytes(), True))
            continue
        if not isinstance(md.signed, Targets):
            raise UserError(f"{path.name} is not targets metadata")
        delegator = repo.root if role == "targets" else repo.targets
        result = delegator.signed.get_verification_result(role, md.signed_bytes, md.signatures)
        if not result.verified:
            raise UserError(signature_report(role, result, md.signed.version),
                            hint=f"each key holder runs 'abflip repo sign {path} --key ...'")
        if role == "targets":
            repo.targets = md
        else:
            repo.delegated[role] = md
        out.append(SignedFile(f"{md.signed.version}.{role}.json", md.to_bytes(), True))
    if "targets" not in {_NAME.match(p.name)[2] for p in files} and not repo.verification("targets").verified:
        repo.mark_changed("targets")  # its keys changed in root: re-sign with the new keys configured here
    # delegated roles after a targets change: new ones (with the targets they take over),
    # removed ones, and ones whose keys changed (re-signed with the keys configured here; a
    # product's bins are re-signed with it)
    roles = repo.targets.signed.delegations.roles if repo.targets.signed.delegations else {}
    for name in list(repo.delegated):
        if repo.key_role(name) not in roles:
            del repo.delegated[name]
            repo.bins.pop(name, None)
    for name, role in roles.items():
        new = name not in repo.delegated
        md = repo.delegated.setdefault(name, empty_role(repo.targets.signed.expires))
        repo.adopt_bins(name)  # the bins targets now gives it: empty until first signed
        if new:
            moved = {p: t for p, t in old_targets.signed.targets.items()
                     if role.is_delegated_path(p) and p not in repo.targets.signed.targets}
            if moved:  # into the role, or its bins and (no pointer is read here: all of it current) the role
                for t in moved.values():
                    repo.add_target(t)
                if repo.has_bins(name):
                    repo.set_current(name, {p.rsplit("/", 1)[0] + "/" for p in moved})
        elif md.signed.version > 0 and not repo.verification(name).verified:
            repo.mark_changed(name)
    try:
        out += repo.signed_files(config, now=now)
    except UserError as e:
        raise UserError(f"cannot re-sign after the staged change: {e.message}", hint=e.hint) from None
    return out


def clear_staged(keys_dir: Path) -> None:
    for p in staged_files(keys_dir):
        p.unlink()
