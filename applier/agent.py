"""The device agent: what it is, what is booted, what is on offer, and the verbs.

The verbs live one concept a file, over this shared core: :mod:`applier.install` (download,
apply: writing the inactive slot and making it bootable), :mod:`applier.mark` (boot-check,
mark-good, rollback: judging a boot). :mod:`applier.lifecycle` holds the transition table,
the write order of each verb, and the reconciliation with the boot loader.

Every command that changes anything holds ``<state_dir>/lock`` (one agent at a time),
removes what killed runs left behind (temp files by their prefixes), and loads the state
reconciled with the boot loader (:func:`applier.lifecycle.reconcile`): the entries on the
ESP and the loader variables outrank the state file. An error exit means nothing changed,
or its message says exactly what did (docs/invariants.md).

Start-up (issue 14): ``status`` and ``boot-check`` run on every boot, so what this module
imports at its top is what they pay for. The TUF client and the HTTP fetcher are imported
when the offer is refreshed, the verbs' modules (and through them :mod:`applier.stream` and
:mod:`applier.delta`) when a verb runs (tests/test_startup.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from metadata.errors import DeviceError, Error, PolicyError, RepositoryError, TransportError, UserError
from metadata.manifest import HWID_RE, Channel, Limits, Release, channel_target_path

from . import boot
from .boot import Entry
from .config import Config
from .context import Context
from .download_record import last_record
from .esp import DirectoryEsp, Esp
from .lifecycle import BootFacts, rebuild, reconcile
from .policy import StageDiscarded, check_offered, check_release, floor_of, same_version
from .release_control import load_record, read_device_id, save_record
from .rollout import Decision, decide
from .slots import booted_slot, other_slot
from .state import State, load_state, quarantine_state, save_state
from .windows import in_window, next_window

if TYPE_CHECKING:
    from .client import UpdateClient
    from .fetch import HttpFetcher

__all__ = ["ApplyResult", "Device", "DownloadResult", "InstallResult"]

#: A progress event (a JSON object; see docs/device.md "Progress events").
ProgressFn = Callable[[dict], None]
LOCK_FILE = "lock"
OFFER_CACHE = "offer"
#: Names that only a killed run leaves behind, per directory (see :meth:`Device.sweep`).
_STATE_TEMPS = re.compile(r"^\.state-")
_TUF_TEMPS = re.compile(r"^tmp[a-z0-9_]{6,}$")
_STAGED_TEMPS = re.compile(r"^(\.abflip-tmp-|\..+\.part$)")  # also the offer cache's
_ESP_TEMPS = re.compile(r"(^\.abflip-tmp-|\.abflip-tmp(-case)?$|\.~a[bc]$)", re.IGNORECASE)


@dataclass
class DownloadResult:
    version: str
    slot: str
    resumed_at_chunk: int
    bytes_downloaded: int
    already: bool = False
    kind: str = "full"  # or "delta" (docs/delta.md)
    delta_from: str | None = None
    fallback_chunks: int = 0  # chunks a delta could not make, taken from the full image
    delta_note: str | None = None  # why a delta on offer was not (fully) used

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ApplyResult:
    version: str
    slot: str
    entry: str
    already: bool = False

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class InstallResult:
    version: str
    slot: str
    entry: str
    resumed_at_chunk: int
    bytes_downloaded: int
    already: bool = False
    kind: str = "full"
    delta_from: str | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _run_command(argv: tuple[str, ...]) -> None:
    import subprocess

    try:
        subprocess.run(list(argv), check=True, stdin=subprocess.DEVNULL, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise DeviceError(f"the reboot command {' '.join(argv)!r} failed: {e}",
                          hint="check maintenance.reboot_command; the update is pending and applies at the next reboot") from None


def normalize_hardware_id(value: str) -> str:
    """A DMI string as a hardware id: lowercased, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9._:/+-]+", "-", value.strip().lower()).strip("-")


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

    _verified_now: tuple[str, str] | None = field(default=None, init=False, repr=False)
    _locked: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        cfg = self.config
        if self.ctx is None:
            self.ctx = Context(cmdline=cfg.cmdline, efivars=cfg.efivars, dmi=cfg.dmi, partlabels=cfg.partlabels)
        if self.esp is None:
            root = cfg.esp
            if cfg.esp_auto:
                found = self.ctx.find_esp()
                if found is None:
                    raise DeviceError(f"no EFI System Partition found (looked for an EFI directory in "
                                      f"{', '.join(str(p) for p in self.ctx.esp_candidates)})",
                                      hint=f"mount the ESP, or set paths.esp in {cfg.path}")
                root = found
            self.esp = DirectoryEsp(root)
        if self.reboot is None:
            self.reboot = (lambda: _run_command(cfg.reboot_command)) if cfg.reboot_command else None

    def _emit(self, **event) -> None:
        if self.progress is not None:
            self.progress({"event": "progress", **event})

    # -- who am I, what is booted ----------------------------------------------------------
    @property
    def hardware_id(self) -> str:
        fieldname = self.config.hardware_id_from_dmi
        if fieldname is None:
            return self.config.hardware_id
        raw = self.ctx.dmi_field(fieldname)
        value = normalize_hardware_id(raw) if raw else ""
        if not value or not HWID_RE.match(value):
            raise DeviceError(f"cannot read the hardware id from DMI ({self.ctx.dmi / fieldname}: "
                              f"{'unreadable or empty' if raw is None else repr(raw) + ' is not a valid id'})",
                              hint=f"set device.hardware_id in {self.config.path}")
        return value

    def entries(self) -> list[Entry]:
        try:
            return boot.list_entries(self.esp)
        except OSError as e:
            raise DeviceError(f"cannot list the boot entries on the ESP {self.esp!r}: {e}",
                              hint="check that the ESP is mounted and readable") from None

    def booted_entry(self, slot: str, entries: list[Entry] | None = None) -> Entry | None:
        entries = self.entries() if entries is None else entries
        for var in ("LoaderBootCountPath", "LoaderEntrySelected"):
            value = self.ctx.loader_var(var)
            if value:
                name = value.replace("\\", "/").rsplit("/", 1)[-1]
                e = Entry.parse(name) or Entry.parse(name.lower())
                if e:
                    # systemd-boot may have renamed it since (counting): find the current file
                    for cur in entries:  # LoaderEntrySelected comes lowercased
                        if cur.version.lower() == e.version.lower() and cur.slot == e.slot:
                            return cur
                    return e
        candidates = [e for e in entries if e.slot == slot]
        return candidates[0] if len(candidates) == 1 else None

    def facts(self, slot: str) -> BootFacts:
        entries = self.entries()
        return BootFacts(slot, self.booted_entry(slot, entries), tuple(entries))

    def _booted_version(self, state: State, booted: str) -> str | None:
        entry = self.booted_entry(booted)
        return entry.version if entry else state.slots[booted].version

    # -- the state, reconciled -------------------------------------------------------------
    def _load(self, *, mutating: bool = True) -> tuple[State, str]:
        """The state reconciled with the boot loader. A missing file is rebuilt from the boot
        loader (a device's first run); an invalid one too, but a mutating command refuses it."""
        slot = booted_slot(self.config, self.ctx)
        raw = load_state(self.config.state_dir)
        facts = self.facts(slot)
        if raw is None or raw.invalid:
            state = rebuild(facts, raw.invalid if raw else None)
            if mutating and state.invalid:
                raise DeviceError(f"the state file is invalid: {state.invalid}",
                                  hint="`abflip reset-state` rebuilds it from the boot entries (the bad file is kept as "
                                       "state.json.invalid); boot-check does so by itself at the next boot")
            return state, slot
        return reconcile(raw, facts), slot

    def _save(self, state: State) -> None:
        save_state(self.config.state_dir, state)

    def _record_error(self, e: Error) -> None:
        """Best effort: ``last_error`` into the state *as it is on disk* (reconciled with the boot
        loader, which only records what already happened), never a half-changed copy from memory:
        an error path must not write what the failed step meant to."""
        try:
            raw = load_state(self.config.state_dir)
            if raw is None or raw.invalid:
                return
            state = reconcile(raw, self.facts(booted_slot(self.config, self.ctx)))  # derived from the ESP: safe
            state.last_error = e.to_json()
            save_state(self.config.state_dir, state)
        except (Error, OSError):
            pass  # the error itself is what the caller reports

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One mutating command at a time (``flock`` on ``<state_dir>/lock``); then sweep."""
        if self._locked:
            self._locked += 1
            try:
                yield
            finally:
                self._locked -= 1
            return
        d = self.config.state_dir
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise DeviceError(f"cannot use the state directory {d}: {e.strerror or e}",
                              hint=f"check paths.state_dir in {self.config.path}: it must be a writable directory") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise DeviceError("another abflip command is running on this device (it holds "
                                      f"{d / LOCK_FILE})", hint="wait for it to finish, then retry") from None
                raise DeviceError(f"cannot lock {d / LOCK_FILE}: {e}") from None
            self._locked = 1
            self.sweep()
            yield
        finally:
            self._locked = 0
            os.close(fd)

    def guarded(self, fn: Callable[[], object]):
        """Run a mutating verb under the lock; an abflip error is recorded as ``last_error``."""
        with self.locked():
            try:
                return fn()
            except Error as e:
                self._record_error(e)
                raise

    def sweep(self) -> list[str]:
        """Remove what killed runs left behind, by the prefixes only abflip's writers use:
        ``state/.state-*``, ``state/tuf/tmp*`` (python-tuf), ``state/staged/.abflip-tmp-*`` and
        ``.*.part``, and the ESP's ``.abflip-tmp`` names in ``loader/entries`` and ``abflip/*``.
        Runs under the lock, so no other abflip command is writing them. Best effort."""
        removed: list[str] = []
        sd = self.config.state_dir
        for d, pattern in ((sd, _STATE_TEMPS), (sd / "tuf", _TUF_TEMPS), (sd / "staged", _STAGED_TEMPS),
                           (sd / OFFER_CACHE, _STAGED_TEMPS)):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for n in names:
                if pattern.search(n) and (d / n).is_file() and not (d / n).is_symlink():
                    with contextlib.suppress(OSError):
                        (d / n).unlink()
                        removed.append(str(d / n))
        esp = self.esp
        try:
            dirs = [boot.ENTRIES_DIR] + [f"abflip/{n}" for n in esp.listdir("abflip")]
            for d in dirs:
                for n in esp.listdir(d):
                    if _ESP_TEMPS.search(n):
                        esp.remove(f"{d}/{n}")
                        removed.append(f"esp:{d}/{n}")
        except (OSError, ValueError):
            pass
        return removed

    # -- status ----------------------------------------------------------------------------
    def window_info(self) -> dict | None:
        """The maintenance window now open or next to open; None: no windows (apply any time)."""
        now = self.clock()
        nxt = next_window(self.config.windows, now)
        if nxt is None:
            return None
        start, end = nxt
        return {"start": start.isoformat(), "end": end.isoformat(), "open": start <= now.astimezone(UTC) < end}

    def status(self) -> dict:
        try:
            slot: str | None = booted_slot(self.config, self.ctx)
        except DeviceError:
            slot = None
        entries = self.entries() if self.esp.exists(boot.ENTRIES_DIR) else []
        if slot:
            state, _ = self._load(mutating=False)
        else:
            state = load_state(self.config.state_dir) or State()
        entry = self.booted_entry(slot, entries) if slot else None
        booted_version = entry.version if entry else (state.slots[slot].version if slot else None)
        try:
            hwid: str | None = self.hardware_id
        except DeviceError:
            hwid = None
        return {
            "schema": 1,
            "state": state.state,
            "booted_slot": slot,
            "booted_entry": entry.name if entry else None,
            "booted_version": booted_version,
            "floor": state.floor,
            "slots": {k: {**v.__dict__, "device": str(self.config.slots[k].device), "booted": k == slot}
                      for k, v in state.slots.items()},
            "target": state.target.__dict__ if state.target else None,
            "pending_entry": next((e.name for e in entries if e.counting and not e.exhausted
                                   and not (entry is not None and e.name == entry.name)), None),
            "entries": [e.to_json() for e in entries],
            "failed_versions": state.failed_versions,
            "last_error": state.last_error,
            "state_recovered": state.recovered,
            # additions to schema 1 (issue 5)
            "hardware_id": hwid,
            "esp": str(getattr(self.esp, "root", self.esp)),
            "windows": [w.text for w in self.config.windows],
            "next_window": self.window_info(),
            "rollback": state.rollback,
            # (issue 9) why the state file was not trusted, if it was not
            "state_invalid": state.invalid,
            # (issue 12) how the staged/last release was downloaded: kind full|delta, bytes saved
            "download": last_record(self.config.state_dir),
            # (issue 13) what the channel said at the last check: rollout decision, withdrawn versions
            "release_control": self._release_status(booted_version),
        }

    def _release_status(self, booted_version: str | None) -> dict | None:
        rec = load_record(self.config.state_dir)
        if rec is None:
            return None
        return {**rec, "booted_withdrawn": booted_version is not None
                and any(same_version(booted_version, w) for w in rec["withdrawn"])}

    def reset_state(self) -> dict:
        """Rebuild the state from the boot loader; an invalid file is kept as ``state.json.invalid``."""
        with self.locked():
            slot = booted_slot(self.config, self.ctx)
            raw = load_state(self.config.state_dir)
            state = rebuild(self.facts(slot), raw.invalid if raw else None)
            if raw is not None:
                quarantine_state(self.config.state_dir)
            self._save(state)
        return {**self.status(), "action": "rebuilt"}

    # -- the release on offer --------------------------------------------------------------
    def _client(self) -> UpdateClient:
        from .client import UpdateClient

        return UpdateClient(metadata_url=self.config.metadata_url, targets_url=self.config.targets_url,
                            metadata_dir=self.config.state_dir / "tuf", trusted_root=self.config.trusted_root,
                            fetcher=self.fetcher)

    @property
    def _offer_cache(self) -> Path:
        return self.config.state_dir / OFFER_CACHE

    def _offer(self) -> tuple[UpdateClient, Channel, Release, bytes]:
        """Refresh TUF; the channel pointer and its release manifest, verified and bounded. Both
        are kept in ``<state_dir>/offer/``: when the signed targets metadata says they did not
        change, an idle check fetches nothing but TUF's own (timestamp) metadata."""
        from .client import TargetMissing

        cfg, limits = self.config, self.limits
        self._emit(phase="refresh")
        client = self._client()
        client.refresh()
        path = channel_target_path(cfg.product, cfg.channel)
        try:
            _, chan_bytes = client.fetch_target(path, limits.channel_max_bytes, cache=self._offer_cache / "channel.json")
        except TargetMissing:
            known = client.channels(cfg.product)
            if not known:
                raise UserError(f"the repository has no channels for product {cfg.product!r}",
                                hint=f"check device.product in {cfg.path}") from None
            raise UserError(f"channel {cfg.channel!r} of {cfg.product} is not in the repository; it has: "
                            f"{', '.join(known)}", hint=f"check device.channel in {cfg.path}") from None
        channel = Channel.from_bytes(chan_bytes, limits)
        _, rel_bytes = client.fetch_target(channel.release, limits.manifest_max_bytes,
                                           cache=self._offer_cache / "release.json")
        release = Release.from_bytes(rel_bytes, limits)
        if release.target_path != channel.release:
            raise RepositoryError(f"{channel.release} holds the manifest of {release.product} {release.version}")
        return client, channel, release, rel_bytes

    def _policy(self, state: State, booted: str, channel: Channel, release: Release, *, allow_downgrade: bool,
                retry_failed: bool, decision: Decision | None = None) -> None:
        decision = decision or self.release_control(state, channel, release)
        check_release(release, channel, product=self.config.product, hardware_id=self.hardware_id,
                      floor=floor_of(state.floor, self._booted_version(state, booted)),
                      failed_versions=state.failed_versions, allow_downgrade=allow_downgrade, retry_failed=retry_failed)
        check_offered(channel, release, decision)  # withdrawn, phased rollout (docs/release-control.md)

    def release_control(self, state: State, channel: Channel, release: Release) -> Decision:
        """This device's rollout decision for the offered release; recorded (with the channel's
        withdrawn versions) for the offline ``status``."""
        device_id, why = read_device_id(self.config.id_file)
        t = state.target
        started = (t is not None and same_version(t.version, str(release.version))
                   and state.state in ("downloading", "staged", "pending"))
        d = decide(channel.rollout, product=release.product, version=str(release.version), device_id=device_id,
                   device_id_error=why, started=started)
        save_record(self.config.state_dir, {"channel": channel.channel, "version": str(channel.version),
                                            "withdrawn": list(channel.withdrawn), "rollout": d.to_json()})
        return d

    def refuse_if_fallback_needed(self, state: State, booted: str) -> None:
        """The inactive slot must not be written while it is the only way back."""
        if state.rollback is not None and booted == state.rollback.get("from_slot"):
            raise PolicyError(f"a rollback to slot {state.rollback.get('to_slot')} waits for a reboot; slot "
                              f"{state.rollback.get('to_slot')} must not be overwritten",
                              hint="reboot first")
        if state.state == "trial":
            raise PolicyError(f"slot {booted} is on trial (booted, not yet blessed); the other slot is its fallback "
                              "and must not be overwritten", hint="run `abflip boot-check` or `abflip mark-good` first")

    # -- check -----------------------------------------------------------------------------
    def check(self, *, allow_downgrade: bool = False, retry_failed: bool = False) -> dict:
        """Is there a release for this device? Never changes the slots or the ESP."""
        import hashlib

        state, booted = self._load(mutating=False)
        _, channel, release, rel_bytes = self._offer()
        manifest_sha = hashlib.sha256(rel_bytes).hexdigest()
        t = state.target
        staged = (t is not None and t.manifest_sha256 == manifest_sha and t.slot == other_slot(booted)
                  and state.state in ("staged", "pending"))
        reason = None
        decision = self.release_control(state, channel, release)
        try:
            self._policy(state, booted, channel, release, allow_downgrade=allow_downgrade, retry_failed=retry_failed,
                         decision=decision)
        except PolicyError as e:
            reason = e.message
        current = self._booted_version(state, booted)
        return {"schema": 1, "available": reason is None, "version": str(release.version),
                "current": current, "reason": reason, "staged": staged,
                "state": state.state, "next_window": self.window_info(),
                # (issue 13) release control: this device in the rollout and why; withdrawn releases
                "rollout": decision.to_json(), "withdrawn": channel.is_withdrawn(release.version),
                "current_withdrawn": current is not None and channel.is_withdrawn(current)}

    # -- the verbs (their own modules) -------------------------------------------------------
    def download(self, *, allow_downgrade: bool = False, retry_failed: bool = False) -> DownloadResult:
        from .install import download

        return self.guarded(lambda: download(self, allow_downgrade=allow_downgrade, retry_failed=retry_failed))

    def apply(self, *, now: bool = False, _just_verified: tuple[str, str] | None = None) -> ApplyResult:
        from .install import apply

        return self.guarded(lambda: apply(self, now=now, just_verified=_just_verified))

    def install(self, *, allow_downgrade: bool = False, retry_failed: bool = False) -> InstallResult:
        """download + apply --now, under one lock."""
        with self.locked():
            self._verified_now = None
            d = self.download(allow_downgrade=allow_downgrade, retry_failed=retry_failed)
            a = self.apply(now=True, _just_verified=self._verified_now)
        return InstallResult(a.version, a.slot, a.entry, d.resumed_at_chunk, d.bytes_downloaded,
                             already=d.already and a.already, kind=d.kind, delta_from=d.delta_from)

    def mark_good(self, *, health: bool = True) -> dict:
        from .mark import mark_good

        return self.guarded(lambda: mark_good(self, health=health))

    def boot_check(self, *, bless: bool = True) -> dict:
        from .mark import boot_check

        return self.guarded(lambda: boot_check(self, bless=bless))

    def rollback(self) -> dict:
        from .mark import rollback

        return self.guarded(lambda: rollback(self))

    # -- run: what the timer calls ---------------------------------------------------------
    def run(self, *, allow_downgrade: bool = False, retry_failed: bool = False, reboot: bool = True) -> dict:
        """One pass: check -> download -> apply if in a window -> reboot. Idempotent."""
        with self.locked():
            return self._run(allow_downgrade, retry_failed, reboot)

    def _run(self, allow_downgrade: bool, retry_failed: bool, reboot: bool) -> dict:
        out: dict = {"schema": 1, "check": None, "download": None, "apply": None, "rebooted": False}
        state, booted = self._load()
        if state.state == "trial" or (state.rollback and booted == state.rollback.get("from_slot")):
            out["skipped"] = f"state {state.state}: waiting for boot-check or a reboot"
            out["next_window"] = self.window_info()
            return out
        # The network may be down in the window: what is staged is applied all the same.
        failure: TransportError | None = None
        try:
            chk = self.check(allow_downgrade=allow_downgrade, retry_failed=retry_failed)
            out["check"] = chk
            if chk["available"] and not chk["staged"]:
                out["download"] = self.download(allow_downgrade=allow_downgrade, retry_failed=retry_failed).to_json()
        except TransportError as e:
            failure = e
        state, booted = self._load()
        open_now = in_window(self.config.windows, self.clock())
        if state.state == "staged" and open_now:
            try:
                out["apply"] = self.apply().to_json()
            except StageDiscarded as e:  # no longer offered (withdrawn or replaced): not applied, and why
                out["discarded"] = e.message
            state, booted = self._load()
        if failure is not None and out["apply"] is None:
            raise failure
        out["error"] = failure.to_json() if failure else None
        if state.state == "pending" and open_now and reboot and self.reboot is not None:
            self.reboot()
            out["rebooted"] = True
        out["state"] = state.state
        out["next_window"] = self.window_info()
        return out

    # -- ESP hygiene -----------------------------------------------------------------------
    def prune(self, state: State, booted: str) -> None:
        """Only entries of the two slots' current versions remain, and only boot files an
        entry references. Hygiene never fails an otherwise good operation."""
        keep: dict[str, str | None] = {booted: self._booted_version(state, booted)}
        other = other_slot(booted)
        s = state.slots[other]
        t = state.target
        if s.status == "good" and s.version:
            keep[other] = s.version
        elif state.state in ("pending", "trial") and t is not None and t.slot == other:
            keep[other] = t.version
        elif s.status == "unknown" and state.rollback is None:
            keep[other] = None  # never judged: leave it alone
        # bad, writing, staged (no entry yet): no entry may point at it
        try:
            boot.prune_entries(self.esp, keep)
            boot.prune_boot_files(self.esp)
        except (Error, OSError):
            pass

