"""Repository commands: init, status, delegate, bins, rotate, sign, commit, refresh, snapshot (the online signer).

Offline changes (rotate, delegate) are staged in ``<keys>/staged/`` and signed there with the
keys this machine holds; other key holders add theirs with ``repo sign``; ``repo commit``
publishes once every threshold is met (see docs/keys.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Optional

import typer

from ._common import JSON_OPT, repo_app, run
from .producer import ENDPOINT_OPT, PROFILE_OPT, REGION_OPT

REPO_OPT = typer.Option(..., "--to", help="repository: a directory or s3://bucket/prefix")
KEYS_OPT = typer.Option(..., "--keys", help="keys directory (keys.json, key files, staged/)")


def _role_numbers(values: list[str], what: str) -> dict[str, int]:
    from metadata.errors import UserError

    out = {}
    for v in values:
        role, sep, n = v.partition("=")
        if not sep or not n.strip().isdigit() or int(n) < 1:
            raise UserError(f"--{what} {v!r}: expected ROLE=N with N >= 1", hint=f"e.g. --{what} root=2")
        out[role.strip()] = int(n)
    return out


S3 = tuple[Optional[str], Optional[str], Optional[str]]  # --endpoint-url, --region, --profile


def _storage(location: str, s3: S3, *, new: bool = False):
    """A directory or s3://bucket/prefix (:func:`.producer.storage_for`); the S3 options default
    to ABFLIP_ENDPOINT_URL, ABFLIP_REGION, ABFLIP_PROFILE (credentials from boto3's chain)."""
    from .producer import storage_for

    return storage_for(location, *s3, new=new)


def _reader(location: str, s3: S3):
    """Metadata reader of a repository: an http(s) URL (read-only), a directory or s3://."""
    if location.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        from metadata.errors import TransportError

        base = location.rstrip("/") + "/metadata/"

        def read(name: str) -> bytes | None:
            try:
                with urllib.request.urlopen(base + name, timeout=30) as r:
                    return r.read(1 << 22)
            except urllib.error.HTTPError as e:
                if e.code in (403, 404):
                    return None
                raise TransportError(f"{base + name}: HTTP {e.code}") from None
            except OSError as e:
                raise TransportError(f"{base + name}: {e}") from None
        return read
    from builder.publish import MetadataOf

    return MetadataOf(_storage(location, s3))


def _sign_and_write(location: str, s3: S3, keys, make) -> list:
    """Load the repository with its timestamp tag, ``make(repo)`` the signed files, write them:
    versioned files create-only, ``timestamp.json`` compare-and-swapped (builder.publish), so a
    publish racing this command is never undone; a lost race re-reads and tries again."""
    import time

    from builder.errors import AlreadyExists, StorageError
    from builder.publish import RETRIES, load_tagged, settle_timestamp, write_signed

    storage = _storage(location, s3)
    for attempt in range(RETRIES):
        repo, tag = load_tagged(storage)
        files = make(repo)
        if not files:
            return []
        try:
            write_signed(storage, files[:-1])
        except AlreadyExists:
            time.sleep(min(0.05 * (attempt + 1), 1.0))
            continue
        try:
            write_signed(storage, files[-1:], timestamp_tag=tag)
        except AlreadyExists:
            pass  # another timestamp went in since we read it: make sure the newest snapshot is named
        settle_timestamp(storage, keys, None)
        return files
    raise StorageError(f"gave up after {RETRIES} conflicting concurrent writes", hint="retry")


@contextlib.contextmanager
def _undo_new_keys(keys: Path):
    """On failure, remove what the command (``repo init``, a key generated for ``delegate`` or
    ``rotate``) added to the keys directory (the directory too, if it made it), so a retry starts
    clean; files that were there before are never touched."""
    existed = keys.is_dir()
    before = set(os.listdir(keys)) if existed else set()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(keys, ignore_errors=True)
        elif keys.is_dir():
            for name in set(os.listdir(keys)) - before:
                path = keys / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink()
        raise


@repo_app.command("init")
def repo_init(
    keys: Path = typer.Option(..., help="directory for the new keys (private keys are written 0600)"),
    to: str = REPO_OPT,
    threshold: list[str] = typer.Option([], help="ROLE=N signatures needed (default 1), e.g. root=2"),
    keys_per_role: list[str] = typer.Option([], "--keys-per-role", help="ROLE=N keys to generate, e.g. root=3"),
    key: list[str] = typer.Option([], help="ROLE=URI: use an existing key (file2:/path, awskms:id, key file)"),
    expiry: list[str] = typer.Option([], help="ROLE=DAYS expiry period (root, targets, snapshot, timestamp, delegated)"),
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Create signing keys and the first signed metadata of a repository."""
    from builder.errors import AlreadyExists
    from builder.publish import write_signed
    from metadata.errors import UserError
    from metadata.keys import TOP_ROLES
    from metadata.repository import RoleSpec, init_repository

    def go() -> dict:
        th = _role_numbers(threshold, "threshold")
        n = _role_numbers(keys_per_role, "keys-per-role")
        uris: dict[str, list[str]] = {}
        for v in key:
            role, sep, uri = v.partition("=")
            if not sep:
                raise UserError(f"--key {v!r}: expected ROLE=URI", hint="e.g. --key snapshot=awskms:<key id> or "
                                                                         "--key root=/media/token/root.pem")
            uris.setdefault(role, []).append(uri)
        days = _role_numbers(expiry, "expiry")
        for r in [*th, *n, *uris]:
            if r not in TOP_ROLES:
                raise UserError(f"unknown role {r!r}", hint=f"roles: {', '.join(TOP_ROLES)}")
        specs = {r: RoleSpec(keys=n.get(r, max(1, th.get(r, 1)) if not uris.get(r) else 0),
                             threshold=th.get(r, 1), uris=tuple(uris.get(r, ()))) for r in TOP_ROLES}
        if keys.exists() and not keys.is_dir():
            raise UserError(f"--keys {keys} is a file; repo init writes a new keys directory there",
                            hint="pass a directory that does not exist yet (or is empty); nothing was created")
        storage = _storage(to, (endpoint_url, region, profile), new=True)
        if storage.exists("metadata/1.root.json") or storage.exists("metadata/timestamp.json"):
            raise UserError(f"{to} already holds a repository (metadata/1.root.json)",
                            hint="nothing was created; pass another --to for a new repository, or change the keys of "
                                 "this one with 'abflip repo rotate' (docs/keys.md)")
        with _undo_new_keys(keys):
            files = init_repository(keys, roles=specs, expiry_days=days)
            try:
                write_signed(storage, files, new=True)
            except AlreadyExists:
                raise UserError(f"{to} already holds a repository (another 'repo init' wrote it first)",
                                hint="nothing was created; pass another --to") from None
        return {"keys": str(keys), "repository": to, "files": [f.name for f in files]}

    run(go, as_json, lambda r: f"initialised {r['repository']} ({', '.join(r['files'])}); keys in {r['keys']} "
                                "(root.json to ship on devices: metadata/1.root.json)")


@repo_app.command("status")
def repo_status(
    repo: str = typer.Option(..., "--repo", help="repository: http(s) URL, directory or s3://bucket/prefix"),
    keys: Path = typer.Option(None, "--keys", help="also show the staged changes in this keys directory"),
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Each role's version, expiry, threshold and signatures; staged changes and what they lack."""
    from metadata.errors import UserError
    from metadata.status import repository_status

    def go() -> dict:
        if keys is not None and not (keys / "keys.json").is_file():
            raise UserError(f"--keys {keys} holds no key configuration (keys.json)",
                            hint="pass the keys directory of 'abflip repo init', or leave --keys out")
        return repository_status(_reader(repo, (endpoint_url, region, profile)), keys)

    run(go, as_json, _render_status)


def _render_status(st: dict) -> str:
    lines = [f"{'role':<14} {'version':>7}  {'expires':<20} {'signatures':<18}  keyids signed (of trusted)"]
    for r in st["roles"]:
        flag = "" if r["verified"] else "  BELOW THRESHOLD"
        flag += "  EXPIRED" if r["expired"] else ""
        sigs = f"{len(r['signed'])} of {r['threshold']} needed"
        lines.append(f"{r['role']:<14} {r['version']:>7}  {r['expires']:<20} {sigs:<18}  "
                     f"{', '.join(k[:12] for k in r['signed']) or 'none'} (of {', '.join(k[:12] for k in r['keyids'])})"
                     f"{flag}")
    for s in st.get("staged", []):
        lines.append(f"staged {s['file']}: " + ("ready to commit" if s["verified"] else s["needs"]))
    return "\n".join(lines)


@repo_app.command("sign")
def repo_sign(
    staged: Path = typer.Argument(..., help="a staged metadata file (<keys>/staged/N.role.json)"),
    key: str = typer.Option(..., help="private key: a key file or signer URI (file2:, awskms:, ...)"),
    as_json: bool = JSON_OPT,
) -> None:
    """Add one key holder's signature to a staged change (run on the key holder's machine)."""
    from metadata.keys import signer_from
    from metadata.staging import sign_staged

    def go() -> dict:
        signer, _ = signer_from(key)
        return sign_staged(staged, signer)

    run(go, as_json, lambda r: f"signed {r['file']} ({r['role']} v{r['version']}) with {r['keyid'][:12]}; "
                                f"{len(r['signatures'])} signature(s)")


@repo_app.command("delegate")
def repo_delegate(
    product: str = typer.Argument(..., help="product whose targets (<product>/*) the new role signs"),
    keys: Path = KEYS_OPT,
    to: str = REPO_OPT,
    key: list[str] = typer.Option([], help="the role's key: signer URI or key file (repeat for several)"),
    generate: bool = typer.Option(False, help="generate a new key file <keys>/<product>.pem for the role"),
    threshold: int = typer.Option(1, help="signatures needed"),
    bin_bits: int = typer.Option(4, "--bin-bits", help="2^N hash bins for the product's releases (0: none, every "
                                                       "release in the product's role; docs/formats.md)"),
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Stage a delegated targets role for one product (e.g. a CI pipeline's key)."""
    from metadata.keys import KeyConfig, generate_file_key, public_key_from
    from metadata.manifest import check_name
    from metadata.repository import Repository, check_bin_bits
    from metadata.staging import stage_delegation

    def go() -> dict:
        check_name("product", product)
        check_bin_bits(bin_bits)
        config = KeyConfig.load(keys)
        repo = Repository.load(_reader(to, (endpoint_url, region, profile)))
        pairs = [public_key_from(k, keys) for k in key]
        with _undo_new_keys(keys):  # refused (say, already delegated): no orphan key file is left
            if generate:
                pairs.append(generate_file_key(keys, product))
            paths = stage_delegation(repo, config, product, pairs, threshold=threshold, bits=bin_bits)
        return {"staged": [str(p) for p in paths], "keyids": [k.keyid for k, _ in pairs]}

    run(go, as_json, lambda r: f"staged {', '.join(r['staged'])}; collect signatures, then 'abflip repo commit'")


@repo_app.command("bins")
def repo_bins(
    product: str = typer.Argument(..., help="a delegated product without hash bins"),
    keys: Path = KEYS_OPT,
    to: str = REPO_OPT,
    bin_bits: int = typer.Option(4, "--bin-bits", help="2^N hash bins"),  # metadata.repository.DEFAULT_BIN_BITS
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Stage hash bins for a product delegated without them; its role moves its releases into
    them the next time its key signs it (a publish or channel change), devices keep working."""
    from metadata.keys import KeyConfig
    from metadata.repository import Repository
    from metadata.staging import stage_bins

    def go() -> dict:
        paths = stage_bins(Repository.load(_reader(to, (endpoint_url, region, profile))), KeyConfig.load(keys), product,
                           bin_bits)
        return {"staged": [str(p) for p in paths]}

    run(go, as_json, lambda r: f"staged {', '.join(r['staged'])}; collect signatures, then 'abflip repo commit'")


@repo_app.command("rotate")
def repo_rotate(
    role: str = typer.Argument(..., help="root, targets, snapshot, timestamp or a delegated role (product)"),
    keys: Path = KEYS_OPT,
    to: str = REPO_OPT,
    add_key: list[str] = typer.Option([], "--add-key", help="new key: signer URI or key file (repeat)"),
    generate: int = typer.Option(0, help="generate N new key files for the role"),
    revoke: list[str] = typer.Option([], help="keyid (or unique prefix) to remove from the role (repeat)"),
    threshold: int = typer.Option(None, help="new threshold"),
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Stage a key rotation, revocation or threshold change (a new root, or targets for a delegated role)."""
    from metadata.keys import KeyConfig, generate_file_key, public_key_from
    from metadata.repository import Repository
    from metadata.staging import check_rotatable, stage_rotation

    def go() -> dict:
        config = KeyConfig.load(keys)
        repository = Repository.load(_reader(to, (endpoint_url, region, profile)))
        check_rotatable(repository, role)  # before a key file is generated for it
        pairs = [public_key_from(k, keys) for k in add_key]
        with _undo_new_keys(keys):  # refused (say, a threshold too high): no orphan key file is left
            pairs += [generate_file_key(keys, role) for _ in range(generate)]
            paths = stage_rotation(repository, config, role, add=pairs, revoke=revoke, threshold=threshold)
        return {"staged": [str(p) for p in paths], "added": [k.keyid for k, _ in pairs]}

    run(go, as_json, lambda r: f"staged {', '.join(r['staged'])}; collect signatures, then 'abflip repo commit'")


@repo_app.command("commit")
def repo_commit(keys: Path = KEYS_OPT, to: str = REPO_OPT, endpoint_url: Optional[str] = ENDPOINT_OPT,
                region: Optional[str] = REGION_OPT, profile: Optional[str] = PROFILE_OPT,
                as_json: bool = JSON_OPT) -> None:
    """Publish the staged changes once each meets its threshold (then snapshot and timestamp)."""
    from metadata.keys import KeyConfig
    from metadata.staging import clear_staged, commit_staged

    def go() -> dict:
        config = KeyConfig.load(keys)
        files = _sign_and_write(to, (endpoint_url, region, profile), config, lambda repo: commit_staged(repo, config))
        clear_staged(keys)
        return {"published": [f.name for f in files]}

    run(go, as_json, lambda r: f"published {', '.join(r['published'])}")


@repo_app.command("refresh")
def repo_refresh(
    repo: str = typer.Option(..., "--repo", help="repository to write: a directory or s3://bucket/prefix"),
    keys: Path = KEYS_OPT,
    force: bool = typer.Option(False, help="re-sign the timestamp even if it is not due"),
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Re-sign the online roles before they expire (timestamp; snapshot within half its period).

    What a scheduled CI job runs (ci/refresh-workflow.yml)."""
    from metadata.errors import RepositoryError
    from metadata.keys import KeyConfig
    from metadata.repository import Repository
    from metadata.status import expired_roles, expiry_warnings

    def go() -> dict:
        config = KeyConfig.load(keys)
        files = _sign_and_write(repo, (endpoint_url, region, profile), config,
                                lambda r: r.refresh_files(config, force=force))
        current = Repository.load(_reader(repo, (endpoint_url, region, profile)))
        if expired := expired_roles(current):
            signed = f" (re-signed meanwhile: {', '.join(f.name for f in files)})" if files else ""
            raise RepositoryError("; ".join(expired) + signed,
                                  hint="devices refuse every update while a role is expired (docs/keys.md); "
                                       "this job can re-sign only the roles whose keys it holds")
        return {"signed": [f.name for f in files], "warnings": expiry_warnings(current, config)}

    run(go, as_json, lambda r: "\n".join([f"re-signed {', '.join(r['signed'])}" if r["signed"] else "nothing due",
                                          *(f"warning: {w}" for w in r["warnings"])]))


@repo_app.command("snapshot")
def repo_snapshot(
    repo: str = typer.Option(..., "--repo", help="repository to write: a directory or s3://bucket/prefix"),
    keys: Path = KEYS_OPT,
    force: bool = typer.Option(False, help="sign a new timestamp even if nothing is new or due"),
    endpoint_url: Optional[str] = ENDPOINT_OPT,
    region: Optional[str] = REGION_OPT,
    profile: Optional[str] = PROFILE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """The repository's online signer: check each product's new metadata against its delegation
    and sign a snapshot and timestamp that make it visible (docs/release-control.md).

    What the repository-level job runs (ci/signer-workflow.yml), on a schedule and after a
    product publishes; its keys directory holds only the snapshot and timestamp keys."""
    from builder.signer import sign_online
    from metadata.keys import KeyConfig

    def go() -> dict:
        r = sign_online(_storage(repo, (endpoint_url, region, profile)), KeyConfig.load(keys), force=force)
        return {"signed": list(r.signed), "included": r.included, "newly_included": r.newly_included,
                "skipped": list(r.skipped), "timestamp_version": r.timestamp_version, "kept": r.kept}

    def text(r: dict) -> str:
        lines = [f"signed {', '.join(r['signed'])} (timestamp v{r['timestamp_version']})" if r["signed"]
                 else "nothing new or due"]
        lines += [f"included {role} v{v}" for role, v in sorted(r["newly_included"].items())]
        lines += [f"refused {s}" for s in r["skipped"]]
        lines += [f"kept {product} at the version the snapshot names: {why}" for product, why in sorted(r["kept"].items())]
        return "\n".join(lines)

    run(go, as_json, text)
