"""Pure policy decisions: is this release for me, and may I install it?

No I/O and no clock: everything comes in as arguments.
"""

from __future__ import annotations

from metadata.errors import PolicyError, UserError
from metadata.manifest import Channel, Release
from metadata.version import Version

__all__ = ["check_release", "check_offered", "floor_of", "same_version", "NotInRollout", "Withdrawn", "StageDiscarded"]


class NotInRollout(PolicyError):
    """The channel's phased rollout does not include this device (yet), or it is paused."""


class Withdrawn(PolicyError):
    """The release engineer pulled this release from the channel."""


class StageDiscarded(PolicyError):
    """A staged release is no longer offered on the channel: the stage was discarded, not applied."""


def same_version(a: str | None, b: str | None) -> bool:
    """Semver identity: build metadata does not make another version (``2.0.0+x`` is ``2.0.0``,
    semver 10), for failed versions, the floor and entries alike. Text that does not parse
    compares as text, case-insensitively (systemd-boot lowercases the entry it reports)."""
    if a is None or b is None:
        return a is b
    try:
        return Version.parse(a) == Version.parse(b)
    except UserError:
        return a.lower() == b.lower()


def floor_of(committed_floor: str | None, booted_version: str | None) -> Version | None:
    """The lowest version the device may move to without --allow-downgrade."""
    versions = [Version.parse(v) for v in (committed_floor, booted_version) if v]
    return max(versions) if versions else None


def check_release(release: Release, channel: Channel, *, product: str, hardware_id: str, floor: Version | None,
                  failed_versions: list[str], allow_downgrade: bool = False, retry_failed: bool = False,
                  running: str | None = None) -> None:
    """``floor``: :func:`floor_of` the committed floor and the ``running`` (booted) version."""
    if release.product != product or channel.product != product:
        raise PolicyError(f"the channel offers product {release.product!r}, this device runs {product!r}")
    if release.version != channel.version:
        raise PolicyError(f"the channel names version {channel.version} but its release manifest is {release.version}")
    if hardware_id not in release.compatible:
        raise PolicyError(f"{release.product} {release.version} is not compatible with this hardware ({hardware_id}); "
                          f"it supports {', '.join(release.compatible)}", hint="nothing was changed; check the device's "
                          "channel and hardware_id")
    if not allow_downgrade and floor is not None and release.version <= floor:
        raise PolicyError(f"{release.version} is not newer than {floor}, {_floor_words(floor, running)}",
                          hint="nothing to do; pass --allow-downgrade to install an older or equal version")
    if not retry_failed and any(same_version(str(release.version), v) for v in failed_versions):
        raise PolicyError(f"{release.version} was rolled back on this device before (a failed boot or health check, "
                          "or `abflip rollback`) and is not retried by itself",
                          hint="publish a fixed version, or pass --retry-failed")


def _floor_words(floor: Version, running: str | None) -> str:
    """What the floor is, truly: the running version, or a higher one committed before."""
    try:
        run = Version.parse(running) if running else None
    except UserError:
        run = None
    if run is not None and run >= floor:
        return "the version this device runs"
    if run is None:
        return "the version this device committed"
    return f"the highest version this device committed (it runs {running} since a rollback; the floor stays)"


def check_offered(channel: Channel, release: Release, decision) -> None:
    """Release control (docs/release-control.md): a withdrawn release is never offered; the
    rollout's ``decision`` (:func:`applier.rollout.decide`) must let this device start it."""
    if channel.is_withdrawn(release.version):
        raise Withdrawn(f"{release.product} {release.version} was withdrawn from channel {channel.channel}",
                        hint="nothing was changed; the release engineer publishes or promotes another version")
    if not decision.allowed:
        raise NotInRollout(f"{release.product} {release.version} is in a phased rollout: {decision.reason}",
                           hint="nothing was changed; the device takes it when the rollout includes it "
                                "(abflip check --json shows the rollout)")
