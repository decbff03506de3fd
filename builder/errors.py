"""Producer-side errors (rooted as in :mod:`metadata.errors`)."""

from __future__ import annotations

from metadata.errors import DeviceError, TransportError, UserError

__all__ = ["ToolMissing", "BuildError", "StorageError", "StorageAccessError", "StorageUnreachable", "AlreadyExists"]


class ToolMissing(UserError):
    """An external tool is not installed."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(f"{tool} is not installed", hint=f"install the Debian package {package} (apt-get install {package})")


class BuildError(UserError):
    """The input could not be turned into an image."""


class StorageError(DeviceError):
    """The publishing storage (directory or bucket) failed: ``error (storage)``, exit 5."""

    blame = "storage"
    default_hint = "check the publishing destination (path, bucket, credentials); the repository is unchanged or still consistent"


class StorageAccessError(UserError):
    """The storage is not where the command line points, or refuses who we are: a missing
    bucket, no credentials, access denied, an unknown profile (exit 2: the user fixes it)."""


class StorageUnreachable(TransportError):
    """The storage's endpoint cannot be reached, or the service failed for now (exit 4)."""

    default_hint = "check --endpoint-url / --region and the network, then retry; nothing was changed by this step"


class AlreadyExists(Exception):
    """A create-only write found the object present (another publisher won the race)."""
