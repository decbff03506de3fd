"""The release manifest (``release.json``) and the channel pointer: schema, parse, bounds.

Both halves speak these formats: the builder writes them, the device parses them after
TUF has verified their bytes. Parsing is pure (bytes in, objects out) and bounds every
field (DESIGN.md invariant 7), so a hostile repository cannot make the device allocate,
loop or write without limit. A manifest that does not parse is the repository's fault:
:class:`ManifestError` is a :class:`RepositoryError`.

The chunk table: the compressed image is a sequence of zstd frames, one per chunk. Chunk
``i`` decompresses to the image bytes ``[out_offset, out_offset + out_length)``. Chunk
``i > 0`` was compressed with the ``window`` image bytes that precede ``out_offset`` as a
raw-content dictionary, so the device needs those bytes (already written and verified in
the slot) to decompress it; this keeps the ratio within 1 % of one long zstd stream while
every chunk can be verified before decompression and a download can resume at any chunk.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from .errors import RepositoryError, UserError
from .version import Version

__all__ = [
    "ManifestError",
    "Chunk",
    "Compression",
    "Image",
    "BootFile",
    "Boot",
    "Release",
    "Channel",
    "Limits",
    "release_target_dir",
    "channel_target_path",
]

RELEASE_SCHEMA = "abflip-release/1"
CHANNEL_SCHEMA = "abflip-channel/1"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
HWID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TARGET = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")
FSTYPES = ("erofs", "squashfs", "ext4")


class ManifestError(RepositoryError):
    """The manifest or channel pointer is malformed or out of bounds."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds a device accepts (invariant 7). The defaults fit images up to 1 TiB."""

    manifest_max_bytes: int = 8 << 20
    channel_max_bytes: int = 64 << 10
    max_chunks: int = 65536
    max_chunk_out: int = 256 << 20  # decompressed bytes per chunk
    max_chunk_length: int = 257 << 20  # compressed bytes per chunk (zstd bound of the above)
    max_window: int = 128 << 20
    max_image_size: int = 1 << 40
    max_boot_file: int = 512 << 20


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ManifestError(f"release manifest is invalid: {what}")


def _int(d: dict, key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    _need(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi, f"{key}={v!r} is not an integer in [{lo}, {hi}]")
    return v


def _str(d: dict, key: str, pattern: re.Pattern[str]) -> str:
    v = d.get(key)
    _need(isinstance(v, str) and bool(pattern.match(v)), f"{key}={v!r} is malformed")
    return v


def _obj(d: object, what: str) -> dict:
    _need(isinstance(d, dict), f"{what} is not an object")
    return d  # type: ignore[return-value]


def _version(d: dict) -> Version:
    v = d.get("version")
    try:
        return Version.parse(v)  # type: ignore[arg-type]
    except UserError as e:
        raise ManifestError(f"release manifest is invalid: {e.message}") from None


def _load_json(data: bytes, max_bytes: int, what: str) -> dict:
    _need(len(data) <= max_bytes, f"{what} is {len(data)} bytes, more than the limit {max_bytes}")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{what} is not valid JSON: {e}") from None
    return _obj(obj, what)


@dataclass(frozen=True)
class Chunk:
    offset: int
    length: int
    sha256: str
    out_offset: int
    out_length: int
    out_sha256: str


@dataclass(frozen=True)
class Compression:
    format: str
    level: int
    chunk_size: int
    window: int


@dataclass(frozen=True)
class Image:
    target: str
    fstype: str
    size: int
    sha256: str
    compression: Compression
    chunks: tuple[Chunk, ...]

    @property
    def compressed_size(self) -> int:
        return sum(c.length for c in self.chunks)


@dataclass(frozen=True)
class BootFile:
    target: str
    sha256: str
    length: int


@dataclass(frozen=True)
class Boot:
    """Boot files for the Type #1 entry: a kernel (+ initrd), or a unified kernel image
    (``uki``, entry line ``efi``); ``kernel`` is None exactly when ``uki`` is given."""

    kernel: BootFile | None
    initrd: BootFile | None
    options: str
    uki: BootFile | None = None

    def files(self) -> dict[str, BootFile]:
        """ESP file name -> boot file."""
        if self.uki is not None:
            return {"uki.efi": self.uki}
        assert self.kernel is not None
        out = {"vmlinuz": self.kernel}
        if self.initrd is not None:
            out["initrd.img"] = self.initrd
        return out


def release_target_dir(product: str, version: str) -> str:
    return f"{product}/releases/{version}"


def channel_target_path(product: str, channel: str) -> str:
    return f"{product}/channels/{channel}.json"


@dataclass(frozen=True)
class Release:
    product: str
    version: Version
    compatible: tuple[str, ...]
    created: int
    image: Image
    boot: Boot
    schema: str = RELEASE_SCHEMA

    @property
    def target_path(self) -> str:
        return f"{release_target_dir(self.product, str(self.version))}/release.json"

    # -- serialisation ---------------------------------------------------------------------
    def to_json(self) -> dict:
        d = asdict(self)
        d["version"] = str(self.version)
        d["compatible"] = list(self.compatible)
        d["image"]["chunks"] = [asdict(c) for c in self.image.chunks]
        if d["boot"]["uki"] is None:
            del d["boot"]["uki"]  # kernel releases keep the original schema, byte for byte
        return {"schema": self.schema, **{k: v for k, v in d.items() if k != "schema"}}

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, limits: Limits = Limits()) -> Release:
        d = _load_json(data, limits.manifest_max_bytes, "release manifest")
        _need(d.get("schema") == RELEASE_SCHEMA, f"schema {d.get('schema')!r} is not {RELEASE_SCHEMA!r}")
        product = _str(d, "product", NAME_RE)
        version = _version(d)
        compatible = d.get("compatible")
        _need(isinstance(compatible, list) and 1 <= len(compatible) <= 256, "compatible must list 1 to 256 hardware ids")
        for hw in compatible:  # type: ignore[union-attr]
            _need(isinstance(hw, str) and bool(HWID_RE.match(hw)), f"hardware id {hw!r} is malformed")
        created = _int(d, "created", 0, 1 << 40)
        image = _parse_image(_obj(d.get("image"), "image"), limits)
        boot = _parse_boot(_obj(d.get("boot"), "boot"), limits)
        return cls(product, version, tuple(compatible), created, image, boot)  # type: ignore[arg-type]


def _parse_boot_file(d: object, what: str, limits: Limits) -> BootFile:
    d = _obj(d, what)
    return BootFile(_str(d, "target", _TARGET), _str(d, "sha256", _HEX64), _int(d, "length", 1, limits.max_boot_file))


def _parse_boot(d: dict, limits: Limits) -> Boot:
    uki = None if d.get("uki") is None else _parse_boot_file(d.get("uki"), "boot.uki", limits)
    if uki is not None:
        _need(d.get("kernel") is None and d.get("initrd") is None, "boot.uki excludes boot.kernel and boot.initrd")
        kernel = None
    else:
        kernel = _parse_boot_file(d.get("kernel"), "boot.kernel", limits)
    initrd = None if d.get("initrd") is None else _parse_boot_file(d.get("initrd"), "boot.initrd", limits)
    options = d.get("options", "")
    _need(isinstance(options, str) and len(options) <= 4096 and "\n" not in options, "boot.options is malformed")
    return Boot(kernel, initrd, options, uki)


def _parse_image(d: dict, limits: Limits) -> Image:
    target = _str(d, "target", _TARGET)
    fstype = d.get("fstype")
    _need(fstype in FSTYPES, f"fstype {fstype!r} is not one of {FSTYPES}")
    size = _int(d, "size", 1, limits.max_image_size)
    sha = _str(d, "sha256", _HEX64)
    c = _obj(d.get("compression"), "image.compression")
    _need(c.get("format") == "zstd", f"compression format {c.get('format')!r} is not zstd")
    comp = Compression("zstd", _int(c, "level", -131072, 22), _int(c, "chunk_size", 4096, limits.max_chunk_out),
                       _int(c, "window", 0, limits.max_window))
    raw = d.get("chunks")
    _need(isinstance(raw, list) and 1 <= len(raw) <= limits.max_chunks, f"chunks must list 1 to {limits.max_chunks} chunks")
    chunks = []
    offset = out_offset = 0
    for i, r in enumerate(raw):  # type: ignore[arg-type]
        r = _obj(r, f"chunk {i}")
        ch = Chunk(
            _int(r, "offset", 0, 1 << 62), _int(r, "length", 1, limits.max_chunk_length), _str(r, "sha256", _HEX64),
            _int(r, "out_offset", 0, 1 << 62), _int(r, "out_length", 1, limits.max_chunk_out), _str(r, "out_sha256", _HEX64),
        )
        _need(ch.offset == offset and ch.out_offset == out_offset, f"chunk {i} is not contiguous with the one before it")
        offset += ch.length
        out_offset += ch.out_length
        chunks.append(ch)
    _need(out_offset == size, f"chunks decompress to {out_offset} bytes, the image size is {size}")
    return Image(target, fstype, size, sha, comp, tuple(chunks))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Channel:
    product: str
    channel: str
    version: Version
    release: str
    schema: str = field(default=CHANNEL_SCHEMA)

    def to_bytes(self) -> bytes:
        d = {"schema": self.schema, "product": self.product, "channel": self.channel,
             "version": str(self.version), "release": self.release}
        return (json.dumps(d, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, limits: Limits = Limits()) -> Channel:
        d = _load_json(data, limits.channel_max_bytes, "channel pointer")
        _need(d.get("schema") == CHANNEL_SCHEMA, f"channel schema {d.get('schema')!r} is not {CHANNEL_SCHEMA!r}")
        return cls(_str(d, "product", NAME_RE), _str(d, "channel", NAME_RE), _version(d), _str(d, "release", _TARGET))


def check_name(kind: str, value: str) -> str:
    """Validate a product or channel name given by a user."""
    if not NAME_RE.match(value):
        raise UserError(f"{kind} {value!r} is not a valid name", hint="use lowercase letters, digits, '.', '_' or '-' (max 64)")
    return value
