"""Writing the inactive slot (download) and making it bootable (apply).

Download order (docs/invariants.md, in the order they are kept):
1. Find the booted slot; refuse if unknown. The target is the *other* slot (never the booted one,
   compared by device identity, whatever the config says). Refuse while the booted slot is on
   trial or a requested rollback waits for its reboot: the inactive slot is then the fallback.
2. Refresh TUF metadata; fetch the channel pointer and the release manifest, both verified
   against signed targets metadata and bounded in size.
3. Policy: product, hardware id, version floor, versions that failed before; the release's
   memory need within this device's budget (``limits.memory``).
4. Remove every boot entry that points at the target slot, and sync (invariant 2).
5. State ``downloading`` (write-ahead); stream: verify each chunk, decompress, write; persist
   progress after each chunk.
6. Whole-image sha256 matches the manifest; the verified manifest and boot files are kept in
   ``<state_dir>/staged/`` (streamed, never held whole in memory) -> ``staged``. No entry yet:
   nothing can boot the slot.

Apply order:
1. Something is staged for the inactive slot; we are in a maintenance window (or ``now``).
2. Re-read the staged manifest (its sha256 is pinned in the state) and re-hash the whole slot
   and the boot files: a slot modified behind the agent's back goes back to ``downloading``.
3. ``pre-install`` hooks; boot files to ``/abflip/<version>-<slot>/`` (room checked first),
   synced; state ``pending`` (write-ahead); the entry with a tries counter, written atomically
   and synced (invariant 3); ``post-install`` hooks (a failure removes the entry again ->
   ``staged``); stale entries and boot files pruned.
A failure after a write either undoes it or says exactly what stays changed.

Each verb takes its collaborators explicitly: the :class:`~applier.session.Session` (config,
boot loader, state, progress) and the :class:`~applier.offer.Offer` (the repository). The phase
moves only through :func:`applier.lifecycle.move`, after :func:`applier.lifecycle.require` said
the verb may run in it.

Apply never makes a stage bootable that the channel no longer offers (docs/release-control.md):
unless the stage was verified by this very command (``install``), apply refreshes the offer; a
staged release that was withdrawn, or replaced by another, is discarded: the slot's entries are
removed (there are none while staged), then the state says ``idle``/``committed`` with no target
and the slot ``unknown`` (write-ahead of the cleanup), then ``staged/`` is removed; apply ends
with :class:`StageDiscarded` saying why. With the network down what is staged is applied.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from metadata.bounded import open_regular, read_file
from metadata.errors import DeviceError, Error, PolicyError, RepositoryError, UserError
from metadata.manifest import Release

from . import delta
from .atomic import write_atomic
from .bootloader import BootSpec
from .bootloader.esp import DirectoryEsp
from .download_record import RECORD
from .hooks import hook_env, run_hooks
from .lifecycle import Event, Phase, move, phase_of, require, settled
from .offer import Offer, no_longer_offered
from .policy import StageDiscarded
from .session import Session
from .slots import SlotDevice, other_slot, slot_hash_ok
from .state import SlotState, State, Target
from .stream import memory_needed, write_image
from .windows import in_window

__all__ = ["ApplyResult", "DownloadResult", "InstallResult", "apply", "discard", "download", "install",
           "staged_dir"]

COPY_PIECE = 1 << 20
ESP_MARGIN = 64 << 10  # room left on the ESP besides the boot files (directory entries, temp names)
STAGED_DIR = "staged"


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
    # (slot, image sha256) this very call verified while streaming (not in the JSON): install's apply
    # does not hash the slot a second time
    verified: tuple[str, str] | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "verified"}


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


def staged_dir(session: Session) -> Path:
    return session.config.state_dir / STAGED_DIR


def _check_memory(session: Session, release: Release) -> None:
    budget = session.config.memory_budget
    need = memory_needed(release.image) + COPY_PIECE  # + streaming a boot file
    if need > budget:
        raise PolicyError(f"{release.product} {release.version} needs about {need >> 20} MiB of memory to install "
                          f"(chunks of up to {max(c.out_length for c in release.image.chunks) >> 20} MiB, a "
                          f"{release.image.compression.window >> 20} MiB window); this device's budget is "
                          f"{budget >> 20} MiB", hint=f"nothing was changed; raise limits.memory in "
                                                      f"{session.config.path} if the device has the memory, or ask "
                                                      "the publisher for smaller chunks")


def _sha256_file(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open_regular(path) as f:
            while piece := f.read(COPY_PIECE):
                h.update(piece)
    except OSError:
        return None
    return h.hexdigest()


def _open_target(session: Session, target_slot: str, booted: str, *, write: bool) -> SlotDevice:
    slots = session.config.slots
    return SlotDevice(target_slot, slots[target_slot].device, write=write, booted=slots[booted].device)


# -- download ---------------------------------------------------------------------------------
def download(session: Session, offer: Offer, *, allow_downgrade: bool = False,
             retry_failed: bool = False) -> DownloadResult:
    cfg, boot = session.config, session.boot
    loaded = session.load()
    state, booted = loaded.state, loaded.booted
    require(state, Event.DOWNLOAD, booted)  # never while the other slot is the fallback
    target_slot = other_slot(booted)
    offered = offer.fetch()
    release, client = offered.release, offer.client
    offer.judge(state, booted, offered, allow_downgrade=allow_downgrade, retry_failed=retry_failed)
    _check_memory(session, release)
    image_info = client.target_info(release.image.target)
    if image_info.length != release.image.compressed_size:
        raise RepositoryError(f"the image target is {image_info.length} bytes, its chunk table adds up to "
                              f"{release.image.compressed_size}")
    boot_infos = {}
    for name, bf in release.boot.files().items():
        info = client.target_info(bf.target)
        if info.hashes.get("sha256") != bf.sha256 or info.length != bf.length:
            raise RepositoryError(f"boot file {name} differs between the manifest and the targets metadata")
        boot_infos[name] = info
    version = offered.version
    manifest_sha = offered.manifest_sha256
    t = state.target
    same = t is not None and t.manifest_sha256 == manifest_sha and t.slot == target_slot
    if same and state.state in (Phase.STAGED, Phase.PENDING) and _staged_files_present(session, release):
        return DownloadResult(version, target_slot, t.chunks_done, 0, already=True)  # type: ignore[union-attr]
    nchunks = len(release.image.chunks)
    via = delta.plan_for(session, client, release, state, booted)  # a delta from the booted image, or the full image
    with _open_target(session, target_slot, booted, write=True) as slot_dev:
        if release.image.size > slot_dev.capacity:
            raise DeviceError(f"{release.product} {version} needs {release.image.size} bytes; slot {target_slot} "
                              f"({cfg.slots[target_slot].device}) holds only {slot_dev.capacity}",
                              hint="this release does not fit this device's slots; nothing was changed")
        resume = same and state.state in (Phase.DOWNLOADING, Phase.STAGED, Phase.PENDING) and t is not None
        start = t.chunks_done if resume else 0  # type: ignore[union-attr]
        # Invariant 2: nothing may boot the slot while it is being written.
        boot.remove_slot(target_slot)
        if not resume:
            state.target = Target(version, target_slot, manifest_sha, 0, nchunks, 0)
            shutil.rmtree(staged_dir(session), ignore_errors=True)
        move(state, Event.DOWNLOAD)
        state.slots[target_slot] = SlotState(version, None, "writing")
        state.last_error = None
        session.save(state)
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
            session.save(state)
            session.emit(phase="download", version=version, slot=target_slot, chunk=i + 1, chunks=nchunks,
                         bytes=release.image.chunks[i].offset + release.image.chunks[i].length,
                         total_bytes=total_bytes)

        url = client.target_url(image_info)
        fetcher = offer.fetcher
        if via.plan is None:
            downloaded = write_image(release.image, slot_dev, lambda s, e: fetcher.open_range(url, s, e),
                                     chunks_done=start, retries=cfg.retries, on_chunk=on_chunk)
        else:
            downloaded = delta.write_planned(session, fetcher, via, release, slot_dev, booted, url, start, on_chunk)
    target.chunks_done = nchunks
    # The verified manifest and boot files, so apply needs no network (and no re-fetch).
    session.emit(phase="boot-files", version=version)
    staged = staged_dir(session)
    try:
        staged.mkdir(parents=True, exist_ok=True)
        for name, bf in release.boot.files().items():
            if _sha256_file(staged / name) != bf.sha256:
                client.download_target(boot_infos[name], staged / name)  # streamed, bounded, verified, atomic
        write_atomic(staged / RECORD, via.record(release, downloaded, base_downloaded))
        write_atomic(staged / "release.json", offered.manifest)
    except OSError as e:
        raise DeviceError(f"cannot keep the staged boot files in {staged}: {e}",
                          hint="the slot is written and verified; free space in the state directory and run "
                               "`abflip download` again (it does not download the image again)") from None
    move(state, Event.DOWNLOADED)
    state.slots[target_slot] = SlotState(version, release.image.sha256, "staged", release.image.size)
    session.save(state)
    # write_image hashed every byte it wrote and flushed the slot: install applies right after
    # without re-reading it; a separate apply (any later call) re-verifies.
    return DownloadResult(version, target_slot, first[0] if first else nchunks, downloaded, **via.result(release),
                          verified=(target_slot, release.image.sha256))


def _staged_files_present(session: Session, release: Release) -> bool:
    staged = staged_dir(session)
    return all(_sha256_file(staged / n) == bf.sha256 for n, bf in release.boot.files().items())


# -- apply ------------------------------------------------------------------------------------
def _check_esp(session: Session) -> None:
    esp = session.boot.esp
    if isinstance(esp, DirectoryEsp) and not Path(esp.root).is_dir():
        raise DeviceError(f"the ESP {esp.root} does not exist or is not a directory",
                          hint=f"mount the ESP, or fix paths.esp in {session.config.path}")


def _staged_release(session: Session, t: Target) -> Release:
    path = staged_dir(session) / "release.json"
    try:
        raw = read_file(path, session.limits.manifest_max_bytes)
    except OSError:  # also FileRefused
        raw = b""
    if hashlib.sha256(raw).hexdigest() != t.manifest_sha256:
        raise DeviceError(f"the staged manifest {path} is missing or does not match the state",
                          hint="run `abflip download` again")
    return Release.from_bytes(raw, session.limits)


def _undo_entry(session: Session, slot: str) -> str:
    """Remove the slot's entries after a failure; say what stays if that fails too."""
    try:
        session.boot.remove_slot(slot)
    except Error as e:
        return (f"; removing its entry failed as well ({e.message}): slot {slot} (verified) may boot at the next "
                "reboot, and boot-check then judges it as a trial")
    return ""


def apply(session: Session, offer: Offer, *, now: bool = False,
          just_verified: tuple[str, str] | None = None) -> ApplyResult:
    cfg, boot = session.config, session.boot
    loaded = session.load()
    state, booted = loaded.state, loaded.booted
    t = state.target
    phase = require(state, Event.APPLY, booted)
    if phase == Phase.PENDING and t is not None and t.slot != booted:
        entry = next((e for e in boot.entries() if e.slot == t.slot and e.version == t.version
                      and e.counting and not e.exhausted), None)
        if entry is not None:
            return ApplyResult(t.version, t.slot, entry.name, already=True)
    if phase != Phase.STAGED or t is None:
        raise UserError(f"nothing is staged (state {state.state})", hint="run `abflip download` first")
    if t.slot == booted:
        raise DeviceError(f"the staged slot {t.slot} is the booted one", hint="run `abflip download` again")
    if not now and not in_window(cfg.windows, session.clock()):
        nxt = session.window_info()
        raise PolicyError(f"outside the maintenance windows ({'; '.join(w.text for w in cfg.windows)}); the next "
                          f"opens {nxt['start'] if nxt else 'never'}", hint="it is applied then; pass --now to "
                          "apply it anyway")
    if just_verified is None and (why := no_longer_offered(offer, t)) is not None:
        discard(session, state, booted)
        raise StageDiscarded(f"{why}: the staged {t.version} was discarded, not applied (slot {t.slot} stays "
                             "inactive, no boot entry)", hint="nothing to do: the device takes what its channel "
                                                              "offers at the next check")
    _check_esp(session)
    release = _staged_release(session, t)
    version = t.version
    # Re-verify what we are about to make bootable: the slot and the boot files.
    if just_verified != (t.slot, release.image.sha256) and not slot_hash_ok(session, t.slot, release.image.sha256,
                                                                            release.image.size):
        move(state, Event.SLOT_MODIFIED)
        state.slots[t.slot] = SlotState(version, None, "writing")
        session.save(state)
        raise DeviceError(f"slot {t.slot} was modified after {version} was staged: its sha256 no longer matches",
                          hint="run `abflip download` to repair it (changed chunks are written again)")
    files = {}
    for name, bf in release.boot.files().items():
        path = staged_dir(session) / name
        if _sha256_file(path) != bf.sha256:
            move(state, Event.SLOT_MODIFIED)
            session.save(state)
            raise DeviceError(f"the staged boot file {name} of {version} is missing or modified",
                              hint="run `abflip download` to fetch it again")
        files[name] = (path, bf.length)
    # Room: what no entry references goes first (the slot's entries went when it was written).
    try:
        boot.prune_files()
    except DeviceError:
        pass
    need = sum(n for _, n in files.values()) + ESP_MARGIN
    free = boot.free_bytes()
    if free < need:
        raise DeviceError(f"the ESP has {free} bytes free; {version}'s boot files need {need}",
                          hint="free space on the ESP (other operating systems' files are never removed by abflip)")
    spec = boot_spec(session, release, version, t.slot)
    env = hook_env(cfg, state, booted, t)
    run_hooks(cfg.hooks_dir, "pre-install", env=env, timeout=cfg.hook_timeout)
    # 1. Boot files (nothing references them yet: a failure here changes nothing that boots).
    session.emit(phase="apply", version=version, slot=t.slot)
    boot.install_files(version, t.slot, {name: path for name, (path, _) in files.items()})
    # 2. Write-ahead: the state says pending before anything can boot the slot.
    move(state, Event.APPLY)
    state.last_error = None
    session.save(state)  # fails -> nothing boots the new slot; unreferenced boot files are pruned later
    # 3. The entry: from here on the next boot tries the new slot.
    try:
        entry = boot.add_trial(spec, cfg.tries)
    except Error as e:
        undone = _undo_entry(session, t.slot)
        move(state, Event.APPLY_UNDONE)
        try:
            session.save(state)
        except Error:
            pass  # the file says pending with no entry: the next command returns it to staged
        raise DeviceError(f"{e.message}{undone or '; nothing boots the new slot (still staged)'}",
                          hint=e.hint) from None
    try:
        run_hooks(cfg.hooks_dir, "post-install", env=env, timeout=cfg.hook_timeout)
    except Error as e:
        undone = _undo_entry(session, t.slot)
        if undone:
            e.message += undone
            e.args = (e.message,)
            raise
        move(state, Event.APPLY_UNDONE)
        try:
            session.save(state)
        except Error:
            pass  # pending with no entry reconciles to staged
        raise
    session.prune(state, booted)
    return ApplyResult(version, t.slot, entry.name)


def boot_spec(session: Session, release: Release, version: str, slot: str) -> BootSpec:
    """What ``slot``'s entry boots: the verified release's boot fields and verity tree, the slot's label."""
    return BootSpec(product=release.product, version=version, slot=slot,
                    partlabel=session.config.slots[slot].partlabel, options=release.boot.options,
                    files=tuple(release.boot.files()), verity=release.image.verity)


def discard(session: Session, state: State, booted: str) -> None:
    """Forget a staged (or pending) release in write order: the entries of its slot removed and
    synced, then the state without a target (write-ahead of the cleanup), then the staged files.
    Killed before the save: still staged (pending with its entry gone is staged), and the next
    apply discards it again."""
    t = state.target
    assert t is not None and phase_of(state) in (Phase.STAGED, Phase.PENDING, Phase.DOWNLOADING)
    session.boot.remove_slot(t.slot)
    to = settled(state, booted, session.booted_version(state, booted))
    state.target = None
    state.slots[t.slot] = SlotState(None, None, "unknown", None)
    move(state, Event.DISCARD, to=to)
    session.save(state)
    shutil.rmtree(staged_dir(session), ignore_errors=True)


def install(session: Session, offer: Offer, *, allow_downgrade: bool = False,
            retry_failed: bool = False) -> InstallResult:
    """download + apply --now, under one lock; each its own verb (last error, history)."""
    with session.locked():
        d = session.guarded(lambda: download(session, offer, allow_downgrade=allow_downgrade,
                                             retry_failed=retry_failed), "download")
        a = session.guarded(lambda: apply(session, offer, now=True, just_verified=d.verified), "apply")
    return InstallResult(a.version, a.slot, a.entry, d.resumed_at_chunk, d.bytes_downloaded,
                         already=d.already and a.already, kind=d.kind, delta_from=d.delta_from)
