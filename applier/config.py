"""Device configuration (``/etc/abflip/abflip.toml``), validated on load.

Example::

    [repository]
    url = "https://updates.example.com/repo"   # serves metadata/ and targets/
    trusted_root = "/etc/abflip/root.json"     # bootstrap root, shipped in the image

    [device]
    product = "edge-os"
    channel = "stable"
    hardware_id = "acme-box-v2"

    [slots]
    a = { device = "/dev/disk/by-partlabel/root-a", partlabel = "root-a" }
    b = { device = "/dev/disk/by-partlabel/root-b", partlabel = "root-b" }

    [paths]                                    # all optional; tests point them at files
    esp = "/boot/efi"
    state_dir = "/var/lib/abflip"
    cmdline = "/proc/cmdline"
    efivars = "/sys/firmware/efi/efivars"

    [boot]
    tries = 3

    [maintenance]                              # see applier/windows.py and docs/device.md
    windows = ["Sat 01:00-05:00 Europe/Berlin"]
    reboot_command = ["systemctl", "reboot"]

    [hooks]
    dir = "/etc/abflip/hooks"                  # <dir>/<kind>.d/* for pre-install, post-install, health-check
    timeout = 300

    [network]
    low_speed_limit = "1K"                     # abort an image download slower than this ...
    low_speed_time = 60                        # ... over this many seconds (curl --speed-limit/--speed-time)

    [limits]
    memory = "256M"                            # the most memory an update may need; bigger releases are refused

Discovery: ``hardware_id`` absent or ``"dmi"`` (``"dmi:<field>"``) is read from DMI
(``/sys/class/dmi/id/product_name``) by the device; a slot without ``device`` is
``<paths.partlabels>/<partlabel>`` (``/dev/disk/by-partlabel/root-a``); an absent ``[slots]``
means ``root-a``/``root-b``; ``paths.esp`` absent or ``"auto"`` is discovered like
``bootctl --print-esp-path`` (``/efi``, ``/boot/efi``, ``/boot`` holding ``EFI/``).

Rules this module keeps: every error names the key and the file; every key is known (an
unknown key or section is an error that suggests the nearest known name, so a typo never
falls back to a default silently); every value is checked for its type (a boolean is not a
number, a string is not empty) and its range; a path that exists must be of the kind the key
needs (a directory for ``paths.esp``, a regular file for ``repository.trusted_root`` ...);
two slot devices that overlap (see :func:`applier.slots.overlaps`) are refused.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from metadata.bounded import FileRefused, TooDeep, loads_toml, read_file
from metadata.errors import UserError
from metadata.manifest import HWID_RE, NAME_RE

from .windows import Window, WindowError, parse_window

__all__ = ["DEFAULT_PATH", "KNOWN_KEYS", "Config", "SlotConfig", "parse_rate", "parse_size"]

DEFAULT_PATH = Path("/etc/abflip/abflip.toml")
SLOT_NAMES = ("a", "b")
MAX_CONFIG_BYTES = 1 << 20  # a configuration file is a few hundred bytes; /dev/zero is not one
MAX_BYTES = 1 << 40  # upper bound of every byte count and rate (a TOML integer reaches 2**63)
MIN_MEMORY = 16 << 20
DEFAULT_MEMORY = 256 << 20

#: Every section and its keys. Anything else in the file is an error (with the nearest name).
KNOWN_KEYS: dict[str, tuple[str, ...]] = {
    "repository": ("url", "trusted_root"),
    "device": ("product", "channel", "hardware_id", "id_file"),
    "slots": SLOT_NAMES,
    "paths": ("esp", "state_dir", "cmdline", "efivars", "dmi", "partlabels"),
    "boot": ("tries",),
    "network": ("timeout", "deadline", "retries", "bandwidth_limit", "low_speed_limit", "low_speed_time"),
    "maintenance": ("windows", "reboot_command"),
    "hooks": ("dir", "timeout"),
    "limits": ("memory",),
}
SLOT_KEYS = ("device", "partlabel")
# a GPT partition label as it appears in root=PARTLABEL= on the kernel command line (36 UTF-16 units)
PARTLABEL_RE = re.compile(r"[^\s/\\\"'\x00-\x1f\x7f]{1,36}")


@dataclass(frozen=True)
class SlotConfig:
    name: str
    device: Path
    partlabel: str
    discovered: bool = False  # device derived from the partition label, not configured


@dataclass(frozen=True)
class Config:
    path: Path
    repository_url: str
    trusted_root: Path
    product: str
    channel: str
    hardware_id: str
    slots: dict[str, SlotConfig]
    esp: Path = Path("/boot/efi")
    state_dir: Path = Path("/var/lib/abflip")
    cmdline: Path = Path("/proc/cmdline")
    efivars: Path = Path("/sys/firmware/efi/efivars")
    tries: int = 3
    http_timeout: float = 30.0
    metadata_deadline: float = 120.0  # whole-request limit for metadata and small targets (slow retrieval)
    retries: int = 5
    extra: dict = field(default_factory=dict)
    # device agent (issue 5)
    esp_auto: bool = False  # paths.esp absent or "auto": discover it (Context.find_esp)
    dmi: Path = Path("/sys/class/dmi/id")
    partlabels: Path = Path("/dev/disk/by-partlabel")
    windows: tuple[Window, ...] = ()
    reboot_command: tuple[str, ...] = ("systemctl", "reboot")
    bandwidth_limit: int = 0  # bytes per second; 0: unlimited
    hooks_dir: Path | None = Path("/etc/abflip/hooks")
    hook_timeout: float = 300.0
    # issue 9/10: a stalled image download, and the memory an update may need
    low_speed_limit: int = 1024  # bytes/s; 0: off (curl --speed-limit)
    # issue 13: the device's stable id for phased rollouts (applier/rollout.py); its content is validated when read
    id_file: Path = Path("/etc/machine-id")
    low_speed_time: float = 60.0  # seconds the rate must stay below low_speed_limit before aborting (--speed-time)
    memory_budget: int = DEFAULT_MEMORY  # [limits] memory: bytes; a release needing more is refused up front

    @property
    def hardware_id_from_dmi(self) -> str | None:
        """The DMI field to read the hardware id from, or None when it is configured literally."""
        if self.hardware_id == "dmi":
            return "product_name"
        if self.hardware_id.startswith("dmi:"):
            return self.hardware_id[4:]
        return None

    @property
    def metadata_url(self) -> str:
        return self.repository_url.rstrip("/") + "/metadata/"

    @property
    def targets_url(self) -> str:
        return self.repository_url.rstrip("/") + "/targets/"

    @classmethod
    def load(cls, path: Path = DEFAULT_PATH) -> Config:
        path = Path(os.path.abspath(path))  # relative paths in it are relative to it, whatever the cwd later
        return cls.from_dict(_read_toml(path), path)

    @classmethod
    def from_dict(cls, raw: dict, path: Path) -> Config:
        _check_known(raw, path)
        v = _Values(raw, path)
        repo = v.table("repository")
        url = v.string(repo, "repository", "url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or re.search(r"[\s\x00-\x1f\x7f]", url):
            raise v.bad("repository.url", f"must be an http(s) URL like \"https://updates.example.com/repo\", not {_show(url)}")
        dev = v.table("device")
        product = v.string(dev, "device", "product")
        channel = v.string(dev, "device", "channel", "stable")
        hwid = v.string(dev, "device", "hardware_id", "dmi")
        for key, val, pat in (("product", product, NAME_RE), ("channel", channel, NAME_RE), ("hardware_id", hwid, HWID_RE)):
            if not pat.match(val):
                raise v.bad(f"device.{key}", f"{_show(val)} is malformed")
        if hwid.startswith("dmi:") and not NAME_RE.match(hwid[4:]):
            raise v.bad("device.hardware_id", f"{_show(hwid)}: 'dmi:<field>' names a file of /sys/class/dmi/id, e.g. dmi:board_name")
        paths = v.table("paths", required=False)
        partlabels = v.path(paths, "paths", "partlabels", "/dev/disk/by-partlabel", kind="dir")
        slots = _slots(v, partlabels)
        boot = v.table("boot", required=False)
        tries = v.number(boot, "boot", "tries", 3, 1, 32, integer=True)
        net = v.table("network", required=False)
        timeout = v.number(net, "network", "timeout", 30.0, 0, 3600, open_low=True, what="seconds")
        retries = v.number(net, "network", "retries", 5, 0, 100, integer=True)
        deadline = v.number(net, "network", "deadline", 120.0, 0, 3600, open_low=True, what="seconds")
        low_time = v.number(net, "network", "low_speed_time", 60.0, 0, 3600, open_low=True, what="seconds")
        low_limit = v.bytes(net, "network", "low_speed_limit", 1024, what="bytes per second", example="\"1K\"")
        limits = v.table("limits", required=False)
        memory = v.bytes(limits, "limits", "memory", DEFAULT_MEMORY, what="bytes", example="\"256M\"")
        if memory < MIN_MEMORY:
            raise v.bad("limits.memory", f"{memory} bytes is below the minimum of {MIN_MEMORY >> 20} MiB")
        agent = _agent_keys(v)
        esp_value = paths.get("esp", "auto")
        esp_auto = esp_value == "auto"
        config = cls(
            path=path, repository_url=url, trusted_root=v.path(repo, "repository", "trusted_root", kind="file"),
            product=product, channel=channel, hardware_id=hwid, slots=slots,
            esp=Path("/boot/efi") if esp_auto else v.path(paths, "paths", "esp", kind="dir"), esp_auto=esp_auto,
            dmi=v.path(paths, "paths", "dmi", "/sys/class/dmi/id", kind="dir"), partlabels=partlabels, **agent,
            state_dir=v.path(paths, "paths", "state_dir", "/var/lib/abflip", kind="dir"),
            cmdline=v.path(paths, "paths", "cmdline", "/proc/cmdline", kind="file"),
            efivars=v.path(paths, "paths", "efivars", "/sys/firmware/efi/efivars", kind="dir"),
            tries=tries, http_timeout=float(timeout), retries=retries, metadata_deadline=float(deadline),
            low_speed_limit=low_limit, low_speed_time=float(low_time), memory_budget=memory,
            # whatever it is, it only keeps the device out of partial rollouts (read_device_id says why)
            id_file=v.path(dev, "device", "id_file", "/etc/machine-id", kind="any"),
        )
        _check_slots_apart(config, v)
        return config


_RATE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_AMOUNT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?[bB])?(?P<rate>/s)?\s*")


def parse_rate(value: object) -> int:
    """Bytes per second from an integer or a string like ``"512K"``, ``"2M"``, ``"2MiB/s"``; 0 = unlimited."""
    return _parse_amount(value, rate=True)


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like ``"256M"``, ``"1GiB"`` (K/M/G are binary)."""
    return _parse_amount(value, rate=False)


def _parse_amount(value: object, *, rate: bool) -> int:
    if isinstance(value, bool):
        raise ValueError("not an amount")  # noqa: TRY004 (the caller reports every bad value the same way)
    if isinstance(value, int):
        if value < 0:
            raise ValueError("negative")
        return value
    if isinstance(value, str):
        m = _AMOUNT.fullmatch(value)
        if m and (rate or not m.group("rate")):
            return int(float(m.group(1)) * _RATE[m.group(2).lower()])
    raise ValueError("not an amount")


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text.strip()))
    except ValueError:
        return False


def _show(value: object) -> str:
    """A value as the TOML file spelled it, cut short (a 5,000-character string does not belong in an error)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_toml(path: Path) -> dict:
    """The parsed file: a regular file of at most MAX_CONFIG_BYTES, UTF-8 (TOML's encoding), valid TOML."""
    hint = "create it (see README 'Device configuration') or pass --config"
    try:
        data = read_file(path, MAX_CONFIG_BYTES)  # a FIFO given as --config never hangs the agent
    except FileNotFoundError:
        raise UserError(f"no configuration file at {path}", hint=hint) from None
    except FileRefused as e:
        raise UserError(f"configuration {path} {e.strerror}: it is not a configuration file", hint=hint) from None
    except OSError as e:
        raise UserError(f"cannot read configuration {path}: {e.strerror}",
                        hint="run as root, or pass a configuration this user can read (--config)") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"configuration {path} is not UTF-8 text (byte {e.start}); TOML files are UTF-8",
                        hint="save it as UTF-8") from None
    try:
        raw = loads_toml(text)
    except (tomllib.TOMLDecodeError, TooDeep) as e:
        raise UserError(f"cannot read configuration {path}: {e}",
                        hint="fix the TOML syntax at the line and column named (README 'Device configuration' has "
                             "an example)") from None
    return raw


def _nearest(name: str, candidates: dict[str, str], cutoff: float = 0.6) -> str:
    """``"; did you mean X?"`` for the candidate (``{spelling to compare: name to show}``) nearest to ``name``."""
    import difflib  # an error path only

    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return f"; did you mean {candidates[match[0]]}?" if match else ""


def _any_section(key: str, exclude: str = "") -> str:
    """The nearest key of any section, by its last part: top-level ``chanel`` -> ``device.channel``."""
    leaves: dict[str, str] = {}
    for sec, keys in KNOWN_KEYS.items():
        for k in keys:
            if sec != exclude and sec != "slots":
                leaves.setdefault(k, f"{sec}.{k}")
    return _nearest(key, leaves, cutoff=0.75)


def _check_known(raw: dict, path: Path) -> None:
    """Every section and key is one abflip reads (a misspelt key would otherwise fall back to its default)."""
    def unknown(what: str, suggestion: str) -> UserError:
        return UserError(f"{path}: {what} is not a known {'section' if what.startswith('[') else 'key'}{suggestion}",
                         hint="the keys are listed in docs/device.md 'Configuration'")

    for name, value in raw.items():
        if name not in KNOWN_KEYS:
            if isinstance(value, dict):
                raise unknown(f"[{name}]", _nearest(name, {s: f"[{s}]" for s in KNOWN_KEYS}) or _any_section(name))
            raise unknown(name, _any_section(name) or " (every key belongs in a section such as [device])")
        if not isinstance(value, dict):
            continue  # reported by the section's own check ("is not a table")
        for key, sub in value.items():
            if key not in KNOWN_KEYS[name]:
                raise unknown(f"{name}.{key}", _nearest(key, {k: f"{name}.{k}" for k in KNOWN_KEYS[name]})
                              or _any_section(key, exclude=name))
            if name == "slots" and isinstance(sub, dict):
                for k in sub:
                    if k not in SLOT_KEYS:
                        raise unknown(f"slots.{key}.{k}", _nearest(k, {x: f"slots.{key}.{x}" for x in SLOT_KEYS}))


class _Values:
    """Typed access to the parsed file; every failure names the key and the file."""

    def __init__(self, raw: dict, path: Path) -> None:
        self.raw = raw
        self.file = path
        self.base = path.parent

    def bad(self, key: str, why: str, hint: str | None = None) -> UserError:
        return UserError(f"{self.file}: {key} {why}",
                         hint=hint or f"fix {key} in {self.file} (every key and its values: docs/device.md "
                                      "'Configuration')")

    def table(self, name: str, required: bool = True) -> dict:
        t = self.raw.get(name)
        if t is None and not required:
            return {}
        if not isinstance(t, dict):
            raise self.bad(f"[{name}]", "is missing or not a table")
        return t

    def string(self, t: dict, section: str, key: str, default: str | None = None) -> str:
        v = t.get(key, default)
        if v is None:
            raise self.bad(f"{section}.{key}", "is missing")
        if not isinstance(v, str) or not v.strip():
            raise self.bad(f"{section}.{key}", f"must be a non-empty string, not {_show(v)}",
                           hint=f'quote it: {key} = "{v}"' if isinstance(v, (int, float)) and not isinstance(v, bool)
                           else None)
        if "\x00" in v:
            raise self.bad(f"{section}.{key}", "must not contain a NUL character")
        return v

    def number(self, t: dict, section: str, key: str, default: float, lo: float, hi: float, *, integer: bool = False,
               open_low: bool = False, what: str = "") -> float:
        """An int (``integer``) or an int/float in [lo, hi] (``(lo, hi]`` with ``open_low``); never a bool, NaN or inf."""
        v = t.get(key, default)
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or (isinstance(v, float) and not math.isfinite(v)) \
                or not (lo < v if open_low else lo <= v) or not v <= hi:
            kind = "an integer from" if integer else f"{what or 'a number'} in"
            bounds = f"{lo} to {hi}" if integer else f"{'(' if open_low else '['}{lo:g}, {hi:g}]"
            raise self.bad(f"{section}.{key}", f"must be {kind} {bounds}, not {_show(v)}",
                           hint=f"write it without quotes ({key} = {v.strip()}): in quotes TOML reads a string"
                           if isinstance(v, str) and _is_number(v) else None)
        return v

    def bytes(self, t: dict, section: str, key: str, default: int, *, what: str, example: str) -> int:
        v = t.get(key, default)
        try:
            n = parse_rate(v) if what.endswith("per second") else parse_size(v)
        except ValueError:
            raise self.bad(f"{section}.{key}", f"must be {what} (an integer, or {example}), not {_show(v)}") from None
        if n > MAX_BYTES:
            raise self.bad(f"{section}.{key}", f"{n} is beyond any device (at most {MAX_BYTES} = 1T)")
        return n

    def path(self, t: dict, section: str, key: str, default: str | None = None, *, kind: str) -> Path:
        """A path (relative to the configuration file's directory) that, where it exists, is a
        ``dir``, a regular ``file``, or a ``slot`` (block device or image file); ``any``: not
        checked here (its reader judges it)."""
        p = Path(self.string(t, section, key, default))
        p = p if p.is_absolute() else self.base / p
        _check_kind(p, kind, lambda why: self.bad(f"{section}.{key}", f"{p} {why}"))
        return p


def _check_kind(p: Path, kind: str, bad) -> None:
    if kind == "any":
        return
    try:
        st = os.stat(p)
    except (FileNotFoundError, PermissionError):
        return  # not there yet (the agent creates state_dir), or not ours to see: the user of the path reports it
    except NotADirectoryError:
        raise bad("cannot exist: a parent of it is a file, not a directory") from None
    except OSError as e:
        raise bad(f"cannot be examined: {e.strerror}") from None
    mode = st.st_mode
    if kind == "dir" and not stat.S_ISDIR(mode):
        raise bad("is a file, not a directory")
    if kind == "file" and not stat.S_ISREG(mode):
        raise bad("is a directory, not a file" if stat.S_ISDIR(mode) else "is not a regular file")
    if kind == "slot" and not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
        raise bad("is a directory, not a block device or image file" if stat.S_ISDIR(mode)
                  else "is not a block device or image file")


def _slots(v: _Values, partlabels: Path) -> dict[str, SlotConfig]:
    slots_t = v.table("slots", required=False)
    slots = {}
    for name in SLOT_NAMES:
        s = slots_t.get(name, {})
        if not isinstance(s, dict):
            raise v.bad(f"slots.{name}", "must be a table like { device = \"/dev/…\", partlabel = \"root-a\" }")
        label = v.string(s, f"slots.{name}", "partlabel", f"root-{name}")
        if not PARTLABEL_RE.fullmatch(label):
            raise v.bad(f"slots.{name}.partlabel", f"{_show(label)} is not a partition label (1 to 36 characters, "
                        "no space, quote, '/' or control character)")
        if "device" in s:
            slots[name] = SlotConfig(name, v.path(s, f"slots.{name}", "device", kind="slot"), label)
        else:
            slots[name] = SlotConfig(name, partlabels / label, label, discovered=True)
    if slots["a"].partlabel == slots["b"].partlabel:
        raise v.bad("[slots]", f"slots a and b have the same partlabel {slots['a'].partlabel!r}")
    return slots


def _check_slots_apart(config: Config, v: _Values) -> None:
    """Configured slot devices that exist must not overlap (same node, symlink, hard link, a disk
    and its partition). Two discovered ones are the device's business: SlotDevice refuses to
    write over the booted slot whatever the configuration says (DeviceError at write time)."""
    from .slots import overlaps  # slots imports this module

    a, b = config.slots["a"], config.slots["b"]
    if a.discovered and b.discovered:
        return
    try:
        same = overlaps(a.device, b.device)
    except OSError:
        return  # one of them does not exist (yet): nothing to compare
    if same:
        raise v.bad("[slots]", f"slots.a.device and slots.b.device name the same device ({a.device} and {b.device}); "
                    "an update would write over the running system")


def _agent_keys(v: _Values) -> dict:
    """The device agent's keys: [maintenance], [hooks], network.bandwidth_limit."""
    maint = v.table("maintenance", required=False)
    wins = maint.get("windows", [])
    if not isinstance(wins, list):
        raise v.bad("maintenance.windows", "must be a list of strings like \"Sat 01:00-05:00 Europe/Berlin\"")
    windows = []
    for i, w in enumerate(wins):
        try:
            windows.append(parse_window(w))
        except WindowError as e:
            raise v.bad(f"maintenance.windows[{i}]", f"is invalid: {e}") from None
    reboot = maint.get("reboot_command", ["systemctl", "reboot"])
    if isinstance(reboot, str):
        import shlex

        try:
            reboot = shlex.split(reboot)
        except ValueError as e:
            raise v.bad("maintenance.reboot_command", f"cannot be split into words: {e}") from None
    if not isinstance(reboot, list) or not all(isinstance(x, str) and x and "\x00" not in x for x in reboot):
        raise v.bad("maintenance.reboot_command", "must be a command line (a string or a list of strings; [] for none)")
    net = v.table("network", required=False)
    bw = v.bytes(net, "network", "bandwidth_limit", 0, what="bytes per second", example="\"512K\", \"2M\"")
    if 0 < bw < 4096:
        raise v.bad("network.bandwidth_limit", f"{bw} bytes/s is too low to be useful (at least 4096, or 0 for none)")
    hooks = v.table("hooks", required=False)
    hooks_dir = None if hooks.get("dir") == "" else v.path(hooks, "hooks", "dir", "/etc/abflip/hooks", kind="dir")
    timeout = v.number(hooks, "hooks", "timeout", 300, 0, 86400, open_low=True, what="seconds")
    return {"windows": tuple(windows), "reboot_command": tuple(reboot), "bandwidth_limit": bw, "hooks_dir": hooks_dir,
            "hook_timeout": float(timeout)}
