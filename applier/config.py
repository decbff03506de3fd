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

Discovery: ``hardware_id`` absent or ``"dmi"`` (``"dmi:<field>"``) is read from DMI
(``/sys/class/dmi/id/product_name``) by the device; a slot without ``device`` is
``<paths.partlabels>/<partlabel>`` (``/dev/disk/by-partlabel/root-a``); an absent ``[slots]``
means ``root-a``/``root-b``; ``paths.esp`` absent or ``"auto"`` is discovered like
``bootctl --print-esp-path`` (``/efi``, ``/boot/efi``, ``/boot`` holding ``EFI/``).

Every error names the key and the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from metadata.errors import UserError
from metadata.manifest import HWID_RE, NAME_RE

from .windows import Window, WindowError, parse_window

__all__ = ["DEFAULT_PATH", "Config", "SlotConfig"]

DEFAULT_PATH = Path("/etc/abflip/abflip.toml")
SLOT_NAMES = ("a", "b")


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
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"no configuration file at {path}", hint="create it (see README 'Device configuration') or pass --config") from None
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read configuration {path}: {e}") from None
        return cls.from_dict(raw, path)

    @classmethod
    def from_dict(cls, raw: dict, path: Path) -> Config:
        base = path.parent

        def bad(key: str, why: str) -> UserError:
            return UserError(f"{path}: {key} {why}")

        def table(name: str, required: bool = True) -> dict:
            t = raw.get(name)
            if t is None and not required:
                return {}
            if not isinstance(t, dict):
                raise bad(f"[{name}]", "is missing or not a table")
            return t

        def string(t: dict, section: str, key: str, default: str | None = None) -> str:
            v = t.get(key, default)
            if not isinstance(v, str) or not v:
                raise bad(f"{section}.{key}", "is missing or not a non-empty string")
            return v

        def pathval(t: dict, section: str, key: str, default: str | None = None) -> Path:
            p = Path(string(t, section, key, default))
            return p if p.is_absolute() else base / p

        repo = table("repository")
        url = string(repo, "repository", "url")
        if not url.startswith(("http://", "https://")):
            raise bad("repository.url", f"must be an http(s) URL, not {url!r}")
        dev = table("device")
        product = string(dev, "device", "product")
        channel = string(dev, "device", "channel", "stable")
        hwid = string(dev, "device", "hardware_id", "dmi")
        for key, val, pat in (("product", product, NAME_RE), ("channel", channel, NAME_RE), ("hardware_id", hwid, HWID_RE)):
            if not pat.match(val):
                raise bad(f"device.{key}", f"{val!r} is malformed")
        if hwid.startswith("dmi:") and not NAME_RE.match(hwid[4:]):
            raise bad("device.hardware_id", f"{hwid!r}: 'dmi:<field>' names a file of /sys/class/dmi/id, e.g. dmi:board_name")
        paths = table("paths", required=False)
        partlabels = pathval(paths, "paths", "partlabels", "/dev/disk/by-partlabel")
        slots_t = table("slots", required=False)
        slots = {}
        for name in SLOT_NAMES:
            s = slots_t.get(name, {}) if slots_t else {}
            if not isinstance(s, dict):
                raise bad(f"slots.{name}", "must be a table like { device = \"/dev/…\", partlabel = \"root-a\" }")
            label = string(s, f"slots.{name}", "partlabel", f"root-{name}")
            if "device" in s:
                slots[name] = SlotConfig(name, pathval(s, f"slots.{name}", "device"), label)
            else:
                if "/" in label:
                    raise bad(f"slots.{name}.partlabel", f"{label!r} must not contain '/'")
                slots[name] = SlotConfig(name, partlabels / label, label, discovered=True)
        if slots["a"].partlabel == slots["b"].partlabel:
            raise bad("[slots]", f"slots a and b have the same partlabel {slots['a'].partlabel!r}")
        unknown = set(slots_t) - set(SLOT_NAMES)
        if unknown:
            raise bad("[slots]", f"has unknown slot(s) {sorted(unknown)}; only a and b exist")
        boot = table("boot", required=False)
        tries = boot.get("tries", 3)
        if not isinstance(tries, int) or isinstance(tries, bool) or not 1 <= tries <= 32:
            raise bad("boot.tries", f"must be an integer from 1 to 32, not {tries!r}")
        net = table("network", required=False)
        timeout = net.get("timeout", 30.0)
        retries = net.get("retries", 5)
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise bad("network.timeout", "must be seconds in (0, 3600]")
        if not isinstance(retries, int) or not 0 <= retries <= 100:
            raise bad("network.retries", "must be an integer from 0 to 100")
        deadline = net.get("deadline", 120.0)
        if not isinstance(deadline, (int, float)) or isinstance(deadline, bool) or not 0 < deadline <= 3600:
            raise bad("network.deadline", "must be seconds in (0, 3600]")
        agent = _agent_keys(raw, path, table, pathval, bad)
        esp_auto = paths.get("esp", "auto") == "auto"
        return cls(
            path=path, repository_url=url, trusted_root=pathval(repo, "repository", "trusted_root"),
            product=product, channel=channel, hardware_id=hwid, slots=slots,
            esp=Path("/boot/efi") if esp_auto else pathval(paths, "paths", "esp"), esp_auto=esp_auto,
            dmi=pathval(paths, "paths", "dmi", "/sys/class/dmi/id"), partlabels=partlabels, **agent,
            state_dir=pathval(paths, "paths", "state_dir", "/var/lib/abflip"),
            cmdline=pathval(paths, "paths", "cmdline", "/proc/cmdline"),
            efivars=pathval(paths, "paths", "efivars", "/sys/firmware/efi/efivars"),
            tries=tries, http_timeout=float(timeout), retries=retries, metadata_deadline=float(deadline),
        )


_RATE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_rate(value: object) -> int:
    """Bytes per second from an integer or a string like ``"512K"``, ``"2M"``, ``"2MiB/s"``; 0 = unlimited."""
    if isinstance(value, bool):
        raise ValueError("not a rate")  # noqa: TRY004 (the caller reports every bad value the same way)
    if isinstance(value, int):
        if value < 0:
            raise ValueError("negative")
        return value
    if isinstance(value, str):
        import re

        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?[bB])?(?:/s)?\s*", value)
        if m:
            return int(float(m.group(1)) * _RATE[m.group(2).lower()])
    raise ValueError("not a rate")


def _agent_keys(raw: dict, path: Path, table, pathval, bad) -> dict:
    """The device agent's keys: [maintenance], [hooks], network.bandwidth_limit."""
    maint = table("maintenance", required=False)
    wins = maint.get("windows", [])
    if not isinstance(wins, list):
        raise bad("maintenance.windows", "must be a list of strings like \"Sat 01:00-05:00 Europe/Berlin\"")
    windows = []
    for i, w in enumerate(wins):
        try:
            windows.append(parse_window(w))
        except WindowError as e:
            raise bad(f"maintenance.windows[{i}]", f"is invalid: {e}") from None
    reboot = maint.get("reboot_command", ["systemctl", "reboot"])
    if isinstance(reboot, str):
        import shlex

        reboot = shlex.split(reboot)
    if not isinstance(reboot, list) or not all(isinstance(x, str) and x for x in reboot):
        raise bad("maintenance.reboot_command", "must be a command line (a string or a list of strings; [] for none)")
    net = raw.get("network") if isinstance(raw.get("network"), dict) else {}
    try:
        bw = parse_rate(net.get("bandwidth_limit", 0))
    except ValueError:
        raise bad("network.bandwidth_limit", f"must be bytes per second (an integer, or \"512K\", \"2M\"), "
                  f"not {net.get('bandwidth_limit')!r}") from None
    if 0 < bw < 4096:
        raise bad("network.bandwidth_limit", f"{bw} bytes/s is too low to be useful (at least 4096, or 0 for none)")
    hooks = table("hooks", required=False)
    hooks_dir = None if hooks.get("dir") == "" else pathval(hooks, "hooks", "dir", "/etc/abflip/hooks")
    timeout = hooks.get("timeout", 300)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 86400:
        raise bad("hooks.timeout", "must be seconds in (0, 86400]")
    return {"windows": tuple(windows), "reboot_command": tuple(reboot), "bandwidth_limit": bw, "hooks_dir": hooks_dir,
            "hook_timeout": float(timeout)}
