"""A device's first day: record the factory image in the booted slot (``abflip provision``).

A freshly flashed device has its root image in one slot and nothing else abflip knows about:
no state, no entry it wrote, no version floor. :func:`provision` takes the release the image
came from (the directory ``abflip release create`` wrote, or its ``release.json``) and makes
the device look as if abflip had installed and blessed that release itself:

1. Checks, before any write (a refusal changes nothing): the release is this device's
   product and hardware; the slot is the booted one (or, when the loader does not say, the one
   named with ``--slot``); the booted slot is not on trial and no rollback waits for its reboot
   (provisioning would bless an image nobody judged); the device has no state with a good
   booted slot already (unless ``force``); the slot's first ``image.size`` bytes hash to the
   manifest's ``image.sha256``; every boot file in the release directory matches the
   manifest's sha256 and length; the ESP has room for them.
2. Writes, in this order (docs/invariants.md: nothing names a file before it is complete):
   boot files to ``/abflip/<version>-<slot>/`` (streamed, temp + rename, synced); the blessed
   entry ``abflip-<version>-<slot>.conf`` (atomic, synced); then the other entries of that
   slot are removed, and the other slot's *counting* entries (an update in flight, which
   ``--force`` discards); last the state file: slot good with version, sha256 and size, floor =
   version (``--force`` may lower it: the one verb that does), state ``idle``; the other slot
   keeps its record if it was verified good, else it is ``unknown``. A crash between two writes leaves either no entry (unreferenced
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

from . import history
from .install import ESP_MARGIN, boot_spec
from .lifecycle import Event, move, other, phase_of, require
from .session import Session
from .slots import SlotDevice, slot_hash_ok
from .state import SlotState, State, load_state

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


def _choose_slot(session: Session, slot: str | None) -> str:
    try:
        booted = session.boot.booted_slot()
    except DeviceError as e:
        if slot is None:
            raise DeviceError(f"{e.message}; cannot tell which slot holds the factory image",
                              hint="pass --slot a or --slot b (the slot the device boots from)") from None
        return slot
    if slot is not None and slot != booted:
        raise UserError(f"--slot {slot} is not the booted slot ({booted})",
                        hint=f"provision records the image the device runs: omit --slot or pass --slot {booted}")
    return booted


def provision(session: Session, source: Path, *, slot: str | None = None, force: bool = False) -> dict:
    """Record ``source``'s release as the image in the booted slot (see the module docstring)."""
    if slot is not None and slot not in ("a", "b"):
        raise UserError(f"--slot {slot!r}: expected a or b", hint="--slot a or --slot b (the slot holding the image)")
    cfg, boot = session.config, session.boot
    release, rel_dir = read_release(source, session.limits)
    version = str(release.version)
    if release.product != cfg.product:
        raise UserError(f"the release is {release.product} {version}; this device runs {cfg.product} "
                        f"(device.product in {cfg.path})", hint="pass this product's release; nothing was changed")
    hwid = session.hardware_id
    if hwid not in release.compatible:
        raise UserError(f"{release.product} {version} is for {', '.join(release.compatible)}, not this device's "
                        f"hardware {hwid}", hint="pass the release built for this hardware; nothing was changed")
    with session.locked(), history.recording(cfg.state_dir, "provision"):
        slot = _choose_slot(session, slot)
        raw = load_state(cfg.state_dir)
        try:
            current = session.load(mutating=False).state
        except DeviceError:
            current = None  # the loader does not say which slot booted (--slot named it)
        if current is not None:
            require(current, Event.PROVISION, slot)  # never on trial, never while a rollback waits
        if raw is not None and not raw.invalid and raw.slots[slot].status == "good" and not force:
            have = raw.slots[slot].version or "an unknown version"
            raise PolicyError(f"this device is provisioned already: slot {slot} holds {have} (good, floor "
                              f"{raw.floor or 'none'})", hint="nothing was changed; pass --force to record the "
                              "release again (a re-flashed slot)")
        _check_slot(session, slot, release)
        files = _boot_files(release, rel_dir)
        need = sum(n for _, n in files.values()) + ESP_MARGIN
        free = boot.free_bytes()
        if free < need:
            raise DeviceError(f"the ESP has {free} bytes free; {version}'s boot files need {need}",
                              hint="free space on the ESP; nothing was changed")
        spec = boot_spec(session, release, version, slot)
        boot.check_spec(spec)  # every field checked before the first write
        # 1. Boot files (nothing references them yet).
        session.emit(phase="boot-files", version=version, slot=slot)
        bdir = boot.install_files(version, slot, {name: path for name, (path, _) in files.items()})
        # 2. The blessed entry; then no other entry of this slot may remain (another version),
        #    and nothing may count tries on the other slot (an update in flight is discarded).
        entry = boot.add_default(spec)
        try:
            removed = boot.remove_slot(slot, keep=entry.name)
        except DeviceError as e:
            raise DeviceError(f"{e.message}; the entry {entry.name} is written",
                              hint=f"remove the other entries of slot {slot} by hand, or run provision --force again"
                              ) from None
        o = other(slot)
        try:
            removed += boot.remove_slot(o, counting_only=True)
        except DeviceError as e:
            raise DeviceError(f"{e.message}; the entry {entry.name} is written, but the update in flight on slot {o} "
                              "may still be tried at the next boot", hint="run provision --force again") from None
        # 3. The state: this slot good, the floor at its version; nothing in flight.
        state = current if current is not None else State()
        keep_other = phase_of(state).value in ("idle", "committed", "rolled-back") and state.slots[o].status == "good"
        state.floor, state.target, state.last_error = version, None, None
        state.slots[slot] = SlotState(version, release.image.sha256, "good", release.image.size)
        if not keep_other:
            state.slots[o] = SlotState()
        move(state, Event.PROVISION)  # any phase but a trial or a waiting rollback -> idle
        session.save(state)
        try:
            boot.prune_files()
        except DeviceError:
            pass  # hygiene only
    return {"schema": 1, "product": release.product, "version": version, "slot": slot, "entry": entry.name,
            "boot_dir": f"/{bdir}", "image_size": release.image.size,
            "sha256": release.image.sha256, "floor": version, "removed_entries": removed,
            "forced": bool(force and raw is not None)}


def _check_slot(session: Session, slot: str, release: Release) -> None:
    device = session.config.slots[slot].device
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
        ok = slot_hash_ok(session, slot, release.image.sha256, size)
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
