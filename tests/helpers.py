"""Assertions and lookups shared by the device tests."""

from __future__ import annotations

from metadata.manifest import Release


def release_of(world, version: str) -> Release:
    """The manifest of a release built by the session fixture."""
    return Release.from_bytes((world.built[version] / "release.json").read_bytes())


def assert_untouched(sim, dev) -> None:
    """The device still boots slot a and nothing points at slot b."""
    assert [e for e in sim.entries() if "-b" in e] == []
    assert sim.boot().slot == "a"
    assert dev.status()["pending_entry"] is None


def fake_erofs(data: bytes) -> bytes:
    """``data`` with erofs's superblock magic at 1024 (what 'release create' checks of an image)."""
    head = bytearray(data[:2048].ljust(2048, b"\0"))
    head[1024:1028] = b"\xe2\xe1\xf5\xe0"
    return bytes(head) + data[2048:]
