"""Signing keys as securesystemslib signer URIs.

A role's keys are listed in the producer's key configuration (``keys.json`` in the keys
directory) as ``{"keyid": ..., "uri": ...}``; the public half lives in root (or the
delegating) metadata. ``file2:<path>`` URIs name PEM/PKCS#8 key files (a relative path is
relative to the keys directory); ``awskms:``, ``hsm:`` and the other securesystemslib
schemes work without code changes, because the signer is only ever built from its URI.

Private key files are created 0600 with O_EXCL and never printed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from securesystemslib.signer import CryptoSigner, Key, Signer

from .bounded import loads_json, read_file
from .errors import UserError

__all__ = ["KeyConfig", "RoleKeys", "generate_file_key", "load_signer", "signer_from", "public_key_from",
           "DEFAULT_EXPIRY_DAYS", "TOP_ROLES", "ONLINE_ROLES"]

KEYS_SCHEMA = "abflip-keys/1"
KEYS_MAX_BYTES = 1 << 20  # keys.json lists URIs and keyids, never key material
TOP_ROLES = ("root", "targets", "snapshot", "timestamp")
ONLINE_ROLES = ("snapshot", "timestamp")  # re-signed by a schedule ('abflip repo refresh'); the others are offline
# TUF's customary periods: offline roles long, online roles short and re-signed by a schedule.
# "delegated" is the default of every delegated (per-product) role; a product name overrides it.
DEFAULT_EXPIRY_DAYS = {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1, "delegated": 90}


def generate_file_key(keys_dir: Path, name: str) -> tuple[Key, str]:
    """Create an ed25519 key pair; write the private key to ``keys_dir/name.pem`` (0600).

    Returns the public key and its signer URI (relative to ``keys_dir``).
    """
    signer = CryptoSigner.generate_ed25519()
    path = keys_dir / f"{name}.pem"
    n = 1
    while path.exists():  # a new key for a role (rotation) gets a new file; keys are never overwritten
        n += 1
        path = keys_dir / f"{name}-{n}.pem"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserError(f"key file {path} already exists", hint="choose an empty keys directory") from None
    with os.fdopen(fd, "wb") as f:
        f.write(signer.private_bytes)
        f.flush()
        os.fsync(f.fileno())
    return signer.public_key, f"file2:{path.name}"


def load_signer(uri: str, public_key: Key, base_dir: Path) -> Signer:
    """Build a signer from its URI. Relative ``file2:`` paths resolve against ``base_dir``."""
    if uri.startswith("file2:") and not uri[len("file2:"):].startswith("/"):
        uri = f"file2:{base_dir / uri[len('file2:'):]}"
    try:
        return Signer.from_priv_key_uri(uri, public_key)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load signing key {public_key.keyid[:12]} from {uri}: {e}",
                        hint="check the key URI in keys.json and that the key file is readable") from None


def _resolve(spec: str, base_dir: Path) -> str:
    """A signer URI from a URI or a key file path (relative file paths resolve against ``base_dir``)."""
    if ":" not in spec.split("/", 1)[0] or Path(spec).exists():
        return f"file2:{Path(spec).resolve()}"
    if spec.startswith("file2:") and not spec[len("file2:"):].startswith("/"):
        return f"file2:{base_dir / spec[len('file2:'):]}"
    return spec


def signer_from(spec: str, base_dir: Path | None = None) -> tuple[Signer, str]:
    """A signer and its URI from a private key URI or key file, without knowing its public key first.

    ``file2:`` URIs and plain paths name PEM/PKCS#8 private keys (the public key is derived
    from them); ``awskms:<key id>`` asks KMS for the public key (kms:GetPublicKey). Other
    schemes need the public key from the metadata: use :func:`load_signer`.
    """
    uri = _resolve(spec, base_dir or Path.cwd())
    try:
        if uri.startswith("file2:"):
            from cryptography.hazmat.primitives.serialization import (
                load_pem_private_key,
            )

            with open(uri[len("file2:"):], "rb") as f:
                return CryptoSigner(load_pem_private_key(f.read(), None)), uri
        if uri.startswith("awskms:"):
            from securesystemslib.signer import AWSSigner

            uri, key = AWSSigner.import_(uri[len("awskms:"):])
            return AWSSigner(uri[len("awskms:"):], key), uri
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load signing key {spec}: {e}", hint="pass a private key file or a signer URI") from None
    except Exception as e:  # the I/O seam of KMS clients (botocore errors are not OSError)
        raise UserError(f"cannot load signing key {spec}: {type(e).__name__}: {e}",
                        hint="check the KMS key id, the endpoint and the credentials (kms:GetPublicKey)") from None
    raise UserError(f"cannot derive the public key of {spec}",
                    hint="file2: paths and awskms: URIs are supported here")


def public_key_from(spec: str, base_dir: Path | None = None) -> tuple[Key, str]:
    """The public key and signer URI of a private key file or URI (see :func:`signer_from`)."""
    signer, uri = signer_from(spec, base_dir)
    return signer.public_key, uri


@dataclass
class RoleKeys:
    keyid: str
    uri: str


@dataclass
class KeyConfig:
    """The producer's key configuration: which signer URI holds which key, and expiry periods."""

    path: Path
    roles: dict[str, list[RoleKeys]] = field(default_factory=dict)
    expiry_days: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_EXPIRY_DAYS))

    @property
    def dir(self) -> Path:
        return self.path.parent

    @classmethod
    def load(cls, keys_dir: Path) -> KeyConfig:
        path = Path(keys_dir) / "keys.json"
        try:
            raw = loads_json(read_file(path, KEYS_MAX_BYTES))
        except FileNotFoundError:
            raise UserError(f"no key configuration at {path}", hint="run 'abflip repo init' first or pass --keys") from None
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read key configuration {path}: {e}",
                            hint="pass the keys directory 'abflip repo init' made (--keys)") from None
        if not isinstance(raw, dict) or raw.get("schema") != KEYS_SCHEMA:
            raise UserError(f"{path} is not an abflip key configuration (schema {KEYS_SCHEMA})",
                            hint="pass the keys directory 'abflip repo init' made (--keys)")
        roles = {r: [RoleKeys(k["keyid"], k["uri"]) for k in ks] for r, ks in raw.get("roles", {}).items()}
        expiry = dict(DEFAULT_EXPIRY_DAYS)
        expiry.update(raw.get("expiry_days", {}))
        return cls(path, roles, expiry)

    def save(self) -> None:
        data = {
            "schema": KEYS_SCHEMA,
            "expiry_days": self.expiry_days,
            "roles": {r: [{"keyid": k.keyid, "uri": k.uri} for k in ks] for r, ks in self.roles.items()},
        }
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def expiry(self, role: str) -> float:
        """Expiry period in days of ``role`` (a delegated role falls back to "delegated")."""
        return self.expiry_days.get(role, self.expiry_days.get("delegated", DEFAULT_EXPIRY_DAYS["delegated"]))

    def signers(self, role: str, public_keys: dict[str, Key]) -> list[Signer]:
        """Signers for every key of ``role`` that is both configured here and trusted for it."""
        out = []
        for k in self.roles.get(role, []):
            if k.keyid in public_keys and self.reachable(k.uri):
                out.append(load_signer(k.uri, public_keys[k.keyid], self.dir))
        return out

    def unreachable(self, role: str, public_keys: dict[str, Key]) -> list[str]:
        """URIs of ``role``'s trusted keys configured here whose key files are not on this machine."""
        return [k.uri for k in self.roles.get(role, []) if k.keyid in public_keys and not self.reachable(k.uri)]

    def reachable(self, uri: str) -> bool:
        """False for a ``file2:`` key whose file is not on this machine (an offline key held by
        someone else, who signs staged changes with 'abflip repo sign'); True for other schemes."""
        if not uri.startswith("file2:"):
            return True
        path = Path(uri[len("file2:"):])
        return (path if path.is_absolute() else self.dir / path).exists()
