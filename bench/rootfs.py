"""The apply benchmark's root filesystem tree: files of this machine's ``/usr``, plus long-range repeats.

``build_tree(tree, size, repeat_share)`` fills ``tree`` with about ``size`` bytes of file
content; ``measure(image, repeats)`` reads back, from the built erofs image, how far apart
each repeat really ended up. ``bench/apply.py`` uses both; the rules they keep:

- **Deterministic.** The same ``/usr`` and the same arguments give the same tree: the walk is
  sorted, and every random choice comes from a PRNG seeded with a constant (the plan) or with
  the repeat's number and the file's path (the edits of a modified copy).
- **Base.** Files of ``/usr`` (regular files and symlinks; unreadable and special files
  skipped) are copied to the same paths below ``tree`` until within 1 % of
  ``size * (1 - repeat_share)`` bytes (a file that would overshoot is skipped). The roots in
  :data:`ROOTS` are drained byte-fairly (always from the one that has given the fewest bytes
  so far), so the mix is executables, libraries, Python/Java code and data rather than
  whatever sorts first. With ``repeat_share = 0`` this is the whole tree (the image of the
  benchmark before issue 14).
- **Layout model.** ``mkfs.erofs`` (erofs-utils 1.5) writes file data in depth-first order,
  the entries of each directory sorted by name (``strcmp``), files and directories
  interleaved (checked with ``dump.erofs -e``: ``a``, ``a+z``, ``a.x/g``, ``b/f``, ``c``). So a
  file's place in the image is about the sum of the sizes before it in that order
  (:func:`layout`); metadata blocks and inlined tails move it a little, which is why the
  distances are also measured.
- **Repeats** (issue 14). A *source* is a run of consecutive base files in that order (4-24
  MiB, none larger than 24 MiB). Its *copy* is a new directory holding the same files under
  their paths relative to the run's common directory, either byte-identical or lightly
  modified (one edit per :data:`EDIT_EVERY` bytes on average: 8 bytes overwritten, 16 bytes
  inserted or 16 bytes deleted, so matches break and shift as between two builds). The copy
  is placed where the layout has advanced a chosen *distance* past the source's first byte:
  as ``<F>+copy<k>`` in the directory of the base file ``F`` that ends there (``+`` sorts
  before the characters file names normally hold, so the copy follows ``F`` directly).
  Distances: 6 of 8 repeats "mid", 24-112 MiB (inside zstd ``--long=27``'s 128 MiB window
  and beyond a 32 MiB one), 2 of 8 "far", 160-768 MiB (beyond both); no farther than the
  rest of the image reaches (a far one becomes a mid one when less than 160 MiB are left).
  Where a file of tens of MiB lies at the target the copy goes before or after it, so a few
  land outside their class: :func:`summarize` groups repeats by the distance they got.
  Sources are spread over the image so the copies planned keep pace with the base bytes
  walked, and the copies together fill ``size`` minus the base (more than ``repeat_share``
  when ``/usr`` runs short; less in an image of a few hundred MiB, too short for many).

Dry run (nothing copied): ``python3 bench/rootfs.py SIZE_MIB [--repeats 0.25]`` prints that
table for the plan.
"""

from __future__ import annotations

import os
import posixpath
import random
import re
import shutil
import statistics
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

__all__ = ["ROOTS", "Entry", "Repeat", "TreeInfo", "build_tree", "copy_usr", "layout", "plan", "measure", "summarize"]

MIB = 1 << 20
RECIPE = 1  # bump when the tree's recipe changes: cached images made by another recipe are rebuilt
SEED = "abflip-bench-repeats-1"
SRC_MIN, SRC_MAX = 4 * MIB, 24 * MIB  # length of a source run
DISTANCE = {"mid": (24 * MIB, 112 * MIB), "far": (160 * MIB, 768 * MIB)}  # copy start - source start
LOW = {"mid": 16 * MIB, "far": 136 * MIB}  # a copy is not placed nearer than this (see plan)
# (distance class, modified) of repeat k is PATTERN[k % 8]
PATTERN = [("mid", False), ("mid", True), ("mid", False), ("far", True),
           ("mid", True), ("mid", False), ("far", False), ("mid", True)]
EDIT_EVERY = 32 << 10
# (source root, sub-directories of it left to another root)
ROOTS = [
    ("/usr/bin", ()),
    ("/usr/sbin", ()),
    ("/usr/libexec", ()),
    ("/usr/lib/x86_64-linux-gnu", ()),
    ("/usr/lib", ("x86_64-linux-gnu",)),
    ("/usr/share", ()),
]


# -- the base: files of /usr ----------------------------------------------------------------
def _walk(root: str, exclude: tuple[str, ...]) -> Iterator[tuple[str, int]]:
    """(path, bytes) of the regular files and symlinks under ``root``, sorted, readable only."""
    for dirpath, dirs, files in os.walk(root):
        if dirpath == root:
            dirs[:] = [d for d in dirs if d not in exclude]
        keep = []
        for d in sorted(dirs):
            p = os.path.join(dirpath, d)
            if os.path.islink(p):  # os.walk does not descend symlinked dirs; copy the link itself
                yield p, 0
            elif os.access(p, os.R_OK | os.X_OK):
                keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if os.path.islink(p):
                yield p, 0
            elif os.path.isfile(p) and os.access(p, os.R_OK):
                yield p, st.st_size


def select_usr(budget: int) -> Iterator[tuple[str, int, bool]]:
    """(path, bytes, is symlink) of the files of ``ROOTS`` to take, until within 1 % of ``budget``
    bytes; a file that would overshoot the budget is skipped."""
    gens = {root: _walk(root, excl) for root, excl in ROOTS if os.path.isdir(root)}
    given = dict.fromkeys(gens, 0)
    total = 0
    while gens and total < budget - budget // 100:
        root = min(gens, key=given.__getitem__)
        item = next(gens[root], None)
        if item is None:
            del gens[root]
            continue
        src, size = item
        if total + size > budget:
            continue
        given[root] += size
        total += size
        yield src, size, os.path.islink(src)


def copy_usr(tree: Path, budget: int) -> list[Entry]:
    """Copy the files :func:`select_usr` picks into ``tree`` (same paths below it); returns the
    ones copied (a file that vanished or turned out unreadable is left out)."""
    out = []
    for src, size, link in select_usr(budget):
        dst = tree / src.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            if link:
                os.symlink(os.readlink(src), dst)
            else:
                shutil.copy2(src, dst)  # sendfile on Linux
        except OSError:
            dst.unlink(missing_ok=True)
            continue
        out.append(Entry(src.lstrip("/"), size, link))
    return out


# -- the layout model -----------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    path: str  # relative to the tree, '/'-separated
    size: int  # 0 for a symlink (its target lives in the metadata)
    link: bool


def layout(entries: list[Entry]) -> list[Entry]:
    """``entries`` in the order mkfs.erofs lays their data out: depth first, each directory's
    entries sorted by the bytes of their names, i.e. sorted by the tuple of path components."""
    return sorted(entries, key=lambda e: [os.fsencode(c) for c in e.path.split("/")])


# -- the plan -------------------------------------------------------------------------------
@dataclass
class Repeat:
    index: int
    klass: str  # "mid" or "far"
    modified: bool
    start: int  # model position of the source's first byte
    want: int  # the source length aimed at
    distance: int  # the copy should start this far past ``start``
    files: list[Entry] = field(default_factory=list)
    after: Entry | None = None  # the base file the copy directory follows
    at: int | None = None  # model position of the copy

    @property
    def size(self) -> int:
        return sum(e.size for e in self.files)

    @cached_property  # asked per file of the copy; the files are complete by then
    def common(self) -> str:
        """The source's common directory (the copy holds the files relative to it)."""
        return posixpath.commonpath([posixpath.dirname(e.path) for e in self.files])

    @property
    def copy_dir(self) -> str:
        return f"{self.after.path}+copy{self.index}"

    def copy_path(self, e: Entry) -> str:
        return f"{self.copy_dir}/{posixpath.relpath(e.path, self.common)}"


def plan(entries: list[Entry], copy_budget: int) -> list[Repeat]:
    """Choose the sources and where their copies go (pure: the entries in layout order and the
    bytes the copies may take; no I/O). See the module docstring for the rules."""
    rng = random.Random(SEED)
    base_total = sum(e.size for e in entries)
    horizon = max(base_total - DISTANCE["mid"][0] * 2, base_total // 2, 1)  # sources start before here
    repeats: list[Repeat] = []
    waiting: list[Repeat] = []  # source complete, copy not placed yet
    run: Repeat | None = None  # the source being collected
    pos = base_pos = planned = 0
    prev: Entry | None = None

    def close() -> None:
        nonlocal run, planned
        planned += run.size - run.want
        run.distance = max(run.distance, run.size + MIB)
        waiting.append(run)
        run = None

    for e in entries:
        # A copy goes before e (after prev) once its target is reached; when e straddles the
        # target, before e too if that distance is still in the repeat's class, else after it.
        for r in [r for r in waiting if prev is not None and (
                pos - r.start >= r.distance
                or (pos + e.size - r.start > r.distance and pos - r.start >= LOW[r.klass]))]:
            r.after, r.at = prev, pos
            pos += r.size
            waiting.remove(r)
        if run is not None and (e.size > SRC_MAX or run.size + e.size > run.want):
            close()
        if run is None and e.size <= SRC_MAX and not e.link and planned < copy_budget * min(1.0, base_pos / horizon):
            klass, modified = PATTERN[len(repeats) % len(PATTERN)]
            room = base_total - base_pos  # the rest of the image: the walk reaches any target within it
            if klass == "far" and room < DISTANCE["far"][0]:
                klass = "mid"
            lo, hi = DISTANCE[klass]
            distance = int(rng.uniform(lo, max(lo, min(hi, room))))  # a mid one may come out beyond room
            want = min(int(rng.uniform(SRC_MIN, SRC_MAX)), copy_budget - planned, distance - MIB)
            if distance <= room and want >= SRC_MIN // 4:
                run = Repeat(len(repeats), klass, modified, pos, want, distance)
                repeats.append(run)
                planned += want
        if run is not None:
            run.files.append(e)
        pos += e.size
        base_pos += e.size
        prev = e
    if run is not None:
        close()
    for r in waiting:  # not reached (only if the model ran out of image): after the last file
        r.after, r.at = prev, pos
        pos += r.size
    return repeats


# -- making and measuring -------------------------------------------------------------------
def modify(data: bytes, rng: random.Random) -> bytes:
    """``data`` lightly edited: on average one edit per ``EDIT_EVERY`` bytes."""
    out, pos = [], 0
    while (step := int(rng.expovariate(1 / EDIT_EVERY)) + 1) < len(data) - pos:
        out.append(data[pos:pos + step])
        pos += step
        op = rng.random()
        if op < 0.6:
            out.append(rng.randbytes(8))
            pos += 8
        elif op < 0.8:
            out.append(rng.randbytes(16))
        else:
            pos += 16
    out.append(data[pos:])
    return b"".join(out)


def make_copies(tree: Path, repeats: list[Repeat]) -> int:
    """Write the copies into ``tree``; returns the bytes written."""
    total = 0
    for r in repeats:
        for e in r.files:
            rel = posixpath.relpath(e.path, r.common)
            src, dst = tree / e.path, tree / r.copy_path(e)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if e.link:
                os.symlink(os.readlink(src), dst)
            elif r.modified:
                dst.write_bytes(modify(src.read_bytes(), random.Random(f"{SEED}:{r.index}:{rel}")))
            else:
                shutil.copyfile(src, dst)
            total += dst.lstat().st_size if not e.link else 0
    return total


@dataclass
class TreeInfo:
    base_bytes: int
    base_files: int
    copy_bytes: int
    repeats: list[Repeat]


def build_tree(tree: Path, size: int, repeat_share: float) -> TreeInfo:
    """Fill the empty directory ``tree``: base files of /usr, then the copies (module docstring)."""
    entries = copy_usr(tree, int(size * (1 - repeat_share)))
    base = sum(e.size for e in entries)
    if repeat_share <= 0:
        return TreeInfo(base, len(entries), 0, [])
    repeats = plan(layout(entries), size - base)
    return TreeInfo(base, len(entries), make_copies(tree, repeats), repeats)


_EXTENT0 = re.compile(r"^\s*0:\s*\d+\.\.\s*\d+\s*\|\s*\d+\s*:\s*(\d+)\.\.", re.M)


def _physical(image: Path, path: str) -> int | None:
    """Byte offset of the first data extent of ``/path`` in the erofs ``image`` (dump.erofs -e)."""
    out = subprocess.run(["dump.erofs", "-e", f"--path=/{path}", str(image)], capture_output=True, text=True)
    m = _EXTENT0.search(out.stdout)
    return int(m.group(1)) if out.returncode == 0 and m else None


def measure(image: Path, repeats: list[Repeat]) -> list[dict]:
    """Per repeat: class, modified, bytes, the model's distance and the one measured in the image
    (first source file of at least 8 KiB and its copy; None without such a file or dump.erofs)."""
    have_dump = shutil.which("dump.erofs") is not None
    out = []
    for r in repeats:
        measured = None
        e = next((e for e in r.files if not e.link and e.size >= 8192), None)
        if have_dump and e is not None:
            a, b = _physical(image, e.path), _physical(image, r.copy_path(e))
            measured = b - a if a is not None and b is not None else None
        out.append({"k": r.index, "class": r.klass, "modified": r.modified, "files": len(r.files), "bytes": r.size,
                    "model": r.at - r.start, "distance": measured})
    return out


BANDS = [("< 16 MiB", 0, 16 * MIB), ("16-128 MiB", 16 * MIB, 128 * MIB + 1), ("> 128 MiB", 128 * MIB + 1, 1 << 62)]


def summarize(repeats: list[dict]) -> list[str]:
    """A Markdown table of repeats (dicts with ``modified``, ``bytes``, ``distance``) by distance
    band: below 16 MiB every window catches them, up to 128 MiB zstd ``--long=27`` does."""
    lines = ["| distance in the image | kind | repeats | MiB | distance MiB: min / median / max |",
             "|---|---|---:|---:|---|"]
    for band, lo, hi in BANDS:
        for modified in (False, True):
            rs = [r for r in repeats if lo <= r["distance"] < hi and r["modified"] == modified]
            if rs:
                d = sorted(r["distance"] / MIB for r in rs)
                lines.append(f"| {band} | {'lightly modified' if modified else 'byte-identical'} | {len(rs)} | "
                             f"{sum(r['bytes'] for r in rs) / MIB:.1f} | {d[0]:.0f} / {statistics.median(d):.0f} / {d[-1]:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Dry run: the plan for an image, from /usr's metadata alone (nothing is copied)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="print the long-range repeats planned for an image (nothing is copied)")
    ap.add_argument("size_mib", type=int)
    ap.add_argument("--repeats", type=float, default=0.25)
    args = ap.parse_args(argv)
    size = args.size_mib * MIB
    entries = [Entry(p.lstrip("/"), n, link) for p, n, link in select_usr(int(size * (1 - args.repeats)))]
    base = sum(e.size for e in entries)
    repeats = plan(layout(entries), size - base)
    copies = sum(r.size for r in repeats)
    print(f"base: {len(entries)} files, {base / MIB:.1f} MiB; copies: {len(repeats)}, {copies / MIB:.1f} MiB "
          f"({copies / (base + copies):.1%} of {(base + copies) / MIB:.1f} MiB)")
    for line in summarize([{"modified": r.modified, "bytes": r.size, "distance": r.at - r.start} for r in repeats]):
        print(line)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
