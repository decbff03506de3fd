"""``abflip demo``: the whole path on one machine, over real HTTP on 127.0.0.1.

Builds v1 and v2 images from generated trees, publishes both to a local TUF repository,
serves it, puts a simulated device on v1, installs v2, boots it through the systemd-boot
model, blesses it, and boots again. Every step is the real code; only the device is
simulated (files as slots, a directory as the ESP).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from applier.agent import Device
from builder.image import build_image
from builder.publish import publish_release, write_signed
from builder.release import create_release
from builder.storage.local import LocalStorage
from metadata.errors import Error, UserError
from metadata.keys import KeyConfig
from metadata.repository import init_repository

from .httpserver import Server
from .sim import SimDevice

__all__ = ["run_demo", "make_rootfs"]

PRODUCT = "demo-os"
HARDWARE = "demo-board"


#: In a ``--workdir`` the demo made: a re-run may clear it (and nothing else).
MARKER = ".abflip-demo"


class DemoFailed(Error):
    """A step of the demo did not do what it should: a bug (exit 1, ``error (internal)``)."""

    default_hint = "this is a bug in abflip: report it with the demo's transcript (--workdir keeps its files)"


def make_rootfs(root: Path, version: str, *, size: int = 3 << 20, seed: int = 1) -> Path:
    """A small tree with OS-like (partly compressible) content."""
    rng = random.Random(seed)
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "usr" / "lib").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "os-release").write_text(f'NAME="{PRODUCT}"\nVERSION_ID="{version}"\n')
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(2000)]
    written, i = 0, 0
    while written < size:
        n = min(256 << 10, size - written)
        text = b" ".join(rng.choice(words) for _ in range(n // 5))[:n // 2]
        data = text + rng.randbytes(n - len(text)) if i % 3 == 0 else text * 2
        (root / "usr" / "lib" / f"lib{i:03d}.so").write_bytes(data[:n])
        written += n
        i += 1
    return root


def run_demo(workdir: Path | None = None, *, out: Callable[[str], None] = print) -> dict:
    """The demo in a temporary directory, or in ``workdir`` (kept afterwards): a new or empty
    directory, or one an earlier demo made, which is cleared first (so the demo can be run
    again); anything else is refused before anything is written."""
    if workdir is not None:
        return _run(_prepare(Path(workdir), out), out)
    with tempfile.TemporaryDirectory(prefix="abflip-demo-") as tmp:
        return _run(Path(tmp), out)


def _prepare(work: Path, out: Callable[[str], None]) -> Path:
    hint = "pass a new or empty directory (it is created, with its parents), or one an earlier demo used"
    if work.exists() and not work.is_dir():
        raise UserError(f"--workdir {work} is not a directory", hint=hint)
    if work.is_dir():
        try:
            names = os.listdir(work)
        except OSError as e:
            raise UserError(f"cannot read --workdir {work}: {e.strerror or e}", hint=hint) from None
        if names and MARKER not in names:
            raise UserError(f"--workdir {work} holds files the demo did not make ({', '.join(sorted(names)[:3])}"
                            f"{', ...' if len(names) > 3 else ''}); the demo clears its directory before a run",
                            hint=hint)
        if names:
            out(f"== clearing the earlier demo in {work}")
            for name in names:
                p = work / name
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    try:
        work.mkdir(parents=True, exist_ok=True)
        (work / MARKER).write_text("made by abflip demo: a later demo with this --workdir clears this directory\n")
    except OSError as e:
        raise UserError(f"cannot create --workdir {work}: {e.strerror or e}", hint=hint) from None
    return work


def _run(work: Path, out: Callable[[str], None]) -> dict:
    out(f"== abflip demo in {work}")
    releases = {}
    kernel = work / "vmlinuz"
    kernel.write_bytes(b"demo kernel " * 1000)
    initrd = work / "initrd.img"
    initrd.write_bytes(b"demo initrd " * 1000)
    for n, version in enumerate(("1.0.0", "2.0.0")):
        tree = make_rootfs(work / f"rootfs-{version}", version, seed=1 + (n > 0))
        img = build_image(tree, work / f"rootfs-{version}.erofs", source_date_epoch=1700000000)
        rel = create_release(img.path, work / f"release-{version}", product=PRODUCT, version=version,
                             compatible=[HARDWARE], kernel=kernel, initrd=initrd, options="ro quiet",
                             chunk_size=1 << 20, window=1 << 20, created=1700000000)
        releases[version] = rel
        out(f"built {PRODUCT} {version}: erofs image {img.size} bytes -> {rel.release.image.compressed_size} bytes "
            f"zstd in {len(rel.release.image.chunks)} verified chunks")
    repo = work / "repo"
    storage = LocalStorage(repo)
    write_signed(storage, init_repository(work / "keys"))
    keys = KeyConfig.load(work / "keys")
    publish_release(releases["1.0.0"].dir, storage, keys, channel="stable")
    out("published 1.0.0 to channel stable (TUF: root, targets, snapshot, timestamp)")

    with Server(repo) as server:
        dev = SimDevice.create(work / "device", repository_url=server.url, trusted_root=(repo / "metadata" / "1.root.json").read_bytes(),
                               product=PRODUCT, hardware_id=HARDWARE, slot_size=16 << 20)
        with open(work / "rootfs-1.0.0.erofs", "rb") as src, open(dev.slot_path("a"), "r+b") as slot:
            shutil.copyfileobj(src, slot, 1 << 20)  # the factory flashes 1.0.0 into slot a ...
        device = Device(dev.config)
        first = device.provision(releases["1.0.0"].dir)  # ... and `abflip provision` records it
        dev.boot()
        out(f"device: 1.0.0 flashed into slot a and provisioned (entry {first['entry']}, floor {first['floor']}); "
            f"the repository is served at {server.url}")
        _show(out, "status before", device.status())

        publish_release(releases["2.0.0"].dir, storage, keys, channel="stable")
        out("published 2.0.0 to channel stable")
        result = device.install()
        out(f"install: wrote {result.version} into slot {result.slot} ({result.bytes_downloaded} bytes downloaded, "
            f"every chunk verified before decompression); entry {result.entry}")
        entry_text = (dev.esp / "loader" / "entries" / result.entry).read_text()
        out("ESP entry:\n" + "\n".join("    " + line for line in entry_text.splitlines()))
        _check(device.status()["state"] == "pending", "state is pending after install")

        booted = dev.boot()
        out(f"reboot: systemd-boot model chose {booted.entry} -> slot {booted.slot}")
        _check(booted.slot == "b", "the new slot boots first")
        _check(dev.slot_path("b").read_bytes()[:img_size(releases["2.0.0"])] ==
               (work / "rootfs-2.0.0.erofs").read_bytes(), "slot b holds the 2.0.0 image byte for byte")
        status = device.mark_good()
        out("mark-good: entry blessed")
        _show(out, "status after", status)
        _check(status["state"] == "committed" and status["floor"] == "2.0.0", "update committed, floor raised")
        again = dev.boot()
        out(f"reboot: {again.entry} -> slot {again.slot} (permanent)")
        _check(again.slot == "b" and "+" not in again.entry, "2.0.0 stays the default after blessing")
        out("demo: OK")
        return status


def img_size(rel) -> int:
    return rel.release.image.size


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise DemoFailed(f"demo check failed: {what}")


def _show(out: Callable[[str], None], title: str, status: dict) -> None:
    brief = {k: status[k] for k in ("state", "booted_slot", "booted_version", "booted_entry", "floor", "pending_entry")}
    brief["slots"] = {k: f"{v['status']} {v['version'] or '-'}" for k, v in status["slots"].items()}
    out(f"{title}: {json.dumps(brief)}")
