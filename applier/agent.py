"""The device agent: one object the CLI (and the tests) call, which wires the collaborators and
runs a verb.

The verbs are functions in their own modules, each taking what it needs explicitly:
a :class:`~applier.session.Session` (config, boot loader, state, lock, progress) and, when it
talks to the repository, an :class:`~applier.offer.Offer`:

=============  ===================================  ============================================
verb           function                             what it does
=============  ===================================  ============================================
status         :func:`applier.status.status`        what the device says about itself
reset-state    :func:`applier.status.reset_state`   rebuild a missing or invalid state file
check          :func:`applier.offer.check`          is there a release for me, what happens next
download       :func:`applier.install.download`     stream + verify into the inactive slot
apply          :func:`applier.install.apply`        make the staged slot the next boot, on trial
install        :func:`applier.install.install`      download + apply --now
run            :func:`applier.run.run`              what the timer calls
boot-check     :func:`applier.mark.boot_check`      judge this boot: bless or roll back
mark-good      :func:`applier.mark.mark_good`       bless the booted entry
rollback       :func:`applier.mark.rollback`        boot the other slot next, or cancel a pending update
provision      :func:`applier.provision.provision`  a device's first day
=============  ===================================  ============================================

The phases and what moves them are :mod:`applier.lifecycle`; the boot loader is
:mod:`applier.bootloader`.

Start-up (issue 14): ``status`` and ``boot-check`` run on every boot, so what this module
imports at its top is what they pay for. The TUF client and the HTTP fetcher are imported when
the offer is refreshed, the verbs' modules (and through them :mod:`applier.stream` and
:mod:`applier.delta`) when a verb runs (tests/test_startup.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from metadata.manifest import Limits

from .bootloader import Bootloader
from .bootloader.esp import Esp
from .bootloader.systemd_boot import SystemdBoot
from .config import Config
from .context import Context
from .session import ProgressFn, Session, _utcnow

if TYPE_CHECKING:
    from pathlib import Path

    from .client import UpdateClient
    from .fetch import HttpFetcher
    from .install import ApplyResult, DownloadResult, InstallResult
    from .offer import Offer

__all__ = ["Device", "ProgressFn"]


def _run_command(argv: tuple[str, ...]) -> None:
    import subprocess

    from metadata.errors import DeviceError

    try:
        subprocess.run(list(argv), check=True, stdin=subprocess.DEVNULL, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise DeviceError(f"the reboot command {' '.join(argv)!r} failed: {e}",
                          hint="check maintenance.reboot_command; the update is pending and applies at the next reboot") from None


class _Fetcher:
    """``Device.fetcher``: the fetcher given, else an :class:`~applier.fetch.HttpFetcher` made
    from the config when first read. A dataclass field whose default is this descriptor (its
    value is kept in the instance's ``__dict__``): the commands that never touch the network
    (status, boot-check, mark-good) do not import the HTTP stack or the TUF client (issue 14)."""

    def __get__(self, dev: Device | None, owner: type | None = None) -> HttpFetcher | None:
        if dev is None:
            return None  # the field's default: made on first use
        fetcher = dev.__dict__.get("_fetcher")
        if fetcher is None:
            from .fetch import HttpFetcher

            cfg = dev.config
            fetcher = dev.__dict__["_fetcher"] = HttpFetcher(
                timeout=cfg.http_timeout, deadline=cfg.metadata_deadline, rate_limit=cfg.bandwidth_limit,
                low_speed_limit=cfg.low_speed_limit, low_speed_time=cfg.low_speed_time)
        return fetcher

    def __set__(self, dev: Device, fetcher: HttpFetcher | None) -> None:
        dev.__dict__["_fetcher"] = fetcher


@dataclass
class Device:
    config: Config
    ctx: Context | None = None
    esp: Esp | None = None
    fetcher: HttpFetcher | None = _Fetcher()  # type: ignore[assignment]  # read: never None (see _Fetcher)
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], datetime] = _utcnow  # the only clock the agent reads (maintenance windows)
    reboot: Callable[[], None] | None = None  # default: run config.reboot_command
    progress: ProgressFn | None = None
    #: the TUF client (default: :class:`applier.client.UpdateClient` over ``fetcher``); the lifecycle
    #: model checker offers releases from memory through it
    client_factory: Callable[[], UpdateClient] | None = None

    def __post_init__(self) -> None:
        cfg = self.config
        if self.ctx is None:
            self.ctx = Context(cmdline=cfg.cmdline, efivars=cfg.efivars, dmi=cfg.dmi, partlabels=cfg.partlabels)
        if self.esp is None:
            self.esp = SystemdBoot.open(cfg, self.ctx).esp  # found now: a missing ESP fails every command alike
        if self.reboot is None:
            self.reboot = (lambda: _run_command(cfg.reboot_command)) if cfg.reboot_command else None

    # -- the collaborators, made per call from the fields (a test may swap ``esp`` or ``ctx``) --
    @property
    def boot(self) -> Bootloader:
        return SystemdBoot(self.esp, self.ctx, {n: s.partlabel for n, s in self.config.slots.items()},
                           {n: s.device for n, s in self.config.slots.items()})

    def session(self) -> Session:
        return Session(self.config, self.ctx, self.boot, self.limits, self.clock, self.progress, self.reboot)

    def offer(self, session: Session) -> Offer:
        from .offer import Offer

        return Offer(session, self.fetcher, self.client_factory)

    @property
    def hardware_id(self) -> str:
        return self.session().hardware_id

    # -- the verbs ---------------------------------------------------------------------------
    def status(self) -> dict:
        from .status import status

        return status(self.session())

    def reset_state(self) -> dict:
        from .status import reset_state

        return reset_state(self.session())

    def check(self, *, allow_downgrade: bool = False, retry_failed: bool = False) -> dict:
        from .offer import check

        s = self.session()
        return check(s, self.offer(s), allow_downgrade=allow_downgrade, retry_failed=retry_failed)

    def download(self, *, allow_downgrade: bool = False, retry_failed: bool = False) -> DownloadResult:
        from .install import download

        s = self.session()
        return s.guarded(lambda: download(s, self.offer(s), allow_downgrade=allow_downgrade,
                                          retry_failed=retry_failed), "download")

    def apply(self, *, now: bool = False) -> ApplyResult:
        from .install import apply

        s = self.session()
        return s.guarded(lambda: apply(s, self.offer(s), now=now), "apply")

    def install(self, *, allow_downgrade: bool = False, retry_failed: bool = False) -> InstallResult:
        from .install import install

        s = self.session()
        return install(s, self.offer(s), allow_downgrade=allow_downgrade, retry_failed=retry_failed)

    def run(self, *, allow_downgrade: bool = False, retry_failed: bool = False, reboot: bool = True) -> dict:
        from .run import run

        s = self.session()
        return run(s, self.offer(s), allow_downgrade=allow_downgrade, retry_failed=retry_failed, reboot=reboot)

    def boot_check(self, *, bless: bool = True) -> dict:
        from .mark import boot_check

        s = self.session()
        return s.guarded(lambda: boot_check(s, bless=bless), "boot-check")

    def mark_good(self, *, health: bool = True) -> dict:
        from .mark import mark_good

        s = self.session()
        return s.guarded(lambda: mark_good(s, health=health), "mark-good")

    def rollback(self) -> dict:
        from .mark import rollback

        s = self.session()
        return s.guarded(lambda: rollback(s), "rollback")

    def provision(self, source: Path, *, slot: str | None = None, force: bool = False) -> dict:
        from .provision import provision

        return provision(self.session(), source, slot=slot, force=force)
