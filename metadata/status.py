"""What a release engineer needs to see of a repository: per role its version, expiry,
threshold and the keys that signed it; staged changes and the signatures they still lack.
Pure over a metadata reader (no printing); the CLI renders it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from tuf.api.metadata import Metadata

from .keys import ONLINE_ROLES, TOP_ROLES, KeyConfig
from .repository import Reader, Repository, signature_report

__all__ = ["repository_status", "expiry_warnings", "expired_roles"]


def _role_status(repo: Repository, name: str, now: datetime) -> dict:
    md = repo.role(name)
    result = repo.verification(name)
    keys, threshold = repo.role_keys(name)
    signed = sorted(result.signed)
    return {"role": name, "version": md.signed.version, "expires": md.signed.expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "expired": md.signed.is_expired(now), "threshold": threshold, "keyids": sorted(keys),
            "signed": signed, "verified": result.verified,
            "online": name in ONLINE_ROLES or name not in TOP_ROLES}


def repository_status(read: Reader, keys_dir: Path | None = None, *, now: datetime | None = None) -> dict:
    now = now or datetime.now(timezone.utc)
    repo = Repository.load(read)
    roles = [_role_status(repo, r, now) for r in TOP_ROLES]
    roles += [_role_status(repo, r, now) for r in sorted(repo.delegated) if repo.delegated[r].signed.version > 0]
    out: dict = {"roles": roles}
    if keys_dir is not None:
        from .staging import staged_files

        out["staged"] = [_staged_status(repo, p) for p in staged_files(keys_dir)]
    return out


def _staged_status(repo: Repository, path: Path) -> dict:
    from .staging import _load

    md = _load(path)
    role = path.name.split(".", 1)[1][: -len(".json")]
    if role == "root":
        result = md.signed.get_root_verification_result(repo.root.signed, md.signed_bytes, md.signatures)
    else:
        result = (repo.root if role == "targets" else repo.targets).signed.get_verification_result(
            role, md.signed_bytes, md.signatures)
    return {"file": str(path), "role": role, "version": md.signed.version, "verified": result.verified,
            "signed": sorted(result.signed), "needs": "" if result.verified else signature_report(role, result, md.signed.version)}


def expiry_warnings(repo: Repository, config: KeyConfig, *, now: datetime | None = None) -> list[str]:
    """Offline roles the schedule cannot re-sign, expiring within a third of their period."""
    now = now or datetime.now(timezone.utc)
    out = []
    for name in ("root", "targets"):
        exp = repo.role(name).signed.expires
        if exp - now <= timedelta(days=config.expiry(name)) / 3:
            out.append(f"{name} v{repo.role(name).signed.version} expires {exp:%Y-%m-%d %H:%M} UTC: "
                       "its key holders must re-sign it (abflip repo rotate with no change, then sign and commit)")
    return out


def expired_roles(repo: Repository, *, now: datetime | None = None) -> list[str]:
    """Every role that has already expired, with what re-signs it: devices refuse any update
    while one of them is (a delegated role: that product's updates)."""
    now = now or datetime.now(timezone.utc)
    out = []
    names = [*TOP_ROLES, *sorted(n for n in repo.delegated if repo.delegated[n].signed.version > 0)]
    for name in names:
        md = repo.role(name)
        if not md.signed.is_expired(now):
            continue
        when = f"{name} v{md.signed.version} expired {md.signed.expires:%Y-%m-%d %H:%M} UTC"
        if name in ("root", "targets"):
            out.append(f"{when}: its key holders must re-sign it (abflip repo rotate {name} with no change, then "
                       "sign and commit)")
        elif name in ONLINE_ROLES:
            out.append(f"{when}: re-sign it with its key (abflip repo refresh, or the online signer's abflip repo "
                       "snapshot)")
        else:
            out.append(f"{when}: re-sign it with {repo.key_role(name)}'s key (abflip repo refresh --keys holding it, "
                       "or the product's next publish)")
    return out
