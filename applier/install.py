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
from pathlib import Path

from metadata.bounded import open_regular, read_file
from metadata.errors import DeviceError, Error, PolicyError, RepositoryError, TransportError, UserError
from metadata.manifest import Release

from . import boot, delta
from .atomic import write_atomic
from .boot import Entry
from .download_record import RECORD
from .esp import DirectoryEsp
from .hooks import hook_env, run_hooks
from .policy import StageDiscarded
from .slots import SlotDevice, other_slot, slot_hash_ok
from .state import SlotState, State, Target
from .stream import memory_needed, write_image
from .windows import in_window

__all__ = ["apply", "download"]

COPY_PIECE = 1 << 20
ESP_MARGIN = 64 << 10  # room left on the ESP besides the boot files (directory entries, temp names)
STAGED_DIR = "staged"


def staged_dir(dev) -> Path:
    return dev.config.state_dir / STAGED_DIR


def _check_memory(dev, release: Release) -> None:
    budget = dev.config.memory_budget
    need = memory_needed(release.image) + COPY_PIECE  # + streaming a boot file
    if need > budget:
        raise PolicyError(f"{release.product} {release.version} needs about {need >> 20} MiB of memory to install "
                          f"(chunks of up to {max(c.out_length for c in release.image.chunks) >> 20} MiB, a "
                          f"{release.image.compression.window >> 20} MiB window); this device's budget is "
                          f"{budget >> 20} MiB", hint=f"nothing was changed; raise limits.memory in {dev.config.path} "
                          "if the device has the memory, or ask the publisher for smaller chunks")


def _sha256_file(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open_regular(path) as f:
            while piece := f.read(COPY_PIECE):
                h.update(piece)
    except OSError:
        return None
    return h.hexdigest()


def _open_target(dev, target_slot: str, booted: str, *, write: bool) -> SlotDevice:
    slots = dev.config.slots
    return SlotDevice(target_slot, slots[target_slot].device, write=write, booted=slots[booted].device)


# -- download ---------------------------------------------------------------------------------
def download(dev, *, allow_downgrade: bool, retry_failed: bool):
    from .agent import DownloadResult

    cfg, esp = dev.config, dev.esp
    state, booted = dev._load()
    dev.refuse_if_fallback_needed(state, booted)
    target_slot = other_slot(booted)
    client, channel, release, rel_bytes = dev._offer()
    dev._policy(state, booted, channel, release, allow_downgrade=allow_downgrade, retry_failed=retry_failed)
    _check_memory(dev, release)
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
    version = str(release.version)
    manifest_sha = hashlib.sha256(rel_bytes).hexdigest()
    t = state.target
    same = t is not None and t.manifest_sha256 == manifest_sha and t.slot == target_slot
    if same and state.state in ("staged", "pending") and _staged_files_present(dev, release):
        return DownloadResult(version, target_slot, t.chunks_done, 0, already=True)  # type: ignore[union-attr]
    nchunks = len(release.image.chunks)
    via = delta.plan_for(dev, client, release, state, booted)  # a delta from the booted image, or the full image
    with _open_target(dev, target_slot, booted, write=True) as slot_dev:
        if release.image.size > slot_dev.capacity:
            raise DeviceError(f"{release.product} {version} needs {release.image.size} bytes; slot {target_slot} "
                              f"({cfg.slots[target_slot].device}) holds only {slot_dev.capacity}",
                              hint="this release does not fit this device's slots; nothing was changed")
        resume = same and state.state in ("downloading", "staged", "pending") and state.target is not None
        start = state.target.chunks_done if resume else 0  # type: ignore[union-attr]
        # Invariant 2: nothing may boot the slot while it is being written.
        boot.remove_slot_entries(esp, target_slot)
        if not resume:
            state.target = Target(version, target_slot, manifest_sha, 0, nchunks, 0)
            shutil.rmtree(staged_dir(dev), ignore_errors=True)
        state.state = "downloading"
        state.slots[target_slot] = SlotState(version, None, "writing")
        state.last_error = None
        dev._save(state)
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
            dev._save(state)
            dev._emit(phase="download", version=version, slot=target_slot, chunk=i + 1, chunks=nchunks,
                      bytes=release.image.chunks[i].offset + release.image.chunks[i].length,
                      total_bytes=total_bytes)

        url = client.target_url(image_info)
        if via.plan is None:
            downloaded = write_image(release.image, slot_dev, lambda s, e: dev.fetcher.open_range(url, s, e),
                                     chunks_done=start, retries=cfg.retries, on_chunk=on_chunk)
        else:
            downloaded = delta.write_planned(dev, via, release, slot_dev, booted, url, start, on_chunk)
    # write_image hashed every byte it wrote and flushed the slot: install() applies right
    # after without re-reading it; a separate apply (any later call) re-verifies.
    dev._verified_now = (target_slot, release.image.sha256)
    target.chunks_done = nchunks
    # The verified manifest and boot files, so apply needs no network (and no re-fetch).
    dev._emit(phase="boot-files", version=version)
    staged = staged_dir(dev)
    try:
        staged.mkdir(parents=True, exist_ok=True)
        for name, bf in release.boot.files().items():
            if _sha256_file(staged / name) != bf.sha256:
                client.download_target(boot_infos[name], staged / name)  # streamed, bounded, verified, atomic
        write_atomic(staged / RECORD, via.record(release, downloaded, base_downloaded))
        write_atomic(staged / "release.json", rel_bytes)
    except OSError as e:
        raise DeviceError(f"cannot keep the staged boot files in {staged}: {e}",
                          hint="the slot is written and verified; free space in the state directory and run "
                               "`abflip download` again (it does not download the image again)") from None
    state.state = "staged"
    state.slots[target_slot] = SlotState(version, release.image.sha256, "staged", release.image.size)
    dev._save(state)
    return DownloadResult(version, target_slot, first[0] if first else nchunks, downloaded, **via.result(release))


def _staged_files_present(dev, release: Release) -> bool:
    staged = staged_dir(dev)
    return all(_sha256_file(staged / n) == bf.sha256 for n, bf in release.boot.files().items())


# -- apply ------------------------------------------------------------------------------------
def _check_esp(dev) -> None:
    root = getattr(dev.esp, "root", None)
    if isinstance(dev.esp, DirectoryEsp) and not Path(root).is_dir():
        raise DeviceError(f"the ESP {root} does not exist or is not a directory",
                          hint=f"mount the ESP, or fix paths.esp in {dev.config.path}")


def _staged_release(dev, t: Target) -> Release:
    path = staged_dir(dev) / "release.json"
    try:
        raw = read_file(path, dev.limits.manifest_max_bytes)
    except OSError:  # also FileRefused
        raw = b""
    if hashlib.sha256(raw).hexdigest() != t.manifest_sha256:
        raise DeviceError(f"the staged manifest {path} is missing or does not match the state",
                          hint="run `abflip download` again")
    return Release.from_bytes(raw, dev.limits)


def _undo_entry(dev, slot: str) -> str:
    """Remove the slot's entries after a failure; say what stays if that fails too."""
    try:
        boot.remove_slot_entries(dev.esp, slot)
    except Error as e:
        return (f"; removing its entry failed as well ({e.message}): slot {slot} (verified) may boot at the next "
                "reboot, and boot-check then judges it as a trial")
    return ""


def apply(dev, *, now: bool, just_verified: tuple[str, str] | None = None):
    from .agent import ApplyResult

    cfg, esp = dev.config, dev.esp
    state, booted = dev._load()
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
    dev.refuse_if_fallback_needed(state, booted)
    if not now and not in_window(cfg.windows, dev.clock()):
        nxt = dev.window_info()
        raise PolicyError(f"outside the maintenance windows ({'; '.join(w.text for w in cfg.windows)}); the next "
                          f"opens {nxt['start'] if nxt else 'never'}", hint="it is applied then; pass --now to "
                          "apply it anyway")
    if just_verified is None and (why := _no_longer_offered(dev, t)) is not None:
        discard_stage(dev, state, booted)
        raise StageDiscarded(f"{why}: the staged {t.version} was discarded, not applied (slot {t.slot} stays "
                             "inactive, no boot entry)", hint="nothing to do: the device takes what its channel "
                                                              "offers at the next check")
    _check_esp(dev)
    release = _staged_release(dev, t)
    version = t.version
    # Re-verify what we are about to make bootable: the slot and the boot files.
    if just_verified != (t.slot, release.image.sha256) and not slot_hash_ok(dev, t.slot, release.image.sha256,
                                                                            release.image.size):
        state.state = "downloading"
        state.slots[t.slot] = SlotState(version, None, "writing")
        dev._save(state)
        raise DeviceError(f"slot {t.slot} was modified after {version} was staged: its sha256 no longer matches",
                          hint="run `abflip download` to repair it (changed chunks are written again)")
    files = {}
    for name, bf in release.boot.files().items():
        path = staged_dir(dev) / name
        if _sha256_file(path) != bf.sha256:
            state.state = "downloading"
            dev._save(state)
            raise DeviceError(f"the staged boot file {name} of {version} is missing or modified",
                              hint="run `abflip download` to fetch it again")
        files[name] = (path, bf.length)
    # Room: what no entry references goes first (the slot's entries went when it was written).
    try:
        boot.prune_boot_files(esp)
    except DeviceError:
        pass
    need = sum(n for _, n in files.values()) + ESP_MARGIN
    try:
        free = esp.free_bytes()
    except OSError as e:
        raise DeviceError(f"cannot read the ESP's free space: {e}") from None
    if free < need:
        raise DeviceError(f"the ESP has {free} bytes free; {version}'s boot files need {need}",
                          hint="free space on the ESP (other operating systems' files are never removed by abflip)")
    entry = Entry.new(version, t.slot, cfg.tries)
    text = boot.entry_text(product=release.product, version=version, slot=t.slot,
                           partlabel=cfg.slots[t.slot].partlabel, options=release.boot.options,
                           has_initrd=release.boot.initrd is not None, uki=release.boot.uki is not None)
    env = hook_env(dev, state, booted, t)
    run_hooks(cfg.hooks_dir, "pre-install", env=env, timeout=cfg.hook_timeout)
    # 1. Boot files (nothing references them yet: a failure here changes nothing that boots).
    dev._emit(phase="apply", version=version, slot=t.slot)
    bdir = boot.boot_dir(version, t.slot)
    try:
        for name, (path, _) in files.items():
            esp.copy_in(f"{bdir}/{name}", path)  # streamed, never the whole file in memory
        esp.sync()
    except OSError as e:
        try:
            esp.remove_tree(bdir)
        except OSError:
            pass
        raise DeviceError(f"writing boot files to the ESP failed: {e}",
                          hint="check the ESP is mounted and has room; nothing boots the new slot") from None
    # 2. Write-ahead: the state says pending before anything can boot the slot.
    state.state = "pending"
    state.last_error = None
    dev._save(state)  # fails -> nothing boots the new slot; unreferenced boot files are pruned later
    # 3. The entry: from here on the next boot tries the new slot.
    try:
        boot.write_entry(esp, entry, text)
    except Error as e:
        undone = _undo_entry(dev, t.slot)
        state.state = "staged"
        try:
            dev._save(state)
        except Error:
            pass  # the file says pending with no entry: the next command returns it to staged
        raise DeviceError(f"{e.message}{undone or '; nothing boots the new slot (still staged)'}",
                          hint=e.hint) from None
    try:
        run_hooks(cfg.hooks_dir, "post-install", env=env, timeout=cfg.hook_timeout)
    except Error as e:
        undone = _undo_entry(dev, t.slot)
        if undone:
            e.message += undone
            e.args = (e.message,)
            raise
        state.state = "staged"
        try:
            dev._save(state)
        except Error:
            pass  # pending with no entry reconciles to staged
        raise
    dev.prune(state, booted)
    return ApplyResult(version, t.slot, entry.name)


def _no_longer_offered(dev, t: Target) -> str | None:
    """Why the staged release ``t`` is no longer on offer, or None (still offered, or the
    repository cannot be reached: then what is staged is applied, as before)."""
    try:
        _, channel, release, rel_bytes = dev._offer()
    except TransportError:
        return None
    if channel.is_withdrawn(t.version):
        return f"{t.version} was withdrawn from channel {channel.channel}"
    if hashlib.sha256(rel_bytes).hexdigest() != t.manifest_sha256:
        return f"channel {channel.channel} no longer offers it (it offers {release.version})"
    return None


def discard_stage(dev, state: State, booted: str) -> None:
    """Forget a staged release in write order: entries of its slot removed (none exist while
    staged; invariant 2 all the same), then the state without a target (write-ahead), then the
    staged files. Killed before the save: still staged, the next apply discards it again."""
    t = state.target
    assert t is not None
    boot.remove_slot_entries(dev.esp, t.slot)
    state.target = None
    state.slots[t.slot] = SlotState(None, None, "unknown", None)
    state.state = "committed" if state.slots[booted].status == "good" else "idle"
    dev._save(state)
    shutil.rmtree(staged_dir(dev), ignore_errors=True)
