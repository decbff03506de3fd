"""Producer-side errors (rooted as in :mod:`metadata.errors`)."""

from __future__ import annotations

from metadata.errors import DeviceError, UserError

__all__ = ["ToolMissing", "BuildError", "StorageError", "AlreadyExists"]


class ToolMissing(UserError):
    """An external tool is not installed."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(f"{tool} is not installed", hint=f"install the Debian package {package} (apt-get install {package})")


class BuildError(UserError):
    """The input could not be turned into an image."""


class StorageError(DeviceError):
    """The publishing storage (directory or bucket) failed."""

    blame = "storage"
    default_hint = "check the publishing destination (path, bucket, credentials); the repository is unchanged or still consistent"


class AlreadyExists(Exception):
    """A create-only write found the object present (another publisher won the race)."""
