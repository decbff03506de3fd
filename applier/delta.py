"""Install through a delta: each chunk from the booted slot's image and a little data.

The device uses a delta only when the release offers one whose source is the image in the
booted slot, as the device recorded it (``state.slots[booted].sha256``, set when that image
was installed or provisioned). Then, per chunk of the release's chunk table, in order
(docs/delta.md, docs/invariants.md):

1. ``full``: the chunk of the full image, exactly as :mod:`applier.stream` does it.
2. otherwise: the operation's frame is fetched and checked against its sha256 *before* it is
   decompressed (invariant 4); every source extent (dictionary and copy segments) is read
   from the booted slot (read-only) and the chunk assembled.
3. Each byte is then hashed once, into the whole image's sha256 (issue 25): a source byte that
   differs gives other output, so the image's hash checks the booted slot's bytes too. When it
   does not match, the chunks are checked one by one against the chunk table and each that
   differs is made again from the full image (same boundaries), its source extents hashed to
   name the one that differs: a device whose booted slot differs in a few blocks still gets a
   verified slot, for a re-read of the slot. A chunk of the full image decodes against the
   slot's preceding bytes, so those are checked one by one first.

The chunk is written and progress persisted per chunk (a kill costs at most one chunk, as for
full images; a resume re-checks the chunks it counts as done one by one), and the whole-image
sha256 is compared with the manifest before anything may flip (invariant 3). Memory:
:func:`memory_needed` (two output chunks, one input buffer, the largest dictionary, the
decoder), whatever the image size; a delta needing more than the device's ``limits.memory``
is not used.

:func:`plan` decides (it fetches only the small delta manifest); :func:`write_delta` writes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from tuf.api import exceptions as tuf_exc

from metadata import zstdlib
from metadata.delta import Delta, DeltaError, DeltaRef
from metadata.errors import DeviceError, Error, RepositoryError, TransportError
from metadata.manifest import Chunk, Image, Release

from .fetch import READ_SIZE, transport_hint
from .slots import SlotDevice
from .stream import DECODER_OVERHEAD, MAX_WINDOW_LOG, STEP, ChunkError, Opener, _Reader, check_image, \
    decompress_chunk, verified_prefix, verify_chunk

__all__ = ["Plan", "DeltaStats", "plan", "write_delta", "memory_needed", "choose"]

PARSED_OVERHEAD = 8  # bytes of Python objects per byte of delta manifest JSON, generously


@dataclass(frozen=True)
class Plan:
    ref: DeltaRef
    delta: Delta
    data_url: str


@dataclass
class DeltaStats:
    """What :func:`write_delta` did, for the status and the result."""

    downloaded: int = 0
    chunks: dict[str, int] = field(default_factory=lambda: {"copy": 0, "frame": 0, "full": 0, "fallback": 0})
    fallbacks: list[str] = field(default_factory=list)  # the first few reasons


class _Fallback(Exception):
    """This chunk cannot come from the delta: take it from the full image."""


def choose(release: Release, source_sha256: str | None, source_size: int | None) -> DeltaRef | None:
    """The delta of ``release`` whose source is the booted image, if the device knows it."""
    if not source_sha256:
        return None
    return next((r for r in release.deltas if r.source.sha256 == source_sha256
                 and (source_size is None or r.source.size == source_size)), None)


def memory_needed(image: Image, delta: Delta, manifest_length: int) -> int:
    """Peak bytes :func:`write_delta` holds that the kernel cannot reclaim (pure): two output
    buffers of the largest chunk (one being assembled, one being written and hashed), one input
    buffer (the largest frame or, for a fallback, the largest compressed chunk), the largest of the
    operations' dictionaries (source extents read from the booted slot), one network read and
    the parsed manifest; with python-zstandard (no libzstd) also its copy of the dictionary and its
    decoder's window. A fallback chunk's window is mapped from the slot's page cache
    (:func:`applier.stream.page_cache_needed`: file-backed, not counted here)."""
    out = max(c.out_length for c in image.chunks)
    inbuf = max(delta.max_frame, max(c.length for c in image.chunks))
    need = 2 * out + inbuf + delta.max_dictionary + DECODER_OVERHEAD + READ_SIZE + PARSED_OVERHEAD * manifest_length
    if zstdlib.LIB is None:
        window = min(image.compression.window, max(c.out_offset for c in image.chunks))
        need += max(delta.max_dictionary, window) + min(out, 1 << MAX_WINDOW_LOG)
    return need


def plan(client, release: Release, ref: DeltaRef, *, budget: int, limits) -> tuple[Plan | None, str | None]:
    """Fetch and check the delta manifest of ``ref``; (plan, None) to use it, or (None, why not).
    Nothing here is fatal: whatever is wrong with a delta, the full image remains."""
    try:
        info, data = client.fetch_target(ref.manifest.target, ref.manifest.length)
        if info.hashes.get("sha256") != ref.manifest.sha256 or info.length != ref.manifest.length:
            return None, f"the delta manifest {ref.manifest.target} differs from the release manifest's reference"
        delta = Delta.from_bytes(data, limits)
        problem = delta.matches(ref, release.image, release.product, str(release.version))
        if problem is not None:
            return None, problem
        dinfo = client.target_info(ref.data.target)
        if dinfo.hashes.get("sha256") != ref.data.sha256 or dinfo.length != ref.data.length:
            return None, f"the delta data {ref.data.target} differs from the release manifest's reference"
        need = memory_needed(release.image, delta, len(data))
        if need > budget:
            return None, f"the delta needs about {need >> 20} MiB of memory, the budget is {budget >> 20} MiB"
        return Plan(ref, delta, client.target_url(dinfo)), None
    except (DeltaError, Error) as e:
        return None, e.message


def _fetch(opener: Opener, start: int, length: int, buf: bytearray, what: str, retries: int, backoff: float,
           stats: DeltaStats) -> memoryview:
    """Exactly ``length`` bytes from ``start``, retried like :func:`applier.stream.write_image`."""
    failures = 0
    while True:
        reader = _Reader((), buf)
        try:
            reader = _Reader(opener(start, start + length), buf)
            data = reader.take(length)
            stats.downloaded += reader.received
            if data is None:
                raise RepositoryError(f"{what}{' ' + reader.url if reader.url else ''} ended before its signed "
                                      f"{length} bytes")
            return data
        except tuf_exc.DownloadError as e:
            stats.downloaded += reader.received
            failures += 1
            if failures > retries:
                raise TransportError(f"downloading {what} failed after {retries} retries: {e}",
                                     hint=transport_hint(e)) from None
            time.sleep(backoff * failures)


def _read_source(source: SlotDevice, offset: int, into: memoryview, what: str) -> None:
    """Fill ``into`` from the booted slot; a short read or an I/O error falls back."""
    try:
        source.pread_into(offset, into)
    except DeviceError as e:
        raise _Fallback(f"{what}: {e.message}") from None


def _extents(op, copies: bool) -> list[tuple[str, int, int, str]]:
    """The source extents operation ``op`` reads: (what, source offset, length, sha256); the
    dictionary's, then (``copies``) the copy segments'."""
    return ([(f"dictionary extent {j}", src, n, sha) for j, (src, n, sha) in enumerate(op.dictionary)]
            + [(f"copy segment {j}", src, n, sha) for j, (_, src, n, sha) in enumerate(op.copy) if copies])


def _why_other_bytes(i: int, op, source: SlotDevice, scratch: memoryview, otherwise: str, *,
                     copies: bool = True) -> str:
    """Why chunk ``i`` did not come out of the delta as the chunk table says: its source extents
    read again from the booted slot and hashed one by one, the first that is not the delta's
    source's named, else ``otherwise``. Only a chunk that failed pays for this: its frame did not
    decode (the dictionary's extents, ``copies`` false), or the image's hash found it."""
    for what, src, n, sha in _extents(op, copies):
        h, at = hashlib.sha256(), 0
        try:
            while at < n:
                view = scratch[:min(len(scratch), n - at)]
                source.pread_into(src + at, view)
                h.update(view)
                at += len(view)
        except DeviceError as e:
            return f"chunk {i} {what}: {e.message}"
        if h.hexdigest() != sha:
            return f"chunk {i} {what}: the booted slot's bytes {src}-{src + n - 1} differ from the delta's source"
    return f"chunk {i}: {otherwise}"


class _Writer:
    """The buffers, reused from chunk to chunk (their sizes are :func:`memory_needed`'s): two
    output buffers (chunk ``i`` is assembled in ``out[i % 2]`` while chunk ``i-1`` is hashed from
    the other), the input buffer and the dictionary buffer, grown to the largest asked for."""

    def __init__(self, image: Image, delta: Delta) -> None:
        self.outs = [bytearray(max(c.out_length for c in image.chunks)) for _ in range(2)]
        self.out = self.outs[0]
        self.inbuf = bytearray(0)
        self.dict = bytearray(0)

    def input(self, n: int) -> bytearray:
        if len(self.inbuf) < n:
            self.inbuf = bytearray(0)
            self.inbuf = bytearray(n)
        return self.inbuf

    def dictionary(self, n: int) -> memoryview:
        if len(self.dict) < n:
            self.dict = bytearray(0)
            self.dict = bytearray(n)
        return memoryview(self.dict)[:n]


def _from_delta(i: int, op, ch: Chunk, bufs: _Writer, source: SlotDevice, data_opener: Opener, retries: int,
                backoff: float, stats: DeltaStats, final: Callable[[int], None]) -> tuple[memoryview, str]:
    """Chunk ``i`` assembled from the delta: its frame (verified before it is decompressed), decoded
    with its dictionary extents, and its copy segments, all read from the booted slot. Not hashed
    here: the whole image's sha256 checks every byte, the booted slot's included (a byte that
    differs gives other output; :func:`write_delta` then checks the chunks one by one).
    ``final(n)`` says the chunk's first ``n`` bytes are assembled: a chunk of copies only says so
    after every ``STEP`` it reads (the caller writes and hashes them while they are in the cache),
    one with a frame once, at its end."""
    out = memoryview(bufs.out)
    kind = "copy"
    if op.frame is not None:
        kind = "frame"
        f = op.frame
        data = _fetch(data_opener, f.offset, f.length, bufs.input(f.length), f"the delta data of chunk {i}", retries,
                      backoff, stats)
        if hashlib.sha256(data).hexdigest() != f.sha256:
            raise _Fallback(f"chunk {i}: the delta's frame failed verification (sha256 mismatch)")
        dictionary = None
        if op.dictionary:
            dictionary = bufs.dictionary(op.dictionary_size)
            at = 0
            for j, (src, n, _) in enumerate(op.dictionary):
                view = dictionary[at:at + n]
                _read_source(source, src, view, f"chunk {i} dictionary extent {j}")
                at += n
        try:
            decompress_chunk(i, Chunk(f.offset, f.length, f.sha256, 0, f.size, f.out_sha256), data, dictionary,
                             bufs.out, check=False)
        except ChunkError as e:
            raise _Fallback(_why_other_bytes(i, op, source, out, f"the delta's frame {e.message.split(': ', 1)[-1]}",
                                             copies=False)) from None
        del data, dictionary
        # The frame's bytes are the chunk minus its copy segments, in order: move them into
        # place from the last run to the first (each moves forward, never over one not moved).
        runs, pos, lit = [], 0, 0
        for rel, _, n, _ in op.copy:
            if rel > pos:
                runs.append((pos, lit, rel - pos))
                lit += rel - pos
            pos = rel + n
        if pos < op.out_length:
            runs.append((pos, lit, op.out_length - pos))
        for dst, src, n in reversed(runs):
            if dst != src:
                out[dst:dst + n] = out[src:src + n]
    for j, (rel, src, n, _) in enumerate(op.copy):
        if op.frame is not None:
            _read_source(source, src, out[rel:rel + n], f"chunk {i} copy segment {j}")
            continue
        for at in range(0, n, STEP):  # the copies tile the chunk, in order: each step is final once read
            k = min(STEP, n - at)
            _read_source(source, src + at, out[rel + at:rel + at + k], f"chunk {i} copy segment {j}")
            final(rel + at + k)
    final(op.out_length)
    return out[:op.out_length], kind


def _from_full(i: int, image: Image, slot: SlotDevice, bufs: _Writer, out: bytearray, full_opener: Opener,
               retries: int, backoff: float, stats: DeltaStats) -> memoryview:
    """Chunk ``i`` from the full image, decoded into ``out`` and checked against the chunk table;
    its window is read in place from the slot (written and checked one by one before it: the
    caller has seen to both), mapped from the page cache."""
    ch = image.chunks[i]
    data = _fetch(full_opener, ch.offset, ch.length, bufs.input(ch.length), f"chunk {i} of the image", retries,
                  backoff, stats)
    verify_chunk(i, ch, data)  # a bad chunk of the full image is the repository's fault: no further fallback
    window = image.compression.window
    if not window or not ch.out_offset:
        return decompress_chunk(i, ch, data, None, out)
    lo = max(0, ch.out_offset - window)
    with slot.mapped(lo, ch.out_offset - lo) as dictionary:
        return decompress_chunk(i, ch, data, dictionary, out)


def write_delta(image: Image, delta: Delta, slot: SlotDevice, source: SlotDevice, data_opener: Opener,
                full_opener: Opener, *, chunks_done: int = 0, retries: int = 5,
                on_chunk: Callable[[int, int], None] | None = None, backoff: float = 0.5,
                stats: DeltaStats | None = None) -> DeltaStats:
    """Write ``image`` into ``slot`` from ``delta`` over the ``source`` slot, starting after
    ``chunks_done`` verified chunks; as :func:`applier.stream.write_image`, ``on_chunk(i,
    downloaded)`` runs after chunk ``i`` is written, and the whole-image sha256 is checked at
    the end (a :class:`RepositoryError` if the chunks, each checked, do not make it).

    The work overlaps (issue 25): this thread assembles chunk ``i`` (fetch, source reads,
    decompression) and writes it while a hashing thread adds chunk ``i-1`` to the whole image's
    sha256 (the one pass every byte goes through) and a progress thread saves the progress of
    the chunks written (an fsync each, as :func:`applier.stream.write_image`'s progress stage),
    in order, never more than two chunks behind. Only when that hash differs (a byte of the
    booted slot that is not the source's, a frame that decodes to other bytes) are the chunks
    read back and checked one by one, and each that differs made again from the full image."""
    if image.size > slot.capacity:
        raise DeviceError(f"the image decompresses to {image.size} bytes; slot {slot.name} holds only {slot.capacity}",
                          hint="this release does not fit this device's slots")
    stats = stats or DeltaStats()
    first, h = verified_prefix(image, slot, chunks_done)
    before = h.copy()  # the image's hash over the chunks checked one by one at the start
    bufs = _Writer(image, delta)
    made: dict[int, str] = {}  # how each chunk from ``first`` was made: copy, frame, full or fallback
    # the hash, and the progress save, of the chunk that last used out[0], out[1]
    pending: list[list[Future]] = [[], []]
    state = {"checked": first}  # chunks [0, checked) checked one by one

    failed: list[BaseException] = []

    def save(i: int, downloaded: int) -> None:
        """Chunk ``i``'s progress (it is written), in order; after a failure nothing more is counted."""
        if failed:
            raise failed[0]
        try:
            on_chunk(i, downloaded)  # type: ignore[misc]
        except BaseException as e:
            failed.append(e)
            raise

    def wait(*which: int) -> None:
        for k in which:
            futures, pending[k] = pending[k], []
            for f in futures:
                f.result()  # a progress save that failed raises here

    def fall_back(i: int, why: str) -> None:
        stats.chunks["fallback"] += 1
        if len(stats.fallbacks) < 8:
            stats.fallbacks.append(why)

    def check_upto(end: int, whole: hashlib._Hash | None) -> None:
        """Check chunks [checked, end) one by one from the slot; make each that differs again from
        the full image (its window, the chunks before it, checked by then); add each chunk's bytes
        to ``whole`` if given."""
        wait(0, 1)  # both buffers free
        scratch = bufs.outs[0]
        for j in range(state["checked"], end):
            ch = image.chunks[j]
            view = memoryview(scratch)[:ch.out_length]
            slot.pread_into(ch.out_offset, view)
            if hashlib.sha256(view).hexdigest() != ch.out_sha256:
                kind = made.get(j, "full")
                if kind in ("full", "fallback"):  # checked by its decoder before it was written
                    raise ChunkError(f"chunk {j} in slot {slot.name} changed after it was written and checked",
                                     hint="the slot's storage does not keep what is written to it; nothing was "
                                          "flipped and the slot is not recorded good")
                fall_back(j, _why_other_bytes(j, delta.ops[j], source, memoryview(bufs.outs[1]),
                                              "the delta produced other bytes than the chunk table says"))
                made[j] = "fallback"
                view = _from_full(j, image, slot, bufs, scratch, full_opener, retries, backoff, stats)
                slot.pwrite(ch.out_offset, view)
                slot.start_writeback(ch.out_offset, ch.out_length)  # the running hash took its other bytes
            if whole is not None:
                whole.update(view)
            state["checked"] = j + 1

    with ThreadPoolExecutor(1, thread_name_prefix="abflip-delta-hash") as hasher, \
            ThreadPoolExecutor(1, thread_name_prefix="abflip-delta-progress") as saver:
        try:
            for i in range(first, len(image.chunks)):
                if failed:
                    raise failed[0]
                ch, op = image.chunks[i], delta.ops[i]
                wait(i % 2)  # out[i % 2] held chunk i-2: hashed, its progress saved?
                bufs.out = bufs.outs[i % 2]
                done = [0]  # the chunk's bytes written and handed to the hash so far

                def final(n: int, i: int = i, ch: Chunk = ch, done: list[int] = done) -> None:
                    if n > done[0]:  # written, then hashed beside: each step as soon as it is assembled
                        part = memoryview(bufs.outs[i % 2])[done[0]:n]
                        slot.pwrite(ch.out_offset + done[0], part)
                        pending[i % 2].append(hasher.submit(h.update, part))
                        done[0] = n

                view = None
                if not op.full:
                    try:
                        view, made[i] = _from_delta(i, op, ch, bufs, source, data_opener, retries, backoff, stats,
                                                    final)
                    except _Fallback as f:
                        made[i] = "fallback"
                        fall_back(i, str(f))  # a part written before is hashed twice: the image's hash differs
                if view is None:
                    made.setdefault(i, "full")
                    check_upto(i, None)  # its window: the bytes before it, checked one by one
                    view = _from_full(i, image, slot, bufs, bufs.outs[i % 2], full_opener, retries, backoff, stats)
                    state["checked"] = i + 1
                    slot.pwrite(ch.out_offset, view)
                    pending[i % 2].append(hasher.submit(h.update, view))
                slot.start_writeback(ch.out_offset, ch.out_length)  # as the full image's stream: dirty pages stay few
                if on_chunk:
                    pending[i % 2].append(saver.submit(save, i, stats.downloaded))
                del view
            wait(0, 1)
        finally:
            for f in pending[0] + pending[1]:  # an error above: what is in flight ends before its buffer goes
                f.cancel() or f.exception()
    if h.hexdigest() != image.sha256:
        # Some chunk is not the chunk table's (or was made again: the hash took its other bytes
        # too): check each, make the ones that differ again, hash the image again over the slot.
        h, state["checked"] = before, first
        check_upto(len(image.chunks), h)
    for kind in made.values():
        stats.chunks[kind] += kind != "fallback"  # a fallback was counted with its reason
    slot.sync()
    check_image(image, slot, h, len(image.chunks))  # every chunk was checked on its own: only the table is left
    return stats


# -- the agent's side: choose, write, record ------------------------------------------------------
@dataclass
class Via:
    """How a download goes: through ``plan`` (a delta), or the full image (``plan`` None;
    ``note`` says why a delta on offer was not used)."""

    plan: Plan | None
    note: str | None = None
    stats: DeltaStats | None = None

    def result(self, release: Release) -> dict:
        st = self.stats
        return {"kind": "delta" if self.plan is not None else "full",
                "delta_from": self.plan.ref.source.version if self.plan is not None else None,
                "fallback_chunks": st.chunks["fallback"] if st else 0,
                "delta_note": self.note or (st.fallbacks[0] if st and st.fallbacks else None)}

    def record(self, release: Release, downloaded: int, base: int) -> bytes:
        import json

        total = base + downloaded
        full = release.image.compressed_size
        out = {"version": str(release.version), **self.result(release), "bytes_downloaded": total,
               "full_bytes": full, "bytes_saved": max(0, full - total) if self.plan is not None else 0}
        if self.stats is not None:
            out["chunks"] = dict(self.stats.chunks)
            out["fallbacks"] = list(self.stats.fallbacks)
        return (json.dumps(out, sort_keys=True) + "\n").encode()


def plan_for(session, client, release: Release, state, booted: str) -> Via:
    """The delta to use for ``release`` on this device, if any (never raises for a bad delta)."""
    s = state.slots[booted]
    ref = choose(release, s.sha256, s.size)
    if ref is None:
        if not release.deltas:
            return Via(None)
        why = ("no delta from the booted image" if s.sha256 else
               "the booted slot's image sha256 is not recorded (provision the device), so no delta applies")
        return Via(None, why)
    session.emit(phase="delta", source=ref.source.version)
    p, why = plan(client, release, ref, budget=session.config.memory_budget, limits=session.limits)
    return Via(p, None if p is not None else f"the delta from {ref.source.version} is not used: {why}")


def write_planned(session, fetcher, via: Via, release: Release, slot_dev: SlotDevice, booted: str, url: str,
                  start: int, on_chunk: Callable[[int, int], None]) -> int:
    """Write the target slot through ``via.plan``, the booted slot opened read-only as the source."""
    from .stream import write_image

    cfg = session.config
    full = lambda s, e: fetcher.open_range(url, s, e)  # noqa: E731
    assert via.plan is not None
    try:
        source = SlotDevice(booted, cfg.slots[booted].device, write=False)
    except Error as e:
        via.plan, via.note = None, f"the booted slot cannot be read ({e.message}); the full image is used"
        return write_image(release.image, slot_dev, full, chunks_done=start, retries=cfg.retries, on_chunk=on_chunk)
    data_url = via.plan.data_url
    with source:
        via.stats = write_delta(release.image, via.plan.delta, slot_dev, source,
                                lambda s, e: fetcher.open_range(data_url, s, e), full, chunks_done=start,
                                retries=cfg.retries, on_chunk=on_chunk)
    return via.stats.downloaded
