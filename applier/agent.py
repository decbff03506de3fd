"""The device's state machine: check, download (stage), apply, run, boot-check, mark-good, rollback.

States (DESIGN.md): ``idle -> downloading -> staged -> pending -> (reboot) -> trial ->
committed | rolled-back``. ``download`` may run any time; ``apply`` only in a maintenance
window (or ``--now``); ``install`` is ``download`` then ``apply --now``.

Download order (the invariants of DESIGN.md, in the order they are kept):
1. Find the booted slot; refuse if unknown. The target is the *other* slot (never the booted one).
   Refuse while the booted slot is on trial or a requested rollback waits for its reboot: the
   inactive slot is then the fallback and must not be overwritten.
2. Refresh TUF metadata; fetch the channel pointer and the release manifest, both verified
   against signed targets metadata and bounded in size.
3. Policy: product, hardware id, version floor, versions that failed before.
4. Remove every boot entry that points at the target slot, and sync (invariant 2).
5. Stream: verify each chunk, decompress, write; persist progress after each chunk.
6. Whole-image sha256 matches the manifest; the verified manifest and boot files are kept in
   ``<state_dir>/staged/`` -> ``staged``. No entry yet: nothing can boot the slot.

Apply order:
1. Something is staged for the inactive slot; we are in a maintenance window (or ``now``).
2. Re-read the staged manifest (its sha256 is pinned in the state) and re-hash the whole slot
   and the boot files: a slot modified behind the agent's back goes back to ``downloading``.
3. ``pre-install`` hooks; boot files to the ESP (room checked first), synced; the entry with a
   tries counter, written atomically -> ``pending`` (invariant 3); ``post-install`` hooks (a
   failure removes the entry again -> ``staged``); stale entries and boot files pruned.

After the reboot (``boot-check``, the health unit): the booted entry tells what happened:
the new slot -> ``trial`` -> ``health-check`` hooks -> bless -> ``committed`` (floor raised);
the old slot while ``pending``/``trial`` -> ``rolled-back`` (version recorded as failed).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from metadata.errors import DeviceError, Error, PolicyError, RepositoryError, TransportError, UserError
from metadata.manifest import (
    HWID_RE,
    Channel,
    Image,
    Limits,
    Release,
    channel_target_path,
)

from . import boot
from .atomic import write_atomic
from .boot import Entry
from .client import UpdateClient
from .config import Config
from .context import Context
from .esp import DirectoryEsp, Esp
from .fetch import HttpFetcher
from .hooks import run_hooks
from .policy import check_release, floor_of
from .slots import SlotDevice, booted_slot, other_slot
from .state import SlotState, State, Target, load_state, save_state
from .stream import write_image
from .windows import in_window, next_window

__all__ = ["ApplyResult", "Device", "DownloadResult", "InstallResult"]

#: A progress event (a JSON object; see docs/device.md "Progress events").
ProgressFn = Callable[[dict], None]
VERIFY_PIECE = 4 << 20
ESP_MARGIN = 64 << 10  # room left on the ESP besides the boot files (directory entries, temp names)
STAGED_DIR = "staged"


@dataclass
class DownloadResult:
    version: str
    slot: str
    resumed_at_chunk: int
    bytes_downloaded: int
    already: bool = False

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

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _run_command(argv: tuple[str, ...]) -> None:
    try:
        subprocess.run(list(argv), check=True, stdin=subprocess.DEVNULL, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise DeviceError(f"the reboot command {' '.join(argv)!r} failed: {e}",
                          hint="check maintenance.reboot_command; the update is pending and applies at the next reboot") from None


def normalize_hardware_id(value: str) -> str:
    """A DMI string as a hardware id: lowercased, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9._:/+-]+", "-", value.strip().lower()).strip("-")


@dataclass
class Device:
    config: Config
    ctx: Context | None = None
    esp: Esp | None = None
    fetcher: HttpFetcher | None = None
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], datetime] = _utcnow  # the only clock the agent reads (maintenance windows)
    reboot: Callable[[], None] | None = None  # default: run config.reboot_command
    progress: ProgressFn | None = None

    _verified_now: tuple[str, str] | None = field(default=None, init=False, repr=False)

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
        if self.fetcher is None:
            self.fetcher = HttpFetcher(timeout=cfg.http_timeout, deadline=cfg.metadata_deadline,
                                       rate_limit=cfg.bandwidth_limit)
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
            raise DeviceError(f"cannot read the hardware id from DMI ({self.ctx.dmi / fieldname}: {raw!r})",
                              hint=f"set device.hardware_id in {self.config.path}")
        return value

    def booted_entry(self, slot: str) -> Entry | None:
        for var in ("LoaderBootCountPath", "LoaderEntrySelected"):
            value = self.ctx.loader_var(var)
            if value:
                name = value.replace("\\", "/").rsplit("/", 1)[-1]
                e = Entry.parse(name)
                if e:
                    # systemd-boot may have renamed it since (counting): find the current file
                    for cur in boot.list_entries(self.esp):  # LoaderEntrySelected comes lowercased
                        if cur.version.lower() == e.version.lower() and cur.slot == e.slot:
                            return cur
                    return e
        candidates = [e for e in boot.list_entries(self.esp) if e.slot == slot]
        return candidates[0] if len(candidates) == 1 else None

    def _booted_version(self, state: State, slot: str) -> str | None:
        entry = self.booted_entry(slot)
        return entry.version if entry else state.slots[slot].version

    def _reconcile(self, state: State, slot: str) -> State:
        """Fold what the boot loader did since the last run into the state (in memory)."""
        rb = state.rollback
        if rb is not None:
            if slot == rb.get("to_slot"):
                state.rollback = None
                state.state = "rolled-back"
                frm = rb.get("from_slot")
                if frm in state.slots:
                    state.slots[frm].status = "bad"
                v = rb.get("from_version")
                if v and v not in state.failed_versions:
                    state.failed_versions.append(v)
            return state
        t = state.target
        if t is None or state.state not in ("pending", "trial"):
            return state
        if slot == t.slot:
            state.state = "trial"
            return state
        entries = [e for e in boot.list_entries(self.esp) if e.slot == t.slot]
        if not entries or all(e.exhausted for e in entries) or state.state == "trial":
            state.state = "rolled-back"
            state.slots[t.slot].status = "bad"
            if t.version not in state.failed_versions:
                state.failed_versions.append(t.version)
        return state

    def _load(self) -> tuple[State, str]:
        slot = booted_slot(self.config, self.ctx)
        state = load_state(self.config.state_dir)
        return self._reconcile(state, slot), slot

    def _save(self, state: State) -> None:
        save_state(self.config.state_dir, state)

    def _guarded(self, state: State, fn: Callable[[], object]):
        """Run ``fn``; on an abflip error record it as ``last_error`` in the state, then re-raise."""
        try:
            return fn()
        except Error as e:
            state.last_error = e.to_json()
            self._save(state)
            raise

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
        state = load_state(self.config.state_dir)
        try:
            slot: str | None = booted_slot(self.config, self.ctx)
        except DeviceError:
            slot = None
        if slot:
            state = self._reconcile(state, slot)
        entry = self.booted_entry(slot) if slot else None
        entries = boot.list_entries(self.esp) if self.esp.exists(boot.ENTRIES_DIR) else []
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
            "pending_entry": next((e.name for e in entries if e.counting and not e.exhausted), None),
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
        }

    # -- the release on offer --------------------------------------------------------------
    def _client(self) -> UpdateClient:
        return UpdateClient(metadata_url=self.config.metadata_url, targets_url=self.config.targets_url,
                            metadata_dir=self.config.state_dir / "tuf", trusted_root=self.config.trusted_root,
                            fetcher=self.fetcher)

    def _offer(self) -> tuple[UpdateClient, Channel, Release, bytes]:
        """Refresh TUF; the channel pointer and its release manifest, verified and bounded."""
        cfg, limits = self.config, self.limits
        self._emit(phase="refresh")
        client = self._client()
        client.refresh()
        _, chan_bytes = client.fetch_target(channel_target_path(cfg.product, cfg.channel), limits.channel_max_bytes)
        channel = Channel.from_bytes(chan_bytes, limits)
        _, rel_bytes = client.fetch_target(channel.release, limits.manifest_max_bytes)
        release = Release.from_bytes(rel_bytes, limits)
        if release.target_path != channel.release:
            raise RepositoryError(f"{channel.release} holds the manifest of {release.product} {release.version}")
        return client, channel, release, rel_bytes

    def _policy(self, state: State, booted: str, channel: Channel, release: Release, *, allow_downgrade: bool,
                retry_failed: bool) -> None:
        check_release(release, channel, product=self.config.product, hardware_id=self.hardware_id,
                      floor=floor_of(state.floor, self._booted_version(state, booted)),
                      failed_versions=state.failed_versions, allow_downgrade=allow_downgrade, retry_failed=retry_failed)

    def _refuse_if_fallback_needed(self, state: State, booted: str) -> None:
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
        state, booted = self._load()
        _, channel, release, rel_bytes = self._offer()
        manifest_sha = hashlib.sha256(rel_bytes).hexdigest()
        t = state.target
        staged = (t is not None and t.manifest_sha256 == manifest_sha and t.slot == other_slot(booted)
                  and state.state in ("staged", "pending"))
        reason = None
        try:
            self._policy(state, booted, channel, release, allow_downgrade=allow_downgrade, retry_failed=retry_failed)
        except PolicyError as e:
            reason = e.message
        return {"schema": 1, "available": reason is None, "version": str(release.version),
                "current": self._booted_version(state, booted), "reason": reason, "staged": staged,
                "state": state.state, "next_window": self.window_info()}

    # -- download (stage) ------------------------------------------------------------------
    def download(self, *, allow_downgrade: bool = False, retry_failed: bool = False) -> DownloadResult:
        state, booted = self._load()
        return self._guarded(state, lambda: self._download(state, booted, allow_downgrade, retry_failed))

    def _staged_dir(self) -> Path:
        return self.config.state_dir / STAGED_DIR

    def _download(self, state: State, booted: str, allow_downgrade: bool, retry_failed: bool) -> DownloadResult:
        cfg, limits = self.config, self.limits
        self._refuse_if_fallback_needed(state, booted)
        target_slot = other_slot(booted)
        client, channel, release, rel_bytes = self._offer()
        self._policy(state, booted, channel, release, allow_downgrade=allow_downgrade, retry_failed=retry_failed)
        image_info = client.target_info(release.image.target)
        if image_info.length != release.image.compressed_size:
            raise RepositoryError(f"the image target is {image_info.length} bytes, its chunk table adds up to "
                                  f"{release.image.compressed_size}")
        for name, bf in release.boot.files().items():
            info = client.target_info(bf.target)
            if info.hashes.get("sha256") != bf.sha256 or info.length != bf.length:
                raise RepositoryError(f"boot file {name} differs between the manifest and the targets metadata")
        version = str(release.version)
        manifest_sha = hashlib.sha256(rel_bytes).hexdigest()
        slot_cfg = cfg.slots[target_slot]
        t = state.target
        same = t is not None and t.manifest_sha256 == manifest_sha and t.slot == target_slot
        if same and state.state in ("staged", "pending") and self._staged_files_present(release):
            return DownloadResult(version, target_slot, t.chunks_done, 0, already=True)  # type: ignore[union-attr]
        nchunks = len(release.image.chunks)
        with SlotDevice(target_slot, slot_cfg.device, write=True) as dev:
            if release.image.size > dev.capacity:
                raise DeviceError(f"{release.product} {version} needs {release.image.size} bytes; slot {target_slot} "
                                  f"({slot_cfg.device}) holds only {dev.capacity}", hint="this release does not fit "
                                  "this device's slots; nothing was changed")
            resume = same and state.state in ("downloading", "staged", "pending") and state.target is not None
            start = state.target.chunks_done if resume else 0  # type: ignore[union-attr]
            # Invariant 2: nothing may boot the slot while it is being written.
            boot.remove_slot_entries(self.esp, target_slot)
            if not resume:
                state.target = Target(version, target_slot, manifest_sha, 0, nchunks, 0)
                shutil.rmtree(self._staged_dir(), ignore_errors=True)
            state.state = "downloading"
            state.slots[target_slot] = SlotState(version, None, "writing")
            state.last_error = None
            self._save(state)
            target = state.target
            assert target is not None
            base_downloaded = target.bytes_downloaded
            total_bytes = release.image.compressed_size
            first: list[int] = []  # the first chunk written: where the verified prefix really ended

            def on_chunk(i: int, downloaded: int) -> None:
                if not first:
                    first.append(i)
                target.chunks_done = i + 1
                target.bytes_downloaded = base_downloaded + downloaded
                self._save(state)
                self._emit(phase="download", version=version, slot=target_slot, chunk=i + 1, chunks=nchunks,
                           bytes=release.image.chunks[i].offset + release.image.chunks[i].length,
                           total_bytes=total_bytes)

            url = client.target_url(image_info)
            downloaded = write_image(release.image, dev, lambda s, e: self.fetcher.open_range(url, s, e),
                                     chunks_done=start, retries=cfg.retries, on_chunk=on_chunk)
        # write_image hashed every byte it wrote and flushed the slot: install() applies right
        # after without re-reading it; a separate apply (any later call) re-verifies.
        self._verified_now = (target_slot, release.image.sha256)
        target.chunks_done = nchunks
        # The verified manifest and boot files, so apply needs no network (and no re-fetch).
        self._emit(phase="boot-files", version=version)
        staged = self._staged_dir()
        try:
            staged.mkdir(parents=True, exist_ok=True)
            for name, bf in release.boot.files().items():
                if _sha256_file(staged / name) != bf.sha256:
                    _, data = client.fetch_target(bf.target, limits.max_boot_file)
                    write_atomic(staged / name, data)
            write_atomic(staged / "release.json", rel_bytes)
        except OSError as e:
            raise DeviceError(f"cannot keep the staged boot files in {staged}: {e}") from None
        state.state = "staged"
        state.slots[target_slot] = SlotState(version, release.image.sha256, "staged", release.image.size)
        self._save(state)
        return DownloadResult(version, target_slot, first[0] if first else nchunks, downloaded)

    def _staged_files_present(self, release: Release) -> bool:
        staged = self._staged_dir()
        return all(_sha256_file(staged / n) == bf.sha256 for n, bf in release.boot.files().items())

    # -- apply -----------------------------------------------------------------------------
    def apply(self, *, now: bool = False, _just_verified: tuple[str, str] | None = None) -> ApplyResult:
        state, booted = self._load()
        return self._guarded(state, lambda: self._apply(state, booted, now, _just_verified))

    def _check_esp(self) -> None:
        root = getattr(self.esp, "root", None)
        if isinstance(self.esp, DirectoryEsp) and not Path(root).is_dir():
            raise DeviceError(f"the ESP {root} does not exist or is not a directory",
                              hint=f"mount the ESP, or fix paths.esp in {self.config.path}")

    def _apply(self, state: State, booted: str, now: bool, just_verified: tuple[str, str] | None = None) -> ApplyResult:
        cfg, esp = self.config, self.esp
        t = state.target
        if state.state == "pending" and t is not None and t.slot != booted:
            entry = next((e for e in boot.list_entries(esp) if e.slot == t.slot and e.version == t.version
                          and e.counting and not e.exhausted), None)
            if entry is not None:
                return ApplyResult(t.version, t.slot, entry.name, already=True)
        if state.state != "staged" or t is None:
            raise UserError(f"nothing is staged (state {state.state})", hint="run `abflip download` first")
        if t.slot == booted:
            raise DeviceError(f"the staged slot {t.slot} is the booted one", hint="run `abflip download` again")
        if not now and not in_window(cfg.windows, self.clock()):
            nxt = self.window_info()
            raise PolicyError(f"outside the maintenance windows ({'; '.join(w.text for w in cfg.windows)}); the next "
                              f"opens {nxt['start'] if nxt else 'never'}", hint="it is applied then; pass --now to "
                              "apply it anyway")
        self._check_esp()
        release = self._staged_release(t)
        version = t.version
        # Re-verify what we are about to make bootable: the slot and the boot files.
        if just_verified != (t.slot, release.image.sha256) and not self._slot_matches(t.slot, release.image):
            state.state = "downloading"
            state.slots[t.slot] = SlotState(version, None, "writing")
            self._save(state)
            raise DeviceError(f"slot {t.slot} was modified after {version} was staged: its sha256 no longer matches",
                              hint="run `abflip download` to repair it (changed chunks are written again)")
        files = {}
        for name, bf in release.boot.files().items():
            try:
                data = (self._staged_dir() / name).read_bytes()
            except OSError:
                data = b""
            if hashlib.sha256(data).hexdigest() != bf.sha256:
                state.state = "downloading"
                self._save(state)
                raise DeviceError(f"the staged boot file {name} of {version} is missing or modified",
                                  hint="run `abflip download` to fetch it again")
            files[name] = data
        need = sum(len(d) for d in files.values()) + ESP_MARGIN
        existing = sum(len(esp.read(f"{boot.boot_dir(version)}/{n}")) for n in files
                       if esp.exists(f"{boot.boot_dir(version)}/{n}"))
        try:
            free = esp.free_bytes()
        except OSError as e:
            raise DeviceError(f"cannot read the ESP's free space: {e}") from None
        if free + existing < need:
            raise DeviceError(f"the ESP has {free} bytes free; {version}'s boot files need {need}",
                              hint="free space on the ESP (other operating systems' files are never removed by abflip)")
        env = self._hook_env(state, booted, t)
        run_hooks(cfg.hooks_dir, "pre-install", env=env, timeout=cfg.hook_timeout)
        # Boot files, then the entry: the slot becomes bootable only now (invariant 3).
        self._emit(phase="apply", version=version, slot=t.slot)
        try:
            for name, data in files.items():
                esp.write_atomic(f"{boot.boot_dir(version)}/{name}", data)
            esp.sync()
        except OSError as e:
            self._prune(state, booted)
            raise DeviceError(f"writing boot files to the ESP failed: {e}",
                              hint="check the ESP is mounted and has room; nothing boots the new slot") from None
        entry = Entry.new(version, t.slot, cfg.tries)
        boot.write_entry(esp, entry, boot.entry_text(product=release.product, version=version, slot=t.slot,
                                                     partlabel=cfg.slots[t.slot].partlabel,
                                                     options=release.boot.options,
                                                     has_initrd=release.boot.initrd is not None,
                                                     uki=release.boot.uki is not None))
        state.state = "pending"
        state.last_error = None
        self._save(state)
        try:
            run_hooks(cfg.hooks_dir, "post-install", env=env, timeout=cfg.hook_timeout)
        except Error:
            boot.remove_slot_entries(esp, t.slot)
            state.state = "staged"
            self._save(state)
            raise
        self._prune(state, booted)
        return ApplyResult(version, t.slot, entry.name)

    def _staged_release(self, t: Target) -> Release:
        path = self._staged_dir() / "release.json"
        try:
            raw = path.read_bytes()
        except OSError:
            raw = b""
        if hashlib.sha256(raw).hexdigest() != t.manifest_sha256:
            raise DeviceError(f"the staged manifest {path} is missing or does not match the state",
                              hint="run `abflip download` again")
        return Release.from_bytes(raw, self.limits)

    def _slot_matches(self, slot: str, image: Image) -> bool:
        return self._slot_hash_ok(slot, image.sha256, image.size)

    def _hook_env(self, state: State, booted: str, t: Target | None) -> dict[str, str]:
        env = {"ABFLIP_BOOTED_SLOT": booted, "ABFLIP_STATE": state.state, "ABFLIP_CONFIG": str(self.config.path)}
        if t is not None:
            env.update(ABFLIP_VERSION=t.version, ABFLIP_SLOT=t.slot,
                       ABFLIP_SLOT_DEVICE=str(self.config.slots[t.slot].device))
        return env

    def _prune(self, state: State, booted: str) -> None:
        """ESP hygiene: only entries and boot files of the two slots' current versions remain."""
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
        except DeviceError:
            pass  # hygiene must not fail an otherwise good operation

    # -- install = download + apply --now ---------------------------------------------------
    def install(self, *, allow_downgrade: bool = False, retry_failed: bool = False) -> InstallResult:
        self._verified_now = None
        d = self.download(allow_downgrade=allow_downgrade, retry_failed=retry_failed)
        a = self.apply(now=True, _just_verified=self._verified_now)
        return InstallResult(a.version, a.slot, a.entry, d.resumed_at_chunk, d.bytes_downloaded,
                             already=d.already and a.already)

    # -- run: what the timer calls ---------------------------------------------------------
    def run(self, *, allow_downgrade: bool = False, retry_failed: bool = False, reboot: bool = True) -> dict:
        """One pass: check -> download -> apply if in a window -> reboot. Idempotent."""
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
            out["apply"] = self.apply().to_json()
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

    # -- after the reboot ------------------------------------------------------------------
    def mark_good(self, *, health: bool = True) -> dict:
        """Run the health-check hooks (on a trial boot), then bless the booted entry; commit a
        trial update. Idempotent."""
        state, slot = self._load()
        return self._guarded(state, lambda: self._mark_good(state, slot, health))

    def _mark_good(self, state: State, slot: str, health: bool) -> dict:
        t = state.target
        trial = state.state == "trial" and t is not None and t.slot == slot
        if trial and health:
            run_hooks(self.config.hooks_dir, "health-check", env=self._hook_env(state, slot, t),
                      timeout=self.config.hook_timeout)
        entry = self.booted_entry(slot)
        if entry is not None and entry.counting:
            entry = boot.bless(self.esp, entry)
        if trial:
            state.state = "committed"
            state.floor = t.version
            state.slots[slot].status = "good"
            state.last_error = None
        elif state.slots[slot].status in ("unknown", "staged"):
            state.slots[slot].status = "good"
            if entry is not None:
                state.slots[slot].version = entry.version
        self._save(state)
        if trial:
            self._prune(state, slot)
        return self.status()

    def boot_check(self) -> dict:
        """What the health unit runs on every boot (before boot-complete.target).

        Records what the boot loader did; on the trial boot of a new slot runs the
        ``health-check`` hooks and blesses it (-> committed), or, if they fail, marks its entry
        bad (tries used up), records the version as failed, runs the reboot command and raises.
        """
        state, slot = self._load()
        self._save(state)
        if state.state == "trial" and state.target is not None and state.target.slot == slot:
            try:
                return self.mark_good()
            except Error as e:
                state, slot = self._load()
                entry = self.booted_entry(slot)
                if entry is not None and entry.counting:
                    boot.mark_bad(self.esp, entry)
                t = state.target
                state.rollback = {"from_slot": slot, "from_version": t.version if t else None,
                                  "to_slot": other_slot(slot), "to_version": state.slots[other_slot(slot)].version}
                state.last_error = e.to_json()
                self._save(state)
                if self.reboot is not None:
                    self.reboot()
                raise
        if state.state in ("committed", "rolled-back", "idle"):
            self._prune(state, slot)
        return self.status()

    # -- rollback --------------------------------------------------------------------------
    def rollback(self) -> dict:
        """Make the other slot the next boot (or cancel a pending update). See docs/device.md."""
        state, slot = self._load()
        return self._guarded(state, lambda: self._rollback(state, slot))

    def _rollback(self, state: State, slot: str) -> dict:
        esp = self.esp
        other = other_slot(slot)
        t = state.target
        if state.rollback is not None and state.rollback.get("from_slot") == slot:
            return {**self.status(), "action": "already-requested"}
        if state.state == "pending" and t is not None and t.slot == other:
            # Not booted yet: withdraw the update. The version is recorded as failed (not retried by itself).
            boot.remove_slot_entries(esp, other)
            state.state = "rolled-back"
            if t.version not in state.failed_versions:
                state.failed_versions.append(t.version)
            state.slots[other].status = "bad"
            self._save(state)
            self._prune(state, slot)
            return {**self.status(), "action": "cancelled-pending"}
        s = state.slots[other]
        other_entries = [e for e in boot.list_entries(esp) if e.slot == other and not e.exhausted]
        if s.status != "good" or not other_entries:
            raise DeviceError(f"slot {other} holds no verified, bootable system to roll back to (status {s.status}, "
                              f"{len(other_entries)} usable boot entries)", hint="nothing was changed")
        if s.sha256 and s.size and not self._slot_hash_ok(other, s.sha256, s.size):
            raise DeviceError(f"slot {other} no longer matches the sha256 it was verified with",
                              hint="nothing was changed; it cannot be rolled back to")
        entry = self.booted_entry(slot)
        if entry is None:
            raise DeviceError(f"cannot find the boot entry of the booted slot {slot}", hint="nothing was changed")
        boot.mark_bad(esp, entry)  # sorts last: systemd-boot now picks the other slot, this one stays a last resort
        state.rollback = {"from_slot": slot, "from_version": entry.version, "to_slot": other, "to_version": s.version}
        self._save(state)
        return {**self.status(), "action": "rollback-on-reboot"}

    def _slot_hash_ok(self, slot: str, sha: str, size: int) -> bool:
        h = hashlib.sha256()
        with SlotDevice(slot, self.config.slots[slot].device, write=False) as dev:
            if dev.capacity < size:
                return False
            for off in range(0, size, VERIFY_PIECE):
                h.update(dev.pread(off, min(VERIFY_PIECE, size - off)))
                self._emit(phase="verify", slot=slot, bytes=min(size, off + VERIFY_PIECE), total_bytes=size)
        return h.hexdigest() == sha


def _sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


