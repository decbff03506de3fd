"""A device's first day: record the factory image in the booted slot (``abflip provision``).

A freshly flashed device has its root image in one slot and nothing else abflip knows about:
no state, no entry it wrote, no version floor. :func:`provision` takes the release the image
came from (the directory ``abflip release create`` wrote, or its ``release.json``) and makes
the device look as if abflip had installed and blessed that release itself:

1. Checks, before any write (a refusal changes nothing): the release is this device's
   product and hardware; the slot is the booted one (or, when the loader does not say, the one
   named with ``--slot``); the device has no state with a good booted slot already (unless
   ``force``); the slot's first ``image.size`` bytes hash to the manifest's ``image.sha256``;
   every boot file in the release directory matches the manifest's sha256 and length; the ESP
   has room for them.
2. Writes, in this order (docs/invariants.md: nothing names a file before it is complete):
   boot files to ``/abflip/<version>-<slot>/`` (streamed, temp + rename, synced); the blessed
   entry ``abflip-<version>-<slot>.conf`` (atomic, synced); then the other entries of that
   slot are removed; last the state file: slot good with version, sha256 and size, floor =
   version, state ``idle``. A crash between two writes leaves either no entry (unreferenced
   boot files, pruned later) or a blessed entry with no state file, which the next command
   rebuilds from the loader into the same slot and version (sha256 unknown): a re-run of
   ``provision`` (with ``--force``) records the rest.

All under the device lock. The release directory is the producer's own output and is trusted
as such: it is not a TUF download, so the image in the slot is checked against it, not the
other way round.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from metadata.bounded import FileRefused, open_regular, read_file
from metadata.errors import DeviceError, PolicyError, UserError
from metadata.manifest import ManifestError, Release

from . import boot, history
from .boot import Entry
from .install import ESP_MARGIN
from .lifecycle import other
from .slots import SlotDevice, booted_slot, slot_hash_ok
from .state import SlotState, State, load_state, save_state

__all__ = ["provision", "read_release"]

PIECE = 1 << 20


def read_release(source: Path, limits) -> tuple[Release, Path]:
    """The release manifest and the directory holding its boot files, from a release
    directory or the path of its ``release.json``; parsed with the device's own parser."""
    source = Path(source)
    path = source / "release.json" if source.is_dir() else source
    try:
        data = read_file(path, limits.manifest_max_bytes)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist", hint="pass the directory 'abflip release create' wrote, or its "
                                                       "release.json") from None
    except FileRefused as e:
        raise UserError(f"{path} {e.strerror}: not a release manifest",
                        hint="pass the directory 'abflip release create' wrote, or its release.json") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}",
                        hint="pass the directory 'abflip release create' wrote, or its release.json") from None
    try:
        release = Release.from_bytes(data, limits)
    except ManifestError as e:
        raise UserError(f"{path} is not a valid release manifest: {e.message}",
                        hint="pass the release.json that 'abflip release create' wrote for this image") from None
    return release, path.parent


def _file_sha256(path: Path) -> tuple[str, int] | None:
    h = hashlib.sha256()
    n = 0
    try:
        with open_regular(path) as f:
            while piece := f.read(PIECE):
                h.update(piece)
                n += len(piece)
    except OSError:
        return None
    return h.hexdigest(), n


def _choose_slot(dev, slot: str | None) -> str:
    try:
        booted = booted_slot(dev.config, dev.ctx)
    except DeviceError as e:
        if slot is None:
            raise DeviceError(f"{e.message}; cannot tell which slot holds the factory image",
                              hint="pass --slot a or --slot b (the slot the device boots from)") from None
        return slot
    if slot is not None and slot != booted:
        raise UserError(f"--slot {slot} is not the booted slot ({booted})",
                        hint=f"provision records the image the device runs: omit --slot or pass --slot {booted}")
    return booted


def provision(dev, source: Path, *, slot: str | None = None, force: bool = False) -> dict:
    """Record ``source``'s release as the image in the booted slot (see the module docstring)."""
    if slot is not None and slot not in ("a", "b"):
        raise UserError(f"--slot {slot!r}: expected a or b", hint="--slot a or --slot b (the slot holding the image)")
    cfg = dev.config
    release, rel_dir = read_release(source, dev.limits)
    version = str(release.version)
    if release.product != cfg.product:
        raise UserError(f"the release is {release.product} {version}; this device runs {cfg.product} "
                        f"(device.product in {cfg.path})", hint="pass this product's release; nothing was changed")
    hwid = dev.hardware_id
    if hwid not in release.compatible:
        raise UserError(f"{release.product} {version} is for {', '.join(release.compatible)}, not this device's "
                        f"hardware {hwid}", hint="pass the release built for this hardware; nothing was changed")
    with dev.locked(), history.recording(cfg.state_dir, "provision"):
        slot = _choose_slot(dev, slot)
        raw = load_state(cfg.state_dir)
        if raw is not None and not raw.invalid and raw.slots[slot].status == "good" and not force:
            have = raw.slots[slot].version or "an unknown version"
            raise PolicyError(f"this device is provisioned already: slot {slot} holds {have} (good, floor "
                              f"{raw.floor or 'none'})", hint="nothing was changed; pass --force to record the "
                              "release again (a re-flashed slot)")
        _check_slot(dev, slot, release)
        files = _boot_files(release, rel_dir)
        need = sum(n for _, n in files.values()) + ESP_MARGIN
        try:
            free = dev.esp.free_bytes()
        except OSError as e:
            raise DeviceError(f"cannot read the ESP's free space: {e}", hint="check that the ESP is mounted") from None
        if free < need:
            raise DeviceError(f"the ESP has {free} bytes free; {version}'s boot files need {need}",
                              hint="free space on the ESP; nothing was changed")
        text = boot.entry_text(product=release.product, version=version, slot=slot,
                               partlabel=cfg.slots[slot].partlabel, options=release.boot.options,
                               has_initrd=release.boot.initrd is not None, uki=release.boot.uki is not None)
        entry = Entry(Entry.new(version, slot, 1).blessed_name, version, slot, None, 0)
        # 1. Boot files (nothing references them yet).
        dev._emit(phase="boot-files", version=version, slot=slot)
        bdir = boot.boot_dir(version, slot)
        try:
            for name, (path, _) in files.items():
                dev.esp.copy_in(f"{bdir}/{name}", path)
            dev.esp.sync()
        except OSError as e:
            raise DeviceError(f"writing boot files to the ESP failed: {e}",
                              hint="check the ESP is mounted and writable; no entry was written") from None
        # 2. The blessed entry; then no other entry of this slot may remain (another version).
        boot.write_entry(dev.esp, entry, text)
        removed = [e.name for e in boot.list_entries(dev.esp) if e.slot == slot and e.name != entry.name]
        for name in removed:
            try:
                dev.esp.remove(f"{boot.ENTRIES_DIR}/{name}")
            except OSError as e:
                raise DeviceError(f"removing the stale entry {name} failed: {e}",
                                  hint=f"the entry {entry.name} is written; remove {name} by hand") from None
        if removed:
            dev.esp.sync()
        # 3. The state: this slot good, the floor at its version.
        state = State(state="idle", floor=version)
        state.slots[slot] = SlotState(version, release.image.sha256, "good", release.image.size)
        state.slots[other(slot)] = SlotState()
        save_state(cfg.state_dir, state)
        try:
            boot.prune_boot_files(dev.esp)
        except DeviceError:
            pass  # hygiene only
    return {"schema": 1, "product": release.product, "version": version, "slot": slot, "entry": entry.name,
            "boot_dir": f"/{bdir}", "image_size": release.image.size, "sha256": release.image.sha256,
            "floor": version, "removed_entries": removed, "forced": bool(force and raw is not None)}


def _check_slot(dev, slot: str, release: Release) -> None:
    device = dev.config.slots[slot].device
    size = release.image.size
    try:
        with SlotDevice(slot, device, write=False) as sd:
            capacity = sd.capacity
    except OSError as e:
        raise DeviceError(f"cannot open slot {slot} ({device}): {e.strerror or e}",
                          hint="check slots.* in the configuration") from None
    if capacity < size:
        raise DeviceError(f"slot {slot} ({device}) holds {capacity} bytes; {release.product} {release.version}'s "
                          f"image is {size}", hint="this is not the slot the image was written to; nothing was changed")
    try:
        ok = slot_hash_ok(dev, slot, release.image.sha256, size)
    except OSError as e:
        raise DeviceError(f"reading slot {slot} ({device}) failed: {e.strerror or e}") from None
    if not ok:
        raise DeviceError(f"slot {slot} ({device}) does not hold {release.product} {release.version}: its first {size} "
                          f"bytes do not hash to the release's image sha256 {release.image.sha256[:16]}...",
                          hint="write that release's image (the file given to 'abflip release create --image') into "
                               "the slot first, or pass the release it was built from; nothing was changed")


def _boot_files(release: Release, rel_dir: Path) -> dict[str, tuple[Path, int]]:
    out = {}
    for name, bf in release.boot.files().items():
        path = rel_dir / name
        got = _file_sha256(path) if path.is_file() else None
        if got is None:
            raise UserError(f"{path} is missing (the release's {name})",
                            hint="pass the whole directory 'abflip release create' wrote; nothing was changed")
        if got != (bf.sha256, bf.length):
            raise UserError(f"{path} does not match the release manifest (sha256 or length)",
                            hint="it was changed after 'abflip release create'; nothing was changed")
        out[name] = (path, bf.length)
    return out
