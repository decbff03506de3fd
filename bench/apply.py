#!/usr/bin/env python3
"""Benchmark: ``abflip install`` against a plain ``curl | zstd -d | dd`` pipeline.

Usage::

    python3 bench/apply.py [--size-mib 1024] [--repeats 0.25] [--window 128M] [--link-mbps 20]
                           [--runs 3] [--level 5] [--cli-level 9] [--workdir DIR] [--build-only] [--profile]

This is a benchmark, not a test: it measures and prints; it asserts nothing about speed.
It exits non-zero only when something is *wrong* (a command failed, or a slot does not
hash to the image's sha256). The last line of its output is the summary::

    apply/pipeline: W.WWx wall, C.CCx cpu; peak RSS N MiB (zstd -d M MiB); size S.SSSx CLI

W and C: abflip's median wall and CPU time over the pipeline's; N and M: the median peak RSS
of abflip and of the pipeline's ``zstd -d``; S: abflip's compressed stream over the zstd CLI's.

Method
------
1. **Image** (``bench/rootfs.py`` has the rules). About ``--size-mib`` MiB of file content:
   files of this machine's ``/usr`` (bin, sbin, libexec, the multiarch and other libraries,
   share, drained byte-fairly, walk sorted) make ``1 - --repeats`` of it; the rest are
   *long-range repeats* (issue 14): copies of runs of 4-24 MiB of those files, half of them
   byte-identical and half lightly modified (an edit every 32 KiB on average), placed so
   that in the image 3 in 4 lie 24-112 MiB after their source (inside zstd ``--long=27``'s
   128 MiB window, beyond abflip's default window) and up to 1 in 4 lie 160-768 MiB after it
   (beyond both; fewer when the image is too small to hold them). An image larger than what
   ``/usr`` offers gets more copies.
   ``--repeats 0`` is the plain ``/usr`` image of the benchmark before issue 14.
   ``builder.image.build_image`` turns the tree into an (uncompressed) erofs image; the
   distances the repeats really got are read back with ``dump.erofs`` and reported. A tiny
   second image is built for the device's factory slot.
2. **Compression.** ``builder.release.create_release`` (default level 5, 64 MiB chunks,
   128 MiB window; ``--window`` sets the dictionary window) makes the abflip stream;
   the zstd CLI (``zstd -T0 -9 --long=27``, ``--cli-level``) compresses the same image for the
   baseline. The abflip stream cannot be the baseline's input: every frame after the first
   needs the previous ``window`` bytes of *image* as a raw-content dictionary, which
   ``zstd -d`` does not know. Image, release directory and CLI stream are cached in the
   workdir (with a ``cache.json`` recording what they were made from, and how long making
   them took), so re-runs skip the slow part; another ``--size-mib``, ``--repeats``,
   ``--level``, ``--cli-level`` or ``--window`` rebuilds what depends on it (use one ``--workdir`` per
   configuration to keep several). ``--build-only`` stops after the caches are made (run it
   under ``nice`` on a shared machine).
3. **Repository and server.** A fresh TUF repository (``init_repository``, ``LocalStorage``,
   ``publish_release`` to channel ``stable``) holds the release; the CLI stream is placed
   next to it. ``bench/linkserver.py`` (``abflip serve``'s handler; with ``--link-mbps`` a
   token bucket shared by all its connections limits the throughput to that many 10**6
   bit/s) serves it from a **separate process**, so the server's memory and CPU accounting
   do not land on the device side, and both variants see the same link.
4. **Variants**, alternated, each run preceded by ``sync`` and ``echo 3 >
   /proc/sys/vm/drop_caches`` (skipped if not permitted), every process wrapped in
   ``/usr/bin/time -v``:

   - *pipeline*: ``curl -s URL | zstd -d --long=27 | dd of=SLOT bs=1M conv=fsync,notrunc``
     into a fresh sparse slot file of image size + 64 MiB (``notrunc`` so a file behaves
     like the block device it stands for).
   - *abflip*: a fresh ``abflip.sim.SimDevice`` (slots: sparse files of image size +
     64 MiB) is factory-provisioned with the tiny image in slot a and blessed, outside the
     timing; then ``python -m abflip.cli install --config <device>/abflip.toml --json`` is
     timed, its modules' bytecode cached as an installed abflip has it (``bench/installed.py``;
     ``--no-bytecode-cache``: the environment as it is). It refreshes TUF metadata, fetches
     channel pointer and manifest, streams the hash-prefixed
     ``targets/.../<sha256>.rootfs.img.zst`` into slot b (verify, decompress, write, fsync, per
     chunk) and writes the boot files (tiny placeholders here, so the comparison is about the
     image) and the boot entry. The device keeps the default
     ``[limits] memory`` (256 MiB) unless ``applier.stream.memory_needed`` of the release
     plus :data:`MEMORY_MARGIN` is more (a large ``--window``); then ``limits.memory`` is set
     to that, rounded up to a MiB. The budget used is printed.

   Reported per variant (median over ``--runs``): wall time; CPU time (user + system of
   the process tree, from ``time -v``; the pipeline's is the sum of its three processes);
   peak RSS ("Maximum resident set size"; for the pipeline the largest of its three
   processes and their sum); bytes outside the slot, i.e. the growth of the device
   directory without the slot files (state file, ESP, TUF metadata cache) -- 0 for the
   pipeline by construction; bytes the process tree wrote to files according to the
   kernel's I/O accounting ("File system outputs", i.e. ``write_bytes`` as the pages were
   dirtied) minus the image size, which also counts rewrites; and download bytes (curl's
   ``size_download``; abflip's ``bytes_downloaded``, the image stream only, without the few
   KiB of metadata and boot files). After each abflip run, ``abflip status`` on the same
   device is timed from a cold page cache too: the command's fixed cost (interpreter start,
   imports), which is part of the install's wall time.
5. After every run the slot's first ``image size`` bytes are hashed and compared with the
   image sha256 (printed).

``--profile`` additionally runs one install in-process under cProfile (the server stays
in its own process) and prints the top entries by cumulative and by own time (before the
summary line).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import rootfs  # bench/rootfs.py (bench/ is on sys.path: this script's directory)
from installed import installed_env  # bench/installed.py
from linkserver import ServerProcess  # bench/linkserver.py

from abflip.sim import SimDevice
from applier.agent import Device
from applier.config import DEFAULT_MEMORY, parse_size
from applier.stream import memory_needed, page_cache_needed
from builder.compress import DEFAULT_CHUNK, DEFAULT_LEVEL, DEFAULT_PIECE, DEFAULT_WINDOW, LDM_RATE_LOG
from builder.image import ImageInfo, build_image
from builder.publish import publish_release, write_signed
from builder.release import ReleaseFiles, create_release
from builder.storage.local import LocalStorage
from metadata import zstdlib
from metadata.errors import Error
from metadata.keys import KeyConfig
from metadata.manifest import Release
from metadata.repository import init_repository

PRODUCT = "bench-os"
HARDWARE = "bench-board"
OLD, NEW = "1.0.0", "2.0.0"
EPOCH = 1700000000
MIB = 1 << 20
DEFAULT_WORKDIR = Path(__file__).resolve().parent.parent / ".bench" / "apply"
DEFAULT_REPEATS = 0.25  # share of the image's file content that is long-range repeats
MEMORY_MARGIN = 16 * MIB  # over memory_needed: install adds a boot-file piece, the interpreter is not counted
CLI_STREAM = "rootfs.erofs.cli.zst"
SAMPLE_S = 0.005  # how often Sampler reads /proc/PID/status
# a cached release made otherwise is made again
BUILDER = (f"chunk {DEFAULT_CHUNK}, window {DEFAULT_WINDOW}, ldm rate {LDM_RATE_LOG}, checksums, "
           f"libzstd {zstdlib.compressor_version()} by ctypes")
TIME = "/usr/bin/time"
ABFLIP = [sys.executable, "-m", "abflip.cli"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the image ----------------------------------------------------------------------------
@dataclass
class Cache:
    """``<workdir>/cache.json``: what the cached artefacts were made from, and timings."""

    path: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Cache:
        try:
            return cls(path, json.loads(path.read_text()))
        except (OSError, ValueError):
            return cls(path, {})

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")


def ensure_image(work: Path, size_mib: int, cache: Cache, keep_tree: bool,
                 repeats: float = DEFAULT_REPEATS) -> ImageInfo:
    out = work / "rootfs.erofs"
    want = {"size_mib": size_mib, "repeats": repeats, "recipe": rootfs.RECIPE}
    c = cache.data.get("image")
    if c and all(c.get(k) == v for k, v in want.items()) and out.is_file() and out.stat().st_size == c["size"]:
        log(f"image: cached {out} ({c['size']} bytes)")
        return ImageInfo(out, "erofs", c["size"], c["sha256"])
    # what was made from another image goes first (disk space: a 6 GiB image has 2 GB streams)
    cache.data.pop("image", None)
    cache.data.pop("release", None)
    cache.data.pop("cli", None)
    cache.save()
    for stale in (work / f"release-{NEW}", work / "repo", work / "runs"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in (out, work / CLI_STREAM):
        stale.unlink(missing_ok=True)
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir()
    t0 = time.monotonic()
    log(f"image: ~{size_mib} MiB of file content into {tree}: /usr, {repeats:.0%} long-range repeats ...")
    info = rootfs.build_tree(tree, size_mib * MIB, repeats)
    t1 = time.monotonic()
    log(f"image: copied {info.base_files} files of /usr, {info.base_bytes} bytes, and {len(info.repeats)} repeats, "
        f"{info.copy_bytes} bytes, in {t1 - t0:.1f} s; mkfs.erofs ...")
    img = build_image(tree, out, source_date_epoch=EPOCH)
    t2 = time.monotonic()
    measured = rootfs.measure(out, info.repeats)
    if not keep_tree:
        shutil.rmtree(tree, ignore_errors=True)
    cache.data["image"] = {**want, "size": img.size, "sha256": img.sha256, "input_bytes": info.base_bytes + info.copy_bytes,
                           "input_files": info.base_files, "base_bytes": info.base_bytes, "copy_bytes": info.copy_bytes,
                           "repeat_list": measured, "copy_s": round(t1 - t0, 2), "mkfs_s": round(t2 - t1, 2)}
    cache.save()
    log(f"image: {img.size} bytes in {t2 - t1:.1f} s, sha256 {img.sha256}")
    return img


def ensure_small_image(work: Path) -> Path:
    out = work / "factory.erofs"
    if not out.is_file():
        tree = work / "factory-tree"
        shutil.rmtree(tree, ignore_errors=True)
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "os-release").write_text(f'NAME="{PRODUCT}"\nVERSION_ID="{OLD}"\n')
        build_image(tree, out, source_date_epoch=EPOCH)
        shutil.rmtree(tree)
    return out


def ensure_release(work: Path, img: ImageInfo, level: int, window: int | None, cache: Cache) -> ReleaseFiles:
    """``window``: the one asked for, None for the builder's default (the manifest records the
    one used, which may be smaller)."""
    rdir = work / f"release-{NEW}"
    try:
        rel = Release.from_bytes((rdir / "release.json").read_bytes())
        comp = rel.image.compression
        if (rel.image.sha256 == img.sha256 and comp.level == level and (rdir / "rootfs.img.zst").is_file()
                and cache.data.get("release", {}).get("window") == window and comp.piece_size == DEFAULT_PIECE
                and cache.data["release"].get("builder") == BUILDER):
            log(f"release: cached {rdir} ({rel.image.compressed_size} bytes compressed)")
            return ReleaseFiles(rdir, rel)
    except (OSError, Error):  # missing or unreadable: rebuild
        pass
    for stale in (rdir, work / "repo"):  # the repository holds the old stream too
        shutil.rmtree(stale, ignore_errors=True)
    kernel, initrd = work / "vmlinuz", work / "initrd.img"
    kernel.write_bytes(b"bench kernel placeholder\n" * 1000)
    initrd.write_bytes(b"bench initrd placeholder\n" * 1000)
    asked = "the default" if window is None else f"{window >> 20} MiB"
    log(f"release: compressing the image at level {level} (default chunks, {asked} dictionary window) ...")
    t0 = time.monotonic()
    rf = create_release(img.path, rdir, product=PRODUCT, version=NEW, compatible=[HARDWARE], kernel=kernel,
                        initrd=initrd, options="ro", level=level, created=EPOCH,
                        **({} if window is None else {"window": window}))
    dt = time.monotonic() - t0
    cache.data["release"] = {"seconds": round(dt, 2), "level": level, "window": window,
                             "compressed": rf.release.image.compressed_size, "builder": BUILDER}
    cache.save()
    log(f"release: {rf.release.image.compressed_size} bytes in {len(rf.release.image.chunks)} chunks, {dt:.1f} s")
    return rf


def ensure_cli_stream(work: Path, img: ImageInfo, level: int, cache: Cache) -> Path:
    out = work / CLI_STREAM
    c = cache.data.get("cli")
    if c and c["sha256"] == img.sha256 and c["level"] == level and out.is_file() and out.stat().st_size == c["size"]:
        log(f"zstd CLI: cached {out} ({c['size']} bytes)")
        return out
    cmd = ["zstd", "-q", "-f", "-T0", f"-{level}", "--long=27", str(img.path), "-o", str(out)]
    log(f"zstd CLI: {' '.join(cmd)}")
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    dt = time.monotonic() - t0
    cache.data["cli"] = {"sha256": img.sha256, "level": level, "size": out.stat().st_size, "seconds": round(dt, 2),
                         "cmd": " ".join(cmd[:-3])}
    cache.save()
    return out


# -- repository and server ----------------------------------------------------------------
def make_repo(work: Path, release_dir: Path, cli_stream: Path) -> tuple[Path, str, str]:
    """A fresh repository with the release on channel ``stable`` and the CLI stream beside it.
    Returns (repo, abflip image key, CLI stream key)."""
    repo, keys = work / "repo", work / "keys"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(keys, ignore_errors=True)
    storage = LocalStorage(repo)
    write_signed(storage, init_repository(keys))
    res = publish_release(release_dir, storage, KeyConfig.load(keys), channel="stable")
    image_key = next(k for k in res.uploaded if k.endswith(".rootfs.img.zst"))
    cli_key = f"bench/{CLI_STREAM}"
    (repo / "bench").mkdir()
    try:
        os.link(cli_stream, repo / cli_key)
    except OSError:
        shutil.copyfile(cli_stream, repo / cli_key)
    return repo, image_key, cli_key


# -- measuring ----------------------------------------------------------------------------
def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


@dataclass
class ProcStats:
    name: str
    max_rss: int  # bytes
    fs_out: int  # bytes, kernel I/O accounting (write_bytes)
    cpu: float  # user + system seconds
    max_anon: int = 0  # bytes, sampled (Sampler): RssAnon, what the kernel cannot reclaim
    max_file: int = 0  # bytes, sampled: RssFile, file-backed pages (the slot's page cache mapped, the binaries)


def _timev(path: Path, name: str, sampler: Sampler | None = None) -> ProcStats:
    vals = {}
    for line in path.read_text().splitlines():
        k, sep, v = line.strip().rpartition(": ")
        if sep:
            vals[k] = v
    return ProcStats(name, int(vals["Maximum resident set size (kbytes)"]) * 1024,
                     int(vals["File system outputs"]) * 512,
                     float(vals["User time (seconds)"]) + float(vals["System time (seconds)"]),
                     sampler.peak["RssAnon"] if sampler else 0, sampler.peak["RssFile"] if sampler else 0)


class Sampler(threading.Thread):
    """The peaks of ``RssAnon`` and ``RssFile`` of the process a ``/usr/bin/time`` wrapper runs,
    sampled from ``/proc/PID/status`` every ``SAMPLE_S`` (the kernel keeps the peak of the whole
    resident set only, ``VmHWM``). The buffers that make the peak live as long as the stream."""

    FIELDS = ("RssAnon", "RssFile")

    def __init__(self, wrapper: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.wrapper, self.pid = wrapper.pid, 0
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self.done = threading.Event()
        self.start()

    def _child(self) -> int:
        try:
            kids = Path(f"/proc/{self.wrapper}/task/{self.wrapper}/children").read_text().split()
        except OSError:
            return 0
        return int(kids[0]) if kids else 0

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            self.pid = self.pid or self._child()
            if not self.pid:
                continue
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                k, _, v = line.partition(":")
                if k in self.peak:
                    self.peak[k] = max(self.peak[k], int(v.split()[0]) * 1024)

    def stop(self) -> Sampler:
        self.done.set()
        self.join()
        return self


@dataclass
class Run:
    variant: str
    wall: float
    procs: list[ProcStats]
    outside: dict[str, int]  # growth of the device directory by top-level name, slot files excluded
    downloaded: int
    image_size: int
    sha_ok: bool
    dropped: bool
    startup: float | None = None  # abflip only: wall time of a cold ``abflip status``
    slot_sha: str | None = None
    verify: float = 0.0  # pipeline only: CPU s of sha256 over the abflip stream and the image (verify_cost)

    @property
    def outside_total(self) -> int:
        return sum(self.outside.values())

    @property
    def rss_max(self) -> int:
        return max(p.max_rss for p in self.procs)

    @property
    def rss_sum(self) -> int:
        return sum(p.max_rss for p in self.procs)

    @property
    def written_extra(self) -> int:
        return sum(p.fs_out for p in self.procs) - self.image_size

    @property
    def cpu(self) -> float:
        """User + system seconds of the whole process tree (the pipeline: its three processes)."""
        return sum(p.cpu for p in self.procs)

    def rss_of(self, name: str) -> int:
        return next(p.max_rss for p in self.procs if p.name == name)

    @property
    def anon(self) -> int:
        """The sampled peak RssAnon of the measured process (abflip; the pipeline's ``zstd -d``)."""
        return max(p.max_anon for p in self.procs)

    @property
    def file(self) -> int:
        return max(p.max_file for p in self.procs)


def slot_sha256(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left and (b := f.read(min(left, 4 * MIB))):
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def tree_bytes(root: Path, skip: set[str]) -> dict[str, int]:
    """Apparent size of the files below ``root`` by top-level name, except the names in ``skip``."""
    out: dict[str, int] = {}
    for top in os.listdir(root):
        if top in skip:
            continue
        p = root / top
        if p.is_dir() and not p.is_symlink():
            out[top] = sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(p) for f in files)
        else:
            out[top] = os.lstat(p).st_size
    return out


def run_pipeline(run_dir: Path, url: str, img: ImageInfo, slot_size: int) -> Run:
    slot = run_dir / "slot.img"
    with open(slot, "wb") as f:
        f.truncate(slot_size)
    tv = [run_dir / f"time-{n}.txt" for n in ("curl", "zstd", "dd")]
    errs = [run_dir / f"stderr-{n}.txt" for n in ("curl", "zstd", "dd")]
    dropped = drop_caches()
    with open(errs[0], "w") as e0, open(errs[1], "w") as e1, open(errs[2], "w") as e2:
        t0 = time.perf_counter()
        curl = subprocess.Popen([TIME, "-v", "-o", str(tv[0]), "curl", "-sS", "--fail", "-w", "%{stderr}%{size_download}\n",
                                 url], stdout=subprocess.PIPE, stderr=e0)
        zstd = subprocess.Popen([TIME, "-v", "-o", str(tv[1]), "zstd", "-d", "-q", "-c", "--long=27"],
                                stdin=curl.stdout, stdout=subprocess.PIPE, stderr=e1)
        sampler = Sampler(zstd)
        curl.stdout.close()
        dd = subprocess.Popen([TIME, "-v", "-o", str(tv[2]), "dd", f"of={slot}", "bs=1M", "conv=fsync,notrunc"],
                              stdin=zstd.stdout, stderr=e2)
        zstd.stdout.close()
        codes = [p.wait() for p in (curl, zstd, dd)]
        wall = time.perf_counter() - t0
    if any(codes):
        raise RuntimeError(f"pipeline failed {codes}: " + " | ".join(e.read_text().strip() for e in errs))
    downloaded = int(errs[0].read_text().split()[-1])
    sampler.stop()
    procs = [_timev(t, n, sampler if n == "zstd -d" else None) for t, n in zip(tv, ("curl", "zstd -d", "dd"))]
    ok = slot_sha256(slot, img.size) == img.sha256
    slot.unlink()
    return Run("pipeline", wall, procs, {}, downloaded, img.size, ok, dropped)


def verify_cost(paths: list[Path]) -> float:
    """CPU seconds of one sha256 pass over each file, in 1 MiB pieces (as abflip hashes pieces and
    slices): the verification the pipeline skips. Only the hashing is timed (the reads are not:
    the files may have left the page cache, and abflip reads its bytes off the socket anyway)."""
    buf, spent = bytearray(MIB), 0.0
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                t = time.thread_time()
                h.update(memoryview(buf)[:n])
                spent += time.thread_time() - t
    return spent


def memory_budget(rel: Release) -> int | None:
    """The device's ``limits.memory`` for ``rel``: None (keep the default) when it is enough,
    else ``memory_needed`` plus ``MEMORY_MARGIN``, rounded up to a MiB."""
    need = memory_needed(rel.image) + MEMORY_MARGIN
    return None if need <= DEFAULT_MEMORY else -(-need // MIB) * MIB


def make_device(run_dir: Path, server_url: str, repo: Path, factory: Path, slot_size: int,
                memory: int | None) -> SimDevice:
    extra = f"\n[limits]\nmemory = {memory}\n" if memory is not None else ""
    dev = SimDevice.create(run_dir / "device", repository_url=server_url,
                           trusted_root=(repo / "metadata" / "1.root.json").read_bytes(), product=PRODUCT,
                           hardware_id=HARDWARE, slot_size=slot_size, timeout=120.0, extra=extra)
    dev.provision(factory, slot="a", version=OLD, product=PRODUCT)
    Device(dev.config).mark_good()
    return dev


SLOTS = {"slot-a.img", "slot-b.img"}


def run_abflip(run_dir: Path, server_url: str, repo: Path, factory: Path, img: ImageInfo, slot_size: int,
               memory: int | None, env: dict[str, str]) -> Run:
    dev = make_device(run_dir, server_url, repo, factory, slot_size, memory)
    before = tree_bytes(dev.root, SLOTS)
    tv = run_dir / "time-abflip.txt"
    dropped = drop_caches()
    t0 = time.perf_counter()
    proc = subprocess.Popen([TIME, "-v", "-o", str(tv), *ABFLIP, "install", "--config", str(dev.config_path), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = Sampler(proc)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop()
    if proc.returncode:
        raise RuntimeError(f"abflip install failed ({proc.returncode}): {err.strip()}")
    # `install --json` prints JSON lines: progress events, then {"event": "result", "result": {...}}
    result = json.loads(out.strip().splitlines()[-1])["result"]
    after = tree_bytes(dev.root, SLOTS)
    outside = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))}
    sha = slot_sha256(dev.slot_path(result["slot"]), img.size)
    ok = sha == img.sha256
    # The fixed cost of the command, for comparison: ``abflip status`` on the same device,
    # also from a cold page cache (interpreter start, imports of typer/tuf/urllib3, config).
    drop_caches()
    t1 = time.perf_counter()
    subprocess.run([*ABFLIP, "status", "--config", str(dev.config_path), "--json"], check=True, capture_output=True,
                   env=env)
    startup = time.perf_counter() - t1
    shutil.rmtree(dev.root)
    return Run("abflip", wall, [_timev(tv, "abflip", sampler)], {k: v for k, v in outside.items() if v}, result["bytes_downloaded"],
               img.size, ok, dropped, startup, sha)


def profile_install(run_dir: Path, server_url: str, repo: Path, factory: Path, img: ImageInfo, slot_size: int,
                    memory: int | None, top: int) -> str:
    dev = make_device(run_dir, server_url, repo, factory, slot_size, memory)
    device = Device(dev.config)
    drop_caches()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    result = device.install()
    prof.disable()
    wall = time.perf_counter() - t0
    ok = slot_sha256(dev.slot_path(result.slot), img.size) == img.sha256
    shutil.rmtree(dev.root)
    out = io.StringIO()
    out.write(f"\n### cProfile of one in-process Device.install() ({wall:.2f} s wall under the profiler, "
              f"slot sha256 {'ok' if ok else 'MISMATCH'})\n\n")
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(top)
        text = s.getvalue()
        out.write(f"by {key}:\n```\n" + text[text.index("   ncalls"):].rstrip() + "\n```\n")
    if not ok:
        raise RuntimeError("the profiled install wrote a slot that does not match the image")
    return out.getvalue()


# -- report -------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def _median(rs: list[Run], key) -> float:  # type: ignore[no-untyped-def]
    return statistics.median(key(r) for r in rs)


def repeats_table(image: dict) -> list[str]:
    """The long-range repeats of the image by the distance measured in it (``dump.erofs``; the
    layout model's where nothing could be looked up) and kind."""
    reps = image.get("repeat_list") or []
    if not reps:
        return []
    unmeasured = sum(r["distance"] is None for r in reps)
    rows = [{**r, "distance": r["model"] if r["distance"] is None else r["distance"]} for r in reps]
    return rootfs.summarize(rows) + ([f"\n({unmeasured} distances from the layout model: no file of 8 KiB to look up)"]
                                     if unmeasured else [])


def report(runs: list[Run], img: ImageInfo, rel: ReleaseFiles, cli_size: int, cache: Cache, cmdline: str, *,
           link_mbps: float, memory: int | None, window_asked: int | None, run_seconds: float) -> str:
    by = {v: [r for r in runs if r.variant == v] for v in ("pipeline", "abflip")}
    wall = {v: _median(rs, lambda r: r.wall) for v, rs in by.items()}
    cpu = {v: _median(rs, lambda r: r.cpu) for v, rs in by.items()}
    comp = rel.release.image.compression
    im = cache.data["image"]
    need = memory_needed(rel.release.image)
    content = f"{im.get('input_files')} files of /usr ({_mib(im.get('base_bytes', im.get('input_bytes', 0)))} MiB)"
    if im.get("repeat_list"):
        share = im["copy_bytes"] / (im["base_bytes"] + im["copy_bytes"])
        content += (f" + {len(im['repeat_list'])} long-range repeats ({_mib(im['copy_bytes'])} MiB, "
                    f"{share:.0%} of the file content)")
    lines = ["## abflip apply benchmark\n",
             f"command: `{cmdline}`  ",
             f"machine: {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.1f} GiB RAM, "
             f"{os.uname().sysname} {os.uname().release}  ",
             f"image: erofs, {img.size} bytes ({_mib(img.size)} MiB): {content}, sha256 {img.sha256}  ",
             "link: " + (f"{link_mbps:g} Mbit/s (token bucket in the server process, shared by both variants)  "
                         if link_mbps > 0 else "loopback, unlimited  "),
             f"device memory budget (limits.memory): {memory >> 20 if memory else DEFAULT_MEMORY >> 20} MiB "
             + (f"(memory_needed {_mib(need)} MiB + {MEMORY_MARGIN >> 20} MiB margin)  " if memory
                else f"(the default; memory_needed {_mib(need)} MiB)  "),
             f"runs per variant: {len(by['abflip'])} (median shown); page cache dropped before each run: "
             f"{'yes' if all(r.dropped for r in runs) else 'NO (not permitted)'}\n"]
    if rt := repeats_table(im):
        lines += [*rt, ""]
    lines += ["| variant | wall s | wall ratio | CPU s (user+sys) | CPU ratio | peak RSS MiB | RssAnon / RssFile MiB | "
              "bytes outside slot | download bytes | extra bytes written (I/O acct.) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"pipeline": "curl \\| zstd -d --long=27 \\| dd (zstd CLI stream)",
             "abflip": "abflip install (chunked stream)"}
    for v, rs in by.items():
        rss = (f"{_mib(_median(rs, lambda r: r.rss_max))} max (zstd -d {_mib(_median(rs, lambda r: r.rss_of('zstd -d')))}) / "
               f"{_mib(_median(rs, lambda r: r.rss_sum))} sum" if v == "pipeline" else _mib(_median(rs, lambda r: r.rss_max)))
        lines.append(f"| {names[v]} | {wall[v]:.2f} | {wall[v] / wall['pipeline']:.2f}x | {cpu[v]:.2f} | "
                     f"{cpu[v] / cpu['pipeline']:.2f}x | {rss} | {_mib(_median(rs, lambda r: r.anon))} / "
                     f"{_mib(_median(rs, lambda r: r.file))}{' (zstd -d)' if v == 'pipeline' else ''} | "
                     f"{int(_median(rs, lambda r: r.outside_total))} | "
                     f"{int(_median(rs, lambda r: r.downloaded))} | {int(_median(rs, lambda r: r.written_extra))} |")
    pl = by["pipeline"]
    vf = _median(pl, lambda r: r.verify)
    floor = _median(pl, lambda r: r.cpu + r.verify)
    lines += ["",
              f"verify floor: the pipeline's CPU plus one sha256 pass over the compressed stream abflip downloads "
              f"and one over the image (measured after each pipeline run, warm: {vf:.2f} s) = {floor:.2f} s; "
              f"abflip's CPU {cpu['abflip']:.2f} s = {cpu['abflip'] / floor:.2f}x the floor"]
    ab = rel.release.image.compressed_size
    used = f"{comp.window >> 20} MiB window" + (" (the default)" if window_asked is None else
                                                 f" (asked {window_asked >> 20} MiB)" if comp.window != window_asked else "")
    lines += ["",
              f"compressed sizes: abflip chunked (zstd level {comp.level}, {comp.chunk_size >> 20} MiB chunks, "
              f"{used}, {len(rel.release.image.chunks)} frames) {ab} bytes "
              f"({ab / img.size:.3f} of the image); zstd CLI (`{cache.data['cli']['cmd']}`) {cli_size} bytes "
              f"({cli_size / img.size:.3f}); abflip / CLI = {ab / cli_size:.4f}",
              "",
              f"abflip fixed cost: `abflip status` on the same device from a cold page cache takes "
              f"{_median(by['abflip'], lambda r: r.startup):.2f} s (median): interpreter start and imports, "
              "included in the abflip wall time above",
              "",
              "per run (wall s, CPU s user+sys, peak RSS MiB per process, slot sha256 check):", ""]
    for r in runs:
        procs = ", ".join(f"{p.name} {_mib(p.max_rss)}" for p in r.procs)
        outside = f"  outside slot {r.outside}" if r.outside else ""
        lines.append(f"- {r.variant:8} {r.wall:6.2f} s  cpu {r.cpu:5.2f} s  rss [{procs}]  "
                     f"sha256 {'ok' if r.sha_ok else 'MISMATCH'}{outside}")
    shas = {r.slot_sha for r in by["abflip"]}
    lines += ["", f"slot written by abflip: sha256 {', '.join(sorted(shas))} "
              f"({'matches' if shas == {img.sha256} else 'DOES NOT MATCH'} the image sha256 in every run)"]
    one_time = []
    if "copy_s" in im:
        one_time.append(f"tree (/usr copy and repeats) {im['copy_s']} s, mkfs.erofs {im['mkfs_s']} s")
    if "seconds" in cache.data.get("release", {}):
        one_time.append(f"create_release (level {cache.data['release']['level']}) {cache.data['release']['seconds']} s")
    if "seconds" in cache.data.get("cli", {}):
        one_time.append(f"zstd CLI {cache.data['cli']['seconds']} s")
    if one_time:
        lines += ["", "one-time build costs (from the run that built the cache): " + "; ".join(one_time)]
    lines += ["", f"measured runs took {run_seconds:.0f} s in all (device set-up, slot hashing and `abflip status` included)"]
    return "\n".join(lines) + "\n"


def summary(runs: list[Run], rel: ReleaseFiles, cli_size: int) -> str:
    """The last line: abflip over the pipeline, and abflip's CPU over the verify floor."""
    ab = [r for r in runs if r.variant == "abflip"]
    pl = [r for r in runs if r.variant == "pipeline"]
    w = _median(ab, lambda r: r.wall) / _median(pl, lambda r: r.wall)
    c = _median(ab, lambda r: r.cpu) / _median(pl, lambda r: r.cpu)
    n = round(_median(ab, lambda r: r.rss_max) / MIB)
    a = round(_median(ab, lambda r: r.anon) / MIB)
    m = round(_median(pl, lambda r: r.rss_of("zstd -d")) / MIB)
    s = rel.release.image.compressed_size / cli_size
    f = _median(ab, lambda r: r.cpu) / _median(pl, lambda r: r.cpu + r.verify)
    return (f"apply/pipeline: {w:.2f}x wall, {c:.2f}x cpu; peak RSS {n} MiB, anon {a} MiB (zstd -d {m} MiB); "
            f"size {s:.3f}x CLI; cpu {f:.2f}x verify floor")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="MiB of file content in the image")
    ap.add_argument("--repeats", type=float, default=DEFAULT_REPEATS,
                    help="share of the file content that is long-range repeats (0: only /usr)")
    ap.add_argument("--window", type=parse_size, default=None,
                    help="abflip's dictionary window, e.g. 128M (default: the builder's)")
    ap.add_argument("--link-mbps", type=float, default=0.0,
                    help="limit the server's throughput to this many 10**6 bit/s (default: unlimited)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache and scratch directory")
    ap.add_argument("--runs", type=int, default=3, help="runs per variant (median reported)")
    ap.add_argument("--level", type=int, default=DEFAULT_LEVEL, help="abflip's zstd level (default: the builder's)")
    ap.add_argument("--cli-level", type=int, default=9, help="the zstd CLI's level (the baseline: -9 --long=27)")
    ap.add_argument("--build-only", action="store_true", help="make the cached image and streams, measure nothing")
    ap.add_argument("--profile", action="store_true", help="also cProfile one in-process install")
    ap.add_argument("--top", type=int, default=15, help="profile entries to print")
    ap.add_argument("--keep-tree", action="store_true", help="keep the file tree after building the image")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="run abflip in this environment as it is (default: its bytecode cached, as installed)")
    args = ap.parse_args(argv)
    if not 0 <= args.repeats < 1 or args.runs < 1 or args.size_mib < 1 or args.link_mbps < 0 or args.window == 0:
        ap.error("need 0 <= --repeats < 1, --runs >= 1, --size-mib >= 1, --link-mbps >= 0, --window > 0")
    for tool in ("curl", "zstd", "dd", TIME):
        if not shutil.which(tool):
            log(f"missing tool: {tool}")
            return 2
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = Cache.load(work / "cache.json")
    img = ensure_image(work, args.size_mib, cache, args.keep_tree, args.repeats)
    factory = ensure_small_image(work)
    rel = ensure_release(work, img, args.level, args.window, cache)
    cli_stream = ensure_cli_stream(work, img, args.cli_level, cache)
    cli_size = cli_stream.stat().st_size
    memory = memory_budget(rel.release)
    log(f"device memory budget: {(memory or DEFAULT_MEMORY) >> 20} MiB "
        f"({'set: ' if memory else 'default; '}memory_needed {_mib(memory_needed(rel.release.image))} MiB; the window "
        f"read in place from the slot's page cache: page_cache_needed {_mib(page_cache_needed(rel.release.image))} MiB)")
    if args.build_only:
        log(f"built: image {img.size} bytes, abflip stream {rel.release.image.compressed_size} bytes, "
            f"CLI stream {cli_size} bytes (abflip / CLI = {rel.release.image.compressed_size / cli_size:.4f})")
        return 0
    repo, image_key, cli_key = make_repo(work, rel.dir, cli_stream)
    slot_size = (img.size + 64 * MIB + MIB - 1) // MIB * MIB
    run_root = work / "runs"
    shutil.rmtree(run_root, ignore_errors=True)
    runs: list[Run] = []
    env = installed_env(work, cached=not args.no_bytecode_cache)
    t0 = time.monotonic()
    with ServerProcess(repo, args.link_mbps) as server:
        log(f"serving {repo} at {server.url} (pid {server.proc.pid}); abflip object /{image_key}")
        for i in range(args.runs):
            for variant in ("pipeline", "abflip"):
                d = run_root / f"{variant}-{i}"
                d.mkdir(parents=True)
                if variant == "pipeline":
                    r = run_pipeline(d, f"{server.url}/{cli_key}", img, slot_size)
                    r.verify = verify_cost([rel.dir / "rootfs.img.zst", img.path])
                else:
                    r = run_abflip(d, server.url, repo, factory, img, slot_size, memory, env)
                log(f"run {i + 1}/{args.runs} {variant}: {r.wall:.2f} s, cpu {r.cpu:.2f} s, "
                    f"peak RSS {_mib(r.rss_max)} MiB (anon {_mib(r.anon)}, file {_mib(r.file)}), "
                    f"slot sha256 {'ok' if r.sha_ok else 'MISMATCH'}")
                runs.append(r)
        run_seconds = time.monotonic() - t0
        prof = ""
        if args.profile:
            d = run_root / "profile"
            d.mkdir(parents=True)
            prof = profile_install(d, server.url, repo, factory, img, slot_size, memory, args.top)
    cmdline = " ".join(["python3", "bench/apply.py", *(argv if argv is not None else sys.argv[1:])])
    print(report(runs, img, rel, cli_size, cache, cmdline, link_mbps=args.link_mbps, memory=memory,
                 window_asked=args.window, run_seconds=run_seconds) + prof, flush=True)
    bad = [r for r in runs if not r.sha_ok]
    if bad:
        log(f"{len(bad)} run(s) wrote a slot that does not hash to the image sha256 {img.sha256}")
    print(summary(runs, rel, cli_size), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
