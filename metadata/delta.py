"""Delta updates: the format both halves speak, its parser and its bounds.

A release may carry deltas from earlier releases. ``release.json`` names each in its
``deltas`` list (:class:`DeltaRef`): the *source* image (version, sha256, size), the delta
manifest (``delta-<source>.json``) and the delta data (``delta-<source>.bin``), each with the
sha256 and length the signed release manifest vouches for; both files are TUF targets too.

The delta manifest (``abflip-delta/1``, :class:`Delta`) reuses the target release's chunk
table: operation ``i`` produces exactly chunk ``i`` (same ``out_offset``/``out_length``,
verified against the chunk's signed ``out_sha256`` before it is written). One operation:

- ``copy``: ``[rel, source_offset, length, sha256]`` segments, each a run of source image
  bytes placed at ``rel`` in the chunk; every segment carries the sha256 of the source bytes
  it reads, checked on the device before use;
- ``frame``: a zstd frame (``offset``/``length``/``sha256`` in the delta data, checked before
  decompression) that decompresses (``size`` bytes, ``out_sha256``) to the bytes no copy
  segment covers, in order; it was compressed against a raw-content dictionary made of the
  ``dict`` source extents ``[source_offset, length, sha256]`` concatenated (each checked);
- ``full``: none of the above; the device takes chunk ``i`` of the full image.

Parsing is pure and bounded like :mod:`metadata.manifest` (invariant 9): every offset is in
the source's bounds, outputs never overlap, the data fits its declared length and is smaller
than the full image, dictionary and segment counts are capped. A delta that fails any rule
is a :class:`DeltaError` (the repository's fault); the device then installs the full image.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .bounded import loads_json
from .errors import RepositoryError, UserError
from .manifest import Chunk, Image, Limits, target_problem
from .version import Version

__all__ = ["DELTA_SCHEMA", "DeltaError", "DeltaLimits", "DeltaRef", "DeltaFile", "Source", "Frame", "Op", "Delta",
           "chunks_digest", "parse_delta_refs", "delta_refs_json", "delta_ref_problem", "delta_files_problem"]

DELTA_SCHEMA = "abflip-delta/1"
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")


class DeltaError(RepositoryError):
    """A delta (its reference in release.json, its manifest or its data) breaks a rule."""


@dataclass(frozen=True)
class DeltaLimits:
    """Bounds a device accepts for deltas (on top of :class:`metadata.manifest.Limits`)."""

    max_deltas: int = 16  # per release
    manifest_max_bytes: int = 16 << 20
    max_dictionary: int = 128 << 20  # bytes of source extents one frame may use as its dictionary
    max_segments: int = 65536  # copy segments + dict extents of one operation
    max_total_segments: int = 1 << 18  # of the whole delta (bounds the parsed manifest's memory)


# -- release.json: the references -------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    version: str
    sha256: str
    size: int


@dataclass(frozen=True)
class DeltaFile:
    target: str
    sha256: str
    length: int


@dataclass(frozen=True)
class DeltaRef:
    source: Source
    manifest: DeltaFile
    data: DeltaFile

    def to_json(self) -> dict:
        return {"source": self.source.__dict__.copy(), "manifest": self.manifest.__dict__.copy(),
                "data": self.data.__dict__.copy()}


def _fail(what: str) -> DeltaError:
    return DeltaError(f"delta is invalid: {what}",
                      hint="the publisher's delta is broken; the device installs the full image instead")


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise _fail(what)


def _obj(d: object, what: str) -> dict:
    _need(isinstance(d, dict), f"{what} is not an object")
    return d  # type: ignore[return-value]


def _int(d: dict, key: str, lo: int, hi: int, what: str) -> int:
    v = d.get(key)
    _need(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
          f"{what}.{key}={v!r} is not an integer in [{lo}, {hi}]")
    return v  # type: ignore[return-value]


def _hex(d: dict, key: str, what: str) -> str:
    v = d.get(key)
    _need(isinstance(v, str) and bool(_HEX64.match(v)), f"{what}.{key}={v!r} is not a sha256")
    return v  # type: ignore[return-value]


def _version(v: object, what: str) -> str:
    try:
        return str(Version.parse(v))  # type: ignore[arg-type]
    except (UserError, TypeError):
        raise _fail(f"{what} {v!r} is not a semantic version") from None


def _parse_source(d: object, what: str, limits: Limits) -> Source:
    d = _obj(d, what)
    return Source(_version(d.get("version"), f"{what}.version"), _hex(d, "sha256", what),
                  _int(d, "size", 1, limits.max_image_size, what))


def _parse_file(d: object, what: str, max_length: int, min_length: int = 1) -> DeltaFile:
    d = _obj(d, what)
    target = d.get("target")
    if (p := target_problem(f"{what}.target", target)) is not None:
        raise _fail(p)
    return DeltaFile(target, _hex(d, "sha256", what),  # type: ignore[arg-type]
                     _int(d, "length", min_length, max_length, what))


def delta_ref_problem(ref: DeltaRef, image: Image, dlimits: DeltaLimits = DeltaLimits()) -> str | None:
    """What is wrong with a delta reference of a release whose full image is ``image``, or None."""
    if ref.data.length >= image.compressed_size:
        return (f"the delta from {ref.source.version} is {ref.data.length} bytes, not smaller than the full image "
                f"({image.compressed_size})")
    if ref.manifest.length > dlimits.manifest_max_bytes:
        return f"the delta manifest from {ref.source.version} is larger than {dlimits.manifest_max_bytes} bytes"
    if ref.source.sha256 == image.sha256:
        return f"the delta from {ref.source.version} has the target image as its source"
    return None


def parse_delta_refs(raw: object, image: Image, limits: Limits = Limits(),
                     dlimits: DeltaLimits = DeltaLimits()) -> tuple[DeltaRef, ...]:
    """The ``deltas`` list of a release manifest (raises :class:`DeltaError`)."""
    _need(isinstance(raw, list) and len(raw) <= dlimits.max_deltas, f"deltas must list at most {dlimits.max_deltas}")
    refs: list[DeltaRef] = []
    for i, r in enumerate(raw):  # type: ignore[arg-type]
        r = _obj(r, f"deltas[{i}]")
        ref = DeltaRef(_parse_source(r.get("source"), f"deltas[{i}].source", limits),
                       _parse_file(r.get("manifest"), f"deltas[{i}].manifest", dlimits.manifest_max_bytes),
                       _parse_file(r.get("data"), f"deltas[{i}].data", limits.max_image_size, 0))  # 0: copies only
        if (p := delta_ref_problem(ref, image, dlimits)) is not None:
            raise _fail(p)
        _need(all(o.source.sha256 != ref.source.sha256 for o in refs), f"two deltas from {ref.source.sha256[:12]}")
        refs.append(ref)
    return tuple(refs)


def delta_refs_json(refs: tuple[DeltaRef, ...]) -> list[dict]:
    return [r.to_json() for r in refs]


# -- the delta manifest -------------------------------------------------------------------------
def chunks_digest(chunks: tuple[Chunk, ...] | list[Chunk]) -> str:
    """sha256 over the chunk table's output side (what a delta must reproduce)."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(f"{c.out_offset}:{c.out_length}:{c.out_sha256}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Frame:
    offset: int  # in the delta data
    length: int
    sha256: str
    size: int  # decompressed
    out_sha256: str


@dataclass(frozen=True)
class Op:
    out_offset: int
    out_length: int
    copy: tuple[tuple[int, int, int, str], ...] = ()  # (rel, source_offset, length, sha256)
    dictionary: tuple[tuple[int, int, str], ...] = ()  # (source_offset, length, sha256)
    frame: Frame | None = None
    full: bool = False

    @property
    def dictionary_size(self) -> int:
        return sum(n for _, n, _ in self.dictionary)

    def to_json(self) -> dict:
        return {"out": [self.out_offset, self.out_length], "copy": [list(c) for c in self.copy],
                "dict": [list(d) for d in self.dictionary], "frame": None if self.frame is None else self.frame.__dict__.copy(),
                "full": self.full}


@dataclass(frozen=True)
class Delta:
    product: str
    source: Source
    target_version: str
    target_sha256: str
    target_chunks: str  # chunks_digest of the target's chunk table
    dictionary_max: int
    data_length: int
    ops: tuple[Op, ...]
    schema: str = DELTA_SCHEMA

    def to_bytes(self) -> bytes:
        d = {"schema": self.schema, "product": self.product, "source": self.source.__dict__.copy(),
             "target": {"version": self.target_version, "sha256": self.target_sha256, "chunks": self.target_chunks},
             "dictionary_max": self.dictionary_max, "data_length": self.data_length,
             "ops": [o.to_json() for o in self.ops]}
        return (json.dumps(d, separators=(",", ":"), sort_keys=True) + "\n").encode()

    @property
    def max_frame(self) -> int:
        return max((o.frame.length for o in self.ops if o.frame), default=0)

    @property
    def max_dictionary(self) -> int:
        return max((o.dictionary_size for o in self.ops), default=0)

    def matches(self, ref: DeltaRef, image: Image, product: str, version: str) -> str | None:
        """What makes this delta unusable for the release that references it, or None."""
        if self.source != ref.source:
            return (f"the delta manifest is from {self.source.version} ({self.source.sha256[:12]}), the release says "
                    f"{ref.source.version} ({ref.source.sha256[:12]})")
        if (self.product, self.target_version, self.target_sha256) != (product, version, image.sha256) \
                or self.target_chunks != chunks_digest(image.chunks):
            return f"the delta's target ({self.product} {self.target_version}) is not this release's image"
        if self.data_length != ref.data.length:
            return f"the delta data is {ref.data.length} bytes, its manifest says {self.data_length}"
        if len(self.ops) != len(image.chunks):
            return f"the delta has {len(self.ops)} operations for {len(image.chunks)} chunks"
        for i, (op, ch) in enumerate(zip(self.ops, image.chunks)):
            if (op.out_offset, op.out_length) != (ch.out_offset, ch.out_length):
                return f"operation {i} writes bytes {op.out_offset}+{op.out_length}, chunk {i} is " \
                       f"{ch.out_offset}+{ch.out_length}"
        return None

    @classmethod
    def from_bytes(cls, data: bytes, limits: Limits = Limits(), dlimits: DeltaLimits = DeltaLimits()) -> Delta:
        _need(len(data) <= dlimits.manifest_max_bytes,
              f"the delta manifest is {len(data)} bytes, more than {dlimits.manifest_max_bytes}")
        try:
            d = loads_json(data)
        except ValueError as e:  # also TooDeep, UnicodeDecodeError
            raise _fail(f"the delta manifest is not valid JSON: {e}") from None
        d = _obj(d, "delta manifest")
        _need(d.get("schema") == DELTA_SCHEMA, f"schema {d.get('schema')!r} is not {DELTA_SCHEMA!r}")
        product = d.get("product")
        _need(isinstance(product, str) and 0 < len(product) <= 64, "product is malformed")
        source = _parse_source(d.get("source"), "source", limits)
        t = _obj(d.get("target"), "target")
        tversion = _version(t.get("version"), "target.version")
        tsha, tchunks = _hex(t, "sha256", "target"), _hex(t, "chunks", "target")
        dmax = _int(d, "dictionary_max", 0, dlimits.max_dictionary, "delta")
        data_length = _int(d, "data_length", 0, limits.max_image_size, "delta")
        raw = d.get("ops")
        _need(isinstance(raw, list) and 1 <= len(raw) <= limits.max_chunks, f"ops must list 1 to {limits.max_chunks}")
        ops: list[Op] = []
        out_end = data_end = total = 0
        for i, r in enumerate(raw):  # type: ignore[arg-type]
            op = _parse_op(_obj(r, f"ops[{i}]"), i, source.size, dmax, limits, dlimits)
            _need(op.out_offset == out_end, f"operation {i} writes at {op.out_offset}, not where operation {i - 1} "
                                            f"ended ({out_end}): outputs overlap or leave a hole")
            out_end += op.out_length
            if op.frame is not None:
                _need(op.frame.offset == data_end, f"operation {i}'s frame starts at {op.frame.offset}, not at "
                                                   f"{data_end} (frames overlap or leave a hole)")
                data_end += op.frame.length
            total += len(op.copy) + len(op.dictionary)
            _need(total <= dlimits.max_total_segments, f"more than {dlimits.max_total_segments} segments")
            ops.append(op)
        _need(data_end == data_length, f"the frames add up to {data_end} bytes, data_length is {data_length}")
        return cls(product, source, tversion, tsha, tchunks, dmax, data_length, tuple(ops))  # type: ignore[arg-type]


def _parse_op(r: dict, i: int, source_size: int, dmax: int, limits: Limits, dlimits: DeltaLimits) -> Op:
    what = f"ops[{i}]"
    out = r.get("out")
    _need(isinstance(out, list) and len(out) == 2, f"{what}.out is not [offset, length]")
    o = {"offset": out[0], "length": out[1]}  # type: ignore[index]
    out_offset = _int(o, "offset", 0, limits.max_image_size, what)
    out_length = _int(o, "length", 1, limits.max_chunk_out, what)
    full = r.get("full", False)
    _need(isinstance(full, bool), f"{what}.full is not a boolean")
    copy_raw, dict_raw, frame_raw = r.get("copy", []), r.get("dict", []), r.get("frame")
    _need(isinstance(copy_raw, list) and isinstance(dict_raw, list), f"{what}: copy and dict must be lists")
    _need(len(copy_raw) + len(dict_raw) <= dlimits.max_segments, f"{what} has more than {dlimits.max_segments} segments")
    if full:
        _need(not copy_raw and not dict_raw and frame_raw is None, f"{what} is full and also copies or has a frame")
        return Op(out_offset, out_length, full=True)
    copy: list[tuple[int, int, int, str]] = []
    rel_end = 0
    for j, c in enumerate(copy_raw):  # type: ignore[arg-type]
        w = f"{what}.copy[{j}]"
        _need(isinstance(c, list) and len(c) == 4, f"{w} is not [rel, source_offset, length, sha256]")
        rel, src, n = (_int({"v": c[k]}, "v", 0, 1 << 62, w) for k in range(3))
        _need(isinstance(c[3], str) and bool(_HEX64.match(c[3])), f"{w} has no sha256")
        _need(n >= 1, f"{w} is empty")
        _need(rel >= rel_end, f"{w} overlaps the segment before it in the output")
        _need(rel + n <= out_length, f"{w} ends at {rel + n}, past the chunk's {out_length} bytes")
        _need(src + n <= source_size, f"{w} reads source bytes {src}-{src + n - 1}, outside the source's {source_size}")
        rel_end = rel + n
        copy.append((rel, src, n, c[3]))
    extents: list[tuple[int, int, str]] = []
    dsize = 0
    for j, c in enumerate(dict_raw):  # type: ignore[arg-type]
        w = f"{what}.dict[{j}]"
        _need(isinstance(c, list) and len(c) == 3, f"{w} is not [source_offset, length, sha256]")
        src, n = (_int({"v": c[k]}, "v", 0, 1 << 62, w) for k in range(2))
        _need(isinstance(c[2], str) and bool(_HEX64.match(c[2])), f"{w} has no sha256")
        _need(n >= 1 and src + n <= source_size, f"{w} reads source bytes {src}+{n}, outside the source's {source_size}")
        dsize += n
        extents.append((src, n, c[2]))
    _need(dsize <= dmax, f"{what}'s dictionary is {dsize} bytes, more than dictionary_max {dmax}")
    literal = out_length - sum(c[2] for c in copy)
    frame = None
    if frame_raw is not None:
        f = _obj(frame_raw, f"{what}.frame")
        frame = Frame(_int(f, "offset", 0, limits.max_image_size, what), _int(f, "length", 1, limits.max_chunk_length,
                                                                                what),
                      _hex(f, "sha256", f"{what}.frame"), _int(f, "size", 1, limits.max_chunk_out, what),
                      _hex(f, "out_sha256", f"{what}.frame"))
        _need(frame.size == literal, f"{what}'s frame decompresses to {frame.size} bytes, the copies leave {literal}")
    else:
        _need(literal == 0, f"{what} leaves {literal} bytes that neither a copy nor a frame writes")
        _need(not extents, f"{what} has a dictionary but no frame")
    return Op(out_offset, out_length, tuple(copy), tuple(extents), frame)


def delta_files_problem(ref: DeltaRef, manifest: bytes, data: Iterable[bytes] | None, image: Image, product: str,
                        version: str, limits: Limits = Limits()) -> str | None:
    """``repo verify --deep`` of one delta: the manifest parses and fits its release; with
    ``data`` (the delta data, streamed), every frame's bytes match its sha256 and the whole
    matches the reference. Pure over the bytes given; what is wrong, or None."""
    try:
        delta = Delta.from_bytes(manifest, limits)
    except DeltaError as e:
        return e.message
    if (p := delta.matches(ref, image, product, version)) is not None:
        return f"delta from {ref.source.version}: {p}"
    if data is None:
        return None
    frames = [op.frame for op in delta.ops if op.frame is not None]
    whole, pending, k, got = hashlib.sha256(), bytearray(), 0, 0
    for piece in data:
        whole.update(piece)
        got += len(piece)
        if got > ref.data.length:
            return f"delta data from {ref.source.version} is longer than its signed {ref.data.length} bytes"
        pending += piece
        while k < len(frames) and len(pending) >= frames[k].length:
            if hashlib.sha256(pending[:frames[k].length]).hexdigest() != frames[k].sha256:
                return f"delta from {ref.source.version}: frame {k} fails its sha256"
            del pending[:frames[k].length]
            k += 1
    if got != ref.data.length or whole.hexdigest() != ref.data.sha256:
        return f"delta data from {ref.source.version} does not match its reference"
    return None
