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

from .bounded import loads_json
from .errors import RepositoryError, UserError
from .verity import Verity, verity_problem
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
    "Rollout",
    "rollout_problem",
    "withdrawn_problem",
    "MAX_WITHDRAWN",
    "Limits",
    "release_target_dir",
    "channel_target_path",
    "check_name",
    "NAME_RE",
    "HWID_RE",
    "FSTYPES",
    "OPTIONS_MAX",
    "DEVICE_OWNED_PARAMS",
    "kernel_params",
    "device_owned_param",
    "boot_options_problem",
    "name_problem",
    "hwid_problem",
    "compatible_problem",
    "target_problem",
    "compression_problem",
    "image_size_problem",
    "boot_file_problem",
]

RELEASE_SCHEMA = "abflip-release/1"
CHANNEL_SCHEMA = "abflip-channel/1"
# ``\Z``, not ``$``: ``$`` also matches before a final newline, so "demo\n" would pass.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
HWID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}\Z")
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_TARGET = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*\Z")
TARGET_MAX = 512
FSTYPES = ("erofs", "squashfs", "ext4")
ZSTD_LEVELS = (-131072, 22)  # ZSTD_minCLevel() .. ZSTD_maxCLevel() of libzstd 1.5
MAX_COMPATIBLE = 256
# Boot options: the x86 kernel command line is 2048 bytes (COMMAND_LINE_SIZE) and the device
# puts ``root=... abflip.slot=...`` in front (about 330 characters with a verity tree's
# parameters, metadata/verity.py), so a release gets half of it.
OPTIONS_MAX = 1024
# Parameters that say which root (slot) boots, and how it is verified. The device writes
# ``root=``, ``abflip.slot=`` and the verity tree's ``abflip.verity*`` itself; the kernel and
# systemd take the *last* of repeated parameters, so a release that set any of these could boot
# one slot while abflip believes it booted the other, then write the next release over the
# mounted root, or open the root with a root hash of its own choosing. ``dm-mod.create`` (the
# kernel's own device-mapper tables at boot) could set up a mapping of that name unverified.
# A trailing ``*`` matches any name with that prefix. Names compare as the kernel and systemd
# compare them: '-' equals '_', and an ``rd.`` prefix (the initrd's copy of a systemd
# parameter) is ignored.
DEVICE_OWNED_PARAMS = (
    "root", "abflip.*",
    "mount.usr", "mount.usrfstype", "mount.usrflags", "usr",
    "roothash", "usrhash", "systemd.verity*", "dm-mod.*",
    "systemd.gpt_auto", "systemd.image_policy", "systemd.mount-extra",
)


class ManifestError(RepositoryError):
    """The manifest or channel pointer is malformed or out of bounds."""


MIN_PIECE = 64 << 10  # the smallest verification unit a manifest may ask for


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


# -- validators ------------------------------------------------------------------------------
# One pure function per kind of value: it returns what is wrong (a phrase naming the value) or
# None. The device wraps the answer in ManifestError (the repository's fault), the producer's
# `release create` in UserError (the user's input), so both halves apply the same rules.

def kernel_params(options: str) -> list[str]:
    """Split ``options`` into parameters as the kernel does (``lib/cmdline.c:next_arg``):
    whitespace separates them except inside double quotes. Raise ValueError on an unbalanced
    quote (the kernel would silently take the rest of the line as one parameter)."""
    params: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in options:
        if ch == '"':
            quoted = not quoted
        if ch.isspace() and not quoted:
            if cur:
                params.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if quoted:
        raise ValueError("has an unbalanced double quote")
    if cur:
        params.append("".join(cur))
    return params


def _param_key(param: str) -> str:
    """The name a parameter sets, as the kernel and systemd compare it: quotes removed (systemd
    unquotes the whole word), '-' as '_', without an ``rd.`` prefix."""
    name = param.replace('"', "").split("=", 1)[0].replace("-", "_")
    return name[3:] if name.startswith("rd.") else name


def device_owned_param(param: str) -> str | None:
    """The entry of :data:`DEVICE_OWNED_PARAMS` that ``param`` (``name[=value]``) would set, or None."""
    key = _param_key(param)
    for owned in DEVICE_OWNED_PARAMS:
        o = owned.replace("-", "_")
        if (o.endswith("*") and key.startswith(o[:-1])) or key == o:
            return owned
    return None


def boot_options_problem(options: object) -> str | None:
    """What is wrong with a release's kernel options, or None.

    Refused: anything but a string of at most :data:`OPTIONS_MAX` printable ASCII characters
    (0x20-0x7e; systemd-boot ends an entry line at ``\\r`` as well as ``\\n``, so one control
    character would let the release add ``efi``/``options`` lines), an unbalanced double quote,
    and any parameter in :data:`DEVICE_OWNED_PARAMS`."""
    if not isinstance(options, str):
        return "boot.options is not a string"
    if len(options) > OPTIONS_MAX:
        return f"boot.options is {len(options)} characters, more than {OPTIONS_MAX}"
    bad = next((ch for ch in options if not " " <= ch <= "~"), None)
    if bad is not None:
        return f"boot.options contains the control or non-ASCII character {bad!r} (only printable ASCII is allowed)"
    try:
        params = kernel_params(options)
    except ValueError as e:
        return f"boot.options {e}"
    for p in params:
        if (owned := device_owned_param(p)) is not None:
            name = p.replace('"', "").split("=", 1)[0]
            return (f"boot.options sets {name!r} ({owned}), which the device owns: "
                    "it chooses the root that boots, or how it is verified")
    return None


def name_problem(kind: str, value: object) -> str | None:
    """A product or channel name: lowercase letters, digits, '.', '_', '-', at most 64."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        return f"{kind} {value!r} is malformed (lowercase letters, digits, '.', '_' or '-', at most 64)"
    return None


def hwid_problem(value: object) -> str | None:
    if not isinstance(value, str) or not HWID_RE.match(value):
        return f"hardware id {value!r} is malformed (letters, digits and ._:/+-, at most 128, no spaces)"
    return None


def compatible_problem(values: object) -> str | None:
    if not isinstance(values, (list, tuple)) or not 1 <= len(values) <= MAX_COMPATIBLE:
        return f"compatible must list 1 to {MAX_COMPATIBLE} hardware ids"
    return next((p for v in values if (p := hwid_problem(v))), None)


def target_problem(kind: str, value: object) -> str | None:
    """A target path: '/'-separated words of [A-Za-z0-9._+-], no '.' or '..' word, at most
    :data:`TARGET_MAX` characters."""
    if not isinstance(value, str) or len(value) > TARGET_MAX or not _TARGET.match(value) \
            or any(part in (".", "..") for part in value.split("/")):
        return f"{kind} {value!r} is malformed"
    return None


def _int_problem(key: str, v: object, lo: int, hi: int) -> str | None:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        return f"{key}={v!r} is not an integer in [{lo}, {hi}]"
    return None


def compression_problem(level: object, chunk_size: object, window: object, limits: Limits) -> str | None:
    """zstd level, chunk size and dictionary window as the device accepts them."""
    return (_int_problem("level", level, *ZSTD_LEVELS)
            or _int_problem("chunk_size", chunk_size, 4096, limits.max_chunk_out)
            or _int_problem("window", window, 0, limits.max_window))


def image_size_problem(size: int, chunk_size: int, limits: Limits) -> str | None:
    """An image of ``size`` bytes cut into ``chunk_size`` chunks: not empty, within the limits."""
    if size < 1:
        return "the image is empty"
    if size > limits.max_image_size:
        return f"the image is {size} bytes, more than the limit {limits.max_image_size}"
    n = -(-size // chunk_size)
    if n > limits.max_chunks:
        return (f"{size} bytes in chunks of {chunk_size} make {n} chunks, more than the limit {limits.max_chunks}"
                f" (use a chunk size of at least {-(-size // limits.max_chunks)})")
    return None


def boot_file_problem(name: str, length: int, limits: Limits) -> str | None:
    if not 1 <= length <= limits.max_boot_file:
        return f"boot file {name} is {length} bytes, not in [1, {limits.max_boot_file}]"
    return None



def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ManifestError(f"release manifest is invalid: {what}")


def _check(problem: str | None) -> None:
    if problem is not None:
        raise ManifestError(f"release manifest is invalid: {problem}")


def _int(d: dict, key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    _check(_int_problem(key, v, lo, hi))
    return v  # type: ignore[return-value]


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
        obj = loads_json(data)
    except ValueError as e:  # also TooDeep, UnicodeDecodeError
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
    # sha256 of each ``Compression.piece_size`` slice of the compressed chunk (the last one shorter):
    # the device verifies and decompresses piece by piece as they arrive (docs/formats.md). Empty
    # in manifests made before pieces existed: the whole chunk is then the one unit verified.
    pieces: tuple[str, ...] = ()

    def piece_spans(self, piece_size: int) -> list[tuple[int, int, str]]:
        """``(start, end, sha256)`` of each verification unit, offsets within the compressed chunk."""
        if not self.pieces:
            return [(0, self.length, self.sha256)]
        return [(k * piece_size, min((k + 1) * piece_size, self.length), h) for k, h in enumerate(self.pieces)]


@dataclass(frozen=True)
class Compression:
    format: str
    level: int
    chunk_size: int
    window: int
    piece_size: int = 0  # compressed bytes per verification unit; 0: a whole chunk (older manifests)


@dataclass(frozen=True)
class Image:
    target: str
    fstype: str
    size: int
    sha256: str
    compression: Compression
    chunks: tuple[Chunk, ...]
    # The dm-verity hash tree the image carries after its data (docs/formats.md "dm-verity"); None: no tree.
    # Devices that predate it ignore the key and boot the data as before, unverified.
    verity: Verity | None = None

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
    deltas: tuple = ()  # metadata.delta.DeltaRef: deltas from earlier releases (docs/delta.md)

    @property
    def target_path(self) -> str:
        return f"{release_target_dir(self.product, str(self.version))}/release.json"

    # -- serialisation ---------------------------------------------------------------------
    def to_json(self) -> dict:
        d = asdict(self)
        d["version"] = str(self.version)
        d["compatible"] = list(self.compatible)
        d["image"]["chunks"] = [asdict(c) for c in self.image.chunks]
        if not self.image.compression.piece_size:  # manifests without pieces keep their bytes
            del d["image"]["compression"]["piece_size"]
            for c in d["image"]["chunks"]:
                del c["pieces"]
        else:
            for c in d["image"]["chunks"]:
                c["pieces"] = list(c["pieces"])
        if self.image.verity is None:
            del d["image"]["verity"]  # so do releases without a verity tree
        else:
            d["image"]["verity"] = self.image.verity.to_json()
        if d["boot"]["uki"] is None:
            del d["boot"]["uki"]  # kernel releases keep the original schema, byte for byte
        if not self.deltas:
            del d["deltas"]  # so do releases without deltas
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
        _need(isinstance(compatible, list), "compatible is not a list")
        _check(compatible_problem(compatible))
        created = _int(d, "created", 0, 1 << 40)
        image = _parse_image(_obj(d.get("image"), "image"), limits)
        boot = _parse_boot(_obj(d.get("boot"), "boot"), limits)
        deltas: tuple = ()
        if d.get("deltas") is not None:
            from .delta import DeltaError, parse_delta_refs  # one validator for deltas (metadata/delta.py)
            try:
                deltas = parse_delta_refs(d["deltas"], image, limits)
            except DeltaError as e:
                raise ManifestError(f"release manifest is invalid: {e.message}") from None
        return cls(product, version, tuple(compatible), created, image, boot,  # type: ignore[arg-type]
                   deltas=deltas)


def _target(d: dict, what: str) -> str:
    v = d.get("target")
    _check(target_problem(f"{what}.target", v))
    return v  # type: ignore[return-value]


def _parse_boot_file(d: object, what: str, limits: Limits) -> BootFile:
    d = _obj(d, what)
    return BootFile(_target(d, what), _str(d, "sha256", _HEX64), _int(d, "length", 1, limits.max_boot_file))


def _parse_boot(d: dict, limits: Limits) -> Boot:
    uki = None if d.get("uki") is None else _parse_boot_file(d.get("uki"), "boot.uki", limits)
    if uki is not None:
        _need(d.get("kernel") is None and d.get("initrd") is None, "boot.uki excludes boot.kernel and boot.initrd")
        kernel = None
    else:
        kernel = _parse_boot_file(d.get("kernel"), "boot.kernel", limits)
    initrd = None if d.get("initrd") is None else _parse_boot_file(d.get("initrd"), "boot.initrd", limits)
    options = d.get("options", "")
    _check(boot_options_problem(options))
    return Boot(kernel, initrd, options, uki)


def _pieces(r: dict, i: int, piece_size: int) -> tuple[str, ...]:
    """A chunk's piece hashes: exactly one per ``piece_size`` slice when the image has pieces,
    none otherwise."""
    raw = r.get("pieces")
    if not piece_size:
        _need(raw is None, f"chunk {i} lists pieces but compression.piece_size is not set")
        return ()
    length = r["length"]
    want = -(-length // piece_size)
    _need(isinstance(raw, list) and len(raw) == want,
          f"chunk {i} must list {want} piece hashes (one per {piece_size} compressed bytes)")
    _need(all(isinstance(h, str) and _HEX64.fullmatch(h) for h in raw), f"chunk {i} has a piece hash that is not "
                                                                         "64 lowercase hex digits")
    return tuple(raw)


def _parse_image(d: dict, limits: Limits) -> Image:
    target = _target(d, "image")
    fstype = d.get("fstype")
    _need(fstype in FSTYPES, f"fstype {fstype!r} is not one of {FSTYPES}")
    size = _int(d, "size", 1, limits.max_image_size)
    sha = _str(d, "sha256", _HEX64)
    c = _obj(d.get("compression"), "image.compression")
    _need(c.get("format") == "zstd", f"compression format {c.get('format')!r} is not zstd")
    _check(compression_problem(c.get("level"), c.get("chunk_size"), c.get("window"), limits))
    piece_size = c.get("piece_size", 0)
    _need(piece_size == 0 and "piece_size" not in c or isinstance(piece_size, int) and not isinstance(piece_size, bool)
          and MIN_PIECE <= piece_size <= limits.max_chunk_length,
          f"compression.piece_size must be an integer in [{MIN_PIECE}, {limits.max_chunk_length}]")
    comp = Compression("zstd", c["level"], c["chunk_size"], c["window"], piece_size)
    raw = d.get("chunks")
    _need(isinstance(raw, list) and 1 <= len(raw) <= limits.max_chunks, f"chunks must list 1 to {limits.max_chunks} chunks")
    chunks = []
    offset = out_offset = 0
    for i, r in enumerate(raw):  # type: ignore[arg-type]
        r = _obj(r, f"chunk {i}")
        ch = Chunk(
            _int(r, "offset", 0, 1 << 62), _int(r, "length", 1, limits.max_chunk_length), _str(r, "sha256", _HEX64),
            _int(r, "out_offset", 0, 1 << 62), _int(r, "out_length", 1, limits.max_chunk_out), _str(r, "out_sha256", _HEX64),
            _pieces(r, i, piece_size),
        )
        _need(ch.offset == offset and ch.out_offset == out_offset, f"chunk {i} is not contiguous with the one before it")
        _need(ch.out_length <= comp.chunk_size, f"chunk {i} decompresses to {ch.out_length} bytes, more than the "
                                                f"chunk size {comp.chunk_size}")
        offset += ch.length
        out_offset += ch.out_length
        chunks.append(ch)
    _need(out_offset == size, f"chunks decompress to {out_offset} bytes, the image size is {size}")
    verity = None
    if "verity" in d:
        _check(verity_problem(d["verity"], size, limits.max_image_size))
        verity = Verity.from_json(d["verity"])
    return Image(target, fstype, size, sha, comp, tuple(chunks), verity)  # type: ignore[arg-type]


# -- release control (issue 13, docs/release-control.md) ---------------------------------------
# A pointer with a phased rollout or withdrawn versions is ``abflip-channel/2``: a device that only
# knows /1 refuses it (it would ignore the rollout and install at once) instead of misreading it.
# A pointer without either stays /1, byte for byte.
CHANNEL_SCHEMA_2 = "abflip-channel/2"
ROLLOUT_SEED_RE = re.compile(r"^[A-Za-z0-9._+-]{1,64}\Z")
MAX_WITHDRAWN = 256
_ROLLOUT_KEYS = ("percent", "paused", "seed")
_CHANNEL2_KEYS = ("schema", "product", "channel", "version", "release", "rollout", "withdrawn")


@dataclass(frozen=True)
class Rollout:
    """Who of a product's devices a channel's release is offered to (decided on the device,
    :mod:`applier.rollout`): ``percent`` of them (0..100, by a stable per-device bucket drawn
    from the device id, the product and ``seed``; no seed: the release's version), none that
    has not started yet while ``paused``."""

    percent: int
    paused: bool = False
    seed: str | None = None

    def to_json(self) -> dict:
        d: dict = {"percent": self.percent, "paused": self.paused}
        if self.seed is not None:
            d["seed"] = self.seed
        return d


def rollout_problem(value: object) -> str | None:
    """A channel's ``rollout`` object: exactly ``percent`` (integer 0..100), ``paused`` (a
    boolean) and optionally ``seed`` ([A-Za-z0-9._+-], 1..64)."""
    if not isinstance(value, dict):
        return "rollout is not an object"
    if unknown := sorted(set(value) - set(_ROLLOUT_KEYS), key=str)[:3]:
        return f"rollout has unknown key(s) {', '.join(repr(k) for k in unknown)}"
    if p := _int_problem("rollout.percent", value.get("percent"), 0, 100):
        return p
    if not isinstance(value.get("paused"), bool):
        return f"rollout.paused={value.get('paused')!r} is not true or false"
    seed = value.get("seed")
    if seed is not None and not (isinstance(seed, str) and ROLLOUT_SEED_RE.match(seed)):
        return f"rollout.seed {seed!r} is malformed (letters, digits, '.', '_', '+' or '-', 1 to 64)"
    return None


def withdrawn_problem(value: object) -> str | None:
    """A channel's ``withdrawn`` list: at most :data:`MAX_WITHDRAWN` distinct semver versions."""
    if not isinstance(value, list) or len(value) > MAX_WITHDRAWN:
        return f"withdrawn must list at most {MAX_WITHDRAWN} versions"
    seen = set()
    for v in value:
        try:
            ver = Version.parse(v) if isinstance(v, str) else None
        except UserError:
            ver = None
        if ver is None:
            return f"withdrawn version {str(v)[:80]!r} is not a semantic version"
        if ver in seen:
            return f"withdrawn lists {v!r} twice"
        seen.add(ver)
    return None


@dataclass(frozen=True)
class Channel:
    product: str
    channel: str
    version: Version
    release: str
    schema: str = field(default=CHANNEL_SCHEMA)
    rollout: Rollout | None = None  # None: every device (as /1 pointers always were)
    withdrawn: tuple[str, ...] = ()  # versions pulled from this channel (never offered, reported)

    def is_withdrawn(self, version: object) -> bool:
        """Semver identity: ``2.0.0+rebuild`` is ``2.0.0``."""
        try:
            v = version if isinstance(version, Version) else Version.parse(str(version))
        except UserError:
            return False
        return any(Version.parse(w) == v for w in self.withdrawn)

    def to_bytes(self) -> bytes:
        d: dict = {"schema": self.schema, "product": self.product, "channel": self.channel,
                   "version": str(self.version), "release": self.release}
        if self.rollout is not None or self.withdrawn:
            d["schema"] = CHANNEL_SCHEMA_2
            if self.rollout is not None:
                d["rollout"] = self.rollout.to_json()
            if self.withdrawn:
                d["withdrawn"] = list(self.withdrawn)
        return (json.dumps(d, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, limits: Limits = Limits()) -> Channel:
        d = _load_json(data, limits.channel_max_bytes, "channel pointer")
        schema = d.get("schema")
        _need(schema in (CHANNEL_SCHEMA, CHANNEL_SCHEMA_2),
              f"channel schema {schema!r} is not {CHANNEL_SCHEMA!r} or {CHANNEL_SCHEMA_2!r}")
        product, channel, version = _str(d, "product", NAME_RE), _str(d, "channel", NAME_RE), _version(d)
        release = d.get("release")
        _check(target_problem("release", release))
        rollout, withdrawn = None, ()
        if schema == CHANNEL_SCHEMA_2:
            unknown = sorted(set(d) - set(_CHANNEL2_KEYS), key=str)[:3]
            _need(not unknown, f"channel pointer has unknown key(s) {', '.join(repr(k) for k in unknown)}")
            if "rollout" in d:
                _check(rollout_problem(d["rollout"]))
                r = d["rollout"]
                rollout = Rollout(r["percent"], r["paused"], r.get("seed"))
            if "withdrawn" in d:
                _check(withdrawn_problem(d["withdrawn"]))
                withdrawn = tuple(d["withdrawn"])
        return cls(product, channel, version, release, rollout=rollout, withdrawn=withdrawn)  # type: ignore[arg-type]


def check_name(kind: str, value: str) -> str:
    """Validate a product or channel name given by a user."""
    if not NAME_RE.match(value):
        raise UserError(f"{kind} {value!r} is not a valid name", hint="use lowercase letters, digits, '.', '_' or '-' (max 64)")
    return value
