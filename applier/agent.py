"""The device's state machine: install (download -> verify -> stage -> entry), status, mark-good.

Install order (the invariants of DESIGN.md, in the order they are kept):
1. Find the booted slot; refuse if unknown. The target is the *other* slot (never the booted one).
2. Refresh TUF metadata; fetch the channel pointer and the release manifest, both verified
   against signed targets metadata and bounded in size.
3. Policy: product, hardware id, version floor, versions that failed before.
4. Remove every boot entry that points at the target slot, and sync (invariant 2).
5. Stream: verify each chunk, decompress, write; persist progress after each chunk.
6. Whole-image sha256 matches the manifest -> ``staged``.
7. Boot files to the ESP (verified targets), synced; then the entry with a tries counter,
   written atomically -> ``pending``. Only now can the slot boot (invariant 3).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from metadata.errors import DeviceError, Error, RepositoryError
from metadata.manifest import Channel, Limits, Release, channel_target_path

from . import boot
from .boot import Entry
from .client import UpdateClient
from .config import Config
from .context import Context
from .esp import DirectoryEsp, Esp
from .fetch import HttpFetcher
from .policy import check_release, floor_of
from .slots import SlotDevice, booted_slot, other_slot
from .state import SlotState, State, Target, load_state, save_state
from .stream import write_image

__all__ = ["Device", "InstallResult"]

Progress = Callable[[str, int, int], None]  # (phase, done, total)


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


@dataclass
class Device:
    config: Config
    ctx: Context | None = None
    esp: Esp | None = None
    fetcher: HttpFetcher | None = None
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.ctx is None:
            self.ctx = Context(cmdline=self.config.cmdline, efivars=self.config.efivars)
        if self.esp is None:
            self.esp = DirectoryEsp(self.config.esp)
        if self.fetcher is None:
            self.fetcher = HttpFetcher(timeout=self.config.http_timeout)

    # -- what is booted --------------------------------------------------------------------
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

    def _reconcile(self, state: State, slot: str) -> State:
        """Fold what the boot loader did since the last run into the state (in memory)."""
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

    # -- status ----------------------------------------------------------------------------
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
        }

    # -- install ---------------------------------------------------------------------------
    def _client(self) -> UpdateClient:
        return UpdateClient(metadata_url=self.config.metadata_url, targets_url=self.config.targets_url,
                            metadata_dir=self.config.state_dir / "tuf", trusted_root=self.config.trusted_root,
                            fetcher=self.fetcher)

    def install(self, *, allow_downgrade: bool = False, retry_failed: bool = False,
                progress: Progress | None = None) -> InstallResult:
        state, booted = self._load()
        try:
            return self._install(state, booted, allow_downgrade, retry_failed, progress)
        except Error as e:
            state.last_error = e.to_json()
            save_state(self.config.state_dir, state)
            raise

    def _install(self, state: State, booted: str, allow_downgrade: bool, retry_failed: bool,
                 progress: Progress | None) -> InstallResult:
        cfg, esp, limits = self.config, self.esp, self.limits
        target_slot = other_slot(booted)
        client = self._client()
        client.refresh()
        _, chan_bytes = client.fetch_target(channel_target_path(cfg.product, cfg.channel), limits.channel_max_bytes)
        channel = Channel.from_bytes(chan_bytes, limits)
        _, rel_bytes = client.fetch_target(channel.release, limits.manifest_max_bytes)
        release = Release.from_bytes(rel_bytes, limits)
        if release.target_path != channel.release:
            raise RepositoryError(f"{channel.release} holds the manifest of {release.product} {release.version}")
        booted_entry = self.booted_entry(booted)
        booted_version = booted_entry.version if booted_entry else state.slots[booted].version
        check_release(release, channel, product=cfg.product, hardware_id=cfg.hardware_id,
                      floor=floor_of(state.floor, booted_version), failed_versions=state.failed_versions,
                      allow_downgrade=allow_downgrade, retry_failed=retry_failed)
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
        if same and state.state == "pending":
            entry = next((e for e in boot.list_entries(esp) if e.slot == target_slot and e.version == version), None)
            if entry is not None:
                return InstallResult(version, target_slot, entry.name, t.chunks_done, 0, already=True)
        with SlotDevice(target_slot, slot_cfg.device, write=True) as dev:
            if release.image.size > dev.capacity:
                raise DeviceError(f"{release.product} {version} needs {release.image.size} bytes; slot {target_slot} "
                                  f"({slot_cfg.device}) holds only {dev.capacity}", hint="this release does not fit "
                                  "this device's slots; nothing was changed")
            resume = same and state.state in ("downloading", "staged", "pending") and state.target is not None
            start = state.target.chunks_done if resume else 0  # type: ignore[union-attr]
            # Invariant 2: nothing may boot the slot while it is being written.
            boot.remove_slot_entries(esp, target_slot)
            if not resume:
                state.target = Target(version, target_slot, manifest_sha, 0, len(release.image.chunks), 0)
            state.state = "downloading"
            state.slots[target_slot] = SlotState(version, None, "writing")
            state.last_error = None
            save_state(cfg.state_dir, state)
            target = state.target
            assert target is not None
            base_downloaded = target.bytes_downloaded

            def on_chunk(i: int, downloaded: int) -> None:
                target.chunks_done = i + 1
                target.bytes_downloaded = base_downloaded + downloaded
                save_state(cfg.state_dir, state)
                if progress:
                    progress("download", i + 1, len(release.image.chunks))

            url = client.target_url(image_info)
            downloaded = write_image(release.image, dev, lambda s, e: self.fetcher.open_range(url, s, e),
                                     chunks_done=start, retries=cfg.retries, on_chunk=on_chunk)
        target.chunks_done = len(release.image.chunks)
        state.state = "staged"
        state.slots[target_slot] = SlotState(version, release.image.sha256, "staged")
        save_state(cfg.state_dir, state)
        # Boot files, then the entry: the slot becomes bootable only now (invariant 3).
        try:
            for name, bf in release.boot.files().items():
                _, data = client.fetch_target(bf.target, limits.max_boot_file)
                esp.write_atomic(f"{boot.boot_dir(version)}/{name}", data)
            esp.sync()
        except OSError as e:
            raise DeviceError(f"writing boot files to the ESP failed: {e}", hint="check the ESP is mounted and has room") from None
        entry = Entry.new(version, target_slot, cfg.tries)
        boot.write_entry(esp, entry, boot.entry_text(product=release.product, version=version, slot=target_slot,
                                                      partlabel=slot_cfg.partlabel, options=release.boot.options,
                                                      has_initrd=release.boot.initrd is not None))
        state.state = "pending"
        save_state(cfg.state_dir, state)
        boot.prune_boot_files(esp)
        return InstallResult(version, target_slot, entry.name, start, downloaded)

    # -- after the reboot ------------------------------------------------------------------
    def mark_good(self) -> dict:
        """Bless the booted entry; commit the update if this is its trial boot. Idempotent."""
        state, slot = self._load()
        entry = self.booted_entry(slot)
        if entry is not None and entry.counting:
            entry = boot.bless(self.esp, entry)
        t = state.target
        if state.state == "trial" and t is not None and t.slot == slot:
            state.state = "committed"
            state.floor = t.version
            state.slots[slot].status = "good"
        elif state.slots[slot].status in ("unknown", "staged"):
            state.slots[slot].status = "good"
            if entry is not None:
                state.slots[slot].version = entry.version
        save_state(self.config.state_dir, state)
        return self.status()
