"""What the repository offers this device, and whether the device takes it.

TUF refresh -> the channel pointer -> its release manifest (both verified against signed targets
metadata, bounded, and cached in ``<state_dir>/offer/`` so an idle check fetches nothing but the
timestamp) -> the rollout decision and withdrawal (docs/release-control.md) -> the policy
(product, hardware, floor, failed versions). The decisions themselves are pure
(:mod:`applier.policy`, :mod:`applier.rollout`); this module owns the I/O around them, as
python-tuf's ``Updater`` does around its ``TrustedMetadataSet``.

The repository is reached through one client (:class:`applier.client.UpdateClient`: refresh,
targets, their URLs) and one fetcher (ranges of a target); both are given, so the lifecycle model
checker can offer releases from memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from metadata.errors import PolicyError, RepositoryError, UserError
from metadata.manifest import Channel, Release, channel_target_path

from .policy import check_offered, check_release, floor_of, same_version
from .release_control import ControlRecord, read_device_id, save_record
from .rollout import Decision, decide
from .session import OFFER_CACHE, Session
from .state import State, Target

if TYPE_CHECKING:
    from .client import UpdateClient
    from .fetch import HttpFetcher

__all__ = ["Offer", "Offered", "check", "no_longer_offered", "why_not_offered"]


@dataclass(frozen=True)
class Offered:
    """The channel's release, verified."""

    channel: Channel
    release: Release
    manifest: bytes  # the release manifest's bytes (its sha256 pins a stage)

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest).hexdigest()

    @property
    def version(self) -> str:
        return str(self.release.version)


class Offer:
    """The repository as this device sees it. ``client_factory`` makes the TUF client (the
    default: :class:`applier.client.UpdateClient` over ``fetcher``); ``fetcher`` streams ranges
    of the image."""

    def __init__(self, session: Session, fetcher: HttpFetcher | None = None,
                 client_factory: Callable[[], UpdateClient] | None = None) -> None:
        self.session = session
        self._fetcher = fetcher
        self._client_factory = client_factory
        self.client: UpdateClient | None = None  # after fetch()
        self.last: Offered | None = None  # what the last fetch() returned

    @property
    def fetcher(self) -> HttpFetcher:
        if self._fetcher is None:
            from .fetch import HttpFetcher

            cfg = self.session.config
            self._fetcher = HttpFetcher(timeout=cfg.http_timeout, deadline=cfg.metadata_deadline,
                                        rate_limit=cfg.bandwidth_limit, low_speed_limit=cfg.low_speed_limit,
                                        low_speed_time=cfg.low_speed_time)
        return self._fetcher

    def _client(self) -> UpdateClient:
        if self._client_factory is not None:
            return self._client_factory()
        from .client import UpdateClient

        cfg = self.session.config
        return UpdateClient(metadata_url=cfg.metadata_url, targets_url=cfg.targets_url,
                            metadata_dir=cfg.state_dir / "tuf", trusted_root=cfg.trusted_root, fetcher=self.fetcher)

    def fetch(self) -> Offered:
        """Refresh TUF; the channel pointer and its release manifest, verified and bounded."""
        from .client import TargetMissing

        s = self.session
        cfg, limits = s.config, s.limits
        s.emit(phase="refresh")
        client = self.client = self._client()
        client.refresh()
        cache = cfg.state_dir / OFFER_CACHE
        path = channel_target_path(cfg.product, cfg.channel)
        try:
            _, chan_bytes = client.fetch_target(path, limits.channel_max_bytes, cache=cache / "channel.json")
        except TargetMissing:
            known = client.channels(cfg.product)
            if not known:
                raise UserError(f"the repository has no channels for product {cfg.product!r}",
                                hint=f"check device.product in {cfg.path}") from None
            raise UserError(f"channel {cfg.channel!r} of {cfg.product} is not in the repository; it has: "
                            f"{', '.join(known)}", hint=f"check device.channel in {cfg.path}") from None
        channel = Channel.from_bytes(chan_bytes, limits)
        _, rel_bytes = client.fetch_target(channel.release, limits.manifest_max_bytes, cache=cache / "release.json")
        release = Release.from_bytes(rel_bytes, limits)
        if release.target_path != channel.release:
            raise RepositoryError(f"{channel.release} holds the manifest of {release.product} {release.version}")
        self.last = Offered(channel, release, rel_bytes)
        return self.last

    # -- the decisions ---------------------------------------------------------------------
    def decide(self, state: State, offered: Offered) -> Decision:
        """This device's rollout decision for the offered release; recorded (with the channel's
        withdrawn versions) for the offline ``status`` and ``boot-check``."""
        s = self.session
        device_id, why = read_device_id(s.config.id_file)
        t = state.target
        started = (t is not None and same_version(t.version, offered.version)
                   and state.state in ("downloading", "staged", "pending"))
        channel = offered.channel
        d = decide(channel.rollout, product=offered.release.product, version=offered.version, device_id=device_id,
                   device_id_error=why, started=started)
        save_record(s.config.state_dir, ControlRecord(channel.channel, str(channel.version), tuple(channel.withdrawn),
                                                      d.to_json()))
        return d

    def judge(self, state: State, booted: str, offered: Offered, *, allow_downgrade: bool, retry_failed: bool,
              decision: Decision | None = None) -> None:
        """Raise the PolicyError that says why this device does not take ``offered``."""
        s = self.session
        decision = decision or self.decide(state, offered)
        booted_version = s.booted_version(state, booted)
        check_release(offered.release, offered.channel, product=s.config.product, hardware_id=s.hardware_id,
                      floor=floor_of(state.floor, booted_version), running=booted_version,
                      failed_versions=state.failed_versions, allow_downgrade=allow_downgrade,
                      retry_failed=retry_failed)
        check_offered(offered.channel, offered.release, decision)  # withdrawn, phased rollout



def no_longer_offered(offer: Offer, t: Target, *, replaced: bool = True) -> str | None:
    """Why the release ``t`` is no longer on offer, or None (still offered, or the repository
    cannot be reached: then what is staged is applied, as before). ``replaced``: a channel that
    offers another release counts too (a stage; a pending update is only cancelled when withdrawn)."""
    from metadata.errors import TransportError

    try:
        offered = offer.fetch()
    except TransportError:
        return None
    return why_not_offered(offered, t, replaced=replaced)


def why_not_offered(offered: Offered, t: Target, *, replaced: bool = True) -> str | None:
    channel = offered.channel
    if channel.is_withdrawn(t.version):
        return f"{t.version} was withdrawn from channel {channel.channel}"
    if replaced and offered.manifest_sha256 != t.manifest_sha256:
        return f"channel {channel.channel} no longer offers it (it offers {offered.version})"
    return None


def check(session: Session, offer: Offer, *, allow_downgrade: bool = False, retry_failed: bool = False) -> dict:
    """Is there a release for this device, and what happens next? Never changes the slots or
    the ESP (it records the channel's rollout and withdrawals for the offline status)."""
    from .lifecycle import Phase, next_step, other, phase_of
    loaded = session.load(mutating=False)
    state, booted = loaded.state, loaded.booted
    offered = offer.fetch()
    channel = offered.channel
    t = state.target
    staged = (t is not None and t.manifest_sha256 == offered.manifest_sha256 and t.slot == other(booted)
              and state.state in ("staged", "pending"))
    decision = offer.decide(state, offered)
    reason = None
    try:
        offer.judge(state, booted, offered, allow_downgrade=allow_downgrade, retry_failed=retry_failed,
                    decision=decision)
    except PolicyError as e:
        reason = e.message
    current = session.booted_version(state, booted)
    dropped = None
    if t is not None and phase_of(state) in (Phase.STAGED, Phase.PENDING, Phase.DOWNLOADING, Phase.TRIAL):
        dropped = why_not_offered(offered, t, replaced=phase_of(state) == Phase.STAGED)
    return {"schema": 1, "available": reason is None, "version": offered.version,
            "current": current, "reason": reason, "staged": staged,
            "state": state.state, "next_window": session.window_info(),
            # (issue 13) release control: this device in the rollout and why; withdrawn releases
            "rollout": decision.to_json(), "withdrawn": channel.is_withdrawn(offered.release.version),
            "current_withdrawn": current is not None and channel.is_withdrawn(current),
            # (issue 20) what happens next
            "next": next_step(state, loaded.facts, tries=session.config.tries, withdrawn=tuple(channel.withdrawn),
                              offered=offered.version, available=reason is None and not staged, dropped=dropped)}
